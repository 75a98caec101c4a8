//! Automatic load balancing with real VMs: two busy test-guest VMs on one
//! node and an idle node. Once the imbalance has lasted the (shortened)
//! window, the leader moves one VM, says why in the migration's cause, and
//! then stops: the load is even, and no second move follows. Skips with
//! its reason where /dev/kvm is missing.

use std::time::Duration;

use nephele_integration_tests::cloud::{Cloud, items};
use nephele_integration_tests::guest::skip_without_kvm;

const UP: Duration = Duration::from_secs(60);

fn rebalance_moves(cloud: &Cloud) -> Vec<serde_json::Value> {
    let v = cloud
        .admin(&["migration", "list"])
        .expect("neph migration list");
    items(&v, "migrations")
        .iter()
        .filter(|m| {
            m["cause"]
                .as_str()
                .is_some_and(|c| c.starts_with("rebalance"))
        })
        .cloned()
        .collect()
}

#[test]
fn two_busy_vms_on_one_node_are_spread_once_then_the_balancer_stops() {
    if skip_without_kvm() {
        return;
    }
    let cloud = Cloud::start_with_env(
        1,
        2,
        &[
            ("NEPHELE_REBALANCE_THRESHOLD_PCT", "5"),
            ("NEPHELE_REBALANCE_WINDOW_MS", "3000"),
            ("NEPHELE_REBALANCE_COOLDOWN_MS", "2000"),
        ],
    )
    .expect("start the cloud");
    // Both on node-1: node-2 takes nothing until they run.
    cloud
        .admin(&["node", "disable", "node-2"])
        .expect("disable node-2");
    for id in ["busy-1", "busy-2"] {
        cloud
            .neph(&[
                "instance",
                "create",
                id,
                "--flavor",
                "small",
                "--image",
                "test-guest",
            ])
            .expect("create");
    }
    for id in ["busy-1", "busy-2"] {
        cloud.wait_state(id, "RUNNING", UP).expect("it runs");
        assert_eq!(cloud.node_of(id).expect("its node"), "node-1");
    }
    cloud
        .admin(&["node", "enable", "node-2"])
        .expect("enable node-2");
    assert!(
        rebalance_moves(&cloud).is_empty(),
        "idle VMs are left alone"
    );

    // Busy: each guest's vCPU dirties memory as fast as it can.
    for id in ["busy-1", "busy-2"] {
        let (out, err) = cloud.console(id, "dirty 16 0");
        assert!(out.contains("DIRTY OK"), "{id}: {out:?} {err:?}");
    }
    let moved = cloud
        .wait_for("a rebalance move completed", Duration::from_secs(90), |c| {
            let moves = rebalance_moves(c);
            Ok(match moves.iter().find(|m| m["state"] == "COMPLETED") {
                Some(m) => Ok(m.clone()),
                None => Err(format!("{moves:?}")),
            })
        })
        .expect("the balancer moves one VM");
    let cause = moved["cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("imbalance") && cause.contains("above"),
        "the move says why: {cause}"
    );
    assert_eq!(moved["source"], "node-1", "{moved}");
    assert_eq!(moved["target"], "node-2", "{moved}");
    let mut nodes: Vec<String> = ["busy-1", "busy-2"]
        .iter()
        .map(|id| cloud.node_of(id).expect("its node"))
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["node-1", "node-2"], "one VM per node");
    let events = cloud
        .admin(&["event", "list", "--page-size", "1000"])
        .expect("neph event list");
    assert!(
        items(&events, "events").iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("rebalance"))),
        "the move is an event that says why: {events}"
    );

    // Even now: several cooldowns and windows pass (the balancer plans
    // again after each) without a second move.
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(rebalance_moves(&cloud).len(), 1, "the balancer stops");
    for id in ["busy-1", "busy-2"] {
        let (out, _) = cloud.console(id, "dirty stop");
        assert!(out.contains("DIRTY OK"), "{id}: {out:?}");
    }
}
