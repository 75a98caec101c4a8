//! Live migration through the control plane, driven by the compute-node
//! agents: one `neph-controller`, two `neph-node` agents booting the
//! project's test guest, `neph migration create|cancel` and `neph instance
//! migrate --wait` as an operator uses them. The guest's ticker and uptime
//! show it is the same boot on the other node and the console answers
//! there (a console session opened before the move goes on after it); a `neph-vmm --incoming` killed with SIGKILL mid-copy, and a
//! migration cancelled mid-copy, leave the VM running where it was (the
//! same process); `neph node drain` moves it off its node to where the
//! scheduler puts it; the source's agent killed with SIGKILL mid-copy and
//! restarted attaches to the migration, which completes, one VM; and a
//! target that stalls at the commit leaves the source in doubt until the
//! target's agent settles it (the VM never ran there: it resumes on its
//! source, the same process). Skips with its reason where /dev/kvm is
//! missing.

use std::time::{Duration, Instant};

use nephele_integration_tests::cloud::{Cloud, items, kill9};
use nephele_integration_tests::guest::skip_without_kvm;

const UP: Duration = Duration::from_secs(60);

/// Types `line` into the instance's console and returns the first console
/// line starting with `tag`.
fn console(cloud: &Cloud, instance: &str, line: &str, tag: &str) -> String {
    let (text, err) = cloud.console(instance, line);
    text.lines()
        .map(|l| l.trim_start_matches("neph> ").trim())
        .find(|l| l.starts_with(tag))
        .unwrap_or_else(|| {
            panic!("the console did not answer {tag}: stdout {text:?} stderr {err:?}")
        })
        .to_string()
}

/// `key=<n>` in a console line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Resident memory of `pid`, bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// Waits (polling every 2 ms) for a VMM of node `i` to have taken in more
/// than 8 MiB of guest memory since it was first seen (the incoming stream
/// fills its guest memory, so its resident size grows; socket reads are
/// not in `/proc/<pid>/io`), stops it with SIGSTOP and returns its pid.
fn freeze_once_receiving(cloud: &Cloud, i: usize) -> u32 {
    let deadline = Instant::now() + UP;
    let mut first: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    while Instant::now() < deadline {
        for pid in cloud.vm_pids(i) {
            let now = rss(pid);
            let base = *first.entry(pid).or_insert(now);
            if now > base + (8 << 20) {
                signal(pid, "-STOP");
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!(
        "no VMM on node {i} received a migration stream within {UP:?}: VMMs {first:?}, migrations {:?}",
        migrations(cloud, "mig-1")
    );
}

fn node_index(cloud: &Cloud, id: &str) -> usize {
    cloud
        .nodes
        .iter()
        .position(|n| n.id == id)
        .expect("a known node")
}

/// The instance's migrations, newest last.
fn migrations(cloud: &Cloud, instance: &str) -> Vec<serde_json::Value> {
    let v = cloud
        .admin(&["migration", "list"])
        .expect("neph migration list");
    let full = format!("projects/{}/instances/{instance}", cloud.project);
    items(&v, "migrations")
        .iter()
        .filter(|m| m["instance"] == full.as_str())
        .cloned()
        .collect()
}

/// Waits until the instance's migration not named in `older` is in
/// `state`.
fn wait_migration(
    cloud: &Cloud,
    instance: &str,
    older: &[String],
    state: &str,
) -> serde_json::Value {
    cloud
        .wait_for(
            &format!("the new migration of {instance} {state}"),
            UP,
            |c| {
                let ms = migrations(c, instance);
                let new = ms
                    .iter()
                    .find(|m| !older.iter().any(|o| m["name"] == o.as_str()));
                Ok(match new {
                    Some(m) if m["state"] == state => Ok(m.clone()),
                    Some(m) => Err(format!("{m}")),
                    None => Err(format!("{} migrations", ms.len())),
                })
            },
        )
        .expect("the migration reaches its state")
}

#[test]
fn migrate_through_the_control_plane_and_survive_a_dead_target() {
    if skip_without_kvm() {
        return;
    }
    let cloud = Cloud::start(1, 2).expect("start the cloud");
    cloud
        .neph(&[
            "instance",
            "create",
            "mig-1",
            "--flavor",
            "small",
            "--image",
            "test-guest",
        ])
        .expect("create an instance");
    cloud.wait_state("mig-1", "RUNNING", UP).expect("it runs");
    let src = cloud.node_of("mig-1").expect("its node");
    let dst = cloud
        .nodes
        .iter()
        .map(|n| n.id.clone())
        .find(|n| *n != src)
        .expect("another node");
    let (si, di) = (node_index(&cloud, &src), node_index(&cloud, &dst));
    let src_pids = cloud.vm_pids(si);
    assert_eq!(src_pids.len(), 1, "one VM on the source");
    assert!(console(&cloud, "mig-1", "ticker start", "TICKER").contains("OK"));

    // 1. The target's VMM killed with SIGKILL during the copy: the VM goes
    // on on its source, the migration fails. The guest dirties memory as
    // fast as it can so that the copy lasts long enough to be hit.
    assert!(console(&cloud, "mig-1", "dirty 96 100000", "DIRTY").contains("OK"));
    cloud
        .admin(&[
            "migration",
            "create",
            &format!("projects/{}/instances/mig-1", cloud.project),
            "--to",
            &dst,
        ])
        .expect("start a migration");
    // The copy is fast here (a 128 MiB guest, about 1 GB/s on loopback),
    // so the target is frozen (SIGSTOP) as soon as it has read the first
    // megabytes of the stream: the source then stalls mid-copy, and the
    // kill below surely lands during the copy, not after a switchover.
    let victim = freeze_once_receiving(&cloud, di);
    let copying = cloud
        .wait_for("the source reporting the copy", UP, |c| {
            let ms = migrations(c, "mig-1");
            Ok(match ms.first() {
                Some(m)
                    if m["state"] == "RUNNING" && m["bytes_copied"].as_u64().unwrap_or(0) > 0 =>
                {
                    Ok(m.clone())
                }
                other => Err(format!("{other:?}")),
            })
        })
        .expect("the migration is copying");
    // The target's address is its node's migration tunnel (mutual TLS,
    // only the source node admitted). The target VMM is frozen, so a client
    // the tunnel admits hears nothing back (Silent), while a refused one
    // is cut off at once (Refused): the source node's own certificate
    // shows the difference is seen, then every rogue client is refused.
    let at: std::net::SocketAddr = copying["target_address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no target address in {copying}"));
    let at = at.to_string();
    let source_tls = cloud.nodes[si].data_dir.join("tls");
    assert_eq!(
        rogue_tls(&at, &source_tls),
        Probe::Silent,
        "the source node's own certificate is admitted (to the frozen VMM)"
    );
    let plain = rogue_plain(&at);
    assert!(
        matches!(plain, Probe::Refused(_)),
        "a plaintext client was not cut off: {plain:?}"
    );
    let wrong = rogue_tls(&at, &cloud.controllers.tls_dir(1));
    assert!(
        matches!(wrong, Probe::Refused(_)),
        "a controller's certificate was not refused: {wrong:?}"
    );
    // The source node's own name, certified by a CA of another cluster.
    let forged = foreign_node_tls(&src, &cloud.controllers.ca_file());
    let other_ca = rogue_tls(&at, forged.path());
    assert!(
        matches!(other_ca, Probe::Refused(_)),
        "another CA's certificate was not refused: {other_ca:?}"
    );
    eprintln!(
        "rogue clients refused: plaintext {plain:?}, a controller certificate {wrong:?}, another CA's {other_ca:?}"
    );
    eprintln!("killing the target VMM mid-copy: {copying}");
    kill9(victim);
    let failed = wait_migration(&cloud, "mig-1", &[], "FAILED");
    let older = vec![failed["name"].as_str().unwrap_or_default().to_string()];
    eprintln!("failed migration: {failed}");
    let i = cloud.wait_state("mig-1", "RUNNING", UP).expect("running");
    assert_eq!(
        i["node"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("nodes/"),
        src,
        "the VM stays on its source"
    );
    assert_eq!(cloud.vm_pids(si), src_pids, "the same VM process runs on");
    cloud
        .wait_for("the target holds no VM", UP, |c| {
            let p = c.vm_pids(di);
            Ok(if p.is_empty() {
                Ok(())
            } else {
                Err(format!("{p:?}"))
            })
        })
        .expect("the target cleans up");
    let t = console(&cloud, "mig-1", "ticker report", "TICKER");
    assert!(
        t.contains("running=1"),
        "same boot: the ticker runs on: {t}"
    );
    assert!(console(&cloud, "mig-1", "dirty stop", "DIRTY").contains("OK"));

    // 2. A migration that completes: the same boot runs on the other node.
    let before = console(&cloud, "mig-1", "uptime", "UPTIME");
    // A fresh ticker: its largest gap from here on is the downtime the
    // guest sees across this migration.
    assert!(console(&cloud, "mig-1", "ticker start", "TICKER").contains("started"));
    let ticks_before = field(
        &console(&cloud, "mig-1", "ticker report", "TICKER"),
        "ticks",
    );
    // A console session open across the move: it follows the instance.
    let mut session = cloud.console_session("mig-1").expect("open a console");
    std::thread::sleep(Duration::from_millis(500));
    session.type_line("echo before-move").expect("type");
    let mark = session
        .wait_for("ECHO before-move", 0, UP)
        .expect("the open console answers before the move");
    let started = Instant::now();
    let done = cloud
        .neph(&["instance", "migrate", "mig-1", "--to", &dst, "--wait"])
        .expect("neph instance migrate --wait");
    assert_eq!(done["state"], "COMPLETED", "{done}");
    let mut older = older;
    older.push(done["name"].as_str().unwrap_or_default().to_string());
    eprintln!(
        "migration completed in about {} ms: {done}",
        started.elapsed().as_millis()
    );
    let i = cloud.wait_state("mig-1", "RUNNING", UP).expect("running");
    assert_eq!(
        i["node"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("nodes/"),
        dst,
        "the instance is placed on the target"
    );
    cloud
        .wait_for("the source VM gone, one on the target", UP, |c| {
            let (s, d) = (c.vm_pids(si), c.vm_pids(di));
            Ok(if s.is_empty() && d.len() == 1 {
                Ok(())
            } else {
                Err(format!("source {s:?} target {d:?}"))
            })
        })
        .expect("exactly one copy");
    let after = console(&cloud, "mig-1", "uptime", "UPTIME");
    assert!(
        field(&after, "us") > field(&before, "us"),
        "uptime continues (same boot): {before} then {after}"
    );
    let t = console(&cloud, "mig-1", "ticker report", "TICKER");
    assert!(t.contains("running=1"), "the ticker runs on: {t}");
    assert!(
        field(&t, "ticks") > ticks_before,
        "the ticker's count continues: {ticks_before} then {t}"
    );
    eprintln!(
        "after migration: {after}; {t}; downtime seen by the guest (ticker gap) {} us",
        field(&t, "max_gap_us")
    );
    // The source's VMM measured its downtime after the switchover, and the
    // migration resource carries it.
    let name = done["name"].as_str().unwrap_or_default().to_string();
    let reported = cloud
        .wait_for("the migration's downtime reported", UP, |c| {
            let m = migrations(c, "mig-1")
                .into_iter()
                .find(|m| m["name"] == name.as_str());
            Ok(match m {
                Some(m) if m["downtime_us"].as_u64().unwrap_or(0) > 0 => Ok(m),
                other => Err(format!("{other:?}")),
            })
        })
        .expect("downtime reported");
    eprintln!(
        "source-side downtime {} us, {} bytes",
        reported["downtime_us"], reported["bytes_copied"]
    );
    // The console keeps working on the target (echo round trip), and the
    // session opened before the move still answers.
    assert!(console(&cloud, "mig-1", "echo still-here", "ECHO").contains("still-here"));
    let mut answered = None;
    for _ in 0..10 {
        assert!(
            session.open(),
            "the console session ended: {}",
            session.output()
        );
        session.type_line("echo after-move").expect("type");
        answered = session.wait_for("ECHO after-move", mark, Duration::from_secs(3));
        if answered.is_some() {
            break;
        }
    }
    assert!(
        answered.is_some(),
        "the console session opened before the move does not answer after it: {}",
        session.output()
    );
    drop(session);

    // 3. Cancelled mid-copy: the VM stays where it runs (now the first
    // target), the same process, the same boot.
    let here = cloud.vm_pids(di);
    assert!(console(&cloud, "mig-1", "dirty 96 100000", "DIRTY").contains("OK"));
    cloud
        .admin(&[
            "migration",
            "create",
            &format!("projects/{}/instances/mig-1", cloud.project),
            "--to",
            &src,
        ])
        .expect("start a migration back");
    let back = cloud
        .wait_for("the migration back copying", UP, |c| {
            let ms = migrations(c, "mig-1");
            let new = ms
                .into_iter()
                .find(|m| !older.iter().any(|o| m["name"] == o.as_str()));
            Ok(match new {
                Some(m) if m["state"] == "RUNNING" => Ok(m),
                other => Err(format!("{other:?}")),
            })
        })
        .expect("it copies");
    let id = back["name"].as_str().unwrap_or_default().to_string();
    let cancelled = cloud
        .admin(&["migration", "cancel", &id])
        .expect("neph migration cancel");
    assert_eq!(cancelled["state"], "CANCELLED", "{cancelled}");
    let i = cloud.wait_state("mig-1", "RUNNING", UP).expect("running");
    assert_eq!(
        i["node"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("nodes/"),
        dst,
        "a cancelled migration leaves the instance where it was"
    );
    cloud
        .wait_for("no VM left on the cancelled target", UP, |c| {
            let p = c.vm_pids(si);
            Ok(if p.is_empty() {
                Ok(())
            } else {
                Err(format!("{p:?}"))
            })
        })
        .expect("the cancelled target cleans up");
    assert_eq!(cloud.vm_pids(di), here, "the same VM process runs on");
    let t = console(&cloud, "mig-1", "ticker report", "TICKER");
    assert!(t.contains("running=1"), "same boot after the cancel: {t}");
    assert!(console(&cloud, "mig-1", "dirty stop", "DIRTY").contains("OK"));

    // 4. Draining the node moves the VM off it, to where the scheduler
    // puts it (the only other node), the same boot; undrain reopens it.
    let before = console(&cloud, "mig-1", "uptime", "UPTIME");
    let drained = cloud
        .admin(&["node", "drain", &dst])
        .expect("neph node drain");
    assert_eq!(drained["state"], "DRAINING", "{drained}");
    cloud
        .wait_for("the drained node empty, the VM on the other", UP, |c| {
            let (s, d) = (c.vm_pids(si), c.vm_pids(di));
            Ok(if s.len() == 1 && d.is_empty() {
                Ok(())
            } else {
                Err(format!("source {s:?} drained {d:?}"))
            })
        })
        .expect("drain moves the VM");
    let i = cloud.wait_state("mig-1", "RUNNING", UP).expect("running");
    assert_eq!(
        i["node"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("nodes/"),
        src,
        "drained onto the other node"
    );
    let drain_move = migrations(&cloud, "mig-1")
        .into_iter()
        .find(|m| {
            m["cause"]
                .as_str()
                .is_some_and(|c| c.starts_with("drain of"))
        })
        .expect("the drain's migration says why");
    assert_eq!(drain_move["state"], "COMPLETED", "{drain_move}");
    let after = console(&cloud, "mig-1", "uptime", "UPTIME");
    assert!(
        field(&after, "us") > field(&before, "us"),
        "same boot after the drain: {before} then {after}"
    );
    let undrained = cloud
        .admin(&["node", "undrain", &dst])
        .expect("neph node undrain");
    assert_eq!(undrained["state"], "UP", "{undrained}");

    // 5. The source's agent killed with SIGKILL mid-copy (the target
    // frozen so that the copy is surely under way), then restarted: the
    // new agent attaches to the migration its VMM still runs, answers its
    // gate, and the VM ends on the target, one copy, the same boot.
    let mut cloud = cloud;
    let older: Vec<String> = migrations(&cloud, "mig-1")
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect();
    let before = console(&cloud, "mig-1", "uptime", "UPTIME");
    assert!(console(&cloud, "mig-1", "dirty 96 100000", "DIRTY").contains("OK"));
    cloud
        .admin(&[
            "migration",
            "create",
            &format!("projects/{}/instances/mig-1", cloud.project),
            "--to",
            &dst,
        ])
        .expect("start a migration");
    let frozen = freeze_once_receiving(&cloud, di);
    cloud.kill_agent(si);
    eprintln!("killed the source's agent mid-copy; restarting it");
    cloud.start_agent(si).expect("restart the source's agent");
    signal(frozen, "-CONT");
    let moved = wait_migration(&cloud, "mig-1", &older, "COMPLETED");
    eprintln!("completed after the source agent's restart: {moved}");
    assert!(console(&cloud, "mig-1", "dirty stop", "DIRTY").contains("OK"));
    cloud
        .wait_for("one VM, on the target", UP, |c| {
            let (s, d) = (c.vm_pids(si), c.vm_pids(di));
            Ok(if s.is_empty() && d == vec![frozen] {
                Ok(())
            } else {
                Err(format!("source {s:?} target {d:?} (incoming was {frozen})"))
            })
        })
        .expect("exactly one copy");
    let after = console(&cloud, "mig-1", "uptime", "UPTIME");
    assert!(
        field(&after, "us") > field(&before, "us"),
        "same boot after the agent's restart: {before} then {after}"
    );

    // 6. In doubt: the target (node `si` now) stalls at the commit; the
    // source gets no acknowledgement, keeps the VM paused and says so; the
    // target's agent finds that its VMM never ran the VM, stops it and
    // says so; the source resumes the VM: the same process, the same boot.
    cloud.kill_agent(si);
    cloud
        .start_agent_with_env(si, &[("NEPH_VMM_TEST_STALL_AT_COMMIT", "1")])
        .expect("restart the target's agent in test mode");
    let older: Vec<String> = migrations(&cloud, "mig-1")
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect();
    let here = cloud.vm_pids(di);
    let before = console(&cloud, "mig-1", "uptime", "UPTIME");
    cloud
        .admin(&[
            "migration",
            "create",
            &format!("projects/{}/instances/mig-1", cloud.project),
            "--to",
            &src,
        ])
        .expect("start a migration");
    let settled = wait_migration(&cloud, "mig-1", &older, "FAILED");
    eprintln!("settled in doubt: {settled}");
    assert!(
        settled["reason"]
            .as_str()
            .is_some_and(|r| r.contains("settled")),
        "the target settled it: {settled}"
    );
    let events = cloud
        .admin(&["event", "list", "--page-size", "1000"])
        .expect("neph event list")
        .to_string();
    assert!(
        events.contains("migration.in_doubt"),
        "the doubt is an event"
    );
    let i = cloud.wait_state("mig-1", "RUNNING", UP).expect("running");
    assert_eq!(
        i["node"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("nodes/"),
        dst,
        "the VM stays on its source"
    );
    cloud
        .wait_for("no VM on the target that stalled", UP, |c| {
            let p = c.vm_pids(si);
            Ok(if p.is_empty() {
                Ok(())
            } else {
                Err(format!("{p:?}"))
            })
        })
        .expect("the stalled target is stopped");
    assert_eq!(cloud.vm_pids(di), here, "the same VM process runs on");
    let after = console(&cloud, "mig-1", "uptime", "UPTIME");
    assert!(
        field(&after, "us") > field(&before, "us"),
        "same boot after the doubt: {before} then {after}"
    );
}

/// The migration header a target VMM answers with `Ready`.
const MIGRATION_HEADER: &[u8] = b"NEPHMIG\0\x03\0\0\0";

/// What a client without a certificate reads from `addr` after sending a
/// migration header, until the connection ends.
/// What a client at the migration port got.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// The connection was refused or cut off (handshake failure, a TLS
    /// alert, a close) without a byte of the migration protocol.
    Refused(String),
    /// Bytes came back.
    Answered(Vec<u8>),
    /// Admitted, and nothing came back within [`PROBE_WAIT`].
    Silent,
}

/// How long a probe waits for an answer or a close.
const PROBE_WAIT: Duration = Duration::from_secs(5);

/// Sends a migration header on `stream` and says what came of it.
async fn probe<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut stream: S) -> Probe {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if let Err(e) = stream.write_all(MIGRATION_HEADER).await {
        return Probe::Refused(e.to_string());
    }
    let _ = stream.flush().await;
    let mut reply = Vec::new();
    match tokio::time::timeout(PROBE_WAIT, stream.read_to_end(&mut reply)).await {
        // A TLS alert record (content type 21) to a plaintext client is
        // the tunnel's refusal, not the migration protocol.
        _ if reply.first() == Some(&21) => Probe::Refused(format!("TLS alert {reply:?}")),
        _ if !reply.is_empty() => Probe::Answered(reply),
        Ok(Ok(_)) => Probe::Refused("closed".into()),
        Ok(Err(e)) => Probe::Refused(e.to_string()),
        Err(_) => Probe::Silent,
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A plaintext client at `addr`.
fn rogue_plain(addr: &str) -> Probe {
    block_on(async {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => probe(s).await,
            Err(e) => Probe::Refused(e.to_string()),
        }
    })
}

/// A client presenting the certificate in `tls_dir` at `addr`.
fn rogue_tls(addr: &str, tls_dir: &std::path::Path) -> Probe {
    use nephele_tls::{IdentityKind, PeerPolicy, Revocations, TlsContext, TlsFiles};
    nephele_tls::install_default();
    block_on(async {
        let ctx = TlsContext::load(&TlsFiles::in_dir(tls_dir), Revocations::new())
            .expect("the TLS files");
        let config = ctx
            .client_config(PeerPolicy::Kind(IdentityKind::Node))
            .expect("client config");
        match nephele_tls::net::connect(addr, config).await {
            Ok(s) => probe(s).await,
            Err(e) => Probe::Refused(e.to_string()),
        }
    })
}

/// A TLS directory with a `node/<node>` certificate from a CA of its own
/// (same cluster id, another key), trusting the real cluster's CA too, so
/// only the target's verdict on the certificate is tested.
fn foreign_node_tls(node: &str, cluster_ca: &std::path::Path) -> tempfile::TempDir {
    use nephele_tls::{Ca, Identity, IssueOptions, TlsFiles};
    let real = std::fs::read(cluster_ca).expect("the cluster CA");
    let cluster = nephele_tls::ca::cluster_of_ca_pem(&real).expect("the cluster id");
    let ca = Ca::create(&cluster).expect("another CA");
    let (cert, key) = ca
        .issue(
            &Identity::node(node).expect("node name"),
            &IssueOptions::default(),
        )
        .expect("issue");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = TlsFiles::in_dir(dir.path());
    std::fs::write(&files.cert, cert.chain_pem).expect("cert");
    nephele_tls::write_private(&files.key, key.as_bytes(), true).expect("key");
    let mut roots = ca.cert_pem().as_bytes().to_vec();
    roots.extend_from_slice(&real);
    std::fs::write(&files.ca, roots).expect("ca");
    dir
}

/// Sends a signal (`-CONT`, ...) to `pid`.
fn signal(pid: u32, sig: &str) {
    let sent = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(sent, "cannot send {sig} to {pid}");
}
