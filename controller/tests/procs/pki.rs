//! The test processes' PKI: one cluster CA per test process, member
//! certificates written into a controller's data directory before it
//! starts (so it serves TLS without an operator key), and a client
//! presenting a `controller/harness` certificate, which both the public
//! API (server-authenticated TLS) and the cluster protocol (mutual TLS,
//! controllers only) accept.
//!
//! `neph-controller init` creating the CA itself is tested by the CLI's
//! tests and `controller/src/tls.rs`.

#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nephele_tls::{Ca, Identity, IdentityKind, IssueOptions, PeerPolicy, TlsContext, TlsFiles};
use tonic::transport::{Channel, Endpoint};

struct Pki {
    ca: Ca,
    client: Arc<rustls::ClientConfig>,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        nephele_tls::install_default();
        let ca = Ca::create("test").expect("test CA");
        // The harness's own certificate, loaded then removed from disk (it
        // is never reloaded).
        let dir = tempfile::tempdir().expect("tempdir");
        write_member(
            &ca,
            dir.path(),
            &Identity::controller("harness").expect("id"),
        );
        let tls = TlsContext::load_with_interval(
            &TlsFiles::in_dir(dir.path()),
            nephele_tls::Revocations::new(),
            Duration::from_secs(u64::from(u32::MAX)),
        )
        .expect("harness TLS");
        let client = tls
            .client_config(PeerPolicy::Kind(IdentityKind::Controller))
            .expect("client config");
        Pki { ca, client }
    })
}

fn write_member(ca: &Ca, dir: &Path, identity: &Identity) {
    std::fs::create_dir_all(dir).expect("tls dir");
    let (cert, key) = ca
        .issue(identity, &IssueOptions::for_addresses(["127.0.0.1"]))
        .expect("issue");
    let files = TlsFiles::in_dir(dir);
    nephele_tls::write_private(&files.key, key.as_bytes(), true).expect("key");
    nephele_tls::write_private(&files.cert, cert.chain_pem.as_bytes(), true).expect("cert");
    nephele_tls::write_private(&files.ca, ca.cert_pem().as_bytes(), true).expect("ca");
}

/// Gives the controller with data directory `data_dir` and member id `id`
/// its certificate, unless it has one.
pub fn issue_controller(data_dir: &Path, id: u64) {
    let dir = data_dir.join("tls");
    if TlsFiles::in_dir(&dir).cert.exists() {
        return;
    }
    write_member(
        &pki().ca,
        &dir,
        &Identity::controller(id.to_string()).expect("id"),
    );
}

/// The harness's mutual-TLS client config.
pub fn client_config() -> Arc<rustls::ClientConfig> {
    pki().client.clone()
}

/// A lazy channel to `addr` over TLS, with the harness's certificate.
pub fn lazy(endpoint: Endpoint) -> Channel {
    nephele_tls::lazy_channel(endpoint, client_config())
}

/// The mutual-TLS client config of a certificate for `identity`, from
/// this process's CA or (with `other_ca`) from a CA of another cluster.
pub fn client_as(identity: &Identity, other_ca: bool) -> Arc<rustls::ClientConfig> {
    let other;
    let ca = if other_ca {
        other = Ca::create("test").expect("other CA");
        &other
    } else {
        &pki().ca
    };
    let dir = tempfile::tempdir().expect("tempdir");
    write_member(ca, dir.path(), identity);
    // Trust the cluster's CA whatever our own certificate is from, so
    // only the server's verdict on us is tested.
    if other_ca {
        let both = format!("{}{}", ca.cert_pem(), pki().ca.cert_pem());
        std::fs::write(TlsFiles::in_dir(dir.path()).ca, both).expect("ca");
    }
    let tls = TlsContext::load_with_interval(
        &TlsFiles::in_dir(dir.path()),
        nephele_tls::Revocations::new(),
        Duration::from_secs(u64::from(u32::MAX)),
    )
    .expect("client TLS");
    tls.client_config(PeerPolicy::Kind(IdentityKind::Controller))
        .expect("client config")
}

/// A client config with no certificate that verifies the server against
/// this process's CA (what the CLI uses).
pub fn anonymous_client() -> Arc<rustls::ClientConfig> {
    let _ = pki();
    nephele_tls::server_auth_client_config(pki().ca.cert_pem().as_bytes()).expect("config")
}
