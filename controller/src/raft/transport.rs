//! Sending raft messages to peers over gRPC (`nephele.cluster.v1.Cluster/Raft`).
//!
//! One task per peer drains that peer's queue into a single `RaftRequest`
//! (every message waiting, in raft's protobuf encoding) and sends it; at most
//! one request per peer is in flight, the next batch forms meanwhile. A
//! failed send drops its batch (raft retransmits) and reports the peer
//! unreachable, or the snapshot failed, to the Ready loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock, mpsc};
use std::time::Duration;

use nephele_proto::cluster::v1::RaftRequest;
use nephele_proto::cluster::v1::cluster_client::ClusterClient;
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::runtime::Handle;
use tokio::sync::mpsc as tmpsc;
use tonic::transport::{Channel, Endpoint};

use super::node::{Msg, is_snapshot};

/// Largest gRPC message accepted or sent between controllers (snapshots).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// Most raft messages in one request.
const MAX_BATCH: usize = 4096;

/// Opens a lazily connected channel to a controller.
pub fn connect(address: &str) -> Result<ClusterClient<Channel>, tonic::transport::Error> {
    let uri = if address.starts_with("http://") || address.starts_with("https://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let ch = Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(ClusterClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

pub(crate) struct Transport {
    me: u64,
    my_address: String,
    cluster_id: u64,
    rt: Handle,
    addresses: Arc<RwLock<BTreeMap<u64, String>>>,
    blocked: Arc<RwLock<BTreeSet<u64>>>,
    report: mpsc::Sender<Msg>,
    peers: HashMap<u64, tmpsc::UnboundedSender<Message>>,
}

impl Transport {
    pub(crate) fn new(
        me: u64,
        my_address: String,
        cluster_id: u64,
        rt: Handle,
        addresses: Arc<RwLock<BTreeMap<u64, String>>>,
        blocked: Arc<RwLock<BTreeSet<u64>>>,
        report: mpsc::Sender<Msg>,
    ) -> Transport {
        Transport {
            me,
            my_address,
            cluster_id,
            rt,
            addresses,
            blocked,
            report,
            peers: HashMap::new(),
        }
    }

    pub(crate) fn send(&mut self, m: Message) {
        let to = m.to;
        if to == self.me || self.blocked.read().is_ok_and(|b| b.contains(&to)) {
            return;
        }
        if let Some(q) = self.peers.get(&to)
            && q.send(m.clone()).is_ok()
        {
            return;
        }
        let (tx, rx) = tmpsc::unbounded_channel();
        let _ = tx.send(m);
        self.peers.insert(to, tx);
        let peer = Peer {
            id: to,
            me: self.me,
            my_address: self.my_address.clone(),
            cluster_id: self.cluster_id,
            addresses: self.addresses.clone(),
            report: self.report.clone(),
        };
        self.rt.spawn(peer.run(rx));
    }
}

struct Peer {
    id: u64,
    me: u64,
    my_address: String,
    cluster_id: u64,
    addresses: Arc<RwLock<BTreeMap<u64, String>>>,
    report: mpsc::Sender<Msg>,
}

impl Peer {
    async fn run(self, mut rx: tmpsc::UnboundedReceiver<Message>) {
        let mut client: Option<(String, ClusterClient<Channel>)> = None;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let has_snapshot = batch.iter().any(is_snapshot);
            let address = self
                .addresses
                .read()
                .ok()
                .and_then(|a| a.get(&self.id).cloned());
            let Some(address) = address else {
                tracing::debug!(peer = self.id, "no address known for peer");
                self.failed(has_snapshot);
                // Avoid spinning while the address is unknown.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            if client.as_ref().is_none_or(|(a, _)| *a != address) {
                match connect(&address) {
                    Ok(c) => client = Some((address.clone(), c)),
                    Err(e) => {
                        tracing::warn!(peer = self.id, %address, error = %e, "bad peer address");
                        self.failed(has_snapshot);
                        continue;
                    }
                }
            }
            let Some((_, c)) = client.as_mut() else {
                continue;
            };
            let messages = batch
                .iter()
                .filter_map(|m| m.write_to_bytes().ok())
                .collect();
            let req = RaftRequest {
                cluster_id: self.cluster_id,
                from: self.me,
                from_address: self.my_address.clone(),
                messages,
            };
            let sent = c.raft(req).await;
            if sent.is_ok() && has_snapshot {
                let _ = self.report.send(Msg::SnapshotSent(self.id));
            }
            if let Err(status) = sent {
                tracing::debug!(peer = self.id, error = %status.message(), "raft send failed");
                self.failed(has_snapshot);
                if status.code() == tonic::Code::Unavailable {
                    // Do not hammer a dead peer; raft retries on its own.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    fn failed(&self, snapshot: bool) {
        let _ = self.report.send(Msg::Unreachable(self.id));
        if snapshot {
            let _ = self.report.send(Msg::SnapshotFailed(self.id));
        }
    }
}
