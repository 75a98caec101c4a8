//! The Ready loop: one dedicated thread owns the `RawNode`, its storage and
//! the state machine. Everything else talks to it through [`Msg`]s.
//!
//! Each turn it takes every message waiting (so many proposals and reads
//! share one `Ready`, one fsync and one round of replication), ticks the
//! raft clock, then handles `Ready`: sends messages, persists snapshot,
//! entries and hard state in one durable transaction, applies committed
//! entries to the [`State`], answers the proposals and reads that waited for
//! them, and compacts the log into a snapshot every `snapshot_interval`
//! applied entries.
//!
//! Proposals carry `(member id, sequence)` in the entry context, so the
//! member that proposed recognises its entry when applying it, even when raft
//! forwarded it to the leader. Reads use ReadIndex (`ReadOnlyOption::Safe`):
//! all reads waiting in a turn share one ReadIndex request; each is answered
//! once this member has applied up to the index the leader confirmed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, mpsc};
use std::time::{Duration, Instant};

use nephele_state::{State, codec};
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{broadcast, oneshot};

use super::storage::DiskStorage;
use super::transport::Transport;
use super::{MemberChangeError, StatusView};
use crate::store::{Committed, ProposeError, ReadError, WatchEvent};

/// Requests to the Ready loop.
pub(crate) enum Msg {
    /// A raft message from a peer.
    Raft(Box<Message>),
    /// A client proposal (an encoded envelope).
    Propose {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Committed, ProposeError>>,
    },
    /// A linearizable read barrier: answered with the index to wait for once
    /// it is applied here.
    ReadIndex {
        reply: oneshot::Sender<Result<u64, ReadError>>,
    },
    /// Add or remove a voter (leader only).
    ConfChange {
        change: ConfChangeType,
        id: u64,
        address: String,
        reply: oneshot::Sender<Result<u64, MemberChangeError>>,
    },
    /// A peer could not be reached.
    Unreachable(u64),
    /// Sending a snapshot to a peer failed.
    SnapshotFailed(u64),
    /// A snapshot reached a peer (it may still refuse it; raft then probes
    /// again and gets the newest snapshot).
    SnapshotSent(u64),
    /// Stop the loop.
    Shutdown,
}

type ReadReply = oneshot::Sender<Result<u64, ReadError>>;

enum Waiter {
    Propose(oneshot::Sender<Result<Committed, ProposeError>>),
    Conf(oneshot::Sender<Result<u64, MemberChangeError>>),
}

impl Waiter {
    fn is_closed(&self) -> bool {
        match self {
            Waiter::Propose(s) => s.is_closed(),
            Waiter::Conf(s) => s.is_closed(),
        }
    }

    fn fail(self, e: ProposeError) {
        match self {
            Waiter::Propose(s) => {
                let _ = s.send(Err(e));
            }
            Waiter::Conf(s) => {
                let _ = s.send(Err(MemberChangeError::Propose(e)));
            }
        }
    }
}

/// Tunables of the loop.
#[derive(Debug, Clone)]
pub(crate) struct LoopConfig {
    pub tick: Duration,
    pub snapshot_interval: u64,
}

/// Everything the loop shares with the handles.
pub(crate) struct Shared {
    pub state: Arc<RwLock<State>>,
    pub status: Arc<RwLock<StatusView>>,
    pub addresses: Arc<RwLock<BTreeMap<u64, String>>>,
    pub watch: broadcast::Sender<WatchEvent>,
    pub failure: Arc<RwLock<Option<String>>>,
}

pub(crate) struct Node {
    raw: RawNode<DiskStorage>,
    rx: mpsc::Receiver<Msg>,
    transport: Transport,
    shared: Shared,
    cfg: LoopConfig,
    id: u64,
    seq: u64,
    /// Proposals and conf changes of this member by sequence number.
    waiters: HashMap<u64, Waiter>,
    /// For proposals made while leading: the index they were appended at,
    /// so a different entry applied there proves they were dropped.
    expected_at: BTreeMap<u64, u64>,
    /// Reads collected this turn.
    new_reads: Vec<(Instant, ReadReply)>,
    /// ReadIndex requests in flight by context.
    /// Each batch with when it was issued; each read with when it arrived.
    reads_in_flight: HashMap<u64, (Instant, Vec<(Instant, ReadReply)>)>,
    /// Reads confirmed at an index not applied yet.
    reads_waiting_apply: Vec<(u64, Vec<ReadReply>)>,
    applied: u64,
    conf_state: ConfState,
    /// A membership change was applied since the last snapshot: snapshot
    /// now, because raft only installs a snapshot on a member whose
    /// configuration includes it, so a member just added needs a snapshot
    /// taken after its addition.
    conf_changed: bool,
    last_role: StateRole,
}

fn context(member: u64, seq: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(16);
    c.extend_from_slice(&member.to_le_bytes());
    c.extend_from_slice(&seq.to_le_bytes());
    c
}

fn parse_context(c: &[u8]) -> Option<(u64, u64)> {
    if c.len() != 16 {
        return None;
    }
    let member = u64::from_le_bytes(c[..8].try_into().ok()?);
    let seq = u64::from_le_bytes(c[8..].try_into().ok()?);
    Some((member, seq))
}

/// How long a read may wait, in all, for the leader's confirmation.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one ReadIndex request may go unconfirmed before it is issued
/// again.
const READ_RETRY: Duration = Duration::from_millis(500);

impl Node {
    pub(crate) fn new(
        raw: RawNode<DiskStorage>,
        rx: mpsc::Receiver<Msg>,
        transport: Transport,
        shared: Shared,
        cfg: LoopConfig,
        applied: u64,
    ) -> Node {
        let id = raw.raft.id;
        let conf_state = raw
            .store()
            .snapshot_ref()
            .get_metadata()
            .get_conf_state()
            .clone();
        Node {
            raw,
            rx,
            transport,
            shared,
            cfg,
            id,
            seq: 0,
            waiters: HashMap::new(),
            expected_at: BTreeMap::new(),
            new_reads: Vec::new(),
            reads_in_flight: HashMap::new(),
            reads_waiting_apply: Vec::new(),
            applied,
            conf_state,
            conf_changed: false,
            last_role: StateRole::Follower,
        }
    }

    /// Runs until shut down or a fatal storage error.
    pub(crate) fn run(mut self) {
        let mut next_tick = Instant::now() + self.cfg.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let first = match self.rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut stop = false;
            if let Some(m) = first {
                stop |= self.handle(m);
                for _ in 0..8192 {
                    match self.rx.try_recv() {
                        Ok(m) => stop |= self.handle(m),
                        Err(_) => break,
                    }
                }
            }
            if stop {
                break;
            }
            self.issue_reads();
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick += self.cfg.tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.cfg.tick;
                }
                self.housekeeping();
            }
            if let Err(e) = self.on_ready() {
                let msg = format!("{e:#}");
                tracing::error!(error = %msg, "raft member stopping: storage failed");
                if let Ok(mut f) = self.shared.failure.write() {
                    *f = Some(msg.clone());
                }
                self.fail_all(&msg);
                return;
            }
            self.publish_status();
        }
        self.fail_all("the store was shut down");
    }

    fn fail_all(&mut self, why: &str) {
        for (_, w) in self.waiters.drain() {
            w.fail(ProposeError::Stopped(why.to_owned()));
        }
        for (_, r) in self.new_reads.drain(..) {
            let _ = r.send(Err(ReadError::Stopped(why.to_owned())));
        }
        for (_, (_, rs)) in self.reads_in_flight.drain() {
            for (_, r) in rs {
                let _ = r.send(Err(ReadError::Stopped(why.to_owned())));
            }
        }
        for (_, rs) in self.reads_waiting_apply.drain(..) {
            for r in rs {
                let _ = r.send(Err(ReadError::Stopped(why.to_owned())));
            }
        }
    }

    /// Returns true to stop.
    fn handle(&mut self, m: Msg) -> bool {
        match m {
            Msg::Raft(m) => {
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!(error = %e, "raft refused a message");
                }
            }
            Msg::Propose { data, reply } => {
                self.seq += 1;
                let seq = self.seq;
                match self.raw.propose(context(self.id, seq), data) {
                    Ok(()) => {
                        if self.raw.raft.state == StateRole::Leader {
                            let idx = self.raw.raft.raft_log.last_index();
                            self.expected_at.insert(idx, seq);
                        }
                        self.waiters.insert(seq, Waiter::Propose(reply));
                    }
                    Err(_) => {
                        let _ = reply.send(Err(ProposeError::NoLeader));
                    }
                }
            }
            Msg::ReadIndex { reply } => self.new_reads.push((Instant::now(), reply)),
            Msg::ConfChange {
                change,
                id,
                address,
                reply,
            } => {
                if self.raw.raft.state != StateRole::Leader {
                    let leader = self.raw.raft.leader_id;
                    let _ = reply.send(Err(MemberChangeError::NotLeader {
                        leader_id: (leader != 0).then_some(leader),
                    }));
                    return false;
                }
                let mut cc = ConfChange::default();
                cc.set_change_type(change);
                cc.node_id = id;
                cc.context = address.into_bytes().into();
                self.seq += 1;
                let seq = self.seq;
                match self.raw.propose_conf_change(context(self.id, seq), cc) {
                    Ok(()) => {
                        let idx = self.raw.raft.raft_log.last_index();
                        self.expected_at.insert(idx, seq);
                        self.waiters.insert(seq, Waiter::Conf(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(MemberChangeError::Refused(e.to_string())));
                    }
                }
            }
            Msg::Unreachable(id) => self.raw.report_unreachable(id),
            Msg::SnapshotFailed(id) => self.raw.report_snapshot(id, SnapshotStatus::Failure),
            Msg::SnapshotSent(id) => self.raw.report_snapshot(id, SnapshotStatus::Finish),
            Msg::Shutdown => return true,
        }
        false
    }

    fn issue_reads(&mut self) {
        if self.new_reads.is_empty() {
            return;
        }
        self.seq += 1;
        let seq = self.seq;
        self.raw.read_index(seq.to_le_bytes().to_vec());
        let reads = std::mem::take(&mut self.new_reads);
        self.reads_in_flight.insert(seq, (Instant::now(), reads));
    }

    fn housekeeping(&mut self) {
        self.waiters.retain(|_, w| !w.is_closed());
        let now = Instant::now();
        // raft-rs drops a ReadIndex silently when no leader is known (an
        // election, a member catching up): a batch unconfirmed after
        // READ_RETRY is issued again, and a read fails only after
        // READ_TIMEOUT in all.
        let mut retry = Vec::new();
        self.reads_in_flight.retain(|_, (issued, rs)| {
            if now.duration_since(*issued) <= READ_RETRY {
                return true;
            }
            for (arrived, r) in rs.drain(..) {
                if now.duration_since(arrived) > READ_TIMEOUT {
                    let _ = r.send(Err(ReadError::Timeout));
                } else {
                    retry.push((arrived, r));
                }
            }
            false
        });
        self.new_reads.extend(retry);
        let live = &self.waiters;
        self.expected_at.retain(|_, seq| live.contains_key(seq));
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            self.transport.send(m);
        }
    }

    fn on_ready(&mut self) -> anyhow::Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            let msgs = ready.take_messages();
            self.send(msgs);
        }
        let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
        self.raw
            .mut_store()
            .persist(snapshot.as_ref(), ready.entries(), ready.hs())?;
        if let Some(s) = snapshot {
            self.install_snapshot(&s)?;
        }
        for rs in ready.take_read_states() {
            let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            if let Some((_, readers)) = self.reads_in_flight.remove(&u64::from_le_bytes(ctx)) {
                let readers = readers.into_iter().map(|(_, r)| r).collect();
                self.reads_waiting_apply.push((rs.index, readers));
            }
        }
        let committed = ready.take_committed_entries();
        self.apply_entries(committed)?;
        if !ready.persisted_messages().is_empty() {
            let msgs = ready.take_persisted_messages();
            self.send(msgs);
        }
        let mut light = self.raw.advance(ready);
        if let Some(c) = light.commit_index() {
            self.raw.mut_store().set_commit(c);
        }
        let msgs = light.take_messages();
        self.send(msgs);
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.advance_apply();
        self.release_reads();
        self.maybe_compact()?;
        Ok(())
    }

    fn install_snapshot(&mut self, s: &Snapshot) -> anyhow::Result<()> {
        let state = codec::decode_snapshot(s.get_data())
            .map_err(|e| anyhow::anyhow!("the leader sent a snapshot that does not decode: {e}"))?;
        let index = s.get_metadata().index;
        tracing::info!(index, "installed a snapshot from the leader");
        self.sync_addresses(&state);
        if let Ok(mut st) = self.shared.state.write() {
            *st = state;
        }
        self.applied = index;
        self.conf_state = s.get_metadata().get_conf_state().clone();
        // Proposals this member made at or below the snapshot index were
        // either applied inside it or dropped: we cannot tell which.
        let dropped: Vec<u64> = self.expected_at.range(..=index).map(|(_, s)| *s).collect();
        for seq in dropped {
            if let Some(w) = self.waiters.remove(&seq) {
                w.fail(ProposeError::Timeout);
            }
        }
        self.expected_at = self.expected_at.split_off(&(index + 1));
        Ok(())
    }

    fn sync_addresses(&self, state: &State) {
        if let Ok(mut a) = self.shared.addresses.write() {
            for (id, addr) in &state.controllers {
                a.insert(*id, addr.clone());
            }
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let watching = self.shared.watch.receiver_count() > 0;
        let mut state = self
            .shared
            .state
            .write()
            .map_err(|_| anyhow::anyhow!("state lock poisoned"))?;
        for e in entries {
            let index = e.index;
            if index <= self.applied {
                continue;
            }
            let mine = parse_context(&e.context).filter(|(m, _)| *m == self.id);
            // A different entry landed where one of our proposals was.
            if let Some(seq) = self.expected_at.remove(&index)
                && mine.map(|(_, s)| s) != Some(seq)
                && let Some(w) = self.waiters.remove(&seq)
            {
                w.fail(ProposeError::Dropped);
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        // A new leader's empty entry, or a conf change raft
                        // replaced because another one was pending.
                        if let Some((_, seq)) = mine
                            && let Some(w) = self.waiters.remove(&seq)
                        {
                            match w {
                                Waiter::Conf(r) => {
                                    let _ = r.send(Err(MemberChangeError::Refused(
                                        "another membership change is in progress".into(),
                                    )));
                                }
                                other => other.fail(ProposeError::Dropped),
                            }
                        }
                    } else {
                        let env = codec::decode_envelope(&e.data);
                        let outcome = match &env {
                            Ok(env) => nephele_state::apply(&mut state, env, e.term),
                            Err(err) => {
                                state.applied += 1;
                                Err(nephele_state::ApplyError::InvalidArgument(format!(
                                    "the command does not decode: {err}"
                                )))
                            }
                        };
                        if watching && let Ok(env) = env {
                            let _ = self.shared.watch.send(WatchEvent {
                                index,
                                envelope: Arc::new(env),
                                outcome: outcome.clone(),
                            });
                        }
                        if let Some((_, seq)) = mine
                            && let Some(Waiter::Propose(r)) = self.waiters.remove(&seq)
                        {
                            let _ = r.send(Ok(Committed { index, outcome }));
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).map_err(|err| {
                        anyhow::anyhow!("committed conf change {index} does not decode: {err}")
                    })?;
                    let result = self.raw.apply_conf_change(&cc);
                    let address = String::from_utf8_lossy(&cc.context).into_owned();
                    let reply = match result {
                        Ok(cs) => {
                            // Publish before answering, so whoever asked sees
                            // the new membership in the status.
                            if let Ok(mut s) = self.shared.status.write() {
                                s.voters = cs.voters.clone();
                            }
                            self.conf_state = cs;
                            self.conf_changed = true;
                            match cc.get_change_type() {
                                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                                    state.add_controller(cc.node_id, address.clone());
                                    if let Ok(mut a) = self.shared.addresses.write() {
                                        a.insert(cc.node_id, address);
                                    }
                                }
                                ConfChangeType::RemoveNode => {
                                    state.remove_controller(cc.node_id);
                                    if cc.node_id == self.id {
                                        tracing::warn!("this member was removed from the cluster");
                                    }
                                }
                            }
                            tracing::info!(
                                index,
                                change = ?cc.get_change_type(),
                                member = cc.node_id,
                                voters = ?self.conf_state.voters,
                                "membership changed"
                            );
                            Ok(index)
                        }
                        Err(err) => Err(MemberChangeError::Refused(err.to_string())),
                    };
                    if let Some((_, seq)) = mine
                        && let Some(w) = self.waiters.remove(&seq)
                    {
                        match w {
                            Waiter::Conf(r) => {
                                let _ = r.send(reply);
                            }
                            other => other.fail(ProposeError::Dropped),
                        }
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(anyhow::anyhow!(
                        "committed entry {index} is a joint-consensus change, which this version does not support"
                    ));
                }
            }
            self.applied = index;
        }
        Ok(())
    }

    fn release_reads(&mut self) {
        let applied = self.applied;
        self.reads_waiting_apply.retain_mut(|(index, readers)| {
            if *index <= applied {
                for r in readers.drain(..) {
                    let _ = r.send(Ok(*index));
                }
                false
            } else {
                true
            }
        });
    }

    fn maybe_compact(&mut self) -> anyhow::Result<()> {
        let first = self.raw.store().snapshot_index();
        if self.applied < first + self.cfg.snapshot_interval && !self.conf_changed {
            return Ok(());
        }
        self.conf_changed = false;
        let data = {
            let st = self
                .shared
                .state
                .read()
                .map_err(|_| anyhow::anyhow!("state lock poisoned"))?;
            codec::encode_snapshot(&st)
        };
        let applied = self.applied;
        let cs = self.conf_state.clone();
        self.raw.mut_store().compact(applied, cs, data)?;
        tracing::info!(index = applied, "compacted the raft log into a snapshot");
        Ok(())
    }

    fn publish_status(&mut self) {
        let r = &self.raw.raft;
        let role = r.state;
        if role != self.last_role {
            tracing::info!(term = r.term, role = ?role, leader = r.leader_id, "raft role changed");
            self.last_role = role;
        }
        let progress = if role == StateRole::Leader {
            r.prs().iter().map(|(id, pr)| (*id, pr.matched)).collect()
        } else {
            BTreeMap::new()
        };
        if let Ok(mut s) = self.shared.status.write() {
            s.term = r.term;
            s.leader_id = r.leader_id;
            s.role = match role {
                StateRole::Leader => "leader",
                StateRole::Follower => "follower",
                StateRole::Candidate => "candidate",
                StateRole::PreCandidate => "pre-candidate",
            };
            s.commit_index = r.raft_log.committed;
            s.applied_index = self.applied;
            s.snapshot_index = self.raw.store().snapshot_index();
            s.voters = self.conf_state.voters.clone();
            s.progress = progress;
        }
    }
}

/// Whether a message carries a snapshot (for failure reporting).
pub(crate) fn is_snapshot(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot
}
