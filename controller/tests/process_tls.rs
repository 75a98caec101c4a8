//! What a real `neph-controller` port accepts over TLS: the public API
//! and the node protocol from any client that verifies the controller
//! (then bearer tokens decide), the cluster protocol (raft, membership,
//! status) only from `controller/*` certificates of this cluster's CA; a
//! plaintext client, or a certificate from another CA, gets nothing.

mod procs;

use std::sync::Arc;
use std::time::Duration;

use nephele_proto::cluster::v1 as pb;
use nephele_proto::compute::v1 as compute;
use nephele_proto::node::v1 as node;
use nephele_tls::Identity;
use procs::{Member, pki, wait_leader};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const CLUSTER: u64 = 91;

fn endpoint(addr: &str) -> Endpoint {
    Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3))
}

/// A cluster-protocol call over `config`: the status code, or OK.
async fn cluster_call(addr: &str, config: Arc<rustls::ClientConfig>) -> Code {
    let ch = nephele_tls::lazy_channel(endpoint(addr), config);
    match pb::cluster_client::ClusterClient::new(ch)
        .status(pb::StatusRequest {
            cluster_id: CLUSTER,
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// A public-API call without a token over `config`.
async fn api_call(addr: &str, config: Arc<rustls::ClientConfig>) -> Code {
    let ch = nephele_tls::lazy_channel(endpoint(addr), config);
    match compute::flavors_client::FlavorsClient::new(ch)
        .list_flavors(compute::ListFlavorsRequest::default())
        .await
    {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// How a refused handshake surfaces to a tonic client: in TLS 1.3 the
/// client may finish its side before the server rejects its certificate,
/// so the call dies as UNAVAILABLE, CANCELLED or UNKNOWN.
fn transport_refused(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Cancelled | Code::Unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_refuses_plaintext_foreign_cas_and_non_controllers_on_raft() -> anyhow::Result<()>
{
    let tmp = tempfile::tempdir()?;
    let mut m = Member::new(1, tmp.path())?;
    m.spawn(CLUSTER, true)?;
    let addrs = vec![m.addr.clone()];
    wait_leader(&addrs, CLUSTER, 0).await?;
    let addr = m.addr.as_str();

    // A controller certificate of this cluster: the cluster protocol answers.
    assert_eq!(cluster_call(addr, pki::client_config()).await, Code::Ok);

    // Plaintext: neither the cluster protocol nor the API answer.
    let plain = Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3))
        .connect_lazy();
    let r = pb::cluster_client::ClusterClient::new(plain.clone())
        .status(pb::StatusRequest {
            cluster_id: CLUSTER,
        })
        .await;
    assert!(r.is_err(), "plaintext raft status answered: {r:?}");
    let r = compute::flavors_client::FlavorsClient::new(plain)
        .list_flavors(compute::ListFlavorsRequest::default())
        .await;
    assert!(r.is_err(), "plaintext API call answered: {r:?}");

    // No client certificate: the cluster protocol refuses the call; the
    // API is reached and wants a token.
    let anon = pki::anonymous_client();
    assert_eq!(
        cluster_call(addr, anon.clone()).await,
        Code::Unauthenticated
    );
    assert_eq!(api_call(addr, anon).await, Code::Unauthenticated);

    // A controller certificate from another CA: the handshake fails, so no
    // service answers (never OK or a service's own refusal).
    let foreign = pki::client_as(&Identity::controller("1")?, true);
    let code = cluster_call(addr, foreign.clone()).await;
    assert!(transport_refused(code), "raft with a foreign CA: {code:?}");
    let code = api_call(addr, foreign.clone()).await;
    assert!(transport_refused(code), "API with a foreign CA: {code:?}");
    // ... and the node protocol too.
    let ch = nephele_tls::lazy_channel(endpoint(addr), foreign);
    let r = node::node_agent_client::NodeAgentClient::new(ch)
        .heartbeat(node::HeartbeatRequest::default())
        .await;
    assert!(
        r.as_ref().is_err_and(|s| transport_refused(s.code())),
        "node protocol with a foreign CA: {r:?}"
    );

    // A node certificate of this cluster is not a controller: refused on
    // the cluster protocol.
    let node_cert = pki::client_as(&Identity::node("n1")?, false);
    assert_eq!(cluster_call(addr, node_cert).await, Code::PermissionDenied);
    Ok(())
}
