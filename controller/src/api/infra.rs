//! `nephele.infra.v1`: nodes, migrations and cluster status (admins only).

use nephele_proto::infra::v1 as pb;
use nephele_proto::infra::v1::cluster_server::Cluster;
use nephele_proto::infra::v1::migrations_server::Migrations;
use nephele_proto::infra::v1::nodes_server::Nodes;
use nephele_proto::ops::v1 as ops_pb;
use nephele_state::model::{InstanceState, NodeState, State};
use nephele_state::names;
use nephele_state::{Command, Response};
use tonic::{Request, Response as Reply, Status};

use super::authz::Target;
use super::errors::ApiError;
use super::{Api, Page, convert, derived_id, request_id};
use crate::store::StateStore;

const NODES: &str = "/nephele.infra.v1.Nodes/";
const MIGRATIONS: &str = "/nephele.infra.v1.Migrations/";

fn node_instances(s: &State, node: &str) -> Vec<String> {
    s.instances
        .values()
        .filter(|i| i.node.as_deref() == Some(node))
        .map(|i| i.name.clone())
        .collect()
}

impl<S: StateStore> Api<S> {
    fn load_of(&self, node: &str) -> Option<pb::Load> {
        self.inner
            .loads
            .lock()
            .ok()
            .and_then(|l| l.get(node).cloned())
    }

    async fn set_node_state(
        &self,
        actor: &str,
        node: String,
        state: NodeState,
    ) -> Result<pb::Node, ApiError> {
        names::parse(&node, names::NODE)?;
        match self
            .propose(actor, None, Command::SetNodeState { node, state })
            .await?
        {
            Response::Node(n) => {
                let name = n.name.clone();
                let instances = self.read(move |s| node_instances(s, &name)).await?;
                Ok(convert::node(&n, instances, self.load_of(&n.name)))
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
        let load = self.load_of(&n.name);
        Ok(Reply::new(convert::node(&n, instances, load)))
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
            .map(|(n, inst)| {
                let load = self.load_of(&n.name);
                convert::node(&n, inst, load)
            })
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
            .set_node_state(&c.user, req.into_inner().name, NodeState::Disabled)
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
        let n = self.set_node_state(&c.user, name, NodeState::Up).await?;
        Ok(Reply::new(n))
    }

    async fn drain_node(
        &self,
        req: Request<pb::DrainNodeRequest>,
    ) -> Result<Reply<pb::Node>, Status> {
        let c = self
            .authorize(&req, &format!("{NODES}DrainNode"), Target::Cluster)
            .await?;
        let n = self
            .set_node_state(&c.user, req.into_inner().name, NodeState::Draining)
            .await?;
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
        let r = req.into_inner();
        let rid = request_id(&r.request_id);
        let migration_id = derived_id(
            "mig",
            rid.as_deref(),
            &format!("{}/{}", r.instance, r.target),
        )?;
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
