//! Real `neph-controller` processes on loopback: kill -9 the leader, check
//! that a new leader takes writes and no acknowledged write is lost, restart
//! the killed member and check it catches up by snapshot install (the
//! survivors compact while it is down), then kill -9 everything and restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nephele_proto::cluster::v1 as pb;
use nephele_proto::cluster::v1::cluster_client::ClusterClient;
use nephele_state::{Envelope, codec};
use tonic::transport::Channel;

#[path = "procs/pki.rs"]
mod pki;

const CLUSTER: u64 = 77;

struct Member {
    id: u64,
    addr: String,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn(m: &mut Member, peers: &str, init: bool) -> anyhow::Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&m.log)?;
    pki::issue_controller(&m.dir, m.id);
    let child = Command::new(env!("CARGO_BIN_EXE_neph-controller"))
        .arg(if init { "init" } else { "run" })
        .args(["--id", &m.id.to_string()])
        .args(["--cluster-id", &CLUSTER.to_string()])
        .args(["--listen", &m.addr])
        .arg("--data-dir")
        .arg(&m.dir)
        .args(["--peers", peers])
        .env("NEPHELE_SNAPSHOT_INTERVAL", "40")
        .env("NEPHELE_TICK_MS", "20")
        .env("RUST_LOG", "info,raft=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("spawn neph-controller")?;
    m.child = Some(child);
    Ok(())
}

fn kill9(m: &mut Member) {
    if let Some(mut c) = m.child.take() {
        let _ = c.kill(); // SIGKILL
        let _ = c.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        kill9(self);
    }
}

async fn client(addr: &str) -> anyhow::Result<ClusterClient<Channel>> {
    Ok(ClusterClient::new(pki::lazy(
        Channel::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(300))
            .timeout(Duration::from_secs(3)),
    )))
}

async fn status(addr: &str) -> Option<pb::StatusResponse> {
    let mut c = client(addr).await.ok()?;
    c.status(pb::StatusRequest {
        cluster_id: CLUSTER,
    })
    .await
    .ok()
    .map(|r| r.into_inner())
}

/// Waits until the given members agree on a leader other than `not`;
/// returns its id.
async fn wait_leader(addrs: &[&str], not: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let mut leaders = Vec::new();
        for a in addrs {
            leaders.push(status(a).await.map(|s| s.leader_id).unwrap_or(0));
        }
        if leaders[0] != 0 && leaders[0] != not && leaders.iter().all(|l| *l == leaders[0]) {
            return Ok(leaders[0]);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no agreed leader among {addrs:?}")
}

async fn put(addr: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let env = Envelope::new(
        0,
        "test",
        nephele_state::Command::KvPut {
            key: key.to_owned(),
            value: value.as_bytes().to_vec(),
        },
    );
    let mut c = client(addr).await?;
    let r = c
        .propose(pb::ProposeRequest {
            cluster_id: CLUSTER,
            envelope: codec::encode_envelope(&env),
        })
        .await?
        .into_inner();
    match codec::decode_outcome(&r.outcome)? {
        Ok(_) => Ok(()),
        Err(e) => bail!("refused: {e}"),
    }
}

async fn read_all(addr: &str, keys: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut c = client(addr).await?;
    let r = c
        .read(pb::ReadRequest {
            cluster_id: CLUSTER,
            keys: keys.to_vec(),
        })
        .await?
        .into_inner();
    Ok(r.values
        .into_iter()
        .filter(|v| v.found)
        .map(|v| (v.key, String::from_utf8_lossy(&v.value).into_owned()))
        .collect())
}

/// Writes `n` keys round-robin through `addrs`; returns those acknowledged.
async fn write_batch(addrs: &[&str], prefix: &str, n: usize) -> BTreeMap<String, String> {
    let mut acked = BTreeMap::new();
    for i in 0..n {
        let key = format!("{prefix}/{i}");
        let value = format!("v{i}");
        if put(addrs[i % addrs.len()], &key, &value).await.is_ok() {
            acked.insert(key, value);
        }
    }
    acked
}

async fn check_all_there(addr: &str, acked: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let keys: Vec<String> = acked.keys().cloned().collect();
    let got = read_all(addr, &keys).await?;
    for (k, v) in acked {
        if got.get(k) != Some(v) {
            bail!(
                "acknowledged write {k}={v} missing on {addr} (got {:?})",
                got.get(k)
            );
        }
    }
    Ok(())
}

fn log_contains(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_then_restart_everything() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut members = Vec::new();
    for id in 1..=3u64 {
        members.push(Member {
            id,
            addr: format!("127.0.0.1:{}", free_port()?),
            dir: tmp.path().join(format!("m{id}")),
            log: tmp.path().join(format!("m{id}.log")),
            child: None,
        });
    }
    let peers_of = |id: u64, ms: &[Member]| -> String {
        ms.iter()
            .filter(|m| m.id != id)
            .map(|m| format!("{}={}", m.id, m.addr))
            .collect::<Vec<_>>()
            .join(",")
    };
    let peers: Vec<String> = members.iter().map(|m| peers_of(m.id, &members)).collect();
    for (m, p) in members.iter_mut().zip(&peers) {
        spawn(m, p, true)?;
    }
    let addrs: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let leader = wait_leader(&all, 0).await?;

    // Acknowledged writes through every member.
    let mut acked = write_batch(&all, "before", 30).await;
    assert_eq!(acked.len(), 30, "a healthy cluster refused writes");

    // kill -9 the leader.
    let li = members
        .iter()
        .position(|m| m.id == leader)
        .context("leader")?;
    let commit_at_kill = status(&members[li].addr)
        .await
        .context("status")?
        .commit_index;
    kill9(&mut members[li]);
    let killed_at = Instant::now();
    let survivor_addrs: Vec<String> = members
        .iter()
        .filter(|m| m.id != leader)
        .map(|m| m.addr.clone())
        .collect();
    let survivors: Vec<&str> = survivor_addrs.iter().map(String::as_str).collect();
    let new_leader = wait_leader(&survivors, leader).await?;
    assert_ne!(new_leader, leader);
    // The new leader accepts writes.
    loop {
        if put(survivors[0], "failover/first", "x").await.is_ok() {
            acked.insert("failover/first".into(), "x".into());
            break;
        }
        if killed_at.elapsed() > Duration::from_secs(10) {
            bail!("no write accepted 10 s after killing the leader");
        }
    }
    eprintln!(
        "failover: first write accepted {:?} after kill -9",
        killed_at.elapsed()
    );
    // Enough writes that the survivors compact past the killed member's log.
    acked.extend(write_batch(&survivors, "after", 100).await);
    for a in &survivors {
        check_all_there(a, &acked).await?;
    }
    let snap = status(survivors[0]).await.context("status")?.snapshot_index;
    assert!(
        snap > commit_at_kill,
        "survivors did not compact past the killed member (snapshot {snap}, its commit {commit_at_kill})"
    );

    // The killed member restarts and catches up by snapshot.
    let p = peers[li].clone();
    spawn(&mut members[li], &p, false)?;
    let target = status(survivors[0]).await.context("status")?.commit_index;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(s) = status(&members[li].addr).await
            && s.applied_index >= target
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the restarted member did not catch up to {target}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check_all_there(&members[li].addr, &acked).await?;
    assert!(
        log_contains(&members[li].log, "installed a snapshot from the leader"),
        "the restarted member caught up without a snapshot install"
    );

    // A request for another cluster is refused.
    let mut c = client(&members[0].addr).await?;
    let err = c
        .status(pb::StatusRequest { cluster_id: 1 })
        .await
        .expect_err("wrong cluster id accepted");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().starts_with("WRONG_CLUSTER_ID"),
        "{}",
        err.message()
    );

    // kill -9 all three, restart: state intact.
    for m in members.iter_mut() {
        kill9(m);
    }
    for (m, p) in members.iter_mut().zip(&peers) {
        spawn(m, p, false)?;
    }
    wait_leader(&all, 0).await?;
    for a in &all {
        check_all_there(a, &acked).await?;
    }
    acked.extend(write_batch(&all, "reborn", 10).await);
    check_all_there(all[0], &acked).await?;

    // A member restarted with the wrong cluster id refuses to start.
    kill9(&mut members[0]);
    let out = Command::new(env!("CARGO_BIN_EXE_neph-controller"))
        .args([
            "run",
            "--id",
            "1",
            "--cluster-id",
            "78",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&members[0].dir)
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("belongs to cluster 77, not 78"), "{stderr}");
    Ok(())
}
