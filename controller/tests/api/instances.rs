//! Instance calls beyond the basic lifecycle: stop timeouts carried to the
//! node, resizes checked against the instance's node, image formats and
//! unknown images, list filters.

use std::time::Duration;

use nephele_proto::compute::v1 as compute;
use nephele_proto::node::v1 as node;
use tonic::Code;

use super::support::*;

/// The assignment of `instance` on `n`.
async fn assignment_of(n: &mut FakeNode, instance: &str) -> anyhow::Result<node::Assignment> {
    let set = n
        .agent
        .get_assignments(node::WatchAssignmentsRequest {
            node: n.name.clone(),
        })
        .await?
        .into_inner();
    set.assignments
        .into_iter()
        .find(|a| a.instance.as_ref().is_some_and(|i| i.name == instance))
        .ok_or_else(|| anyhow::anyhow!("{instance} is not assigned to {}", n.name))
}

fn stop(name: &str, timeout: Option<(i64, i32)>) -> compute::StopInstanceRequest {
    compute::StopInstanceRequest {
        name: name.into(),
        timeout: timeout.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
        request_id: String::new(),
    }
}

/// Creates `id` in p1 and has `n` run it.
async fn running(c: &mut Clients, n: &mut FakeNode, id: &str, flavor: &str) -> anyhow::Result<()> {
    create(c, id, instance_template(flavor, "")).await?;
    let name = format!("projects/p1/instances/{id}");
    wait_state(c, &name, compute::InstanceState::Scheduled).await?;
    n.converge().await?;
    wait_state(c, &name, compute::InstanceState::Running).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_carries_its_timeout_to_the_node() -> anyhow::Result<()> {
    let mut options = test_options();
    options.api.default_stop_timeout = Duration::from_secs(7);
    let mut env = start_with(options).await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let mut n1 = FakeNode::register(&env.admin, "n1", 4, 4096).await?;
    let _alive = n1.keep_alive();
    let web = "projects/p1/instances/web-1";
    running(&mut alice, &mut n1, "web-1", "small").await?;

    // Timeouts that can never be: refused, and the instance runs on.
    for bad in [(-1, 0), (3601, 0), (1, -5)] {
        assert_err(
            alice.instances.stop_instance(stop(web, Some(bad))).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
    }
    let a = assignment_of(&mut n1, web).await?;
    assert_eq!(a.desired, node::DesiredState::DesiredRunning as i32);

    // The stop's own timeout is what the node is told.
    alice
        .instances
        .stop_instance(stop(web, Some((2, 500_000_000))))
        .await?;
    let a = assignment_of(&mut n1, web).await?;
    assert_eq!(a.desired, node::DesiredState::DesiredStopped as i32);
    assert_eq!(
        a.stop_timeout,
        Some(prost_types::Duration {
            seconds: 2,
            nanos: 500_000_000
        })
    );
    n1.converge().await?;
    wait_state(&mut alice, web, compute::InstanceState::Stopped).await?;

    // Started again and stopped without one: the configured default.
    alice
        .instances
        .start_instance(compute::StartInstanceRequest {
            name: web.into(),
            request_id: String::new(),
        })
        .await?;
    n1.converge().await?;
    wait_state(&mut alice, web, compute::InstanceState::Running).await?;
    alice.instances.stop_instance(stop(web, None)).await?;
    let a = assignment_of(&mut n1, web).await?;
    assert_eq!(a.desired, node::DesiredState::DesiredStopped as i32);
    assert_eq!(
        a.stop_timeout,
        Some(prost_types::Duration {
            seconds: 7,
            nanos: 0
        })
    );
    env.member.stop().await?;
    Ok(())
}

async fn flavor(
    c: &mut Clients,
    id: &str,
    vcpus: u64,
    memory_mib: u64,
    disk_gib: u64,
) -> anyhow::Result<()> {
    c.flavors
        .create_flavor(compute::CreateFlavorRequest {
            flavor_id: id.into(),
            flavor: Some(compute::Flavor {
                name: String::new(),
                resources: Some(compute::Resources {
                    vcpus,
                    memory_mib,
                    disk_gib,
                }),
            }),
            request_id: String::new(),
        })
        .await?;
    Ok(())
}

fn resize(name: &str, flavor: &str) -> compute::ResizeInstanceRequest {
    compute::ResizeInstanceRequest {
        name: name.into(),
        flavor: format!("flavors/{flavor}"),
        request_id: String::new(),
    }
}

async fn allocated(c: &mut Clients, node: &str) -> anyhow::Result<compute::Resources> {
    Ok(c.nodes
        .get_node(nephele_proto::infra::v1::GetNodeRequest { name: node.into() })
        .await?
        .into_inner()
        .allocated
        .unwrap_or_default())
}

/// A stopped instance grows only within its node's capacity after the
/// scheduler's overcommit ratios (memory 1.5): n1 has 1024 MiB, so it may
/// hold 1536 MiB in all; and its disk never shrinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_must_fit_the_instances_node() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    flavor(&mut env.admin, "medium", 2, 1024, 4).await?;
    flavor(&mut env.admin, "big", 2, 1400, 4).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let mut n1 = FakeNode::register(&env.admin, "n1", 4, 1024).await?;
    let _alive = n1.keep_alive();
    running(&mut alice, &mut n1, "web-1", "small").await?;
    running(&mut alice, &mut n1, "web-2", "small").await?;
    let web = "projects/p1/instances/web-1";
    alice.instances.stop_instance(stop(web, None)).await?;
    n1.converge().await?;
    wait_state(&mut alice, web, compute::InstanceState::Stopped).await?;
    assert_eq!(allocated(&mut env.admin, "nodes/n1").await?.memory_mib, 512);

    // 256 + 1400 MiB > 1536: refused with the reason, nothing changes.
    let err = alice
        .instances
        .resize_instance(resize(web, "big"))
        .await
        .expect_err("big does not fit n1");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "NO_VALID_HOST");
    assert!(
        err.message().contains("nodes/n1") && err.message().contains("memory"),
        "{}",
        err.message()
    );
    assert_eq!(allocated(&mut env.admin, "nodes/n1").await?.memory_mib, 512);
    let i = alice
        .instances
        .get_instance(compute::GetInstanceRequest { name: web.into() })
        .await?
        .into_inner();
    assert_eq!(i.flavor, "flavors/small");

    // 256 + 1024 MiB fits: small -> medium, the node holds it.
    let i = alice
        .instances
        .resize_instance(resize(web, "medium"))
        .await?
        .into_inner();
    assert_eq!(i.flavor, "flavors/medium");
    assert_eq!(
        i.resources,
        Some(compute::Resources {
            vcpus: 2,
            memory_mib: 1024,
            disk_gib: 4
        })
    );
    let a = allocated(&mut env.admin, "nodes/n1").await?;
    assert_eq!((a.vcpus, a.memory_mib, a.disk_gib), (3, 1280, 5));
    // Back to small would shrink its disk: refused.
    assert_err(
        alice.instances.resize_instance(resize(web, "small")).await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    alice
        .instances
        .start_instance(compute::StartInstanceRequest {
            name: web.into(),
            request_id: String::new(),
        })
        .await?;
    n1.converge().await?;
    let i = wait_state(&mut alice, web, compute::InstanceState::Running).await?;
    assert_eq!(i.node, "nodes/n1");
    let a = assignment_of(&mut n1, web).await?;
    assert_eq!(
        a.instance.and_then(|i| i.resources).map(|r| r.memory_mib),
        Some(1024)
    );
    env.member.stop().await?;
    Ok(())
}

fn image(id: &str, format: &str) -> compute::CreateImageRequest {
    compute::CreateImageRequest {
        image_id: id.into(),
        image: Some(compute::Image {
            format: format.into(),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

/// Formats nodes cannot boot are refused when registered (so no instance
/// ends in ERROR at its node), and a create naming an unknown image is
/// refused whole, creating nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbootable_images_and_unknown_images_are_refused() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let _n1 = FakeNode::register(&env.admin, "n1", 4, 4096)
        .await?
        .keep_alive();

    let err = env
        .admin
        .images
        .create_image(image("cloud", "qcow2"))
        .await
        .expect_err("qcow2 is refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
    assert!(
        err.message().contains("qcow2 is not supported yet") && err.message().contains("raw"),
        "{}",
        err.message()
    );
    for format in ["", "vmdk"] {
        assert_err(
            env.admin.images.create_image(image("cloud", format)).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
    }
    let images = env
        .admin
        .images
        .list_images(compute::ListImagesRequest::default())
        .await?
        .into_inner()
        .images;
    assert_eq!(
        images.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["images/guest"]
    );
    env.admin.images.create_image(image("disk", "raw")).await?;

    // An unknown image: NOT_FOUND naming it, one instance or a batch, and
    // nothing is created or counted.
    let err = create(
        &mut alice,
        "web-1",
        compute::Instance {
            image: "images/nope".into(),
            ..instance_template("small", "")
        },
    )
    .await
    .expect_err("unknown image");
    let status = err.downcast_ref::<tonic::Status>().expect("a gRPC status");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(reason(status), "NOT_FOUND");
    assert!(status.message().contains("images/nope"), "{status:?}");
    assert_err(
        alice
            .instances
            .batch_create_instances(compute::BatchCreateInstancesRequest {
                parent: "projects/p1".into(),
                instance_id: "web".into(),
                count: 2,
                instance: Some(compute::Instance {
                    image: "images/nope".into(),
                    ..instance_template("small", "")
                }),
                request_id: String::new(),
            })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let listed = alice
        .instances
        .list_instances(compute::ListInstancesRequest {
            parent: "projects/p1".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .instances;
    assert!(listed.is_empty(), "{listed:?}");
    let p = env
        .admin
        .iam
        .get_project(nephele_proto::iam::v1::GetProjectRequest {
            name: "projects/p1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(p.usage.map(|u| u.instances), Some(0));
    let a = allocated(&mut env.admin, "nodes/n1").await?;
    assert_eq!(a, compute::Resources::default());
    env.member.stop().await?;
    Ok(())
}

/// The instance ids `c` lists with `r` (following every page).
async fn listed(c: &mut Clients, r: compute::ListInstancesRequest) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .instances
            .list_instances(compute::ListInstancesRequest {
                page_token: token.clone(),
                ..r.clone()
            })
            .await?
            .into_inner();
        out.extend(
            page.instances
                .iter()
                .map(|i| i.name.rsplit('/').next().unwrap_or_default().to_owned()),
        );
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

fn labels(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// ListInstances keeps what every given filter (state, node, labels) lets
/// through, page by page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_state_node_and_labels() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, _, _) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let (mut nodes, mut beats) = (Vec::new(), Vec::new());
    for id in ["n1", "n2"] {
        let n = FakeNode::register(&env.admin, id, 8, 8192).await?;
        beats.push(n.keep_alive());
        nodes.push(n);
    }
    for (id, l) in [
        ("a", &[("tier", "web"), ("env", "prod")][..]),
        ("b", &[("tier", "web"), ("env", "dev")]),
        ("c", &[("tier", "db")]),
    ] {
        create(
            &mut alice,
            id,
            compute::Instance {
                labels: labels(l),
                ..instance_template("small", "")
            },
        )
        .await?;
    }
    let mut on = std::collections::BTreeMap::<String, Vec<String>>::new();
    for id in ["a", "b", "c"] {
        let i = wait_state(
            &mut alice,
            &format!("projects/p1/instances/{id}"),
            compute::InstanceState::Scheduled,
        )
        .await?;
        on.entry(i.node).or_default().push(id.to_owned());
    }
    for n in &mut nodes {
        n.converge().await?;
    }
    let b = "projects/p1/instances/b";
    for id in ["a", "b", "c"] {
        wait_state(
            &mut alice,
            &format!("projects/p1/instances/{id}"),
            compute::InstanceState::Running,
        )
        .await?;
    }
    alice.instances.stop_instance(stop(b, None)).await?;
    for n in &mut nodes {
        n.converge().await?;
    }
    wait_state(&mut alice, b, compute::InstanceState::Stopped).await?;

    let base = compute::ListInstancesRequest {
        parent: "projects/p1".into(),
        page_size: 1,
        ..Default::default()
    };
    let state = |s: compute::InstanceState| compute::ListInstancesRequest {
        state: s as i32,
        ..base.clone()
    };
    assert_eq!(listed(&mut alice, base.clone()).await?, ["a", "b", "c"]);
    assert_eq!(
        listed(&mut alice, state(compute::InstanceState::Running)).await?,
        ["a", "c"]
    );
    assert_eq!(
        listed(&mut alice, state(compute::InstanceState::Stopped)).await?,
        ["b"]
    );
    assert!(
        listed(&mut alice, state(compute::InstanceState::Error))
            .await?
            .is_empty()
    );
    for node in ["nodes/n1", "nodes/n2"] {
        let want = on.get(node).cloned().unwrap_or_default();
        let got = listed(
            &mut alice,
            compute::ListInstancesRequest {
                node: node.into(),
                ..base.clone()
            },
        )
        .await?;
        assert_eq!(got, want, "on {node}");
    }
    assert!(
        listed(
            &mut alice,
            compute::ListInstancesRequest {
                node: "nodes/n9".into(),
                ..base.clone()
            }
        )
        .await?
        .is_empty()
    );
    let by = |l: &[(&str, &str)]| compute::ListInstancesRequest {
        labels: labels(l),
        ..base.clone()
    };
    assert_eq!(
        listed(&mut alice, by(&[("tier", "web")])).await?,
        ["a", "b"]
    );
    assert_eq!(
        listed(&mut alice, by(&[("tier", "web"), ("env", "prod")])).await?,
        ["a"]
    );
    assert!(
        listed(&mut alice, by(&[("tier", "cache")]))
            .await?
            .is_empty()
    );
    assert!(listed(&mut alice, by(&[("env", "")])).await?.is_empty());
    // Filters combine; an admin's view over every project filters too.
    assert_eq!(
        listed(
            &mut alice,
            compute::ListInstancesRequest {
                state: compute::InstanceState::Running as i32,
                ..by(&[("tier", "web")])
            }
        )
        .await?,
        ["a"]
    );
    assert_eq!(
        listed(
            &mut env.admin,
            compute::ListInstancesRequest {
                parent: "projects/-".into(),
                ..by(&[("tier", "db")])
            }
        )
        .await?,
        ["c"]
    );
    assert_err(
        alice
            .instances
            .list_instances(compute::ListInstancesRequest {
                state: 42,
                ..base.clone()
            })
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    env.member.stop().await?;
    Ok(())
}
