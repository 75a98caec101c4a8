//! The cluster certificate authority: created once by `neph-controller
//! init`, kept in the replicated state as a [`SealedCa`] (its private key
//! sealed with the operator key, see [`crate::seal`]), and used by the
//! leader to issue member certificates.
//!
//! - [`Ca::create`] makes a self-signed ECDSA P-256 CA for a cluster id,
//!   valid 10 years, allowed to sign leaf certificates only (path length 0).
//! - [`Ca::issue`] makes a key pair and a certificate for a controller
//!   (controllers are bootstrapped by the CA holder itself).
//! - A node makes its own key pair and a CSR with [`CertRequest::generate`];
//!   its private key never leaves it. [`Ca::sign_csr`] signs the CSR's
//!   public key only if the CSR names exactly the identity the caller
//!   expects (the one the join token was redeemed for); nothing else from
//!   the CSR is copied: validity, key usage, basic constraints and the
//!   address SANs are the CA's choice.
//!
//! Every leaf certificate carries the identity URI of [`crate::identity`],
//! the addresses it serves on as IP or DNS SANs, both the server and the
//! client extended key usages (every member is both), and a random 127-bit
//! serial number (what revocation uses).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use x509_parser::extensions::GeneralName;

use crate::identity::{Identity, URI_SCHEME, hex, validate_name};
use crate::seal::{self, OperatorKey, SealError, UnsealError};

/// How long a CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The default validity of a member certificate.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far back a certificate's `notBefore` is put, for clocks slightly
/// behind the CA's.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// The cluster CA, unsealed, in memory.
pub struct Ca {
    cluster_id: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cluster_id", &self.cluster_id)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// The CA as the replicated state keeps it: the certificate in the clear,
/// the private key sealed with the operator key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedCa {
    /// The cluster the CA belongs to.
    pub cluster_id: String,
    /// The CA certificate, PEM (every member's trust anchor).
    pub cert_pem: String,
    /// The PKCS#8 private key, sealed (see [`crate::seal`]).
    pub sealed_key: Vec<u8>,
}

/// What a certificate is issued with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    /// Addresses the member is reached at: IP addresses or DNS names (a
    /// `:port` suffix is ignored). Each becomes a SAN, so clients that
    /// check the server name (the CLI) accept it.
    pub addresses: Vec<String>,
    /// How long it is valid from now.
    pub validity: Duration,
    /// Start of validity; `None` is now minus [`CLOCK_SKEW`]. Tests use it
    /// to make certificates that have already expired.
    pub not_before: Option<SystemTime>,
}

impl Default for IssueOptions {
    fn default() -> Self {
        IssueOptions {
            addresses: Vec::new(),
            validity: DEFAULT_VALIDITY,
            not_before: None,
        }
    }
}

impl IssueOptions {
    /// Default options with these addresses.
    pub fn for_addresses<S: Into<String>>(addresses: impl IntoIterator<Item = S>) -> Self {
        IssueOptions {
            addresses: addresses.into_iter().map(Into::into).collect(),
            ..IssueOptions::default()
        }
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// Who it is for.
    pub identity: Identity,
    /// Serial number, lowercase hex (what revocation lists hold).
    pub serial: String,
    /// The certificate followed by the CA certificate, PEM: what a member
    /// writes to its certificate file and presents.
    pub chain_pem: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// A key pair and a CSR, made on the node that will hold the key.
#[derive(Debug, Clone)]
pub struct CertRequest {
    /// The CSR, PEM: sent to the controller with the join token.
    pub csr_pem: String,
    /// The private key, PKCS#8 PEM: written to the node's key file, never
    /// sent anywhere.
    pub key_pem: String,
}

/// Why a CA could not be created.
#[derive(Debug, Error)]
pub enum CreateCaError {
    /// The cluster id breaks the naming rule.
    #[error("invalid cluster id")]
    ClusterId(#[source] crate::identity::ParseIdentityError),
    /// Key generation or signing failed.
    #[error("cannot generate the CA key or certificate")]
    Generate(#[source] rcgen::Error),
}

/// Why a sealed CA could not be opened.
#[derive(Debug, Error)]
pub enum OpenCaError {
    /// The operator key does not open it.
    #[error("cannot unseal the CA private key")]
    Unseal(#[from] UnsealError),
    /// The unsealed key or the certificate is not usable.
    #[error("the stored CA key or certificate is invalid")]
    Invalid(#[source] rcgen::Error),
    /// The key does not belong to the certificate.
    #[error("the stored CA key does not match the CA certificate")]
    KeyMismatch,
}

/// Why a certificate could not be issued.
#[derive(Debug, Error)]
pub enum IssueError {
    /// An address is neither an IP address nor a DNS name.
    #[error("address {0:?} is neither an IP address nor a DNS name")]
    Address(String),
    /// The validity runs past what can be encoded.
    #[error("the validity period is out of range")]
    Validity,
    /// The OS random source failed.
    #[error("the system random source failed")]
    Random,
    /// Key generation or signing failed.
    #[error("cannot generate or sign the certificate")]
    Sign(#[source] rcgen::Error),
}

/// Why a CSR was not signed.
#[derive(Debug, Error)]
pub enum SignCsrError {
    /// Not a CSR, or its self-signature does not verify.
    #[error("the certificate signing request is malformed or its signature is invalid")]
    Malformed(#[source] rcgen::Error),
    /// The CSR names no identity, or several.
    #[error("the certificate signing request names {0} nephele identities instead of one")]
    IdentityCount(usize),
    /// The CSR names someone other than the expected member.
    #[error("the certificate signing request is for {requested}, not {expected}")]
    IdentityMismatch {
        /// What the CSR asked for.
        requested: String,
        /// What the caller expected.
        expected: String,
    },
    /// Issuing failed.
    #[error(transparent)]
    Issue(#[from] IssueError),
}

fn ca_context(cluster_id: &str) -> Vec<u8> {
    format!("nephele ca key|{cluster_id}").into_bytes()
}

impl Ca {
    /// A new CA for `cluster_id` (a DNS label).
    pub fn create(cluster_id: &str) -> Result<Ca, CreateCaError> {
        validate_name(cluster_id).map_err(CreateCaError::ClusterId)?;
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CreateCaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Nephele");
        dn.push(DnType::CommonName, ca_common_name(cluster_id));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + CA_VALIDITY).into();
        params.serial_number = Some(
            random_serial().map_err(|_| CreateCaError::Generate(rcgen::Error::RingUnspecified))?,
        );
        let cert = params.self_signed(&key).map_err(CreateCaError::Generate)?;
        Ok(Ca {
            cluster_id: cluster_id.to_owned(),
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The cluster id.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The CA certificate, PEM: the trust anchor every member is given.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate, lowercase hex: what a joining node
    /// pins before it has the CA certificate (see [`crate::config::join_client_config`]).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// The CA with its key sealed under the operator key, for the
    /// replicated state.
    pub fn seal(&self, key: &OperatorKey) -> Result<SealedCa, SealError> {
        let sealed_key = seal::seal(
            key,
            self.issuer.key().serialize_pem().as_bytes(),
            &ca_context(&self.cluster_id),
        )?;
        Ok(SealedCa {
            cluster_id: self.cluster_id.clone(),
            cert_pem: self.cert_pem.clone(),
            sealed_key,
        })
    }

    /// Issues a certificate and a new key pair for `identity` (for members
    /// whose key may be made by the CA holder: controllers at `init`, and
    /// `neph dev up`). Returns the certificate and the private key, PEM.
    pub fn issue(
        &self,
        identity: &Identity,
        options: &IssueOptions,
    ) -> Result<(IssuedCert, String), IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IssueError::Sign)?;
        let params = self.leaf_params(identity, options)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(IssueError::Sign)?;
        Ok((
            self.issued(identity, &params, &cert.pem()),
            key.serialize_pem(),
        ))
    }

    /// Signs a node's CSR if it names `expected` (and this cluster);
    /// otherwise refuses with [`SignCsrError::IdentityMismatch`].
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        expected: &Identity,
        options: &IssueOptions,
    ) -> Result<IssuedCert, SignCsrError> {
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(SignCsrError::Malformed)?;
        let requested: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(u) if u.as_str().starts_with(URI_SCHEME) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        let [requested] = requested.as_slice() else {
            return Err(SignCsrError::IdentityCount(requested.len()));
        };
        let want = expected.to_uri(&self.cluster_id);
        if *requested != want {
            return Err(SignCsrError::IdentityMismatch {
                requested: requested.clone(),
                expected: want,
            });
        }
        // Only the public key is taken from the CSR.
        csr.params = self.leaf_params(expected, options)?;
        let cert = csr.signed_by(&self.issuer).map_err(IssueError::Sign)?;
        Ok(self.issued(expected, &csr.params, &cert.pem()))
    }

    /// Opens a sealed CA with the operator key.
    pub fn open(sealed: &SealedCa, key: &OperatorKey) -> Result<Ca, OpenCaError> {
        let key_pem = seal::unseal(key, &sealed.sealed_key, &ca_context(&sealed.cluster_id))?;
        let key_pem = String::from_utf8(key_pem).map_err(|_| OpenCaError::KeyMismatch)?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(OpenCaError::Invalid)?;
        let issuer =
            Issuer::from_ca_cert_pem(&sealed.cert_pem, key_pair).map_err(OpenCaError::Invalid)?;
        let cert_der = rustls_pki_types::pem::PemObject::from_pem_slice(sealed.cert_pem.as_bytes())
            .map_err(|_| OpenCaError::Invalid(rcgen::Error::CouldNotParseCertificate))?;
        let spki = spki_of(&cert_der).ok_or(OpenCaError::KeyMismatch)?;
        if spki != issuer.key().public_key_raw() {
            return Err(OpenCaError::KeyMismatch);
        }
        Ok(Ca {
            cluster_id: sealed.cluster_id.clone(),
            cert_der,
            cert_pem: sealed.cert_pem.clone(),
            issuer,
        })
    }

    fn leaf_params(
        &self,
        identity: &Identity,
        options: &IssueOptions,
    ) -> Result<CertificateParams, IssueError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Nephele");
        dn.push(DnType::CommonName, identity.to_string());
        params.distinguished_name = dn;
        let uri = identity
            .to_uri(&self.cluster_id)
            .try_into()
            .map_err(IssueError::Sign)?;
        params.subject_alt_names.push(SanType::URI(uri));
        for a in &options.addresses {
            params.subject_alt_names.push(address_san(a)?);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        // Valid for `validity` from now (or from the given start), backdated
        // by the clock skew so a peer whose clock is behind accepts it.
        let now = SystemTime::now();
        let start = options.not_before.unwrap_or(now);
        let not_before = options.not_before.unwrap_or(now - CLOCK_SKEW);
        let not_after = start
            .checked_add(options.validity)
            .ok_or(IssueError::Validity)?;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial()?);
        Ok(params)
    }

    fn issued(&self, identity: &Identity, params: &CertificateParams, pem: &str) -> IssuedCert {
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex(&s.to_bytes()))
            .unwrap_or_default();
        IssuedCert {
            identity: identity.clone(),
            serial,
            chain_pem: format!("{pem}{}", self.cert_pem),
            not_after: params.not_after.into(),
        }
    }
}

impl CertRequest {
    /// A new ECDSA P-256 key pair and a CSR naming `identity` in
    /// `cluster_id`.
    pub fn generate(identity: &Identity, cluster_id: &str) -> Result<CertRequest, IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IssueError::Sign)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.to_string());
        params.distinguished_name = dn;
        let uri = identity
            .to_uri(cluster_id)
            .try_into()
            .map_err(IssueError::Sign)?;
        params.subject_alt_names.push(SanType::URI(uri));
        let csr = params.serialize_request(&key).map_err(IssueError::Sign)?;
        Ok(CertRequest {
            csr_pem: csr.pem().map_err(IssueError::Sign)?,
            key_pem: key.serialize_pem(),
        })
    }
}

/// SHA-256 of a DER certificate, lowercase hex.
pub fn fingerprint(der: &CertificateDer<'_>) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der.as_ref()).as_ref())
}

/// A random positive serial of 16 bytes (RFC 5280 allows up to 20).
fn random_serial() -> Result<SerialNumber, IssueError> {
    let mut s = [0u8; 16];
    SystemRandom::new()
        .fill(&mut s)
        .map_err(|_| IssueError::Random)?;
    // Positive and exactly 16 bytes when DER-encoded as an INTEGER.
    s[0] = (s[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&s))
}

/// The SAN for an address: an IP (with or without a port), or a DNS name.
fn address_san(address: &str) -> Result<SanType, IssueError> {
    if let Ok(sa) = address.parse::<SocketAddr>() {
        return Ok(SanType::IpAddress(sa.ip()));
    }
    let host = address.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let host = match address.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => address,
    };
    let dns_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !dns_ok {
        return Err(IssueError::Address(address.to_owned()));
    }
    let name = host
        .to_ascii_lowercase()
        .try_into()
        .map_err(|_| IssueError::Address(address.to_owned()))?;
    Ok(SanType::DnsName(name))
}

fn ca_common_name(cluster_id: &str) -> String {
    format!("Nephele cluster {cluster_id} CA")
}

/// The cluster id a cluster CA certificate (PEM, the first certificate)
/// was made for, read from its common name (what [`Ca::create`] writes):
/// how a joining node names its CSR's identity from `--ca-file` alone.
pub fn cluster_of_ca_pem(pem: &[u8]) -> Option<String> {
    use rustls_pki_types::pem::PemObject as _;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let id = cn.strip_prefix("Nephele cluster ")?.strip_suffix(" CA")?;
    validate_name(id).ok()?;
    Some(id.to_owned())
}

/// When a member should renew the certificate `der`: two thirds into the
/// life the CA gave it, counted from when it was issued (its `notBefore`
/// plus the [`CLOCK_SKEW`] the CA backdates it by) to its `notAfter`.
/// `None` if it does not parse.
pub fn renewal_due(der: &CertificateDer<'_>) -> Option<SystemTime> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let at = |t: i64| {
        u64::try_from(t)
            .ok()
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
    };
    let not_before = at(cert.validity().not_before.timestamp())?;
    let not_after = at(cert.validity().not_after.timestamp())?;
    let issued = (not_before + CLOCK_SKEW).min(not_after);
    let life = not_after.duration_since(issued).unwrap_or_default();
    Some(issued + life * 2 / 3)
}

/// The end of validity of the certificate `der`; `None` if it does not
/// parse.
pub fn not_after(der: &CertificateDer<'_>) -> Option<SystemTime> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let s = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

/// The raw subject public key of a certificate.
pub(crate) fn spki_of(der: &CertificateDer<'_>) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

/// The IP and DNS SANs of a certificate, as text (for tests and `neph`
/// output).
pub fn address_sans(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(sans)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    sans.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::pem::PemObject as _;

    use super::*;
    use crate::identity::identity_of_cert;

    fn leaf(chain_pem: &str) -> CertificateDer<'static> {
        CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    #[test]
    fn issued_certificates_carry_identity_and_addresses() {
        let ca = Ca::create("prod").unwrap();
        let id = Identity::controller("1").unwrap();
        let (cert, key_pem) = ca
            .issue(
                &id,
                &IssueOptions::for_addresses(["127.0.0.1:7001", "ctl-1.example", "[::1]:7001"]),
            )
            .unwrap();
        assert!(key_pem.contains("PRIVATE KEY"));
        assert_eq!(cert.serial.len(), 32);
        let der = leaf(&cert.chain_pem);
        let peer = identity_of_cert(&der).unwrap();
        assert_eq!(peer.identity, id);
        assert_eq!(peer.cluster_id, "prod");
        assert_eq!(peer.serial, cert.serial);
        assert_eq!(
            address_sans(&der),
            vec!["127.0.0.1", "ctl-1.example", "::1"]
        );
        assert!(cert.chain_pem.ends_with(ca.cert_pem()));
        assert!(
            ca.issue(&id, &IssueOptions::for_addresses(["not an address"]))
                .is_err()
        );
    }

    #[test]
    fn csr_for_another_identity_is_refused() {
        let ca = Ca::create("prod").unwrap();
        let a = Identity::node("a").unwrap();
        let b = Identity::node("b").unwrap();
        let req = CertRequest::generate(&b, "prod").unwrap();
        let e = ca
            .sign_csr(&req.csr_pem, &a, &IssueOptions::default())
            .unwrap_err();
        assert!(matches!(e, SignCsrError::IdentityMismatch { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "the certificate signing request is for nephele://prod/node/b, not nephele://prod/node/a"
        );
        // Same name, other cluster.
        let other = CertRequest::generate(&a, "staging").unwrap();
        assert!(
            ca.sign_csr(&other.csr_pem, &a, &IssueOptions::default())
                .is_err()
        );
        // The right one is signed, for the CSR's key.
        let ok = CertRequest::generate(&a, "prod").unwrap();
        let cert = ca
            .sign_csr(&ok.csr_pem, &a, &IssueOptions::for_addresses(["10.0.0.5"]))
            .unwrap();
        let der = leaf(&cert.chain_pem);
        assert_eq!(identity_of_cert(&der).unwrap().identity, a);
        let key = KeyPair::from_pem(&ok.key_pem).unwrap();
        assert_eq!(spki_of(&der).unwrap(), key.public_key_raw());
        // Garbage is malformed, not a panic.
        assert!(matches!(
            ca.sign_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                &a,
                &IssueOptions::default()
            ),
            Err(SignCsrError::Malformed(_))
        ));
    }

    #[test]
    fn csr_asking_to_be_a_ca_gets_a_leaf() {
        let ca = Ca::create("prod").unwrap();
        let a = Identity::node("a").unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .subject_alt_names
            .push(SanType::URI(a.to_uri("prod").try_into().unwrap()));
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let cert = ca.sign_csr(&csr, &a, &IssueOptions::default()).unwrap();
        use x509_parser::prelude::{FromDer, X509Certificate};
        let der = leaf(&cert.chain_pem);
        let (_, x) = X509Certificate::from_der(der.as_ref()).unwrap();
        assert!(!x.is_ca());
    }

    #[test]
    fn sealed_ca_opens_with_the_right_key_only() {
        let ca = Ca::create("prod").unwrap();
        let k = OperatorKey::generate().unwrap();
        let sealed = ca.seal(&k).unwrap();
        assert!(!String::from_utf8_lossy(&sealed.sealed_key).contains("PRIVATE KEY"));
        let opened = Ca::open(&sealed, &k).unwrap();
        assert_eq!(opened.fingerprint(), ca.fingerprint());
        // The reopened CA still signs certificates that chain to it.
        let (cert, _) = opened
            .issue(&Identity::node("n").unwrap(), &IssueOptions::default())
            .unwrap();
        assert!(cert.chain_pem.ends_with(ca.cert_pem()));

        let wrong = OperatorKey::generate().unwrap();
        let e = Ca::open(&sealed, &wrong).unwrap_err();
        assert!(matches!(
            e,
            OpenCaError::Unseal(UnsealError::WrongKey { .. })
        ));
        let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(msg.contains("wrong operator key"), "{msg}");

        // Moved to another cluster id: refused.
        let mut moved = sealed.clone();
        moved.cluster_id = "staging".into();
        assert!(matches!(
            Ca::open(&moved, &k),
            Err(OpenCaError::Unseal(UnsealError::Corrupted))
        ));
        // Another CA's certificate with this key: refused.
        let mut swapped = sealed;
        swapped.cert_pem = Ca::create("prod").unwrap().cert_pem().to_owned();
        assert!(matches!(
            Ca::open(&swapped, &k),
            Err(OpenCaError::KeyMismatch)
        ));
    }

    #[test]
    fn the_cluster_id_is_read_back_from_the_ca_certificate() {
        crate::install_default();
        let ca = Ca::create("c42").unwrap();
        assert_eq!(
            cluster_of_ca_pem(ca.cert_pem().as_bytes()).as_deref(),
            Some("c42")
        );
        assert_eq!(cluster_of_ca_pem(b"not a pem"), None);
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_life_given() {
        crate::install_default();
        let ca = Ca::create("c").unwrap();
        let options = IssueOptions {
            validity: Duration::from_secs(3000),
            ..IssueOptions::default()
        };
        let before = SystemTime::now();
        let (cert, _) = ca.issue(&Identity::node("n").unwrap(), &options).unwrap();
        let der = CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let due = renewal_due(&der).unwrap();
        // Issued now (to the second), due 2000 s later.
        let expected = before + Duration::from_secs(2000);
        let off = due
            .duration_since(expected)
            .unwrap_or_else(|e| e.duration());
        assert!(off <= Duration::from_secs(2), "{due:?} vs {expected:?}");
    }
}
