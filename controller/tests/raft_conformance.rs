//! The shared store conformance suite on the raft backend, in process, with
//! 1 and 3 members on loopback.

mod common;

use common::Cluster;
use neph_controller::store::conformance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, 11, 10_000).await?;
    conformance::run_all(&cluster.stores()).await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, 33, 10_000).await?;
    conformance::run_all(&cluster.stores()).await;
    cluster.stop().await;
    Ok(())
}

/// With a tiny snapshot interval every check also runs across compactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_compacting() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, 34, 20).await?;
    conformance::run_all(&cluster.stores()).await;
    let s = cluster.members[0].store.status();
    assert!(s.snapshot_index > 1, "no compaction happened: {s:?}");
    cluster.stop().await;
    Ok(())
}
