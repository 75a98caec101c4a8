//! `nephele.infra.v1`: nodes, migrations and cluster status (admins only).

use nephele_proto::infra::v1 as pb;
use nephele_proto::infra::v1::cluster_server::Cluster;
use nephele_proto::infra::v1::migrations_server::Migrations;
use nephele_proto::infra::v1::nodes_server::Nodes;
use nephele_proto::ops::v1 as ops_pb;
use nephele_state::model::{InstanceState, Node as NodeModel, NodeState, State};
use nephele_state::names;
use nephele_state::{Command, Response};
use tonic::{Request, Response as Reply, Status};

use super::authz::Target;
use super::errors::ApiError;
use super::{Api, Page, convert, derived_id, request_id};
use crate::store::StateStore;

/// Where the scheduler would move `instance` if its node were drained:
/// the target of a migration the request left to the scheduler. The
/// placement filters and weighers decide (capacity, groups, node state),
/// with the instance's own node excluded.
fn pick_target(s: &State, instance: &str) -> Result<String, ApiError> {
    names::parse(instance, names::INSTANCE)?;
    let i = s
        .instances
        .get(instance)
        .ok_or_else(|| ApiError::not_found(instance))?;
    let node = i.node.clone().ok_or_else(|| {
        ApiError::FailedPrecondition(format!(
            "{instance} is on no node ({:?}); only a placed instance can move",
            i.state
        ))
    })?;
    let plan = drain_plan(s, &node)?;
    if let Some(m) = plan.moves.iter().find(|m| m.instance == instance) {
        return Ok(m.to.clone());
    }
    if let Some(b) = plan.blocked.iter().find(|b| b.instance == instance) {
        return Err(ApiError::NoValidHost(format!(
            "no node can take {instance} from {node}: {}; add capacity, enable a node, or name one with --to",
            b.reason
        )));
    }
    Err(ApiError::FailedPrecondition(format!(
        "{instance} is already migrating away from {node}"
    )))
}

/// The drain planner's plan for `node` over the whole cluster.
fn drain_plan(s: &State, node: &str) -> Result<nephele_scheduler::DrainPlan, ApiError> {
    let snap = crate::reconcile::snapshot(s);
    let mut scheduler =
        nephele_scheduler::Scheduler::new(&snap).map_err(|e| ApiError::Internal(e.to_string()))?;
    scheduler
        .plan_drain(node, &nephele_scheduler::DrainParams::default())
        .map_err(|e| ApiError::Internal(e.to_string()))
}

const NODES: &str = "/nephele.infra.v1.Nodes/";
const MIGRATIONS: &str = "/nephele.infra.v1.Migrations/";

fn node_instances(s: &State, node: &str) -> Vec<String> {
    s.instances_on(node).map(|i| i.name.clone()).collect()
}

impl<S: StateStore> Api<S> {
    fn load_of(&self, node: &str) -> Option<pb::Load> {
        self.inner
            .loads
            .lock()
            .ok()
            .and_then(|l| l.get(node).cloned())
    }

    /// `n` to the API, with the load and the newest heartbeat this
    /// controller answered from memory (newer than the recorded one, which
    /// is committed only every `heartbeat_commit_interval`).
    fn node_out(&self, n: &NodeModel, instances: Vec<String>) -> pb::Node {
        let mut n = n.clone();
        if let Some(b) = self.inner.beats.latest(&n.name) {
            n.last_heartbeat = n.last_heartbeat.max(b.wall_ms);
        }
        convert::node(&n, instances, self.load_of(&n.name))
    }

    async fn set_node_state(
        &self,
        actor: &super::auth::Caller,
        node: String,
        state: NodeState,
    ) -> Result<pb::Node, ApiError> {
        names::parse(&node, names::NODE)?;
        match self
            .propose_as(actor, None, Command::SetNodeState { node, state })
            .await?
        {
            Response::Node(n) => {
                let name = n.name.clone();
                let instances = self.read(move |s| node_instances(s, &name)).await?;
                Ok(self.node_out(&n, instances))
            }
            other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
        }
    }
}

#[tonic::async_trait]
impl<S: StateStore> Nodes for Api<S> {
    async fn get_node(&self, req: Request<pb::GetNodeRequest>) -> Result<Reply<pb::Node>, Status> {
        self.authorize(&req, &format!("{NODES}GetNode"), Target::Cluster)
            .await?;
        let name = req.into_inner().name;
        let (n, instances) = self
            .read_try(move |s| {
                let n = s
                    .nodes
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| ApiError::not_found(&name))?;
                Ok((n, node_instances(s, &name)))
            })
            .await?;
        Ok(Reply::new(self.node_out(&n, instances)))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Reply<pb::ListNodesResponse>, Status> {
        self.authorize(&req, &format!("{NODES}ListNodes"), Target::Cluster)
            .await?;
        let r = req.into_inner();
        let page = Page::parse(r.page_size, &r.page_token)?;
        let want = r.state;
        let (nodes, next_page_token) = self
            .read(move |s| {
                page.take(&s.nodes, "nodes/", |n| {
                    (want == 0 || convert::node_state(n.state) as i32 == want)
                        .then(|| (n.clone(), node_instances(s, &n.name)))
                })
            })
            .await?;
        let nodes = nodes
            .into_iter()
            .map(|(n, inst)| self.node_out(&n, inst))
            .collect();
        Ok(Reply::new(pb::ListNodesResponse {
            nodes,
            next_page_token,
        }))
    }

    async fn disable_node(
        &self,
        req: Request<pb::DisableNodeRequest>,
    ) -> Result<Reply<pb::Node>, Status> {
        let c = self
            .authorize(&req, &format!("{NODES}DisableNode"), Target::Cluster)
            .await?;
        let n = self
            .set_node_state(&c, req.into_inner().name, NodeState::Disabled)
            .await?;
        Ok(Reply::new(n))
    }

    async fn enable_node(
        &self,
        req: Request<pb::EnableNodeRequest>,
    ) -> Result<Reply<pb::Node>, Status> {
        let c = self
            .authorize(&req, &format!("{NODES}EnableNode"), Target::Cluster)
            .await?;
        let name = req.into_inner().name;
        let down = {
            let name = name.clone();
            self.read(move |s| s.nodes.get(&name).map(|n| n.state == NodeState::Down))
                .await?
        };
        if down == Some(true) {
            return Err(ApiError::FailedPrecondition(format!(
                "{name} is down; it comes back up by itself when its agent heartbeats again"
            ))
            .into());
        }
        let n = self.set_node_state(&c, name, NodeState::Up).await?;
        Ok(Reply::new(n))
    }

    async fn drain_node(
        &self,
        req: Request<pb::DrainNodeRequest>,
    ) -> Result<Reply<pb::Node>, Status> {
        let c = self
            .authorize(&req, &format!("{NODES}DrainNode"), Target::Cluster)
            .await?;
        let name = req.into_inner().name;
        // The leader's drain loop moves the instances off, a few at a
        // time (`crate::reconcile::drain_pass`).
        let n = self.set_node_state(&c, name, NodeState::Draining).await?;
        Ok(Reply::new(n))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Reply<pb::JoinToken>, Status> {
        let c = self
            .authorize(&req, &format!("{NODES}CreateJoinToken"), Target::Cluster)
            .await?;
        let r = req.into_inner();
        let t = self.issue_join_token(&c, r.ttl, r.node_id).await?;
        Ok(Reply::new(t))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Reply<pb::RemoveNodeResponse>, Status> {
        let c = self
            .authorize(&req, &format!("{NODES}RemoveNode"), Target::Cluster)
            .await?;
        let node = req.into_inner().name;
        names::parse(&node, names::NODE).map_err(ApiError::from)?;
        self.propose_as(&c, None, Command::RemoveNode { node: node.clone() })
            .await?;
        // This controller refuses the node from now on; the others as
        // soon as they apply the removal (`revocation::keep_current`).
        if !super::revocation::refresh(self.store(), self.revocations()).await {
            tracing::warn!(%node, "removed, but the revocation set is not refreshed yet");
        }
        if let Ok(mut loads) = self.inner.loads.lock() {
            loads.remove(&node);
        }
        tracing::info!(%node, "node removed and its identity revoked");
        Ok(Reply::new(pb::RemoveNodeResponse {}))
    }
}

#[tonic::async_trait]
impl<S: StateStore> Migrations for Api<S> {
    async fn create_migration(
        &self,
        req: Request<pb::CreateMigrationRequest>,
    ) -> Result<Reply<ops_pb::Operation>, Status> {
        let c = self
            .authorize(
                &req,
                &format!("{MIGRATIONS}CreateMigration"),
                Target::Cluster,
            )
            .await?;
        let mut r = req.into_inner();
        let rid = request_id(&r.request_id);
        // The id derives from the request as asked (an empty target too),
        // so a retry after the scheduler would now pick another node still
        // finds the first answer.
        let migration_id = derived_id(
            "mig",
            rid.as_deref(),
            &format!("{}/{}", r.instance, r.target),
        )?;
        if r.target.is_empty() {
            let instance = r.instance.clone();
            let first = rid.as_ref().map(|_| format!("migrations/{migration_id}"));
            r.target = self
                .read_try(move |s| {
                    // A retry of an answered request must propose the very
                    // same command to get its first answer back.
                    if let Some(m) = first.and_then(|f| s.migrations.get(&f)) {
                        return Ok(m.target.clone());
                    }
                    pick_target(s, &instance)
                })
                .await?;
        }
        let command = Command::CreateMigration {
            migration_id,
            instance: r.instance,
            target: r.target,
            max_downtime_ms: r.max_downtime_ms,
            cause: String::new(),
        };
        match self.propose_as(&c, rid, command).await? {
            // A migration is its own long-running record; the operation
            // view of it is done when the migration reaches a final state.
            Response::Migration(m) => Ok(Reply::new(ops_pb::Operation {
                name: m.name.clone(),
                target: m.instance.clone(),
                verb: "migrate".into(),
                done: m.state.is_final(),
                error: m.reason.clone(),
                create_time: convert::ts(m.create_time),
                update_time: convert::ts(m.update_time),
            })),
            other => Err(ApiError::Internal(format!("unexpected answer {other:?}")).into()),
        }
    }

    async fn get_migration(
        &self,
        req: Request<pb::GetMigrationRequest>,
    ) -> Result<Reply<pb::Migration>, Status> {
        self.authorize(&req, &format!("{MIGRATIONS}GetMigration"), Target::Cluster)
            .await?;
        let name = req.into_inner().name;
        let m = self
            .get_one(name, |s| &s.migrations, convert::migration)
            .await?;
        Ok(Reply::new(m))
    }

    async fn cancel_migration(
        &self,
        req: Request<pb::CancelMigrationRequest>,
    ) -> Result<Reply<pb::Migration>, Status> {
        let c = self
            .authorize(
                &req,
                &format!("{MIGRATIONS}CancelMigration"),
                Target::Cluster,
            )
            .await?;
        let name = req.into_inner().name;
        names::parse(&name, names::MIGRATION).map_err(ApiError::from)?;
        let n = name.clone();
        let bytes = self
            .read_try(move |s| {
                s.migrations
                    .get(&n)
                    .map(|m| m.bytes_copied)
                    .ok_or_else(|| ApiError::not_found(n))
            })
            .await?;
        let command = Command::SetMigrationState {
            migration: name,
            state: nephele_state::model::MigrationState::Cancelled,
            bytes_copied: bytes,
            reason: format!("cancelled by {}", c.user),
        };
        match self.propose_as(&c, None, command).await? {
            Response::Migration(m) => Ok(Reply::new(convert::migration(&m))),
            other => Err(ApiError::Internal(format!("unexpected answer {other:?}")).into()),
        }
    }

    async fn list_migrations(
        &self,
        req: Request<pb::ListMigrationsRequest>,
    ) -> Result<Reply<pb::ListMigrationsResponse>, Status> {
        self.authorize(
            &req,
            &format!("{MIGRATIONS}ListMigrations"),
            Target::Cluster,
        )
        .await?;
        let page = Page::parse(req.get_ref().page_size, &req.get_ref().page_token)?;
        let (migrations, next_page_token) = self
            .read(move |s| {
                page.take(&s.migrations, "migrations/", |m| {
                    Some(convert::migration(m))
                })
            })
            .await?;
        Ok(Reply::new(pb::ListMigrationsResponse {
            migrations,
            next_page_token,
        }))
    }
}

#[tonic::async_trait]
impl<S: StateStore> Cluster for Api<S> {
    async fn get_cluster_status(
        &self,
        req: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Reply<pb::ClusterStatus>, Status> {
        self.authorize(
            &req,
            "/nephele.infra.v1.Cluster/GetClusterStatus",
            Target::Cluster,
        )
        .await?;
        let l = self.store().leadership();
        let backend = self.store().backend();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let status = self
            .read(move |s| pb::ClusterStatus {
                controllers: s
                    .controllers
                    .iter()
                    .map(|(id, address)| pb::Controller {
                        id: *id,
                        address: address.clone(),
                        leader: l.leader_id == Some(*id),
                    })
                    .collect(),
                term: l.term,
                leader_id: l.leader_id.unwrap_or(0),
                answered_by: l.member_id,
                applied: s.applied,
                projects: count(s.projects.len()),
                nodes: count(s.nodes.len()),
                nodes_up: count(
                    s.nodes
                        .values()
                        .filter(|n| n.state == NodeState::Up)
                        .count(),
                ),
                instances: count(s.instances.len()),
                instances_running: count(
                    s.instances
                        .values()
                        .filter(|i| i.state == InstanceState::Running)
                        .count(),
                ),
                backend: backend.kind.to_owned(),
                backend_endpoints: backend.endpoints,
            })
            .await?;
        Ok(Reply::new(status))
    }
}
