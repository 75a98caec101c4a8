//! Live migration as the agent drives it (see `node.proto`'s
//! `MigrationAssignment`):
//!
//! - the target ([`receive`]) starts `neph-vmm --incoming` on this node's
//!   address and a free port, waits until it listens and reports the
//!   address with `ReportMigration` (the migration goes RUNNING); the
//!   reconciler supervises it like any VM and reports the migration failed
//!   if it ends before its VM arrived; once its control socket answers the
//!   VM runs here and it is an ordinary instance;
//! - the source ([`send`]) sends `migrate` to the VM's control socket with
//!   the target's address, the downtime budget and a gate socket
//!   (`<instance dir>/gate.sock`): when the target holds the complete VM the
//!   VMM asks the gate, and the agent answers with `RequestSwitchover`, yes
//!   only once the controllers committed the switchover. Meanwhile it polls
//!   `migrate_status` and reports progress; a migration the store no longer
//!   lists (cancelled, or failed at the target) is cancelled in the VMM. A
//!   migration that ends without the switchover leaves the VM running here
//!   and is reported failed (or cancelled).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nephele_proto::node::v1 as pb;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::controller::Controllers;
use crate::host;
use crate::instance::{self, InstanceName, Layout, PrepareError, VmRecord, VmSpec};
use crate::supervisor::{
    Prepared, StartContext, Vm, cgroup_name, error_chain, failure_with_log, prepare, vm_spec,
};
use crate::vmm::{VmmClient, VmmMigration};

/// How long `neph-vmm --incoming` may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the source polls the VMM's progress.
const POLL: Duration = Duration::from_millis(200);
/// How often progress goes to the controllers.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Attempts at a report before giving up on it.
const REPORT_TRIES: u32 = 10;
/// What the VMM logs once it listens.
const LISTENING: &str = "waiting for a migration on";

/// Sends one migration report.
pub(crate) async fn report(
    ctl: &Controllers,
    req: pb::ReportMigrationRequest,
) -> Result<(), tonic::Status> {
    ctl.call(|mut c| {
        let req = req.clone();
        async move { c.report_migration(req).await }
    })
    .await
    .map(drop)
}

/// Sends a report until it is taken or refused for good.
async fn report_retrying(ctl: &Controllers, req: pb::ReportMigrationRequest) {
    for _ in 0..REPORT_TRIES {
        match report(ctl, req.clone()).await {
            Ok(()) => return,
            Err(s) if s.code() == tonic::Code::FailedPrecondition => return,
            Err(s) => {
                tracing::warn!(migration = %req.migration, error = %s.message(), "migration report failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The address this node's VMMs listen on for migrations.
fn node_ip(ctx: &StartContext) -> Result<IpAddr, String> {
    if let Some(a) = &ctx.cfg.advertise
        && let Ok(sa) = a.parse::<SocketAddr>()
    {
        return Ok(sa.ip());
    }
    let ip = ctx.cfg.listen.ip();
    if ip.is_unspecified() {
        return Err(
            "the agent listens on every address: give --advertise with an address peers reach"
                .into(),
        );
    }
    Ok(ip)
}

/// Starts `neph-vmm --incoming` for the migration `m` coming here and
/// reports where it listens. Errors are failure reasons.
pub(crate) async fn receive(
    ctx: &StartContext,
    name: &InstanceName,
    a: &pb::Assignment,
    m: &pb::MigrationAssignment,
) -> Result<(Vm, tokio::process::Child), String> {
    let cfg = &ctx.cfg;
    let Prepared {
        instance,
        res,
        layout,
        files,
    } = prepare(ctx, name, a).await?;
    // The source has a disk exactly when the instance has one; the target
    // copies it into a sparse file of the flavor's size (the VMM sizes it
    // to the source's, and refuses an empty one for its pre-built VM).
    let disk = if res.disk_gib > 0 || files.disk.is_some() {
        let p = layout.disk();
        let size = res.disk_gib.max(1).saturating_mul(1 << 30);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(size))
            .map_err(|e| PrepareError::Io(p.clone(), e).to_string())?;
        Some(p)
    } else {
        None
    };
    let spec = vm_spec(cfg, name, &instance, files, disk).await?;
    let ip = node_ip(ctx)?;
    let port = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free port on {ip}: {e}"))?
        .port();
    let addr = SocketAddr::new(ip, port).to_string();
    let log_start = std::fs::metadata(layout.vmm_log()).map_or(0, |m| m.len());
    let (mut child, pid, start_ticks) = spawn_incoming(ctx, &layout, &spec, &addr)?;
    let record = VmRecord {
        version: instance::RECORD_VERSION,
        name: name.to_string(),
        pid,
        start_ticks,
        boot_count: instance.boot_count,
        spec,
    };
    let fail = |why: String| failure_with_log(&layout, why).failure.unwrap_or_default();
    if let Err(e) = record.save(&layout.state()) {
        host::kill(pid);
        let _ = child.wait().await;
        return Err(error_chain(&e));
    }
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let _ = std::fs::remove_file(layout.state());
            return Err(fail(format!("the incoming VMM exited at start ({status})")));
        }
        let log = std::fs::read(layout.vmm_log()).unwrap_or_default();
        let fresh = log
            .get(usize::try_from(log_start).unwrap_or(0)..)
            .unwrap_or(&[]);
        if String::from_utf8_lossy(fresh).contains(LISTENING) {
            break;
        }
        if Instant::now() > deadline {
            host::kill(pid);
            let _ = child.wait().await;
            let _ = std::fs::remove_file(layout.state());
            return Err(fail(format!(
                "the incoming VMM did not listen within {LISTEN_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let req = pb::ReportMigrationRequest {
        node: cfg.node_name(),
        migration: m.migration.clone(),
        target_address: addr.clone(),
        ..Default::default()
    };
    let mut last = String::new();
    let mut taken = false;
    for _ in 0..REPORT_TRIES {
        match report(&ctx.ctl, req.clone()).await {
            Ok(()) => {
                taken = true;
                break;
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                last = s.message().to_owned();
                break;
            }
            Err(s) => {
                last = s.message().to_owned();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    if !taken {
        host::kill(pid);
        let _ = child.wait().await;
        let _ = std::fs::remove_file(layout.state());
        return Err(format!(
            "the controllers did not take the target address: {last}"
        ));
    }
    tracing::info!(instance = %name, migration = %m.migration, %addr, pid, "waiting for the incoming migration");
    Ok((
        Vm {
            record,
            layout,
            fenced: false,
            child: true,
            incoming: true,
        },
        child,
    ))
}

fn spawn_incoming(
    ctx: &StartContext,
    layout: &Layout,
    spec: &VmSpec,
    addr: &str,
) -> Result<(tokio::process::Child, u32, u64), String> {
    let open_log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(layout.vmm_log())
            .map_err(|e| format!("cannot open {}: {e}", layout.vmm_log().display()))
    };
    let (log, log2) = (open_log()?, open_log()?);
    let mut cmd = tokio::process::Command::new(&ctx.cfg.vmm);
    cmd.arg("--incoming")
        .arg(addr)
        .args(["--cpus", &spec.vcpus.to_string()])
        .args(["--memory", &spec.memory_mib.to_string()]);
    if let Some(d) = &spec.disk {
        cmd.arg("--disk").arg(d);
    }
    if let Some(t) = &spec.tap {
        cmd.args(["--net", &format!("tap={t},mac={}", spec.mac)]);
    }
    cmd.arg("--api-socket")
        .arg(layout.api_socket())
        .arg("--console-socket")
        .arg(layout.console_socket())
        .arg("--console-log")
        .arg(layout.console_log());
    if let Some(u) = ctx.cfg.vmm_user.as_deref() {
        cmd.args(["--user", u]);
    }
    if host::is_root() {
        cmd.arg("--cgroup")
            .arg(cgroup_name(&ctx.cfg.node_id, layout));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0)
        .kill_on_drop(false);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", ctx.cfg.vmm.display()))?;
    let pid = child
        .id()
        .ok_or("the incoming VMM ended before it could be watched")?;
    let start_ticks = host::proc_stat(pid).map_or(0, |s| s.start_ticks);
    Ok((child, pid, start_ticks))
}

fn progress(s: &VmmMigration) -> pb::MigrationProgress {
    pb::MigrationProgress {
        round: s.round,
        bytes_sent: s.bytes_sent,
        bytes_remaining: s.bytes_remaining,
        dirty_rate_bps: s.dirty_rate_bps,
        throughput_bps: s.throughput_bps,
        expected_downtime_ms: s.expected_downtime_ms,
        throttle_percent: s.throttle_percent,
        downtime_us: s.downtime_us.unwrap_or(0),
    }
}

/// Asks the controllers to commit the switchover; true only once they did.
/// An error that leaves the outcome unknown (no leader, a timeout) is
/// asked again: the controllers answer yes to a switchover already
/// committed for this source.
async fn ask_switchover(
    ctl: &Controllers,
    node: &str,
    migration: &str,
    p: pb::MigrationProgress,
) -> (bool, String) {
    let req = pb::RequestSwitchoverRequest {
        node: node.to_owned(),
        migration: migration.to_owned(),
        progress: Some(p),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = ctl
            .call(|mut c| {
                let req = req.clone();
                async move { c.request_switchover(req).await }
            })
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                return (r.allowed, r.reason);
            }
            Err(s) if Instant::now() < deadline => {
                tracing::warn!(%migration, error = %s.message(), "switchover request failed; asking again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return (false, s.message().to_owned()),
        }
    }
}

/// Serves one gate question: asks the controllers, answers the VMM.
async fn answer_gate(
    stream: tokio::net::UnixStream,
    ctl: &Controllers,
    node: &str,
    migration: &str,
    p: pb::MigrationProgress,
) -> bool {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        (&mut r).take(4096).read_line(&mut line),
    )
    .await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return false;
    }
    let (allowed, reason) = ask_switchover(ctl, node, migration, p).await;
    tracing::info!(%migration, allowed, %reason, "switchover gate answered");
    let mut answer = serde_json::json!({ "allowed": allowed, "reason": reason }).to_string();
    answer.push('\n');
    let mut s = r.into_inner();
    if let Err(e) = s.write_all(answer.as_bytes()).await {
        // The VMM did not hear the yes: it treats that as a no... unless
        // it did read it. Either way the store has the truth.
        tracing::warn!(%migration, error = %e, "cannot answer the switchover gate");
    }
    allowed
}

/// Sends `vm` to the migration's target. True when the VM is gone from
/// here (the switchover was committed); false when it runs on here.
pub(crate) async fn send(
    ctx: &StartContext,
    vm: &Vm,
    m: &pb::MigrationAssignment,
    mut cancel: watch::Receiver<bool>,
) -> bool {
    let node = ctx.cfg.node_name();
    let migration = m.migration.clone();
    let client = VmmClient::new(&vm.layout.api_socket());
    let end = |failed: bool, cancelled: bool, reason: String, p: Option<pb::MigrationProgress>| {
        let ctl = ctx.ctl.clone();
        let req = pb::ReportMigrationRequest {
            node: node.clone(),
            migration: migration.clone(),
            progress: p,
            failed,
            cancelled,
            reason,
            ..Default::default()
        };
        async move { report_retrying(&ctl, req).await }
    };
    let gate_path = vm.layout.dir.join("gate.sock");
    let _ = std::fs::remove_file(&gate_path);
    let gate = match UnixListener::bind(&gate_path) {
        Ok(l) => l,
        Err(e) => {
            end(
                true,
                false,
                format!("cannot serve the switchover gate: {e}"),
                None,
            )
            .await;
            return false;
        }
    };
    allow_vmm_user(&gate_path, ctx);
    tracing::info!(%migration, to = %m.peer_address, "migrating");
    if let Err(e) = client
        .migrate(&m.peer_address, m.max_downtime_ms, &gate_path)
        .await
    {
        let _ = std::fs::remove_file(&gate_path);
        end(true, false, error_chain(&e), None).await;
        return false;
    }
    let committed = Arc::new(AtomicBool::new(false));
    let gone_in_store = Arc::new(AtomicBool::new(false));
    let mut last = VmmMigration::default();
    let mut tick = tokio::time::interval(POLL);
    let mut last_report = Instant::now();
    let mut cancel_sent = false;
    let outcome = loop {
        tokio::select! {
            conn = gate.accept() => {
                if let Ok((s, _)) = conn {
                    let p = progress(&last);
                    if answer_gate(s, &ctx.ctl, &node, &migration, p).await {
                        committed.store(true, Ordering::SeqCst);
                    }
                }
            }
            changed = cancel.changed(), if !cancel_sent => {
                if changed.is_err() || *cancel.borrow() {
                    cancel_sent = true;
                    gone_in_store.store(true, Ordering::SeqCst);
                    if let Err(e) = client.migrate_cancel().await {
                        tracing::warn!(%migration, error = %error_chain(&e), "cannot cancel the migration in the VMM");
                    }
                }
            }
            _ = tick.tick() => {
                match client.migrate_status().await {
                    Ok(st) => {
                        if st.is_final() {
                            break Some(st);
                        }
                        last = st;
                        if last_report.elapsed() >= REPORT_EVERY {
                            last_report = Instant::now();
                            let req = pb::ReportMigrationRequest {
                                node: node.clone(),
                                migration: migration.clone(),
                                progress: Some(progress(&last)),
                                ..Default::default()
                            };
                            let (ctl, gone) = (ctx.ctl.clone(), gone_in_store.clone());
                            let client = client.clone();
                            tokio::spawn(async move {
                                if let Err(s) = report(&ctl, req).await
                                    && s.code() == tonic::Code::FailedPrecondition
                                    && !gone.swap(true, Ordering::SeqCst)
                                {
                                    // Ended in the store (cancelled, or
                                    // failed at the target): stop sending.
                                    let _ = client.migrate_cancel().await;
                                }
                            });
                        }
                    }
                    Err(e) => {
                        if !host::alive(vm.record.pid, vm.record.start_ticks) {
                            tracing::info!(%migration, error = %error_chain(&e), "the source VMM ended");
                            break None;
                        }
                    }
                }
            }
        }
    };
    let _ = std::fs::remove_file(&gate_path);
    let committed = committed.load(Ordering::SeqCst);
    match outcome {
        Some(st) if st.state == "completed" => {
            tracing::info!(%migration, downtime_us = st.downtime_us.unwrap_or(0), bytes = st.bytes_sent, "migrated");
            // The downtime is known only now: the migration resource gets
            // the VMM's last figures (best effort, off the VM's path).
            tokio::spawn(end(false, false, String::new(), Some(progress(&st))));
            true
        }
        // The switchover is decided: the VM stops here whatever the VMM
        // saw after the yes.
        _ if committed => {
            tracing::warn!(%migration, status = ?outcome, "the switchover was committed; the VM is the target's");
            true
        }
        Some(st) => {
            let cancelled = st.state == "cancelled";
            let why = st.error.clone().unwrap_or_else(|| st.state.clone());
            tracing::info!(%migration, %why, "the migration ended without a switchover; the VM runs here");
            end(!cancelled, cancelled, why, Some(progress(&st))).await;
            false
        }
        None => {
            end(
                true,
                false,
                failure_with_log(
                    &vm.layout,
                    "the source VMM ended during the migration".into(),
                )
                .failure
                .unwrap_or_default(),
                Some(progress(&last)),
            )
            .await;
            false
        }
    }
}

/// The VMM may run as another user (`--vmm-user`): let it reach the gate.
fn allow_vmm_user(path: &Path, ctx: &StartContext) {
    if ctx.cfg.vmm_user.is_some() {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
    }
}
