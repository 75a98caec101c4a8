//! Who a certificate speaks for: [`Identity`] (`controller/<id>`,
//! `node/<name>`), how it is written into a certificate, and how it is read
//! back from the certificates a peer presented, on a raw TLS connection or a
//! tonic request.
//!
//! An identity is carried in exactly one URI subject alternative name,
//! `nephele://<cluster-id>/<kind>/<name>` (the subject's common name repeats
//! `<kind>/<name>` for people reading the certificate, and is never
//! trusted). The URI is only meaningful once the chain has been verified
//! against the cluster CA, which the TLS configs of [`crate::config`] do
//! before any code here sees the certificate.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;
use thiserror::Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The URI scheme of identity SANs.
pub const URI_SCHEME: &str = "nephele://";

/// Longest id, node name or cluster id (a DNS label, RFC 1123).
pub const MAX_NAME_LEN: usize = 63;

/// The kind of a cluster member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityKind {
    /// A controller (`controller/<id>`): raft peer, API server.
    Controller,
    /// A compute node (`node/<name>`): its agent and its migrations.
    Node,
}

impl IdentityKind {
    /// The word used in identities: `controller` or `node`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Controller => "controller",
            IdentityKind::Node => "node",
        }
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cluster member a certificate is issued to: `controller/<id>` or
/// `node/<name>`. The name is 1 to 63 characters of `a-z`, `0-9` and `-`,
/// neither starting nor ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    kind: IdentityKind,
    name: String,
}

/// Why a string is not an identity (or a cluster id).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseIdentityError {
    /// No `/` between kind and name.
    #[error("identity {0:?} is not of the form controller/<id> or node/<name>")]
    Form(String),
    /// The kind is neither `controller` nor `node`.
    #[error("identity kind {0:?} is neither \"controller\" nor \"node\"")]
    Kind(String),
    /// The name breaks the naming rule.
    #[error(
        "name {0:?} must be 1 to 63 characters of a-z, 0-9 and '-', neither starting nor ending with '-'"
    )]
    Name(String),
}

/// Checks a node name, controller id or cluster id against the naming rule.
pub fn validate_name(name: &str) -> Result<(), ParseIdentityError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ParseIdentityError::Name(name.to_owned()))
    }
}

impl Identity {
    /// `controller/<id>`.
    pub fn controller(id: impl Into<String>) -> Result<Self, ParseIdentityError> {
        Self::new(IdentityKind::Controller, id.into())
    }

    /// `node/<name>`.
    pub fn node(name: impl Into<String>) -> Result<Self, ParseIdentityError> {
        Self::new(IdentityKind::Node, name.into())
    }

    /// An identity of this kind and name.
    pub fn new(kind: IdentityKind, name: String) -> Result<Self, ParseIdentityError> {
        validate_name(&name)?;
        Ok(Identity { kind, name })
    }

    /// Controller or node.
    pub fn kind(&self) -> IdentityKind {
        self.kind
    }

    /// The controller id or node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SAN URI naming this identity in `cluster_id`.
    pub fn to_uri(&self, cluster_id: &str) -> String {
        format!("{URI_SCHEME}{cluster_id}/{}/{}", self.kind, self.name)
    }

    /// Reads `nephele://<cluster-id>/<kind>/<name>`, giving the cluster id
    /// and the identity.
    pub fn from_uri(uri: &str) -> Result<(String, Identity), ParseIdentityError> {
        let rest = uri
            .strip_prefix(URI_SCHEME)
            .ok_or_else(|| ParseIdentityError::Form(uri.to_owned()))?;
        let (cluster, identity) = rest
            .split_once('/')
            .ok_or_else(|| ParseIdentityError::Form(uri.to_owned()))?;
        validate_name(cluster)?;
        Ok((cluster.to_owned(), identity.parse()?))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl FromStr for Identity {
    type Err = ParseIdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, name) = s
            .split_once('/')
            .ok_or_else(|| ParseIdentityError::Form(s.to_owned()))?;
        let kind = match kind {
            "controller" => IdentityKind::Controller,
            "node" => IdentityKind::Node,
            other => return Err(ParseIdentityError::Kind(other.to_owned())),
        };
        Identity::new(kind, name.to_owned())
    }
}

/// What a verified peer certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The member it was issued to.
    pub identity: Identity,
    /// The cluster named in its identity URI.
    pub cluster_id: String,
    /// The certificate's serial number, lowercase hex (what revocation
    /// lists hold).
    pub serial: String,
}

/// Why no identity could be read from a peer's certificates.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PeerIdentityError {
    /// The peer presented no certificate (a CLI, or a connection without
    /// TLS).
    #[error("the peer presented no client certificate")]
    NoCertificate,
    /// The certificate is not valid DER X.509.
    #[error("the peer certificate cannot be parsed")]
    Malformed,
    /// No `nephele://` URI, or more than one.
    #[error("the peer certificate names {0} nephele identities instead of one")]
    IdentityCount(usize),
    /// The URI is not a valid identity.
    #[error("the peer certificate's identity is invalid")]
    Invalid(#[source] ParseIdentityError),
}

/// Reads the identity out of a certificate (the leaf of a chain that has
/// already been verified).
pub fn identity_of_cert(der: &CertificateDer<'_>) -> Result<PeerIdentity, PeerIdentityError> {
    let (rest, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|_| PeerIdentityError::Malformed)?;
    if !rest.is_empty() {
        return Err(PeerIdentityError::Malformed);
    }
    let sans = cert
        .subject_alternative_name()
        .map_err(|_| PeerIdentityError::Malformed)?;
    let uris: Vec<&str> = sans
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with(URI_SCHEME) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(PeerIdentityError::IdentityCount(uris.len()));
    };
    let (cluster_id, identity) = Identity::from_uri(uri).map_err(PeerIdentityError::Invalid)?;
    Ok(PeerIdentity {
        identity,
        cluster_id,
        serial: hex(cert.raw_serial()),
    })
}

/// The identity of whoever sent a tonic request over a connection accepted
/// by [`crate::net::TlsIncoming`]: the leaf of the client certificate chain
/// the TLS handshake verified. A client without a certificate (the CLI)
/// gets [`PeerIdentityError::NoCertificate`].
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<PeerIdentity, PeerIdentityError> {
    let certs = request
        .peer_certs()
        .ok_or(PeerIdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(PeerIdentityError::NoCertificate)?;
    identity_of_cert(leaf)
}

/// The identity of the peer of a raw TLS connection (the migration
/// stream), once its handshake has completed.
pub fn connection_identity(conn: &rustls::CommonState) -> Result<PeerIdentity, PeerIdentityError> {
    let certs = conn
        .peer_certificates()
        .ok_or(PeerIdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(PeerIdentityError::NoCertificate)?;
    identity_of_cert(leaf)
}

/// Lowercase hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_and_print() {
        let n: Identity = "node/a-1".parse().unwrap();
        assert_eq!(n.kind(), IdentityKind::Node);
        assert_eq!(n.name(), "a-1");
        assert_eq!(n.to_string(), "node/a-1");
        let c = Identity::controller("1").unwrap();
        assert_eq!(c.to_string(), "controller/1");
        assert_eq!(c.to_uri("prod"), "nephele://prod/controller/1");
        assert_eq!(
            Identity::from_uri("nephele://prod/controller/1").unwrap(),
            ("prod".to_owned(), c)
        );
    }

    #[test]
    fn bad_identities_are_refused() {
        for bad in [
            "node", "node/", "node/A", "node/-a", "node/a-", "node/a/b", "user/a", "node/a b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
        assert!(Identity::node("x".repeat(64)).is_err());
        assert!(Identity::node("x".repeat(63)).is_ok());
        for bad in [
            "https://prod/node/a",
            "nephele://prod",
            "nephele://Prod/node/a",
            "nephele:///node/a",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_certificates_are_malformed() {
        let der = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01]);
        assert_eq!(identity_of_cert(&der), Err(PeerIdentityError::Malformed));
        let req = tonic::Request::new(());
        assert_eq!(peer_identity(&req), Err(PeerIdentityError::NoCertificate));
    }
}
