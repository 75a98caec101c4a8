//! A controller's TLS material: the cluster CA (created by
//! `neph-controller init`, its key sealed with the operator key) and this
//! controller's own certificate (`controller/<id>`), kept in
//! `<data-dir>/tls/` as [`TlsFiles`] (`ca.pem`, `cert.pem`, `key.pem`) plus
//! the sealed CA (`ca.sealed`).
//!
//! The sealed CA lives in the replicated state
//! ([`nephele_state::Command::SetClusterCa`], put there by `init` through
//! [`publish_ca`]), still sealed: every controller can read it, and a
//! controller given the operator key opens it from there to sign node
//! certificates (`NodeJoin/Join`, `api/join.rs`). Before a controller can
//! read the state it needs its own certificate, so the sealed CA is also a
//! file: every initial member given the same `--sealed-ca` path agrees on
//! one CA (the first to create it wins, atomically), and a controller
//! joining later is given a copy of it and the operator key, and issues its
//! own certificate. The sealed file is safe to copy: without the operator
//! key it gives away nothing but the CA certificate.
//!
//! What the server does with it is [`crate::server::ControllerOptions::tls`]:
//! the public API is server-authenticated TLS (clients verify the
//! controller, and send bearer tokens as before), the cluster protocol is
//! mutual TLS between `controller/*` certificates.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use nephele_state::model::SealedCaRecord;
use nephele_tls::ca::{OpenCaError, SealedCa};
use nephele_tls::seal::OperatorKeyError;
use nephele_tls::{Ca, Identity, IssueOptions, OperatorKey, Revocations, TlsContext, TlsFiles};
use thiserror::Error;

/// The TLS directory under a controller's data directory.
pub const TLS_DIR: &str = "tls";
/// The sealed CA's file name in [`TLS_DIR`].
pub const SEALED_CA_FILE: &str = "ca.sealed";
/// The environment variable that may hold the operator key itself (64 hex
/// digits), instead of a file.
pub const OPERATOR_KEY_ENV: &str = "NEPHELE_OPERATOR_KEY";

/// Where a controller's TLS files are.
pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(TLS_DIR)
}

/// Why a controller's TLS material could not be set up.
#[derive(Debug, Error)]
pub enum ControllerTlsError {
    /// No operator key was given where one is needed.
    #[error(
        "this controller has no certificate yet and needs the operator key to issue one: \
         pass --operator-key-file (created by `init` when missing) or set {OPERATOR_KEY_ENV}"
    )]
    NoOperatorKey,
    /// The operator key in the environment is not 64 hex digits.
    #[error("{OPERATOR_KEY_ENV} is not 64 hex digits")]
    BadOperatorKey,
    /// The operator key file could not be read or written.
    #[error(transparent)]
    OperatorKey(#[from] OperatorKeyError),
    /// No sealed CA where one must exist.
    #[error(
        "there is no sealed cluster CA at {0}: a controller joining a cluster needs a copy of \
         the one `init` created (pass --sealed-ca)"
    )]
    NoCa(PathBuf),
    /// The sealed CA file could not be read or written.
    #[error("cannot use the sealed CA file {path}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The sealed CA file does not parse.
    #[error("the sealed CA file {path} is damaged: {reason}")]
    CaDamaged {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The sealed CA is for another cluster.
    #[error("the sealed CA belongs to cluster {found}, this controller is in cluster {expected}")]
    OtherCluster {
        /// The cluster of the sealed CA.
        found: String,
        /// This controller's cluster.
        expected: String,
    },
    /// The CA could not be created.
    #[error(transparent)]
    Create(#[from] nephele_tls::ca::CreateCaError),
    /// The CA could not be opened (wrong operator key, say).
    #[error(transparent)]
    Open(#[from] OpenCaError),
    /// Sealing the new CA failed.
    #[error(transparent)]
    Seal(#[from] nephele_tls::seal::SealError),
    /// This controller's certificate could not be issued.
    #[error(transparent)]
    Issue(#[from] nephele_tls::ca::IssueError),
    /// A member file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The member files do not load.
    #[error(transparent)]
    Load(#[from] nephele_tls::TlsConfigError),
    /// The member id makes no identity.
    #[error("member id is not a valid identity name")]
    Identity(#[from] nephele_tls::identity::ParseIdentityError),
    /// A cluster id is needed to create the CA.
    #[error("creating the cluster CA needs --cluster-id")]
    NoClusterId,
}

/// Where the operator key comes from.
#[derive(Debug, Clone, Default)]
pub struct OperatorKeySource {
    /// A key file (mode 0600).
    pub file: Option<PathBuf>,
    /// The key itself, hex (from [`OPERATOR_KEY_ENV`]).
    pub hex: Option<String>,
}

impl OperatorKeySource {
    /// The key. With `create`, a missing file is created with a new key.
    pub fn load(&self, create: bool) -> Result<OperatorKey, ControllerTlsError> {
        if let Some(hex) = &self.hex {
            return OperatorKey::from_hex(hex).ok_or(ControllerTlsError::BadOperatorKey);
        }
        let Some(file) = &self.file else {
            return Err(ControllerTlsError::NoOperatorKey);
        };
        if create && !file.exists() {
            let key = OperatorKey::generate()?;
            key.save(file)?;
            tracing::info!(path = %file.display(), "operator key created; keep it safe");
            return Ok(key);
        }
        Ok(OperatorKey::load(file)?)
    }
}

/// Reads a sealed CA file.
pub fn read_sealed(path: &Path) -> Result<SealedCa, ControllerTlsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ControllerTlsError::NoCa(path.to_path_buf()));
        }
        Err(source) => {
            return Err(ControllerTlsError::CaFile {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    toml::from_str::<SealedFile>(&text)
        .map_err(|e| ControllerTlsError::CaDamaged {
            path: path.to_path_buf(),
            reason: e.message().to_owned(),
        })?
        .try_into()
        .map_err(|reason| ControllerTlsError::CaDamaged {
            path: path.to_path_buf(),
            reason,
        })
}

/// The sealed CA on disk: TOML, the sealed key in hex.
#[derive(Debug, serde::Deserialize)]
struct SealedFile {
    cluster_id: String,
    cert_pem: String,
    sealed_key: String,
}

impl TryFrom<SealedFile> for SealedCa {
    type Error = String;
    fn try_from(f: SealedFile) -> Result<SealedCa, String> {
        let hex = f.sealed_key.trim();
        if !hex.len().is_multiple_of(2) {
            return Err("sealed_key is not hex".into());
        }
        let sealed_key = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or("sealed_key is not hex")?;
        Ok(SealedCa {
            cluster_id: f.cluster_id,
            cert_pem: f.cert_pem,
            sealed_key,
        })
    }
}

fn sealed_text(s: &SealedCa) -> String {
    let hex: String = s.sealed_key.iter().map(|b| format!("{b:02x}")).collect();
    // TOML basic strings: the PEM has only base64, dashes, spaces and
    // newlines, so a multi-line literal string holds it as is.
    format!(
        "# The cluster CA: certificate in the clear, private key sealed with the operator key.\n\
         cluster_id = {:?}\ncert_pem = '''\n{}'''\nsealed_key = \"{hex}\"\n",
        s.cluster_id, s.cert_pem
    )
}

/// Writes `bytes` to `path` only if no file is there, atomically: written
/// beside it, then hard-linked into place (which fails if another writer
/// got there first). Returns whether this call wrote it.
fn create_once(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::File::create_new(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates the cluster CA at `path` unless one is there (then opens that
/// one: initial members started together agree on the first), and
/// returns it open.
pub fn create_or_open_ca(
    path: &Path,
    cluster_id: &str,
    key: &OperatorKey,
) -> Result<Ca, ControllerTlsError> {
    if !path.exists() {
        let ca = Ca::create(cluster_id)?;
        let sealed = ca.seal(key)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ControllerTlsError::CaFile {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let created = create_once(path, sealed_text(&sealed).as_bytes()).map_err(|source| {
            ControllerTlsError::CaFile {
                path: path.to_path_buf(),
                source,
            }
        })?;
        if created {
            tracing::info!(path = %path.display(), fingerprint = %ca.fingerprint(), "cluster CA created");
            return Ok(ca);
        }
    }
    open_ca(path, Some(cluster_id), key)
}

/// Opens the sealed CA at `path` (for `cluster_id` when given).
pub fn open_ca(
    path: &Path,
    cluster_id: Option<&str>,
    key: &OperatorKey,
) -> Result<Ca, ControllerTlsError> {
    let sealed = read_sealed(path)?;
    if let Some(expected) = cluster_id
        && sealed.cluster_id != expected
    {
        return Err(ControllerTlsError::OtherCluster {
            found: sealed.cluster_id,
            expected: expected.to_owned(),
        });
    }
    Ok(Ca::open(&sealed, key)?)
}

/// What [`prepare`] needs to know about this controller.
#[derive(Debug, Clone)]
pub struct PrepareTls {
    /// The data directory (the files go to `<data_dir>/tls/`).
    pub data_dir: PathBuf,
    /// This controller's member id.
    pub id: u64,
    /// The cluster id (decimal), needed when the CA is created.
    pub cluster_id: Option<String>,
    /// The sealed CA; default `<data_dir>/tls/ca.sealed`.
    pub sealed_ca: Option<PathBuf>,
    /// The operator key.
    pub operator_key: OperatorKeySource,
    /// Create the CA (and a missing operator key file) if there is none
    /// (`init`).
    pub create: bool,
    /// Addresses clients reach this controller at (SANs of its
    /// certificate).
    pub addresses: Vec<String>,
}

/// Makes sure this controller has its TLS files, then loads them. A
/// controller that already has a certificate needs neither the operator key
/// nor the sealed CA; one without gets a certificate from the CA (created
/// first with `create`).
pub fn prepare(p: &PrepareTls, revocations: Revocations) -> Result<TlsContext, ControllerTlsError> {
    let dir = tls_dir(&p.data_dir);
    let files = TlsFiles::in_dir(&dir);
    if !files.cert.exists() || !files.key.exists() || !files.ca.exists() {
        issue_own(p, &dir, &files)?;
    }
    Ok(TlsContext::load(&files, revocations)?)
}

fn issue_own(p: &PrepareTls, dir: &Path, files: &TlsFiles) -> Result<(), ControllerTlsError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ControllerTlsError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let own_sealed = dir.join(SEALED_CA_FILE);
    let sealed_path = p.sealed_ca.clone().unwrap_or_else(|| own_sealed.clone());
    let ca = if p.create {
        let key = p.operator_key.load(true)?;
        let cluster = p
            .cluster_id
            .as_deref()
            .ok_or(ControllerTlsError::NoClusterId)?;
        create_or_open_ca(&sealed_path, cluster, &key)?
    } else {
        if !sealed_path.exists() {
            return Err(ControllerTlsError::NoCa(sealed_path));
        }
        let key = p.operator_key.load(false)?;
        open_ca(&sealed_path, p.cluster_id.as_deref(), &key)?
    };
    // Keep a copy of the sealed CA with the member (what a later join
    // RPC opens).
    if sealed_path != own_sealed {
        let text = sealed_text(&read_sealed(&sealed_path)?);
        nephele_tls::write_private(&own_sealed, text.as_bytes(), true)
            .map_err(write_err(&own_sealed))?;
    }
    let identity = Identity::controller(p.id.to_string())?;
    let (cert, key_pem) = ca.issue(&identity, &IssueOptions::for_addresses(p.addresses.clone()))?;
    nephele_tls::write_private(&files.key, key_pem.as_bytes(), true)
        .map_err(write_err(&files.key))?;
    nephele_tls::write_private(&files.cert, cert.chain_pem.as_bytes(), true)
        .map_err(write_err(&files.cert))?;
    nephele_tls::write_private(&files.ca, ca.cert_pem().as_bytes(), true)
        .map_err(write_err(&files.ca))?;
    tracing::info!(
        identity = %identity,
        serial = %cert.serial,
        dir = %dir.display(),
        "controller certificate issued"
    );
    Ok(())
}

/// The sealed CA as the replicated state keeps it.
pub fn record_of(s: &SealedCa) -> SealedCaRecord {
    SealedCaRecord {
        cluster_id: s.cluster_id.clone(),
        cert_pem: s.cert_pem.clone(),
        sealed_key: s.sealed_key.clone(),
    }
}

/// The state's record as a [`SealedCa`] to open.
pub fn sealed_of(r: &SealedCaRecord) -> SealedCa {
    SealedCa {
        cluster_id: r.cluster_id.clone(),
        cert_pem: r.cert_pem.clone(),
        sealed_key: r.sealed_key.clone(),
    }
}

/// This controller's sealed CA file, if it has one: `--sealed-ca`, else
/// `<data-dir>/tls/ca.sealed`.
pub fn local_sealed(p: &PrepareTls) -> Result<Option<SealedCa>, ControllerTlsError> {
    let own = tls_dir(&p.data_dir).join(SEALED_CA_FILE);
    let path = if own.exists() {
        own
    } else {
        match &p.sealed_ca {
            Some(path) => path.clone(),
            None => return Ok(None),
        }
    };
    match read_sealed(&path) {
        Ok(s) => Ok(Some(s)),
        Err(ControllerTlsError::NoCa(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Makes sure the replicated state holds the cluster CA `sealed` (still
/// sealed): what `init` does once the cluster has a leader, and any
/// controller that keeps a sealed CA file does at start, for a state from
/// before the CA was kept there. Retries until the cluster answers; gives
/// up (saying why) if the state holds another CA.
pub async fn publish_ca<S: crate::store::StateStore>(store: S, sealed: SealedCa) {
    let record = record_of(&sealed);
    loop {
        match store.read(|s| s.cluster_ca.clone()).await {
            Ok(Some(have)) if have == record => return,
            Ok(Some(_)) => {
                tracing::error!(
                    "the replicated state holds another cluster CA than this controller's \
                     sealed CA file; the state's is used"
                );
                return;
            }
            Ok(None) => {
                let envelope = nephele_state::Envelope::new(
                    crate::api::now_ms(),
                    "system",
                    nephele_state::Command::SetClusterCa { ca: record.clone() },
                );
                match crate::api::outcome(store.propose(envelope).await) {
                    Ok(_) => {
                        tracing::info!("the sealed cluster CA is in the replicated state");
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "sealed CA not recorded yet; retrying"),
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the state yet; retrying"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// The hosts of `addresses` (`host:port`, `[v6]:port`, or a bare host)
/// that belong in a certificate: unspecified addresses (`0.0.0.0`) are
/// left out.
pub fn certificate_hosts<'a>(addresses: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in addresses {
        let host = match a.parse::<std::net::SocketAddr>() {
            Ok(sa) => {
                if sa.ip().is_unspecified() {
                    continue;
                }
                sa.ip().to_string()
            }
            Err(_) => match a.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() => h.to_owned(),
                _ => a.to_owned(),
            },
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if !host.is_empty() && !out.contains(&host) {
            out.push(host);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_file_round_trips_and_initial_members_agree() {
        nephele_tls::install_default();
        let dir = tempfile::tempdir().unwrap();
        let key = OperatorKey::generate().unwrap();
        let path = dir.path().join("ca.sealed");
        let a = create_or_open_ca(&path, "7", &key).unwrap();
        let b = create_or_open_ca(&path, "7", &key).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let other = OperatorKey::generate().unwrap();
        assert!(matches!(
            open_ca(&path, Some("7"), &other),
            Err(ControllerTlsError::Open(_))
        ));
        assert!(matches!(
            open_ca(&path, Some("8"), &key),
            Err(ControllerTlsError::OtherCluster { .. })
        ));
    }

    #[test]
    fn prepare_issues_once_and_needs_the_key_only_then() {
        nephele_tls::install_default();
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("operator.key");
        let mut p = PrepareTls {
            data_dir: dir.path().join("c1"),
            id: 1,
            cluster_id: Some("7".into()),
            sealed_ca: Some(dir.path().join("ca.sealed")),
            operator_key: OperatorKeySource {
                file: Some(key_file.clone()),
                hex: None,
            },
            create: true,
            addresses: vec!["127.0.0.1".into()],
        };
        let ctx = prepare(&p, Revocations::new()).unwrap();
        assert_eq!(ctx.identity().identity, Identity::controller("1").unwrap());
        assert!(key_file.exists());
        // Again without the key: the files are there.
        p.operator_key = OperatorKeySource::default();
        p.create = false;
        prepare(&p, Revocations::new()).unwrap();
        // A second member without the key cannot get a certificate...
        p.data_dir = dir.path().join("c2");
        p.id = 2;
        let e = prepare(&p, Revocations::new()).unwrap_err();
        assert!(matches!(e, ControllerTlsError::NoOperatorKey), "{e}");
        // ... with it, it gets one from the same CA.
        p.operator_key.file = Some(key_file);
        let two = prepare(&p, Revocations::new()).unwrap();
        assert_eq!(two.identity().identity, Identity::controller("2").unwrap());
        assert_eq!(
            std::fs::read(dir.path().join("c1/tls/ca.pem")).unwrap(),
            std::fs::read(dir.path().join("c2/tls/ca.pem")).unwrap()
        );
    }

    #[test]
    fn certificate_hosts_drop_ports_and_unspecified() {
        assert_eq!(
            certificate_hosts([
                "127.0.0.1:7001",
                "0.0.0.0:7001",
                "[::1]:1",
                "ctl.example:9",
                "h"
            ]),
            ["127.0.0.1", "::1", "ctl.example", "h"]
        );
    }
}
