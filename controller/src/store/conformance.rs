//! The conformance suite every [`StateStore`] backend must pass, run by each
//! backend's tests with handles to all members of one freshly started
//! cluster (one handle for a single-member store).
//!
//! These are test helpers: they panic (assert) on a violation. Each check
//! uses its own keys, so they can run one after another on one cluster.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use nephele_state::{ApplyError, Command, Envelope, Response};

use super::{Committed, StateStore};

fn env(command: Command) -> Envelope {
    Envelope::new(1_700_000_000_000, "conformance", command)
}

fn put(key: &str, value: &[u8]) -> Envelope {
    env(Command::KvPut {
        key: key.to_owned(),
        value: value.to_vec(),
    })
}

async fn must_propose<S: StateStore>(s: &S, e: Envelope) -> Committed {
    match s.propose(e).await {
        Ok(c) => c,
        Err(err) => panic!("proposal failed: {err}"),
    }
}

async fn get<S: StateStore>(s: &S, key: &str) -> Option<(Vec<u8>, u64)> {
    let key = key.to_owned();
    s.read(move |st| st.kv.get(&key).map(|e| (e.value.clone(), e.version)))
        .await
        .unwrap_or_else(|e| panic!("read failed: {e}"))
}

/// Waits until some member leads and all members agree on it.
pub async fn wait_for_leader<S: StateStore>(members: &[S]) -> u64 {
    for _ in 0..200 {
        let ls: Vec<_> = members.iter().map(|m| m.leadership()).collect();
        if let Some(l) = ls[0].leader_id
            && ls.iter().all(|x| x.leader_id == Some(l))
        {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no agreed leader after 10 s");
}

/// Runs every check of the suite.
pub async fn run_all<S: StateStore>(members: &[S]) {
    assert!(!members.is_empty(), "the suite needs at least one member");
    wait_for_leader(members).await;
    write_then_read_everywhere(members).await;
    refusals_are_outcomes(members).await;
    compare_and_set_has_one_winner(members).await;
    request_ids_make_writes_idempotent(members).await;
    watch_sees_writes_in_order(members).await;
    concurrent_writes_are_all_applied(members).await;
    fencing_refuses_stale_terms(members).await;
}

/// A write acknowledged by any member is visible to a linearizable read on
/// every member, and indexes grow.
pub async fn write_then_read_everywhere<S: StateStore>(members: &[S]) {
    let mut last_index = 0;
    for (i, writer) in members.iter().enumerate() {
        let key = format!("conf/rw/{i}");
        let c = must_propose(writer, put(&key, b"v1")).await;
        assert!(c.index > last_index, "log index did not grow");
        last_index = c.index;
        let Ok(Response::Kv { version, .. }) = c.outcome else {
            panic!("unexpected outcome {:?}", c.outcome);
        };
        for reader in members {
            assert_eq!(
                get(reader, &key).await,
                Some((b"v1".to_vec(), version)),
                "a member missed an acknowledged write"
            );
        }
    }
}

/// A command the state machine refuses is committed, and the refusal comes
/// back as the outcome.
pub async fn refusals_are_outcomes<S: StateStore>(members: &[S]) {
    let c = must_propose(
        &members[0],
        env(Command::DeleteProject {
            project: "projects/missing".into(),
        }),
    )
    .await;
    assert_eq!(
        c.outcome,
        Err(ApplyError::NotFound {
            name: "projects/missing".into()
        })
    );
    let c = must_propose(
        &members[members.len() - 1],
        env(Command::CreateProject {
            project_id: "Not_Valid".into(),
            display_name: String::new(),
            quota: None,
        }),
    )
    .await;
    assert!(matches!(c.outcome, Err(ApplyError::InvalidName(_))));
}

/// Of many concurrent compare-and-sets from version 0, exactly one wins, and
/// the stored value is the winner's.
pub async fn compare_and_set_has_one_winner<S: StateStore>(members: &[S]) {
    let key = "conf/cas";
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let m = &members[usize::from(i) % members.len()];
        tasks.push(async move {
            let c = must_propose(
                m,
                env(Command::KvCas {
                    key: key.into(),
                    expected_version: 0,
                    value: Some(vec![i]),
                }),
            )
            .await;
            (i, c.outcome)
        });
    }
    let results = futures::future::join_all(tasks).await;
    let winners: Vec<_> = results.iter().filter(|(_, o)| o.is_ok()).collect();
    assert_eq!(winners.len(), 1, "CAS winners: {results:?}");
    for (_, o) in &results {
        if let Err(e) = o {
            assert!(matches!(e, ApplyError::VersionMismatch { .. }), "{e}");
        }
    }
    let (value, _) = get(&members[0], key).await.expect("the CAS winner's key");
    assert_eq!(value, vec![winners[0].0]);
}

/// Repeating a command with the same request id returns the first answer
/// without a second effect; reusing the id for another command is refused.
pub async fn request_ids_make_writes_idempotent<S: StateStore>(members: &[S]) {
    let mut e = env(Command::CreateProject {
        project_id: "conf-idem".into(),
        display_name: "first".into(),
        quota: None,
    });
    e.request_id = Some("conf-req-1".into());
    let first = must_propose(&members[0], e.clone()).await;
    assert!(first.outcome.is_ok(), "{:?}", first.outcome);
    let again = must_propose(&members[members.len() - 1], e.clone()).await;
    assert_eq!(again.outcome, first.outcome);
    e.command = Command::DeleteProject {
        project: "projects/conf-idem".into(),
    };
    let reused = must_propose(&members[0], e).await;
    assert!(matches!(
        reused.outcome,
        Err(ApplyError::RequestIdReused { .. })
    ));
    let n = members[0]
        .read(|s| s.projects.contains_key("projects/conf-idem"))
        .await
        .unwrap_or_else(|e| panic!("read failed: {e}"));
    assert!(n, "the project must exist exactly once");
}

/// Watchers on every member see the writes in commit order.
pub async fn watch_sees_writes_in_order<S: StateStore>(members: &[S]) {
    let mut watchers: Vec<_> = members.iter().map(|m| m.watch()).collect();
    let mut indexes = Vec::new();
    for i in 0..5 {
        let c = must_propose(
            &members[i % members.len()],
            put(&format!("conf/watch/{i}"), b"w"),
        )
        .await;
        indexes.push(c.index);
    }
    for w in &mut watchers {
        let mut seen = Vec::new();
        while seen.len() < indexes.len() {
            let ev = tokio::time::timeout(Duration::from_secs(10), w.recv())
                .await
                .expect("watch event in time")
                .expect("watch stream open");
            if let Command::KvPut { key, .. } = &ev.envelope.command
                && key.starts_with("conf/watch/")
            {
                seen.push(ev.index);
            }
        }
        assert_eq!(seen, indexes, "watch order differs from commit order");
    }
}

/// Many concurrent writers through every member: each acknowledged write is
/// applied exactly once at a unique index and visible afterwards.
pub async fn concurrent_writes_are_all_applied<S: StateStore>(members: &[S]) {
    const WRITERS: usize = 32;
    const PER_WRITER: usize = 8;
    let members = Arc::new(members);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let m = &members[w % members.len()];
        tasks.push(async move {
            let mut out = Vec::new();
            for i in 0..PER_WRITER {
                let c = must_propose(m, put(&format!("conf/many/{w}/{i}"), &[0u8; 256])).await;
                assert!(c.outcome.is_ok());
                out.push(c.index);
            }
            out
        });
    }
    let all: Vec<u64> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let unique: BTreeSet<_> = all.iter().collect();
    assert_eq!(
        unique.len(),
        WRITERS * PER_WRITER,
        "two writes share an index"
    );
    for m in members.iter() {
        let n = m
            .read(|s| s.kv.keys().filter(|k| k.starts_with("conf/many/")).count())
            .await
            .unwrap_or_else(|e| panic!("read failed: {e}"));
        assert_eq!(n, WRITERS * PER_WRITER);
    }
}

/// A command fenced to the current term is applied; one fenced to an older
/// term is refused.
pub async fn fencing_refuses_stale_terms<S: StateStore>(members: &[S]) {
    let leader = wait_for_leader(members).await;
    let l = members
        .iter()
        .find(|m| m.leadership().member_id == leader)
        .unwrap_or(&members[0]);
    let term = l.leadership().term;
    assert!(term > 0);
    let mut e = put("conf/fenced", b"x");
    e.fence_term = Some(term);
    let c = must_propose(l, e.clone()).await;
    assert!(c.outcome.is_ok(), "{:?}", c.outcome);
    e.fence_term = Some(term - 1);
    let c = must_propose(l, e).await;
    assert_eq!(
        c.outcome,
        Err(ApplyError::Fenced {
            fence_term: term - 1,
            term
        })
    );
}
