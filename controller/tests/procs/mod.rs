//! Helpers for crate tests that run real `neph-controller` processes on
//! loopback: spawning and `kill -9`, a fault-injecting TCP proxy for the
//! raft traffic between them, gRPC clients that classify outcomes for a
//! linearizability history, and a small tmpfs mount for full-disk tests.
//!
//! Everything a helper starts is undone on drop (processes killed, proxies
//! aborted, mounts unmounted), also when a test fails half-way.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use neph_controller::store::linearizability::{Input, Op, Output};
use nephele_proto::cluster::v1 as pb;
use nephele_proto::cluster::v1::cluster_client::ClusterClient;
use nephele_state::{Envelope, codec};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub mod pki;

/// A free loopback port (bound then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One controller process.
pub struct Member {
    /// Member id.
    pub id: u64,
    /// Where it serves (clients reach it here directly, never via a proxy).
    pub addr: String,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its stderr.
    pub log: PathBuf,
    /// `--peers` it is started with.
    pub peers: String,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Member {
    /// A member that is not started yet.
    pub fn new(id: u64, root: &Path) -> anyhow::Result<Member> {
        Ok(Member {
            id,
            addr: format!("127.0.0.1:{}", free_port()?),
            dir: root.join(format!("m{id}")),
            log: root.join(format!("m{id}.log")),
            peers: String::new(),
            env: Vec::new(),
            child: None,
        })
    }

    /// Starts the process (`init` for a new cluster, `run` otherwise).
    pub fn spawn(&mut self, cluster: u64, init: bool) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        pki::issue_controller(&self.dir, self.id);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_neph-controller"));
        cmd.arg(if init { "init" } else { "run" })
            .args(["--id", &self.id.to_string()])
            .args(["--cluster-id", &cluster.to_string()])
            .args(["--listen", &self.addr])
            .arg("--data-dir")
            .arg(&self.dir)
            .env("NEPHELE_TICK_MS", "20")
            .env("RUST_LOG", "info,raft=warn")
            .stdout(Stdio::null())
            .stderr(log);
        if !self.peers.is_empty() {
            cmd.args(["--peers", &self.peers]);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().context("spawn neph-controller")?);
        Ok(())
    }

    /// `kill -9`, then reaps the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process is running (false once it exited by itself).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits up to `within` for the process to exit by itself; its status.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Its stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A gRPC client of one member with short deadlines.
pub fn client(addr: &str) -> anyhow::Result<ClusterClient<Channel>> {
    Ok(ClusterClient::new(pki::lazy(
        Channel::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(300))
            .timeout(Duration::from_secs(3)),
    )))
}

/// A member's status, `None` if it does not answer.
pub async fn status(addr: &str, cluster: u64) -> Option<pb::StatusResponse> {
    let mut c = client(addr).ok()?;
    c.status(pb::StatusRequest {
        cluster_id: cluster,
    })
    .await
    .ok()
    .map(|r| r.into_inner())
}

/// Waits until all of `addrs` agree on a leader other than `not`.
pub async fn wait_leader(addrs: &[String], cluster: u64, not: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let mut leaders = Vec::new();
        for a in addrs {
            leaders.push(status(a, cluster).await.map(|s| s.leader_id).unwrap_or(0));
        }
        if leaders[0] != 0 && leaders[0] != not && leaders.iter().all(|l| *l == leaders[0]) {
            return Ok(leaders[0]);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no agreed leader among {addrs:?}")
}

/// What became of a write, as a client can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// Committed and applied.
    Acked,
    /// Certainly not applied (refused before submission, or dropped).
    NotApplied(String),
    /// May or may not have been applied.
    Unknown(String),
}

/// Writes `key = value` through `Cluster/Propose` on `c`.
pub async fn put(
    c: &mut ClusterClient<Channel>,
    cluster: u64,
    key: &str,
    value: &[u8],
) -> PutOutcome {
    let env = Envelope::new(
        0,
        "test",
        nephele_state::Command::KvPut {
            key: key.to_owned(),
            value: value.to_vec(),
        },
    );
    let r = c
        .propose(pb::ProposeRequest {
            cluster_id: cluster,
            envelope: codec::encode_envelope(&env),
        })
        .await;
    match r {
        Ok(r) => match codec::decode_outcome(&r.into_inner().outcome) {
            Ok(Ok(_)) => PutOutcome::Acked,
            Ok(Err(e)) => PutOutcome::NotApplied(format!("refused: {e}")),
            Err(e) => PutOutcome::Unknown(format!("outcome does not decode: {e}")),
        },
        Err(s) => {
            let m = s.message().to_owned();
            let sure = [
                "NO_LEADER",
                "DROPPED",
                "OVERLOADED",
                "WRONG_CLUSTER_ID",
                "TOO_LARGE",
            ];
            if sure.iter().any(|p| m.starts_with(p)) {
                PutOutcome::NotApplied(m)
            } else {
                PutOutcome::Unknown(format!("{:?}: {m}", s.code()))
            }
        }
    }
}

/// Linearizable read of `keys` on `c`: `key -> value` for those found.
pub async fn read(
    c: &mut ClusterClient<Channel>,
    cluster: u64,
    keys: &[String],
) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let r = c
        .read(pb::ReadRequest {
            cluster_id: cluster,
            keys: keys.to_vec(),
        })
        .await?
        .into_inner();
    Ok(r.values
        .into_iter()
        .filter(|v| v.found)
        .map(|v| (v.key, v.value))
        .collect())
}

/// A client history shared by concurrent test clients.
#[derive(Clone)]
pub struct History {
    start: Instant,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> History {
        History {
            start: Instant::now(),
            ops: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Nanoseconds since the start.
    pub fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn push(&self, op: Op) {
        if let Ok(mut h) = self.ops.lock() {
            h.push(op);
        }
    }

    /// A put through `c`, recorded (left out when certainly not applied).
    pub async fn put(
        &self,
        c: &mut ClusterClient<Channel>,
        cluster: u64,
        key: &str,
        value: &str,
    ) -> PutOutcome {
        let call = self.now();
        let out = put(c, cluster, key, value.as_bytes()).await;
        let (ret, output) = match &out {
            PutOutcome::Acked => (Some(self.now()), Some(Output::Done)),
            PutOutcome::NotApplied(_) => return out,
            PutOutcome::Unknown(_) => (None, None),
        };
        self.push(Op {
            key: key.to_owned(),
            call,
            ret,
            input: Input::Put(value.to_owned()),
            output,
        });
        out
    }

    /// A read of `key` through `c`, recorded when it succeeded.
    pub async fn get(&self, c: &mut ClusterClient<Channel>, cluster: u64, key: &str) -> bool {
        let call = self.now();
        let Ok(got) = read(c, cluster, &[key.to_owned()]).await else {
            return false;
        };
        let value = got
            .get(key)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        self.push(Op {
            key: key.to_owned(),
            call,
            ret: Some(self.now()),
            input: Input::Get,
            output: Some(Output::Value(value)),
        });
        true
    }

    /// Everything recorded so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

/// Which members the test clients may use (the test marks killed ones).
pub type Alive = Arc<Mutex<Vec<bool>>>;

/// Starts `n` clients that, until `stop` is set, put unique values and read
/// `keys` keys through the members marked alive, round-robin.
pub fn spawn_clients(
    n: usize,
    keys: usize,
    addrs: Vec<String>,
    alive: Alive,
    cluster: u64,
    history: History,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|c| {
            let addrs = addrs.clone();
            let alive = alive.clone();
            let history = history.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut clients: Vec<_> = addrs.iter().filter_map(|a| client(a).ok()).collect();
                let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1);
                let mut i = 0u64;
                while !*stop.borrow() {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let live: Vec<usize> = alive
                        .lock()
                        .map(|a| (0..a.len()).filter(|i| a[*i]).collect())
                        .unwrap_or_default();
                    if live.is_empty() || clients.len() != addrs.len() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    let m = live[usize::try_from(seed % live.len() as u64).unwrap_or(0)];
                    let key = format!("lin/{}", (seed >> 8) % keys as u64);
                    if (seed >> 20).is_multiple_of(2) {
                        i += 1;
                        let value = format!("c{c}-{i}");
                        history.put(&mut clients[m], cluster, &key, &value).await;
                    } else {
                        history.get(&mut clients[m], cluster, &key).await;
                    }
                }
            })
        })
        .collect()
}

/// A TCP proxy that can cut its connections, as a network partition
/// would: `cut` closes every connection and black-holes new ones (accepted,
/// never forwarded, never answered) until `heal`.
pub struct Proxy {
    /// Where it listens.
    pub addr: String,
    cut: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding connections to `upstream`.
    pub async fn start(upstream: String) -> anyhow::Result<Proxy> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?.to_string();
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((sock, _)) = l.accept().await {
                conns.spawn(forward(sock, upstream.clone(), cut_rx.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Proxy { addr, cut, task })
    }

    /// Cuts every connection and black-holes new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards again (black-holed connections are closed).
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops the JoinSet, which aborts every
        // connection task.
        self.task.abort();
    }
}

async fn forward(mut inbound: TcpStream, upstream: String, mut cut: watch::Receiver<bool>) {
    if *cut.borrow_and_update() {
        let mut buf = [0u8; 4096];
        loop {
            tokio::select! {
                r = inbound.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
                _ = cut.wait_for(|c| !*c) => return,
            }
        }
    }
    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut.wait_for(|c| *c) => {}
    }
}

/// A tmpfs mounted by the test on a directory it created; unmounted on
/// drop.
pub struct SmallDisk {
    /// The mount point.
    pub path: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (`mount -o size=`) at `path`; `Err` when
    /// mounting is not possible here (not root, no mount privilege).
    pub fn mount(path: &Path, size: &str) -> anyhow::Result<SmallDisk> {
        std::fs::create_dir_all(path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .context("run mount")?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(SmallDisk {
            path: path.to_owned(),
        })
    }

    /// Changes the size (`mount -o remount,size=`).
    pub fn resize(&self, size: &str) -> anyhow::Result<()> {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .context("run mount")?;
        if !out.status.success() {
            bail!(
                "remount failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
