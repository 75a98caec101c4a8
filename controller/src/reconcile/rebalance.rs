//! Automatic load balancing: the leader watches the CPU the agents measure
//! in each VM, and when the imbalance between nodes (the standard deviation
//! of their CPU utilisation, as `nephele-scheduler` defines it) stays above
//! a threshold for a whole window, it runs the scheduler's rebalance
//! planner and starts the migrations it plans, within per-node and
//! per-cluster limits, then waits a cooldown before looking again. Each
//! migration's cause says why (the imbalance, the window, the planner's
//! reason), so every automatic move is an event that explains itself.
//!
//! The measurements are not replicated (load is fresh or useless): each
//! controller keeps what the heartbeats it answered told it
//! ([`super::NodeBeats::record_loads`]). Agents heartbeat to the leader,
//! so a new leader has measurements again within a heartbeat interval; an
//! instance without a fresh measurement counts as idle, and a leader starts
//! every window afresh.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nephele_scheduler as sched;
use nephele_state::Command;
use sha2::{Digest as _, Sha256};

use super::{NodeBeats, ReconcileError, fenced, snapshot};
use crate::store::StateStore;

/// Settings of the balancer.
#[derive(Debug, Clone, PartialEq)]
pub struct RebalanceConfig {
    /// Imbalance (standard deviation of node CPU utilisation, 0..1) above
    /// which the balancer acts; 0 turns it off.
    pub threshold: f64,
    /// How long the imbalance must stay above the threshold.
    pub window: Duration,
    /// How long after starting moves before planning again.
    pub cooldown: Duration,
    /// Migrations a node may take part in at once (counting those running).
    pub max_per_node: u32,
    /// Migrations the cluster may run at once (counting those running).
    pub max_migrations: u32,
    /// Oldest measurement used.
    pub max_age: Duration,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            threshold: 0.10,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(60),
            max_per_node: 1,
            max_migrations: 4,
            max_age: Duration::from_secs(10),
        }
    }
}

/// What the balancer remembers between passes, for one term.
#[derive(Debug, Default)]
pub struct RebalanceMemory {
    above_since: Option<Instant>,
    last_moves: Option<Instant>,
    /// Instances moved recently, not moved again within two cooldowns (no
    /// ping-pong between two nodes).
    moved: VecDeque<(String, Instant)>,
}

/// One balancer pass; returns when to look again.
pub async fn rebalance_pass<S: StateStore>(
    store: &S,
    term: u64,
    config: &RebalanceConfig,
    beats: &NodeBeats,
    memory: &mut RebalanceMemory,
    now: Instant,
) -> Result<Duration, ReconcileError> {
    let idle = Duration::from_secs(2);
    if config.threshold <= 0.0 {
        return Ok(Duration::from_secs(60));
    }
    if let Some(t) = memory.last_moves {
        let since = now.saturating_duration_since(t);
        if since < config.cooldown {
            return Ok(config.cooldown - since);
        }
    }
    let keep = config.cooldown * 2;
    memory
        .moved
        .retain(|(_, at)| now.saturating_duration_since(*at) < keep);
    let loads = beats.loads(config.max_age, now);
    let params = sched::RebalanceParams {
        target_imbalance: config.threshold / 2.0,
        max_migrations_per_node: config.max_per_node,
        max_migrations: config.max_migrations,
        recently_moved: memory.moved.iter().map(|(i, _)| i.clone()).collect(),
        ..Default::default()
    };
    let (revision, plan) = store
        .read(move |s| {
            let mut snap = snapshot(s);
            for i in &mut snap.instances {
                i.measured_cpu = loads.get(&i.id).copied().unwrap_or(0.0);
            }
            sched::Scheduler::new(&snap).map(|mut sch| (s.applied, sch.plan_rebalance(&params)))
        })
        .await??;
    let plan = match plan {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "rebalance parameters refused");
            return Ok(Duration::from_secs(60));
        }
    };
    if plan.imbalance_before <= config.threshold {
        memory.above_since = None;
        return Ok(idle);
    }
    let since = *memory.above_since.get_or_insert(now);
    let above = now.saturating_duration_since(since);
    if above < config.window {
        return Ok((config.window - above).min(idle));
    }
    if plan.moves.is_empty() {
        return Ok(idle);
    }
    for m in &plan.moves {
        let cause = format!(
            "rebalance: imbalance {:.3} above {:.3} for {} s (to {:.3} after the plan): {}",
            plan.imbalance_before,
            config.threshold,
            above.as_secs(),
            plan.imbalance_after,
            m.reason
        );
        // The revision planned on makes the id unique per pass.
        let digest = Sha256::digest(format!("{term}/{revision}/{}", m.instance));
        let id: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let command = Command::CreateMigration {
            migration_id: format!("mig-rb-{id}"),
            instance: m.instance.clone(),
            target: m.to.clone(),
            max_downtime_ms: 0,
            cause,
        };
        let committed = store.propose(fenced(term, command)).await?;
        match committed.outcome {
            Ok(_) => {
                tracing::info!(instance = %m.instance, from = %m.from, to = %m.to, "rebalance move started");
                memory.moved.push_back((m.instance.clone(), now));
            }
            Err(e) => tracing::debug!(instance = %m.instance, error = %e, "rebalance move refused"),
        }
    }
    memory.above_since = None;
    memory.last_moves = Some(now);
    Ok(config.cooldown)
}
