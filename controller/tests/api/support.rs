//! What the API tests share: one raft member on a temp dir serving the API
//! on loopback, real gRPC clients with bearer tokens, and `FakeNode`, a test
//! double for a compute node that speaks the node protocol and "runs"
//! whatever it is assigned, without any VM.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::Context as _;
use neph_controller::api::auth;
use neph_controller::server::{self, ControllerOptions, RunningController};

use super::common;
use nephele_proto::compute::v1 as compute;
use nephele_proto::iam::v1 as iam;
use nephele_proto::infra::v1 as infra;
use nephele_proto::node::v1 as node;
use nephele_proto::ops::v1 as ops;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Auth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.0 {
            r.metadata_mut().insert("authorization", h.clone());
        }
        Ok(r)
    }
}

pub type Svc = InterceptedService<Channel, Auth>;

pub struct Clients {
    pub iam: iam::iam_client::IamClient<Svc>,
    pub flavors: compute::flavors_client::FlavorsClient<Svc>,
    pub images: compute::images_client::ImagesClient<Svc>,
    pub instances: compute::instances_client::InstancesClient<Svc>,
    pub groups: compute::server_groups_client::ServerGroupsClient<Svc>,
    pub nodes: infra::nodes_client::NodesClient<Svc>,
    pub ops: ops::operations_client::OperationsClient<Svc>,
    pub events: ops::events_client::EventsClient<Svc>,
    pub agent: node::node_agent_client::NodeAgentClient<Svc>,
    pub migrations: infra::migrations_client::MigrationsClient<Svc>,
}

pub fn clients(channel: &Channel, token: Option<&str>) -> Clients {
    let header = token.map(|t| format!("Bearer {t}").parse().expect("ascii"));
    let auth = || Auth(header.clone());
    let c = channel.clone();
    Clients {
        iam: iam::iam_client::IamClient::with_interceptor(c.clone(), auth()),
        flavors: compute::flavors_client::FlavorsClient::with_interceptor(c.clone(), auth()),
        images: compute::images_client::ImagesClient::with_interceptor(c.clone(), auth()),
        instances: compute::instances_client::InstancesClient::with_interceptor(c.clone(), auth()),
        groups: compute::server_groups_client::ServerGroupsClient::with_interceptor(
            c.clone(),
            auth(),
        ),
        nodes: infra::nodes_client::NodesClient::with_interceptor(c.clone(), auth()),
        ops: ops::operations_client::OperationsClient::with_interceptor(c.clone(), auth()),
        events: ops::events_client::EventsClient::with_interceptor(c.clone(), auth()),
        agent: node::node_agent_client::NodeAgentClient::with_interceptor(c.clone(), auth()),
        migrations: infra::migrations_client::MigrationsClient::with_interceptor(c, auth()),
    }
}

pub fn reason(s: &Status) -> String {
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

pub fn assert_err<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, want: &str) {
    match r {
        Ok(v) => panic!("expected {want}, got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert_eq!(reason(&s), want, "{s:?}");
        }
    }
}

pub struct Env {
    pub member: RunningController,
    pub _dir: tempfile::TempDir,
    pub channel: Channel,
    pub admin: Clients,
    pub token: String,
    pub options: ControllerOptions,
}

/// Test timings: nodes are DOWN after 1.5 s of silence.
pub fn test_options() -> ControllerOptions {
    let mut options = ControllerOptions::default();
    options.reconcile.node_timeout = Duration::from_millis(1500);
    options.reconcile.max_requeue = Duration::from_millis(200);
    options
}

pub async fn start() -> anyhow::Result<Env> {
    start_with(test_options()).await
}

async fn serve(
    dir: &std::path::Path,
    init: bool,
    options: ControllerOptions,
) -> anyhow::Result<RunningController> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut config = common::test_config(1, dir, Default::default());
    config.cluster_id = Some(7);
    config.init = init;
    Ok(server::start_with(config, listener, options).await?)
}

/// One fresh member with `options`, and an admin client.
pub async fn start_with(options: ControllerOptions) -> anyhow::Result<Env> {
    let dir = tempfile::tempdir()?;
    let member = serve(dir.path(), true, options.clone()).await?;
    let token = loop {
        match auth::bootstrap_admin(&member.store, 1, dir.path()).await {
            Ok(Some(t)) => break t,
            Ok(None) => anyhow::bail!("a token file already existed"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let file = std::fs::read_to_string(dir.path().join(auth::BOOTSTRAP_TOKEN_FILE))?;
    assert_eq!(file.trim(), token);
    Env::connect(member, dir, token, options).await
}

impl Env {
    /// Stops the member and starts it again from its data directory (on a
    /// new port), with new clients.
    pub async fn restart(self) -> anyhow::Result<Env> {
        let Env {
            member,
            _dir,
            token,
            options,
            ..
        } = self;
        member.stop().await?;
        let member = serve(_dir.path(), false, options.clone()).await?;
        Env::connect(member, _dir, token, options).await
    }

    /// Clients of `member`, as admin.
    async fn connect(
        member: RunningController,
        dir: tempfile::TempDir,
        token: String,
        options: ControllerOptions,
    ) -> anyhow::Result<Env> {
        let channel = Channel::from_shared(format!("http://{}", member.address))?
            .connect()
            .await?;
        let admin = clients(&channel, Some(&token));
        Ok(Env {
            member,
            _dir: dir,
            channel,
            admin,
            token,
            options,
        })
    }
}

/// A test double for a compute node: registers, and reports whatever the
/// controller assigns it as done (RUNNING, STOPPED, DELETED) at once.
pub struct FakeNode {
    pub name: String,
    pub agent: node::node_agent_client::NodeAgentClient<Svc>,
}

impl FakeNode {
    pub async fn register(
        c: &Clients,
        id: &str,
        vcpus: u64,
        memory_mib: u64,
    ) -> anyhow::Result<FakeNode> {
        // Nothing listens there: this node serves no `Agent`.
        Self::register_at(c, id, vcpus, memory_mib, "127.0.0.1:9").await
    }

    /// Registers with `address` as where its `Agent` service answers.
    pub async fn register_at(
        c: &Clients,
        id: &str,
        vcpus: u64,
        memory_mib: u64,
        address: &str,
    ) -> anyhow::Result<FakeNode> {
        let mut agent = c.agent.clone();
        let r = agent
            .register_node(node::RegisterNodeRequest {
                node_id: id.into(),
                address: address.into(),
                capacity: Some(compute::Resources {
                    vcpus,
                    memory_mib,
                    disk_gib: 100,
                }),
                labels: Default::default(),
            })
            .await?
            .into_inner();
        assert!(!r.controllers.unwrap_or_default().controllers.is_empty());
        Ok(FakeNode {
            name: format!("nodes/{id}"),
            agent,
        })
    }

    pub async fn heartbeat(&mut self) -> anyhow::Result<()> {
        self.agent
            .heartbeat(node::HeartbeatRequest {
                node: self.name.clone(),
                load: Some(infra::Load {
                    cpu_busy: 0.5,
                    memory_used_mib: 100,
                    running_vms: 1,
                }),
                instances: vec![],
            })
            .await?;
        Ok(())
    }

    /// Heartbeats every 100 ms until the handle is aborted.
    pub fn keep_alive(&self) -> tokio::task::JoinHandle<()> {
        let mut beat = FakeNode {
            name: self.name.clone(),
            agent: self.agent.clone(),
        };
        tokio::spawn(async move {
            loop {
                let _ = beat.heartbeat().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    /// Reports `state` of `instance` for boot `boot_count`.
    pub async fn report(
        &mut self,
        instance: &str,
        state: node::ReportedState,
        boot_count: u64,
    ) -> anyhow::Result<Option<compute::Instance>> {
        Ok(self
            .agent
            .report_instance_state(node::ReportInstanceStateRequest {
                node: self.name.clone(),
                instance: instance.into(),
                state: state as i32,
                reason: String::new(),
                boot_count,
            })
            .await?
            .into_inner()
            .instance)
    }

    /// Converges once: reports every assignment as done.
    pub async fn converge(&mut self) -> anyhow::Result<usize> {
        let a = self
            .agent
            .get_assignments(node::WatchAssignmentsRequest {
                node: self.name.clone(),
            })
            .await?
            .into_inner();
        let mut n = 0;
        for a in a.assignments {
            let i = a.instance.context("assignment without instance")?;
            let state = match node::DesiredState::try_from(a.desired)? {
                node::DesiredState::DesiredRunning
                    if i.state != compute::InstanceState::Running as i32 =>
                {
                    node::ReportedState::ReportedRunning
                }
                node::DesiredState::DesiredStopped
                    if i.state == compute::InstanceState::Stopping as i32 =>
                {
                    node::ReportedState::ReportedStopped
                }
                node::DesiredState::DesiredDeleted => node::ReportedState::ReportedDeleted,
                _ => continue,
            };
            self.report(&i.name, state, i.boot_count).await?;
            n += 1;
        }
        Ok(n)
    }
}

pub async fn wait_state(
    c: &mut Clients,
    name: &str,
    want: compute::InstanceState,
) -> anyhow::Result<compute::Instance> {
    for _ in 0..200 {
        let i = c
            .instances
            .get_instance(compute::GetInstanceRequest { name: name.into() })
            .await?
            .into_inner();
        if i.state == want as i32 {
            return Ok(i);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("{name} never reached {want:?}")
}

/// The events about `resource` that `c` may see.
pub async fn events_of(c: &mut Clients, resource: &str) -> anyhow::Result<Vec<ops::Event>> {
    Ok(c.events
        .list_events(ops::ListEventsRequest {
            resource: resource.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events)
}

/// Creates `projects/p1/instances/{id}` from `template`.
pub async fn create(
    c: &mut Clients,
    id: &str,
    template: compute::Instance,
) -> anyhow::Result<ops::Operation> {
    Ok(c.instances
        .create_instance(compute::CreateInstanceRequest {
            parent: "projects/p1".into(),
            instance_id: id.into(),
            instance: Some(template),
            request_id: String::new(),
        })
        .await?
        .into_inner())
}

pub fn instance_template(flavor: &str, group: &str) -> compute::Instance {
    compute::Instance {
        flavor: format!("flavors/{flavor}"),
        image: "images/guest".into(),
        server_group: group.into(),
        ..Default::default()
    }
}

/// Creates the cluster resources, projects p1 and p2, and users: alice
/// (member of p1), bob (reader of p1), carol (member of p2). Returns their
/// tokens.
pub async fn populate(c: &mut Clients) -> anyhow::Result<(String, String, String)> {
    for (id, vcpus, mem) in [("small", 1, 256), ("huge", 4, 1 << 20)] {
        c.flavors
            .create_flavor(compute::CreateFlavorRequest {
                flavor_id: id.into(),
                flavor: Some(compute::Flavor {
                    name: String::new(),
                    resources: Some(compute::Resources {
                        vcpus,
                        memory_mib: mem,
                        disk_gib: 1,
                    }),
                }),
                request_id: String::new(),
            })
            .await?;
    }
    c.images
        .create_image(compute::CreateImageRequest {
            image_id: "guest".into(),
            image: Some(compute::Image {
                format: "pvh-elf".into(),
                size_bytes: 4096,
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    for p in ["p1", "p2"] {
        c.iam
            .create_project(iam::CreateProjectRequest {
                project_id: p.into(),
                project: Some(iam::Project {
                    quota: Some(iam::Quota {
                        instances: 3,
                        vcpus: 8,
                        memory_mib: 1 << 30,
                        disk_gib: 100,
                    }),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await?;
    }
    let mut tokens = Vec::new();
    for (user, project, role) in [
        ("alice", "p1", iam::Role::Member),
        ("bob", "p1", iam::Role::Reader),
        ("carol", "p2", iam::Role::Member),
    ] {
        c.iam
            .create_user(iam::CreateUserRequest {
                user_id: user.into(),
                user: None,
                request_id: String::new(),
            })
            .await?;
        c.iam
            .set_role(iam::SetRoleRequest {
                user: format!("users/{user}"),
                project: format!("projects/{project}"),
                role: role as i32,
            })
            .await?;
        let t = c
            .iam
            .create_token(iam::CreateTokenRequest {
                parent: format!("users/{user}"),
                token_id: "t1".into(),
                token: None,
            })
            .await?
            .into_inner();
        tokens.push(t.secret);
    }
    let mut it = tokens.into_iter();
    Ok((
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
    ))
}
