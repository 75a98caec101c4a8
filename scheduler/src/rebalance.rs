//! The rebalance planner: which live migrations cut the CPU imbalance (the
//! standard deviation of the CPU utilisation of the nodes that are up) the
//! most per byte of memory moved.
//!
//! Greedy, one move at a time, on the state updated by the moves before:
//! take the hottest nodes above the mean that may still start a migration,
//! each movable instance on them, and the coolest nodes below the mean as
//! targets; score each (instance, target) pair by the drop in imbalance
//! divided by the estimated MiB pre-copy must send; keep the best pair that
//! passes every placement filter (capacity and ratios, affinity,
//! anti-affinity, zone, labels, node state). Stop when the imbalance is
//! under the target, the migration limits are reached, or no move helps.
//!
//! A plan is the set of migrations to start now, within the per-node and
//! per-cluster limits (migrations in flight count). The rebalancer runs it,
//! waits, and asks again (level-triggered). Every move strictly lowers the
//! imbalance, so a plan never increases it.
//!
//! Hysteresis: instances the caller lists as recently moved are never
//! moved, nor are pinned instances, instances already migrating, instances
//! without measured load, or instances dirtying memory as fast as the link
//! (pre-copy would not converge).

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use crate::model::{NodeState, Strategy};
use crate::moves::{Move, MoveKind, Undo, precopy_cost};
use crate::place::Scheduler;
use crate::state::{ClusterState, NONE};

/// Knobs of the rebalance planner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RebalanceParams {
    /// Stop once the imbalance is at or under this.
    pub target_imbalance: f64,
    /// Migrations a node may take part in at once (as source or target),
    /// counting those in flight.
    pub max_migrations_per_node: u32,
    /// Migrations the cluster may run at once, counting those in flight.
    pub max_migrations: u32,
    /// Instances moved recently (within the caller's hysteresis window).
    pub recently_moved: Vec<String>,
    /// Migration link bandwidth, MiB/s, to estimate pre-copy cost.
    pub bandwidth_mib_s: f64,
    /// Smallest imbalance drop worth a migration.
    pub min_gain: f64,
    /// Hottest nodes searched per step.
    pub search_sources: u32,
    /// Coolest nodes searched per step.
    pub search_targets: u32,
}

impl Default for RebalanceParams {
    fn default() -> Self {
        Self {
            target_imbalance: 0.05,
            max_migrations_per_node: 1,
            max_migrations: 32,
            recently_moved: Vec::new(),
            bandwidth_mib_s: 1200.0,
            min_gain: 1e-5,
            search_sources: 8,
            search_targets: 16,
        }
    }
}

/// Why the planner stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebalanceStop {
    /// The imbalance is at or under the target.
    Balanced,
    /// The cluster's migration limit is reached, or the nodes that could
    /// still help are at their per-node limit.
    MigrationLimit,
    /// No allowed move lowers the imbalance by at least `min_gain`.
    NoImprovingMove,
    /// Fewer than two nodes are up.
    NothingToBalance,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebalancePlan {
    /// Migrations to start, best first.
    pub moves: Vec<Move>,
    /// Imbalance now.
    pub imbalance_before: f64,
    /// Imbalance expected after the moves.
    pub imbalance_after: f64,
    /// Why it stopped.
    pub stop: RebalanceStop,
}

/// Invalid planner parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RebalanceError {
    /// A parameter is out of range.
    #[error("rebalance parameter {name} must be {want}, got {value}")]
    InvalidParam {
        /// The parameter.
        name: &'static str,
        /// What it must be.
        want: &'static str,
        /// The value given.
        value: f64,
    },
}

fn check(
    name: &'static str,
    value: f64,
    ok: bool,
    want: &'static str,
) -> Result<(), RebalanceError> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(RebalanceError::InvalidParam { name, want, value })
    }
}

impl RebalanceParams {
    pub(crate) fn validate(&self) -> Result<(), RebalanceError> {
        check(
            "target_imbalance",
            self.target_imbalance,
            self.target_imbalance >= 0.0,
            "a finite number of at least 0",
        )?;
        check(
            "bandwidth_mib_s",
            self.bandwidth_mib_s,
            self.bandwidth_mib_s > 0.0,
            "a finite number above 0",
        )?;
        check(
            "min_gain",
            self.min_gain,
            self.min_gain >= 0.0,
            "a finite number of at least 0",
        )
    }
}

impl Scheduler {
    /// Plans migrations that bring the CPU imbalance under the target.
    /// Changes nothing.
    pub fn plan_rebalance(
        &mut self,
        params: &RebalanceParams,
    ) -> Result<RebalancePlan, RebalanceError> {
        params.validate()?;
        Ok(self.rebalance(params, MoveKind::Rebalance))
    }

    pub(crate) fn rebalance(&mut self, params: &RebalanceParams, kind: MoveKind) -> RebalancePlan {
        let mut undo = Undo::default();
        let before = self.state.imbalance();
        let (moves, stop) = self.rebalance_steps(params, kind, &mut undo);
        let after = self.state.imbalance();
        undo.undo(&mut self.state);
        RebalancePlan {
            moves,
            imbalance_before: before,
            imbalance_after: after,
            stop,
        }
    }

    fn rebalance_steps(
        &mut self,
        params: &RebalanceParams,
        kind: MoveKind,
        undo: &mut Undo,
    ) -> (Vec<Move>, RebalanceStop) {
        let active: Vec<u32> = (0..self.state.nodes.len())
            .map(crate::state::ix)
            .filter(|&n| self.state.nodes[n as usize].state == NodeState::Up)
            .collect();
        let mut moves = Vec::new();
        if active.len() < 2 {
            return (moves, RebalanceStop::NothingToBalance);
        }
        let count = active.len() as f64;
        let mut order: BTreeSet<(u64, u32)> = BTreeSet::new();
        let (mut sum, mut sq) = (0.0f64, 0.0f64);
        for &n in &active {
            let u = self.state.nodes[n as usize].cpu_util;
            order.insert((u.to_bits(), n));
            sum += u;
            sq += u * u;
        }
        let mut budget: Vec<u32> = self
            .state
            .node_migrations
            .iter()
            .map(|&m| params.max_migrations_per_node.saturating_sub(m))
            .collect();
        let mut cluster_budget = params
            .max_migrations
            .saturating_sub(self.state.migrations_in_flight);
        let recent: HashSet<&str> = params.recently_moved.iter().map(String::as_str).collect();
        let mut blocked: Vec<bool> = self
            .state
            .instances
            .iter()
            .map(|i| {
                i.pinned
                    || i.migrating_to != NONE
                    || i.cpu <= 0.0
                    || recent.contains(i.id.as_str())
                    || precopy_cost(i, params.bandwidth_mib_s).is_none()
            })
            .collect();
        let k_sources = params.search_sources.max(1) as usize;
        let k_targets = params.search_targets.max(1) as usize;
        let mut sources = Vec::with_capacity(k_sources);
        let mut targets = Vec::with_capacity(k_targets);
        loop {
            let std = stddev(sum, sq, count);
            if std <= params.target_imbalance {
                return (moves, RebalanceStop::Balanced);
            }
            if cluster_budget == 0 {
                return (moves, RebalanceStop::MigrationLimit);
            }
            let mean = sum / count;
            let nodes = &self.state.nodes;
            sources.clear();
            sources.extend(
                order
                    .iter()
                    .rev()
                    .map(|&(_, n)| n)
                    .filter(|&n| budget[n as usize] > 0)
                    .take_while(|&n| nodes[n as usize].cpu_util > mean)
                    .take(k_sources),
            );
            targets.clear();
            targets.extend(
                order
                    .iter()
                    .map(|&(_, n)| n)
                    .filter(|&n| budget[n as usize] > 0)
                    .take_while(|&n| nodes[n as usize].cpu_util < mean)
                    .take(k_targets),
            );
            let mut best: Option<Candidate> = None;
            for &s in &sources {
                for &i in &self.state.node_instances[s as usize] {
                    if blocked[i as usize] {
                        continue;
                    }
                    let inst = &self.state.instances[i as usize];
                    let Some(cost) = precopy_cost(inst, params.bandwidth_mib_s) else {
                        continue;
                    };
                    let mut demand = None;
                    for &t in &targets {
                        let Some(c) = evaluate(&self.state, i, s, t, sum, sq, count, std) else {
                            continue;
                        };
                        // A NaN gain (it cannot arise from validated
                        // input) is skipped too.
                        if c.gain.is_nan() || c.gain <= params.min_gain {
                            continue;
                        }
                        let score = c.gain / cost;
                        if best.as_ref().is_some_and(|b| b.score >= score) {
                            continue;
                        }
                        let d = demand
                            .get_or_insert_with(|| self.state.instance_demand(i, Strategy::Spread));
                        if self.passes(d, t) {
                            best = Some(Candidate { score, cost, ..c });
                        }
                    }
                }
            }
            let Some(c) = best else {
                let limited = order.iter().any(|&(_, n)| budget[n as usize] == 0);
                let stop = if limited {
                    RebalanceStop::MigrationLimit
                } else {
                    RebalanceStop::NoImprovingMove
                };
                return (moves, stop);
            };
            let (s, t) = (c.from, c.to);
            let old = [
                self.state.nodes[s as usize].cpu_util,
                self.state.nodes[t as usize].cpu_util,
            ];
            undo.move_instance(&mut self.state, c.instance, t);
            let new = [
                self.state.nodes[s as usize].cpu_util,
                self.state.nodes[t as usize].cpu_util,
            ];
            for (k, n) in [s, t].into_iter().enumerate() {
                order.remove(&(old[k].to_bits(), n));
                order.insert((new[k].to_bits(), n));
                sum += new[k] - old[k];
                sq += new[k] * new[k] - old[k] * old[k];
            }
            budget[s as usize] -= 1;
            budget[t as usize] -= 1;
            cluster_budget -= 1;
            blocked[c.instance as usize] = true;
            let after = stddev(sum, sq, count);
            let inst = &self.state.instances[c.instance as usize];
            let (from_name, to_name) = (self.state.node_name(s), self.state.node_name(t));
            moves.push(Move {
                instance: inst.id.clone(),
                from: self.state.meta[s as usize].id.clone(),
                to: self.state.meta[t as usize].id.clone(),
                kind,
                reason: format!(
                    "{from_name} CPU {:.0}% -> {:.0}%, {to_name} {:.0}% -> {:.0}%; \
                     imbalance {std:.4} -> {after:.4}",
                    old[0] * 100.0,
                    new[0] * 100.0,
                    old[1] * 100.0,
                    new[1] * 100.0,
                ),
                expected_gain: std - after,
                memory_mib: inst.res.memory_mib,
                cost_mib: c.cost,
            });
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    instance: u32,
    from: u32,
    to: u32,
    gain: f64,
    score: f64,
    cost: f64,
}

fn stddev(sum: f64, sq: f64, count: f64) -> f64 {
    let mean = sum / count;
    (sq / count - mean * mean).max(0.0).sqrt()
}

/// The imbalance drop of moving instance `i` from `s` to `t`, mirroring
/// [`ClusterState::move_instance`] (a source never goes under zero).
#[allow(clippy::too_many_arguments)]
fn evaluate(
    state: &ClusterState,
    i: u32,
    s: u32,
    t: u32,
    sum: f64,
    sq: f64,
    count: f64,
    std: f64,
) -> Option<Candidate> {
    if s == t {
        return None;
    }
    let cpu = state.instances[i as usize].cpu;
    let (src, dst) = (&state.nodes[s as usize], &state.nodes[t as usize]);
    if dst.pcpus == 0 {
        return None;
    }
    let us = src.cpu_util;
    let ut = dst.cpu_util;
    let us2 = (us - src.util_delta(cpu)).max(0.0);
    let ut2 = ut + dst.util_delta(cpu);
    let sum2 = sum - us + us2 - ut + ut2;
    let sq2 = sq - us * us + us2 * us2 - ut * ut + ut2 * ut2;
    let gain = std - stddev(sum2, sq2, count);
    Some(Candidate {
        instance: i,
        from: s,
        to: t,
        gain,
        score: 0.0,
        cost: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClusterSnapshot, Instance};
    use crate::testing::{instance, node};

    fn hot_cold() -> ClusterSnapshot {
        let busy = |id: &str, n: &str, cpu: f64, mem: u64| Instance {
            measured_cpu: cpu,
            ..instance(id, n, 4, mem, 10)
        };
        ClusterSnapshot {
            nodes: vec![
                node("hot", "z", 8, 65536, 1000),
                node("cold", "z", 8, 65536, 1000),
            ],
            instances: vec![
                busy("big", "hot", 2.0, 16384),
                busy("small", "hot", 2.0, 1024),
                busy("tiny", "hot", 2.0, 512),
            ],
            ..ClusterSnapshot::default()
        }
    }

    #[test]
    fn moves_the_cheapest_instance_that_helps() {
        let mut s = Scheduler::new(&hot_cold()).unwrap();
        let plan = s.plan_rebalance(&RebalanceParams::default()).unwrap();
        // 6/8 vs 0/8: one 2-vCPU move gives 4/8 vs 2/8.
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(plan.moves[0].instance, "tiny");
        assert_eq!(plan.moves[0].to, "cold");
        assert!((plan.imbalance_before - 0.375).abs() < 1e-12);
        assert!((plan.imbalance_after - 0.125).abs() < 1e-12);
        assert!((plan.moves[0].expected_gain - 0.25).abs() < 1e-12);
        assert_eq!(plan.stop, RebalanceStop::MigrationLimit);
        assert_eq!(
            plan.moves[0].reason,
            "hot CPU 75% -> 50%, cold 0% -> 25%; imbalance 0.3750 -> 0.1250"
        );
        // The state is unchanged.
        assert!((s.imbalance() - 0.375).abs() < 1e-12);
    }

    #[test]
    fn respects_hysteresis_pinning_and_limits() {
        let mut snap = hot_cold();
        snap.instances[1].pinned = true;
        let mut s = Scheduler::new(&snap).unwrap();
        let params = RebalanceParams {
            recently_moved: vec!["tiny".into()],
            max_migrations_per_node: 4,
            ..RebalanceParams::default()
        };
        let plan = s.plan_rebalance(&params).unwrap();
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(plan.moves[0].instance, "big");
        // Nothing else may move: pinned, recently moved.
        assert_eq!(plan.stop, RebalanceStop::NoImprovingMove);
    }

    #[test]
    fn never_moves_to_a_draining_node_or_breaks_anti_affinity() {
        let mut snap = hot_cold();
        snap.nodes[1].state = NodeState::Draining;
        let mut s = Scheduler::new(&snap).unwrap();
        let plan = s.plan_rebalance(&RebalanceParams::default()).unwrap();
        assert!(plan.moves.is_empty());
        assert_eq!(plan.stop, RebalanceStop::NothingToBalance);

        let mut snap = hot_cold();
        snap.nodes.push(node("cold2", "z", 8, 65536, 1000));
        snap.groups.push(crate::model::ServerGroup {
            id: "g".into(),
            policy: crate::model::GroupPolicy::AntiAffinity,
            max_per_node: None,
        });
        snap.instances.push(Instance {
            groups: vec!["g".into()],
            ..instance("member", "cold", 1, 1024, 1)
        });
        snap.instances[2].groups = vec!["g".into()];
        let mut s = Scheduler::new(&snap).unwrap();
        let plan = s.plan_rebalance(&RebalanceParams::default()).unwrap();
        let tiny = plan.moves.iter().find(|m| m.instance == "tiny");
        assert!(tiny.is_none_or(|m| m.to == "cold2"), "{plan:?}");
    }

    #[test]
    fn rejects_bad_params() {
        let mut s = Scheduler::new(&hot_cold()).unwrap();
        let bad = RebalanceParams {
            bandwidth_mib_s: 0.0,
            ..RebalanceParams::default()
        };
        assert!(matches!(
            s.plan_rebalance(&bad),
            Err(RebalanceError::InvalidParam {
                name: "bandwidth_mib_s",
                ..
            })
        ));
    }
}
