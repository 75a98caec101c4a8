//! Membership changes at runtime: grow a 1-member cluster to 3 (the new
//! members catch up by snapshot), ask a follower to add a member (forwarded
//! to the leader), remove a member and check it is refused afterwards.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Cluster, test_config};
use neph_controller::raft::MemberChangeError;
use neph_controller::server;
use neph_controller::store::{StateStore, conformance};
use nephele_proto::cluster::v1 as pb;
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

async fn wait_applied(s: &neph_controller::raft::RaftStore, index: u64) {
    for _ in 0..200 {
        if s.status().applied_index >= index {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("member {} did not apply {index}", s.member_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_and_shrink() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1, 55, 20).await?;
    let one = cluster.members[0].store.clone();
    let one_addr = cluster.members[0].address.to_string();
    conformance::wait_for_leader(std::slice::from_ref(&one)).await;
    for i in 0..50 {
        one.propose(put(&format!("k{i}"))).await?;
    }
    assert!(one.status().snapshot_index > 1, "expected a compaction");

    // Two empty members join.
    let mut joiners = Vec::new();
    for id in [2u64, 3] {
        let dir = tempfile::tempdir()?;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut c = test_config(id, dir.path(), BTreeMap::from([(1, one_addr.clone())]));
        c.cluster_id = Some(55);
        joiners.push((server::start(c, l).await?, dir));
    }
    let two = joiners[0].0.store.clone();
    let three = joiners[1].0.store.clone();
    let idx = one.add_member(2, joiners[0].0.address.to_string()).await?;
    wait_applied(&two, idx).await;
    // Ask the follower to add the third member: it forwards to the leader.
    let idx = two.add_member(3, joiners[1].0.address.to_string()).await?;
    wait_applied(&three, idx).await;
    assert_eq!(one.status().voters, vec![1, 2, 3]);
    let c = three.propose(put("via-three")).await?;
    for s in [&one, &two, &three] {
        let (n, has) = s
            .read(|st| {
                (
                    st.kv.keys().filter(|k| k.starts_with('k')).count(),
                    st.kv.contains_key("via-three"),
                )
            })
            .await?;
        assert_eq!((n, has), (50, true), "member {}", s.member_id());
        assert!(s.status().applied_index >= c.index);
    }

    // Remove member 3.
    one.remove_member(3).await?;
    assert_eq!(one.status().voters, vec![1, 2]);
    one.propose(put("after-removal")).await?;
    // Its raft traffic is now refused as stale.
    let mut client = neph_controller::raft::transport::connect(&one_addr)?;
    let err = client
        .raft(pb::RaftRequest {
            cluster_id: 55,
            from: 3,
            from_address: String::new(),
            messages: Vec::new(),
        })
        .await
        .expect_err("a removed member's messages were accepted");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // And its id cannot come back.
    assert!(matches!(
        one.add_member(3, "127.0.0.1:1".into()).await,
        Err(MemberChangeError::Refused(_))
    ));

    for (m, _dir) in joiners {
        m.stop().await?;
    }
    cluster.members.truncate(1);
    cluster.stop().await;
    Ok(())
}
