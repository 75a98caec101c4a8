//! Load generator for the replicated store: `C` concurrent clients each
//! write 256-byte values through the `Cluster/Propose` RPC for a fixed time,
//! then it prints committed writes per second and latency percentiles.
//!
//! ```text
//! # against running controllers
//! cargo run --release -p neph-controller --example store_bench -- \
//!     --endpoints 127.0.0.1:7001,127.0.0.1:7002 --cluster-id 42 --concurrency 16 \
//!     --tls-dir /tmp/c1/tls
//! # or against an in-process cluster of N members it starts itself
//! cargo run --release -p neph-controller --example store_bench -- --spawn 3 --concurrency 16
//! ```
//!
//! With the `etcd` feature, `--etcd http://127.0.0.1:2379,...` runs the same
//! shape of load (puts of the same size over the same key space, one client
//! connection per concurrent writer) against etcd instead, for side-by-side
//! figures.
//!
//! Each writer first runs `--warmup` seconds (default 1) that are not
//! counted, then `--seconds` measured ones: only requests started inside the
//! measured window count, so connection set-up (TLS handshakes of hundreds
//! of writers) weighs on neither store's figures.
//!
//! Output: one line `STORE_BENCH {"members":..,"concurrency":..,"writes_per_s":..,
//! "p50_ms":..,"p99_ms":..,"errors":..}` for `cargo xtask bench store`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use neph_controller::raft::{RaftConfig, transport};
use neph_controller::server;
use nephele_proto::cluster::v1 as pb;
use nephele_state::{Command, Envelope, codec};

#[derive(Debug, Parser)]
struct Args {
    /// Controllers to send to (clients are spread over them).
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// A controller's TLS directory (`<data-dir>/tls`): running controllers
    /// speak the cluster protocol only over mutual TLS with a controller
    /// certificate (not needed with `--spawn`).
    #[arg(long)]
    tls_dir: Option<std::path::PathBuf>,
    /// Cluster id of the endpoints.
    #[arg(long, default_value_t = 1)]
    cluster_id: u64,
    /// Start an in-process cluster of this many members instead.
    #[arg(long)]
    spawn: Option<u64>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of load before the measured window (not counted): clients
    /// connect (our channels connect on their first request) and both
    /// stores settle, so neither pays its connection set-up in the figures.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Benchmark etcd at these client URLs instead (feature `etcd`).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
}

#[cfg(feature = "etcd")]
async fn etcd_load(args: &Args) -> anyhow::Result<(Vec<Duration>, u64)> {
    let value = vec![0x5a; args.value_bytes];
    let mut clients = Vec::new();
    for c in 0..args.concurrency {
        let ep = args.etcd[c % args.etcd.len()].clone();
        clients.push(etcd_client::Client::connect([ep], None).await?);
    }
    let window = Window::new(args);
    let mut tasks = Vec::new();
    for (c, mut client) in clients.into_iter().enumerate() {
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut i = 0u64;
            while Instant::now() < window.until {
                let key = format!("bench/{c}/{}", i % 16);
                i += 1;
                let t = Instant::now();
                let ok = client.put(key, value.clone(), None).await.is_ok();
                tally.record(&window, t, ok);
            }
            tally
        }));
    }
    Tally::join(tasks).await
}

#[cfg(not(feature = "etcd"))]
async fn etcd_load(_args: &Args) -> anyhow::Result<(Vec<Duration>, u64)> {
    anyhow::bail!("build with --features etcd to benchmark etcd")
}

/// When a run's requests count: those started from `start` (after the
/// warm-up) until `until`.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    until: Instant,
}

impl Window {
    fn new(args: &Args) -> Window {
        let start = Instant::now() + Duration::from_secs_f64(args.warmup);
        Window {
            start,
            until: start + Duration::from_secs_f64(args.seconds),
        }
    }
}

/// One writer's latencies and errors inside the window.
#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: u64,
}

impl Tally {
    /// Counts a request started at `t` if it started inside the window.
    fn record(&mut self, window: &Window, t: Instant, ok: bool) {
        if t < window.start {
            return;
        }
        if ok {
            self.latencies.push(t.elapsed());
        } else {
            self.errors += 1;
        }
    }

    /// Every writer's latencies together, and the errors summed.
    async fn join(
        tasks: Vec<tokio::task::JoinHandle<Tally>>,
    ) -> anyhow::Result<(Vec<Duration>, u64)> {
        let mut lat = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let tally = t.await?;
            lat.extend(tally.latencies);
            errors += tally.errors;
        }
        Ok((lat, errors))
    }
}

fn report(
    target: &str,
    members: usize,
    concurrency: usize,
    seconds: f64,
    mut lat: Vec<Duration>,
    errors: u64,
) {
    lat.sort();
    let wps = lat.len() as f64 / seconds;
    println!(
        "{target} members {members} concurrency {concurrency}: {wps:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, {errors} errors",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    );
    println!(
        "STORE_BENCH {{\"target\":\"{target}\",\"members\":{members},\"concurrency\":{concurrency},\"writes_per_s\":{wps:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"errors\":{errors}}}",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    );
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank: the smallest sample with at least p of them at or below.
    let n = sorted.len();
    let rank = (1..=n).find(|k| *k as f64 >= p * n as f64).unwrap_or(n);
    sorted[rank - 1].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    nephele_tls::install_default();
    if !args.etcd.is_empty() {
        let (lat, errors) = etcd_load(&args).await?;
        report(
            "etcd",
            args.etcd.len(),
            args.concurrency,
            args.seconds,
            lat,
            errors,
        );
        return Ok(());
    }
    let mut _running = Vec::new();
    let mut _dirs = Vec::new();
    let (endpoints, cluster_id) = match args.spawn {
        Some(n) => {
            let mut listeners = Vec::new();
            let mut addrs = BTreeMap::new();
            for id in 1..=n {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                addrs.insert(id, l.local_addr()?.to_string());
                listeners.push(l);
            }
            for (id, l) in (1..=n).zip(listeners) {
                let dir = tempfile::tempdir()?;
                let mut c = RaftConfig::new(id, dir.path().to_owned(), String::new());
                c.peers = addrs.clone();
                c.peers.remove(&id);
                c.cluster_id = Some(9);
                c.init = true;
                _running.push(server::start(c, l).await?);
                _dirs.push(dir);
            }
            // Wait for a leader.
            let deadline = Instant::now() + Duration::from_secs(10);
            while _running[0].store.status().leader_id == 0 {
                anyhow::ensure!(Instant::now() < deadline, "no leader");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (addrs.into_values().collect::<Vec<_>>(), 9)
        }
        None => (args.endpoints.clone(), args.cluster_id),
    };
    anyhow::ensure!(!endpoints.is_empty(), "give --endpoints or --spawn");
    let members = endpoints.len();
    let value = vec![0x5a; args.value_bytes];
    let tls: transport::PeerTls = match &args.tls_dir {
        Some(dir) => Some(
            nephele_tls::TlsContext::load(
                &nephele_tls::TlsFiles::in_dir(dir),
                nephele_tls::Revocations::new(),
            )
            .with_context(|| format!("cannot load the certificate in {}", dir.display()))?
            .client_config(nephele_tls::PeerPolicy::Kind(
                nephele_tls::IdentityKind::Controller,
            ))?,
        ),
        None => None,
    };
    let window = Window::new(&args);
    let mut tasks = Vec::new();
    for c in 0..args.concurrency {
        let mut client =
            transport::connect_with(&endpoints[c % members], &tls).context("connect")?;
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut i = 0u64;
            while Instant::now() < window.until {
                let env = Envelope::new(
                    0,
                    "bench",
                    Command::KvPut {
                        key: format!("bench/{c}/{}", i % 16),
                        value: value.clone(),
                    },
                );
                i += 1;
                let t = Instant::now();
                let r = client
                    .propose(pb::ProposeRequest {
                        cluster_id,
                        envelope: codec::encode_envelope(&env),
                    })
                    .await;
                tally.record(&window, t, r.is_ok());
            }
            tally
        }));
    }
    let (lat, errors) = Tally::join(tasks).await?;
    report(
        "nephele",
        members,
        args.concurrency,
        args.seconds,
        lat,
        errors,
    );
    for r in _running {
        r.stop().await?;
    }
    Ok(())
}
