//! A partition isolating the leader: the minority side commits nothing and
//! serves no linearizable read, the majority elects a new leader and goes
//! on; after healing, the old leader's uncommitted proposals never took
//! effect and everyone converges.

mod common;

use common::Cluster;
use neph_controller::store::{ProposeError, ReadError, StateStore, conformance};
use nephele_state::{Command, Envelope};

fn put(key: &str) -> Envelope {
    Envelope::new(
        1,
        "test",
        Command::KvPut {
            key: key.to_owned(),
            value: b"v".to_vec(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_commits_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, 66, 10_000).await?;
    let stores = cluster.stores();
    let leader = conformance::wait_for_leader(&stores).await;
    let li = stores
        .iter()
        .position(|s| s.member_id() == leader)
        .unwrap_or(0);
    let old = stores[li].clone();
    let others: Vec<_> = stores
        .iter()
        .filter(|s| s.member_id() != leader)
        .cloned()
        .collect();
    let before = old.propose(put("before")).await?;

    // Cut the leader off from both followers, in both directions.
    let other_ids: Vec<u64> = others.iter().map(|s| s.member_id()).collect();
    old.partition_from(&other_ids);
    for o in &others {
        o.partition_from(&[leader]);
    }
    // (The published status may lag the reply by one loop turn.)
    let commit_at_cut = old.status().commit_index.max(before.index);

    // The minority: a write does not commit, a linearizable read is refused.
    let lost = old.propose(put("minority")).await;
    assert!(
        matches!(lost, Err(ProposeError::Timeout | ProposeError::NoLeader)),
        "{lost:?}"
    );
    assert_eq!(old.read(|_| ()).await, Err(ReadError::Timeout));
    assert_eq!(
        old.status().commit_index,
        commit_at_cut,
        "the minority committed"
    );

    // The majority elects a leader among themselves and takes writes.
    let new_leader = conformance::wait_for_leader(&others).await;
    assert_ne!(new_leader, leader);
    for i in 0..10 {
        let c = others[i % 2].propose(put(&format!("majority/{i}"))).await?;
        assert!(c.outcome.is_ok());
    }

    // Heal: the old leader follows, catches up, and its minority write is
    // gone for good.
    old.heal();
    for o in &others {
        o.heal();
    }
    conformance::wait_for_leader(&stores).await;
    for s in &stores {
        let (minority, majority, before) = s
            .read(|st| {
                (
                    st.kv.contains_key("minority"),
                    st.kv.keys().filter(|k| k.starts_with("majority/")).count(),
                    st.kv.contains_key("before"),
                )
            })
            .await?;
        assert!(
            !minority,
            "member {}: an unacknowledged minority write appeared",
            s.member_id()
        );
        assert_eq!((majority, before), (10, true), "member {}", s.member_id());
    }
    cluster.stop().await;
    Ok(())
}
