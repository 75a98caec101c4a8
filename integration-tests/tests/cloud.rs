//! The cloud end to end, as a tenant and an operator use it: real
//! `neph-controller` processes (3, Raft), real `neph-node` agents (2) that
//! boot the project's test guest with `neph-vmm`, driven by the `neph` CLI.
//! Each test skips with its reason where /dev/kvm is missing.
//!
//! - a hard anti-affinity group (two per node) spreads 4 instances 2 and 2
//!   and refuses a fifth; `node show`; console; stop, start, reboot,
//!   delete; kill -9 of an agent and re-adoption;
//! - the leader killed during a create: the same request id answers the
//!   create's own result after the failover, one instance, one VM;
//! - a whole node killed: its HA instance restarts on the other node once
//!   fenced, never two copies; its non-HA instance goes to ERROR;
//! - tenant isolation;
//! - an agent given one controller (the leader) carries on through the
//!   others when it is killed;
//! - an image uploaded from a local file reaches every controller, and
//!   boots on a node after the controller that took it is killed.

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
    // Hard anti-affinity, at most two members per node: four members on
    // two nodes can only go two and two.
    let g = cloud
        .neph(&[
            "group",
            "create",
            "web",
            "--policy",
            "anti-affinity",
            "--max-per-node",
            "2",
        ])
        .expect("create a group");
    assert_eq!(g["max_per_node"], 2, "{g}");
    let create = |id: &str| {
        cloud.neph_raw(
            &[
                "instance",
                "create",
                id,
                "--flavor",
                "small",
                "--image",
                "test-guest",
                "--group",
                "web",
            ],
            true,
        )
    };
    for k in 1..=4 {
        let (code, out, err) = create(&format!("web-{k}"));
        assert_eq!(code, 0, "create web-{k}: {out} {err}");
    }
    let mut per_node = std::collections::BTreeMap::<String, Vec<String>>::new();
    for k in 1..=4 {
        let i = cloud
            .wait_state(&format!("web-{k}"), "RUNNING", UP)
            .expect("instance runs");
        per_node
            .entry(i["node"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(format!("web-{k}"));
    }
    assert_eq!(
        per_node.values().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 2],
        "the group spreads 4 instances 2 and 2: {per_node:?}"
    );
    assert_eq!(running_vms(&cloud).len(), 4, "one neph-vmm per instance");
    // A fifth member has no node left.
    let (code, _, err) = create("web-5");
    assert_eq!(code, 1, "a fifth member was accepted: {err}");
    assert!(
        err.contains("NO_VALID_HOST") && err.contains("anti-affinity"),
        "{err}"
    );

    // `neph node show`: each node's instances by name, what they hold, and
    // the load it measures (2 VMs each).
    for (node, names) in &per_node {
        let want: Vec<String> = names
            .iter()
            .map(|n| format!("projects/demo/instances/{n}"))
            .collect();
        let shown = cloud
            .wait_for(&format!("{node} measured"), UP, |c| {
                let n = c.admin(&["node", "show", node])?;
                Ok((n["load"]["running_vms"] == 2)
                    .then(|| n.clone())
                    .ok_or(format!("{n}")))
            })
            .expect("node show");
        assert_eq!(shown["instances"], serde_json::json!(want), "{shown}");
        assert_eq!(shown["allocated"]["vcpus"], 2, "{shown}");
        assert_eq!(shown["allocated"]["memory_mib"], 256, "{shown}");
    }

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

/// `neph instance create ID --request-id RID` (as JSON on success).
fn create_args<'a>(id: &'a str, rid: &'a str) -> [&'a str; 9] {
    [
        "instance",
        "create",
        id,
        "--flavor",
        "small",
        "--image",
        "test-guest",
        "--request-id",
        rid,
    ]
}

/// The operation name in a create's JSON answer.
fn operation_name(out: &str) -> String {
    serde_json::from_str::<serde_json::Value>(out)
        .ok()
        .and_then(|v| v["name"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no operation in {out:?}"))
}

#[test]
fn leader_killed_during_a_create_starts_the_instance_once() {
    if skip_without_kvm() {
        return;
    }
    let cloud = Cloud::start(3, 2).expect("start the cloud");
    // A create answered before the failover...
    let (code, out, err) = cloud.neph_raw(&create_args("first", "create-first-1"), true);
    assert_eq!(code, 0, "{out} {err}");
    let first_op = operation_name(&out);
    let leader = cloud
        .controllers
        .wait_leader(Duration::from_secs(20))
        .expect("a leader");
    let leader_pid = cloud
        .controllers
        .members
        .iter()
        .find(|m| m.id == leader)
        .expect("leader member")
        .daemon
        .pid();
    // ...and one in flight while the leader is killed.
    let args = create_args("once", "create-once-1");
    let creating = std::thread::scope(|s| {
        let c = &cloud;
        let h = s.spawn(move || c.neph_raw(&args, true));
        std::thread::sleep(Duration::from_millis(30));
        kill9(leader_pid);
        h.join().expect("create thread")
    });
    eprintln!("first create attempt: {creating:?}");
    // The client retries with the same request id, as `neph` would: it
    // must get the create's own answer, never ALREADY_EXISTS (which would
    // mean the retry was taken for a second create).
    let retried = cloud
        .wait_for("the retried create", UP, |c| {
            let (code, out, err) = c.neph_raw(&args, true);
            assert!(
                !err.contains("ALREADY_EXISTS"),
                "a retry with the same request id was refused as a duplicate: {err}"
            );
            Ok(if code == 0 {
                Ok(operation_name(&out))
            } else {
                Err(format!("exit {code}: {out} {err}"))
            })
        })
        .expect("retry succeeds");
    if creating.0 == 0 {
        assert_eq!(
            operation_name(&creating.1),
            retried,
            "the retry answered another operation"
        );
    }
    // The create answered before the kill, asked again with its request
    // id after the failover: the first answer, not a second create.
    let (code, out, err) = cloud.neph_raw(&create_args("first", "create-first-1"), true);
    assert_eq!(code, 0, "retry of an answered create after failover: {err}");
    assert_eq!(operation_name(&out), first_op);
    for id in ["first", "once"] {
        cloud
            .wait_state(id, "RUNNING", UP)
            .expect("the instance runs");
    }
    std::thread::sleep(Duration::from_secs(3));
    let list = cloud.neph(&["instance", "list"]).expect("list");
    assert_eq!(items(&list, "instances").len(), 2, "two instances: {list}");
    assert_eq!(running_vms(&cloud).len(), 2, "exactly one VM each");
}

#[test]
fn ha_instance_restarts_elsewhere_once_its_node_is_fenced() {
    if skip_without_kvm() {
        return;
    }
    let mut cloud = Cloud::start(3, 2).expect("start the cloud");
    // Both instances on node-1 (node-2 takes none meanwhile), so the node
    // killed holds the non-HA one too.
    cloud
        .admin(&["node", "disable", "node-2"])
        .expect("disable node-2");
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
    for id in ["ha-1", "plain-1"] {
        let i = cloud.wait_state(id, "RUNNING", UP).expect("runs");
        assert_eq!(i["node"], "node-1", "{i}");
    }
    cloud
        .admin(&["node", "enable", "node-2"])
        .expect("enable node-2");
    cloud.kill_node(0);
    let killed_at = Instant::now();
    let moved = cloud
        .wait_for("ha-1 running on node-2", Duration::from_secs(90), |c| {
            // Never two copies: node-1's VMs are gone, so at most the
            // restarted ha-1 runs, on node-2.
            let copies = running_vms(c);
            assert!(copies.len() <= 1, "VMs after the kill: {copies:?}");
            let i = c.neph(&["instance", "get", "ha-1"])?;
            Ok(if i["state"] == "RUNNING" && i["node"] == "node-2" {
                Ok(i)
            } else {
                Err(format!("{} on {}", i["state"], i["node"]))
            })
        })
        .expect("the HA instance comes back");
    eprintln!(
        "ha-1 back on {} after {:?}",
        moved["node"],
        killed_at.elapsed()
    );
    assert!(cloud.vm_pids(0).is_empty());
    let vms = running_vms(&cloud);
    assert!(
        matches!(vms.as_slice(), [(1, _)]),
        "one VM, on node-2: {vms:?}"
    );
    // The non-HA instance of the dead node is not restarted: ERROR.
    let plain = cloud
        .wait_state("plain-1", "ERROR", Duration::from_secs(90))
        .expect("a non-HA instance on a dead node goes to ERROR");
    assert_eq!(plain["node"], "node-1", "{plain}");
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

/// An agent given only the leader's address learns the other controllers
/// from the answers; when that leader is killed, it carries on with the
/// others and the new leader: its heartbeats keep its node UP past the
/// node timeout, its VM is not fenced, and a new instance is assigned to
/// it, started and reported RUNNING.
#[test]
fn an_agent_given_one_controller_carries_on_with_the_others_and_the_new_leader() {
    if skip_without_kvm() {
        return;
    }
    const NODE_TIMEOUT_MS: u64 = 6000;
    let mut cloud = Cloud::start_with_env(
        3,
        0,
        &[("NEPHELE_NODE_TIMEOUT_MS", &NODE_TIMEOUT_MS.to_string())],
    )
    .expect("start the cloud");
    let leader = cloud
        .controllers
        .wait_leader(Duration::from_secs(20))
        .expect("a leader");
    let seed = cloud
        .controllers
        .members
        .iter()
        .find(|m| m.id == leader)
        .expect("leader member");
    let (seed_address, seed_pid) = (seed.address.clone(), seed.daemon.pid());
    cloud
        .add_node(std::slice::from_ref(&seed_address))
        .expect("node-1 joins through the leader alone");
    cloud
        .neph(&[
            "instance",
            "create",
            "before",
            "--flavor",
            "small",
            "--image",
            "test-guest",
        ])
        .expect("create");
    cloud
        .wait_state("before", "RUNNING", UP)
        .expect("runs on node-1");

    kill9(seed_pid);
    let new_leader = cloud
        .wait_for("a new leader", UP, |c| {
            let seen: Vec<u64> = c
                .controllers
                .members
                .iter()
                .filter(|m| m.id != leader)
                .map(|m| c.controllers.leader_seen_by(m))
                .collect();
            Ok(match seen.iter().find(|l| **l != 0 && **l != leader) {
                Some(l) => Ok(*l),
                None => Err(format!("leaders seen: {seen:?}")),
            })
        })
        .expect("the others elect a leader");
    eprintln!("controller {leader} killed, {new_leader} leads");

    // A new instance goes to node-1 (the only node): its agent must watch
    // and report through the surviving controllers.
    cloud
        .neph(&[
            "instance",
            "create",
            "after",
            "--flavor",
            "small",
            "--image",
            "test-guest",
        ])
        .expect("create after the kill");
    let after = cloud
        .wait_state("after", "RUNNING", UP)
        .expect("the agent runs what the new leader assigns");
    assert_eq!(after["node"], "node-1");
    console_round_trip(
        &cloud,
        "after",
        "echo after-failover",
        "ECHO after-failover",
    );

    // Heartbeats reach the new leader: well past the node timeout from
    // its election, node-1 is still UP and its first VM still answers
    // (neither marked down nor fenced).
    std::thread::sleep(Duration::from_millis(2 * NODE_TIMEOUT_MS));
    let n = cloud.admin(&["node", "get", "node-1"]).expect("node-1");
    assert_eq!(n["state"], "UP", "{n}");
    for id in ["before", "after"] {
        let i = cloud.neph(&["instance", "get", id]).expect("get");
        assert_eq!(i["state"], "RUNNING", "{i}");
    }
    console_round_trip(&cloud, "before", "echo still-running", "ECHO still-running");
    assert_eq!(running_vms(&cloud).len(), 2);
}

#[test]
fn an_uploaded_image_outlives_the_controller_that_took_it() {
    if skip_without_kvm() {
        return;
    }
    let cloud = Cloud::start(3, 1).expect("start the cloud");
    let guest = nephele_integration_tests::guest::guest_image();
    let kernel = guest.display().to_string();
    // `neph` goes to controller 1 first.
    let image = cloud
        .admin(&["image", "create", "uploaded", "--kernel", &kernel])
        .expect("upload");
    assert_eq!(image["state"], "ACTIVE", "{image}");
    assert_eq!(image["files"], "kernel", "{image}");
    let holds = |id: u64| {
        std::fs::read_dir(cloud.controllers.data_dir(id).join("images"))
            .map(|d| {
                d.flatten().any(|e| {
                    e.file_name().to_string_lossy().starts_with("uploaded-")
                        && e.path().join("kernel").is_file()
                })
            })
            .unwrap_or(false)
    };
    assert!(holds(1), "the controller that took the upload keeps it");
    cloud
        .wait_for("the content on every controller", UP, |_| {
            let held: Vec<u64> = (1..=3).filter(|&id| holds(id)).collect();
            Ok((held.len() == 3)
                .then_some(())
                .ok_or(format!("held by controllers {held:?}")))
        })
        .expect("every controller copies the content");
    for id in 1..=3 {
        let dir = cloud.controllers.data_dir(id).join("images");
        let copies: Vec<_> = std::fs::read_dir(&dir)
            .expect("images")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("uploaded-"))
            .collect();
        assert_eq!(copies.len(), 1, "controller {id} holds one copy");
        assert_eq!(
            std::fs::read(copies[0].path().join("kernel")).expect("copy"),
            std::fs::read(&guest).expect("guest"),
            "controller {id}'s copy"
        );
    }

    let first = cloud
        .controllers
        .members
        .iter()
        .find(|m| m.id == 1)
        .expect("controller 1");
    kill9(first.daemon.pid());
    // The node has never seen the image: it fetches it from the others.
    let fetched = cloud.image_dir.join("uploaded");
    assert!(!fetched.exists());
    cloud
        .neph(&[
            "instance", "create", "up-1", "--flavor", "small", "--image", "uploaded",
        ])
        .expect("create");
    cloud
        .wait_state("up-1", "RUNNING", UP)
        .expect("the instance of the uploaded image runs");
    assert_eq!(
        std::fs::read(fetched.join("kernel")).expect("fetched kernel"),
        std::fs::read(&guest).expect("guest")
    );
}
