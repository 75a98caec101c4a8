//! Faults between real `neph-controller` processes on loopback, each test
//! with concurrent clients whose history must check linearizable:
//!
//! - a partition isolating the leader, made by TCP proxies the test puts
//!   on every raft path between members: the minority commits nothing and
//!   serves no read, the majority goes on, and after healing everyone
//!   converges without the minority's write;
//! - `kill -9` of the leader, twice, with restarts;
//! - a member whose data directory is on a tiny tmpfs: it fails its writes
//!   with a clear error and stops, the others go on, and once space returns
//!   it restarts and catches up.

mod procs;

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use neph_controller::store::linearizability;
use procs::{
    History, Member, Proxy, PutOutcome, SmallDisk, client, put, read, status, wait_leader,
};
use tokio::sync::watch;

/// Checks the history and prints its size; fails on any anomaly.
fn check(history: &History) -> anyhow::Result<()> {
    let ops = history.ops();
    let done = ops.iter().filter(|o| o.ret.is_some()).count();
    let unknown = ops.len() - done;
    eprintln!(
        "history: {} ops, {done} completed, {unknown} unknown",
        ops.len()
    );
    if done < 100 {
        bail!("only {done} operations completed: too few to mean anything");
    }
    let violations = linearizability::check(&ops);
    if !violations.is_empty() {
        bail!("not linearizable: {violations:#?}");
    }
    Ok(())
}

/// Waits until every member at `addrs` applied the same index and reads the
/// same values for `keys`.
async fn converged(addrs: &[String], cluster: u64, keys: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut applied = Vec::new();
        let mut views = Vec::new();
        for a in addrs {
            applied.push(status(a, cluster).await.map(|s| s.applied_index));
            let mut c = client(a)?;
            views.push(read(&mut c, cluster, keys).await.ok());
        }
        let same_applied = applied[0].is_some() && applied.iter().all(|x| *x == applied[0]);
        let same_views = views[0].is_some() && views.iter().all(|v| *v == views[0]);
        if same_applied && same_views {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("members did not converge: applied {applied:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_by_proxies_isolates_the_leader() -> anyhow::Result<()> {
    const CLUSTER: u64 = 81;
    let tmp = tempfile::tempdir()?;
    let mut members = Vec::new();
    for id in 1..=3u64 {
        members.push(Member::new(id, tmp.path())?);
    }
    // One proxy per direction: `proxies[(from, to)]` carries from's raft
    // traffic to `to`. Clients talk to members directly.
    let mut proxies = std::collections::BTreeMap::new();
    for from in 1..=3u64 {
        for to in 1..=3u64 {
            if from != to {
                let upstream = members[usize::try_from(to - 1)?].addr.clone();
                proxies.insert((from, to), Proxy::start(upstream).await?);
            }
        }
    }
    for m in members.iter_mut() {
        m.peers = (1..=3u64)
            .filter(|p| *p != m.id)
            .map(|p| format!("{p}={}", proxies[&(m.id, p)].addr))
            .collect::<Vec<_>>()
            .join(",");
        m.spawn(CLUSTER, true)?;
    }
    let addrs: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
    let leader = wait_leader(&addrs, CLUSTER, 0).await?;

    let history = History::new();
    let alive = std::sync::Arc::new(std::sync::Mutex::new(vec![true; 3]));
    let (stop, stop_rx) = watch::channel(false);
    let clients = procs::spawn_clients(
        4,
        3,
        addrs.clone(),
        alive.clone(),
        CLUSTER,
        history.clone(),
        stop_rx,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Cut every raft path to and from the leader.
    for ((from, to), p) in &proxies {
        if *from == leader || *to == leader {
            p.cut();
        }
    }
    let li = usize::try_from(leader - 1)?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let commit_at_cut = status(&addrs[li], CLUSTER)
        .await
        .context("the isolated leader does not answer")?
        .commit_index;
    let majority: Vec<String> = addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != li)
        .map(|(_, a)| a.clone())
        .collect();
    let new_leader = wait_leader(&majority, CLUSTER, leader).await?;
    // The majority goes on; the minority commits nothing.
    let mut maj = client(&majority[0])?;
    assert_eq!(
        put(&mut maj, CLUSTER, "majority", b"yes").await,
        PutOutcome::Acked,
        "the majority refused a write"
    );
    let mut min = client(&addrs[li])?;
    let lost = put(&mut min, CLUSTER, "minority", b"no").await;
    assert_ne!(lost, PutOutcome::Acked, "the isolated old leader committed");
    assert!(
        read(&mut min, CLUSTER, &["majority".into()]).await.is_err(),
        "the isolated member served a linearizable read"
    );
    let s = status(&addrs[li], CLUSTER).await.context("status")?;
    assert_eq!(
        s.commit_index, commit_at_cut,
        "the minority's commit index moved"
    );
    eprintln!("partition: old leader {leader} isolated, new leader {new_leader}, {lost:?}");
    tokio::time::sleep(Duration::from_millis(1000)).await;

    for p in proxies.values() {
        p.heal();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = stop.send(true);
    for c in clients {
        c.await?;
    }
    let keys: Vec<String> = ["majority", "minority", "lin/0", "lin/1", "lin/2"]
        .iter()
        .map(|k| k.to_string())
        .collect();
    converged(&addrs, CLUSTER, &keys).await?;
    let mut c = client(&addrs[li])?;
    let got = read(&mut c, CLUSTER, &keys).await?;
    assert_eq!(got.get("majority").map(Vec::as_slice), Some(&b"yes"[..]));
    assert!(
        !got.contains_key("minority"),
        "the minority's write took effect"
    );
    check(&history)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_across_leader_kills_is_linearizable() -> anyhow::Result<()> {
    const CLUSTER: u64 = 82;
    let tmp = tempfile::tempdir()?;
    let mut members = Vec::new();
    for id in 1..=3u64 {
        members.push(Member::new(id, tmp.path())?);
    }
    let addrs: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
    for m in members.iter_mut() {
        m.peers = (1..=3u64)
            .filter(|p| *p != m.id)
            .map(|p| format!("{p}={}", addrs[usize::try_from(p - 1).unwrap_or(0)]))
            .collect::<Vec<_>>()
            .join(",");
        // Compact often, so a restarted member may catch up by snapshot.
        m.env = vec![("NEPHELE_SNAPSHOT_INTERVAL".into(), "200".into())];
        m.spawn(CLUSTER, true)?;
    }
    let mut leader = wait_leader(&addrs, CLUSTER, 0).await?;

    let history = History::new();
    let alive = std::sync::Arc::new(std::sync::Mutex::new(vec![true; 3]));
    let (stop, stop_rx) = watch::channel(false);
    let clients = procs::spawn_clients(
        4,
        3,
        addrs.clone(),
        alive.clone(),
        CLUSTER,
        history.clone(),
        stop_rx,
    );
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let li = usize::try_from(leader - 1)?;
        if let Ok(mut a) = alive.lock() {
            a[li] = false;
        }
        members[li].kill9();
        let killed = Instant::now();
        let survivors: Vec<String> = addrs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != li)
            .map(|(_, a)| a.clone())
            .collect();
        let next = wait_leader(&survivors, CLUSTER, leader).await?;
        eprintln!(
            "round {round}: killed leader {leader}, member {next} leads after {:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
        members[li].spawn(CLUSTER, false)?;
        if let Ok(mut a) = alive.lock() {
            a[li] = true;
        }
        leader = next;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let _ = stop.send(true);
    for c in clients {
        c.await?;
    }
    let keys: Vec<String> = (0..3).map(|k| format!("lin/{k}")).collect();
    converged(&addrs, CLUSTER, &keys).await?;
    // The final reads on every member are part of the history: the last
    // acknowledged write of each key must be what everyone reads.
    for a in &addrs {
        let mut c = client(a)?;
        for k in &keys {
            history.get(&mut c, CLUSTER, k).await;
        }
    }
    check(&history)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_writes_and_recovers() -> anyhow::Result<()> {
    const CLUSTER: u64 = 83;
    let tmp = tempfile::tempdir()?;
    let disk = match SmallDisk::mount(&tmp.path().join("small"), "6m") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: cannot mount a tmpfs here ({e:#})");
            return Ok(());
        }
    };
    let mut members = Vec::new();
    for id in 1..=3u64 {
        members.push(Member::new(id, tmp.path())?);
    }
    // Member 3 keeps its data on the small disk.
    members[2].dir = disk.path.join("m3");
    let addrs: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
    for m in members.iter_mut() {
        m.peers = (1..=3u64)
            .filter(|p| *p != m.id)
            .map(|p| format!("{p}={}", addrs[usize::try_from(p - 1).unwrap_or(0)]))
            .collect::<Vec<_>>()
            .join(",");
        m.spawn(CLUSTER, true)?;
    }
    wait_leader(&addrs, CLUSTER, 0).await?;

    // Large values until member 3 runs out of space: the cluster (two of
    // three) keeps acknowledging them.
    let value = vec![0x42u8; 512 << 10];
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut c = client(&addrs[0])?;
    while members[2].running() {
        if Instant::now() > deadline {
            bail!("member 3 never filled its 6 MiB disk");
        }
        let key = format!("big/{}", acked.len());
        match put(&mut c, CLUSTER, &key, &value).await {
            PutOutcome::Acked => acked.push(key),
            other => eprintln!("write {key}: {other:?}"),
        }
    }
    let st = members[2]
        .wait_exit(Duration::from_secs(5))
        .context("member 3 did not exit")?;
    assert!(!st.success(), "member 3 exited successfully on a full disk");
    let log = members[2].log_text();
    assert!(
        log.contains("cannot persist raft state") && log.contains("No space left on device"),
        "no clear full-disk error in member 3's log:\n{log}"
    );
    eprintln!("member 3 stopped after {} large writes", acked.len());

    // The two others go on.
    let survivors = addrs[..2].to_vec();
    wait_leader(&survivors, CLUSTER, 3).await?;
    for i in 0..5 {
        let key = format!("after/{i}");
        assert_eq!(
            put(&mut c, CLUSTER, &key, b"x").await,
            PutOutcome::Acked,
            "the majority refused a write after member 3 stopped"
        );
        acked.push(key);
    }

    // Space returns: member 3 restarts, recovers its last good state and
    // catches up.
    disk.resize("256m")?;
    members[2].spawn(CLUSTER, false)?;
    let small: Vec<String> = (0..5).map(|i| format!("after/{i}")).collect();
    converged(&addrs, CLUSTER, &small).await?;
    // One key per read: the large values together exceed a response's size
    // limit.
    let mut m3 = client(&addrs[2])?;
    for k in &acked {
        let got = read(&mut m3, CLUSTER, std::slice::from_ref(k)).await?;
        assert!(
            got.contains_key(k),
            "member 3 misses acknowledged write {k}"
        );
    }
    drop(members);
    drop(disk);
    Ok(())
}
