//! The Raft backend of the [`StateStore`](crate::store::StateStore): raft-rs
//! (`raft` 0.7, protobuf codec) wrapped with durable storage, a Ready loop on
//! its own thread, and a gRPC transport.
//!
//! ```text
//!  handles (RaftStore, gRPC service)            Ready thread (node.rs)
//!   propose ──Msg::Propose──────────────┐       RawNode<DiskStorage>
//!   read    ──Msg::ReadIndex────────────┼─────► step/propose/read_index/tick
//!   add/remove member ──Msg::ConfChange─┤        │ persist (redb, fsync)
//!   Cluster/Raft RPC ──Msg::Raft────────┘        │ apply -> State (RwLock)
//!                                                │ answer waiters, watch
//!   peers ◄── transport.rs (one task per peer) ◄─┘ messages
//! ```
//!
//! - [`storage`]: log, hard state, snapshots in redb; corruption checks.
//! - `node`: the Ready loop (batching, ReadIndex, apply, compaction).
//! - [`transport`]: per-peer batching gRPC sender.
//! - [`service`]: the `nephele.cluster.v1.Cluster` gRPC service.
//!
//! Proposals made on a follower are forwarded to the leader by raft itself
//! (`MsgPropose`); the follower answers its client when it applies the
//! entry. Linearizable reads use ReadIndex, which raft also forwards.

pub mod service;
pub mod storage;
pub mod transport;

mod node;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock, mpsc};
use std::time::Duration;

use nephele_state::{Envelope, State, codec};
use raft::prelude::ConfChangeType;
use raft::{RawNode, ReadOnlyOption};
use thiserror::Error;
use tokio::sync::{broadcast, oneshot};

use crate::store::{Committed, Leadership, ProposeError, ReadError, StateStore, WatchEvent};
use node::{LoopConfig, Msg, Node, ProposalPermit, Shared};
use storage::{DiskStorage, OpenStorageError};

/// Largest encoded command accepted.
pub const MAX_COMMAND_BYTES: usize = 2 << 20;

/// Default bound on proposals a member holds at once (submitted through it
/// and not yet answered, see [`RaftConfig::max_proposals_in_flight`]).
pub const MAX_PROPOSALS_IN_FLIGHT: usize = 8192;

/// How a member runs.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This member's id (non-zero, unique in the cluster, never reused).
    pub member_id: u64,
    /// The cluster id; required for a new data directory, checked against an
    /// existing one.
    pub cluster_id: Option<u64>,
    /// Where the raft storage lives.
    pub data_dir: PathBuf,
    /// Address peers reach this member's cluster service at (`host:port`).
    pub advertise: String,
    /// Other members' addresses by id. With `init`, these (plus this member)
    /// are the initial voters; otherwise they are only address hints.
    pub peers: BTreeMap<u64, String>,
    /// Bootstrap a new cluster in an empty data directory.
    pub init: bool,
    /// Length of one raft tick.
    pub tick: Duration,
    /// Ticks without a heartbeat before a follower campaigns (randomised by
    /// raft between this and twice this).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between log compactions.
    pub snapshot_interval: u64,
    /// How long a proposal may take to be applied before `Timeout`.
    pub proposal_timeout: Duration,
    /// How long a read may wait for a quorum before `Timeout`.
    pub read_timeout: Duration,
    /// Most proposals held at once; one more is refused at once with
    /// [`ProposeError::Overloaded`] rather than queued without bound (at
    /// this depth a proposal already waits behind many batches).
    pub max_proposals_in_flight: usize,
    /// How this member reaches its peers: mutual TLS (the daemon, see
    /// `crate::tls`) or plaintext when `None` (in-process tests).
    pub peer_tls: transport::PeerTls,
}

impl RaftConfig {
    /// Defaults for everything but identity and location: 50 ms ticks, an
    /// election timeout of 0.5 to 1 s, heartbeats every 50 ms, a snapshot
    /// every 10 000 entries.
    pub fn new(member_id: u64, data_dir: PathBuf, advertise: String) -> RaftConfig {
        RaftConfig {
            member_id,
            cluster_id: None,
            data_dir,
            advertise,
            peers: BTreeMap::new(),
            init: false,
            tick: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 1,
            snapshot_interval: 10_000,
            proposal_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            max_proposals_in_flight: MAX_PROPOSALS_IN_FLIGHT,
            peer_tls: None,
        }
    }
}

/// Why a member could not start.
#[derive(Debug, Error)]
pub enum StartRaftError {
    /// The storage could not be opened or initialised.
    #[error(transparent)]
    Storage(#[from] OpenStorageError),
    /// The stored snapshot does not decode.
    #[error("the stored snapshot does not decode; refusing to start")]
    Snapshot(#[source] nephele_state::codec::DecodeError),
    /// The member id was removed from the cluster and may not come back.
    #[error("member {0} was removed from the cluster; start it with a new id and empty data")]
    Removed(u64),
    /// raft refused the configuration.
    #[error("invalid raft configuration: {0}")]
    Config(String),
    /// The Ready thread could not be started.
    #[error("cannot start the raft thread")]
    Thread(#[source] std::io::Error),
}

/// Why a membership change failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MemberChangeError {
    /// This member does not lead; ask the leader.
    #[error("this member is not the leader (leader: {leader_id:?})")]
    NotLeader {
        /// The leader, if known.
        leader_id: Option<u64>,
    },
    /// raft refused the change (e.g. another change is in progress).
    #[error("membership change refused: {0}")]
    Refused(String),
    /// The change was not committed.
    #[error(transparent)]
    Propose(#[from] ProposeError),
    /// Forwarding the change to the leader failed.
    #[error("forwarding to the leader failed: {0}")]
    Forward(String),
}

/// Progress of this member as last published by the Ready loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusView {
    /// Member id.
    pub id: u64,
    /// Cluster id.
    pub cluster_id: u64,
    /// Current term.
    pub term: u64,
    /// Leader id, 0 if none known.
    pub leader_id: u64,
    /// `leader`, `follower`, `candidate` or `pre-candidate`.
    pub role: &'static str,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied to the state here.
    pub applied_index: u64,
    /// Index of the latest snapshot (log compacted up to it).
    pub snapshot_index: u64,
    /// Voting members.
    pub voters: Vec<u64>,
    /// Matched index per member (known on the leader only).
    pub progress: BTreeMap<u64, u64>,
}

struct Inner {
    id: u64,
    cluster_id: u64,
    tx: mpsc::Sender<Msg>,
    state: Arc<RwLock<State>>,
    status: Arc<RwLock<StatusView>>,
    addresses: Arc<RwLock<BTreeMap<u64, String>>>,
    watch: broadcast::Sender<WatchEvent>,
    failure: Arc<RwLock<Option<String>>>,
    blocked: Arc<RwLock<BTreeSet<u64>>>,
    proposals_in_flight: Arc<AtomicUsize>,
    max_proposals_in_flight: usize,
    peer_tls: transport::PeerTls,
    /// Set when the member begins to shut down: ends the raft streams peers
    /// hold open into it, so its server can stop gracefully.
    closing: tokio::sync::watch::Sender<bool>,
    proposal_timeout: Duration,
    read_timeout: Duration,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A running raft member: a cheap, cloneable handle.
#[derive(Clone)]
pub struct RaftStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RaftStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftStore")
            .field("id", &self.inner.id)
            .field("cluster_id", &self.inner.cluster_id)
            .finish()
    }
}

fn stopped_reason(failure: &RwLock<Option<String>>) -> String {
    failure
        .read()
        .ok()
        .and_then(|f| f.clone())
        .unwrap_or_else(|| "the store was shut down".to_owned())
}

impl RaftStore {
    /// Opens the storage, rebuilds the state from the latest snapshot and
    /// starts the Ready loop. Must be called within a tokio runtime (the
    /// transport runs on it). Serve [`RaftStore::service`] on
    /// `config.advertise` for peers to reach this member.
    pub fn start(config: RaftConfig) -> Result<RaftStore, StartRaftError> {
        let mut storage = DiskStorage::open(&config.data_dir, config.member_id, config.cluster_id)?;
        let cluster_id = storage.cluster_id();
        if config.init {
            let mut state = State::default();
            state.add_controller(config.member_id, config.advertise.clone());
            for (id, addr) in &config.peers {
                state.add_controller(*id, addr.clone());
            }
            let voters = state.controllers.keys().copied().collect();
            storage.bootstrap(voters, &codec::encode_snapshot(&state))?;
            tracing::info!(cluster_id, members = ?state.controllers, "bootstrapped a new cluster");
        }
        let snap = storage.snapshot_ref();
        let applied = snap.get_metadata().index;
        let state = if applied > 0 {
            codec::decode_snapshot(snap.get_data()).map_err(StartRaftError::Snapshot)?
        } else {
            State::default()
        };
        if state.removed_controllers.contains(&config.member_id) {
            return Err(StartRaftError::Removed(config.member_id));
        }
        let mut addresses = config.peers.clone();
        for (id, a) in &state.controllers {
            addresses.insert(*id, a.clone());
        }
        addresses.insert(config.member_id, config.advertise.clone());

        let raft_cfg = raft::Config {
            id: config.member_id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            ..Default::default()
        };
        raft_cfg
            .validate()
            .map_err(|e| StartRaftError::Config(e.to_string()))?;
        let logger = slog::Logger::root(
            tracing_slog::TracingSlogDrain,
            slog::o!("member" => config.member_id),
        );
        let raw = RawNode::new(&raft_cfg, storage, &logger)
            .map_err(|e| StartRaftError::Config(e.to_string()))?;

        let (tx, rx) = mpsc::channel();
        let state = Arc::new(RwLock::new(state));
        let status = Arc::new(RwLock::new(StatusView {
            id: config.member_id,
            cluster_id,
            role: "follower",
            applied_index: applied,
            ..Default::default()
        }));
        let addresses = Arc::new(RwLock::new(addresses));
        let (watch, _) = broadcast::channel(4096);
        let failure = Arc::new(RwLock::new(None));
        let blocked = Arc::new(RwLock::new(BTreeSet::new()));
        let transport = transport::Transport::new(
            config.member_id,
            config.advertise.clone(),
            cluster_id,
            tokio::runtime::Handle::current(),
            addresses.clone(),
            blocked.clone(),
            tx.clone(),
        )
        .with_tls(config.peer_tls.clone());
        let shared = Shared {
            state: state.clone(),
            status: status.clone(),
            addresses: addresses.clone(),
            watch: watch.clone(),
            failure: failure.clone(),
        };
        let node = Node::new(
            raw,
            rx,
            transport,
            shared,
            LoopConfig {
                tick: config.tick,
                snapshot_interval: config.snapshot_interval.max(1),
            },
            applied,
        );
        let thread = std::thread::Builder::new()
            .name(format!("raft-{}", config.member_id))
            .spawn(move || node.run())
            .map_err(StartRaftError::Thread)?;
        Ok(RaftStore {
            inner: Arc::new(Inner {
                id: config.member_id,
                cluster_id,
                tx,
                state,
                status,
                addresses,
                watch,
                failure,
                blocked,
                proposals_in_flight: Arc::new(AtomicUsize::new(0)),
                max_proposals_in_flight: config.max_proposals_in_flight.max(1),
                peer_tls: config.peer_tls.clone(),
                closing: tokio::sync::watch::Sender::new(false),
                proposal_timeout: config.proposal_timeout,
                read_timeout: config.read_timeout,
                thread: std::sync::Mutex::new(Some(thread)),
            }),
        })
    }

    /// This member's id.
    pub fn member_id(&self) -> u64 {
        self.inner.id
    }

    /// The cluster id.
    pub fn cluster_id(&self) -> u64 {
        self.inner.cluster_id
    }

    /// Progress as last published by the Ready loop.
    pub fn status(&self) -> StatusView {
        self.inner
            .status
            .read()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Known member addresses by id.
    pub fn addresses(&self) -> BTreeMap<u64, String> {
        self.inner
            .addresses
            .read()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// Why the store stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.inner.failure.read().ok().and_then(|f| f.clone())
    }

    /// Learns a peer's address (from an incoming request) if none is known.
    pub(crate) fn learn_address(&self, id: u64, address: &str) {
        if id == 0 || address.is_empty() {
            return;
        }
        if let Ok(mut a) = self.inner.addresses.write() {
            a.entry(id).or_insert_with(|| address.to_owned());
        }
    }

    /// Whether `id` was removed from the cluster.
    pub(crate) fn is_removed(&self, id: u64) -> bool {
        self.inner
            .state
            .read()
            .map(|s| s.removed_controllers.contains(&id))
            .unwrap_or(false)
    }

    /// Hands raft messages from peer `from` to the Ready loop, in order.
    pub(crate) fn step(
        &self,
        from: u64,
        ms: Vec<raft::prelude::Message>,
    ) -> Result<(), ProposeError> {
        if ms.is_empty() || self.is_blocked(from) {
            return Ok(());
        }
        self.inner
            .tx
            .send(Msg::Raft(ms))
            .map_err(|_| ProposeError::Stopped(stopped_reason(&self.inner.failure)))
    }

    fn is_blocked(&self, id: u64) -> bool {
        self.inner.blocked.read().is_ok_and(|b| b.contains(&id))
    }

    /// Fault injection (tests, chaos drills): silently drops raft traffic to
    /// and from `ids`, as a network partition would. Client traffic is not
    /// affected. Undo with [`RaftStore::heal`].
    pub fn partition_from(&self, ids: &[u64]) {
        if let Ok(mut b) = self.inner.blocked.write() {
            b.extend(ids.iter().copied());
        }
    }

    /// Ends every [`RaftStore::partition_from`].
    pub fn heal(&self) {
        if let Ok(mut b) = self.inner.blocked.write() {
            b.clear();
        }
    }

    /// Waits until this member applied everything committed before the call
    /// (ReadIndex), retrying across elections until the read timeout.
    pub async fn read_index(&self) -> Result<u64, ReadError> {
        let deadline = tokio::time::Instant::now() + self.inner.read_timeout;
        loop {
            let (reply, rx) = oneshot::channel();
            self.inner
                .tx
                .send(Msg::ReadIndex { reply })
                .map_err(|_| ReadError::Stopped(stopped_reason(&self.inner.failure)))?;
            match tokio::time::timeout_at(deadline, rx).await {
                Err(_) => return Err(ReadError::Timeout),
                Ok(Err(_)) => return Err(ReadError::Stopped(stopped_reason(&self.inner.failure))),
                Ok(Ok(Ok(index))) => return Ok(index),
                Ok(Ok(Err(ReadError::Timeout))) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ReadError::Timeout);
                    }
                }
                Ok(Ok(Err(e))) => return Err(e),
            }
        }
    }

    async fn change_member(
        &self,
        change: ConfChangeType,
        id: u64,
        address: String,
    ) -> Result<u64, MemberChangeError> {
        let deadline = tokio::time::Instant::now() + self.inner.proposal_timeout;
        loop {
            let (reply, rx) = oneshot::channel();
            self.inner
                .tx
                .send(Msg::ConfChange {
                    change,
                    id,
                    address: address.clone(),
                    reply,
                })
                .map_err(|_| ProposeError::Stopped(stopped_reason(&self.inner.failure)))?;
            let res = match tokio::time::timeout_at(deadline, rx).await {
                Err(_) => return Err(ProposeError::Timeout.into()),
                Ok(Err(_)) => {
                    return Err(ProposeError::Stopped(stopped_reason(&self.inner.failure)).into());
                }
                Ok(Ok(r)) => r,
            };
            match res {
                Err(MemberChangeError::NotLeader { leader_id: Some(l) }) => {
                    return self.forward_member_change(l, change, id, address).await;
                }
                Err(MemberChangeError::NotLeader { leader_id: None }) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ProposeError::NoLeader.into());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    async fn forward_member_change(
        &self,
        leader: u64,
        change: ConfChangeType,
        id: u64,
        address: String,
    ) -> Result<u64, MemberChangeError> {
        use nephele_proto::cluster::v1 as pb;
        let addr =
            self.addresses().get(&leader).cloned().ok_or_else(|| {
                MemberChangeError::Forward(format!("no address for leader {leader}"))
            })?;
        let mut client = transport::connect_with(&addr, &self.inner.peer_tls)
            .map_err(|e| MemberChangeError::Forward(e.to_string()))?;
        let res = if change == ConfChangeType::RemoveNode {
            client
                .remove_member(pb::RemoveMemberRequest {
                    cluster_id: self.inner.cluster_id,
                    id,
                })
                .await
        } else {
            client
                .add_member(pb::AddMemberRequest {
                    cluster_id: self.inner.cluster_id,
                    id,
                    address,
                })
                .await
        };
        res.map(|r| r.into_inner().index)
            .map_err(|s| MemberChangeError::Forward(s.message().to_owned()))
    }

    /// Adds a voting member reachable at `address`; resolves once the change
    /// is committed and applied. Start the new member (empty data directory,
    /// same cluster id) before or after: it catches up by snapshot.
    pub async fn add_member(&self, id: u64, address: String) -> Result<u64, MemberChangeError> {
        if id == 0 {
            return Err(MemberChangeError::Refused("member id 0 is reserved".into()));
        }
        if self.is_removed(id) {
            return Err(MemberChangeError::Refused(format!(
                "member id {id} was removed before and cannot be reused"
            )));
        }
        self.change_member(ConfChangeType::AddNode, id, address)
            .await
    }

    /// Removes a member for good; resolves once applied.
    pub async fn remove_member(&self, id: u64) -> Result<u64, MemberChangeError> {
        self.change_member(ConfChangeType::RemoveNode, id, String::new())
            .await
    }

    /// Ends the raft streams peers hold open into this member (they
    /// reconnect to whoever serves this address next). Call it before
    /// stopping the gRPC server gracefully, which waits for open calls.
    pub fn close_streams(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Resolves once [`RaftStore::close_streams`] or
    /// [`RaftStore::shutdown`] was called.
    pub(crate) async fn closing(&self) {
        let mut rx = self.inner.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Stops the Ready loop and waits for it. Pending calls fail with
    /// `Stopped`. The gRPC server is the caller's to stop.
    pub fn shutdown(&self) {
        self.close_streams();
        let _ = self.inner.tx.send(Msg::Shutdown);
        let handle = self.inner.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// The gRPC service peers and clients talk to.
    pub fn service(
        &self,
    ) -> nephele_proto::cluster::v1::cluster_server::ClusterServer<service::ClusterService> {
        service::ClusterService::new(self.clone()).into_server()
    }
}

impl StateStore for RaftStore {
    async fn propose(&self, envelope: Envelope) -> Result<Committed, ProposeError> {
        let data = codec::encode_envelope(&envelope);
        if data.len() > MAX_COMMAND_BYTES {
            return Err(ProposeError::TooLarge {
                size: data.len(),
                max: MAX_COMMAND_BYTES,
            });
        }
        let deadline = tokio::time::Instant::now() + self.inner.proposal_timeout;
        loop {
            let max = self.inner.max_proposals_in_flight;
            let permit = ProposalPermit::acquire(&self.inner.proposals_in_flight, max)
                .ok_or(ProposeError::Overloaded { limit: max })?;
            let (reply, rx) = oneshot::channel();
            self.inner
                .tx
                .send(Msg::Propose {
                    data: data.clone(),
                    reply,
                    permit,
                })
                .map_err(|_| ProposeError::Stopped(stopped_reason(&self.inner.failure)))?;
            match tokio::time::timeout_at(deadline, rx).await {
                Err(_) => return Err(ProposeError::Timeout),
                Ok(Err(_)) => {
                    return Err(ProposeError::Stopped(stopped_reason(&self.inner.failure)));
                }
                Ok(Ok(Err(ProposeError::NoLeader))) => {
                    // Not submitted: safe to retry once a leader is known.
                    if tokio::time::Instant::now() + Duration::from_millis(20) >= deadline {
                        return Err(ProposeError::NoLeader);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Ok(Err(ProposeError::Dropped))) => {
                    // Lost in a leader change and known never to take
                    // effect: safe to submit again, to the new leader.
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ProposeError::Dropped);
                    }
                }
                Ok(Ok(r)) => return r,
            }
        }
    }

    async fn read<R, F>(&self, f: F) -> Result<R, ReadError>
    where
        R: Send + 'static,
        F: FnOnce(&State) -> R + Send + 'static,
    {
        self.read_index().await?;
        let state = self
            .inner
            .state
            .read()
            .map_err(|_| ReadError::Stopped("state lock poisoned".into()))?;
        Ok(f(&state))
    }

    fn watch(&self) -> broadcast::Receiver<WatchEvent> {
        self.inner.watch.subscribe()
    }

    fn leadership(&self) -> Leadership {
        let s = self.status();
        Leadership {
            member_id: self.inner.id,
            term: s.term,
            leader_id: (s.leader_id != 0).then_some(s.leader_id),
        }
    }

    async fn confirm_leadership(&self, term: u64) -> bool {
        let before = self.leadership();
        if !before.is_leader() || before.term != term {
            return false;
        }
        // ReadIndex on the leader (`ReadOnlyOption::Safe`) completes only
        // once a quorum acknowledged it in its term; leading in `term`
        // both before and after means it led throughout.
        if self.read_index().await.is_err() {
            return false;
        }
        let after = self.leadership();
        after.is_leader() && after.term == term
    }

    fn backend(&self) -> crate::store::BackendInfo {
        crate::store::BackendInfo {
            kind: "raft",
            endpoints: Vec::new(),
        }
    }
}
