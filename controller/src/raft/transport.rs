//! Sending raft messages to peers over gRPC (`nephele.cluster.v1.Cluster`).
//!
//! One task per peer drains that peer's queue into `RaftRequest` batches
//! (every message waiting, in raft's protobuf encoding) and pushes them on
//! one long-lived `RaftStream` call: batches are pipelined (the next one
//! leaves without waiting for the previous one to be handled) and arrive in
//! the order sent, which is what raft's optimistic replication needs.
//!
//! ```text
//!  Ready thread ──try_send──► peer queue (PEER_QUEUE messages)
//!                               │ peer task: batch, encode
//!                               ├──► RaftStream (STREAM_BUFFER batches in
//!                               │    flight, HTTP/2 flow control behind)
//!                               └──► Raft (unary) for snapshots, each in
//!                                    its own task, reported when done
//! ```
//!
//! Nothing here blocks the Ready thread and no queue grows without bound: a
//! message that finds its peer's queue or stream full, or its stream
//! broken, is dropped (raft retransmits what matters) and the peer is
//! reported unreachable, which moves raft's progress for it back to
//! probing. A broken stream is reopened after [`RECONNECT_PAUSE`]. Snapshots
//! travel as unary calls so that the Ready loop learns when one was
//! delivered (`report_snapshot`) and heartbeats do not queue behind them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock, mpsc};
use std::time::Duration;

use nephele_proto::cluster::v1::RaftRequest;
use nephele_proto::cluster::v1::cluster_client::ClusterClient;
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::runtime::Handle;
use tokio::sync::mpsc as tmpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::node::{Msg, is_snapshot};

/// Largest gRPC message accepted or sent between controllers (snapshots).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// Most raft messages in one batch.
const MAX_BATCH: usize = 4096;
/// Messages queued for one peer before new ones are dropped.
const PEER_QUEUE: usize = 16384;
/// Batches buffered on one stream before new ones are dropped.
const STREAM_BUFFER: usize = 256;
/// Pause before a failed stream is opened again.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// How long sending one snapshot may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    // TLS, when used, is the connector's: tonic always gets `http://`.
    Ok(Endpoint::from_shared(nephele_tls::channel_uri(address))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true))
}

fn client(ch: Channel) -> ClusterClient<Channel> {
    ClusterClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// How controllers reach each other: mutual TLS with this client config
/// (presenting this member's certificate, accepting only `controller/*`),
/// or plaintext when `None` (in-process tests of the raft layer only; the
/// daemon always has TLS).
pub type PeerTls = Option<Arc<rustls::ClientConfig>>;

/// A lazy channel over TLS when `tls` is given.
fn lazy(endpoint: Endpoint, tls: &PeerTls) -> Channel {
    match tls {
        Some(config) => nephele_tls::lazy_channel(endpoint, config.clone()),
        None => endpoint.connect_lazy(),
    }
}

/// Opens a lazily connected plaintext channel to a controller, with a 10 s
/// deadline on every call (in-process tests; see [`connect_with`]).
pub fn connect(address: &str) -> Result<ClusterClient<Channel>, tonic::transport::Error> {
    connect_with(address, &None)
}

/// Opens a lazily connected channel to a controller, over mutual TLS when
/// `tls` is given, with a 10 s deadline on every call (for clients and
/// forwarded requests).
pub fn connect_with(
    address: &str,
    tls: &PeerTls,
) -> Result<ClusterClient<Channel>, tonic::transport::Error> {
    Ok(client(lazy(
        endpoint(address)?.timeout(Duration::from_secs(10)),
        tls,
    )))
}

/// Like [`connect_with`] without a call deadline: raft streams live as
/// long as the connection does.
fn connect_peer(
    address: &str,
    tls: &PeerTls,
) -> Result<ClusterClient<Channel>, tonic::transport::Error> {
    Ok(client(lazy(endpoint(address)?, tls)))
}

pub(crate) struct Transport {
    me: u64,
    my_address: String,
    cluster_id: u64,
    rt: Handle,
    addresses: Arc<RwLock<BTreeMap<u64, String>>>,
    blocked: Arc<RwLock<BTreeSet<u64>>>,
    report: mpsc::Sender<Msg>,
    peers: HashMap<u64, tmpsc::Sender<Message>>,
    tls: PeerTls,
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
            tls: None,
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

    /// Reaches peers over mutual TLS with `tls` (see [`PeerTls`]).
    pub(crate) fn with_tls(mut self, tls: PeerTls) -> Transport {
        self.tls = tls;
        self
    }

    /// Queues `m` for its peer without blocking; drops it (and reports the
    /// peer unreachable) when the peer's queue is full.
    pub(crate) fn send(&mut self, m: Message) {
        let to = m.to;
        if to == self.me || self.blocked.read().is_ok_and(|b| b.contains(&to)) {
            return;
        }
        let m = match self.peers.get(&to) {
            None => m,
            Some(q) => match q.try_send(m) {
                Ok(()) => return,
                Err(tmpsc::error::TrySendError::Full(m)) => {
                    tracing::debug!(peer = to, "peer queue full; dropping a raft message");
                    let _ = self.report.send(Msg::Unreachable(to));
                    if is_snapshot(&m) {
                        let _ = self.report.send(Msg::SnapshotFailed(to));
                    }
                    return;
                }
                Err(tmpsc::error::TrySendError::Closed(m)) => m,
            },
        };
        let (tx, rx) = tmpsc::channel(PEER_QUEUE);
        let _ = tx.try_send(m);
        self.peers.insert(to, tx);
        let peer = Peer {
            id: to,
            me: self.me,
            my_address: self.my_address.clone(),
            cluster_id: self.cluster_id,
            addresses: self.addresses.clone(),
            report: self.report.clone(),
            tls: self.tls.clone(),
        };
        self.rt.spawn(peer.run(rx));
    }
}

/// Tells the Ready loop when a peer refused us for good: it knows this
/// member was removed from the cluster.
fn report_refusal(report: &mpsc::Sender<Msg>, peer: u64, status: &tonic::Status) {
    if status.code() == tonic::Code::PermissionDenied
        && status.message().starts_with("STALE_MEMBER")
    {
        let _ = report.send(Msg::RemovedByPeer(peer));
    }
}

struct Peer {
    id: u64,
    me: u64,
    my_address: String,
    cluster_id: u64,
    addresses: Arc<RwLock<BTreeMap<u64, String>>>,
    report: mpsc::Sender<Msg>,
    tls: PeerTls,
}

/// One open `RaftStream` call.
struct Stream {
    batches: tmpsc::Sender<RaftRequest>,
    call: JoinHandle<()>,
}

impl Peer {
    async fn run(self, mut rx: tmpsc::Receiver<Message>) {
        let mut client: Option<(String, ClusterClient<Channel>)> = None;
        let mut stream: Option<Stream> = None;
        let mut reopen_at = Instant::now();
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let address = self
                .addresses
                .read()
                .ok()
                .and_then(|a| a.get(&self.id).cloned());
            let Some(address) = address else {
                tracing::debug!(peer = self.id, "no address known for peer");
                self.failed(batch.iter().any(is_snapshot));
                // Avoid spinning while the address is unknown.
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            };
            if client.as_ref().is_none_or(|(a, _)| *a != address) {
                stream = None;
                match connect_peer(&address, &self.tls) {
                    Ok(c) => client = Some((address.clone(), c)),
                    Err(e) => {
                        tracing::warn!(peer = self.id, %address, error = %e, "bad peer address");
                        self.failed(batch.iter().any(is_snapshot));
                        continue;
                    }
                }
            }
            let Some((_, c)) = client.as_ref() else {
                continue;
            };
            let (snapshots, messages): (Vec<Message>, Vec<Message>) =
                batch.into_iter().partition(is_snapshot);
            for s in snapshots {
                self.send_snapshot(c.clone(), s);
            }
            if messages.is_empty() {
                continue;
            }
            if stream.as_ref().is_some_and(|s| s.call.is_finished()) {
                stream = None;
                reopen_at = Instant::now() + RECONNECT_PAUSE;
            }
            let fresh = stream.is_none();
            if fresh {
                if Instant::now() < reopen_at {
                    self.failed(false);
                    continue;
                }
                stream = Some(self.open(c.clone()));
            }
            let Some(s) = stream.as_ref() else {
                continue;
            };
            let req = RaftRequest {
                cluster_id: self.cluster_id,
                from: self.me,
                // The receiver learns our address from a stream's first batch.
                from_address: if fresh {
                    self.my_address.clone()
                } else {
                    String::new()
                },
                messages: messages
                    .iter()
                    .filter_map(|m| m.write_to_bytes().ok())
                    .collect(),
            };
            match s.batches.try_send(req) {
                Ok(()) => {}
                Err(tmpsc::error::TrySendError::Full(_)) => {
                    tracing::debug!(peer = self.id, "raft stream full; dropping a batch");
                    self.failed(false);
                }
                Err(tmpsc::error::TrySendError::Closed(_)) => {
                    stream = None;
                    reopen_at = Instant::now() + RECONNECT_PAUSE;
                    self.failed(false);
                }
            }
        }
        if let Some(s) = stream {
            // Let the call finish once what was queued has gone.
            drop(s.batches);
        }
    }

    fn open(&self, mut c: ClusterClient<Channel>) -> Stream {
        let (batches, rx) = tmpsc::channel(STREAM_BUFFER);
        let report = self.report.clone();
        let id = self.id;
        let call = tokio::spawn(async move {
            if let Err(status) = c.raft_stream(ReceiverStream::new(rx)).await {
                tracing::debug!(peer = id, error = %status.message(), "raft stream ended");
                report_refusal(&report, id, &status);
                let _ = report.send(Msg::Unreachable(id));
            }
        });
        Stream { batches, call }
    }

    fn send_snapshot(&self, mut c: ClusterClient<Channel>, m: Message) {
        let Ok(bytes) = m.write_to_bytes() else {
            self.failed(true);
            return;
        };
        let mut req = tonic::Request::new(RaftRequest {
            cluster_id: self.cluster_id,
            from: self.me,
            from_address: self.my_address.clone(),
            messages: vec![bytes],
        });
        req.set_timeout(SNAPSHOT_TIMEOUT);
        let report = self.report.clone();
        let id = self.id;
        tokio::spawn(async move {
            match c.raft(req).await {
                Ok(_) => {
                    let _ = report.send(Msg::SnapshotSent(id));
                }
                Err(status) => {
                    tracing::info!(peer = id, error = %status.message(), "sending a snapshot failed");
                    report_refusal(&report, id, &status);
                    let _ = report.send(Msg::Unreachable(id));
                    let _ = report.send(Msg::SnapshotFailed(id));
                }
            }
        });
    }

    fn failed(&self, snapshot: bool) {
        let _ = self.report.send(Msg::Unreachable(self.id));
        if snapshot {
            let _ = self.report.send(Msg::SnapshotFailed(self.id));
        }
    }
}
