//! The shared store conformance suite on the etcd backend: three
//! controllers (`EtcdStore`s) over one real etcd (Debian's `etcd-server`)
//! started on loopback ports with a temporary data directory, once as
//! configured by default and once snapshotting and compacting the command
//! log every 20 commands. Needs the `etcd` cargo feature; skipped with a
//! message when no `etcd` binary is on the PATH.
#![cfg(feature = "etcd")]

use std::time::{Duration, Instant};

use neph_controller::store::etcd::{EtcdConfig, EtcdStore};
use neph_controller::store::{StateStore, conformance};

mod etcd_harness;

use etcd_harness::{Etcd, start_etcd};

fn config(etcd: &Etcd, id: u64, snapshot_interval: u64) -> EtcdConfig {
    let mut c = EtcdConfig::new(vec![etcd.url.clone()], id);
    c.prefix = "/conformance".into();
    c.snapshot_interval = snapshot_interval;
    c
}

/// Starts controllers 1..=n, retrying while etcd comes up.
async fn start_stores(
    etcd: &Etcd,
    n: u64,
    snapshot_interval: u64,
) -> anyhow::Result<Vec<EtcdStore>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stores = Vec::new();
    for id in 1..=n {
        loop {
            match EtcdStore::start(config(etcd, id, snapshot_interval)).await {
                Ok(s) => {
                    stores.push(s);
                    break;
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(stores)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_controllers_over_one_etcd() -> anyhow::Result<()> {
    let Some(etcd) = start_etcd()? else {
        return Ok(());
    };
    let stores = start_stores(&etcd, 3, 10_000).await?;
    conformance::run_all(&stores).await;

    // A fourth controller started later replays the whole log.
    let late = EtcdStore::start(config(&etcd, 4, 10_000)).await?;
    let n = late.read(|s| s.kv.len()).await?;
    let m = stores[0].read(|s| s.kv.len()).await?;
    assert_eq!(n, m);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_controllers_compacting_every_20_commands() -> anyhow::Result<()> {
    let Some(etcd) = start_etcd()? else {
        return Ok(());
    };
    let stores = start_stores(&etcd, 3, 20).await?;
    conformance::run_all(&stores).await;

    // The leader snapshotted and deleted the log it covers (commands keep
    // arriving while a compaction runs, so up to a few intervals' worth of
    // keys may remain).
    let total = i64::try_from(stores[0].read(|s| s.applied).await?)?;
    let mut client = etcd_client::Client::connect([etcd.url.clone()], None).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (snapshots, log_keys) = loop {
        let count = |prefix: &'static str| {
            let mut c = client.clone();
            async move {
                c.get(
                    prefix,
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only(),
                    ),
                )
                .await
                .map(|r| r.count())
            }
        };
        let s = count("/conformance/snapshot/").await?;
        let l = count("/conformance/log/").await?;
        if s == 1 && l + 20 < total || Instant::now() > deadline {
            break (s, l);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(snapshots, 1, "expected exactly the newest snapshot");
    assert!(
        log_keys + 20 < total,
        "{log_keys} log keys left of {total} commands after compaction"
    );
    // etcd's history is compacted too: reading an early revision fails.
    let early = client
        .get(
            "/conformance/log/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_revision(2),
            ),
        )
        .await;
    assert!(early.is_err(), "etcd history was not compacted");

    // A controller started now loads the snapshot plus the log after it.
    let late = EtcdStore::start(config(&etcd, 4, 20)).await?;
    let n = late.read(|s| s.kv.clone()).await?;
    let m = stores[0].read(|s| s.kv.clone()).await?;
    assert_eq!(n, m);
    // And it goes on applying new writes.
    conformance::write_then_read_everywhere(&[late, stores[0].clone()]).await;
    Ok(())
}
