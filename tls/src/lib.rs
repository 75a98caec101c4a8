//! Nephele's TLS and PKI (issue 7): the one rustls crypto provider, the
//! cluster CA, node join tokens and member identities. The TLS configs of
//! every component follow in this crate.

pub mod ca;
mod files;
pub mod identity;
pub mod join;
pub mod provider;
pub mod revocation;
pub mod seal;

pub use ca::{Ca, CertRequest, IssueOptions, IssuedCert, SealedCa};
pub use files::write_private;
pub use identity::{Identity, IdentityKind, PeerIdentity, peer_identity};
pub use join::{JoinToken, JoinTokenRecord};
pub use provider::{install_default, provider};
pub use revocation::Revocations;
pub use seal::OperatorKey;
