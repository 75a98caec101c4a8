//! `nephele.node.v1.NodeAgent`: what compute-node agents call. Any
//! controller answers; responses carry every controller's address so an
//! agent can move on when its controller goes away.

use std::collections::HashSet;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use nephele_proto::node::v1 as pb;
use nephele_proto::node::v1::node_agent_server::NodeAgent;
use nephele_state::model::{InstanceState, NodeState, State};
use nephele_state::names;
use nephele_state::{Command, Response};
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response as Reply, Status};

use super::authz::Target;
use super::errors::ApiError;
use super::{Api, convert, migration};
use crate::store::{StateStore, WatchEvent};

const SVC: &str = "/nephele.node.v1.NodeAgent/";

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// What `node` should hold: every instance placed on it, with the state
/// it should be in and, to stop it, the graceful time its stop asked for
/// (`default_stop` when it did not say).
fn assignments(s: &State, node: &str, default_stop: Duration) -> Result<pb::Assignments, ApiError> {
    if !s.nodes.contains_key(node) {
        return Err(ApiError::not_found(node));
    }
    // Placed here, or arriving by migration; in name order.
    let mut names: std::collections::BTreeSet<&str> = migration::incoming(s, node).collect();
    names.extend(s.instances_on(node).map(|i| i.name.as_str()));
    let assignments = names
        .into_iter()
        .filter_map(|name| s.instances.get(name))
        .map(|i| {
            let desired = match i.state {
                InstanceState::Pending => pb::DesiredState::Unspecified,
                InstanceState::Scheduled
                | InstanceState::Starting
                | InstanceState::Running
                | InstanceState::Migrating => pb::DesiredState::DesiredRunning,
                InstanceState::Stopping | InstanceState::Stopped | InstanceState::Error => {
                    pb::DesiredState::DesiredStopped
                }
                InstanceState::Deleting => pb::DesiredState::DesiredDeleted,
            };
            pb::Assignment {
                instance: Some(convert::instance(i)),
                image: s.images.get(&i.image).map(convert::image),
                desired: desired as i32,
                stop_timeout: Some(duration(
                    i.stop_timeout_ms
                        .map_or(default_stop, Duration::from_millis),
                )),
                migration: migration::assignment_of(s, node, &i.name),
            }
        })
        .collect();
    Ok(pb::Assignments {
        node: node.to_owned(),
        assignments,
        revision: s.applied,
        controllers: None,
    })
}

/// Whether `e` is the committed removal of `node`.
fn removes(e: &WatchEvent, node: &str) -> bool {
    e.outcome.is_ok() && matches!(&e.envelope.command, Command::RemoveNode { node: n } if n == node)
}

/// The instances an assignment set names.
fn held(assignments: &[pb::Assignment]) -> HashSet<String> {
    assignments
        .iter()
        .filter_map(|a| a.instance.as_ref().map(|i| i.name.clone()))
        .collect()
}

/// Whether the applied command `e` can change the assignments of `node`,
/// which currently holds `mine`. A watch re-reads only then: with a
/// thousand nodes, waking every watch on every commit (and each scanning
/// every instance) was most of the controller's work. Commands that touch
/// no instance, migration or this node are skipped; an instance or
/// migration answer counts when it names this node or an instance it
/// holds; anything not recognised counts, so a new command errs on the side
/// of a re-read.
fn touches(e: &WatchEvent, node: &str, mine: &HashSet<String>) -> bool {
    let Ok(answer) = &*e.outcome else {
        return false;
    };
    let this_node = |id: &str| node.strip_prefix("nodes/") == Some(id);
    match &e.envelope.command {
        Command::Noop
        | Command::NodeHeartbeat { .. }
        | Command::CreateProject { .. }
        | Command::SetProjectQuota { .. }
        | Command::DeleteProject { .. }
        | Command::CreateUser { .. }
        | Command::DeleteUser { .. }
        | Command::SetRole { .. }
        | Command::CreateToken { .. }
        | Command::DeleteToken { .. }
        | Command::CreateFlavor { .. }
        | Command::DeleteFlavor { .. }
        | Command::CreateServerGroup { .. }
        | Command::DeleteServerGroup { .. }
        | Command::FinishOperation { .. }
        | Command::RecordRefusal { .. }
        | Command::RecordDenial { .. }
        | Command::KvPut { .. }
        | Command::KvCas { .. }
        | Command::KvDelete { .. }
        | Command::SetClusterCa { .. }
        | Command::RenewNodeCertificate { .. }
        // New instances are PENDING, on no node.
        | Command::CreateInstance { .. }
        | Command::CreateInstances { .. } => return false,
        Command::RegisterNode { node_id, .. } => return this_node(node_id),
        Command::SetNodeState { node: n, .. }
        | Command::DeregisterNode { node: n }
        | Command::RemoveNode { node: n } => {
            return n == node;
        }
        Command::RestartInstanceElsewhere { instance, node: n } => {
            return n == node || mine.contains(instance);
        }
        _ => {}
    }
    match answer {
        Response::Instance { instance, .. } => {
            instance.node.as_deref() == Some(node) || mine.contains(&instance.name)
        }
        Response::Migration(m) => {
            m.source == node || m.target == node || mine.contains(&m.instance)
        }
        Response::Deleted { name } => name == node || mine.contains(name),
        _ => true,
    }
}

impl<S: StateStore> Api<S> {
    async fn assignments_of(&self, node: String) -> Result<pb::Assignments, ApiError> {
        let stop = self.inner.config.default_stop_timeout;
        let mut a = self.read_try(move |s| assignments(s, &node, stop)).await?;
        a.controllers = Some(self.controller_info().await?);
        Ok(a)
    }

    /// Records a heartbeat of `node`; returns the controllers to tell it.
    ///
    /// Committing every heartbeat would make a thousand nodes a few hundred
    /// commits a second. The leader instead answers from memory
    /// ([`NodeBeats`](crate::reconcile::NodeBeats), which its liveness loop
    /// reads) once a quorum confirmed it still leads in the term it read,
    /// so a deposed leader never renews a lease: the agent's fencing
    /// (VMs pause `fence_lease` after the last acknowledged heartbeat) and
    /// a new leader's grace window (a whole timeout from its first pass)
    /// hold as they did with a commit per heartbeat. A heartbeat is still
    /// committed when the node is DOWN (it comes back UP), when its
    /// recorded heartbeat is older than `heartbeat_commit_interval`, on a
    /// follower, and on a store that cannot confirm leadership.
    async fn beat(&self, node: &str) -> Result<pb::ControllerInfo, ApiError> {
        let term = self.store().leadership();
        let stale_after = u64::try_from(self.inner.config.heartbeat_commit_interval.as_millis())
            .unwrap_or(u64::MAX);
        let name = node.to_owned();
        let (recorded, controllers) = self
            .read_try(move |s| {
                let n = s
                    .nodes
                    .get(&name)
                    .ok_or_else(|| ApiError::not_found(&name))?;
                let leader = term.leader_id;
                let info = pb::ControllerInfo {
                    controllers: s.controllers.values().cloned().collect(),
                    leader_address: leader
                        .and_then(|l| s.controllers.get(&l).cloned())
                        .unwrap_or_default(),
                };
                Ok(((n.state, n.last_heartbeat), info))
            })
            .await?;
        let now = super::now_ms();
        let fresh = recorded.0 != NodeState::Down && now.saturating_sub(recorded.1) < stale_after;
        if fresh && term.is_leader() && self.store().confirm_leadership(term.term).await {
            self.inner.beats.record(
                node,
                crate::reconcile::LocalBeat {
                    term: term.term,
                    at: std::time::Instant::now(),
                    wall_ms: now,
                },
            );
            return Ok(controllers);
        }
        self.propose(
            node,
            None,
            Command::NodeHeartbeat {
                node: node.to_owned(),
            },
        )
        .await?;
        Ok(controllers)
    }

    async fn set_state(
        &self,
        actor: &str,
        instance: &str,
        to: InstanceState,
        reason: &str,
    ) -> Result<(), ApiError> {
        let command = Command::SetInstanceState {
            instance: instance.to_owned(),
            state: to,
            reason: reason.to_owned(),
            expected_generation: None,
        };
        self.propose(actor, None, command).await.map(|_| ())
    }
}

impl<S: StateStore> Api<S> {
    /// Who may make a NodeAgent call about `node` (`nodes/{node}`, or the
    /// bare id in RegisterNode): a node certificate (from `NodeJoin/Join`)
    /// for exactly that node and not revoked (checked on every call, so a
    /// removed node's open connection is refused too), so node/a acts only
    /// as node a; or, from a client without a node certificate, an admin
    /// bearer token, only with [`super::ApiConfig::allow_node_tokens`] (the
    /// transition path for agents that have not joined) or on a plaintext
    /// server (in-process tests). Refusals go
    /// into the audit trail like every other refused call. Returns the
    /// node certificate's identity when there was one.
    async fn authorize_node<T>(
        &self,
        req: &Request<T>,
        rpc: &str,
        node: &str,
    ) -> Result<Option<nephele_tls::PeerIdentity>, Status> {
        let id = node.strip_prefix("nodes/").unwrap_or(node);
        let refused = match nephele_tls::peer_identity(req) {
            Ok(p) if p.identity.kind() == nephele_tls::IdentityKind::Node => {
                let checked = self
                    .revocations()
                    .check(&p)
                    .map_err(|e| ApiError::Unauthenticated(e.to_string()))
                    .and_then(|()| {
                        nephele_tls::require_node(req, id)
                            .map_err(|s| ApiError::PermissionDenied(s.message().to_owned()))
                    });
                match checked {
                    Ok(()) => return Ok(Some(p)),
                    Err(e) => (format!("nodes/{}", p.identity.name()), e),
                }
            }
            // No certificate, or another member's (a controller's: it may
            // act for nodes only with an admin token, like anyone).
            Ok(_) | Err(nephele_tls::identity::PeerIdentityError::NoCertificate) => {
                if self.inner.tls.is_some() && !self.inner.config.allow_node_tokens {
                    (
                        "anonymous".to_owned(),
                        ApiError::Unauthenticated(format!(
                            "{rpc} needs the node's certificate (join with a join token first)"
                        )),
                    )
                } else {
                    // `authorize` audits its own refusals.
                    self.authorize(req, rpc, Target::Cluster).await?;
                    return Ok(None);
                }
            }
            Err(e) => (
                "anonymous".to_owned(),
                ApiError::Unauthenticated(e.to_string()),
            ),
        };
        let (actor, error) = refused;
        let node_name = format!("nodes/{id}");
        self.record_denial_of(actor, super::origin(req.into(), rpc), node_name, &error)
            .await;
        Err(error.into())
    }
}

type AssignmentStream =
    Pin<Box<dyn Stream<Item = Result<pb::Assignments, Status>> + Send + 'static>>;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ImageChunk, Status>> + Send + 'static>>;

/// The chunks of `file`, read as the client takes them.
fn chunks(file: tokio::fs::File, what: String) -> ChunkStream {
    use tokio::io::AsyncReadExt as _;
    Box::pin(futures::stream::unfold(Some(file), move |file| {
        let what = what.clone();
        async move {
            let mut file = file?;
            let mut buf = vec![0u8; nephele_proto::image::CHUNK_BYTES];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(pb::ImageChunk { data: buf }), Some(file)))
                }
                Err(e) => Some((
                    Err(Status::internal(format!("cannot read {what}: {e}"))),
                    None,
                )),
            }
        }
    }))
}

#[tonic::async_trait]
impl<S: StateStore> NodeAgent for Api<S> {
    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Reply<pb::RegisterNodeResponse>, Status> {
        let node = req.get_ref().node_id.clone();
        self.authorize_node(&req, &format!("{SVC}RegisterNode"), &node)
            .await?;
        let r = req.into_inner();
        let actor = format!("nodes/{}", r.node_id);
        let command = Command::RegisterNode {
            node_id: r.node_id,
            address: r.address,
            capacity: convert::resources_in(r.capacity.as_ref()),
            labels: r.labels.into_iter().collect(),
        };
        let node = match self.propose(&actor, None, command).await? {
            Response::Node(n) => convert::node(&n, Vec::new(), None),
            other => return Err(ApiError::Internal(format!("unexpected answer {other:?}")).into()),
        };
        Ok(Reply::new(pb::RegisterNodeResponse {
            node: Some(node),
            heartbeat_interval: Some(duration(self.inner.config.heartbeat_interval)),
            controllers: Some(self.controller_info().await?),
            lease: Some(duration(self.inner.config.fence_lease)),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Reply<pb::HeartbeatResponse>, Status> {
        let node = req.get_ref().node.clone();
        self.authorize_node(&req, &format!("{SVC}Heartbeat"), &node)
            .await?;
        let r = req.into_inner();
        names::parse(&r.node, names::NODE).map_err(ApiError::from)?;
        let controllers = self.beat(&r.node).await?;
        self.inner.beats.record_loads(
            r.instances.iter().map(|i| (i.name.as_str(), i.cpu_busy)),
            std::time::Instant::now(),
        );
        if let (Some(load), Ok(mut loads)) = (r.load, self.inner.loads.lock()) {
            loads.insert(r.node, load);
        }
        Ok(Reply::new(pb::HeartbeatResponse {
            controllers: Some(controllers),
            lease: Some(duration(self.inner.config.fence_lease)),
        }))
    }

    type WatchAssignmentsStream = AssignmentStream;

    async fn watch_assignments(
        &self,
        req: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Reply<AssignmentStream>, Status> {
        let node = req.get_ref().node.clone();
        let peer = self
            .authorize_node(&req, &format!("{SVC}WatchAssignments"), &node)
            .await?;
        let node = req.into_inner().node;
        names::parse(&node, names::NODE).map_err(ApiError::from)?;
        let mut changes = self.store().watch();
        let first = self.assignments_of(node.clone()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let api = self.clone();
        tokio::spawn(async move {
            let mut last = first.assignments.clone();
            let mut mine = held(&last);
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            // A removed node's watch ends: at its removal, or (its
            // certificate revoked some other way) when the revocation set
            // changes to refuse it.
            let removed =
                || Status::unauthenticated(format!("{node} was removed from the cluster"));
            let mut revoked = api.revocations().subscribe();
            // Once at the start too: a revocation between the call's check
            // and this subscription is not missed.
            revoked.mark_changed();
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    Ok(()) = revoked.changed(), if peer.is_some() => {
                        match &peer {
                            Some(p) if api.revocations().check(p).is_err() => {
                                let _ = tx.send(Err(removed())).await;
                                return;
                            }
                            _ => continue,
                        }
                    }
                    got = changes.recv() => match got {
                        Ok(e) if removes(&e, &node) => {
                            let _ = tx.send(Err(removed())).await;
                            return;
                        }
                        Ok(e) if !touches(&e, &node, &mine) => continue,
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => {
                            let _ = tx.send(Err(Status::unavailable("the controller is stopping; watch another one"))).await;
                            return;
                        }
                    },
                }
                // Coalesce a burst of changes into one read.
                tokio::time::sleep(Duration::from_millis(5)).await;
                while let Ok(e) = changes.try_recv() {
                    if removes(&e, &node) {
                        let _ = tx.send(Err(removed())).await;
                        return;
                    }
                }
                match api.assignments_of(node.clone()).await {
                    Ok(a) if a.assignments != last => {
                        last = a.assignments.clone();
                        mine = held(&last);
                        if tx.send(Ok(a)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Reply::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_assignments(
        &self,
        req: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Reply<pb::Assignments>, Status> {
        let node = req.get_ref().node.clone();
        self.authorize_node(&req, &format!("{SVC}GetAssignments"), &node)
            .await?;
        let node = req.into_inner().node;
        names::parse(&node, names::NODE).map_err(ApiError::from)?;
        Ok(Reply::new(self.assignments_of(node).await?))
    }

    async fn report_instance_state(
        &self,
        req: Request<pb::ReportInstanceStateRequest>,
    ) -> Result<Reply<pb::ReportInstanceStateResponse>, Status> {
        let node = req.get_ref().node.clone();
        self.authorize_node(&req, &format!("{SVC}ReportInstanceState"), &node)
            .await?;
        let r = req.into_inner();
        names::parse(&r.node, names::NODE).map_err(ApiError::from)?;
        names::parse(&r.instance, names::INSTANCE).map_err(ApiError::from)?;
        let reported = pb::ReportedState::try_from(r.state).map_err(|_| {
            ApiError::InvalidArgument(format!("unknown reported state {}", r.state))
        })?;
        let name = r.instance.clone();
        let current = self
            .read_try(move |s| {
                s.instances
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| ApiError::not_found(name))
            })
            .await?;
        if current.node.as_deref() != Some(r.node.as_str()) {
            return Err(ApiError::FailedPrecondition(format!(
                "{} is not placed on {}; stop it there",
                r.instance, r.node
            ))
            .into());
        }
        if r.boot_count != 0
            && r.boot_count < current.boot_count
            && reported != pb::ReportedState::ReportedDeleted
        {
            // About a boot older than the one asked for (a reboot the node
            // has not acted on yet): not news about this boot.
            tracing::debug!(instance = %r.instance, reported = r.boot_count, current = current.boot_count, "stale instance report ignored");
            return Ok(Reply::new(pb::ReportInstanceStateResponse {
                instance: Some(convert::instance(&current)),
            }));
        }
        let actor = r.node.as_str();
        let reason = r.reason.as_str();
        use InstanceState as I;
        // The steps from the current state to the reported one, each a
        // lifecycle transition the state machine accepts.
        let steps: &[I] = match (reported, current.state) {
            (pb::ReportedState::ReportedStarting, I::Scheduled | I::Stopped) => &[I::Starting],
            (pb::ReportedState::ReportedRunning, I::Scheduled | I::Stopped) => {
                &[I::Starting, I::Running]
            }
            (pb::ReportedState::ReportedRunning, I::Starting) => &[I::Running],
            (pb::ReportedState::ReportedStopped, I::Stopping | I::Starting) => &[I::Stopped],
            (pb::ReportedState::ReportedStopped, I::Running) => &[I::Stopping, I::Stopped],
            (pb::ReportedState::ReportedFailed, s) if s != I::Error && s != I::Deleting => {
                &[I::Error]
            }
            _ => &[],
        };
        if reported == pb::ReportedState::ReportedDeleted {
            if current.state != I::Deleting {
                return Err(ApiError::FailedPrecondition(format!(
                    "{} is {}, not being deleted; keep it",
                    r.instance, current.state
                ))
                .into());
            }
            self.propose(
                actor,
                None,
                Command::PurgeInstance {
                    instance: r.instance.clone(),
                },
            )
            .await?;
            return Ok(Reply::new(pb::ReportInstanceStateResponse {
                instance: None,
            }));
        }
        for to in steps {
            self.set_state(actor, &r.instance, *to, reason).await?;
        }
        let name = r.instance.clone();
        let instance = self
            .read(move |s| s.instances.get(&name).map(convert::instance))
            .await?;
        Ok(Reply::new(pb::ReportInstanceStateResponse { instance }))
    }

    async fn report_migration(
        &self,
        req: Request<pb::ReportMigrationRequest>,
    ) -> Result<Reply<pb::ReportMigrationResponse>, Status> {
        let node = req.get_ref().node.clone();
        self.authorize_node(&req, &format!("{SVC}ReportMigration"), &node)
            .await?;
        Ok(Reply::new(
            self.report_migration_checked(req.into_inner()).await?,
        ))
    }

    async fn request_switchover(
        &self,
        req: Request<pb::RequestSwitchoverRequest>,
    ) -> Result<Reply<pb::RequestSwitchoverResponse>, Status> {
        let node = req.get_ref().node.clone();
        self.authorize_node(&req, &format!("{SVC}RequestSwitchover"), &node)
            .await?;
        Ok(Reply::new(
            self.request_switchover_checked(req.into_inner()).await?,
        ))
    }

    type FetchImageStream = ChunkStream;

    async fn fetch_image(
        &self,
        req: Request<pb::FetchImageRequest>,
    ) -> Result<Reply<ChunkStream>, Status> {
        // Controllers copy content from each other with their own
        // certificates; nodes fetch with theirs.
        let controller = nephele_tls::RequirePeer::kind(
            nephele_tls::IdentityKind::Controller,
            self.revocations().clone(),
        )
        .check(&req)
        .is_ok();
        if !controller {
            let node = req.get_ref().node.clone();
            self.authorize_node(&req, &format!("{SVC}FetchImage"), &node)
                .await?;
        }
        let r = req.into_inner();
        names::parse(&r.image, names::IMAGE).map_err(ApiError::from)?;
        let image = self
            .read({
                let name = r.image.clone();
                move |s| s.images.get(&name).cloned()
            })
            .await?
            .ok_or_else(|| ApiError::not_found(&r.image))?;
        if !image.files.iter().any(|f| f.role == r.role) {
            return Err(ApiError::InvalidArgument(format!(
                "{} has no {:?} file (its files: {})",
                r.image,
                r.role,
                image
                    .files
                    .iter()
                    .map(|f| f.role.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .into());
        }
        let path = self
            .inner
            .images
            .as_ref()
            .and_then(|c| c.file(&image, &r.role))
            .ok_or_else(|| {
                ApiError::ContentElsewhere(format!(
                    "this controller does not hold the content of {}; ask another controller",
                    r.image
                ))
            })?;
        let what = format!("the {} file of {}", r.role, r.image);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| ApiError::Internal(format!("cannot open {what}: {e}")))?;
        Ok(Reply::new(chunks(file, what)))
    }
}
