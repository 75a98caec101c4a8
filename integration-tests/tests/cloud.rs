//! The cloud end to end, as a tenant and an operator use it: real
//! `neph-controller` processes (3, Raft), real `neph-node` agents (2) that
//! boot the project's test guest with `neph-vmm`, driven by the `neph` CLI.
//! Each test skips with its reason where /dev/kvm is missing.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nephele_integration_tests::cloud::{Cloud, alive, items, kill9};
use nephele_integration_tests::guest::skip_without_kvm;

const UP: Duration = Duration::from_secs(60);

fn running_vms(cloud: &Cloud) -> Vec<(usize, u32)> {
    (0..cloud.nodes.len())
        .flat_map(|i| cloud.vm_pids(i).into_iter().map(move |p| (i, p)))
        .collect()
}

/// Types `line` into the instance's console and returns what came back,
/// which must contain `expect`.
fn console_round_trip(cloud: &Cloud, instance: &str, line: &str, expect: &str) -> String {
    let (text, err) = cloud.console(instance, line);
    assert!(
        text.contains(expect),
        "console did not answer {expect:?}: stdout {text:?} stderr {err:?}"
    );
    text
}

#[test]
fn tenant_lifecycle_spread_console_and_agent_restart() {
    if skip_without_kvm() {
        return;
    }
    let mut cloud = Cloud::start(3, 2).expect("start the cloud");
    cloud
        .neph(&["group", "create", "web", "--policy", "soft-anti-affinity"])
        .expect("create a group");
    for k in 1..=4 {
        let id = format!("web-{k}");
        cloud
            .neph(&[
                "instance",
                "create",
                &id,
                "--flavor",
                "small",
                "--image",
                "test-guest",
                "--group",
                "web",
            ])
            .expect("create an instance");
    }
    let mut per_node = std::collections::BTreeMap::new();
    for k in 1..=4 {
        let i = cloud
            .wait_state(&format!("web-{k}"), "RUNNING", UP)
            .expect("instance runs");
        *per_node
            .entry(i["node"].as_str().unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        vec![2, 2],
        "soft anti-affinity spreads 4 instances 2 and 2: {per_node:?}"
    );
    assert_eq!(running_vms(&cloud).len(), 4, "one neph-vmm per instance");

    // The console: type a command, read its answer.
    console_round_trip(&cloud, "web-1", "echo hello-console", "ECHO hello-console");
    // The console log is raw text, whatever `-o` says.
    let (code, log, err) = cloud.neph_raw(&["instance", "console-log", "web-1"], true);
    assert_eq!(code, 0, "console-log failed: {err}");
    assert!(
        log.contains("NEPH-GUEST READY"),
        "the console log holds the boot: {log}"
    );

    // Stop, start, reboot, delete.
    let before: BTreeSet<u32> = running_vms(&cloud).into_iter().map(|(_, p)| p).collect();
    cloud
        .neph(&["instance", "stop", "web-2", "--wait"])
        .expect("stop");
    cloud.wait_state("web-2", "STOPPED", UP).expect("stopped");
    assert_eq!(
        running_vms(&cloud).len(),
        3,
        "the stopped VM's process is gone"
    );
    cloud
        .neph(&["instance", "start", "web-2", "--wait"])
        .expect("start");
    cloud
        .wait_state("web-2", "RUNNING", UP)
        .expect("running again");
    assert_eq!(running_vms(&cloud).len(), 4);
    let node3 = cloud.node_of("web-3").expect("node of web-3");
    let node3 = cloud
        .nodes
        .iter()
        .position(|n| n.id == node3)
        .expect("web-3 is on a known node");
    let pids3: BTreeSet<u32> = cloud.vm_pids(node3).into_iter().collect();
    cloud
        .neph(&["instance", "reboot", "web-3", "--wait"])
        .expect("reboot");
    cloud
        .wait_state("web-3", "RUNNING", UP)
        .expect("running after reboot");
    cloud
        .wait_for("web-3 booted again", UP, |c| {
            let now: BTreeSet<u32> = c.vm_pids(node3).into_iter().collect();
            Ok(if now.len() == pids3.len() && now != pids3 {
                Ok(())
            } else {
                Err(format!("pids before {pids3:?} now {now:?}"))
            })
        })
        .expect("reboot boots the guest again");
    cloud
        .neph(&["instance", "delete", "web-4", "--wait"])
        .expect("delete");
    cloud
        .wait_for("web-4 gone", UP, |c| {
            let list = c.neph(&["instance", "list"])?;
            let names: Vec<String> = items(&list, "instances")
                .iter()
                .map(|i| i["name"].as_str().unwrap_or_default().to_string())
                .collect();
            Ok(if names.iter().any(|n| n == "web-4") {
                Err(format!("still listed: {names:?}"))
            } else {
                Ok(())
            })
        })
        .expect("deleted");
    assert_eq!(
        running_vms(&cloud).len(),
        3,
        "the deleted VM's process is gone"
    );
    assert!(
        !before.is_empty(),
        "there were VMs before the lifecycle steps"
    );

    // kill -9 an agent: its VMs keep running; the restarted agent re-adopts
    // them (same processes, instances still RUNNING).
    let victim = 0;
    let pids: BTreeSet<u32> = cloud.vm_pids(victim).into_iter().collect();
    assert!(!pids.is_empty(), "node-1 runs VMs");
    cloud.kill_agent(victim);
    std::thread::sleep(Duration::from_secs(2));
    for p in &pids {
        assert!(alive(*p), "VM {p} died with its agent");
    }
    cloud.start_agent(victim).expect("restart the agent");
    std::thread::sleep(Duration::from_secs(5));
    let after: BTreeSet<u32> = cloud.vm_pids(victim).into_iter().collect();
    assert_eq!(after, pids, "the restarted agent kept the same VMs");
    for k in 1..=3 {
        cloud
            .wait_state(&format!("web-{k}"), "RUNNING", UP)
            .expect("still running after the agent restart");
    }
}

#[test]
fn leader_killed_during_a_create_starts_the_instance_once() {
    if skip_without_kvm() {
        return;
    }
    let cloud = Cloud::start(3, 2).expect("start the cloud");
    let leader = cloud
        .controllers
        .wait_leader(Duration::from_secs(20))
        .expect("a leader");
    let args = [
        "instance",
        "create",
        "once",
        "--flavor",
        "small",
        "--image",
        "test-guest",
        "--request-id",
        "create-once-1",
    ];
    let leader_pid = cloud
        .controllers
        .members
        .iter()
        .find(|m| m.id == leader)
        .expect("leader member")
        .daemon
        .pid();
    // Start the create and kill the leader while it is in flight.
    let creating = std::thread::scope(|s| {
        let c = &cloud;
        let h = s.spawn(move || c.neph_raw(&args, true));
        std::thread::sleep(Duration::from_millis(30));
        kill9(leader_pid);
        h.join().expect("create thread")
    });
    eprintln!("first create attempt: {creating:?}");
    // The client retries with the same request id, as `neph` would.
    cloud
        .wait_for("the retried create", UP, |c| {
            let (code, out, err) = c.neph_raw(&args, true);
            Ok(if code == 0 || err.contains("ALREADY_EXISTS") {
                Ok(())
            } else {
                Err(format!("exit {code}: {out} {err}"))
            })
        })
        .expect("retry succeeds");
    cloud
        .wait_state("once", "RUNNING", UP)
        .expect("the instance runs");
    std::thread::sleep(Duration::from_secs(3));
    let list = cloud.neph(&["instance", "list"]).expect("list");
    assert_eq!(items(&list, "instances").len(), 1, "one instance: {list}");
    assert_eq!(running_vms(&cloud).len(), 1, "exactly one VM runs");
}

#[test]
fn ha_instance_restarts_elsewhere_once_its_node_is_fenced() {
    if skip_without_kvm() {
        return;
    }
    let mut cloud = Cloud::start(3, 2).expect("start the cloud");
    for id in ["ha-1", "plain-1"] {
        let mut args = vec![
            "instance",
            "create",
            id,
            "--flavor",
            "small",
            "--image",
            "test-guest",
        ];
        if id.starts_with("ha") {
            args.push("--ha");
        }
        cloud.neph(&args).expect("create");
    }
    let first = cloud.wait_state("ha-1", "RUNNING", UP).expect("runs");
    let dead = first["node"].as_str().unwrap_or_default().to_string();
    let dead_i = cloud
        .nodes
        .iter()
        .position(|n| n.id == dead)
        .expect("known node");
    cloud.kill_node(dead_i);
    let killed_at = Instant::now();
    let moved = cloud
        .wait_for(
            "ha-1 running on the other node",
            Duration::from_secs(90),
            |c| {
                let i = c.neph(&["instance", "get", "ha-1"])?;
                // Never two copies: while it is away from the dead node, only the
                // survivor may run it.
                let copies = running_vms(c).len();
                if copies > 2 {
                    return Ok(Err(format!("{copies} VMs for 2 instances")));
                }
                Ok(if i["state"] == "RUNNING" && i["node"] != dead.as_str() {
                    Ok(i)
                } else {
                    Err(format!("{} on {}", i["state"], i["node"]))
                })
            },
        )
        .expect("the HA instance comes back");
    eprintln!(
        "ha-1 back on {} after {:?}",
        moved["node"],
        killed_at.elapsed()
    );
    assert!(cloud.vm_pids(dead_i).is_empty());
    let plain = cloud.neph(&["instance", "get", "plain-1"]).expect("get");
    if plain["node"] == dead.as_str() {
        assert_eq!(
            plain["state"], "ERROR",
            "a non-HA instance on a dead node: {plain}"
        );
    }
}

#[test]
fn a_tenant_cannot_reach_another_projects_instances() {
    if skip_without_kvm() {
        return;
    }
    let cloud = Cloud::start(3, 1).expect("start the cloud");
    cloud
        .neph(&[
            "instance",
            "create",
            "private",
            "--flavor",
            "small",
            "--image",
            "test-guest",
        ])
        .expect("create in demo");
    cloud
        .admin(&["project", "create", "other"])
        .expect("second project");
    cloud.admin(&["user", "create", "bob"]).expect("user");
    cloud
        .admin(&[
            "user",
            "grant",
            "bob",
            "--role",
            "member",
            "--project",
            "other",
        ])
        .expect("bob is a member of other");
    let token = cloud
        .admin(&["token", "create", "bob", "bob-cli"])
        .expect("token for bob");
    let secret = token["secret"].as_str().expect("the secret is shown once");
    // Bob works in his own project...
    let (code, out, err) = cloud.neph_as(
        Some(secret),
        &["--project", "other", "instance", "list"],
        false,
    );
    assert_eq!(code, 0, "bob lists his own project: {out} {err}");
    // ...and cannot list, read, change or delete demo's instance.
    for args in [
        &["--project", "demo", "instance", "list"][..],
        &["--project", "demo", "instance", "get", "private"],
        &["--project", "demo", "instance", "stop", "private"],
        &["--project", "demo", "instance", "delete", "private"],
        &["--project", "demo", "instance", "console-log", "private"],
    ] {
        let (code, out, err) = cloud.neph_as(Some(secret), args, false);
        assert_eq!(code, 1, "{args:?} must fail as an API error: {out} {err}");
        assert!(
            err.contains("PERMISSION_DENIED"),
            "{args:?} must be refused for permission: {err}"
        );
    }
    // A forged token is refused as unauthenticated.
    let (code, _, err) = cloud.neph_as(
        Some("neph_forged_0000"),
        &["--project", "other", "instance", "list"],
        false,
    );
    assert_eq!(code, 1);
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    let i = cloud
        .wait_state("private", "RUNNING", UP)
        .expect("demo's instance is untouched");
    assert_eq!(i["name"], "private");
}
