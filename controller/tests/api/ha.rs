//! High availability through the API: the HA flag, boot counts and reboot,
//! atomic batch creates, idempotent creates across a controller restart.

use nephele_proto::compute::v1 as compute;
use nephele_proto::iam::v1 as iam;
use nephele_proto::node::v1 as node;
use nephele_proto::ops::v1 as ops;
use tonic::Code;

use super::support::*;

fn ha_template() -> compute::Instance {
    compute::Instance {
        ha: true,
        ..instance_template("small", "")
    }
}

async fn get(c: &mut Clients, name: &str) -> anyhow::Result<compute::Instance> {
    Ok(c.instances
        .get_instance(compute::GetInstanceRequest { name: name.into() })
        .await?
        .into_inner())
}

async fn op_done(c: &mut Clients, name: &str) -> anyhow::Result<ops::Operation> {
    Ok(c.ops
        .wait_operation(ops::WaitOperationRequest {
            name: name.into(),
            timeout: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
        })
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_flag_boot_count_and_a_real_reboot() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let mut n1 = FakeNode::register(&env.admin, "n1", 8, 8192).await?;
    let _alive = n1.keep_alive();
    let web = "projects/p1/instances/web";
    create(&mut alice, "web", ha_template()).await?;
    wait_state(&mut alice, web, compute::InstanceState::Scheduled).await?;
    n1.converge().await?;
    let i = wait_state(&mut alice, web, compute::InstanceState::Running).await?;
    assert!(i.ha);
    assert_eq!(i.boot_count, 1);

    // Reboot: STARTING with a new boot count, RUNNING once that boot runs.
    let op = alice
        .instances
        .reboot_instance(compute::RebootInstanceRequest {
            name: web.into(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(op.verb, "reboot");
    let i = get(&mut alice, web).await?;
    assert_eq!(i.state, compute::InstanceState::Starting as i32);
    assert_eq!(i.boot_count, 2);
    // The node still reports the old boot running: not the reboot's end.
    let seen = n1
        .report(web, node::ReportedState::ReportedRunning, 1)
        .await?
        .expect("instance");
    assert_eq!(seen.state, compute::InstanceState::Starting as i32);
    assert!(!get_op(&mut alice, &op.name).await?.done);
    n1.report(web, node::ReportedState::ReportedRunning, 2)
        .await?;
    let done = op_done(&mut alice, &op.name).await?;
    assert!(done.done && done.error.is_empty(), "{done:?}");
    assert_eq!(
        get(&mut alice, web).await?.state,
        compute::InstanceState::Running as i32
    );

    // Stop keeps the count, start bumps it.
    alice
        .instances
        .stop_instance(compute::StopInstanceRequest {
            name: web.into(),
            timeout: None,
            request_id: String::new(),
        })
        .await?;
    n1.converge().await?;
    let i = wait_state(&mut alice, web, compute::InstanceState::Stopped).await?;
    assert_eq!(i.boot_count, 2);
    alice
        .instances
        .start_instance(compute::StartInstanceRequest {
            name: web.into(),
            request_id: String::new(),
        })
        .await?;
    assert_eq!(get(&mut alice, web).await?.boot_count, 3);
    n1.converge().await?;
    wait_state(&mut alice, web, compute::InstanceState::Running).await?;

    // The event log holds each change, with who did it.
    let events = events_of(&mut alice, web).await?;
    assert!(
        events
            .iter()
            .any(|e| e.actor == "users/alice" && e.message.contains("reboot requested")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.actor == "nodes/n1" && e.message.starts_with("STARTING -> RUNNING")),
        "{events:?}"
    );
    env.member.stop().await?;
    Ok(())
}

async fn get_op(c: &mut Clients, name: &str) -> anyhow::Result<ops::Operation> {
    Ok(c.ops
        .get_operation(ops::GetOperationRequest { name: name.into() })
        .await?
        .into_inner())
}

async fn usage(c: &mut Clients) -> anyhow::Result<iam::Project> {
    Ok(c.iam
        .get_project(iam::GetProjectRequest {
            name: "projects/p1".into(),
        })
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_creates_are_atomic_and_creates_idempotent_across_a_restart() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let _n1 = FakeNode::register(&env.admin, "n1", 8, 8192)
        .await?
        .keep_alive();
    let create = |id: &str, rid: &str| compute::CreateInstanceRequest {
        parent: "projects/p1".into(),
        instance_id: id.into(),
        instance: Some(ha_template()),
        request_id: rid.into(),
    };
    let batch = |count: u32, rid: &str| compute::BatchCreateInstancesRequest {
        parent: "projects/p1".into(),
        instance_id: "b".into(),
        count,
        instance: Some(instance_template("small", "")),
        request_id: rid.into(),
    };
    // b-2 exists: a batch b-1, b-2 is refused whole, b-1 is not created.
    alice.instances.create_instance(create("b-2", "")).await?;
    let before = usage(&mut alice).await?;
    assert_err(
        alice.instances.batch_create_instances(batch(2, "")).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    assert_err(
        alice
            .instances
            .get_instance(compute::GetInstanceRequest {
                name: "projects/p1/instances/b-1".into(),
            })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_eq!(usage(&mut alice).await?, before);
    // Refusals are in the audit trail: the state machine's (the name taken)
    // and the API's own checks (no node can take a huge instance).
    assert_err(
        alice
            .instances
            .create_instance(compute::CreateInstanceRequest {
                instance: Some(instance_template("huge", "")),
                ..create("big", "")
            })
            .await,
        Code::ResourceExhausted,
        "NO_VALID_HOST",
    );
    for (resource, why) in [
        ("projects/p1/instances", "already exists"),
        ("projects/p1/instances/big", "no"),
    ] {
        let events = events_of(&mut alice, resource).await?;
        assert!(
            events.iter().any(|e| e.kind == "request.refused"
                && e.actor == "users/alice"
                && e.message.contains(why)),
            "{resource}: {events:?}"
        );
    }
    assert_err(
        alice.instances.batch_create_instances(batch(0, "")).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_err(
        alice.instances.batch_create_instances(batch(101, "")).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );

    // An answered create survives a controller restart: the retry gets the
    // first operation back and creates nothing more.
    let first = alice
        .instances
        .create_instance(create("solo", "req-solo"))
        .await?
        .into_inner();
    let env = env.restart().await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let again = alice
        .instances
        .create_instance(create("solo", "req-solo"))
        .await?
        .into_inner();
    assert_eq!(first.name, again.name);
    let p = usage(&mut alice).await?;
    assert_eq!(p.usage.map(|u| u.instances), Some(2), "{p:?}");
    env.member.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_fenced_then_its_ha_instances_restart_elsewhere() -> anyhow::Result<()> {
    let mut options = test_options();
    // DOWN after 1.5 s of silence, fenced 0.8 s later.
    options.api.fence_lease = std::time::Duration::from_millis(800);
    let mut env = start_with(options).await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let mut n1 = FakeNode::register(&env.admin, "n1", 8, 8192).await?;
    let n1_alive = n1.keep_alive();
    let (ha, plain) = ("projects/p1/instances/ha", "projects/p1/instances/plain");
    for (id, template) in [
        ("ha", ha_template()),
        ("plain", instance_template("small", "")),
    ] {
        create(&mut alice, id, template).await?;
        wait_state(
            &mut alice,
            &format!("projects/p1/instances/{id}"),
            compute::InstanceState::Scheduled,
        )
        .await?;
    }
    n1.converge().await?;
    wait_state(&mut alice, ha, compute::InstanceState::Running).await?;
    wait_state(&mut alice, plain, compute::InstanceState::Running).await?;
    let n2 = FakeNode::register(&env.admin, "n2", 8, 8192).await?;
    let _n2_alive = n2.keep_alive();

    // n1 falls silent after one last heartbeat: the window counts from
    // when that was sent (the leader may answer it from memory, noting
    // the time it did, so no polling slack pads the window).
    n1_alive.abort();
    let silent_since = std::time::Instant::now();
    n1.heartbeat().await?;
    let failed = wait_state(&mut alice, plain, compute::InstanceState::Error).await?;
    assert_eq!(failed.reason, "node n1 is down");
    let moved = wait_state(&mut alice, ha, compute::InstanceState::Scheduled).await?;
    let waited = silent_since.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(2300),
        "restarted after {waited:?}, before node timeout + lease"
    );
    assert_eq!(moved.node, "nodes/n2");
    assert_eq!(moved.boot_count, 2);
    let events = events_of(&mut alice, ha).await?;
    assert!(
        events.iter().any(|e| e.kind == "instance.restarted"
            && e.message.starts_with("restarted: node n1 fenced")),
        "{events:?}"
    );

    // n1 comes back: it is told to hold only what is still placed on it
    // (the failed instance, to be stopped), not the restarted one.
    n1.heartbeat().await?;
    let a = n1
        .agent
        .get_assignments(node::WatchAssignmentsRequest {
            node: "nodes/n1".into(),
        })
        .await?
        .into_inner();
    let held: Vec<(String, i32)> = a
        .assignments
        .iter()
        .filter_map(|a| Some((a.instance.as_ref()?.name.clone(), a.desired)))
        .collect();
    assert_eq!(
        held,
        vec![(plain.to_owned(), node::DesiredState::DesiredStopped as i32)]
    );
    // A late report from n1 about the moved instance is refused.
    assert!(
        n1.report(ha, node::ReportedState::ReportedRunning, 1)
            .await
            .is_err()
    );
    env.member.stop().await?;
    Ok(())
}
