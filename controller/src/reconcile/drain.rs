//! Node drains, level-triggered: while a node is DRAINING and still holds
//! instances, the leader runs the scheduler's drain planner on the current
//! state and starts its moves within the per-node and per-cluster limits
//! (counting every unfinished migration, a drain's or not), each with the
//! planner's reason as its cause. A move that failed is planned again
//! after a pause, at most [`DrainConfig::max_attempts`] times; an instance
//! that cannot move (pinned, or no node fits) and one that ran out of
//! attempts get an event saying why, once per leader term. `neph node
//! drain` only marks the node; this loop does the rest, so a drain goes
//! on across leader changes and a node's instances leave a few at a time.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use nephele_state::Command;
use nephele_state::model::{NodeState, State};
use sha2::{Digest as _, Sha256};

use super::{ReconcileError, fenced, snapshot};
use crate::store::StateStore;

/// Settings of the drain loop.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainConfig {
    /// Migrations a node may take part in at once (counting those running).
    pub max_per_node: u32,
    /// Migrations the cluster may run at once (counting those running).
    pub max_migrations: u32,
    /// Pause before a failed move is tried again.
    pub retry_after: Duration,
    /// Moves tried per instance before the drain gives up on it.
    pub max_attempts: u32,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            max_per_node: 2,
            max_migrations: 4,
            retry_after: Duration::from_secs(10),
            max_attempts: 3,
        }
    }
}

/// What the drain loop remembers between passes, for one term.
#[derive(Debug, Default)]
pub struct DrainMemory {
    /// Instance -> (moves started, when the last one started).
    attempts: HashMap<String, (u32, Instant)>,
    /// (node, instance) pairs whose refusal was recorded.
    told: HashSet<(String, String)>,
}

/// One node's drain, as planned on one state.
struct NodePlan {
    node: String,
    moves: Vec<nephele_scheduler::Move>,
    blocked: Vec<nephele_scheduler::drain::BlockedInstance>,
}

/// The plans of every DRAINING node that still holds an instance, and the
/// unfinished migrations each node takes part in (and in all).
struct Plans {
    nodes: Vec<NodePlan>,
    busy: HashMap<String, u32>,
    total: u32,
}

fn plans(s: &State) -> Result<Plans, String> {
    let draining: Vec<&str> = s
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Draining)
        .filter(|n| s.placed.contains_key(&n.name))
        .map(|n| n.name.as_str())
        .collect();
    let mut busy: HashMap<String, u32> = HashMap::new();
    let mut total = 0;
    for m in s.unfinished_migrations() {
        total += 1;
        *busy.entry(m.source.clone()).or_default() += 1;
        *busy.entry(m.target.clone()).or_default() += 1;
    }
    if draining.is_empty() {
        return Ok(Plans {
            nodes: Vec::new(),
            busy,
            total,
        });
    }
    let snap = snapshot(s);
    let mut out = Vec::new();
    for node in draining {
        let mut scheduler = nephele_scheduler::Scheduler::new(&snap).map_err(|e| e.to_string())?;
        let plan = scheduler
            .plan_drain(node, &nephele_scheduler::DrainParams::default())
            .map_err(|e| e.to_string())?;
        out.push(NodePlan {
            node: node.to_owned(),
            moves: plan.moves,
            blocked: plan.blocked,
        });
    }
    Ok(Plans {
        nodes: out,
        busy,
        total,
    })
}

/// One drain pass; returns when to look again.
pub async fn drain_pass<S: StateStore>(
    store: &S,
    term: u64,
    config: &DrainConfig,
    memory: &mut DrainMemory,
    now: Instant,
) -> Result<Duration, ReconcileError> {
    let (revision, planned) = store.read(|s| (s.applied, plans(s))).await?;
    let Plans {
        nodes: plans,
        mut busy,
        mut total,
    } = match planned {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "drain planning failed");
            return Ok(Duration::from_secs(5));
        }
    };
    if plans.is_empty() {
        memory.attempts.clear();
        return Ok(Duration::from_secs(5));
    }
    let mut again = Duration::from_secs(2);
    for plan in plans {
        let node = plan.node;
        for m in plan.moves {
            let (tries, last) = memory
                .attempts
                .get(&m.instance)
                .copied()
                .unwrap_or((0, now));
            if tries >= config.max_attempts {
                let why = format!(
                    "cannot drain {node}: {} moves of this instance failed; drain again to retry",
                    config.max_attempts
                );
                tell(store, term, memory, &node, &m.instance, why).await?;
                continue;
            }
            if tries > 0 {
                let since = now.saturating_duration_since(last);
                if since < config.retry_after {
                    again = again.min(config.retry_after - since);
                    continue;
                }
            }
            let room = |n: &str| busy.get(n).copied().unwrap_or(0) < config.max_per_node;
            if total >= config.max_migrations || !room(&m.from) || !room(&m.to) {
                continue;
            }
            // The revision planned on and the attempt make the id unique.
            let digest = Sha256::digest(format!("drain/{term}/{revision}/{}/{tries}", m.instance));
            let id: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
            let command = Command::CreateMigration {
                migration_id: format!("mig-dr-{id}"),
                instance: m.instance.clone(),
                target: m.to.clone(),
                max_downtime_ms: 0,
                cause: format!("drain of {node}: {}", m.reason),
            };
            match store.propose(fenced(term, command)).await?.outcome {
                Ok(_) => {
                    tracing::info!(instance = %m.instance, from = %m.from, to = %m.to, attempt = tries + 1, "drain move started");
                    memory.attempts.insert(m.instance.clone(), (tries + 1, now));
                    total += 1;
                    *busy.entry(m.from.clone()).or_default() += 1;
                    *busy.entry(m.to.clone()).or_default() += 1;
                }
                Err(e) => tracing::debug!(instance = %m.instance, error = %e, "drain move refused"),
            }
        }
        for b in plan.blocked {
            let why = format!("cannot drain {node}: {}", b.reason);
            tell(store, term, memory, &node, &b.instance, why).await?;
        }
    }
    Ok(again)
}

/// Records, once per term, why `instance` does not leave `node`.
async fn tell<S: StateStore>(
    store: &S,
    term: u64,
    memory: &mut DrainMemory,
    node: &str,
    instance: &str,
    reason: String,
) -> Result<(), ReconcileError> {
    if !memory.told.insert((node.to_owned(), instance.to_owned())) {
        return Ok(());
    }
    let command = Command::RecordRefusal {
        resource: instance.to_owned(),
        reason,
    };
    if let Err(e) = store.propose(fenced(term, command)).await?.outcome {
        tracing::debug!(%instance, error = %e, "drain refusal not recorded");
    }
    Ok(())
}
