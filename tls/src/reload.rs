//! A certificate and key read from their files and re-read when they
//! change, so a rotated certificate is used without a restart.
//!
//! [`ReloadingCert`] is both rustls' server and client certificate
//! resolver. On a handshake it looks at the files' size, inode and
//! modification time (at most once per [`ReloadingCert::check_interval`],
//! one `stat` each), and when they changed reads and checks both: a
//! certificate that does not parse, or whose key does not match (a
//! rotation half written: certificate replaced, key not yet), is logged
//! and the previous pair stays in use until the files agree again. Write
//! both with [`crate::write_private`] (atomic rename) to rotate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use crate::identity::{PeerIdentity, PeerIdentityError, identity_of_cert};

/// How often, by default, the files are looked at.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Why a certificate and key could not be loaded.
#[derive(Debug, Error)]
pub enum LoadCertError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("{0} holds no PEM certificate")]
    NoCertificate(String),
    /// The key file holds no PEM private key.
    #[error("{0} holds no PEM private key")]
    NoKey(String),
    /// The key is unusable or does not match the certificate.
    #[error("the key in {key} does not fit the certificate in {cert}")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The certificate names no valid member identity.
    #[error("the certificate in {path} names no member identity")]
    Identity {
        /// The certificate file.
        path: String,
        /// Why.
        #[source]
        source: PeerIdentityError,
    },
}

/// File identity used to notice a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    ino: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: m.len(),
        ino: m.ino(),
        modified: m.modified().ok(),
    })
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    identity: PeerIdentity,
    stamps: (Option<Stamp>, Option<Stamp>),
    checked: Instant,
}

/// A certificate chain and key that follow their files.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    check_interval: Duration,
    loaded: Mutex<Loaded>,
}

impl ReloadingCert {
    /// Loads `cert` (PEM chain, leaf first) and `key` (PEM private key);
    /// both must be valid now.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, LoadCertError> {
        let provider = crate::provider();
        let stamps = (stamp(cert), stamp(key));
        let (certified, identity) = read_pair(cert, key, &provider)?;
        Ok(ReloadingCert {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            provider,
            check_interval: DEFAULT_CHECK_INTERVAL,
            loaded: Mutex::new(Loaded {
                key: certified,
                identity,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// Looks at the files at most this often (zero: on every handshake).
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// How often the files are looked at.
    pub fn check_interval(&self) -> Duration {
        self.check_interval
    }

    /// The pair in use, re-read first if the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut l = self.lock();
        if l.checked.elapsed() >= self.check_interval {
            l.checked = Instant::now();
            let now = (stamp(&self.cert_path), stamp(&self.key_path));
            if now != l.stamps {
                match read_pair(&self.cert_path, &self.key_path, &self.provider) {
                    Ok((key, identity)) => {
                        tracing::info!(
                            cert = %self.cert_path.display(),
                            identity = %identity.identity,
                            serial = %identity.serial,
                            "reloaded the TLS certificate"
                        );
                        l.key = key;
                        l.identity = identity;
                        l.stamps = now;
                    }
                    Err(e) => {
                        // Keep serving the previous pair; look again later.
                        tracing::warn!(
                            error = %crate::error_chain(&e),
                            "the changed TLS certificate files are not usable yet; keeping the previous certificate"
                        );
                    }
                }
            }
        }
        l.key.clone()
    }

    /// Re-reads both files now; on error the previous pair stays.
    pub fn reload(&self) -> Result<(), LoadCertError> {
        let stamps = (stamp(&self.cert_path), stamp(&self.key_path));
        let (key, identity) = read_pair(&self.cert_path, &self.key_path, &self.provider)?;
        let mut l = self.lock();
        l.key = key;
        l.identity = identity;
        l.stamps = stamps;
        l.checked = Instant::now();
        Ok(())
    }

    /// Who the certificate in use speaks for (and its serial).
    pub fn identity(&self) -> PeerIdentity {
        let _ = self.current();
        self.lock().identity.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        // Every update replaces whole fields: a poisoned lock still holds
        // a consistent pair.
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn read_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, PeerIdentity), LoadCertError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| LoadCertError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    let Some(leaf) = chain.first() else {
        return Err(LoadCertError::NoCertificate(cert.display().to_string()));
    };
    let identity = identity_of_cert(leaf).map_err(|source| LoadCertError::Identity {
        path: cert.display().to_string(),
        source,
    })?;
    // rustls cannot compare ring's ECDSA keys with the certificate
    // (it reports "unknown"): compare the public keys through rcgen.
    if let Some(public) = std::str::from_utf8(&key_pem)
        .ok()
        .and_then(|pem| rcgen::KeyPair::from_pem(pem).ok())
        && crate::ca::spki_of(leaf).as_deref() != Some(public.public_key_raw())
    {
        return Err(LoadCertError::Mismatch {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            source: rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| LoadCertError::NoKey(key.display().to_string()))?;
    let certified = CertifiedKey::from_der(chain, key_der, provider).map_err(|source| {
        LoadCertError::Mismatch {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            source,
        }
    })?;
    Ok((Arc::new(certified), identity))
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
