//! Nephele's TLS and PKI (issue 7): what every connection in the cluster
//! is authenticated with.
//!
//! It owns:
//! - the one rustls crypto provider ([`provider`]: `ring`, TLS 1.3 only;
//!   no aws-lc-rs, no OpenSSL anywhere),
//! - the cluster CA ([`ca`]): created by `neph-controller init`, stored in
//!   the replicated state with its key sealed by the operator key
//!   ([`seal`]), issuing certificates bound to `controller/<id>` or
//!   `node/<name>` ([`identity`]), signing node CSRs only for the expected
//!   identity,
//! - one-time, expiring node join tokens ([`join`]),
//! - the revocation set every handshake and call checks ([`revocation`]),
//! - the server and client configs of every connection ([`config`]), with
//!   certificates and keys reloaded from their files when rotated
//!   ([`reload`]), on the wire for tonic and raw streams ([`net`]), and the
//!   per-service peer checks of gRPC servers ([`interceptor`]).
//!
//! The threat model these serve is `docs/threat-model.md`.
//!
//! # Status
//!
//! This crate is complete and tested on its own (`tests/mtls.rs` runs real
//! TLS over loopback). Wired so far: `neph-controller init` (the sealed CA
//! committed to the replicated state) and the controller port
//! (`controller/src/tls.rs`, `server.rs`, raft `transport.rs`), the CLI,
//! node join and node certificates both ways (the agent's controller
//! client and its own port), and revocation of removed nodes and
//! controllers (`controller/src/api/revocation.rs`), and node certificate
//! renewal ([`renewal_due`], `compute-node/agent/src/join.rs`), and the
//! migration stream between nodes (`compute-node/agent/src/tunnel.rs`).
//! Not yet: renewal of controllers' own certificates, and revocations on
//! the agents' side (their revocation set stays empty). The wiring below
//! is the plan for those and what was followed for the rest.
//!
//! # Wiring, per component
//!
//! Files: a member keeps [`TlsFiles::in_dir`]`(dir)`: `ca.pem`, `cert.pem`
//! (leaf + CA), `key.pem` (0600). Every binary calls
//! [`install_default`] first in `main`.
//!
//! **`neph-controller init`** (controller/src/main.rs):
//! ```ignore
//! let op = OperatorKey::generate()?; op.save(&operator_key_path)?;     // operator keeps it
//! let ca = Ca::create(&cluster_id)?;
//! let sealed = ca.seal(&op)?;                                           // -> replicated state
//! let (cert, key) = ca.issue(&Identity::controller(id)?, &IssueOptions::for_addresses([advertise]))?;
//! // write ca.pem = ca.cert_pem(), cert.pem = cert.chain_pem, key.pem = key (write_private)
//! ```
//! A controller joining an existing cluster gets its certificate from the
//! leader (which opens the CA with `Ca::open(&sealed, &OperatorKey::load(path)?)`).
//!
//! **Controller server** (controller/src/server.rs, one port):
//! ```ignore
//! let tls = TlsContext::load(&TlsFiles::in_dir(&data_dir.join("tls")), revocations.clone())?;
//! let incoming = TlsIncoming::new(listener, tls.server_config(ClientAuth::Optional)?);
//! router.serve_with_incoming_shutdown(incoming, stopped)   // instead of TcpListenerStream
//! // per service:
//! ClusterServer::with_interceptor(raft, RequirePeer::kind(IdentityKind::Controller, revocations.clone()))
//! NodeAgentServer::with_interceptor(agents, RequirePeer::kind(IdentityKind::Node, revocations.clone()))
//! // public API services: no interceptor (bearer tokens, as today)
//! // in every NodeAgent handler: require_node(&request, &request.get_ref().node_id)?;
//! ```
//! `revocations` is refreshed from the replicated state (removed nodes'
//! identities and serials) with [`Revocations::replace`] whenever it
//! changes. `Request::remote_addr` keeps working for the audit log (tonic's
//! `tls-ring` feature, which this crate turns on, knows our TLS streams).
//!
//! **Controller → controller** (controller/src/raft/transport.rs):
//! `nephele_tls::net::lazy_channel(endpoint, tls.client_config(PeerPolicy::Kind(IdentityKind::Controller))?)`
//! instead of `Endpoint::connect_lazy()`.
//!
//! **Join** (`neph node join-token create`, controller side):
//! `JoinToken::issue(ttl)` → store the [`JoinTokenRecord`], print the token
//! and [`Ca::fingerprint`]. The join RPC (served on the controller port,
//! no client certificate) parses the token, `record.redeem(&token, node,
//! now)` through a replicated command, then `ca.sign_csr(csr, &node/<name>,
//! &IssueOptions::for_addresses([node address]))` and answers the chain.
//!
//! **Agent** (`neph-node`, compute-node/agent): at first start, with no
//! `tls/` yet: `CertRequest::generate(&Identity::node(name)?, cluster)`,
//! write `key.pem`, call the join RPC over
//! `connect_channel(endpoint, join_client_config(ca_fingerprint)?)`, write
//! `cert.pem` and `ca.pem` (the CA is the last certificate of the chain).
//! Then `TlsContext::load` and:
//! - to the controllers: `connect_channel(endpoint, tls.client_config(PeerPolicy::Kind(IdentityKind::Controller))?)`;
//! - its `Agent` service: `TlsIncoming::new(listener, tls.server_config(ClientAuth::Required)?)`
//!   plus `RequirePeer::kind(IdentityKind::Controller, ..)`.
//!
//! **CLI** (cli/src/client.rs): a profile gains `ca_file`; `Conn::connect`
//! uses `connect_channel(endpoint, server_auth_client_config(&ca_pem)?)`
//! and keeps the bearer token. `neph dev up` points the `dev` profile at
//! the dev cluster's `ca.pem`.
//!
//! **Migration stream** (node ↔ node): `neph-vmm` keeps its blocking
//! plaintext stream, and the two agents carry it over mutual TLS: the
//! source agent dials the target agent with
//! [`net::connect`]`(addr, tls.client_config(PeerPolicy::Exactly(node/<target>))?)`,
//! the target agent accepts with [`net::accept`] on a
//! `ServerConfig(ClientAuth::Required)` listener, reads
//! [`identity::connection_identity`] and accepts only a source node and
//! VM the controllers assigned to it, then splices the stream to its
//! `neph-vmm --incoming` on loopback or a Unix socket. This keeps rustls
//! (and its syscalls) out of the VMM's seccomp filter.

pub mod ca;
pub mod config;
mod files;
pub mod identity;
pub mod interceptor;
pub mod join;
pub mod net;
pub mod provider;
pub mod reload;
pub mod revocation;
pub mod seal;

pub use ca::{Ca, CertRequest, IssueOptions, IssuedCert, SealedCa, renewal_due};
pub use config::{
    ClientAuth, PeerPolicy, TlsConfigError, TlsContext, TlsFiles, join_client_config,
    server_auth_client_config,
};
pub use files::write_private;
pub use identity::{Identity, IdentityKind, PeerIdentity, peer_identity};
pub use interceptor::{RequirePeer, authenticated_peer, require_node};
pub use join::{JoinToken, JoinTokenRecord};
pub use net::{
    TlsConnector, TlsIncoming, bare_address, channel_uri, connect_channel, lazy_channel,
};
pub use provider::{install_default, provider};
pub use revocation::Revocations;
pub use seal::OperatorKey;

/// An error and its sources, joined by `": "` (for logs).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
