//! Crate-level scenarios: what the controller leader does with the
//! scheduler, end to end, on snapshots read from JSON.

use nephele_scheduler::testing::{self, ClusterSpec};
use nephele_scheduler::{
    BuildStateError, CheckPlanError, ClusterSnapshot, DrainParams, Explain, PlaceError,
    PlacementPlan, PlacementRequest, Reason, RebalanceParams, Resources, Scheduler, check,
};

const SNAPSHOT: &str = r#"{
  "nodes": [
    {"id": "node-1", "zone": "a", "capacity": {"vcpus": 16, "memory_mib": 32768, "disk_gib": 500},
     "labels": {"disk": "ssd"}},
    {"id": "node-2", "zone": "a", "capacity": {"vcpus": 16, "memory_mib": 32768, "disk_gib": 500}},
    {"id": "node-3", "zone": "b", "capacity": {"vcpus": 16, "memory_mib": 16384, "disk_gib": 500},
     "overcommit": {"cpu": 4.0, "ram": 1.0, "disk": 1.0}},
    {"id": "node-4", "zone": "b", "state": "draining",
     "capacity": {"vcpus": 16, "memory_mib": 32768, "disk_gib": 500}}
  ],
  "instances": [
    {"id": "db-1", "node": "node-1", "resources": {"vcpus": 4, "memory_mib": 8192, "disk_gib": 100},
     "groups": ["db"], "measured_cpu": 3.5},
    {"id": "big", "node": "node-3", "resources": {"vcpus": 4, "memory_mib": 12288, "disk_gib": 50},
     "measured_cpu": 1.0}
  ],
  "groups": [{"id": "db", "policy": "anti-affinity"}]
}"#;

fn snapshot() -> ClusterSnapshot {
    serde_json::from_str(SNAPSHOT).expect("the scenario snapshot parses")
}

#[test]
fn why_not_node_3_and_no_valid_host_counts() {
    let mut s = Scheduler::new(&snapshot()).unwrap();
    let mut req = PlacementRequest::new("create-web", Resources::new(2, 8192, 20));
    req.group = Some("db".into());
    let why = s.explain_node(&req, "node-3").unwrap();
    assert!(!why.eligible);
    let reasons: Vec<&str> = why
        .verdicts
        .iter()
        .filter_map(|v| v.reason.as_deref())
        .collect();
    assert_eq!(
        reasons,
        vec!["memory: needs 8192 MiB, 4096 MiB free after ratio 1"]
    );
    let why = s.explain_node(&req, "node-1").unwrap();
    assert!(why.verdicts.iter().any(|v| v.reason.as_deref()
        == Some(
            "anti-affinity: node already runs 1 member(s) of group \"db\", at most 1 allowed"
        )));

    req.count = 2;
    let err = s.place(&req, Explain::Summary).unwrap_err();
    let PlaceError::NoValidHost(nvh) = err else {
        panic!("expected no valid host");
    };
    assert_eq!(nvh.index, 1);
    assert_eq!(nvh.placed, 1);
    assert_eq!(
        nvh.to_string(),
        "no valid host for instance 1 of request \"create-web\" among 4 nodes: \
         node draining on 1 node, memory exhausted on 1 node, \
         anti-affinity group member present on 2 nodes"
    );
    assert!(nvh.reasons.iter().any(|r| r.reason == Reason::AntiAffinity));
}

#[test]
fn plan_round_trips_through_json_and_is_rechecked_before_commit() {
    let snap = snapshot();
    let mut s = Scheduler::new(&snap).unwrap();
    let mut req = PlacementRequest::new("create-api", Resources::new(2, 4096, 20));
    req.labels.insert("disk".into(), "ssd".into());
    let plan = s.place(&req, Explain::Full).unwrap();
    assert_eq!(plan.placements[0].node, "node-1");
    let json = serde_json::to_string(&plan).unwrap();
    let back: PlacementPlan = serde_json::from_str(&json).unwrap();
    assert_eq!(back.placements[0].node, plan.placements[0].node);
    assert_eq!(back.placements[0].rejected.len(), 3);

    // Meanwhile another placement filled node-1.
    let mut newer = snap.clone();
    newer
        .instances
        .push(testing::instance("late", "node-1", 4, 40000, 10));
    let err = check::check_placement_against(&back, &newer).unwrap_err();
    assert!(matches!(
        err,
        CheckPlanError::PlacementRejected {
            filter: "resources",
            ..
        }
    ));
    check::check_placement_against(&back, &snap).unwrap();
    s.commit_placement(&back).unwrap();
}

#[test]
fn invalid_snapshots_are_refused_with_a_reason() {
    let bad = SNAPSHOT.replace("\"ram\": 1.0", "\"ram\": -1.0");
    let snap: ClusterSnapshot = serde_json::from_str(&bad).unwrap();
    let err = Scheduler::new(&snap).unwrap_err();
    assert!(matches!(
        err,
        BuildStateError::InvalidRatio { what: "ram", .. }
    ));
    assert_eq!(
        err.to_string(),
        "the ram overcommit ratio of node-3 must be above 0 and at most 1000, got -1"
    );
    let bad = SNAPSHOT.replace("\"measured_cpu\": 1.0", "\"measured_cpu\": 1e300");
    let snap: ClusterSnapshot = serde_json::from_str(&bad).unwrap();
    assert!(matches!(
        Scheduler::new(&snap),
        Err(BuildStateError::InvalidMeasurement { .. })
    ));
}

#[test]
fn drain_then_rebalance_on_a_generated_cluster() {
    let snap = testing::generate(&ClusterSpec::new(300, 3000, 11));
    let mut s = Scheduler::new(&snap).unwrap();
    let node = snap
        .nodes
        .iter()
        .find(|n| n.state == nephele_scheduler::NodeState::Up)
        .unwrap()
        .id
        .clone();
    let drain = s.plan_drain(&node, &DrainParams::default()).unwrap();
    let after = testing::apply_moves(&snap, &drain.moves);
    testing::verify(&after).unwrap();
    let left = after.instances.iter().filter(|i| i.node == node).count();
    assert_eq!(left, drain.blocked.len() + drain.leaving.len());
    for b in &drain.blocked {
        let inst = snap.instances.iter().find(|i| i.id == b.instance).unwrap();
        assert!(
            inst.pinned || b.reason.starts_with("no valid host"),
            "{b:?}"
        );
    }

    let plan = s
        .plan_rebalance(&RebalanceParams {
            max_migrations: 100,
            ..RebalanceParams::default()
        })
        .unwrap();
    assert!(!plan.moves.is_empty());
    assert!(plan.imbalance_after < plan.imbalance_before);
    let moved = testing::apply_moves(&snap, &plan.moves);
    testing::verify(&moved).unwrap();
    assert!((testing::imbalance(&moved) - plan.imbalance_after).abs() < 1e-9);
    // Sorted by the greedy order: each move's gain is reported.
    assert!(
        plan.moves
            .iter()
            .all(|m| m.expected_gain > 0.0 && m.cost_mib > 0.0)
    );
}
