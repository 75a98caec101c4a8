//! Node join: `Nodes/CreateJoinToken` and `NodeJoin/Join` end to end, over
//! real gRPC, with a real cluster CA signing real CSRs.

use std::sync::Arc;
use std::time::Duration;

use neph_controller::api::join::NodeCa;
use nephele_proto::infra::v1 as infra;
use nephele_proto::node::v1 as node;
use nephele_tls::{Ca, CertRequest, Identity, Revocations, TlsContext, TlsFiles};
use tonic::Code;

use super::support::*;

async fn token(env: &mut Env, ttl_s: i64, node_id: &str) -> anyhow::Result<String> {
    let t = env
        .admin
        .nodes
        .create_join_token(infra::CreateJoinTokenRequest {
            ttl: Some(prost_types::Duration {
                seconds: ttl_s,
                nanos: 0,
            }),
            node_id: node_id.into(),
        })
        .await?
        .into_inner();
    assert!(t.name.starts_with("joinTokens/"), "{t:?}");
    assert!(t.token.starts_with("nphj_"), "{t:?}");
    Ok(t.token)
}

fn join_client(env: &Env) -> node::node_join_client::NodeJoinClient<tonic::transport::Channel> {
    node::node_join_client::NodeJoinClient::new(env.channel.clone())
}

async fn join(
    env: &Env,
    token: &str,
    node_id: &str,
    csr_for: &str,
) -> Result<(node::JoinResponse, String), tonic::Status> {
    let req = CertRequest::generate(&Identity::node(csr_for).unwrap(), "7").unwrap();
    let r = join_client(env)
        .join(node::JoinRequest {
            token: token.into(),
            node_id: node_id.into(),
            csr_pem: req.csr_pem,
        })
        .await?
        .into_inner();
    Ok((r, req.key_pem))
}

fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, want: &str) {
    match r {
        Ok(v) => panic!("expected a refusal ({want}), got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(want), "{s:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_works_once_expires_and_signs_only_its_node() -> anyhow::Result<()> {
    nephele_tls::install_default();
    let ca = Ca::create("7")?;
    let mut options = test_options();
    options.api.node_ca = Some(NodeCa(Arc::new(ca)));
    let mut env = start_with(options).await?;

    // Only admins make tokens.
    let mut nobody = clients(&env.channel, None);
    let r = nobody
        .nodes
        .create_join_token(infra::CreateJoinTokenRequest::default())
        .await;
    assert_eq!(r.unwrap_err().code(), Code::Unauthenticated);

    // A token joins once; the certificate is the node's, from this CA, and
    // works with the key that never left the "node".
    let t = token(&mut env, 60, "").await?;
    let (resp, key_pem) = join(&env, &t, "n1", "n1").await?;
    let dir = tempfile::tempdir()?;
    let files = TlsFiles::in_dir(dir.path());
    std::fs::write(&files.cert, &resp.cert_pem)?;
    std::fs::write(&files.key, &key_pem)?;
    std::fs::write(&files.ca, &resp.ca_pem)?;
    let ctx = TlsContext::load(&files, Revocations::new())?;
    assert_eq!(ctx.identity().identity, Identity::node("n1")?);
    assert_eq!(ctx.cluster_id(), "7");
    refused(
        join(&env, &t, "n1", "n1").await,
        Code::Unauthenticated,
        "already used",
    );
    refused(
        join(&env, &t, "n9", "n9").await,
        Code::Unauthenticated,
        "already used",
    );

    // n1 is a member now: a token for any node cannot take its name over
    // (and is not used up by trying); one made for n1 joins it again.
    let any = token(&mut env, 60, "").await?;
    refused(
        join(&env, &any, "n1", "n1").await,
        Code::Unauthenticated,
        "already a member",
    );
    let for_n1 = token(&mut env, 60, "n1").await?;
    join(&env, &for_n1, "n1", "n1").await?;
    join(&env, &any, "n5", "n5").await?;

    // A CSR for another node than the one asked for is refused, and does
    // not use the token up; a token for n2 joins only n2.
    let t2 = token(&mut env, 60, "n2").await?;
    refused(
        join(&env, &t2, "n2", "n3").await,
        Code::InvalidArgument,
        "CSR",
    );
    refused(
        join(&env, &t2, "n3", "n3").await,
        Code::Unauthenticated,
        "for node n2",
    );
    join(&env, &t2, "n2", "n2").await?;

    // A forged secret, and a token past its expiry.
    let t3 = token(&mut env, 1, "").await?;
    let forged = format!("{}{}", &t3[..t3.len() - 64], "0".repeat(64));
    refused(
        join(&env, &forged, "n4", "n4").await,
        Code::Unauthenticated,
        "unknown or invalid",
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    refused(
        join(&env, &t3, "n4", "n4").await,
        Code::Unauthenticated,
        "expired",
    );
    refused(
        join(&env, "nphj_nonsense", "n4", "n4").await,
        Code::InvalidArgument,
        "not a join token",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_without_the_ca_key_refuses_joins() -> anyhow::Result<()> {
    nephele_tls::install_default();
    let mut env = start().await?;
    let t = token(&mut env, 60, "").await?;
    refused(
        join(&env, &t, "n1", "n1").await,
        Code::FailedPrecondition,
        "operator key",
    );
    Ok(())
}

/// Writes a member's files to `dir` and loads them.
fn member_files(
    dir: &std::path::Path,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> anyhow::Result<TlsContext> {
    let files = TlsFiles::in_dir(dir);
    std::fs::create_dir_all(dir)?;
    std::fs::write(&files.cert, cert_pem)?;
    std::fs::write(&files.key, key_pem)?;
    std::fs::write(&files.ca, ca_pem)?;
    Ok(TlsContext::load(&files, Revocations::new())?)
}

fn tls_endpoint(addr: std::net::SocketAddr) -> tonic::transport::Endpoint {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
}

/// A controller serving TLS in process (its CA able to sign node CSRs),
/// with an admin client that verifies it.
struct TlsEnv {
    member: neph_controller::server::RunningController,
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
    /// Server-authenticated TLS, no client certificate.
    plain: tonic::transport::Channel,
    admin: Clients,
}

impl TlsEnv {
    async fn start() -> anyhow::Result<TlsEnv> {
        nephele_tls::install_default();
        let dir = tempfile::tempdir()?;
        let ca = Arc::new(Ca::create("7")?);
        let (cert, key) = ca.issue(
            &Identity::controller("1")?,
            &nephele_tls::IssueOptions::for_addresses(["127.0.0.1"]),
        )?;
        let ctl_tls = member_files(
            &dir.path().join("ctl-tls"),
            &cert.chain_pem,
            &key,
            ca.cert_pem(),
        )?;
        let mut options = test_options();
        options.tls = Some(ctl_tls);
        options.api.node_ca = Some(NodeCa(ca.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut config = super::common::test_config(1, &dir.path().join("c1"), Default::default());
        config.cluster_id = Some(7);
        config.init = true;
        let member = neph_controller::server::start_with(config, listener, options).await?;
        let addr = member.address;
        let token = loop {
            match neph_controller::api::auth::bootstrap_admin(
                &member.store,
                1,
                &dir.path().join("c1"),
            )
            .await
            {
                Ok(Some(t)) => break t,
                Ok(None) => anyhow::bail!("a token file already existed"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        // Clients without a certificate verify the controller against the CA.
        let server_auth = nephele_tls::server_auth_client_config(ca.cert_pem().as_bytes())?;
        let plain = nephele_tls::lazy_channel(tls_endpoint(addr), server_auth);
        let admin = clients(&plain, Some(&token));
        Ok(TlsEnv {
            member,
            addr,
            dir,
            plain,
            admin,
        })
    }

    /// Joins `node_id` with a token made for it; returns its TLS.
    async fn join(&mut self, node_id: &str) -> anyhow::Result<TlsContext> {
        let t = self
            .admin
            .nodes
            .create_join_token(infra::CreateJoinTokenRequest {
                ttl: None,
                node_id: node_id.into(),
            })
            .await?
            .into_inner()
            .token;
        let req = CertRequest::generate(&Identity::node(node_id)?, "7")?;
        let joined = node::node_join_client::NodeJoinClient::new(self.plain.clone())
            .join(node::JoinRequest {
                token: t,
                node_id: node_id.into(),
                csr_pem: req.csr_pem,
            })
            .await?
            .into_inner();
        member_files(
            &self.dir.path().join(format!("{node_id}-tls")),
            &joined.cert_pem,
            &req.key_pem,
            &joined.ca_pem,
        )
    }

    /// A fresh mutual-TLS NodeAgent client with `tls`.
    fn agent(
        &self,
        tls: &TlsContext,
    ) -> anyhow::Result<node::node_agent_client::NodeAgentClient<tonic::transport::Channel>> {
        let mtls = tls.client_config(nephele_tls::PeerPolicy::Kind(
            nephele_tls::IdentityKind::Controller,
        ))?;
        Ok(node::node_agent_client::NodeAgentClient::new(
            nephele_tls::lazy_channel(tls_endpoint(self.addr), mtls),
        ))
    }
}

fn register(id: &str) -> node::RegisterNodeRequest {
    node::RegisterNodeRequest {
        node_id: id.into(),
        address: "127.0.0.1:1".into(),
        capacity: Some(nephele_proto::compute::v1::Resources {
            vcpus: 4,
            memory_mib: 4096,
            disk_gib: 10,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_acts_only_as_its_node_and_no_certificate_is_refused()
-> anyhow::Result<()> {
    let mut env = TlsEnv::start().await?;
    let n1_tls = env.join("n1").await?;
    let mut n1 = env.agent(&n1_tls)?;
    // node/n1 acts as n1...
    n1.register_node(register("n1")).await?;
    n1.heartbeat(node::HeartbeatRequest {
        node: "nodes/n1".into(),
        ..Default::default()
    })
    .await?;
    // ... and never as another node.
    refused(
        n1.register_node(register("n2")).await,
        Code::PermissionDenied,
        "cannot act as",
    );
    refused(
        n1.heartbeat(node::HeartbeatRequest {
            node: "nodes/n2".into(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "cannot act as",
    );
    refused(
        n1.get_assignments(node::WatchAssignmentsRequest {
            node: "nodes/n2".into(),
        })
        .await,
        Code::PermissionDenied,
        "cannot act as",
    );
    // Without a certificate NodeAgent is refused, even with the admin
    // token (the default with TLS: node certificates only).
    refused(
        env.admin.agent.register_node(register("rogue")).await,
        Code::Unauthenticated,
        "certificate",
    );
    let mut rogue = clients(&env.plain, None);
    refused(
        rogue.agent.register_node(register("rogue")).await,
        Code::Unauthenticated,
        "certificate",
    );
    env.member.stop().await?;
    Ok(())
}

async fn audit_of(c: &mut Clients) -> anyhow::Result<Vec<nephele_proto::ops::v1::Event>> {
    Ok(c.events
        .list_events(nephele_proto::ops::v1::ListEventsRequest {
            audit: true,
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_is_refused_everywhere_and_cannot_rejoin() -> anyhow::Result<()> {
    let mut env = TlsEnv::start().await?;
    let n1_tls = env.join("n1").await?;
    let mut n1 = env.agent(&n1_tls)?;
    n1.register_node(register("n1")).await?;
    let beat = || node::HeartbeatRequest {
        node: "nodes/n1".into(),
        ..Default::default()
    };
    n1.heartbeat(beat()).await?;
    let mut watch = n1
        .watch_assignments(node::WatchAssignmentsRequest {
            node: "nodes/n1".into(),
        })
        .await?
        .into_inner();
    assert!(watch.message().await?.is_some(), "no first assignment set");

    // A refusal on the certificate path goes into the audit trail.
    refused(
        n1.heartbeat(node::HeartbeatRequest {
            node: "nodes/n2".into(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "cannot act as",
    );
    let audit = audit_of(&mut env.admin).await?;
    let r = audit
        .iter()
        .find(|r| r.actor == "nodes/n1" && r.rpc.ends_with("NodeAgent/Heartbeat"))
        .unwrap_or_else(|| panic!("no refusal of n1 in {audit:#?}"));
    assert_eq!(r.resource, "nodes/n2");
    assert!(r.result.starts_with("PERMISSION_DENIED"), "{r:?}");
    assert!(r.peer.starts_with("127.0.0.1:"), "{r:?}");

    // Only admins remove, only known nodes.
    let mut nobody = clients(&env.plain, None);
    let remove = |name: &str| infra::RemoveNodeRequest { name: name.into() };
    assert_eq!(
        nobody
            .nodes
            .remove_node(remove("nodes/n1"))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_err(
        env.admin.nodes.remove_node(remove("nodes/nope")).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    env.admin.nodes.remove_node(remove("nodes/n1")).await?;
    assert_err(
        env.admin
            .nodes
            .get_node(infra::GetNodeRequest {
                name: "nodes/n1".into(),
            })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );

    // Its open connection: every call refused; its watch ends.
    refused(n1.heartbeat(beat()).await, Code::Unauthenticated, "revoked");
    refused(
        n1.register_node(register("n1")).await,
        Code::Unauthenticated,
        "revoked",
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .map_err(|_| anyhow::anyhow!("the watch of a removed node stays open"))?;
    match ended {
        Err(s) => assert_eq!(s.code(), Code::Unauthenticated, "{s:?}"),
        Ok(m) => panic!("the watch of a removed node went on: {m:?}"),
    }

    // A fresh connection: the handshake itself is refused.
    let mut fresh = env.agent(&n1_tls)?;
    let r = fresh.heartbeat(beat()).await;
    assert!(
        r.as_ref().is_err_and(|s| matches!(
            s.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown
        )),
        "a revoked certificate got a connection: {r:?}"
    );

    // No new join token for n1, and none made for any node joins it.
    assert_err(
        env.admin
            .nodes
            .create_join_token(infra::CreateJoinTokenRequest {
                ttl: None,
                node_id: "n1".into(),
            })
            .await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    let any = env
        .admin
        .nodes
        .create_join_token(infra::CreateJoinTokenRequest::default())
        .await?
        .into_inner()
        .token;
    let req = CertRequest::generate(&Identity::node("n1")?, "7")?;
    refused(
        node::node_join_client::NodeJoinClient::new(env.plain.clone())
            .join(node::JoinRequest {
                token: any,
                node_id: "n1".into(),
                csr_pem: req.csr_pem,
            })
            .await,
        Code::Unauthenticated,
        "removed",
    );
    // Removing it again says so.
    assert_err(
        env.admin.nodes.remove_node(remove("nodes/n1")).await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    env.member.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_are_signed_with_the_sealed_ca_of_the_replicated_state() -> anyhow::Result<()> {
    use neph_controller::store::StateStore as _;
    nephele_tls::install_default();
    let key = nephele_tls::OperatorKey::generate()?;
    let ca = Ca::create("7")?;
    let sealed = ca.seal(&key)?;
    let mut options = test_options();
    options.api.operator_key = Some(Arc::new(key.clone()));
    let mut env = start_with(options).await?;

    // Before init put the CA into the state, there is nothing to sign with
    // (and the token is not used up).
    let t = token(&mut env, 60, "").await?;
    refused(
        join(&env, &t, "n1", "n1").await,
        Code::FailedPrecondition,
        "no cluster CA yet",
    );
    neph_controller::tls::publish_ca(env.member.store.clone(), sealed.clone()).await;
    // The state keeps it sealed: the certificate in the clear, the key not.
    let record = env
        .member
        .store
        .read(|s| s.cluster_ca.clone())
        .await?
        .expect("the CA in the state");
    assert_eq!(record.cert_pem, ca.cert_pem());
    assert_eq!(record.sealed_key, sealed.sealed_key);
    assert!(
        !String::from_utf8_lossy(&record.sealed_key).contains("PRIVATE KEY"),
        "the CA key is in the clear"
    );
    let (resp, _) = join(&env, &t, "n1", "n1").await?;
    assert_eq!(resp.ca_pem, ca.cert_pem());
    // Publishing again is a no-op; another CA is refused by the state.
    neph_controller::tls::publish_ca(env.member.store.clone(), sealed).await;
    let other = Ca::create("7")?.seal(&key)?;
    let r = env
        .member
        .store
        .propose(nephele_state::Envelope::new(
            1,
            "system",
            nephele_state::Command::SetClusterCa {
                ca: neph_controller::tls::record_of(&other),
            },
        ))
        .await?;
    assert!(r.outcome.is_err(), "a second CA was accepted: {r:?}");

    // A controller whose operator key does not open the state's CA
    // refuses joins, saying why.
    let mut options = test_options();
    options.api.operator_key = Some(Arc::new(nephele_tls::OperatorKey::generate()?));
    let mut env2 = start_with(options).await?;
    neph_controller::tls::publish_ca(env2.member.store.clone(), ca.seal(&key)?).await;
    let t = token(&mut env2, 60, "").await?;
    refused(
        join(&env2, &t, "n1", "n1").await,
        Code::FailedPrecondition,
        "cannot open the cluster CA",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_renews_its_own_certificate_only() -> anyhow::Result<()> {
    let mut env = TlsEnv::start().await?;
    let n1_tls = env.join("n1").await?;
    let old_serial = n1_tls.identity().serial;
    let mtls = n1_tls.client_config(nephele_tls::PeerPolicy::Kind(
        nephele_tls::IdentityKind::Controller,
    ))?;
    let mut n1 = node::node_join_client::NodeJoinClient::new(nephele_tls::lazy_channel(
        tls_endpoint(env.addr),
        mtls,
    ));
    let csr = |id: &str| CertRequest::generate(&Identity::node(id).unwrap(), "7").unwrap();

    // Its own identity, a new key: a new certificate from the same CA.
    let req = csr("n1");
    let r = n1
        .renew(node::RenewRequest {
            csr_pem: req.csr_pem.clone(),
        })
        .await?
        .into_inner();
    assert_ne!(r.serial, old_serial);
    let renewed = member_files(
        &env.dir.path().join("n1-renewed"),
        &r.cert_pem,
        &req.key_pem,
        &r.ca_pem,
    )?;
    assert_eq!(renewed.identity().identity, Identity::node("n1")?);
    assert_eq!(renewed.identity().serial, r.serial);
    // ... and it works: the node acts with it.
    env.agent(&renewed)?.register_node(register("n1")).await?;
    let events = env
        .admin
        .events
        .list_events(nephele_proto::ops::v1::ListEventsRequest {
            resource: "nodes/n1".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "node.certificate_renewed" && e.message == r.serial),
        "{events:#?}"
    );

    // Anyone else's identity: refused.
    refused(
        n1.renew(node::RenewRequest {
            csr_pem: csr("n2").csr_pem,
        })
        .await,
        Code::InvalidArgument,
        "CSR",
    );
    // Without a certificate: refused.
    refused(
        node::node_join_client::NodeJoinClient::new(env.plain.clone())
            .renew(node::RenewRequest {
                csr_pem: csr("n1").csr_pem,
            })
            .await,
        Code::Unauthenticated,
        "certificate",
    );
    // A removed node renews nothing.
    env.admin
        .nodes
        .remove_node(infra::RemoveNodeRequest {
            name: "nodes/n1".into(),
        })
        .await?;
    refused(
        n1.renew(node::RenewRequest {
            csr_pem: csr("n1").csr_pem,
        })
        .await,
        Code::Unauthenticated,
        "revoked",
    );
    env.member.stop().await?;
    Ok(())
}
