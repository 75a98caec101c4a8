//! `neph-controller` processes with `--store etcd` over one real etcd on
//! loopback: the API is served (a flavor written on one controller reads
//! back on another), only the holder of the etcd leadership lease runs the
//! control loops, and after it is killed with `kill -9` the other takes
//! over once the lease expires. Needs the `etcd` cargo feature; skipped with
//! a message when no `etcd` binary is on the PATH.
#![cfg(feature = "etcd")]

mod etcd_harness;
mod procs;

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nephele_proto::compute::v1 as compute;
use nephele_proto::infra::v1 as infra;
use nephele_proto::node::v1 as node;
use procs::Member;
use tonic::Request;
use tonic::transport::Channel;

fn etcd_member(id: u64, root: &std::path::Path, url: &str) -> anyhow::Result<Member> {
    let mut m = Member::new(id, root)?;
    for (k, v) in [
        ("NEPHELE_STORE", "etcd"),
        ("NEPHELE_ETCD_ENDPOINTS", url),
        ("NEPHELE_ETCD_PREFIX", "/process-test"),
        ("NEPHELE_ETCD_LEASE_TTL_S", "2"),
        ("NEPHELE_NODE_TIMEOUT_MS", "500"),
        ("NEPHELE_FENCE_LEASE_MS", "500"),
        // The test's node registers with the admin token (no certificate).
        ("NEPHELE_ALLOW_NODE_TOKENS", "true"),
    ] {
        m.env.push((k.into(), v.into()));
    }
    Ok(m)
}

fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    r
}

fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(procs::pki::lazy(
        Channel::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(300))
            .timeout(Duration::from_secs(3)),
    ))
}

async fn status(addr: &str, token: &str) -> anyhow::Result<infra::ClusterStatus> {
    let mut c = infra::cluster_client::ClusterClient::new(channel(addr)?);
    Ok(
        c.get_cluster_status(authed(token, infra::GetClusterStatusRequest {}))
            .await?
            .into_inner(),
    )
}

/// Polls `f` every 100 ms until it answers `Some`, for at most `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers a node that never heartbeats; the leader's liveness loop marks
/// it DOWN (which proves the loops run somewhere) within `within`.
async fn node_goes_down(addr: &str, token: &str, id: &str, within: Duration) -> anyhow::Result<()> {
    let mut agent = node::node_agent_client::NodeAgentClient::new(channel(addr)?);
    agent
        .register_node(authed(
            token,
            node::RegisterNodeRequest {
                node_id: id.into(),
                address: "127.0.0.1:9".into(),
                capacity: Some(compute::Resources {
                    vcpus: 2,
                    memory_mib: 1024,
                    disk_gib: 10,
                }),
                labels: Default::default(),
            },
        ))
        .await
        .with_context(|| format!("register {id}"))?;
    let name = format!("nodes/{id}");
    eventually(within, &format!("{name} to be marked DOWN"), || {
        let name = name.clone();
        async move {
            let mut c = infra::nodes_client::NodesClient::new(channel(addr).ok()?);
            let n = c
                .get_node(authed(token, infra::GetNodeRequest { name }))
                .await
                .ok()?
                .into_inner();
            (n.state == infra::NodeState::Down as i32).then_some(())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_over_etcd_serve_the_api_and_fail_over() -> anyhow::Result<()> {
    let Some(etcd) = etcd_harness::start_etcd()? else {
        return Ok(());
    };
    let root = tempfile::tempdir()?;
    let mut m1 = etcd_member(1, root.path(), &etcd.url)?;
    let mut m2 = etcd_member(2, root.path(), &etcd.url)?;
    m1.spawn(0, true)?;

    // `init` writes the admin token once the store is up.
    let token_file = m1
        .dir
        .join(neph_controller::api::auth::BOOTSTRAP_TOKEN_FILE);
    let token = eventually(Duration::from_secs(20), "the admin token", || {
        let f = token_file.clone();
        async move { std::fs::read_to_string(f).ok().map(|t| t.trim().to_owned()) }
    })
    .await
    .with_context(|| m1.log_text())?;

    // The API writes through etcd and reads back.
    let mut flavors = compute::flavors_client::FlavorsClient::new(channel(&m1.addr)?);
    let created = flavors
        .create_flavor(authed(
            &token,
            compute::CreateFlavorRequest {
                flavor_id: "small".into(),
                flavor: Some(compute::Flavor {
                    name: String::new(),
                    resources: Some(compute::Resources {
                        vcpus: 1,
                        memory_mib: 256,
                        disk_gib: 1,
                    }),
                }),
                request_id: String::new(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(created.name, "flavors/small");
    let s1 = status(&m1.addr, &token).await?;
    assert_eq!(s1.backend, "etcd");
    assert!(s1.backend_endpoints.contains(&etcd.url), "{s1:?}");
    assert_eq!(s1.leader_id, 1, "{s1:?}");

    // A second controller on the same etcd and prefix sees the same state
    // (and the same users: the admin token works there too).
    m2.spawn(0, false)?;
    let addr2 = m2.addr.clone();
    let got = eventually(
        Duration::from_secs(20),
        "the flavor on controller 2",
        || {
            let (addr, token) = (addr2.clone(), token.clone());
            async move {
                let mut c = compute::flavors_client::FlavorsClient::new(channel(&addr).ok()?);
                c.get_flavor(authed(
                    &token,
                    compute::GetFlavorRequest {
                        name: "flavors/small".into(),
                    },
                ))
                .await
                .ok()
                .map(|r| r.into_inner())
            }
        },
    )
    .await
    .with_context(|| m2.log_text())?;
    assert_eq!(got, created);
    let s2 = status(&m2.addr, &token).await?;
    assert_eq!((s2.leader_id, s2.answered_by, s2.term), (1, 2, s1.term));

    // Only the lease holder runs the loops: a node that never heartbeats is
    // marked DOWN by controller 1, and controller 2 never led.
    node_goes_down(&m2.addr, &token, "n1", Duration::from_secs(10)).await?;
    assert!(m1.log_text().contains("control loops run"));
    assert!(
        !m2.log_text().contains("control loops run"),
        "{}",
        m2.log_text()
    );
    assert!(m2.log_text().contains("control loops idle"));

    // kill -9 the leader: controller 2 takes over once the lease (2 s)
    // expires, in a later term, and its loops act.
    m1.kill9();
    let killed = Instant::now();
    let s = eventually(Duration::from_secs(10), "controller 2 to lead", || {
        let (addr, token) = (addr2.clone(), token.clone());
        async move {
            status(&addr, &token)
                .await
                .ok()
                .filter(|s| s.leader_id == 2)
        }
    })
    .await?;
    assert!(s.term > s1.term, "{s:?} after {s1:?}");
    eprintln!("controller 2 leads {:?} after the kill", killed.elapsed());
    node_goes_down(&m2.addr, &token, "n2", Duration::from_secs(10)).await?;
    assert!(m2.log_text().contains("control loops run"));
    Ok(())
}
