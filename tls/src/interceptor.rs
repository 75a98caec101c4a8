//! Per-service peer checks for tonic servers: [`RequirePeer`] lets a call
//! through only from a member certificate the policy accepts and that is
//! not revoked (checked per call, so revoking also stops connections that
//! were already open), and leaves the [`PeerIdentity`] in the request's
//! extensions for the handler ([`authenticated_peer`]). [`require_node`]
//! is the handler-side check that "the node presenting node/a is node a".
//!
//! ```ignore
//! // controller: node agents only, and each one only as itself.
//! let agents = NodeAgentServer::with_interceptor(svc, RequirePeer::kind(IdentityKind::Node, revocations.clone()));
//! // in RegisterNode: nephele_tls::require_node(&request, &request.get_ref().node_id)?;
//! ```

use tonic::{Request, Status};

use crate::config::PeerPolicy;
use crate::identity::{Identity, IdentityKind, PeerIdentity, PeerIdentityError, peer_identity};
use crate::revocation::Revocations;

/// A tonic interceptor admitting only member certificates `policy` names.
#[derive(Debug, Clone)]
pub struct RequirePeer {
    policy: PeerPolicy,
    revocations: Revocations,
}

impl RequirePeer {
    /// Admits peers the policy accepts.
    pub fn new(policy: PeerPolicy, revocations: Revocations) -> Self {
        RequirePeer {
            policy,
            revocations,
        }
    }

    /// Admits any member of this kind.
    pub fn kind(kind: IdentityKind, revocations: Revocations) -> Self {
        Self::new(PeerPolicy::Kind(kind), revocations)
    }

    /// Checks a request's peer, the way the interceptor does.
    pub fn check<T>(&self, request: &Request<T>) -> Result<PeerIdentity, Status> {
        let peer = peer_identity(request).map_err(|e| match e {
            PeerIdentityError::NoCertificate => Status::unauthenticated(format!(
                "this service needs a client certificate of {}",
                self.policy
            )),
            other => Status::unauthenticated(other.to_string()),
        })?;
        self.revocations
            .check(&peer)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        self.policy
            .check(&peer.identity)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        Ok(peer)
    }
}

impl tonic::service::Interceptor for RequirePeer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let peer = self.check(&request)?;
        request.extensions_mut().insert(peer);
        Ok(request)
    }
}

/// The peer [`RequirePeer`] admitted, in a handler.
pub fn authenticated_peer<T>(request: &Request<T>) -> Option<&PeerIdentity> {
    request.extensions().get::<PeerIdentity>()
}

/// Refuses a call about node `node` unless it comes from `node/<node>`'s
/// certificate (behind [`RequirePeer`], or read from the connection).
pub fn require_node<T>(request: &Request<T>, node: &str) -> Result<(), Status> {
    let peer = match authenticated_peer(request) {
        Some(p) => p.clone(),
        None => peer_identity(request).map_err(|e| Status::unauthenticated(e.to_string()))?,
    };
    let claimed = Identity::node(node).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if peer.identity != claimed {
        return Err(Status::permission_denied(format!(
            "the caller presents {} and cannot act as {claimed}",
            peer.identity
        )));
    }
    Ok(())
}
