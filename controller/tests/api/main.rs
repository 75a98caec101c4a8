//! The public API end to end, in process: one raft member on a temp dir
//! serving the API on loopback, real gRPC clients with bearer tokens, and
//! fake compute nodes (`support::FakeNode`, test doubles that speak the node
//! protocol without any VM).
//!
//! - `main.rs`: tenants, lifecycle, isolation, errors, anti-affinity.
//! - `ha.rs`: HA flag, boot counts, reboot, fencing and restart elsewhere.
//! - `migration.rs`: migration assignments, progress, the switchover gate.
//! - `console.rs`: the console relay through an in-test `Agent` double.
//! - `audit.rs`: the audit trail, token revocation, the refusal budget.
//! - `authz_walk.rs`: every RPC of the authorization table through the
//!   real server, as admin, member and reader, on two projects.
//! - `join.rs`: node join tokens and the Join RPC signing node CSRs, node
//!   removal and revocation, the sealed CA in the replicated state.
//! - `limits.rs`: oversized requests.
//! - `images.rs`: image uploads checked against their manifest, served to
//!   nodes.
//! - `instances.rs`: stop timeouts, resizes against node capacity, image
//!   formats, list filters.

mod audit;
mod authz_walk;
#[path = "../common/mod.rs"]
mod common;
mod console;
mod ha;
mod images;
mod instances;
mod join;
mod limits;
mod migration;
mod support;

use std::time::Duration;

use nephele_proto::compute::v1 as compute;
use nephele_proto::iam::v1 as iam;
use nephele_proto::infra::v1 as infra;
use nephele_proto::ops::v1 as ops;
use tonic::Code;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_lifecycle_isolation_and_errors() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, bob_t, carol_t) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let mut bob = clients(&env.channel, Some(&bob_t));
    let mut carol = clients(&env.channel, Some(&carol_t));
    let mut nobody = clients(&env.channel, None);
    let mut forged = clients(&env.channel, Some("nph_alice_t1_0000"));

    // Without a node nothing fits: refused at once, nothing created.
    let create = |id: &str, flavor: &str, rid: &str| compute::CreateInstanceRequest {
        parent: "projects/p1".into(),
        instance_id: id.into(),
        instance: Some(instance_template(flavor, "")),
        request_id: rid.into(),
    };
    assert_err(
        alice
            .instances
            .create_instance(create("web-1", "small", ""))
            .await,
        Code::ResourceExhausted,
        "NO_VALID_HOST",
    );
    let mut n1 = FakeNode::register(&env.admin, "n1", 4, 4096).await?;
    let alive = n1.keep_alive();

    // Idempotent create.
    let op1 = alice
        .instances
        .create_instance(create("web-1", "small", "req-1"))
        .await?
        .into_inner();
    let op1_again = alice
        .instances
        .create_instance(create("web-1", "small", "req-1"))
        .await?
        .into_inner();
    assert_eq!(op1.name, op1_again.name);
    assert!(!op1.done);
    assert_err(
        alice
            .instances
            .create_instance(create("web-1", "small", ""))
            .await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    // Scheduled onto the fake node by the leader's loop, then "run" there.
    let web1 = wait_state(
        &mut alice,
        "projects/p1/instances/web-1",
        compute::InstanceState::Scheduled,
    )
    .await?;
    assert_eq!(web1.node, "nodes/n1");
    assert_eq!(n1.converge().await?, 1);
    let done = alice
        .ops
        .wait_operation(ops::WaitOperationRequest {
            name: op1.name.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
        })
        .await?
        .into_inner();
    assert!(done.done && done.error.is_empty(), "{done:?}");

    // Bad input.
    assert_err(
        alice
            .instances
            .create_instance(create("web-2", "nope", ""))
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_err(
        alice
            .instances
            .create_instance(create("Web_2", "small", ""))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_err(
        alice
            .instances
            .create_instance(create("web-2", "huge", ""))
            .await,
        Code::ResourceExhausted,
        "NO_VALID_HOST",
    );
    assert_err(
        alice
            .instances
            .create_instance(create("web-9", "small", "req-1"))
            .await,
        Code::InvalidArgument,
        "REQUEST_ID_REUSED",
    );

    // Quota: 3 instances. A batch of 3 more is refused whole.
    assert_err(
        alice
            .instances
            .batch_create_instances(compute::BatchCreateInstancesRequest {
                parent: "projects/p1".into(),
                instance_id: "batch".into(),
                count: 3,
                instance: Some(instance_template("small", "")),
                request_id: String::new(),
            })
            .await,
        Code::ResourceExhausted,
        "QUOTA_EXCEEDED",
    );
    let batch = alice
        .instances
        .batch_create_instances(compute::BatchCreateInstancesRequest {
            parent: "projects/p1".into(),
            instance_id: "batch".into(),
            count: 2,
            instance: Some(instance_template("small", "")),
            request_id: "req-batch".into(),
        })
        .await?
        .into_inner();
    assert_eq!(batch.operations.len(), 2);
    assert_err(
        alice
            .instances
            .create_instance(create("web-4", "small", ""))
            .await,
        Code::ResourceExhausted,
        "QUOTA_EXCEEDED",
    );
    // A retry of an answered request is not refused by the (now full) quota.
    let op1_third = alice
        .instances
        .create_instance(create("web-1", "small", "req-1"))
        .await?
        .into_inner();
    assert_eq!(op1_third.name, op1.name);

    // Pagination over the three instances, two per page.
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = bob
            .instances
            .list_instances(compute::ListInstancesRequest {
                parent: "projects/p1".into(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        pages += 1;
        names.extend(r.instances.into_iter().map(|i| i.name));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(pages, 2);
    assert_eq!(
        names,
        [
            "projects/p1/instances/batch-1",
            "projects/p1/instances/batch-2",
            "projects/p1/instances/web-1"
        ]
    );
    assert_err(
        bob.instances
            .list_instances(compute::ListInstancesRequest {
                parent: "projects/p1".into(),
                page_token: "not-a-token".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );

    // Isolation and roles.
    let get = |name: &str| compute::GetInstanceRequest { name: name.into() };
    assert_err(
        carol
            .instances
            .get_instance(get("projects/p1/instances/web-1"))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_err(
        carol
            .instances
            .list_instances(compute::ListInstancesRequest {
                parent: "projects/p1".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_err(
        carol
            .instances
            .delete_instance(compute::DeleteInstanceRequest {
                name: "projects/p1/instances/web-1".into(),
                request_id: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_err(
        carol
            .ops
            .get_operation(ops::GetOperationRequest {
                name: op1.name.clone(),
            })
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let carol_ops = carol
        .ops
        .list_operations(ops::ListOperationsRequest::default())
        .await?
        .into_inner();
    assert!(carol_ops.operations.is_empty(), "{carol_ops:?}");
    let carol_events = carol
        .events
        .list_events(ops::ListEventsRequest::default())
        .await?
        .into_inner();
    assert!(
        carol_events
            .events
            .iter()
            .all(|e| e.resource.starts_with("projects/p2")),
        "{carol_events:?}"
    );
    assert!(!carol_events.events.is_empty());
    let carol_projects = carol
        .iam
        .list_projects(iam::ListProjectsRequest::default())
        .await?
        .into_inner();
    assert_eq!(carol_projects.projects.len(), 1);
    assert_eq!(carol_projects.projects[0].name, "projects/p2");
    assert_err(
        bob.instances
            .create_instance(create("web-5", "small", ""))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    bob.instances
        .get_instance(get("projects/p1/instances/web-1"))
        .await?;
    assert_err(
        alice
            .nodes
            .list_nodes(infra::ListNodesRequest::default())
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_err(
        alice
            .flavors
            .create_flavor(compute::CreateFlavorRequest::default())
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_err(
        nobody
            .flavors
            .list_flavors(compute::ListFlavorsRequest::default())
            .await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    assert_err(
        forged
            .flavors
            .list_flavors(compute::ListFlavorsRequest::default())
            .await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    let me = alice
        .iam
        .get_caller(iam::GetCallerRequest {})
        .await?
        .into_inner();
    assert_eq!(me.name, "users/alice");
    assert_eq!(me.roles.len(), 1);

    // Stop, start, reboot through the fake node.
    let web = "projects/p1/instances/web-1";
    let stop = alice
        .instances
        .stop_instance(compute::StopInstanceRequest {
            name: web.into(),
            timeout: None,
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(stop.verb, "stop");
    n1.converge().await?;
    wait_state(&mut alice, web, compute::InstanceState::Stopped).await?;
    let resized = alice
        .instances
        .resize_instance(compute::ResizeInstanceRequest {
            name: web.into(),
            flavor: "flavors/small".into(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(resized.flavor, "flavors/small");
    assert_err(
        alice
            .instances
            .stop_instance(compute::StopInstanceRequest {
                name: web.into(),
                timeout: None,
                request_id: String::new(),
            })
            .await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    let start = alice
        .instances
        .start_instance(compute::StartInstanceRequest {
            name: web.into(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    n1.converge().await?;
    wait_state(&mut alice, web, compute::InstanceState::Running).await?;
    let start = alice
        .ops
        .get_operation(ops::GetOperationRequest { name: start.name })
        .await?
        .into_inner();
    assert!(start.done);

    // Delete: DELETING until the node releases it, then gone.
    let del = alice
        .instances
        .delete_instance(compute::DeleteInstanceRequest {
            name: web.into(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    n1.converge().await?;
    let del = alice
        .ops
        .wait_operation(ops::WaitOperationRequest {
            name: del.name,
            timeout: None,
        })
        .await?
        .into_inner();
    assert!(del.done);
    assert_err(
        alice.instances.get_instance(get(web)).await,
        Code::NotFound,
        "NOT_FOUND",
    );

    // The audit trail names who did what.
    let events = events_of(&mut alice, web).await?;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.contains(&"instance.created") && kinds.contains(&"instance.deleted"),
        "{kinds:?}"
    );
    assert!(events.iter().any(|e| e.actor == "users/alice"));
    assert!(
        events
            .iter()
            .any(|e| e.actor == "system" && e.kind == "instance.scheduled")
    );

    // Node liveness: heartbeats kept n1 up; silence marks it down.
    n1.heartbeat().await?;
    let n = env
        .admin
        .nodes
        .get_node(infra::GetNodeRequest {
            name: "nodes/n1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(n.state, infra::NodeState::Up as i32);
    assert_eq!(n.load.map(|l| l.running_vms), Some(1));
    alive.abort();
    let mut down = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = env
            .admin
            .nodes
            .get_node(infra::GetNodeRequest {
                name: "nodes/n1".into(),
            })
            .await?
            .into_inner();
        if n.state == infra::NodeState::Down as i32 {
            down = true;
            break;
        }
    }
    assert!(down, "n1 was never marked down");
    n1.heartbeat().await?;

    env.member.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_affinity_spreads_and_health_answers() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let _n1 = FakeNode::register(&env.admin, "n1", 8, 8192)
        .await?
        .keep_alive();
    let _n2 = FakeNode::register(&env.admin, "n2", 8, 8192)
        .await?
        .keep_alive();
    alice
        .groups
        .create_server_group(compute::CreateServerGroupRequest {
            parent: "projects/p1".into(),
            server_group_id: "web".into(),
            server_group: Some(compute::ServerGroup {
                policy: compute::GroupPolicy::AntiAffinity as i32,
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    alice
        .instances
        .batch_create_instances(compute::BatchCreateInstancesRequest {
            parent: "projects/p1".into(),
            instance_id: "web".into(),
            count: 2,
            instance: Some(instance_template("small", "projects/p1/serverGroups/web")),
            request_id: String::new(),
        })
        .await?;
    let a = wait_state(
        &mut alice,
        "projects/p1/instances/web-1",
        compute::InstanceState::Scheduled,
    )
    .await?;
    let b = wait_state(
        &mut alice,
        "projects/p1/instances/web-2",
        compute::InstanceState::Scheduled,
    )
    .await?;
    assert_ne!(a.node, b.node);
    // A third member has nowhere to go: the scheduler's reason is in the error.
    let err = alice
        .instances
        .create_instance(compute::CreateInstanceRequest {
            parent: "projects/p1".into(),
            instance_id: "web-3".into(),
            instance: Some(instance_template("small", "projects/p1/serverGroups/web")),
            request_id: String::new(),
        })
        .await
        .expect_err("no third node");
    assert_eq!(reason(&err), "NO_VALID_HOST");
    assert!(err.message().contains("anti-affinity"), "{}", err.message());

    let mut health = tonic_health::pb::health_client::HealthClient::new(env.channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "nephele.compute.v1.Instances".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    env.member.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_project_changes_the_limits_its_mask_names() -> anyhow::Result<()> {
    let mut env = start().await?;
    populate(&mut env.admin).await?;
    let update = |paths: &[&str], quota: iam::Quota| iam::UpdateProjectRequest {
        project: Some(iam::Project {
            name: "projects/p1".into(),
            quota: Some(quota),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    };
    // populate: 3 instances, 8 vCPUs, 1 TiB of memory, 100 GiB of disk.
    let p = env
        .admin
        .iam
        .update_project(update(
            &["quota.instances"],
            iam::Quota {
                instances: 50,
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    assert_eq!(
        p.quota,
        Some(iam::Quota {
            instances: 50,
            vcpus: 8,
            memory_mib: 1 << 30,
            disk_gib: 100,
        })
    );
    let p = env
        .admin
        .iam
        .update_project(update(
            &["quota.vcpus", "quota.disk_gib"],
            iam::Quota {
                instances: 1,
                vcpus: 12,
                memory_mib: 1,
                disk_gib: 40,
            },
        ))
        .await?
        .into_inner();
    assert_eq!(
        p.quota,
        Some(iam::Quota {
            instances: 50,
            vcpus: 12,
            memory_mib: 1 << 30,
            disk_gib: 40,
        })
    );
    // `quota` replaces every limit.
    let all = iam::Quota {
        instances: 4,
        vcpus: 5,
        memory_mib: 6,
        disk_gib: 7,
    };
    let p = env
        .admin
        .iam
        .update_project(update(&["quota"], all))
        .await?
        .into_inner();
    assert_eq!(p.quota, Some(all));
    for paths in [&[][..], &["display_name"], &["quota.cpus"]] {
        assert_err(
            env.admin.iam.update_project(update(paths, all)).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
    }
    env.member.stop().await?;
    Ok(())
}

/// A hard anti-affinity group allowing two members per node: four members
/// on two nodes go exactly two and two, and a fifth has nowhere to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_affinity_with_two_per_node_spreads_four_over_two_nodes() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    env.admin
        .iam
        .update_project(iam::UpdateProjectRequest {
            project: Some(iam::Project {
                name: "projects/p1".into(),
                quota: Some(iam::Quota {
                    instances: 10,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["quota.instances".into()],
            }),
        })
        .await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let _n1 = FakeNode::register(&env.admin, "n1", 8, 8192)
        .await?
        .keep_alive();
    let _n2 = FakeNode::register(&env.admin, "n2", 8, 8192)
        .await?
        .keep_alive();
    let group = |id: &str, policy: compute::GroupPolicy, max_per_node: u32| {
        compute::CreateServerGroupRequest {
            parent: "projects/p1".into(),
            server_group_id: id.into(),
            server_group: Some(compute::ServerGroup {
                policy: policy as i32,
                max_per_node,
                ..Default::default()
            }),
            request_id: String::new(),
        }
    };
    assert_err(
        alice
            .groups
            .create_server_group(group("together", compute::GroupPolicy::Affinity, 2))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let g = alice
        .groups
        .create_server_group(group("web", compute::GroupPolicy::AntiAffinity, 2))
        .await?
        .into_inner();
    assert_eq!(g.max_per_node, 2);
    let template = instance_template("small", "projects/p1/serverGroups/web");
    alice
        .instances
        .batch_create_instances(compute::BatchCreateInstancesRequest {
            parent: "projects/p1".into(),
            instance_id: "web".into(),
            count: 4,
            instance: Some(template.clone()),
            request_id: String::new(),
        })
        .await?;
    let mut per_node = std::collections::BTreeMap::new();
    for k in 1..=4 {
        let i = wait_state(
            &mut alice,
            &format!("projects/p1/instances/web-{k}"),
            compute::InstanceState::Scheduled,
        )
        .await?;
        *per_node.entry(i.node).or_insert(0) += 1;
    }
    assert_eq!(
        per_node.into_iter().collect::<Vec<_>>(),
        [("nodes/n1".to_owned(), 2), ("nodes/n2".to_owned(), 2)]
    );
    let err = create(&mut alice, "web-5", template)
        .await
        .expect_err("both nodes hold two members");
    let status = err.downcast_ref::<tonic::Status>().expect("a gRPC status");
    assert_eq!(reason(status), "NO_VALID_HOST");
    assert!(
        status.message().contains("anti-affinity"),
        "{}",
        status.message()
    );
    env.member.stop().await?;
    Ok(())
}
