//! What real `neph-controller` processes refuse: requests and raft traffic
//! from another cluster, raft traffic from a removed member (which then
//! stops with a clear error instead of campaigning forever), a data
//! directory started under another member id, and storage damaged after a
//! crash (refused with a clear error, or recovered to its last durable
//! state and caught up: never served divergent).

mod procs;

use std::time::Duration;

use anyhow::{Context as _, bail};
use nephele_proto::cluster::v1 as pb;
use procs::{Member, PutOutcome, client, put, read, status, wait_leader};

fn peers_of(id: u64, addrs: &[String]) -> String {
    (1..=addrs.len() as u64)
        .filter(|p| *p != id)
        .map(|p| format!("{p}={}", addrs[usize::try_from(p - 1).unwrap_or(0)]))
        .collect::<Vec<_>>()
        .join(",")
}

async fn start_three(
    root: &std::path::Path,
    cluster: u64,
) -> anyhow::Result<(Vec<Member>, Vec<String>)> {
    let mut members = Vec::new();
    for id in 1..=3u64 {
        members.push(Member::new(id, root)?);
    }
    let addrs: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
    for m in members.iter_mut() {
        m.peers = peers_of(m.id, &addrs);
        m.spawn(cluster, true)?;
    }
    wait_leader(&addrs, cluster, 0).await?;
    Ok((members, addrs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_removed_members_are_refused() -> anyhow::Result<()> {
    const CLUSTER: u64 = 84;
    let tmp = tempfile::tempdir()?;
    let (mut members, addrs) = start_three(tmp.path(), CLUSTER).await?;
    let mut c = client(&addrs[0])?;
    assert_eq!(put(&mut c, CLUSTER, "k", b"v").await, PutOutcome::Acked);

    // Raft traffic claiming another cluster.
    let err = c
        .raft(pb::RaftRequest {
            cluster_id: CLUSTER + 1,
            from: 2,
            from_address: addrs[1].clone(),
            messages: Vec::new(),
        })
        .await
        .expect_err("raft traffic of another cluster accepted");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().starts_with("WRONG_CLUSTER_ID"), "{err:?}");

    // A whole member of another cluster pointed at ours: its campaigns are
    // refused and our leadership does not move.
    let before = status(&addrs[0], CLUSTER).await.context("status")?;
    let mut foreign = Member::new(9, tmp.path())?;
    foreign.peers = format!("1={},2={},3={}", addrs[0], addrs[1], addrs[2]);
    foreign.spawn(CLUSTER + 1, true)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = status(&addrs[0], CLUSTER).await.context("status")?;
    assert_eq!(
        (after.term, after.leader_id),
        (before.term, before.leader_id),
        "a foreign member disturbed the cluster"
    );
    foreign.kill9();

    // Member 3 is removed while it is down, then comes back with its old
    // data: its peers refuse it (STALE_MEMBER) and it stops with a clear
    // error instead of campaigning forever.
    members[2].kill9();
    let survivors = addrs[..2].to_vec();
    let leader = wait_leader(&survivors, CLUSTER, 3).await?;
    let mut lc = client(&addrs[usize::try_from(leader - 1)?])?;
    lc.remove_member(pb::RemoveMemberRequest {
        cluster_id: CLUSTER,
        id: 3,
    })
    .await
    .context("remove member 3")?;
    // The removal is committed on the leader; `c`'s member refuses member
    // 3 once it has applied it too (at once, or a heartbeat later).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        let r = c
            .raft(pb::RaftRequest {
                cluster_id: CLUSTER,
                from: 3,
                from_address: addrs[2].clone(),
                messages: Vec::new(),
            })
            .await;
        match r {
            Err(e) => break e,
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(r) => panic!("raft traffic of a removed member accepted for 10 s: {r:?}"),
        }
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().starts_with("STALE_MEMBER"), "{err:?}");
    members[2].spawn(CLUSTER, false)?;
    let st = members[2]
        .wait_exit(Duration::from_secs(10))
        .context("the removed member kept running")?;
    assert!(!st.success());
    let log = members[2].log_text();
    assert!(
        log.contains("was removed from the cluster"),
        "no clear error from the removed member:\n{log}"
    );

    // A data directory started under another member id.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_neph-controller"))
        .args(["run", "--id", "2", "--cluster-id", &CLUSTER.to_string()])
        .args(["--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&members[2].dir)
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("belongs to member 3, not 2"), "{stderr}");

    // The two remaining members still take writes.
    assert_eq!(put(&mut c, CLUSTER, "k2", b"v").await, PutOutcome::Acked);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_storage_after_a_crash_is_refused_or_recovered() -> anyhow::Result<()> {
    const CLUSTER: u64 = 85;
    let tmp = tempfile::tempdir()?;
    let (mut members, mut addrs) = start_three(tmp.path(), CLUSTER).await?;
    let mut c = client(&addrs[0])?;
    let mut acked = Vec::new();
    let mut next_id = 4;
    for i in 0..40 {
        let key = format!("k/{i}");
        if put(&mut c, CLUSTER, &key, b"v").await == PutOutcome::Acked {
            acked.push(key);
        }
    }
    assert_eq!(acked.len(), 40);
    // Crash member 3 and damage its file in two ways, one after the other:
    // the tail cut off, then a page in the middle overwritten.
    for (round, damage) in ["truncated tail", "overwritten page"].iter().enumerate() {
        members[2].kill9();
        let db = members[2].dir.join(neph_controller::raft::storage::DB_FILE);
        let len = std::fs::metadata(&db)?.len();
        match round {
            0 => std::fs::OpenOptions::new()
                .write(true)
                .open(&db)?
                .set_len(len.saturating_sub(4096))?,
            _ => {
                let mut bytes = std::fs::read(&db)?;
                let page = bytes.len() / 2 / 4096 * 4096;
                let end = (page + 4096).min(bytes.len());
                bytes[page..end].fill(0xa5);
                std::fs::write(&db, bytes)?;
            }
        }
        members[2].spawn(CLUSTER, false)?;
        match members[2].wait_exit(Duration::from_secs(3)) {
            Some(st) => {
                assert!(!st.success());
                let log = members[2].log_text();
                assert!(
                    log.contains("cannot open raft storage") || log.contains("is corrupt"),
                    "{damage}: refused without a clear error:\n{log}"
                );
                eprintln!("{damage}: refused to start, as it may");
                // The operator's way back: remove the member, add a new one
                // (new id, empty data), which catches up by snapshot.
                let old = members[2].id;
                let survivors = addrs[..2].to_vec();
                let leader = wait_leader(&survivors, CLUSTER, old).await?;
                let mut lc = client(&addrs[usize::try_from(leader - 1)?])?;
                lc.remove_member(pb::RemoveMemberRequest {
                    cluster_id: CLUSTER,
                    id: old,
                })
                .await
                .context("remove the damaged member")?;
                let mut fresh = Member::new(next_id, tmp.path())?;
                next_id += 1;
                fresh.peers = format!("1={},2={}", addrs[0], addrs[1]);
                fresh.spawn(CLUSTER, false)?;
                lc.add_member(pb::AddMemberRequest {
                    cluster_id: CLUSTER,
                    id: fresh.id,
                    address: fresh.addr.clone(),
                })
                .await
                .context("add a new member")?;
                addrs[2] = fresh.addr.clone();
                members[2] = fresh;
            }
            None => eprintln!("{damage}: recovered its last durable state"),
        }
        // Either way the third member serves what the majority committed.
        let mut m3 = client(&addrs[2])?;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(got) = read(&mut m3, CLUSTER, &acked).await
                && got.len() == acked.len()
            {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("{damage}: member 3 did not catch up");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let key = format!("after/{round}");
        assert_eq!(put(&mut m3, CLUSTER, &key, b"v").await, PutOutcome::Acked);
        acked.push(key);
    }
    Ok(())
}
