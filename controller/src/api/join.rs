//! Node join (issue 7): `nephele.infra.v1.Nodes/CreateJoinToken` (admins)
//! makes a one-time, expiring token, kept hashed in the replicated state;
//! `nephele.node.v1.NodeJoin/Join` (no client certificate, no bearer
//! token: the join token is the credential) redeems it once, through the
//! log, and signs the node's CSR for `node/<name>` with the cluster CA.
//! `NodeJoin/Renew` signs a fresh CSR for a joined node's own identity,
//! asked over mutual TLS with its current certificate (agents renew at two
//! thirds of its life, `compute-node/agent/src/join.rs`).
//!
//! Signing needs the CA's private key at run time: a controller started
//! with the operator key opens the sealed CA the replicated state holds
//! (`neph-controller init` put it there) at the first join and keeps it
//! open in memory; one started without the operator key answers Join with
//! FAILED_PRECONDITION (a node may ask another controller). See
//! docs/threat-model.md for what that exposes.

use std::sync::Arc;
use std::time::Duration;

use nephele_proto::node::v1 as pb;
use nephele_proto::node::v1::node_join_server::NodeJoin;
use nephele_state::{ApplyError, Command, Envelope, Origin, Response};
use nephele_tls::join::JoinToken;
use nephele_tls::{Ca, Identity, IssueOptions};
use tonic::{Request, Response as Reply, Status};

use super::errors::ApiError;
use super::{Api, now_ms};
use crate::store::StateStore;

/// How long a join token lives unless the request says.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The longest a join token may live.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The cluster CA, opened, for signing node certificates.
#[derive(Clone)]
pub struct NodeCa(pub Arc<Ca>);

impl std::fmt::Debug for NodeCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeCa({})", self.0.fingerprint())
    }
}

impl<S: StateStore> Api<S> {
    /// Makes and stores a join token (the caller has been authorized).
    pub(crate) async fn issue_join_token(
        &self,
        caller: &super::auth::Caller,
        ttl: Option<prost_types::Duration>,
        node_id: String,
    ) -> Result<nephele_proto::infra::v1::JoinToken, ApiError> {
        let ttl = match ttl {
            None => DEFAULT_JOIN_TOKEN_TTL,
            Some(d) if d.seconds > 0 && d.nanos >= 0 => Duration::from_secs(d.seconds as u64),
            Some(_) => {
                return Err(ApiError::InvalidArgument(
                    "a join token's ttl must be at least one second".into(),
                ));
            }
        };
        if ttl > MAX_JOIN_TOKEN_TTL {
            return Err(ApiError::InvalidArgument(format!(
                "a join token may live at most {} s",
                MAX_JOIN_TOKEN_TTL.as_secs()
            )));
        }
        let node = (!node_id.is_empty()).then_some(node_id);
        if let Some(n) = &node {
            Identity::node(n.clone()).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        }
        let (token, record) = JoinToken::issue(ttl)
            .map_err(|e| ApiError::Internal(format!("cannot make a join token: {e}")))?;
        let now = now_ms();
        let command = Command::CreateJoinToken {
            token_id: record.id.clone(),
            secret_hash: record.secret_sha256.clone(),
            expire_time: now.saturating_add(ttl.as_secs().saturating_mul(1000)),
            node,
        };
        match self.propose_as(caller, None, command).await? {
            Response::JoinToken(t) => Ok(nephele_proto::infra::v1::JoinToken {
                name: t.name,
                token: token.to_string(),
                expire_time: super::convert::ts(t.expire_time),
                node_id: t.node.unwrap_or_default(),
            }),
            other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
        }
    }
}

impl<S: StateStore> Api<S> {
    /// What node certificates are issued with.
    fn node_cert_options(&self) -> IssueOptions {
        IssueOptions {
            validity: self.inner.config.node_cert_validity,
            ..IssueOptions::default()
        }
    }

    /// The node identity a Renew call comes from, or why not (audited).
    async fn renewing_node<T>(
        &self,
        req: &Request<T>,
    ) -> Result<nephele_tls::PeerIdentity, ApiError> {
        let refused = match nephele_tls::peer_identity(req) {
            Ok(p) if p.identity.kind() == nephele_tls::IdentityKind::Node => {
                match self.revocations().check(&p) {
                    Ok(()) => return Ok(p),
                    Err(e) => (
                        format!("nodes/{}", p.identity.name()),
                        ApiError::Unauthenticated(e.to_string()),
                    ),
                }
            }
            Ok(p) => (
                p.identity.to_string(),
                ApiError::PermissionDenied(format!(
                    "{} is not a node: only nodes renew their certificates here",
                    p.identity
                )),
            ),
            Err(e) => (
                "anonymous".to_owned(),
                ApiError::Unauthenticated(format!(
                    "renewing needs the node's current certificate: {e}"
                )),
            ),
        };
        let (actor, error) = refused;
        self.record_denial_of(
            actor,
            super::origin(req.into(), RENEW_RPC),
            String::new(),
            &error,
        )
        .await;
        Err(error)
    }

    /// The cluster CA, open for signing: the one given open, else the
    /// replicated state's opened with the operator key (once, then kept).
    async fn signing_ca(&self) -> Result<Arc<Ca>, ApiError> {
        if let Some(NodeCa(ca)) = &self.inner.config.node_ca {
            return Ok(ca.clone());
        }
        let Some(key) = self.inner.config.operator_key.clone() else {
            return Err(ApiError::FailedPrecondition(
                "this controller cannot sign node certificates: it was started without the \
                 operator key (ask another controller, or restart it with --operator-key-file)"
                    .into(),
            ));
        };
        let record = self.read(|s| s.cluster_ca.clone()).await?.ok_or_else(|| {
            ApiError::FailedPrecondition(
                "the replicated state holds no cluster CA yet (`neph-controller init` puts it \
                 there); try again shortly"
                    .into(),
            )
        })?;
        let mut opened = self
            .inner
            .opened_ca
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((r, ca)) = &*opened
            && *r == record
        {
            return Ok(ca.clone());
        }
        let ca = Ca::open(&crate::tls::sealed_of(&record), &key).map_err(|e| {
            ApiError::FailedPrecondition(format!(
                "cannot open the cluster CA of the replicated state with this controller's \
                 operator key: {e}"
            ))
        })?;
        let ca = Arc::new(ca);
        *opened = Some((record, ca.clone()));
        Ok(ca)
    }
}

const JOIN_RPC: &str = "/nephele.node.v1.NodeJoin/Join";
const RENEW_RPC: &str = "/nephele.node.v1.NodeJoin/Renew";

#[tonic::async_trait]
impl<S: StateStore> NodeJoin for Api<S> {
    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Reply<pb::JoinResponse>, Status> {
        let peer = self.renewing_node(&req).await?;
        let remote = req.remote_addr();
        let node_id = peer.identity.name().to_owned();
        let ca = self.signing_ca().await?;
        let cert = ca
            .sign_csr(
                &req.into_inner().csr_pem,
                &peer.identity,
                &self.node_cert_options(),
            )
            .map_err(|e| Status::invalid_argument(format!("the CSR is refused: {e}")))?;
        // Handed out only once the renewal is committed (a node removed
        // meanwhile gets nothing).
        let envelope = Envelope {
            time: now_ms(),
            actor: format!("nodes/{node_id}"),
            request_id: None,
            fence_term: None,
            command: Command::RenewNodeCertificate {
                node_id: node_id.clone(),
                serial: cert.serial.clone(),
            },
            origin: Some(Origin {
                peer: remote.map(|p| p.to_string()).unwrap_or_default(),
                rpc: RENEW_RPC.to_owned(),
            }),
        };
        let committed = self
            .store()
            .propose(envelope)
            .await
            .map_err(|e| Status::from(ApiError::from(e)))?;
        match committed.outcome {
            Ok(_) => {}
            Err(ApplyError::FailedPrecondition { reason, .. }) => {
                return Err(Status::unauthenticated(reason));
            }
            Err(e) => return Err(ApiError::from(e).into()),
        }
        tracing::info!(node = %node_id, serial = %cert.serial, "node certificate renewed");
        Ok(Reply::new(pb::JoinResponse {
            cert_pem: cert.chain_pem,
            ca_pem: ca.cert_pem().to_owned(),
            serial: cert.serial,
        }))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Reply<pb::JoinResponse>, Status> {
        let peer = req.remote_addr();
        let r = req.into_inner();
        let token: JoinToken =
            r.token
                .parse()
                .map_err(|e: nephele_tls::join::ParseJoinTokenError| {
                    Status::invalid_argument(e.to_string())
                })?;
        let identity = Identity::node(r.node_id.clone())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ca = self.signing_ca().await?;
        // Sign first: a bad CSR must not use the token up. The certificate
        // is handed out only once the redemption is committed.
        let cert = ca
            .sign_csr(&r.csr_pem, &identity, &self.node_cert_options())
            .map_err(|e| Status::invalid_argument(format!("the CSR is refused: {e}")))?;
        let envelope = Envelope {
            time: now_ms(),
            actor: format!("nodes/{}", r.node_id),
            request_id: None,
            fence_term: None,
            command: Command::RedeemJoinToken {
                token_id: token.id().to_owned(),
                secret_hash: token.secret_sha256(),
                node_id: r.node_id.clone(),
            },
            origin: Some(Origin {
                peer: peer.map(|p| p.to_string()).unwrap_or_default(),
                rpc: JOIN_RPC.to_owned(),
            }),
        };
        let committed = self
            .store()
            .propose(envelope)
            .await
            .map_err(|e| Status::from(ApiError::from(e)))?;
        match committed.outcome {
            Ok(Response::JoinToken(_)) => {}
            Err(ApplyError::FailedPrecondition { reason, .. }) => {
                tracing::warn!(node = %r.node_id, peer = ?peer, %reason, "join refused");
                return Err(Status::unauthenticated(reason));
            }
            Err(e) => return Err(ApiError::from(e).into()),
            Ok(other) => {
                return Err(ApiError::Internal(format!("unexpected answer {other:?}")).into());
            }
        }
        tracing::info!(node = %r.node_id, serial = %cert.serial, "node joined");
        Ok(Reply::new(pb::JoinResponse {
            cert_pem: cert.chain_pem,
            ca_pem: ca.cert_pem().to_owned(),
            serial: cert.serial,
        }))
    }
}
