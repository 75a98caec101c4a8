//! Backpressure: a member holding its maximum of proposals in flight
//! refuses more at once with `Overloaded` (nothing queued without bound),
//! and takes proposals again as soon as those are answered.

use std::collections::BTreeMap;
use std::time::Duration;

use neph_controller::raft::RaftConfig;
use neph_controller::server;
use neph_controller::store::{ProposeError, StateStore};
use nephele_state::{Command, Envelope};

fn put(key: String) -> Envelope {
    Envelope::new(
        1,
        "test",
        Command::KvPut {
            key,
            value: vec![7; 64],
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_beyond_the_bound_are_refused_at_once() -> anyhow::Result<()> {
    const LIMIT: usize = 4;
    let dir = tempfile::tempdir()?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut c = RaftConfig::new(1, dir.path().to_owned(), String::new());
    c.cluster_id = Some(3);
    c.init = true;
    c.peers = BTreeMap::new();
    c.tick = Duration::from_millis(20);
    c.max_proposals_in_flight = LIMIT;
    let running = server::start(c, l).await?;
    let store = running.store.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !store.leadership().is_leader() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Many at once: each waits for an fsync, so more than LIMIT are
    // submitted before the first is answered.
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move { s.propose(put(format!("k{i}"))).await })
        })
        .collect();
    let (mut ok, mut overloaded) = (0, 0);
    for t in tasks {
        match t.await? {
            Ok(_) => ok += 1,
            Err(ProposeError::Overloaded { limit }) => {
                assert_eq!(limit, LIMIT);
                overloaded += 1;
            }
            Err(e) => anyhow::bail!("unexpected error: {e}"),
        }
    }
    eprintln!("{ok} committed, {overloaded} refused as overloaded");
    assert!(ok >= LIMIT, "fewer than {LIMIT} proposals went through");
    assert!(overloaded > 0, "nothing was refused beyond the bound");
    // Every slot came back: LIMIT sequential proposals all go through.
    for i in 0..LIMIT * 2 {
        store.propose(put(format!("again{i}"))).await?;
    }
    running.stop().await?;
    Ok(())
}
