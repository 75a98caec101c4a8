//! The node's identity (issue 7, node join): its key and certificate in
//! `<data-dir>/tls/` (`key.pem` 0600, `cert.pem`, `ca.pem`).
//!
//! On first start with `--join-token`, the agent generates its key pair,
//! sends a CSR for `nephele://<cluster>/node/<node-id>` with the token to
//! a controller's `NodeJoin/Join` (over TLS verified against `--ca-file`,
//! no client certificate), and stores what comes back; the key never
//! leaves the node. From then on [`node_tls`] gives mutual TLS with that
//! certificate, both ways: to the controllers (which let it act only as
//! this node) and on the agent's own port (which admits only
//! `controller/*` certificates). Without a certificate and without a join
//! token the agent falls back to server-authenticated TLS and the admin
//! bearer token of `--token-file` (the transition path, which controllers
//! refuse unless started with `--allow-node-tokens`); such an agent serves
//! no console.
//!
//! [`renew_forever`] renews the certificate at two thirds of its life
//! (`NodeJoin/Renew` over the current one, a fresh key each time); the new
//! pair is written beside the old (`*.next`) and renamed into place, and a
//! start that finds a renewal cut short finishes it
//! ([`finish_renewal`]). Every TLS config made from the node's context
//! picks the new pair up without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nephele_proto::node::v1 as pb;
use nephele_tls::{
    CertRequest, Identity, IdentityKind, PeerPolicy, Revocations, TlsContext, TlsFiles,
};
use thiserror::Error;

use crate::config::AgentConfig;

/// Where the node's TLS files are.
pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// Why the node could not get or load its certificate.
#[derive(Debug, Error)]
pub enum JoinError {
    /// Neither a certificate, a join token nor a bearer token.
    #[error(
        "this node has no certificate in {0} yet: pass --join-token (from `neph node join-token create`)"
    )]
    NoCredential(PathBuf),
    /// The CSR could not be made.
    #[error("cannot make the node's key and CSR")]
    Csr(#[source] nephele_tls::ca::IssueError),
    /// The node id is not an identity name.
    #[error("the node id is not a valid identity name")]
    Identity(#[from] nephele_tls::identity::ParseIdentityError),
    /// The CA file gives no cluster id.
    #[error("cannot read the cluster id from the CA certificate (--ca-file)")]
    Cluster,
    /// Every controller refused or failed.
    #[error("no controller let this node join: {0}")]
    Refused(String),
    /// The files could not be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// The files do not load.
    #[error("the node's TLS files in {0} do not load")]
    Load(PathBuf, #[source] Box<nephele_tls::TlsConfigError>),
}

/// The node's TLS: the client config for the controllers and, once the
/// node has joined, its own certificate (what its port serves with).
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// Mutual TLS with the node's certificate, or (the transition path)
    /// server-authenticated TLS without one.
    pub controllers: Arc<rustls::ClientConfig>,
    /// The node's certificate; `None` on the transition path.
    pub context: Option<TlsContext>,
}

/// The node's TLS: joins first when there is no certificate and a join
/// token was given.
pub async fn node_tls(cfg: &AgentConfig) -> Result<NodeTls, JoinError> {
    let dir = tls_dir(&cfg.data_dir);
    let files = TlsFiles::in_dir(&dir);
    finish_renewal(&files);
    let have = files.cert.exists() && files.key.exists() && files.ca.exists();
    if !have {
        match &cfg.join_token {
            Some(token) => join(cfg, token, &dir, &files).await?,
            None if cfg.token.is_some() => {
                return Ok(NodeTls {
                    controllers: cfg.controller_tls.clone(),
                    context: None,
                });
            }
            None => return Err(JoinError::NoCredential(dir)),
        }
    }
    let ctx = TlsContext::load(&files, Revocations::new())
        .map_err(|e| JoinError::Load(dir.clone(), Box::new(e)))?;
    let config = ctx
        .client_config(PeerPolicy::Kind(IdentityKind::Controller))
        .map_err(|e| JoinError::Load(dir, Box::new(e)))?;
    tracing::info!(identity = %ctx.identity().identity, "using the node certificate");
    Ok(NodeTls {
        controllers: config,
        context: Some(ctx),
    })
}

async fn join(
    cfg: &AgentConfig,
    token: &str,
    dir: &Path,
    files: &TlsFiles,
) -> Result<(), JoinError> {
    let identity = Identity::node(cfg.node_id.clone())?;
    let cluster = nephele_tls::ca::cluster_of_ca_pem(&cfg.ca_pem).ok_or(JoinError::Cluster)?;
    let req = CertRequest::generate(&identity, &cluster).map_err(JoinError::Csr)?;
    let mut errors = Vec::new();
    for address in &cfg.controllers {
        let endpoint =
            match tonic::transport::Endpoint::from_shared(nephele_tls::channel_uri(address)) {
                Ok(e) => e
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(15)),
                Err(_) => {
                    errors.push(format!("{address}: not an address"));
                    continue;
                }
            };
        let channel = nephele_tls::lazy_channel(endpoint, cfg.controller_tls.clone());
        let answer = pb::node_join_client::NodeJoinClient::new(channel)
            .join(pb::JoinRequest {
                token: token.to_owned(),
                node_id: cfg.node_id.clone(),
                csr_pem: req.csr_pem.clone(),
            })
            .await;
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                std::fs::create_dir_all(dir).map_err(|e| JoinError::Write(dir.to_owned(), e))?;
                for (path, bytes) in [
                    (&files.key, req.key_pem.as_bytes()),
                    (&files.cert, r.cert_pem.as_bytes()),
                    (&files.ca, r.ca_pem.as_bytes()),
                ] {
                    nephele_tls::write_private(path, bytes, true)
                        .map_err(|e| JoinError::Write(path.clone(), e))?;
                }
                tracing::info!(controller = %address, serial = %r.serial, dir = %dir.display(), "joined the cluster");
                return Ok(());
            }
            // A refused token is refused by every controller (it is in the
            // replicated state): do not burn time on the others.
            Err(s)
                if s.code() == tonic::Code::Unauthenticated
                    || s.code() == tonic::Code::InvalidArgument =>
            {
                return Err(JoinError::Refused(format!("{address}: {}", s.message())));
            }
            Err(s) => errors.push(format!("{address}: {}", s.message())),
        }
    }
    Err(JoinError::Refused(errors.join("; ")))
}

/// Where a renewal writes the new pair before renaming it into place.
fn next_files(files: &TlsFiles) -> TlsFiles {
    let next = |p: &Path| p.with_extension("pem.next");
    TlsFiles {
        ca: files.ca.clone(),
        cert: next(&files.cert),
        key: next(&files.key),
    }
}

/// Finishes a renewal an earlier run was stopped in: a new certificate
/// (and maybe its key) written but not yet renamed into place is renamed
/// if it goes with its key; otherwise it is dropped and the old pair kept.
pub fn finish_renewal(files: &TlsFiles) {
    let next = next_files(files);
    if !next.cert.exists() {
        let _ = std::fs::remove_file(&next.key);
        return;
    }
    let key = if next.key.exists() {
        &next.key
    } else {
        &files.key
    };
    if nephele_tls::reload::ReloadingCert::load(&next.cert, key).is_ok() {
        let done = (!next.key.exists() || std::fs::rename(&next.key, &files.key).is_ok())
            && std::fs::rename(&next.cert, &files.cert).is_ok();
        if done {
            tracing::info!(dir = %files.cert.display(), "finished a certificate renewal cut short");
            return;
        }
    }
    tracing::warn!(cert = %next.cert.display(), "dropping an unfinished certificate renewal");
    let _ = std::fs::remove_file(&next.cert);
    let _ = std::fs::remove_file(&next.key);
}

/// Why a renewal failed (the next try comes later).
#[derive(Debug, Error)]
pub enum RenewError {
    /// The CSR could not be made.
    #[error("cannot make a new key and CSR")]
    Csr(#[source] nephele_tls::ca::IssueError),
    /// The controllers refused or did not answer.
    #[error("the controllers did not renew the certificate: {0}")]
    Refused(String),
    /// The new files could not be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// The new pair does not load.
    #[error("the renewed certificate does not load")]
    Load(#[source] nephele_tls::reload::LoadCertError),
}

/// Renews the node's certificate once: a new key pair, its CSR signed by a
/// controller, both written and put in use. Returns the new serial.
pub async fn renew_once(
    ctx: &TlsContext,
    files: &TlsFiles,
    ctl: &crate::controller::Controllers,
) -> Result<String, RenewError> {
    let req = CertRequest::generate(&ctx.identity().identity, ctx.cluster_id())
        .map_err(RenewError::Csr)?;
    let r = ctl
        .renew(&req.csr_pem)
        .await
        .map_err(|s| RenewError::Refused(s.message().to_owned()))?;
    let next = next_files(files);
    for (path, bytes) in [
        (&next.key, req.key_pem.as_bytes()),
        (&next.cert, r.cert_pem.as_bytes()),
    ] {
        nephele_tls::write_private(path, bytes, true)
            .map_err(|e| RenewError::Write(path.clone(), e))?;
    }
    nephele_tls::reload::ReloadingCert::load(&next.cert, &next.key).map_err(RenewError::Load)?;
    // Key first: until the certificate follows, the files disagree and the
    // reloading certificate keeps the pair in memory; a crash in between
    // is finished by the next start.
    for (from, to) in [(&next.key, &files.key), (&next.cert, &files.cert)] {
        std::fs::rename(from, to).map_err(|e| RenewError::Write(to.clone(), e))?;
    }
    ctx.certificate().reload().map_err(RenewError::Load)?;
    Ok(r.serial)
}

/// Renews the node's certificate at two thirds of its life, for as long as
/// the agent runs; a failed renewal is tried again (every tenth of what is
/// left, between 1 s and 5 min).
pub async fn renew_forever(
    cfg: Arc<AgentConfig>,
    ctx: TlsContext,
    ctl: crate::controller::Controllers,
) {
    let files = TlsFiles::in_dir(&tls_dir(&cfg.data_dir));
    loop {
        let current = ctx.certificate().current();
        let Some((due, expires)) = current.cert.first().and_then(|der| {
            let due = nephele_tls::renewal_due(der)?;
            Some((due, nephele_tls::ca::not_after(der)?))
        }) else {
            tracing::warn!("cannot read the node certificate's validity; it is not renewed");
            return;
        };
        let now = SystemTime::now();
        if let Ok(wait) = due.duration_since(now)
            && !wait.is_zero()
        {
            tracing::debug!(?wait, "next certificate renewal");
            tokio::time::sleep(wait).await;
            continue;
        }
        match renew_once(&ctx, &files, &ctl).await {
            Ok(serial) => tracing::info!(%serial, "node certificate renewed"),
            Err(e) => {
                let left = expires.duration_since(now).unwrap_or_default();
                let retry = (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(300));
                tracing::warn!(error = %crate::supervisor::error_chain(&e), ?retry, "certificate renewal failed; retrying");
                tokio::time::sleep(retry).await;
            }
        }
    }
}
