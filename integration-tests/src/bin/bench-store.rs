//! `cargo xtask bench store`: committed writes per second and p50/p99
//! latency of the Raft-replicated store, 1 and 3 members, at client
//! concurrency 1, 16 and 256 with 256-byte values, side by side with etcd 3.4
//! (Debian's `etcd-server`) under the same shape of load on the same machine;
//! then failover: the time from `kill -9` of the leader to the first write a
//! surviving member accepts.
//!
//! Both stores run as real processes on loopback with data on disk. The load
//! comes from one generator (`controller/examples/store_bench.rs`), which
//! speaks our `Cluster/Propose` RPC or etcd's `Put`, one connection per
//! concurrent writer.
//!
//! Each point runs `--rounds` times (default 3), ours and etcd alternating
//! (and alternating who goes first), and each figure is the median of its
//! rounds: on a shared two-core machine one run of either store can swing by
//! a third, and a single pair of runs says more about the moment than about
//! the stores.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nephele_integration_tests::bench::{Metric, Report};
use nephele_integration_tests::procs::{ControllerCluster, EtcdCluster, workspace_example};
use serde::Deserialize;

const CONCURRENCY: [usize; 3] = [1, 16, 256];
const MEMBERS: [u64; 2] = [1, 3];
/// Runs of each store per point unless `--rounds` says otherwise.
const ROUNDS: usize = 3;

#[derive(Debug, Deserialize)]
struct LoadResult {
    writes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

impl LoadResult {
    /// Each figure's median over `runs` (not empty); errors add up.
    fn median(runs: Vec<LoadResult>) -> LoadResult {
        let mid = |f: fn(&LoadResult) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        LoadResult {
            writes_per_s: mid(|r| r.writes_per_s),
            p50_ms: mid(|r| r.p50_ms),
            p99_ms: mid(|r| r.p99_ms),
            errors: runs.iter().map(|r| r.errors).sum(),
        }
    }
}

/// The value after `flag` on the command line, parsed.
fn flag<T: std::str::FromStr>(flag: &str) -> anyhow::Result<Option<T>> {
    std::env::args()
        .skip_while(|a| a != flag)
        .nth(1)
        .map(|s| s.parse::<T>())
        .transpose()
        .map_err(|_| anyhow::anyhow!("{flag} takes a number"))
}

fn main() -> anyhow::Result<()> {
    let seconds: f64 = flag("--seconds")?.unwrap_or(3.0);
    let rounds: usize = flag("--rounds")?.unwrap_or(ROUNDS).max(1);
    println!(
        "store: {seconds} s of 256-byte writes per run, {rounds} runs of each store per point \
         (alternating; medians shown), members {MEMBERS:?}, concurrency {CONCURRENCY:?}"
    );
    println!(
        "{:<8} {:>7} {:>5} {:>12} {:>9} {:>9} {:>7}",
        "store", "members", "conc", "writes/s", "p50 ms", "p99 ms", "errors"
    );
    let mut report = Report::new("store");
    for members in MEMBERS {
        let ours = ControllerCluster::start(members, 4242)
            .with_context(|| format!("start {members} controllers"))?;
        ours.wait_leader(Duration::from_secs(20))
            .context("the controllers elected no leader")?;
        let theirs =
            EtcdCluster::start(members).with_context(|| format!("start {members} etcd"))?;
        let our_target = [
            "--endpoints".to_owned(),
            ours.endpoints().join(","),
            "--tls-dir".to_owned(),
            ours.tls_dir(1).display().to_string(),
        ];
        let etcd_target = ["--etcd".to_owned(), theirs.client_urls.join(",")];
        for c in CONCURRENCY {
            let mut our_runs = Vec::new();
            let mut etcd_runs = Vec::new();
            for round in 0..rounds {
                let ours_first = round % 2 == 0;
                for ours_now in [ours_first, !ours_first] {
                    if ours_now {
                        our_runs.push(load(&our_target, ours.cluster_id, c, seconds)?);
                    } else {
                        etcd_runs.push(load(&etcd_target, 0, c, seconds)?);
                    }
                }
            }
            let (o, e) = (LoadResult::median(our_runs), LoadResult::median(etcd_runs));
            for (who, r) in [("nephele", &o), ("etcd", &e)] {
                println!(
                    "{who:<8} {members:>7} {c:>5} {:>12.0} {:>9.2} {:>9.2} {:>7}",
                    r.writes_per_s, r.p50_ms, r.p99_ms, r.errors
                );
            }
            let m = format!("{members}m_c{c}");
            report.push(Metric::versus(
                &format!("writes_per_s_{m}"),
                "ops/s",
                o.writes_per_s,
                "etcd",
                e.writes_per_s,
            ));
            report.push(Metric::versus(
                &format!("p99_ms_{m}"),
                "ms",
                o.p99_ms,
                "etcd",
                e.p99_ms,
            ));
        }
    }
    let failover = failover_ms().context("measure failover")?;
    println!("failover: {failover:.0} ms from kill -9 of the leader to the next accepted write");
    println!();
    report.push(Metric::alone("failover_ms", "ms", failover));
    report.print();
    Ok(())
}

/// One load point through the shared generator.
fn load(
    target: &[impl AsRef<std::ffi::OsStr>],
    cluster_id: u64,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<LoadResult> {
    let out = Command::new(workspace_example("store_bench"))
        .args(target)
        .args(["--cluster-id", &cluster_id.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .output()
        .context("run the store_bench load generator")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "load generator failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("STORE_BENCH "))
        .context("the load generator printed no STORE_BENCH line")?;
    Ok(serde_json::from_str(line)?)
}

/// Kills the leader of a fresh 3-member cluster and times the first write
/// that a surviving member accepts.
fn failover_ms() -> anyhow::Result<f64> {
    let mut cluster = ControllerCluster::start(3, 4343)?;
    let leader = cluster
        .wait_leader(Duration::from_secs(20))
        .context("no leader")?;
    // Writes flow before the kill.
    load(
        &[
            "--endpoints",
            &cluster.endpoints().join(","),
            "--tls-dir",
            &cluster.tls_dir(1).display().to_string(),
            "--warmup",
            "0",
        ],
        cluster.cluster_id,
        1,
        0.5,
    )?;
    let index = cluster
        .members
        .iter()
        .position(|m| m.id == leader)
        .context("the leader is not a member")?;
    let killed = Instant::now();
    cluster.members[index].daemon.kill();
    let survivors: Vec<String> = cluster
        .members
        .iter()
        .filter(|m| m.id != leader)
        .map(|m| m.address.clone())
        .collect();
    // Short load runs until one commits a write; each run's first write
    // waits for the new leader (the generator counts errors, not stops).
    let deadline = killed + Duration::from_secs(15);
    while Instant::now() < deadline {
        let r = load(
            &[
                "--endpoints",
                &survivors.join(","),
                "--tls-dir",
                &cluster.tls_dir(1).display().to_string(),
                "--warmup",
                "0",
            ],
            cluster.cluster_id,
            1,
            0.05,
        )?;
        if r.writes_per_s > 0.0 {
            return Ok(killed.elapsed().as_secs_f64() * 1000.0);
        }
    }
    bail!("no write was accepted within 15 s of killing the leader")
}
