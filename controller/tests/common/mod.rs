//! Helpers shared by the controller's crate tests: in-process clusters on
//! loopback ports chosen by the OS.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use neph_controller::raft::RaftConfig;
use neph_controller::server::{self, RunningController};
use tempfile::TempDir;

/// An in-process cluster: every member has its own data directory and gRPC
/// server on 127.0.0.1.
pub struct Cluster {
    pub members: Vec<RunningController>,
    pub dirs: Vec<TempDir>,
    pub cluster_id: u64,
}

/// Fast timings for tests.
pub fn test_config(id: u64, dir: &std::path::Path, peers: BTreeMap<u64, String>) -> RaftConfig {
    let mut c = RaftConfig::new(id, dir.to_owned(), String::new());
    c.peers = peers;
    c.tick = Duration::from_millis(20);
    c.election_ticks = 10;
    c.proposal_timeout = Duration::from_secs(2);
    c.read_timeout = Duration::from_secs(2);
    c
}

impl Cluster {
    /// Starts `n` members that bootstrap together (`init` on each).
    pub async fn start(n: u64, cluster_id: u64, snapshot_interval: u64) -> anyhow::Result<Cluster> {
        let mut listeners = Vec::new();
        let mut addrs = BTreeMap::new();
        for id in 1..=n {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.insert(id, l.local_addr()?.to_string());
            listeners.push(l);
        }
        let mut members = Vec::new();
        let mut dirs = Vec::new();
        for (id, l) in (1..=n).zip(listeners) {
            let dir = tempfile::tempdir()?;
            let mut peers = addrs.clone();
            peers.remove(&id);
            let mut c = test_config(id, dir.path(), peers);
            c.cluster_id = Some(cluster_id);
            c.init = true;
            c.snapshot_interval = snapshot_interval;
            members.push(server::start(c, l).await?);
            dirs.push(dir);
        }
        Ok(Cluster {
            members,
            dirs,
            cluster_id,
        })
    }

    pub fn stores(&self) -> Vec<neph_controller::raft::RaftStore> {
        self.members.iter().map(|m| m.store.clone()).collect()
    }

    pub async fn stop(self) {
        for m in self.members {
            let _ = m.stop().await;
        }
    }
}
