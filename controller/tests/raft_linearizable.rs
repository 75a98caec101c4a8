//! Concurrent clients put and get a few keys through every member while the
//! leader is repeatedly isolated and healed; the recorded history must be
//! linearizable (checked with `store::linearizability`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Cluster;
use neph_controller::store::linearizability::{self, Input, Op, Output};
use neph_controller::store::{ProposeError, StateStore, conformance};
use nephele_state::{Command, Envelope};

const CLIENTS: u64 = 6;
const KEYS: u64 = 3;
const RUN: Duration = Duration::from_secs(4);

/// xorshift64*: deterministic per client, no dependency.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed >> 12;
    *seed ^= *seed << 25;
    *seed ^= *seed >> 27;
    seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_under_leader_isolation_is_linearizable() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, 88, 50).await?;
    let stores = cluster.stores();
    conformance::wait_for_leader(&stores).await;
    let start = Instant::now();
    let now = move || u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let history = Arc::new(Mutex::new(Vec::<Op>::new()));

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let stores = stores.clone();
        let history = history.clone();
        clients.push(tokio::spawn(async move {
            let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (c + 1);
            let mut i = 0;
            while start.elapsed() < RUN {
                let r = next(&mut seed);
                let store = &stores[usize::try_from(r % 3).unwrap_or(0)];
                let key = format!("lin/{}", (r >> 8) % KEYS);
                let call = now();
                let op = if (r >> 16).is_multiple_of(2) {
                    i += 1;
                    let value = format!("c{c}-{i}");
                    let env = Envelope::new(
                        0,
                        "lin",
                        Command::KvPut {
                            key: key.clone(),
                            value: value.clone().into_bytes(),
                        },
                    );
                    match store.propose(env).await {
                        Ok(_) => Some(Op {
                            key,
                            call,
                            ret: Some(now()),
                            input: Input::Put(value),
                            output: Some(Output::Done),
                        }),
                        // Certainly not applied: leave it out.
                        Err(ProposeError::NoLeader | ProposeError::Dropped) => None,
                        // May or may not have been applied.
                        Err(_) => Some(Op {
                            key,
                            call,
                            ret: None,
                            input: Input::Put(value),
                            output: None,
                        }),
                    }
                } else {
                    let k = key.clone();
                    let got = store
                        .read(move |s| {
                            s.kv.get(&k)
                                .map(|e| String::from_utf8_lossy(&e.value).into_owned())
                        })
                        .await;
                    got.ok().map(|v| Op {
                        key,
                        call,
                        ret: Some(now()),
                        input: Input::Get,
                        output: Some(Output::Value(v)),
                    })
                };
                if let Some(op) = op
                    && let Ok(mut h) = history.lock()
                {
                    h.push(op);
                }
            }
        }));
    }

    // Faults: isolate whoever leads, then heal, repeatedly.
    let mut partitions = 0;
    while start.elapsed() < RUN {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Some(leader) = stores[0].leadership().leader_id else {
            continue;
        };
        for s in &stores {
            if s.member_id() == leader {
                s.partition_from(&[1, 2, 3]);
            } else {
                s.partition_from(&[leader]);
            }
        }
        partitions += 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
        for s in &stores {
            s.heal();
        }
    }
    for c in clients {
        c.await?;
    }
    let history = history.lock().map(|h| h.clone()).unwrap_or_default();
    let done = history.iter().filter(|o| o.ret.is_some()).count();
    eprintln!(
        "{} ops recorded ({done} completed), {partitions} leader isolations",
        history.len()
    );
    assert!(partitions >= 2, "the fault schedule did not run");
    assert!(done > 100, "too few operations completed to mean anything");
    let violations = linearizability::check(&history);
    assert!(violations.is_empty(), "not linearizable: {violations:#?}");
    cluster.stop().await;
    Ok(())
}
