//! The etcd backend of the [`StateStore`] (cargo feature `etcd`), for sites
//! that already run etcd. Every controller keeps the same pure state machine
//! in memory and feeds it the same command log, kept in etcd:
//!
//! - `{prefix}/log/{member}/{seq}`: one key per command (the encoded
//!   envelope). Its etcd revision is its log index: all controllers apply
//!   log keys in revision order, from a watch on `{prefix}/log/`.
//! - `{prefix}/leader`: the leader's member id, attached to its lease. The
//!   key's create revision is the leadership term: it grows with every new
//!   leader. A fenced command is written by a transaction that requires the
//!   leader key's create revision to equal the fence term, so a deposed
//!   leader's write never lands.
//!
//! - `{prefix}/snapshot/{revision:020}`: the encoded state after applying
//!   every log key up to that revision. Every `snapshot_interval` applied
//!   commands the leader writes one, deletes older snapshots and the log
//!   keys it covers, and compacts etcd's history up to it.
//!
//! A proposal resolves once the local applier has applied its revision.
//! A linearizable read asks etcd (a linearizable range read) for the newest
//! log or snapshot revision and waits until it is applied locally.
//!
//! Loading (at start, and when a controller that fell behind finds its log
//! watch cancelled by a compaction) reads the newest snapshot and the log
//! keys after it in one etcd transaction, so both come from the same
//! revision: a compaction running meanwhile cannot slip between them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use nephele_state::{ApplyError, Envelope, Response, State, codec};
use thiserror::Error;
use tokio::sync::{broadcast, watch};

use super::{Committed, Leadership, ProposeError, ReadError, StateStore, WatchEvent};

/// How an etcd-backed controller connects.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// etcd client URLs (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// Key prefix under which this cluster's state lives.
    pub prefix: String,
    /// This controller's member id.
    pub member_id: u64,
    /// TTL of the leadership lease in seconds (failover takes up to this).
    pub lease_ttl_s: i64,
    /// How long a proposal may take.
    pub proposal_timeout: Duration,
    /// Applied commands between snapshots (and log compactions).
    pub snapshot_interval: u64,
}

impl EtcdConfig {
    /// Defaults: prefix `/nephele`, a 2 s lease, 5 s proposal timeout.
    pub fn new(endpoints: Vec<String>, member_id: u64) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: "/nephele".into(),
            member_id,
            lease_ttl_s: 2,
            proposal_timeout: Duration::from_secs(5),
            snapshot_interval: 10_000,
        }
    }
}

/// Why the etcd store could not start.
#[derive(Debug, Error)]
pub enum StartEtcdError {
    /// etcd could not be reached.
    #[error("cannot reach etcd")]
    Connect(#[source] etcd_client::Error),
    /// The log could not be loaded.
    #[error("cannot load the command log from etcd")]
    Load(#[source] etcd_client::Error),
}

type Outcome = Result<Response, ApplyError>;

struct Inner {
    cfg: EtcdConfig,
    client: Client,
    state: RwLock<State>,
    /// Highest log revision applied.
    applied: watch::Sender<u64>,
    /// Outcomes of recently applied revisions, for proposers to pick up.
    recent: Mutex<BTreeMap<u64, Outcome>>,
    leadership: RwLock<Leadership>,
    events: broadcast::Sender<WatchEvent>,
    seq: AtomicU64,
    /// Commands applied since the last snapshot this controller wrote or
    /// loaded.
    since_snapshot: AtomicU64,
    /// A compaction is running (one at a time).
    compacting: AtomicBool,
    /// Start time of this process in nanoseconds, making log keys unique.
    incarnation: u128,
    failure: RwLock<Option<String>>,
}

/// A controller's view of the state kept in etcd: a cheap, cloneable handle.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("member_id", &self.inner.cfg.member_id)
            .field("prefix", &self.inner.cfg.prefix)
            .finish()
    }
}

/// Outcomes kept for proposers that have not collected theirs yet.
const RECENT_OUTCOMES: usize = 1 << 16;

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

/// The revision a snapshot key names (0 if it names none).
fn snapshot_revision(key: &[u8], prefix: &str) -> u64 {
    key.strip_prefix(prefix.as_bytes())
        .and_then(|r| std::str::from_utf8(r).ok())
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

impl EtcdStore {
    /// Connects, replays the log, and starts the applier and the leader
    /// election tasks. Must be called within a tokio runtime.
    pub async fn start(cfg: EtcdConfig) -> Result<EtcdStore, StartEtcdError> {
        let client = Client::connect(&cfg.endpoints, None)
            .await
            .map_err(StartEtcdError::Connect)?;
        let (applied, _) = watch::channel(0);
        let (events, _) = broadcast::channel(4096);
        let store = EtcdStore {
            inner: Arc::new(Inner {
                client,
                state: RwLock::new(State::default()),
                applied,
                recent: Mutex::new(BTreeMap::new()),
                leadership: RwLock::new(Leadership {
                    member_id: cfg.member_id,
                    term: 0,
                    leader_id: None,
                }),
                events,
                seq: AtomicU64::new(0),
                since_snapshot: AtomicU64::new(0),
                compacting: AtomicBool::new(false),
                incarnation: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
                failure: RwLock::new(None),
                cfg,
            }),
        };
        let next = store.replay().await.map_err(StartEtcdError::Load)?;
        let s = store.clone();
        tokio::spawn(async move {
            if let Err(e) = s.follow_log(next).await {
                tracing::error!(error = %e, "etcd log watch ended; this controller stops applying");
                if let Ok(mut f) = s.inner.failure.write() {
                    *f = Some(e.to_string());
                }
            }
        });
        let s = store.clone();
        tokio::spawn(async move { s.campaign_forever().await });
        Ok(store)
    }

    fn log_prefix(&self) -> String {
        format!("{}/log/", self.inner.cfg.prefix)
    }

    fn snapshot_prefix(&self) -> String {
        format!("{}/snapshot/", self.inner.cfg.prefix)
    }

    fn leader_key(&self) -> String {
        format!("{}/leader", self.inner.cfg.prefix)
    }

    /// Why the store stopped applying the log, if it did (the daemon exits
    /// on it).
    pub fn failure(&self) -> Option<String> {
        self.stopped()
    }

    fn stopped(&self) -> Option<String> {
        self.inner.failure.read().ok().and_then(|f| f.clone())
    }

    /// Loads the newest snapshot (if newer than what is applied here) and
    /// applies every log key after it, both read at one revision; returns
    /// the revision to watch from.
    async fn replay(&self) -> Result<i64, etcd_client::Error> {
        let mut client = self.inner.client.clone();
        let txn = Txn::new().and_then([
            TxnOp::get(
                self.snapshot_prefix(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(1),
                ),
            ),
            TxnOp::get(
                self.log_prefix(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Mod, SortOrder::Ascend),
                ),
            ),
        ]);
        let resp = client.txn(txn).await?;
        let header_rev = resp.header().map_or(0, |h| h.revision());
        let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let (Some(snap), Some(log)) = (gets.next(), gets.next()) else {
            return Err(etcd_client::Error::InvalidArgs(
                "etcd answered the load transaction without its two reads".into(),
            ));
        };
        if let Some(kv) = snap.kvs().first() {
            let at = snapshot_revision(kv.key(), &self.snapshot_prefix());
            if at > *self.inner.applied.borrow() {
                let state = codec::decode_snapshot(kv.value()).map_err(|e| {
                    etcd_client::Error::InvalidArgs(format!(
                        "the snapshot at revision {at} does not decode: {e}"
                    ))
                })?;
                if let Ok(mut st) = self.inner.state.write() {
                    *st = state;
                }
                self.inner.since_snapshot.store(0, Ordering::Relaxed);
                self.inner.applied.send_replace(at);
                tracing::info!(revision = at, "loaded the state snapshot from etcd");
            }
        }
        for kv in log.kvs() {
            self.apply_one(rev(kv.mod_revision()), kv.value());
        }
        Ok(header_rev + 1)
    }

    /// Counts an applied command; every `snapshot_interval` of them the
    /// leader snapshots the state at `index` (just applied) and, in the
    /// background, drops what the snapshot covers.
    fn maybe_compact(&self, index: u64) {
        let n = self.inner.since_snapshot.fetch_add(1, Ordering::Relaxed) + 1;
        if n < self.inner.cfg.snapshot_interval.max(1)
            || !self.leadership().is_leader()
            || self.inner.compacting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.inner.since_snapshot.store(0, Ordering::Relaxed);
        let Ok(data) = self.inner.state.read().map(|s| codec::encode_snapshot(&s)) else {
            self.inner.compacting.store(false, Ordering::Release);
            return;
        };
        let s = self.clone();
        tokio::spawn(async move {
            if let Err(e) = s.compact(index, data).await {
                tracing::warn!(error = %e, index, "etcd log compaction failed; will retry later");
            }
            s.inner.compacting.store(false, Ordering::Release);
        });
    }

    /// Writes the snapshot at `index`, then deletes older snapshots, the
    /// log keys up to `index`, and etcd's history up to `index`.
    async fn compact(&self, index: u64, data: Vec<u8>) -> Result<(), etcd_client::Error> {
        let mut client = self.inner.client.clone();
        let key = format!("{}{index:020}", self.snapshot_prefix());
        client.put(key.clone(), data, None).await?;
        // Older snapshots: the snapshot keys sorting before this one.
        client
            .delete(
                self.snapshot_prefix(),
                Some(etcd_client::DeleteOptions::new().with_range(key)),
            )
            .await?;
        let covered = client
            .get(
                self.log_prefix(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let stale: Vec<Vec<u8>> = covered
            .kvs()
            .iter()
            .filter(|kv| rev(kv.mod_revision()) <= index)
            .map(|kv| kv.key().to_vec())
            .collect();
        for chunk in stale.chunks(64) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::delete(k.clone(), None))
                .collect();
            client.txn(Txn::new().and_then(ops)).await?;
        }
        client
            .compact(i64::try_from(index).unwrap_or(i64::MAX), None)
            .await?;
        tracing::info!(
            index,
            deleted = stale.len(),
            "compacted the etcd command log"
        );
        Ok(())
    }

    fn apply_one(&self, index: u64, value: &[u8]) {
        if index <= *self.inner.applied.borrow() {
            return;
        }
        let env = codec::decode_envelope(value);
        let outcome = {
            let Ok(mut state) = self.inner.state.write() else {
                return;
            };
            match &env {
                // etcd checked the fence when the command was written.
                Ok(env) => nephele_state::apply(&mut state, env, env.fence_term.unwrap_or(0)),
                Err(e) => {
                    state.applied += 1;
                    Err(ApplyError::InvalidArgument(format!(
                        "the command does not decode: {e}"
                    )))
                }
            }
        };
        if let Ok(env) = env
            && self.inner.events.receiver_count() > 0
        {
            let _ = self.inner.events.send(WatchEvent {
                index,
                envelope: Arc::new(env),
                outcome: Arc::new(outcome.clone()),
            });
        }
        if let Ok(mut r) = self.inner.recent.lock() {
            r.insert(index, outcome);
            while r.len() > RECENT_OUTCOMES {
                r.pop_first();
            }
        }
        self.inner.applied.send_replace(index);
        self.maybe_compact(index);
    }

    /// Applies the log as it grows; when a compaction overtook this
    /// controller, loads the snapshot again and goes on from there.
    async fn follow_log(&self, mut from: i64) -> Result<(), etcd_client::Error> {
        loop {
            match self.follow_log_from(from).await? {
                Some(compacted) => {
                    tracing::info!(
                        compacted,
                        "the etcd log was compacted past this controller; reloading"
                    );
                    from = self.replay().await?;
                }
                None => {
                    return Err(etcd_client::Error::WatchError(
                        "the log watch stream ended".into(),
                    ));
                }
            }
        }
    }

    /// Follows the log from `from`; `Some(revision)` when the watch was
    /// cancelled because etcd compacted its history up to that revision.
    async fn follow_log_from(&self, from: i64) -> Result<Option<i64>, etcd_client::Error> {
        let mut client = self.inner.client.clone();
        let mut stream = client
            .watch(
                self.log_prefix(),
                Some(WatchOptions::new().with_prefix().with_start_revision(from)),
            )
            .await?;
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return Ok(Some(resp.compact_revision()));
                }
                return Err(etcd_client::Error::WatchError(format!(
                    "the log watch was cancelled: {}",
                    resp.cancel_reason()
                )));
            }
            for ev in resp.events() {
                if ev.event_type() == EventType::Put
                    && let Some(kv) = ev.kv()
                {
                    self.apply_one(rev(kv.mod_revision()), kv.value());
                }
            }
        }
        Ok(None)
    }

    /// Runs the leader election for as long as the process lives.
    async fn campaign_forever(self) {
        loop {
            if let Err(e) = self.campaign_once().await {
                tracing::warn!(error = %e, "etcd leader election failed; retrying");
            }
            self.set_leader(None, 0);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn set_leader(&self, leader: Option<u64>, term: u64) {
        if let Ok(mut l) = self.inner.leadership.write() {
            l.leader_id = leader;
            if term > 0 {
                l.term = term;
            }
        }
    }

    async fn campaign_once(&self) -> Result<(), etcd_client::Error> {
        let mut client = self.inner.client.clone();
        let ttl = self.inner.cfg.lease_ttl_s.max(1);
        let lease = client.lease_grant(ttl, None).await?.id();
        let (mut keeper, mut acks) = client.lease_keep_alive(lease).await?;
        let key = self.leader_key();
        let me = self.inner.cfg.member_id;
        loop {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    me.to_string(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = client.txn(txn).await?;
            let watch_from;
            if resp.succeeded() {
                let term = resp.header().map_or(0, |h| rev(h.revision()));
                self.set_leader(Some(me), term);
                tracing::info!(term, "this controller leads (etcd lease)");
                watch_from = term + 1;
            } else {
                let mut leader = None;
                let mut term = 0;
                for r in resp.op_responses() {
                    if let TxnOpResponse::Get(g) = r
                        && let Some(kv) = g.kvs().first()
                    {
                        leader = std::str::from_utf8(kv.value())
                            .ok()
                            .and_then(|v| v.parse().ok());
                        term = rev(kv.create_revision());
                    }
                }
                self.set_leader(leader, term);
                watch_from = resp.header().map_or(0, |h| rev(h.revision())) + 1;
            }
            // Keep the lease alive and wait for the leader key to go.
            let mut w = client
                .watch(
                    key.clone(),
                    Some(
                        WatchOptions::new()
                            .with_start_revision(i64::try_from(watch_from).unwrap_or(i64::MAX)),
                    ),
                )
                .await?;
            let period = Duration::from_millis(u64::try_from(ttl).unwrap_or(1) * 1000 / 3);
            let mut tick = tokio::time::interval(period);
            'watching: loop {
                tokio::select! {
                    _ = tick.tick() => {
                        keeper.keep_alive().await?;
                        if let Some(a) = acks.message().await?
                            && a.ttl() <= 0
                        {
                            return Err(etcd_client::Error::LeaseKeepAliveError(
                                "the leadership lease expired".into(),
                            ));
                        }
                    }
                    msg = w.message() => {
                        let Some(resp) = msg? else {
                            return Err(etcd_client::Error::WatchError("leader watch ended".into()));
                        };
                        if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                            self.set_leader(None, 0);
                            break 'watching;
                        }
                    }
                }
            }
        }
    }

    /// The newest log revision, read linearizably from etcd: the newest
    /// log key's, or the newest snapshot's when compaction deleted the keys
    /// it covers.
    async fn newest_log_revision(&self) -> Result<u64, etcd_client::Error> {
        let mut client = self.inner.client.clone();
        let newest = |prefix: String, target| {
            TxnOp::get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_sort(target, SortOrder::Descend)
                        .with_limit(1),
                ),
            )
        };
        let resp = client
            .txn(Txn::new().and_then([
                newest(self.log_prefix(), SortTarget::Mod),
                newest(self.snapshot_prefix(), SortTarget::Key),
            ]))
            .await?;
        let mut newest_rev = 0;
        for (i, r) in resp.op_responses().into_iter().enumerate() {
            if let TxnOpResponse::Get(g) = r
                && let Some(kv) = g.kvs().first()
            {
                let at = if i == 0 {
                    rev(kv.mod_revision())
                } else {
                    snapshot_revision(kv.key(), &self.snapshot_prefix())
                };
                newest_rev = newest_rev.max(at);
            }
        }
        Ok(newest_rev)
    }

    async fn wait_applied(&self, index: u64, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.inner.applied.subscribe();
        tokio::time::timeout_at(deadline, rx.wait_for(|a| *a >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl StateStore for EtcdStore {
    async fn propose(&self, envelope: Envelope) -> Result<Committed, ProposeError> {
        if let Some(f) = self.stopped() {
            return Err(ProposeError::Stopped(f));
        }
        let data = codec::encode_envelope(&envelope);
        if data.len() > crate::raft::MAX_COMMAND_BYTES {
            return Err(ProposeError::TooLarge {
                size: data.len(),
                max: crate::raft::MAX_COMMAND_BYTES,
            });
        }
        let deadline = tokio::time::Instant::now() + self.inner.cfg.proposal_timeout;
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        // Unique across restarts too: a reused key would hide the older
        // command from a later replay.
        let key = format!(
            "{}{}/{:x}-{seq}",
            self.log_prefix(),
            self.inner.cfg.member_id,
            self.inner.incarnation
        );
        let mut client = self.inner.client.clone();
        let index = match envelope.fence_term {
            None => {
                let r = tokio::time::timeout_at(deadline, client.put(key, data, None))
                    .await
                    .map_err(|_| ProposeError::Timeout)?
                    .map_err(|_| ProposeError::Timeout)?;
                r.header().map_or(0, |h| rev(h.revision()))
            }
            Some(fence) => {
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        self.leader_key(),
                        CompareOp::Equal,
                        i64::try_from(fence).unwrap_or(i64::MAX),
                    )])
                    .and_then([TxnOp::put(key, data, None)])
                    .or_else([TxnOp::get(self.leader_key(), None)]);
                let r = tokio::time::timeout_at(deadline, client.txn(txn))
                    .await
                    .map_err(|_| ProposeError::Timeout)?
                    .map_err(|_| ProposeError::Timeout)?;
                let index = r.header().map_or(0, |h| rev(h.revision()));
                if !r.succeeded() {
                    let mut term = 0;
                    for op in r.op_responses() {
                        if let TxnOpResponse::Get(g) = op
                            && let Some(kv) = g.kvs().first()
                        {
                            term = rev(kv.create_revision());
                        }
                    }
                    return Ok(Committed {
                        index,
                        outcome: Err(ApplyError::Fenced {
                            fence_term: fence,
                            term,
                        }),
                    });
                }
                index
            }
        };
        if !self.wait_applied(index, deadline).await {
            return Err(ProposeError::Timeout);
        }
        let outcome = self
            .inner
            .recent
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&index))
            .ok_or(ProposeError::Timeout)?;
        Ok(Committed { index, outcome })
    }

    async fn read<R, F>(&self, f: F) -> Result<R, ReadError>
    where
        R: Send + 'static,
        F: FnOnce(&State) -> R + Send + 'static,
    {
        if let Some(f) = self.stopped() {
            return Err(ReadError::Stopped(f));
        }
        let deadline = tokio::time::Instant::now() + self.inner.cfg.proposal_timeout;
        let index = tokio::time::timeout_at(deadline, self.newest_log_revision())
            .await
            .map_err(|_| ReadError::Timeout)?
            .map_err(|_| ReadError::Timeout)?;
        if !self.wait_applied(index, deadline).await {
            return Err(ReadError::Timeout);
        }
        let state = self
            .inner
            .state
            .read()
            .map_err(|_| ReadError::Stopped("state lock poisoned".into()))?;
        Ok(f(&state))
    }

    fn watch(&self) -> broadcast::Receiver<WatchEvent> {
        self.inner.events.subscribe()
    }

    fn leadership(&self) -> Leadership {
        self.inner
            .leadership
            .read()
            .map(|l| *l)
            .unwrap_or(Leadership {
                member_id: self.inner.cfg.member_id,
                term: 0,
                leader_id: None,
            })
    }

    fn backend(&self) -> super::BackendInfo {
        let mut endpoints = self.inner.cfg.endpoints.clone();
        endpoints.push(format!("prefix {}", self.inner.cfg.prefix));
        super::BackendInfo {
            kind: "etcd",
            endpoints,
        }
    }
}
