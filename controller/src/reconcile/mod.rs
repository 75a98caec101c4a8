//! Leader-only control loops. Each is level-triggered: it reads the whole
//! desired and actual state, acts on the difference, and says when to look
//! again; it also wakes on every applied command. Every command a loop
//! proposes is fenced to the term it read its leadership in
//! (`Envelope::fence_term`), so a deposed leader's loop can never act.
//!
//! - [`schedule_pass`]: PENDING instances -> `nephele-scheduler` placement
//!   over a snapshot of the nodes -> re-check against a newer snapshot ->
//!   commit SCHEDULED with the node; no valid host -> ERROR with the
//!   scheduler's reasons (which fails the create operation).
//! - [`liveness_pass`]: a node whose heartbeat has not changed for the
//!   timeout, as this leader observed it on its monotonic clock
//!   ([`HeartbeatMemory`]: the heartbeats recorded in the state, and
//!   [`NodeBeats`]: those it answered from memory in its term), is marked
//!   DOWN; its instances go to ERROR,
//!   except HA ones, which restart elsewhere once the node is fenced (its
//!   lease expired: `node_timeout + fence_lease` after the last heartbeat
//!   this leader saw).
//! - [`operations_pass`]: a DELETING instance with no node, or on a DOWN
//!   node, is purged (which finishes its delete operation); an unfinished
//!   operation whose target is gone is finished with an error.
//!
//! - [`rebalance_pass`]: when the measured CPU imbalance between nodes
//!   stays above a threshold for a window, the rebalance planner's moves
//!   become migrations (within limits, then a cooldown), each with its
//!   reason as its cause (`rebalance.rs`).
//! - [`drain_pass`]: a DRAINING node's instances leave by the drain
//!   planner's moves, a few at a time within the same kind of limits,
//!   failed moves tried again after a pause (`drain.rs`).
//!
//! [`snapshot`] turns the state into the scheduler's input; the API uses it
//! too, to refuse a create that no node could take.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nephele_scheduler::{self as sched, ClusterSnapshot, Explain, PlaceError, PlacementRequest};
use nephele_state::model::{InstanceState, MigrationState, NodeState, State};
use nephele_state::{Command, Envelope};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::now_ms;

mod drain;
mod rebalance;
use crate::store::{ProposeError, ReadError, StateStore};
pub use drain::{DrainConfig, DrainMemory, drain_pass};
pub use rebalance::{RebalanceConfig, RebalanceMemory, rebalance_pass};

/// Actor recorded in events for what the loops do.
pub const ACTOR: &str = "system";

/// Settings of the loops.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// A node that sends no heartbeat for this long is marked DOWN.
    pub node_timeout: Duration,
    /// The fencing lease agents are given (see `ApiConfig::fence_lease`;
    /// `server::start_with` copies the API's value here so the two agree):
    /// HA instances of a DOWN node restart elsewhere once `node_timeout +
    /// fence_lease` passed since its last heartbeat.
    pub fence_lease: Duration,
    /// Longest sleep of any loop between passes.
    pub max_requeue: Duration,
    /// The automatic load balancer.
    pub rebalance: RebalanceConfig,
    /// Node drains.
    pub drain: DrainConfig,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            node_timeout: Duration::from_secs(10),
            fence_lease: Duration::from_secs(10),
            max_requeue: Duration::from_secs(5),
            rebalance: RebalanceConfig::default(),
            drain: DrainConfig::default(),
        }
    }
}

/// Why a pass stopped early (the loop logs it and retries).
#[derive(Debug, Error)]
pub enum ReconcileError {
    /// The read failed.
    #[error("cannot read the state")]
    Read(#[from] ReadError),
    /// A proposal failed.
    #[error("cannot propose")]
    Propose(#[from] ProposeError),
    /// The snapshot was refused by the scheduler (a bug or corrupt state).
    #[error("the scheduler refused the snapshot")]
    Snapshot(#[from] sched::BuildStateError),
}

fn vcpus(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn resources(r: nephele_state::model::Resources) -> sched::Resources {
    sched::Resources::new(vcpus(r.vcpus), r.memory_mib, r.disk_gib)
}

/// The scheduler's view of `state`: every node, every placed instance,
/// every group, every migration in flight. Ids are full resource names.
pub fn snapshot(state: &State) -> ClusterSnapshot {
    let nodes = state
        .nodes
        .values()
        .map(|n| sched::Node {
            id: n.name.clone(),
            name: String::new(),
            zone: n.labels.get("zone").cloned().unwrap_or_default(),
            labels: n.labels.clone(),
            state: match n.state {
                NodeState::Up => sched::NodeState::Up,
                NodeState::Draining => sched::NodeState::Draining,
                NodeState::Disabled => sched::NodeState::Disabled,
                NodeState::Down => sched::NodeState::Down,
            },
            capacity: resources(n.capacity),
            reserved: sched::Resources::default(),
            overcommit: None,
            cpu_utilisation: None,
            max_instances: None,
        })
        .collect();
    let instances = state
        .instances
        .values()
        .filter_map(|i| {
            let node = i.node.clone()?;
            state.nodes.contains_key(&node).then(|| sched::Instance {
                id: i.name.clone(),
                node,
                resources: resources(i.resources),
                measured_cpu: 0.0,
                dirty_rate_mib_s: 0.0,
                groups: i.server_group.iter().cloned().collect(),
                pinned: false,
                required_zone: None,
                required_labels: Default::default(),
            })
        })
        .collect();
    let groups = state
        .server_groups
        .values()
        .map(|g| sched::ServerGroup {
            id: g.name.clone(),
            policy: match g.policy {
                nephele_state::model::GroupPolicy::Affinity => sched::GroupPolicy::Affinity,
                nephele_state::model::GroupPolicy::AntiAffinity => sched::GroupPolicy::AntiAffinity,
                nephele_state::model::GroupPolicy::SoftAffinity => sched::GroupPolicy::SoftAffinity,
                nephele_state::model::GroupPolicy::SoftAntiAffinity => {
                    sched::GroupPolicy::SoftAntiAffinity
                }
            },
            max_per_node: g.max_per_node,
        })
        .collect();
    let migrations = state
        .unfinished_migrations()
        .map(|m| sched::MigrationInFlight {
            instance: m.instance.clone(),
            from: m.source.clone(),
            to: m.target.clone(),
        })
        .collect();
    ClusterSnapshot {
        nodes,
        instances,
        groups,
        migrations,
        config: cluster_config(),
    }
}

/// The scheduler's cluster-wide settings [`snapshot`] gives it (its
/// defaults: overcommit ratios vCPU 16, memory 1.5, disk 1).
fn cluster_config() -> sched::ClusterConfig {
    sched::ClusterConfig::default()
}

/// The overcommit ratios nodes are scheduled with.
pub fn overcommit() -> sched::OvercommitRatios {
    cluster_config().overcommit
}

/// The most a node of `capacity` may hold in all, as the scheduler counts
/// it: each dimension times its overcommit ratio, rounded down (the
/// scheduler's resource filter admits `allocated + need <= capacity *
/// ratio`, so for whole amounts this is the same bound).
pub fn node_limit(capacity: nephele_state::model::Resources) -> nephele_state::model::Resources {
    let r = overcommit();
    // Ratios are finite and positive; a float product far beyond any real
    // capacity saturates at u64::MAX in the cast.
    #[allow(clippy::cast_possible_truncation)]
    let times = |v: u64, ratio: f64| (v as f64 * ratio).floor() as u64;
    nephele_state::model::Resources {
        vcpus: times(capacity.vcpus, r.cpu),
        memory_mib: times(capacity.memory_mib, r.ram),
        disk_gib: times(capacity.disk_gib, r.disk),
    }
}

/// The placement request for a pending instance (or a batch of `count`
/// alike), seeded by `request_id` so the decision can be replayed.
pub fn request(
    request_id: String,
    r: nephele_state::model::Resources,
    group: Option<String>,
    count: u32,
) -> PlacementRequest {
    let mut req = PlacementRequest::new(request_id, resources(r));
    req.group = group;
    req.count = count;
    req
}

fn fenced(term: u64, command: Command) -> Envelope {
    Envelope {
        time: now_ms(),
        actor: ACTOR.into(),
        request_id: None,
        fence_term: Some(term),
        command,
        origin: None,
    }
}

/// Placements a scheduling pass proposes at once (below the store's bound
/// on proposals in flight).
const SCHEDULE_BATCH: usize = 256;

/// One scheduling pass; returns when to look again.
pub async fn schedule_pass<S: StateStore>(
    store: &S,
    term: u64,
) -> Result<Duration, ReconcileError> {
    let (snap, pending) = store
        .read(|s| {
            let pending: Vec<_> = s
                .instances
                .values()
                .filter(|i| i.state == InstanceState::Pending)
                .map(|i| {
                    (
                        i.name.clone(),
                        i.generation,
                        i.resources,
                        i.server_group.clone(),
                    )
                })
                .collect();
            ((!pending.is_empty()).then(|| snapshot(s)), pending)
        })
        .await?;
    let Some(snap) = snap else {
        return Ok(Duration::from_secs(5));
    };
    let mut scheduler = sched::Scheduler::new(&snap)?;
    let mut plans = Vec::new();
    let mut failed = Vec::new();
    for (name, generation, res, group) in pending {
        let req = request(format!("{name}#{generation}"), res, group, 1);
        match scheduler.place(&req, Explain::Summary) {
            Ok(plan) => {
                if scheduler.commit_placement(&plan).is_ok() {
                    plans.push((name, generation, plan));
                }
            }
            Err(PlaceError::NoValidHost(e)) => failed.push((name, generation, e.to_string())),
            Err(e) => failed.push((name, generation, e.to_string())),
        }
    }
    // Re-check every plan, in order, against the state as it is now.
    let newer = store.read(snapshot).await?;
    let mut recheck = sched::Scheduler::new(&newer)?;
    let mut retry_soon = false;
    let mut commands = Vec::new();
    for (name, generation, plan) in plans {
        if let Err(e) = recheck.commit_placement(&plan) {
            tracing::info!(instance = %name, error = %e, "placement went stale; placing again");
            retry_soon = true;
            continue;
        }
        let Some(p) = plan.placements.first() else {
            continue;
        };
        let cmd = Command::ScheduleInstance {
            instance: name.clone(),
            node: p.node.clone(),
            expected_generation: generation,
        };
        commands.push((name, cmd));
    }
    // The plans were checked together against one snapshot, and the state
    // machine re-checks each against the state it applies to: propose them
    // all at once (the store batches them into few log writes) rather than
    // one commit round trip after another.
    for chunk in commands.chunks(SCHEDULE_BATCH) {
        let committed = futures::future::join_all(
            chunk
                .iter()
                .map(|(_, cmd)| store.propose(fenced(term, cmd.clone()))),
        )
        .await;
        for ((name, _), c) in chunk.iter().zip(committed) {
            if let Err(e) = c?.outcome {
                tracing::info!(instance = %name, error = %e, "scheduling refused");
                retry_soon = true;
            }
        }
    }
    for (name, generation, reason) in failed {
        let cmd = Command::SetInstanceState {
            instance: name.clone(),
            state: InstanceState::Error,
            reason,
            expected_generation: Some(generation),
        };
        let c = store.propose(fenced(term, cmd)).await?;
        if let Err(e) = c.outcome {
            tracing::info!(instance = %name, error = %e, "could not record the placement failure");
        }
    }
    Ok(if retry_soon {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(5)
    })
}

/// What the liveness loop has seen of each node's heartbeats: the last
/// heartbeat time recorded in the state, and when (on this controller's
/// monotonic clock) it was first seen with that value. A node is late when
/// its recorded heartbeat has not changed for the timeout as measured here,
/// so clock differences between controllers and nodes never matter, and a
/// new leader (which starts with an empty memory) gives every node a whole
/// timeout before judging it.
#[derive(Debug, Default)]
pub struct HeartbeatMemory {
    seen: std::collections::HashMap<String, (u64, Instant)>,
}

impl HeartbeatMemory {
    /// Records that `node`'s recorded heartbeat is `beat` at `now`; returns
    /// how long that value has been seen unchanged.
    fn observe(&mut self, node: &str, beat: u64, now: Instant) -> Duration {
        let entry = self.seen.entry(node.to_owned()).or_insert((beat, now));
        if entry.0 != beat {
            *entry = (beat, now);
        }
        now.saturating_duration_since(entry.1)
    }
}

/// Heartbeats this controller answered as the leader without committing
/// them (`api::node`): per node, the term it led in and when (on its
/// monotonic clock, and on the wall clock for display) the heartbeat was
/// confirmed. Only the current term's entries count, so a leader that lost
/// and regained leadership never trusts what it saw before; a new leader
/// starts with none and gives every node a whole timeout
/// ([`HeartbeatMemory`]). Shared by the API and the liveness loop.
#[derive(Debug, Default)]
pub struct NodeBeats {
    seen: std::sync::Mutex<std::collections::HashMap<String, LocalBeat>>,
    /// Busy vCPUs per instance, as its node last measured it, and when
    /// this controller heard it (for the balancer).
    loads: std::sync::Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

/// One heartbeat answered from memory.
#[derive(Debug, Clone, Copy)]
pub struct LocalBeat {
    /// The term the leader confirmed it led in.
    pub term: u64,
    /// When, on this controller's monotonic clock.
    pub at: Instant,
    /// When, on its wall clock (milliseconds since the epoch).
    pub wall_ms: u64,
}

impl NodeBeats {
    /// Records a heartbeat from `node` answered in `term`.
    pub fn record(&self, node: &str, beat: LocalBeat) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(node.to_owned(), beat);
        }
    }

    /// The last heartbeat from `node` answered in `term`, if any.
    pub fn last(&self, node: &str, term: u64) -> Option<LocalBeat> {
        let seen = self.seen.lock().ok()?;
        seen.get(node).copied().filter(|b| b.term == term)
    }

    /// The last heartbeat from `node` answered in any term (for display).
    pub fn latest(&self, node: &str) -> Option<LocalBeat> {
        self.seen.lock().ok()?.get(node).copied()
    }

    /// Records the busy vCPUs a node measured in each of its instances.
    pub fn record_loads<'a>(
        &self,
        measured: impl IntoIterator<Item = (&'a str, f64)>,
        at: Instant,
    ) {
        if let Ok(mut loads) = self.loads.lock() {
            for (instance, busy) in measured {
                if busy.is_finite() && busy >= 0.0 {
                    loads.insert(instance.to_owned(), (busy, at));
                }
            }
        }
    }

    /// Every instance's measured busy vCPUs no older than `max_age`.
    pub fn loads(&self, max_age: Duration, now: Instant) -> std::collections::HashMap<String, f64> {
        let Ok(mut loads) = self.loads.lock() else {
            return Default::default();
        };
        loads.retain(|_, (_, at)| now.saturating_duration_since(*at) <= max_age);
        loads.iter().map(|(i, (b, _))| (i.clone(), *b)).collect()
    }

    fn retain(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.retain(|n, _| keep(n));
        }
    }
}

/// One instance placed on a node, as the liveness pass sees it.
#[derive(Debug)]
struct Placed {
    name: String,
    node: String,
    state: InstanceState,
    ha: bool,
    generation: u64,
}

/// One liveness and fencing pass, judged at `now` (the loop passes
/// `Instant::now()`; tests pass a fake clock):
///
/// - a node whose recorded heartbeat has not changed for `node_timeout`
///   (as this leader observed it), and that this leader has not answered a
///   heartbeat of from memory ([`NodeBeats`]) for as long, is marked DOWN;
/// - on a DOWN node, instances that are not HA (and HA ones being stopped)
///   go to ERROR, "node X is down";
/// - once `node_timeout + fence_lease` has passed since this leader last
///   saw the node's heartbeat change, the node is fenced: its agent paused
///   its VMs at (heartbeat sent + lease) at the latest, and sent <= seen
///   here, so HA instances that should run are restarted elsewhere
///   ([`Command::RestartInstanceElsewhere`]);
/// - a migration with a DOWN node fails if its switchover was not decided
///   (the source keeps or gets back the VM; the target runs nothing without
///   the commit); a decided one whose source is DOWN goes IN_DOUBT, so the
///   target's agent settles where the VM runs. One whose target is DOWN
///   waits for the source's word (it fails it if the commit never went out)
///   or for the target's agent.
///
/// Clock assumption: the agent's and this leader's monotonic clocks run at
/// about the same rate (the `node_timeout` is the margin for drift and for
/// delays between sending, committing and observing a heartbeat); no
/// wall clocks are compared. A new leader has seen no heartbeat, so it
/// counts the whole window from its own first pass.
pub async fn liveness_pass<S: StateStore>(
    store: &S,
    term: u64,
    memory: &mut HeartbeatMemory,
    beats: &NodeBeats,
    config: &ReconcileConfig,
    now: Instant,
) -> Result<Duration, ReconcileError> {
    let timeout = config.node_timeout;
    let fenced_after = timeout.saturating_add(config.fence_lease);
    let mut requeue = (timeout / 4).max(Duration::from_millis(50));
    let (nodes, placed, migrations) = store
        .read(|s| {
            let nodes: Vec<(String, u64, bool)> = s
                .nodes
                .values()
                .map(|n| (n.name.clone(), n.last_heartbeat, n.state == NodeState::Down))
                .collect();
            let placed: Vec<Placed> = s
                .instances
                .values()
                .filter_map(|i| {
                    Some(Placed {
                        name: i.name.clone(),
                        node: i.node.clone()?,
                        state: i.state,
                        ha: i.ha,
                        generation: i.generation,
                    })
                })
                .collect();
            let migrations: Vec<(String, String, String, MigrationState, u64)> = s
                .unfinished_migrations()
                .map(|m| {
                    (
                        m.name.clone(),
                        m.source.clone(),
                        m.target.clone(),
                        m.state,
                        m.bytes_copied,
                    )
                })
                .collect();
            (nodes, placed, migrations)
        })
        .await?;
    let mut down_nodes = std::collections::HashSet::new();
    memory
        .seen
        .retain(|name, _| nodes.iter().any(|(n, _, _)| n == name));
    beats.retain(|name| nodes.iter().any(|(n, _, _)| n == name));
    for (node, beat, mut down) in nodes {
        let mut silent = memory.observe(&node, beat, now);
        if let Some(local) = beats.last(&node, term) {
            silent = silent.min(now.saturating_duration_since(local.at));
        }
        if !down && silent > timeout {
            tracing::warn!(%node, "node missed its heartbeats; marking it down");
            let cmd = Command::SetNodeState {
                node: node.clone(),
                state: NodeState::Down,
            };
            down = store.propose(fenced(term, cmd)).await?.outcome.is_ok();
        }
        if !down {
            continue;
        }
        down_nodes.insert(node.clone());
        let node_id = node.strip_prefix("nodes/").unwrap_or(&node);
        let fenced_now = silent > fenced_after;
        for i in placed.iter().filter(|i| i.node == node) {
            use InstanceState as I;
            let should_run = matches!(i.state, I::Scheduled | I::Starting | I::Running);
            let cmd = if i.ha && should_run {
                if !fenced_now {
                    requeue = requeue.min(fenced_after - silent + Duration::from_millis(10));
                    continue;
                }
                tracing::warn!(instance = %i.name, %node, "node fenced; restarting the instance elsewhere");
                Command::RestartInstanceElsewhere {
                    instance: i.name.clone(),
                    node: node.clone(),
                }
            } else if should_run || i.state == I::Stopping {
                Command::SetInstanceState {
                    instance: i.name.clone(),
                    state: I::Error,
                    reason: format!("node {node_id} is down"),
                    expected_generation: Some(i.generation),
                }
            } else {
                continue;
            };
            if let Err(e) = store.propose(fenced(term, cmd)).await?.outcome {
                tracing::info!(instance = %i.name, error = %e, "instance on a down node not moved");
            }
        }
    }
    for (name, source, target, state, bytes_copied) in migrations {
        let (to, reason) = match state {
            MigrationState::Queued | MigrationState::Running => {
                let Some(down) = [&source, &target]
                    .into_iter()
                    .find(|n| down_nodes.contains(*n))
                else {
                    continue;
                };
                (
                    MigrationState::Failed,
                    format!("{down} is down before the switchover was decided"),
                )
            }
            MigrationState::Switching if down_nodes.contains(&source) => (
                MigrationState::InDoubt,
                format!("{source} is down during the switchover"),
            ),
            _ => continue,
        };
        tracing::warn!(migration = %name, %reason, to = ?to, "a node of a migration is down");
        let cmd = Command::SetMigrationState {
            migration: name.clone(),
            state: to,
            bytes_copied,
            reason,
        };
        if let Err(e) = store.propose(fenced(term, cmd)).await?.outcome {
            tracing::info!(migration = %name, error = %e, "migration of a down node not changed");
        }
    }
    Ok(requeue)
}

/// One operations pass.
pub async fn operations_pass<S: StateStore>(
    store: &S,
    term: u64,
) -> Result<Duration, ReconcileError> {
    let (purge, orphans) = store
        .read(|s| {
            let purge: Vec<String> = s
                .instances
                .values()
                .filter(|i| i.state == InstanceState::Deleting)
                .filter(|i| match &i.node {
                    None => true,
                    Some(n) => s.nodes.get(n).is_none_or(|n| n.state == NodeState::Down),
                })
                .map(|i| i.name.clone())
                .collect();
            let orphans: Vec<String> = s
                .operations
                .values()
                .filter(|o| !o.done)
                .filter(|o| {
                    !s.instances.contains_key(&o.target)
                        && !s.migrations.contains_key(&o.target)
                        && !s.nodes.contains_key(&o.target)
                })
                .map(|o| o.name.clone())
                .collect();
            (purge, orphans)
        })
        .await?;
    for instance in purge {
        store
            .propose(fenced(term, Command::PurgeInstance { instance }))
            .await?;
    }
    for operation in orphans {
        let cmd = Command::FinishOperation {
            operation,
            error: Some("the resource it worked on is gone".into()),
        };
        store.propose(fenced(term, cmd)).await?;
    }
    Ok(Duration::from_secs(5))
}

/// The running loops; dropping it does not stop them, [`Reconcilers::stop`]
/// does.
#[derive(Debug)]
pub struct Reconcilers {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Reconcilers {
    /// Stops every loop and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Loop {
    Schedule,
    Liveness,
    Operations,
    Rebalance,
    Drain,
}

/// Starts the loops on this controller; they act only while it leads.
pub fn spawn<S: StateStore>(
    store: Arc<S>,
    config: ReconcileConfig,
    beats: Arc<NodeBeats>,
) -> Reconcilers {
    let (stop, stopped) = watch::channel(false);
    let tasks = [
        Loop::Schedule,
        Loop::Liveness,
        Loop::Operations,
        Loop::Rebalance,
        Loop::Drain,
    ]
    .into_iter()
    .map(|kind| {
        let store = store.clone();
        let config = config.clone();
        let stopped = stopped.clone();
        tokio::spawn(run(kind, store, config, beats.clone(), stopped))
    })
    .collect();
    Reconcilers { stop, tasks }
}

async fn run<S: StateStore>(
    kind: Loop,
    store: Arc<S>,
    config: ReconcileConfig,
    beats: Arc<NodeBeats>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut changes = store.watch();
    let mut led_term = None;
    let mut memory = HeartbeatMemory::default();
    let mut balance = RebalanceMemory::default();
    let mut draining = DrainMemory::default();
    loop {
        let l = store.leadership();
        let requeue = if l.is_leader() {
            if led_term != Some(l.term) {
                led_term = Some(l.term);
                memory = HeartbeatMemory::default();
                balance = RebalanceMemory::default();
                draining = DrainMemory::default();
            }
            let pass = match kind {
                Loop::Schedule => schedule_pass(&*store, l.term).await,
                Loop::Liveness => {
                    liveness_pass(
                        &*store,
                        l.term,
                        &mut memory,
                        &beats,
                        &config,
                        Instant::now(),
                    )
                    .await
                }
                Loop::Operations => operations_pass(&*store, l.term).await,
                Loop::Drain => {
                    drain_pass(
                        &*store,
                        l.term,
                        &config.drain,
                        &mut draining,
                        Instant::now(),
                    )
                    .await
                }
                Loop::Rebalance => {
                    rebalance_pass(
                        &*store,
                        l.term,
                        &config.rebalance,
                        &beats,
                        &mut balance,
                        Instant::now(),
                    )
                    .await
                }
            };
            match pass {
                Ok(d) => d.min(config.max_requeue),
                Err(e) => {
                    tracing::debug!(loop_ = ?kind, error = %e, "reconcile pass failed; retrying");
                    Duration::from_millis(500)
                }
            }
        } else {
            led_term = None;
            Duration::from_millis(200)
        };
        let deadline = tokio::time::sleep(requeue);
        tokio::pin!(deadline);
        // Wake at the deadline, or on the first change after a short
        // debounce (liveness only needs its timer).
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                r = stopped.changed() => {
                    if r.is_err() || *stopped.borrow() {
                        return;
                    }
                }
                r = changes.recv(), if !matches!(kind, Loop::Liveness | Loop::Rebalance) => {
                    match r {
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            while changes.try_recv().is_ok() {}
                            break;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            changes = store.watch();
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use nephele_state::model::{ImageState, Resources};
    use nephele_state::{InstanceSpec, Response, apply};

    use super::*;
    use crate::store::{Committed, Leadership, WatchEvent};

    /// A test double for the replicated store: one in-memory state, this
    /// controller always the leader in `term`.
    struct MemStore {
        state: Mutex<State>,
        term: u64,
        changes: tokio::sync::broadcast::Sender<WatchEvent>,
    }

    impl MemStore {
        fn new(term: u64) -> Self {
            MemStore {
                state: Mutex::new(State::default()),
                term,
                changes: tokio::sync::broadcast::channel(16).0,
            }
        }

        fn run(&self, command: Command) -> Response {
            let mut s = self.state.lock().expect("state");
            let env = Envelope::new(s.now + 1, "test", command);
            apply(&mut s, &env, self.term).expect("command applies")
        }

        fn get<R>(&self, f: impl FnOnce(&State) -> R) -> R {
            f(&self.state.lock().expect("state"))
        }
    }

    impl StateStore for MemStore {
        async fn propose(&self, envelope: Envelope) -> Result<Committed, ProposeError> {
            let mut s = self.state.lock().expect("state");
            let outcome = apply(&mut s, &envelope, self.term);
            Ok(Committed {
                index: s.applied,
                outcome,
            })
        }

        async fn read<R, F>(&self, f: F) -> Result<R, ReadError>
        where
            R: Send + 'static,
            F: FnOnce(&State) -> R + Send + 'static,
        {
            Ok(f(&self.state.lock().expect("state")))
        }

        fn watch(&self) -> tokio::sync::broadcast::Receiver<WatchEvent> {
            self.changes.subscribe()
        }

        fn leadership(&self) -> Leadership {
            Leadership {
                member_id: 1,
                term: self.term,
                leader_id: Some(1),
            }
        }
    }

    /// Two nodes, `ha` and `plain` running on n1, `stopped` stopped there.
    fn cluster() -> MemStore {
        let store = MemStore::new(3);
        let res = Resources {
            vcpus: 1,
            memory_mib: 64,
            disk_gib: 1,
        };
        store.run(Command::CreateProject {
            project_id: "p".into(),
            display_name: String::new(),
            quota: None,
        });
        store.run(Command::CreateFlavor {
            flavor_id: "f".into(),
            resources: res,
        });
        store.run(Command::CreateImage {
            image_id: "i".into(),
            format: "pvh-elf".into(),
            size_bytes: 1,
            checksum: String::new(),
            state: ImageState::Active,
        });
        for n in ["n1", "n2"] {
            store.run(Command::RegisterNode {
                node_id: n.into(),
                address: "127.0.0.1:1".into(),
                capacity: Resources {
                    vcpus: 8,
                    memory_mib: 4096,
                    disk_gib: 100,
                },
                labels: Default::default(),
            });
        }
        for (id, ha) in [("ha", true), ("plain", false), ("stopped", true)] {
            let name = format!("projects/p/instances/{id}");
            store.run(Command::CreateInstance {
                project: "projects/p".into(),
                instance_id: id.into(),
                spec: InstanceSpec {
                    flavor: "flavors/f".into(),
                    image: "images/i".into(),
                    server_group: None,
                    labels: Default::default(),
                    ha,
                },
                operation_id: format!("op-{id}"),
            });
            store.run(Command::ScheduleInstance {
                instance: name.clone(),
                node: "nodes/n1".into(),
                expected_generation: 1,
            });
            let mut to = vec![InstanceState::Starting, InstanceState::Running];
            if id == "stopped" {
                to.extend([InstanceState::Stopping, InstanceState::Stopped]);
            }
            for state in to {
                store.run(Command::SetInstanceState {
                    instance: name.clone(),
                    state,
                    reason: String::new(),
                    expected_generation: None,
                });
            }
        }
        store
    }

    fn instance(store: &MemStore, id: &str) -> nephele_state::model::Instance {
        store.get(|s| s.instances[&format!("projects/p/instances/{id}")].clone())
    }

    fn timings(node_timeout_s: u64, fence_lease_s: u64) -> ReconcileConfig {
        ReconcileConfig {
            node_timeout: Duration::from_secs(node_timeout_s),
            fence_lease: Duration::from_secs(fence_lease_s),
            max_requeue: Duration::from_secs(5),
            rebalance: RebalanceConfig::default(),
            drain: DrainConfig::default(),
        }
    }

    async fn pass(
        store: &MemStore,
        config: &ReconcileConfig,
        memory: &mut HeartbeatMemory,
        now: Instant,
    ) -> Duration {
        liveness_pass(store, 3, memory, &NodeBeats::default(), config, now)
            .await
            .unwrap()
    }

    fn beat(store: &MemStore, node: &str) {
        store.run(Command::NodeHeartbeat { node: node.into() });
    }

    #[tokio::test]
    async fn migrations_of_a_down_node_fail_or_go_in_doubt() {
        let store = cluster();
        // `ha` migrating n1 -> n2, copying; `plain` too, decided.
        for (id, decided) in [("ha", false), ("plain", true)] {
            let m = format!("migrations/m-{id}");
            store.run(Command::CreateMigration {
                migration_id: format!("m-{id}"),
                instance: format!("projects/p/instances/{id}"),
                target: "nodes/n2".into(),
                max_downtime_ms: 0,
                cause: String::new(),
            });
            store.run(Command::UpdateMigration {
                migration: m.clone(),
                node: "nodes/n2".into(),
                target_address: "127.0.0.1:7000".into(),
                progress: None,
            });
            if decided {
                store.run(Command::SwitchMigration {
                    migration: m,
                    node: "nodes/n1".into(),
                    progress: None,
                });
            }
        }
        let config = timings(10, 5);
        let mut memory = HeartbeatMemory::default();
        let t0 = Instant::now();
        pass(&store, &config, &mut memory, t0).await;
        beat(&store, "nodes/n2");
        pass(&store, &config, &mut memory, t0 + Duration::from_secs(12)).await;
        assert_eq!(store.get(|s| s.nodes["nodes/n1"].state), NodeState::Down);
        let (ha, plain) = store.get(|s| {
            (
                s.migrations["migrations/m-ha"].clone(),
                s.migrations["migrations/m-plain"].clone(),
            )
        });
        // Not decided: failed, the target runs nothing without the commit.
        assert_eq!(ha.state, MigrationState::Failed);
        assert!(ha.reason.contains("nodes/n1 is down"), "{}", ha.reason);
        // Decided: the target's agent settles where the VM runs.
        assert_eq!(plain.state, MigrationState::InDoubt);
        // Nothing more changes on the next pass.
        pass(&store, &config, &mut memory, t0 + Duration::from_secs(13)).await;
        assert_eq!(
            store.get(|s| s.migrations["migrations/m-plain"].state),
            MigrationState::InDoubt
        );
    }

    #[tokio::test]
    async fn ha_instances_restart_elsewhere_only_once_the_node_is_fenced() {
        let store = cluster();
        let config = timings(10, 5);
        let mut memory = HeartbeatMemory::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        pass(&store, &config, &mut memory, at(0)).await;
        // n2 keeps beating; n1 falls silent after t0.
        for t in [4, 8, 12] {
            beat(&store, "nodes/n2");
            pass(&store, &config, &mut memory, at(t)).await;
        }
        let n1 = store.get(|s| s.nodes["nodes/n1"].state);
        assert_eq!(n1, NodeState::Down, "silent for 12 s of a 10 s timeout");
        assert_eq!(store.get(|s| s.nodes["nodes/n2"].state), NodeState::Up);
        // Down: the plain instance fails at once, the HA one waits.
        let plain = instance(&store, "plain");
        assert_eq!(plain.state, InstanceState::Error);
        assert_eq!(plain.reason, "node n1 is down");
        assert!(store.get(|s| s.operations["operations/op-plain"].done));
        let ha = instance(&store, "ha");
        assert_eq!(ha.state, InstanceState::Running);
        assert_eq!(ha.node.as_deref(), Some("nodes/n1"));
        // Not yet fenced at 14 s (10 s + 5 s lease): still waiting, and the
        // pass asks to look again by the time it is.
        let requeue = pass(&store, &config, &mut memory, at(14)).await;
        assert!(requeue <= Duration::from_millis(1100), "{requeue:?}");
        assert_eq!(instance(&store, "ha").state, InstanceState::Running);
        pass(&store, &config, &mut memory, at(16)).await;
        let ha = instance(&store, "ha");
        assert_eq!(ha.state, InstanceState::Pending);
        assert_eq!(ha.node, None);
        assert_eq!(ha.boot_count, 2);
        assert_eq!(ha.reason, "restarted: node n1 fenced");
        assert!(store.get(|s| {
            s.events
                .iter()
                .any(|e| e.kind == "instance.restarted" && e.actor == ACTOR)
        }));
        // Stopped instances stay stopped where they are.
        assert_eq!(instance(&store, "stopped").state, InstanceState::Stopped);
        // The scheduler places it, and never on the dead node.
        schedule_pass(&store, 3).await.unwrap();
        let ha = instance(&store, "ha");
        assert_eq!(ha.state, InstanceState::Scheduled);
        assert_eq!(ha.node.as_deref(), Some("nodes/n2"));
        assert_eq!(
            store.get(|s| s.nodes["nodes/n1"].allocated.vcpus),
            2,
            "n1 keeps the stopped and the failed instance only"
        );
    }

    #[tokio::test]
    async fn a_new_leader_waits_the_whole_window_from_its_own_start() {
        let store = cluster();
        let config = timings(10, 5);
        // n1 is already DOWN when this leader takes over: it has seen no
        // heartbeat, so it counts from its first pass.
        store.run(Command::SetNodeState {
            node: "nodes/n1".into(),
            state: NodeState::Down,
        });
        let mut memory = HeartbeatMemory::default();
        let t0 = Instant::now();
        pass(&store, &config, &mut memory, t0).await;
        pass(&store, &config, &mut memory, t0 + Duration::from_secs(14)).await;
        assert_eq!(instance(&store, "ha").state, InstanceState::Running);
        pass(&store, &config, &mut memory, t0 + Duration::from_secs(16)).await;
        assert_eq!(instance(&store, "ha").state, InstanceState::Pending);
        // A heartbeat in between would have brought n1 back and kept it.
        let store = cluster();
        let mut memory = HeartbeatMemory::default();
        pass(&store, &config, &mut memory, t0).await;
        pass(&store, &config, &mut memory, t0 + Duration::from_secs(11)).await;
        assert_eq!(store.get(|s| s.nodes["nodes/n1"].state), NodeState::Down);
        beat(&store, "nodes/n1");
        pass(&store, &config, &mut memory, t0 + Duration::from_secs(20)).await;
        assert_eq!(store.get(|s| s.nodes["nodes/n1"].state), NodeState::Up);
        assert_eq!(instance(&store, "ha").state, InstanceState::Running);
    }

    #[tokio::test]
    async fn heartbeats_answered_from_memory_keep_a_node_up_in_their_term_only() {
        let store = cluster();
        let config = timings(10, 5);
        let beats = NodeBeats::default();
        let mut memory = HeartbeatMemory::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let local = |term: u64, s: u64| LocalBeat {
            term,
            at: at(s),
            wall_ms: 0,
        };
        // n1 beats into this leader's memory (term 3); n2's beats were
        // answered in an earlier term of this controller and do not count.
        for t in [0, 4, 8, 12] {
            beats.record("nodes/n1", local(3, t));
            beats.record("nodes/n2", local(2, t));
            liveness_pass(&store, 3, &mut memory, &beats, &config, at(t))
                .await
                .unwrap();
        }
        assert_eq!(store.get(|s| s.nodes["nodes/n1"].state), NodeState::Up);
        assert_eq!(store.get(|s| s.nodes["nodes/n2"].state), NodeState::Down);
        // n1 falls silent: down once the timeout passed since its last beat.
        liveness_pass(&store, 3, &mut memory, &beats, &config, at(21))
            .await
            .unwrap();
        assert_eq!(store.get(|s| s.nodes["nodes/n1"].state), NodeState::Up);
        liveness_pass(&store, 3, &mut memory, &beats, &config, at(23))
            .await
            .unwrap();
        assert_eq!(store.get(|s| s.nodes["nodes/n1"].state), NodeState::Down);
    }

    #[tokio::test]
    async fn a_deposed_leader_moves_nothing() {
        let store = cluster();
        store.run(Command::SetNodeState {
            node: "nodes/n1".into(),
            state: NodeState::Down,
        });
        let config = timings(1, 1);
        let mut memory = HeartbeatMemory::default();
        let t0 = Instant::now();
        for t in [0, 5] {
            // Term 2 is over: the store commits in term 3.
            liveness_pass(
                &store,
                2,
                &mut memory,
                &NodeBeats::default(),
                &config,
                t0 + Duration::from_secs(t),
            )
            .await
            .unwrap();
        }
        assert_eq!(instance(&store, "ha").state, InstanceState::Running);
        assert_eq!(instance(&store, "plain").state, InstanceState::Running);
    }
}
