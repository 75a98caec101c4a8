//! The rustls configs of every connection in the cluster.
//!
//! | connection | server config | client config |
//! |---|---|---|
//! | CLI → controller API | [`TlsContext::server_config`]`(ClientAuth::Optional)` | [`server_auth_client_config`] (CA file + server name) |
//! | controller ↔ controller (raft) | same port, same config | [`TlsContext::client_config`]`(PeerPolicy::Kind(Controller))` |
//! | agent → controller | same port, same config | [`TlsContext::client_config`]`(PeerPolicy::Kind(Controller))` |
//! | controller → agent (console relay) | [`TlsContext::server_config`]`(ClientAuth::Required)` | [`TlsContext::client_config`]`(PeerPolicy::Exactly(node/<name>))` |
//! | node → node migration | [`TlsContext::server_config`]`(ClientAuth::Required)` | [`TlsContext::client_config`]`(PeerPolicy::Exactly(node/<target>))` |
//! | joining node → controller | (the controller's config) | [`join_client_config`] (CA pinned by fingerprint) |
//!
//! Every verifier here checks, in order: the chain leads to the cluster CA
//! (and is valid now), the leaf names one member identity of this cluster,
//! the identity and the serial are not revoked ([`Revocations`]), and, on
//! the client side, the identity is the one expected ([`PeerPolicy`]).
//! Between members the identity is what is checked, not the address they
//! were dialled at (addresses change, NAT, pods); the CLI, which has no
//! identity of its own to compare, checks the server name against the
//! certificate's address SANs like any HTTPS client, and that the server
//! is a controller.
//!
//! The controller's one port serves the CLI (no client certificate) and
//! the members (client certificate) alike, so its server config makes
//! client certificates optional and each gRPC service says who may call it
//! with [`crate::interceptor::RequirePeer`]. A certificate that is
//! presented is always fully verified: a bad one fails the handshake.
//!
//! Not done yet: the CA file is read once (rotating the CA itself needs a
//! restart; leaf certificates and keys reload, see [`crate::reload`]), and
//! there is no CRL or OCSP: revocation is the set the caller keeps.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use thiserror::Error;

use crate::identity::{Identity, IdentityKind, PeerIdentity, identity_of_cert};
use crate::provider::{ALPN_H2, PROTOCOL_VERSIONS, provider};
use crate::reload::{LoadCertError, ReloadingCert};
use crate::revocation::Revocations;

/// The three files of a member: the cluster CA certificate, its own
/// certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate, PEM.
    pub ca: PathBuf,
    /// The member's certificate chain (leaf first), PEM.
    pub cert: PathBuf,
    /// The member's private key, PEM (mode 0600).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The conventional layout in a directory: `ca.pem`, `cert.pem`,
    /// `key.pem` (a controller's `<data-dir>/tls/`, a node's
    /// `<state-dir>/tls/`).
    pub fn in_dir(dir: &Path) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}

/// Whether a server asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a member certificate (agent, migration).
    Required,
    /// Clients may present one (the controller port: the CLI does not).
    Optional,
}

/// Whom a client accepts as the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Any member of the cluster.
    AnyMember,
    /// Any member of this kind (e.g. any controller).
    Kind(IdentityKind),
    /// Exactly this member (e.g. the node a VM migrates to).
    Exactly(Identity),
}

impl PeerPolicy {
    /// Whether `peer` satisfies the policy.
    pub fn check(&self, peer: &Identity) -> Result<(), WrongPeerError> {
        let ok = match self {
            PeerPolicy::AnyMember => true,
            PeerPolicy::Kind(k) => peer.kind() == *k,
            PeerPolicy::Exactly(id) => peer == id,
        };
        if ok {
            Ok(())
        } else {
            Err(WrongPeerError {
                expected: self.clone(),
                presented: peer.clone(),
            })
        }
    }
}

impl std::fmt::Display for PeerPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerPolicy::AnyMember => f.write_str("any cluster member"),
            PeerPolicy::Kind(k) => write!(f, "a {k}"),
            PeerPolicy::Exactly(id) => write!(f, "{id}"),
        }
    }
}

/// A peer is not the one expected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("the peer presents {presented} but {expected} was expected")]
pub struct WrongPeerError {
    /// Whom the policy accepts.
    pub expected: PeerPolicy,
    /// Who the peer is.
    pub presented: Identity,
}

/// The peer's certificate is from another cluster.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("the peer belongs to cluster {presented}, not {expected}")]
pub struct OtherClusterError {
    /// This cluster.
    pub expected: String,
    /// The peer's.
    pub presented: String,
}

/// Why a TLS config could not be built.
#[derive(Debug, Error)]
pub enum TlsConfigError {
    /// The CA file could not be read.
    #[error("cannot read the CA certificate {path}")]
    ReadCa {
        /// The file.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("{0} holds no usable CA certificate")]
    BadCa(String),
    /// The member's own certificate or key.
    #[error(transparent)]
    Cert(#[from] LoadCertError),
    /// The member's certificate is not signed by the CA in the CA file.
    #[error("the certificate does not chain to the CA certificate")]
    NotIssuedByCa(#[source] rustls::Error),
    /// The CA fingerprint is not 64 hex digits.
    #[error("the CA fingerprint must be 64 hex digits (SHA-256)")]
    Fingerprint,
    /// rustls refused the settings.
    #[error("rustls refused the TLS settings")]
    Rustls(#[source] rustls::Error),
    /// rustls refused the client verifier settings.
    #[error("rustls refused the client verifier settings")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// Everything a member needs for TLS: the cluster CA, its own certificate
/// (reloaded on rotation) and the revocation set. Build it once at start
/// and make every server and client config from it.
#[derive(Debug, Clone)]
pub struct TlsContext {
    roots: Arc<RootCertStore>,
    cert: Arc<ReloadingCert>,
    revocations: Revocations,
    cluster_id: String,
}

fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let pem = std::fs::read(path).map_err(|source| TlsConfigError::ReadCa {
        path: path.display().to_string(),
        source,
    })?;
    roots_from_pem(&pem).ok_or_else(|| TlsConfigError::BadCa(path.display().to_string()))
}

fn roots_from_pem(pem: &[u8]) -> Option<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(pem) {
        roots.add(der.ok()?).ok()?;
    }
    (!roots.is_empty()).then(|| Arc::new(roots))
}

fn other_error(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The checks after chain verification, shared by both sides.
fn check_member(
    end_entity: &CertificateDer<'_>,
    cluster_id: &str,
    revocations: &Revocations,
    policy: &PeerPolicy,
) -> Result<PeerIdentity, rustls::Error> {
    let peer = identity_of_cert(end_entity).map_err(other_error)?;
    if peer.cluster_id != cluster_id {
        return Err(other_error(OtherClusterError {
            expected: cluster_id.to_owned(),
            presented: peer.cluster_id,
        }));
    }
    if revocations.check(&peer).is_err() {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
    }
    policy.check(&peer.identity).map_err(other_error)?;
    Ok(peer)
}

impl TlsContext {
    /// Loads the files; the member certificate must chain to the CA and
    /// name a member identity. `revocations` is shared with the caller,
    /// who keeps it current.
    pub fn load(files: &TlsFiles, revocations: Revocations) -> Result<Self, TlsConfigError> {
        Self::load_with_interval(files, revocations, crate::reload::DEFAULT_CHECK_INTERVAL)
    }

    /// [`load`](Self::load), looking at the certificate files for a
    /// rotation at most every `check_interval` (tests use zero).
    pub fn load_with_interval(
        files: &TlsFiles,
        revocations: Revocations,
        check_interval: std::time::Duration,
    ) -> Result<Self, TlsConfigError> {
        let roots = read_roots(&files.ca)?;
        let cert =
            ReloadingCert::load(&files.cert, &files.key)?.with_check_interval(check_interval);
        Self::new(roots, cert, revocations)
    }

    fn new(
        roots: Arc<RootCertStore>,
        cert: ReloadingCert,
        revocations: Revocations,
    ) -> Result<Self, TlsConfigError> {
        let current = cert.current();
        let leaf = current
            .end_entity_cert()
            .map_err(TlsConfigError::NotIssuedByCa)?;
        let parsed = ParsedCertificate::try_from(leaf).map_err(TlsConfigError::NotIssuedByCa)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            current.cert.get(1..).unwrap_or(&[]),
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .or_else(|e| match e {
            // An expired certificate is still ours: start, refuse nothing
            // locally, and let peers refuse it until it is renewed.
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => {
                tracing::warn!("this member's TLS certificate has expired; peers will refuse it");
                Ok(())
            }
            e => Err(TlsConfigError::NotIssuedByCa(e)),
        })?;
        let cluster_id = cert.identity().cluster_id;
        Ok(TlsContext {
            roots,
            cert: Arc::new(cert),
            revocations,
            cluster_id,
        })
    }

    /// This member's identity and current serial.
    pub fn identity(&self) -> PeerIdentity {
        self.cert.identity()
    }

    /// The cluster id (from this member's certificate).
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The revocation set every config made from this context checks.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// The reloading certificate (to force a reload, e.g. on SIGHUP).
    pub fn certificate(&self) -> &Arc<ReloadingCert> {
        &self.cert
    }

    /// A server config presenting this member's certificate; client
    /// certificates required or optional, always verified when present.
    pub fn server_config(
        &self,
        client_auth: ClientAuth,
    ) -> Result<Arc<ServerConfig>, TlsConfigError> {
        let builder = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        let builder = match client_auth {
            ClientAuth::Required => builder,
            ClientAuth::Optional => builder.allow_unauthenticated(),
        };
        let verifier = Arc::new(MemberClientVerifier {
            inner: builder.build().map_err(TlsConfigError::Verifier)?,
            cluster_id: self.cluster_id.clone(),
            revocations: self.revocations.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .map_err(TlsConfigError::Rustls)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.cert.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        no_server_resumption(&mut config);
        Ok(Arc::new(config))
    }

    /// A mutual-TLS client config: presents this member's certificate and
    /// accepts only a server that `policy` names.
    pub fn client_config(&self, policy: PeerPolicy) -> Result<Arc<ClientConfig>, TlsConfigError> {
        let verifier = Arc::new(MemberServerVerifier {
            roots: self.roots.clone(),
            provider: provider(),
            cluster_id: Some(self.cluster_id.clone()),
            revocations: self.revocations.clone(),
            policy,
            check_name: false,
            pinned: None,
        });
        client_config(verifier, Some(self.cert.clone()))
    }
}

/// Every client config: h2, no session resumption (see
/// [`no_server_resumption`]), the server checked by `verifier`, and this
/// member's certificate presented when `cert` is given.
fn client_config(
    verifier: Arc<MemberServerVerifier>,
    cert: Option<Arc<ReloadingCert>>,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(TlsConfigError::Rustls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        Some(cert) => builder.with_client_cert_resolver(cert),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Session resumption would let a peer skip certificate verification, so
/// a revoked or rotated certificate would keep working on resumed
/// sessions: every handshake is a full one (our connections are few and
/// long-lived, so the cost is small).
fn no_server_resumption(config: &mut ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// The CLI's config: no client certificate (it authenticates with a bearer
/// token), the server must chain to the CA in `ca_pem`, match the address
/// dialled, and be a controller.
pub fn server_auth_client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let roots = roots_from_pem(ca_pem).ok_or_else(|| TlsConfigError::BadCa("the CA PEM".into()))?;
    let verifier = Arc::new(MemberServerVerifier {
        roots,
        provider: provider(),
        cluster_id: None,
        revocations: Revocations::new(),
        policy: PeerPolicy::Kind(IdentityKind::Controller),
        check_name: true,
        pinned: None,
    });
    client_config(verifier, None)
}

/// A joining node's config, before it has the CA certificate: the server
/// must present a chain that includes a CA certificate whose SHA-256 is
/// `ca_fingerprint` (64 hex digits, from `neph node join-token create`),
/// the leaf must chain to it and be a controller. Controllers present
/// `leaf + CA` ([`crate::IssuedCert::chain_pem`]), so the node can keep
/// that CA certificate as its trust anchor from then on.
pub fn join_client_config(ca_fingerprint: &str) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let fp = ca_fingerprint.trim().to_ascii_lowercase();
    if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TlsConfigError::Fingerprint);
    }
    let verifier = Arc::new(MemberServerVerifier {
        roots: Arc::new(RootCertStore::empty()),
        provider: provider(),
        cluster_id: None,
        revocations: Revocations::new(),
        policy: PeerPolicy::Kind(IdentityKind::Controller),
        check_name: false,
        pinned: Some(fp),
    });
    client_config(verifier, None)
}

/// Server side: rustls' WebPKI chain check, then ours.
#[derive(Debug)]
struct MemberClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster_id: String,
    revocations: Revocations,
}

impl ClientCertVerifier for MemberClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_member(
            end_entity,
            &self.cluster_id,
            &self.revocations,
            &PeerPolicy::AnyMember,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: chain to the CA (or to the pinned CA), optionally the
/// server name, then identity, cluster, revocation and policy.
#[derive(Debug)]
struct MemberServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    /// `None`: the cluster of the CA (the CLI and a joining node do not
    /// know the id; the CA decides).
    cluster_id: Option<String>,
    revocations: Revocations,
    policy: PeerPolicy,
    check_name: bool,
    /// A CA fingerprint to find among the presented certificates.
    pinned: Option<String>,
}

impl ServerCertVerifier for MemberServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        let algs = self.provider.signature_verification_algorithms.all;
        match &self.pinned {
            None => verify_server_cert_signed_by_trust_anchor(
                &cert,
                &self.roots,
                intermediates,
                now,
                algs,
            )?,
            Some(fp) => {
                let ca = intermediates
                    .iter()
                    .find(|c| crate::ca::fingerprint(c) == *fp)
                    .ok_or(rustls::Error::InvalidCertificate(
                        CertificateError::UnknownIssuer,
                    ))?;
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone().into_owned()).map_err(|_| {
                    rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
                })?;
                verify_server_cert_signed_by_trust_anchor(&cert, &roots, &[], now, algs)?;
            }
        }
        if self.check_name {
            verify_server_name(&cert, server_name)?;
        }
        let peer = identity_of_cert(end_entity).map_err(other_error)?;
        let cluster = self.cluster_id.as_deref().unwrap_or(&peer.cluster_id);
        check_member(end_entity, cluster, &self.revocations, &self.policy)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_name_the_expected_peers() {
        let a = Identity::node("a").unwrap();
        let c = Identity::controller("1").unwrap();
        assert!(PeerPolicy::AnyMember.check(&a).is_ok());
        assert!(PeerPolicy::Kind(IdentityKind::Controller).check(&c).is_ok());
        assert!(
            PeerPolicy::Kind(IdentityKind::Controller)
                .check(&a)
                .is_err()
        );
        let e = PeerPolicy::Exactly(Identity::node("b").unwrap())
            .check(&a)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the peer presents node/a but node/b was expected"
        );
    }

    #[test]
    fn bad_fingerprints_and_ca_files_are_refused() {
        assert!(matches!(
            join_client_config("abc"),
            Err(TlsConfigError::Fingerprint)
        ));
        assert!(join_client_config(&"a".repeat(64)).is_ok());
        assert!(matches!(
            server_auth_client_config(b"not pem"),
            Err(TlsConfigError::BadCa(_))
        ));
    }
}
