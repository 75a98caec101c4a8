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
//! Proposals carry `(member id, sequence, term)` in the entry context, so
//! the member that proposed recognises its entry when applying it, even when
//! raft forwarded it to the leader. The term is the proposer's term when it
//! proposed, and a leader appends only the forwarded entries stamped with
//! its own term (a stale forward is dropped, never re-forwarded). So a
//! proposal made in term `T` can only ever be appended by the leader of `T`,
//! with term `T`: once the proposer applies an entry of a later term without
//! having applied its proposal, the proposal is known lost and is answered
//! `Dropped` (safe to retry) at once, instead of timing out. This is what
//! makes a write sent to a follower while the leader dies fail over in an
//! election timeout rather than a proposal timeout.
//!
//! Reads use ReadIndex (`ReadOnlyOption::Safe`):
//! all reads waiting in a turn share one ReadIndex request; each is answered
//! once this member has applied up to the index the leader confirmed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Raft messages from a peer, in the order sent.
    Raft(Vec<Message>),
    /// A client proposal (an encoded envelope). The permit counts it against
    /// the member's bound on proposals in flight until it is answered.
    Propose {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Committed, ProposeError>>,
        permit: ProposalPermit,
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
    /// A peer refused our messages because this member was removed from
    /// the cluster (while it was down, so it never applied its removal).
    RemovedByPeer(u64),
    /// Stop the loop.
    Shutdown,
}

type ReadReply = oneshot::Sender<Result<u64, ReadError>>;
type ProposeReply = oneshot::Sender<Result<Committed, ProposeError>>;

/// One proposal in flight, counted against
/// [`MAX_PROPOSALS_IN_FLIGHT`](super::MAX_PROPOSALS_IN_FLIGHT) from when a
/// handle submits it until it is answered (the count drops with the permit).
pub(crate) struct ProposalPermit(Arc<AtomicUsize>);

impl ProposalPermit {
    /// Takes a slot, or `None` when `max` proposals are in flight already.
    pub(crate) fn acquire(count: &Arc<AtomicUsize>, max: usize) -> Option<ProposalPermit> {
        let mut n = count.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match count.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(ProposalPermit(count.clone())),
                Err(now) => n = now,
            }
        }
    }
}

impl Drop for ProposalPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Waiter {
    /// A client's proposal; the permit is held until it is answered.
    Propose(ProposeReply, #[allow(dead_code)] ProposalPermit),
    Conf(oneshot::Sender<Result<u64, MemberChangeError>>),
}

impl Waiter {
    fn is_closed(&self) -> bool {
        match self {
            Waiter::Propose(s, _) => s.is_closed(),
            Waiter::Conf(s) => s.is_closed(),
        }
    }

    fn fail(self, e: ProposeError) {
        match self {
            Waiter::Propose(s, _) => {
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
    /// Proposals collected this turn, proposed together as one batch.
    new_proposals: Vec<(Vec<u8>, ProposeReply, ProposalPermit)>,
    /// Sequence numbers of proposals and conf changes by the term they were
    /// proposed in (see the module doc).
    proposed_in: BTreeMap<u64, Vec<u64>>,
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
    /// Set when a peer said this member was removed: the loop stops with a
    /// failure.
    removed_by: Option<u64>,
}

fn context(member: u64, seq: u64, term: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(24);
    c.extend_from_slice(&member.to_le_bytes());
    c.extend_from_slice(&seq.to_le_bytes());
    c.extend_from_slice(&term.to_le_bytes());
    c
}

/// `(member, sequence, term proposed in)`; entries written before the term
/// was carried have 16 bytes and no term.
fn parse_context(c: &[u8]) -> Option<(u64, u64, Option<u64>)> {
    if c.len() != 16 && c.len() != 24 {
        return None;
    }
    let member = u64::from_le_bytes(c[..8].try_into().ok()?);
    let seq = u64::from_le_bytes(c[8..16].try_into().ok()?);
    let term = match c.get(16..24) {
        Some(t) => Some(u64::from_le_bytes(t.try_into().ok()?)),
        None => None,
    };
    Some((member, seq, term))
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
            new_proposals: Vec::new(),
            proposed_in: BTreeMap::new(),
            new_reads: Vec::new(),
            reads_in_flight: HashMap::new(),
            reads_waiting_apply: Vec::new(),
            applied,
            conf_state,
            conf_changed: false,
            last_role: StateRole::Follower,
            removed_by: None,
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
            if let Some(peer) = self.removed_by {
                let msg = format!(
                    "member {peer} says this member ({}) was removed from the cluster; \
                     start a new member with a new id and an empty data directory",
                    self.id
                );
                tracing::error!(error = %msg, "raft member stopping");
                if let Ok(mut f) = self.shared.failure.write() {
                    *f = Some(msg.clone());
                }
                self.fail_all(&msg);
                return;
            }
            if stop {
                break;
            }
            self.flush_proposals();
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
        for (_, r, _) in self.new_proposals.drain(..) {
            let _ = r.send(Err(ProposeError::Stopped(why.to_owned())));
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
            Msg::Raft(ms) => {
                for mut m in ms {
                    if m.get_msg_type() == MessageType::MsgPropose && !self.accept_forward(&mut m) {
                        continue;
                    }
                    if let Err(e) = self.raw.step(m) {
                        tracing::debug!(error = %e, "raft refused a message");
                    }
                }
            }
            Msg::Propose {
                data,
                reply,
                permit,
            } => self.new_proposals.push((data, reply, permit)),
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
                let term = self.raw.raft.term;
                match self
                    .raw
                    .propose_conf_change(context(self.id, seq, term), cc)
                {
                    Ok(()) => {
                        self.proposed_in.entry(term).or_default().push(seq);
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
            Msg::RemovedByPeer(peer) => {
                self.removed_by = Some(peer);
                return true;
            }
            Msg::Shutdown => return true,
        }
        false
    }

    /// Keeps, of a proposal forwarded by a peer, the entries proposed in this
    /// leader's term; false to drop the message (not leading, or nothing
    /// left). A follower never forwards a peer's proposal again.
    fn accept_forward(&self, m: &mut Message) -> bool {
        if self.raw.raft.state != StateRole::Leader {
            return false;
        }
        let term = self.raw.raft.term;
        let entries = m.mut_entries();
        let before = entries.len();
        entries.retain(|e| {
            parse_context(&e.context)
                .and_then(|(_, _, t)| t)
                .is_none_or(|t| t == term)
        });
        if entries.len() < before {
            tracing::debug!(
                dropped = before - entries.len(),
                "dropped forwarded proposals of an earlier term"
            );
        }
        !entries.is_empty()
    }

    /// Answers `Dropped` to every proposal made in a term before `term`
    /// that is still waiting: an entry of `term` is being applied, so they
    /// are not in the log and never will be.
    fn drop_proposals_before(
        proposed_in: &mut BTreeMap<u64, Vec<u64>>,
        waiters: &mut HashMap<u64, Waiter>,
        term: u64,
    ) {
        if proposed_in
            .first_key_value()
            .is_none_or(|(t, _)| *t >= term)
        {
            return;
        }
        let newer = proposed_in.split_off(&term);
        let older = std::mem::replace(proposed_in, newer);
        for seq in older.into_values().flatten() {
            if let Some(w) = waiters.remove(&seq) {
                match w {
                    Waiter::Conf(r) => {
                        let _ = r.send(Err(MemberChangeError::Refused(
                            "the membership change was lost in a leader change; retry".into(),
                        )));
                    }
                    other => other.fail(ProposeError::Dropped),
                }
            }
        }
    }

    /// Proposes every proposal collected this turn as one `MsgPropose`, so
    /// the leader appends them together and replicates them in one message
    /// per follower (a follower forwards the batch to the leader as one
    /// message).
    fn flush_proposals(&mut self) {
        if self.new_proposals.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.new_proposals);
        let term = self.raw.raft.term;
        let mut entries = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        for (data, reply, permit) in batch {
            if reply.is_closed() {
                continue;
            }
            self.seq += 1;
            entries.push(Entry {
                data: data.into(),
                context: context(self.id, self.seq, term).into(),
                ..Default::default()
            });
            waiting.push((self.seq, reply, permit));
        }
        if entries.is_empty() {
            return;
        }
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgPropose);
        m.from = self.id;
        m.set_entries(entries.into());
        match self.raw.raft.step(m) {
            Ok(()) => {
                let seqs = self.proposed_in.entry(term).or_default();
                for (seq, reply, permit) in waiting {
                    seqs.push(seq);
                    self.waiters.insert(seq, Waiter::Propose(reply, permit));
                }
            }
            Err(_) => {
                for (_, reply, _) in waiting {
                    let _ = reply.send(Err(ProposeError::NoLeader));
                }
            }
        }
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
        self.proposed_in.retain(|_, seqs| {
            seqs.retain(|s| live.contains_key(s));
            !seqs.is_empty()
        });
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
        // What waited for the write (a follower's append acknowledgement,
        // votes) leaves before applying: the leader's commit waits for it,
        // applying does not.
        if !ready.persisted_messages().is_empty() {
            let msgs = ready.take_persisted_messages();
            self.send(msgs);
        }
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
        // Proposals made in a term up to the snapshot's may be inside it or
        // lost: we cannot tell which. Later ones cannot be inside it.
        let newer = self
            .proposed_in
            .split_off(&(s.get_metadata().term.saturating_add(1)));
        let unknown = std::mem::replace(&mut self.proposed_in, newer);
        for seq in unknown.into_values().flatten() {
            if let Some(w) = self.waiters.remove(&seq) {
                w.fail(ProposeError::Timeout);
            }
        }
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
            let mine = parse_context(&e.context)
                .filter(|(m, _, _)| *m == self.id)
                .map(|(m, s, _)| (m, s));
            Self::drop_proposals_before(&mut self.proposed_in, &mut self.waiters, e.term);
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
                                outcome: Arc::new(outcome.clone()),
                            });
                        }
                        if let Some((_, seq)) = mine
                            && let Some(Waiter::Propose(r, _)) = self.waiters.remove(&seq)
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
