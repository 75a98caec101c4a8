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
//!   ([`HeartbeatMemory`]), is marked DOWN.
//! - [`operations_pass`]: a DELETING instance with no node, or on a DOWN
//!   node, is purged (which finishes its delete operation); an unfinished
//!   operation whose target is gone is finished with an error.
//!
//! [`snapshot`] turns the state into the scheduler's input; the API uses it
//! too, to refuse a create that no node could take.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nephele_scheduler::{self as sched, ClusterSnapshot, Explain, PlaceError, PlacementRequest};
use nephele_state::model::{InstanceState, NodeState, State};
use nephele_state::{Command, Envelope};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::now_ms;
use crate::store::{ProposeError, ReadError, StateStore};

/// Actor recorded in events for what the loops do.
pub const ACTOR: &str = "system";

/// Settings of the loops.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// A node that sends no heartbeat for this long is marked DOWN.
    pub node_timeout: Duration,
    /// Longest sleep of any loop between passes.
    pub max_requeue: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            node_timeout: Duration::from_secs(10),
            max_requeue: Duration::from_secs(5),
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
            max_per_node: None,
        })
        .collect();
    let migrations = state
        .migrations
        .values()
        .filter(|m| !m.state.is_final())
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
        config: Default::default(),
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
    }
}

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
        let c = store.propose(fenced(term, cmd)).await?;
        if let Err(e) = c.outcome {
            tracing::info!(instance = %name, error = %e, "scheduling refused");
            retry_soon = true;
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

/// One liveness pass.
pub async fn liveness_pass<S: StateStore>(
    store: &S,
    term: u64,
    memory: &mut HeartbeatMemory,
    timeout: Duration,
) -> Result<Duration, ReconcileError> {
    let requeue = (timeout / 4).max(Duration::from_millis(50));
    let nodes: Vec<(String, u64, bool)> = store
        .read(|s| {
            s.nodes
                .values()
                .map(|n| (n.name.clone(), n.last_heartbeat, n.state == NodeState::Down))
                .collect()
        })
        .await?;
    let now = Instant::now();
    memory
        .seen
        .retain(|name, _| nodes.iter().any(|(n, _, _)| n == name));
    let mut late = Vec::new();
    for (name, beat, down) in nodes {
        let entry = memory.seen.entry(name.clone()).or_insert((beat, now));
        if entry.0 != beat {
            *entry = (beat, now);
        }
        if !down && now.duration_since(entry.1) > timeout {
            late.push(name);
        }
    }
    for node in late {
        tracing::warn!(%node, "node missed its heartbeats; marking it down");
        let cmd = Command::SetNodeState {
            node,
            state: NodeState::Down,
        };
        store.propose(fenced(term, cmd)).await?;
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
}

/// Starts the loops on this controller; they act only while it leads.
pub fn spawn<S: StateStore>(store: Arc<S>, config: ReconcileConfig) -> Reconcilers {
    let (stop, stopped) = watch::channel(false);
    let tasks = [Loop::Schedule, Loop::Liveness, Loop::Operations]
        .into_iter()
        .map(|kind| {
            let store = store.clone();
            let config = config.clone();
            let stopped = stopped.clone();
            tokio::spawn(run(kind, store, config, stopped))
        })
        .collect();
    Reconcilers { stop, tasks }
}

async fn run<S: StateStore>(
    kind: Loop,
    store: Arc<S>,
    config: ReconcileConfig,
    mut stopped: watch::Receiver<bool>,
) {
    let mut changes = store.watch();
    let mut led_term = None;
    let mut memory = HeartbeatMemory::default();
    loop {
        let l = store.leadership();
        let requeue = if l.is_leader() {
            if led_term != Some(l.term) {
                led_term = Some(l.term);
                memory = HeartbeatMemory::default();
            }
            let pass = match kind {
                Loop::Schedule => schedule_pass(&*store, l.term).await,
                Loop::Liveness => {
                    liveness_pass(&*store, l.term, &mut memory, config.node_timeout).await
                }
                Loop::Operations => operations_pass(&*store, l.term).await,
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
                r = changes.recv(), if !matches!(kind, Loop::Liveness) => {
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
