//! Property tests over synthetic clusters: no plan overcommits a node or
//! breaks a group, zone or label rule; a batch places exactly as its
//! instances would one by one; a rebalance plan never increases the
//! imbalance; plans are deterministic.

use nephele_scheduler::testing::{self, ClusterSpec};
use nephele_scheduler::{
    ClusterSnapshot, ConsolidateParams, DrainParams, Explain, NodeState, PlaceError,
    PlacementRequest, RebalanceParams, Scheduler, check,
};
use proptest::prelude::*;

fn cluster(nodes: usize, instances: usize, seed: u64) -> ClusterSnapshot {
    let spec = ClusterSpec {
        anti_affinity_groups: 1 + instances / 10,
        affinity_groups: 1 + instances / 40,
        soft_groups: 1 + instances / 20,
        unavailable_fraction: 0.1,
        hot_fraction: 0.2,
        pinned_fraction: 0.05,
        ..ClusterSpec::new(nodes, instances, seed)
    };
    testing::generate(&spec)
}

/// 32 cases each by default (the crate's tests stay fast); set
/// `PROPTEST_CASES` for a longer run.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(32);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The nodes of a plan's placements, or the index that failed.
fn outcome(
    result: Result<nephele_scheduler::PlacementPlan, PlaceError>,
) -> Result<Vec<String>, u32> {
    match result {
        Ok(plan) => Ok(plan.placements.into_iter().map(|p| p.node).collect()),
        Err(PlaceError::NoValidHost(n)) => Err(n.index),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn placements_never_break_rules(
        seed in any::<u64>(),
        nodes in 2usize..20,
        fill in 0usize..150,
        requests in 1usize..30,
    ) {
        let mut snap = cluster(nodes, fill, seed);
        testing::verify(&snap).unwrap();
        let mut s = Scheduler::new(&snap).unwrap();
        let groups: Vec<String> = snap.groups.iter().map(|g| g.id.clone()).collect();
        for (k, mut r) in testing::requests(&snap, requests, seed ^ 1).into_iter().enumerate() {
            r.count = 1 + u32::try_from(k % 4).unwrap();
            // Every third request joins a group of any policy (hard and
            // soft affinity and anti-affinity, empty or not).
            if k % 3 == 0 && !groups.is_empty() {
                r.group = Some(groups[(usize::try_from(seed % 1024).unwrap() ^ k) % groups.len()].clone());
            }
            match s.place(&r, Explain::Summary) {
                Ok(plan) => {
                    prop_assert_eq!(plan.placements.len(), r.count as usize);
                    check::check_placement_against(&plan, &snap).unwrap();
                    snap = testing::apply_placements(&snap, &plan);
                    s.commit_placement(&plan).unwrap();
                    if let Err(e) = testing::verify(&snap) {
                        return Err(TestCaseError::fail(format!("{e} after {plan:?}")));
                    }
                }
                Err(PlaceError::NoValidHost(n)) => prop_assert!(n.reasons.iter().map(|r| r.nodes).sum::<u32>() == n.nodes),
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            }
        }
    }

    #[test]
    fn batch_equals_one_by_one(
        seed in any::<u64>(),
        nodes in 2usize..20,
        fill in 0usize..150,
        count in 1u32..12,
        grouped in any::<bool>(),
    ) {
        let snap = cluster(nodes, fill, seed);
        let mut r = testing::requests(&snap, 1, seed ^ 2).remove(0);
        r.count = count;
        if grouped {
            r.group = snap.groups.iter().find(|g| g.id.starts_with("anti")).map(|g| g.id.clone());
        }
        let mut batch = Scheduler::new(&snap).unwrap();
        let whole = outcome(batch.place(&r, Explain::Summary));

        let mut single = Scheduler::new(&snap).unwrap();
        let mut nodes_one_by_one = Vec::new();
        let mut failed_at = None;
        for j in 0..count {
            let one = PlacementRequest { count: 1, first_index: j, ..r.clone() };
            match single.place(&one, Explain::Summary) {
                Ok(plan) => {
                    single.commit_placement(&plan).unwrap();
                    nodes_one_by_one.push(plan.placements[0].node.clone());
                }
                Err(PlaceError::NoValidHost(_)) => {
                    failed_at = Some(j);
                    break;
                }
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            }
        }
        match (whole, failed_at) {
            (Ok(nodes), None) => prop_assert_eq!(nodes, nodes_one_by_one),
            (Err(at), Some(j)) => prop_assert_eq!(at, j),
            (whole, one) => return Err(TestCaseError::fail(format!("batch {whole:?}, one by one failed at {one:?}"))),
        }
    }

    #[test]
    fn rebalance_never_increases_imbalance_or_breaks_rules(
        seed in any::<u64>(),
        nodes in 2usize..30,
        fill in 0usize..200,
        per_node in 1u32..3,
    ) {
        let snap = cluster(nodes, fill, seed);
        let recent: Vec<String> = snap.instances.iter().step_by(7).map(|i| i.id.clone()).collect();
        let params = RebalanceParams {
            target_imbalance: 0.01,
            max_migrations: 40,
            max_migrations_per_node: per_node,
            recently_moved: recent.clone(),
            ..RebalanceParams::default()
        };
        let mut s = Scheduler::new(&snap).unwrap();
        let plan = s.plan_rebalance(&params).unwrap();
        let before = testing::imbalance(&snap);
        let after_snap = testing::apply_moves(&snap, &plan.moves);
        let after = testing::imbalance(&after_snap);
        prop_assert!(after <= before + 1e-9, "imbalance {before} -> {after}");
        prop_assert!((plan.imbalance_before - before).abs() < 1e-9);
        prop_assert!((plan.imbalance_after - after).abs() < 1e-9);
        testing::verify(&after_snap).map_err(TestCaseError::fail)?;
        check::check_moves_against(&plan.moves, &snap).unwrap();
        let mut per = std::collections::HashMap::new();
        for m in &plan.moves {
            prop_assert!(!recent.contains(&m.instance));
            let inst = snap.instances.iter().find(|i| i.id == m.instance).unwrap();
            prop_assert!(!inst.pinned);
            let to = snap.nodes.iter().find(|n| n.id == m.to).unwrap();
            prop_assert_eq!(to.state, NodeState::Up);
            prop_assert!(m.expected_gain > 0.0);
            *per.entry(m.from.clone()).or_insert(0u32) += 1;
            *per.entry(m.to.clone()).or_insert(0u32) += 1;
        }
        prop_assert!(per.values().all(|&c| c <= per_node));
        // Nothing changed: planning again gives the same plan.
        prop_assert_eq!(s.plan_rebalance(&params).unwrap(), plan);
    }

    #[test]
    fn consolidation_and_drain_keep_rules(
        seed in any::<u64>(),
        nodes in 2usize..20,
        fill in 0usize..120,
        pick in any::<usize>(),
    ) {
        let snap = cluster(nodes, fill, seed);
        let mut s = Scheduler::new(&snap).unwrap();
        let cons = s.plan_consolidation(&ConsolidateParams { max_nodes: 3, ..ConsolidateParams::default() }).unwrap();
        let after = testing::apply_moves(&snap, &cons.moves);
        testing::verify(&after).map_err(TestCaseError::fail)?;
        for node in &cons.nodes_to_empty {
            prop_assert!(after.instances.iter().all(|i| &i.node != node), "{node} not empty");
        }
        check::check_moves_against(&cons.moves, &snap).unwrap();

        let node = snap.nodes[pick % snap.nodes.len()].id.clone();
        let drain = s.plan_drain(&node, &DrainParams::default()).unwrap();
        let after = testing::apply_moves(&snap, &drain.moves);
        testing::verify(&after).map_err(TestCaseError::fail)?;
        let left = after.instances.iter().filter(|i| i.node == node).count();
        prop_assert_eq!(left, drain.blocked.len() + drain.leaving.len());
        check::check_moves_against(&drain.moves, &snap).unwrap();
    }

    #[test]
    fn plans_are_deterministic(
        seed in any::<u64>(),
        nodes in 2usize..25,
        fill in 0usize..150,
    ) {
        let snap = cluster(nodes, fill, seed);
        let copy = snap.clone();
        let mut a = Scheduler::new(&snap).unwrap();
        let mut b = Scheduler::new(&copy).unwrap();
        for mut r in testing::requests(&snap, 8, seed) {
            r.count = 3;
            let x = a.place(&r, Explain::Full);
            let y = b.place(&r, Explain::Full);
            prop_assert_eq!(&x, &y);
            if let Ok(plan) = x {
                a.commit_placement(&plan).unwrap();
                b.commit_placement(&plan).unwrap();
            }
        }
        let params = RebalanceParams::default();
        prop_assert_eq!(a.plan_rebalance(&params).unwrap(), b.plan_rebalance(&params).unwrap());
    }

    #[test]
    fn explain_level_does_not_change_decisions(
        seed in any::<u64>(),
        nodes in 2usize..25,
        fill in 0usize..150,
    ) {
        let snap = cluster(nodes, fill, seed);
        let mut s = Scheduler::new(&snap).unwrap();
        for r in testing::requests(&snap, 10, seed ^ 3) {
            let summary = s.place(&r, Explain::Summary);
            let full = s.place(&r, Explain::Full);
            match (summary, full) {
                (Ok(a), Ok(b)) => {
                    prop_assert_eq!(&a.placements[0].node, &b.placements[0].node);
                    prop_assert_eq!(&a.placements[0].filtered, &b.placements[0].filtered);
                    let counted: u32 = b.placements[0].filtered.iter().map(|c| c.nodes).sum();
                    prop_assert_eq!(counted as usize, b.placements[0].rejected.len());
                    // Every node the explanation rejects, "why not" rejects too.
                    for rej in &b.placements[0].rejected {
                        let why = s.explain_node(&r, &rej.node).unwrap();
                        prop_assert!(!why.eligible);
                    }
                    let why = s.explain_node(&r, &a.placements[0].node).unwrap();
                    prop_assert_eq!(why.rank, Some(1));
                }
                (Err(a), Err(b)) => {
                    let (PlaceError::NoValidHost(a), PlaceError::NoValidHost(b)) = (a, b) else {
                        return Err(TestCaseError::fail("unexpected error"));
                    };
                    prop_assert_eq!(&a.reasons, &b.reasons);
                    prop_assert_eq!(b.rejected.len(), b.nodes as usize);
                }
                (a, b) => return Err(TestCaseError::fail(format!("{a:?} vs {b:?}"))),
            }
        }
    }
}
