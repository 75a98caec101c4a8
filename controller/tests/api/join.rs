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
