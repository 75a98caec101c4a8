//! The `nephele.cluster.v1.Cluster` gRPC service: raft messages between
//! members, proposals and reads from clients of any member, status, and
//! membership changes.
//!
//! Every request carries the cluster id. A mismatch is refused with
//! `FAILED_PRECONDITION` and a message starting with `WRONG_CLUSTER_ID`; raft
//! messages from a removed member, or addressed to another member, with
//! `PERMISSION_DENIED` (`STALE_MEMBER`) and `INVALID_ARGUMENT`
//! (`WRONG_MEMBER`).

use nephele_proto::cluster::v1 as pb;
use nephele_proto::cluster::v1::cluster_server::{Cluster, ClusterServer};
use nephele_state::codec;
use protobuf::Message as _;
use tonic::{Request, Response, Status};

use super::{MemberChangeError, RaftStore, StatusView, transport::MAX_MESSAGE_BYTES};
use crate::store::{ProposeError, ReadError, StateStore};

/// Serves one member's [`RaftStore`].
#[derive(Debug, Clone)]
pub struct ClusterService {
    store: RaftStore,
}

impl ClusterService {
    /// Wraps a running store.
    pub fn new(store: RaftStore) -> ClusterService {
        ClusterService { store }
    }

    /// As a tonic server, with limits large enough for snapshots.
    pub fn into_server(self) -> ClusterServer<ClusterService> {
        ClusterServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Checks one batch of raft messages from a peer and hands it to the
    /// Ready loop.
    fn accept_batch(&self, req: pb::RaftRequest) -> Result<(), Status> {
        self.check_cluster(req.cluster_id)?;
        if self.store.is_removed(req.from) {
            return Err(Status::permission_denied(format!(
                "STALE_MEMBER: member {} was removed from the cluster",
                req.from
            )));
        }
        self.store.learn_address(req.from, &req.from_address);
        let me = self.store.member_id();
        let mut batch = Vec::with_capacity(req.messages.len());
        for bytes in &req.messages {
            let m = raft::prelude::Message::parse_from_bytes(bytes).map_err(|e| {
                Status::invalid_argument(format!("a raft message does not decode: {e}"))
            })?;
            if m.to != me {
                return Err(Status::invalid_argument(format!(
                    "WRONG_MEMBER: message for member {} reached member {me}",
                    m.to
                )));
            }
            if m.from != req.from {
                return Err(Status::invalid_argument(format!(
                    "a message from member {} arrived in a batch from {}",
                    m.from, req.from
                )));
            }
            // raft-rs aborts on an empty proposal: refuse it here.
            if m.get_msg_type() == raft::prelude::MessageType::MsgPropose
                && m.get_entries().is_empty()
            {
                return Err(Status::invalid_argument(
                    "a forwarded proposal has no entries",
                ));
            }
            batch.push(m);
        }
        self.store.step(req.from, batch).map_err(propose_status)
    }

    fn check_cluster(&self, cluster_id: u64) -> Result<(), Status> {
        if cluster_id != self.store.cluster_id() {
            return Err(Status::failed_precondition(format!(
                "WRONG_CLUSTER_ID: this member belongs to cluster {}, not {cluster_id}",
                self.store.cluster_id()
            )));
        }
        Ok(())
    }
}

fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::NoLeader => Status::unavailable(format!("NO_LEADER: {e}")),
        ProposeError::Dropped => Status::aborted(format!("DROPPED: {e}")),
        ProposeError::Timeout => Status::deadline_exceeded(format!("OUTCOME_UNKNOWN: {e}")),
        ProposeError::TooLarge { .. } => Status::invalid_argument(format!("TOO_LARGE: {e}")),
        ProposeError::Stopped(_) => Status::unavailable(format!("STOPPED: {e}")),
        ProposeError::Overloaded { .. } => Status::resource_exhausted(format!("OVERLOADED: {e}")),
    }
}

fn read_status(e: ReadError) -> Status {
    match e {
        ReadError::Timeout => Status::unavailable(format!("NO_QUORUM: {e}")),
        ReadError::Stopped(_) => Status::unavailable(format!("STOPPED: {e}")),
    }
}

fn member_status(e: MemberChangeError) -> Status {
    match e {
        MemberChangeError::NotLeader { .. } => {
            Status::failed_precondition(format!("NOT_LEADER: {e}"))
        }
        MemberChangeError::Refused(_) => Status::failed_precondition(format!("REFUSED: {e}")),
        MemberChangeError::Propose(p) => propose_status(p),
        MemberChangeError::Forward(_) => Status::unavailable(format!("FORWARD_FAILED: {e}")),
    }
}

/// Converts a status snapshot to its wire form.
pub fn status_to_proto(
    s: &StatusView,
    addresses: &std::collections::BTreeMap<u64, String>,
) -> pb::StatusResponse {
    pb::StatusResponse {
        id: s.id,
        cluster_id: s.cluster_id,
        leader_id: s.leader_id,
        term: s.term,
        commit_index: s.commit_index,
        applied_index: s.applied_index,
        snapshot_index: s.snapshot_index,
        role: s.role.to_owned(),
        members: s
            .voters
            .iter()
            .map(|id| pb::Member {
                id: *id,
                address: addresses.get(id).cloned().unwrap_or_default(),
                matched_index: s.progress.get(id).copied().unwrap_or(0),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn raft(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftResponse>, Status> {
        self.accept_batch(request.into_inner())?;
        Ok(Response::new(pb::RaftResponse {}))
    }

    async fn raft_stream(
        &self,
        request: Request<tonic::Streaming<pb::RaftRequest>>,
    ) -> Result<Response<pb::RaftResponse>, Status> {
        let mut stream = request.into_inner();
        loop {
            let req = tokio::select! {
                m = stream.message() => m?,
                () = self.store.closing() => {
                    return Err(Status::unavailable("STOPPED: this member is shutting down"));
                }
            };
            let Some(req) = req else {
                return Ok(Response::new(pb::RaftResponse {}));
            };
            self.accept_batch(req)?;
        }
    }

    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let req = request.into_inner();
        self.check_cluster(req.cluster_id)?;
        let env = codec::decode_envelope(&req.envelope)
            .map_err(|e| Status::invalid_argument(format!("the envelope does not decode: {e}")))?;
        let c = self.store.propose(env).await.map_err(propose_status)?;
        Ok(Response::new(pb::ProposeResponse {
            index: c.index,
            outcome: codec::encode_outcome(&c.outcome),
        }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let req = request.into_inner();
        self.check_cluster(req.cluster_id)?;
        let keys = req.keys;
        let (index, values) = self
            .store
            .read(move |s| {
                let values = keys
                    .into_iter()
                    .map(|key| match s.kv.get(&key) {
                        Some(e) => pb::KeyValue {
                            key,
                            found: true,
                            value: e.value.clone(),
                            version: e.version,
                        },
                        None => pb::KeyValue {
                            key,
                            found: false,
                            value: Vec::new(),
                            version: 0,
                        },
                    })
                    .collect();
                (s.applied, values)
            })
            .await
            .map_err(read_status)?;
        Ok(Response::new(pb::ReadResponse { index, values }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.check_cluster(request.into_inner().cluster_id)?;
        Ok(Response::new(status_to_proto(
            &self.store.status(),
            &self.store.addresses(),
        )))
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MemberChangeResponse>, Status> {
        let req = request.into_inner();
        self.check_cluster(req.cluster_id)?;
        if req.address.is_empty() {
            return Err(Status::invalid_argument("a new member needs an address"));
        }
        let index = self
            .store
            .add_member(req.id, req.address)
            .await
            .map_err(member_status)?;
        let s = status_to_proto(&self.store.status(), &self.store.addresses());
        Ok(Response::new(pb::MemberChangeResponse {
            index,
            members: s.members,
        }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MemberChangeResponse>, Status> {
        let req = request.into_inner();
        self.check_cluster(req.cluster_id)?;
        let index = self
            .store
            .remove_member(req.id)
            .await
            .map_err(member_status)?;
        let s = status_to_proto(&self.store.status(), &self.store.addresses());
        Ok(Response::new(pb::MemberChangeResponse {
            index,
            members: s.members,
        }))
    }
}
