//! Real TLS over loopback: a gRPC health service served through
//! `TlsIncoming`, called through `TlsConnector`, with member certificates
//! from a cluster CA written to files the way members keep them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use nephele_tls::identity::connection_identity;
use nephele_tls::{
    Ca, ClientAuth, Identity, IdentityKind, IssueOptions, PeerIdentity, PeerPolicy, RequirePeer,
    Revocations, TlsContext, TlsFiles, TlsIncoming, connect_channel, peer_identity, require_node,
    server_auth_client_config, write_private,
};
use tempfile::TempDir;
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// A member's TLS directory.
struct Member {
    _dir: TempDir,
    files: TlsFiles,
}

fn member(ca: &Ca, id: &str, options: &IssueOptions) -> Result<Member> {
    let dir = tempfile::tempdir()?;
    let files = TlsFiles::in_dir(dir.path());
    std::fs::write(&files.ca, ca.cert_pem())?;
    write_cert(ca, &files, id, options)?;
    Ok(Member { _dir: dir, files })
}

fn write_cert(ca: &Ca, files: &TlsFiles, id: &str, options: &IssueOptions) -> Result<String> {
    let (cert, key) = ca.issue(&id.parse()?, options)?;
    write_private(&files.key, key.as_bytes(), true)?;
    write_private(&files.cert, cert.chain_pem.as_bytes(), true)?;
    Ok(cert.serial)
}

fn local() -> IssueOptions {
    IssueOptions::for_addresses(["127.0.0.1"])
}

fn ctx(m: &Member, revocations: &Revocations) -> Result<TlsContext> {
    Ok(TlsContext::load_with_interval(
        &m.files,
        revocations.clone(),
        Duration::ZERO,
    )?)
}

/// What the server checks on each call.
#[derive(Clone)]
enum Check {
    Nothing,
    Peer(RequirePeer),
    Node(String),
}

/// A health server; returns its address and the peers of its calls.
async fn serve(
    tls: &TlsContext,
    auth: ClientAuth,
    check: Check,
) -> Result<(SocketAddr, Arc<Mutex<Vec<Option<PeerIdentity>>>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let interceptor = move |req: Request<()>| -> Result<Request<()>, Status> {
        match &check {
            Check::Nothing => {}
            Check::Peer(p) => {
                p.check(&req)?;
            }
            Check::Node(n) => require_node(&req, n)?,
        }
        record.lock().unwrap().push(peer_identity(&req).ok());
        Ok(req)
    };
    let health = HealthServer::with_interceptor(
        HealthService::from_health_reporter(HealthReporter::new()),
        interceptor,
    );
    let incoming = TlsIncoming::new(listener, tls.server_config(auth)?);
    tokio::spawn(
        Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    Ok((addr, seen))
}

/// Connects and makes one health call; the error text on failure.
async fn call(
    host: &str,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(format!("http://{host}:{}", addr.port()))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5));
    let channel = connect_channel(endpoint, config)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

fn controller_policy() -> PeerPolicy {
    PeerPolicy::Kind(IdentityKind::Controller)
}

#[tokio::test]
async fn mutual_tls_authenticates_both_sides() -> Result<()> {
    let ca = Ca::create("test")?;
    let r = Revocations::new();
    let server = ctx(&member(&ca, "controller/1", &local())?, &r)?;
    let node = ctx(&member(&ca, "node/a", &local())?, &r)?;
    let (addr, seen) = serve(
        &server,
        ClientAuth::Required,
        Check::Peer(RequirePeer::kind(IdentityKind::Node, r.clone())),
    )
    .await?;
    let exact = PeerPolicy::Exactly(Identity::controller("1")?);
    call("127.0.0.1", addr, node.client_config(exact)?)
        .await
        .map_err(anyhow::Error::msg)?;
    let peers = seen.lock().unwrap().clone();
    let peer = peers[0]
        .clone()
        .expect("the server saw a client certificate");
    assert_eq!(peer.identity, Identity::node("a")?);
    assert_eq!(peer.cluster_id, "test");
    assert_eq!(peer.serial, node.identity().serial);

    // A controller is not a node: authenticated, but refused by the service.
    let other = ctx(&member(&ca, "controller/2", &local())?, &r)?;
    let e = call("127.0.0.1", addr, other.client_config(controller_policy())?)
        .await
        .unwrap_err();
    assert!(e.starts_with("PermissionDenied"), "{e}");
    Ok(())
}

#[tokio::test]
async fn the_cli_authenticates_the_server_only() -> Result<()> {
    let ca = Ca::create("test")?;
    let r = Revocations::new();
    let server = ctx(&member(&ca, "controller/1", &local())?, &r)?;
    let (addr, seen) = serve(&server, ClientAuth::Optional, Check::Nothing).await?;
    let cli = server_auth_client_config(ca.cert_pem().as_bytes())?;
    call("127.0.0.1", addr, cli.clone())
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(seen.lock().unwrap().as_slice(), &[None]);
    // The name dialled must be in the certificate.
    let e = call("localhost", addr, cli.clone()).await.unwrap_err();
    assert!(e.contains("NotValidForName"), "{e}");
    // A node's certificate does not pass for a controller's.
    let node_server = ctx(&member(&ca, "node/a", &local())?, &r)?;
    let (naddr, _) = serve(&node_server, ClientAuth::Optional, Check::Nothing).await?;
    assert!(call("127.0.0.1", naddr, cli.clone()).await.is_err());
    // Where certificates are required, the CLI gets nowhere.
    let (raddr, rseen) = serve(&server, ClientAuth::Required, Check::Nothing).await?;
    assert!(call("127.0.0.1", raddr, cli).await.is_err());
    assert!(rseen.lock().unwrap().is_empty());
    // And on the optional port, a service that wants a member refuses it.
    let (paddr, _) = serve(
        &server,
        ClientAuth::Optional,
        Check::Peer(RequirePeer::kind(IdentityKind::Node, r.clone())),
    )
    .await?;
    let e = call(
        "127.0.0.1",
        paddr,
        server_auth_client_config(ca.cert_pem().as_bytes())?,
    )
    .await
    .unwrap_err();
    assert!(e.starts_with("Unauthenticated"), "{e}");
    Ok(())
}

#[tokio::test]
async fn another_cas_certificates_are_refused_both_ways() -> Result<()> {
    let ca = Ca::create("test")?;
    // Same cluster id, another CA: an attacker's look-alike.
    let rogue = Ca::create("test")?;
    let r = Revocations::new();
    let server = ctx(&member(&ca, "controller/1", &local())?, &r)?;
    let (addr, seen) = serve(&server, ClientAuth::Optional, Check::Nothing).await?;

    // A client certificate from the rogue CA (trusting our CA, so only its
    // own certificate is at fault): refused at the handshake.
    let rogue_node = member(&rogue, "node/a", &local())?;
    std::fs::write(&rogue_node.files.ca, ca.cert_pem())?;
    let dir = tempfile::tempdir()?;
    let files = TlsFiles::in_dir(dir.path());
    std::fs::write(&files.ca, ca.cert_pem())?;
    std::fs::copy(&rogue_node.files.cert, &files.cert)?;
    std::fs::copy(&rogue_node.files.key, &files.key)?;
    assert!(
        TlsContext::load(&files, r.clone()).is_err(),
        "a context refuses a certificate its own CA did not sign"
    );
    // So the rogue client is built with rustls directly: it trusts our CA
    // (it wants to reach our server) and presents the rogue certificate.
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(
        ca.cert_pem().as_bytes(),
    )?)?;
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(&rogue_node.files.cert)?
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&rogue_node.files.key)?;
    let mut rogue_client = rustls::ClientConfig::builder_with_provider(nephele_tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    rogue_client.alpn_protocols = vec![b"h2".to_vec()];
    let e = call("127.0.0.1", addr, Arc::new(rogue_client))
        .await
        .unwrap_err();
    // The server's refusal reaches a TLS 1.3 client as a transport error.
    assert!(e.contains("transport error"), "{e}");
    assert!(seen.lock().unwrap().is_empty(), "no call got through");

    // A server with a rogue certificate: our members refuse it.
    let rogue_server = ctx(&member(&rogue, "controller/1", &local())?, &r)?;
    let (raddr, rseen) = serve(&rogue_server, ClientAuth::Optional, Check::Nothing).await?;
    let node = ctx(&member(&ca, "node/b", &local())?, &r)?;
    let e = call("127.0.0.1", raddr, node.client_config(controller_policy())?)
        .await
        .unwrap_err();
    assert!(
        e.contains("BadSignature") || e.contains("UnknownIssuer"),
        "{e}"
    );
    let e = call(
        "127.0.0.1",
        raddr,
        server_auth_client_config(ca.cert_pem().as_bytes())?,
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("BadSignature") || e.contains("UnknownIssuer"),
        "{e}"
    );
    assert!(rseen.lock().unwrap().is_empty());
    Ok(())
}

#[tokio::test]
async fn expired_certificates_are_refused() -> Result<()> {
    let ca = Ca::create("test")?;
    let r = Revocations::new();
    let expired = IssueOptions {
        addresses: vec!["127.0.0.1".into()],
        validity: Duration::from_secs(3600),
        not_before: Some(SystemTime::now() - Duration::from_secs(2 * 3600)),
    };
    let server = ctx(&member(&ca, "controller/1", &local())?, &r)?;
    let (addr, seen) = serve(&server, ClientAuth::Optional, Check::Nothing).await?;
    let old_node = ctx(&member(&ca, "node/a", &expired)?, &r)?;
    let e = call(
        "127.0.0.1",
        addr,
        old_node.client_config(controller_policy())?,
    )
    .await
    .unwrap_err();
    // TLS 1.3: the server's refusal reaches the client as an alert on its
    // first read, so the client sees only a transport error; the server
    // saw no call.
    assert!(
        e.contains("Expired") || e.contains("transport error"),
        "{e}"
    );
    assert!(seen.lock().unwrap().is_empty());

    let old_server = ctx(&member(&ca, "controller/2", &expired)?, &r)?;
    let (oaddr, _) = serve(&old_server, ClientAuth::Optional, Check::Nothing).await?;
    let node = ctx(&member(&ca, "node/b", &local())?, &r)?;
    let e = call("127.0.0.1", oaddr, node.client_config(controller_policy())?)
        .await
        .unwrap_err();
    assert!(e.contains("Expired"), "{e}");
    Ok(())
}

#[tokio::test]
async fn revoked_certificates_are_refused_even_on_open_connections() -> Result<()> {
    let ca = Ca::create("test")?;
    let server_revocations = Revocations::new();
    let server = ctx(&member(&ca, "controller/1", &local())?, &server_revocations)?;
    let (addr, seen) = serve(
        &server,
        ClientAuth::Required,
        Check::Peer(RequirePeer::kind(
            IdentityKind::Node,
            server_revocations.clone(),
        )),
    )
    .await?;
    let node = ctx(&member(&ca, "node/a", &local())?, &Revocations::new())?;
    let config = node.client_config(controller_policy())?;
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{}", addr.port()))?;
    let channel = connect_channel(endpoint, config.clone()).await?;
    let mut client = HealthClient::new(channel);
    let req = || HealthCheckRequest {
        service: String::new(),
    };
    client.check(req()).await?;

    server_revocations.revoke_serial(&node.identity().serial);
    // The open connection: refused per call.
    let e = client.check(req()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{e:?}");
    // A new connection: refused at the handshake.
    let e = call("127.0.0.1", addr, config).await.unwrap_err();
    assert!(e.contains("transport error"), "{e}");
    assert_eq!(seen.lock().unwrap().len(), 1);

    // Revoking the identity refuses its certificates issued later too.
    server_revocations.revoke_identity(Identity::node("b")?);
    let b = ctx(&member(&ca, "node/b", &local())?, &Revocations::new())?;
    assert!(
        call("127.0.0.1", addr, b.client_config(controller_policy())?)
            .await
            .is_err()
    );
    // A client refuses a revoked server as well.
    let client_revocations = Revocations::new();
    client_revocations.revoke_identity(Identity::controller("1")?);
    let c = ctx(&member(&ca, "node/c", &local())?, &client_revocations)?;
    let e = call("127.0.0.1", addr, c.client_config(controller_policy())?)
        .await
        .unwrap_err();
    assert!(e.contains("Revoked"), "{e}");
    Ok(())
}

#[tokio::test]
async fn a_node_cannot_pass_for_another_node() -> Result<()> {
    let ca = Ca::create("test")?;
    let r = Revocations::new();
    let server = ctx(&member(&ca, "controller/1", &local())?, &r)?;
    // The API's check: a call about node b must come from node/b.
    let (addr, _) = serve(&server, ClientAuth::Required, Check::Node("b".into())).await?;
    let a = ctx(&member(&ca, "node/a", &local())?, &r)?;
    let b = ctx(&member(&ca, "node/b", &local())?, &r)?;
    let e = call("127.0.0.1", addr, a.client_config(controller_policy())?)
        .await
        .unwrap_err();
    assert!(
        e.starts_with("PermissionDenied") && e.contains("presents node/a and cannot act as node/b"),
        "{e}"
    );
    call("127.0.0.1", addr, b.client_config(controller_policy())?)
        .await
        .map_err(anyhow::Error::msg)?;

    // A migration source expecting node/b refuses node/a answering.
    let (a_addr, _) = serve(&a, ClientAuth::Required, Check::Nothing).await?;
    let source = ctx(&member(&ca, "node/s", &local())?, &r)?;
    let e = call(
        "127.0.0.1",
        a_addr,
        source.client_config(PeerPolicy::Exactly(Identity::node("b")?))?,
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("WrongPeerError") && e.contains(r#"name: "a""#),
        "{e}"
    );
    Ok(())
}

#[tokio::test]
async fn rotated_certificates_are_used_without_restart() -> Result<()> {
    let ca = Ca::create("test")?;
    let r = Revocations::new();
    let server_member = member(&ca, "controller/1", &local())?;
    let server = ctx(&server_member, &r)?;
    let (addr, seen) = serve(&server, ClientAuth::Required, Check::Nothing).await?;
    let node_member = member(&ca, "node/a", &local())?;
    let node = ctx(&node_member, &r)?;
    let config = node.client_config(controller_policy())?;

    let server_serial = |config| async move {
        let tls = nephele_tls::net::connect(&addr.to_string(), config).await?;
        anyhow::Ok(connection_identity(tls.get_ref().1)?.serial)
    };
    let first = server_serial(config.clone()).await?;
    assert_eq!(first, server.identity().serial);

    // The server's files are replaced: the next handshake presents the new one.
    let rotated = write_cert(&ca, &server_member.files, "controller/1", &local())?;
    assert_ne!(rotated, first);
    assert_eq!(server_serial(config.clone()).await?, rotated);

    // Half a rotation (certificate replaced, key not yet): the previous
    // pair stays in use.
    let (next, _) = ca.issue(&Identity::controller("1")?, &local())?;
    write_private(&server_member.files.cert, next.chain_pem.as_bytes(), true)?;
    assert_eq!(server_serial(config.clone()).await?, rotated);

    // The client's own certificate rotates too.
    call("127.0.0.1", addr, config.clone())
        .await
        .map_err(anyhow::Error::msg)?;
    let new_node_serial = write_cert(&ca, &node_member.files, "node/a", &local())?;
    call("127.0.0.1", addr, config)
        .await
        .map_err(anyhow::Error::msg)?;
    let peers = seen.lock().unwrap().clone();
    let serials: Vec<_> = peers.iter().flatten().map(|p| p.serial.clone()).collect();
    assert_eq!(serials.len(), 2);
    assert_ne!(serials[0], new_node_serial);
    assert_eq!(serials[1], new_node_serial);
    Ok(())
}
