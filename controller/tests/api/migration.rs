//! Live migration through the node protocol: both nodes' assignments, the
//! target's address and the source's progress, and the switchover, which
//! is answered yes only from the source of a running migration and never
//! after a cancel.

use nephele_proto::compute::v1 as compute;
use nephele_proto::infra::v1 as infra;
use nephele_proto::node::v1 as node;
use tonic::Code;

use super::support::*;

async fn assignment(n: &mut FakeNode, instance: &str) -> anyhow::Result<Option<node::Assignment>> {
    let a = n
        .agent
        .get_assignments(node::WatchAssignmentsRequest {
            node: n.name.clone(),
        })
        .await?
        .into_inner();
    Ok(a.assignments
        .into_iter()
        .find(|a| a.instance.as_ref().is_some_and(|i| i.name == instance)))
}

async fn start_migration(
    env: &mut Env,
    instance: &str,
    to: &str,
    request_id: &str,
) -> anyhow::Result<String> {
    let op = env
        .admin
        .migrations
        .create_migration(infra::CreateMigrationRequest {
            instance: instance.into(),
            target: to.into(),
            request_id: request_id.into(),
            max_downtime_ms: 20,
        })
        .await?
        .into_inner();
    Ok(op.name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_progress_and_the_switchover_gate() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let mut n1 = FakeNode::register(&env.admin, "n1", 8, 8192).await?;
    let mut n2 = FakeNode::register(&env.admin, "n2", 8, 8192).await?;
    let _a1 = n1.keep_alive();
    let _a2 = n2.keep_alive();
    // Only n1 is up for scheduling at first, so web lands there.
    env.admin
        .nodes
        .disable_node(infra::DisableNodeRequest {
            name: "nodes/n2".into(),
        })
        .await?;
    let web = "projects/p1/instances/web";
    create(&mut alice, "web", instance_template("small", "")).await?;
    wait_state(&mut alice, web, compute::InstanceState::Scheduled).await?;
    n1.converge().await?;
    wait_state(&mut alice, web, compute::InstanceState::Running).await?;
    env.admin
        .nodes
        .enable_node(infra::EnableNodeRequest {
            name: "nodes/n2".into(),
        })
        .await?;

    // Left to the scheduler, the target is the only other node.
    let m = start_migration(&mut env, web, "", "m-1").await?;
    let i = wait_state(&mut alice, web, compute::InstanceState::Migrating).await?;
    assert_eq!(i.node, "nodes/n1");
    // The source is told its role, with no peer yet; the target gets the
    // instance to receive.
    let src = assignment(&mut n1, web).await?.expect("still on n1");
    let sm = src.migration.expect("source role");
    assert_eq!(sm.role, node::MigrationRole::MigrationSource as i32);
    assert_eq!((sm.peer_address.as_str(), sm.max_downtime_ms), ("", 20));
    let tgt = assignment(&mut n2, web).await?.expect("incoming on n2");
    let tm = tgt.migration.expect("target role");
    assert_eq!(tm.role, node::MigrationRole::MigrationTarget as i32);
    assert_eq!(tgt.desired, node::DesiredState::DesiredRunning as i32);

    // Switchover before the target listens: no.
    let no = n1
        .agent
        .request_switchover(node::RequestSwitchoverRequest {
            node: n1.name.clone(),
            migration: m.clone(),
            progress: None,
        })
        .await?
        .into_inner();
    assert!(!no.allowed, "{no:?}");

    n2.agent
        .report_migration(node::ReportMigrationRequest {
            node: n2.name.clone(),
            migration: m.clone(),
            target_address: "127.0.0.1:7000".into(),
            ..Default::default()
        })
        .await?;
    let src = assignment(&mut n1, web).await?.expect("still on n1");
    assert_eq!(src.migration.expect("role").peer_address, "127.0.0.1:7000");
    let got = n1
        .agent
        .report_migration(node::ReportMigrationRequest {
            node: n1.name.clone(),
            migration: m.clone(),
            progress: Some(node::MigrationProgress {
                round: 2,
                bytes_sent: 1 << 20,
                bytes_remaining: 4096,
                dirty_rate_bps: 100,
                throughput_bps: 1 << 30,
                expected_downtime_ms: 1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .migration
        .expect("migration");
    assert_eq!(got.state, infra::MigrationState::MigrationRunning as i32);
    assert_eq!((got.round, got.bytes_copied), (2, 1 << 20));

    // The target cannot switch it over; the source can, once.
    let r = n2
        .agent
        .request_switchover(node::RequestSwitchoverRequest {
            node: n2.name.clone(),
            migration: m.clone(),
            progress: None,
        })
        .await?
        .into_inner();
    assert!(!r.allowed);
    let yes = n1
        .agent
        .request_switchover(node::RequestSwitchoverRequest {
            node: n1.name.clone(),
            migration: m.clone(),
            progress: None,
        })
        .await?
        .into_inner();
    assert!(yes.allowed, "{yes:?}");
    // Decided, not moved: both nodes are told so, the instance is still
    // n1's, and the decision cannot be cancelled.
    let got = env
        .admin
        .migrations
        .get_migration(infra::GetMigrationRequest { name: m.clone() })
        .await?
        .into_inner();
    assert_eq!(got.state, infra::MigrationState::Switching as i32);
    for n in [&mut n1, &mut n2] {
        let a = assignment(n, web).await?.expect("assigned");
        let mig = a.migration.expect("still migrating");
        assert!(mig.decided && !mig.in_doubt, "{mig:?}");
    }
    assert_err(
        env.admin
            .migrations
            .cancel_migration(infra::CancelMigrationRequest { name: m.clone() })
            .await
            .map(drop),
        tonic::Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    // Asked again (an answer lost on the way): yes again.
    let again = n1
        .agent
        .request_switchover(node::RequestSwitchoverRequest {
            node: n1.name.clone(),
            migration: m.clone(),
            progress: None,
        })
        .await?
        .into_inner();
    assert!(again.allowed, "{again:?}");
    // The source heard nothing back: in doubt, and the target is told.
    // Only the source can be in doubt.
    let err = n2
        .agent
        .report_migration(node::ReportMigrationRequest {
            node: n2.name.clone(),
            migration: m.clone(),
            in_doubt: true,
            ..Default::default()
        })
        .await
        .expect_err("the target cannot be in doubt");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("only the source"), "{err:?}");
    n1.agent
        .report_migration(node::ReportMigrationRequest {
            node: n1.name.clone(),
            migration: m.clone(),
            in_doubt: true,
            reason: "no acknowledgement".into(),
            ..Default::default()
        })
        .await?;
    let a = assignment(&mut n2, web).await?.expect("assigned");
    assert!(a.migration.expect("migrating").in_doubt);
    // The target's agent found the VM there: completed, and it moves.
    n2.agent
        .report_migration(node::ReportMigrationRequest {
            node: n2.name.clone(),
            migration: m.clone(),
            completed: true,
            ..Default::default()
        })
        .await?;
    let i = wait_state(&mut alice, web, compute::InstanceState::Running).await?;
    assert_eq!(i.node, "nodes/n2");
    // The source's figures still land on the finished migration.
    n1.agent
        .report_migration(node::ReportMigrationRequest {
            node: n1.name.clone(),
            migration: m.clone(),
            completed: true,
            progress: Some(node::MigrationProgress {
                bytes_sent: 2 << 20,
                downtime_us: 1234,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    let got = env
        .admin
        .migrations
        .get_migration(infra::GetMigrationRequest { name: m.clone() })
        .await?
        .into_inner();
    assert_eq!(got.state, infra::MigrationState::Completed as i32);
    assert_eq!(
        (got.downtime_us, got.bytes_copied),
        (1234, 2 << 20),
        "{got:?}"
    );
    assert!(assignment(&mut n1, web).await?.is_none());
    assert!(
        assignment(&mut n2, web)
            .await?
            .expect("on n2")
            .migration
            .is_none()
    );

    // With n1 disabled, the scheduler has nowhere to take it, and says so.
    env.admin
        .nodes
        .disable_node(infra::DisableNodeRequest {
            name: "nodes/n1".into(),
        })
        .await?;
    assert_err(
        start_migration(&mut env, web, "", "m-none")
            .await
            .map_err(|e| {
                e.downcast::<tonic::Status>()
                    .unwrap_or_else(|e| tonic::Status::unknown(e.to_string()))
            }),
        tonic::Code::ResourceExhausted,
        "NO_VALID_HOST",
    );
    env.admin
        .nodes
        .enable_node(infra::EnableNodeRequest {
            name: "nodes/n1".into(),
        })
        .await?;

    // Back to n1, then the source reports it cancelled: no switchover.
    let m2 = start_migration(&mut env, web, "nodes/n1", "m-2").await?;
    n1.agent
        .report_migration(node::ReportMigrationRequest {
            node: n1.name.clone(),
            migration: m2.clone(),
            target_address: "127.0.0.1:7001".into(),
            ..Default::default()
        })
        .await?;
    n2.agent
        .report_migration(node::ReportMigrationRequest {
            node: n2.name.clone(),
            migration: m2.clone(),
            cancelled: true,
            reason: "asked".into(),
            ..Default::default()
        })
        .await?;
    let late = n2
        .agent
        .request_switchover(node::RequestSwitchoverRequest {
            node: n2.name.clone(),
            migration: m2.clone(),
            progress: None,
        })
        .await?
        .into_inner();
    assert!(!late.allowed);
    let i = wait_state(&mut alice, web, compute::InstanceState::Running).await?;
    assert_eq!(i.node, "nodes/n2");
    let mm = env
        .admin
        .migrations
        .get_migration(infra::GetMigrationRequest { name: m2 })
        .await?
        .into_inner();
    assert_eq!(mm.state, infra::MigrationState::Cancelled as i32);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_instances_a_few_at_a_time_with_their_reason() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, _, carol_t) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let mut n1 = FakeNode::register(&env.admin, "n1", 8, 8192).await?;
    let mut n2 = FakeNode::register(&env.admin, "n2", 8, 8192).await?;
    let _a1 = n1.keep_alive();
    let _a2 = n2.keep_alive();
    env.admin
        .nodes
        .disable_node(infra::DisableNodeRequest {
            name: "nodes/n2".into(),
        })
        .await?;
    for id in ["a", "b", "c"] {
        create(&mut alice, id, instance_template("small", "")).await?;
        wait_state(
            &mut alice,
            &format!("projects/p1/instances/{id}"),
            compute::InstanceState::Scheduled,
        )
        .await?;
    }
    n1.converge().await?;
    env.admin
        .nodes
        .enable_node(infra::EnableNodeRequest {
            name: "nodes/n2".into(),
        })
        .await?;

    let drained = env
        .admin
        .nodes
        .drain_node(infra::DrainNodeRequest {
            name: "nodes/n1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(drained.state, infra::NodeState::Draining as i32);
    let list = env.admin.migrations.clone();
    let migrations = move || {
        let mut c = list.clone();
        async move {
            Ok::<_, anyhow::Error>(
                c.list_migrations(infra::ListMigrationsRequest::default())
                    .await?
                    .into_inner()
                    .migrations,
            )
        }
    };
    // Two at a time (a node takes part in at most two moves at once):
    // the leader's drain loop starts two, then waits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while migrations().await?.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no drain moves");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let first = migrations().await?;
    assert_eq!(first.len(), 2, "{first:?}");
    for m in &first {
        assert_eq!(
            (m.source.as_str(), m.target.as_str()),
            ("nodes/n1", "nodes/n2")
        );
        assert!(m.cause.starts_with("drain of nodes/n1"), "{m:?}");
    }
    // One completes: the third instance's move starts.
    let m = first[0].name.clone();
    n2.agent
        .report_migration(node::ReportMigrationRequest {
            node: n2.name.clone(),
            migration: m.clone(),
            target_address: "127.0.0.1:7000".into(),
            ..Default::default()
        })
        .await?;
    let yes = n1
        .agent
        .request_switchover(node::RequestSwitchoverRequest {
            node: n1.name.clone(),
            migration: m.clone(),
            progress: None,
        })
        .await?
        .into_inner();
    assert!(yes.allowed, "{yes:?}");
    n2.agent
        .report_migration(node::ReportMigrationRequest {
            node: n2.name.clone(),
            migration: m.clone(),
            completed: true,
            ..Default::default()
        })
        .await?;
    while migrations().await?.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "no third drain move");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut moved: Vec<String> = migrations()
        .await?
        .into_iter()
        .map(|m| m.instance)
        .collect();
    moved.sort_unstable();
    assert_eq!(
        moved,
        [
            "projects/p1/instances/a",
            "projects/p1/instances/b",
            "projects/p1/instances/c"
        ]
    );
    // A drained node takes no new instance (carol's project has room).
    let mut carol = clients(&env.channel, Some(&carol_t));
    carol
        .instances
        .create_instance(compute::CreateInstanceRequest {
            parent: "projects/p2".into(),
            instance_id: "d".into(),
            instance: Some(instance_template("small", "")),
            request_id: String::new(),
        })
        .await?;
    let d = wait_state(
        &mut carol,
        "projects/p2/instances/d",
        compute::InstanceState::Scheduled,
    )
    .await?;
    assert_eq!(d.node, "nodes/n2");
    Ok(())
}
