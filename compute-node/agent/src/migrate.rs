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
//!   (`<instance dir>/gate.sock`), or attaches to the migration the VMM is
//!   already running (an agent restarted mid-way). When pre-copy has
//!   nearly converged the VMM asks the gate, while the guest still runs,
//!   and the agent answers with `RequestSwitchover`: yes only once the
//!   controllers decided the switchover (SWITCHING). Meanwhile it polls
//!   `migrate_status` and reports progress; a migration the store no longer
//!   lists (cancelled, or failed at the target) is cancelled in the VMM
//!   (refused once decided). The end is reported: `completed` (the target
//!   acknowledged: the VM runs there), `failed`/`cancelled` (the VM runs
//!   here), or `in_doubt` (the commit went out, no acknowledgement came
//!   back: the VM waits paused until the store settles the migration, and
//!   the agent then tells the VMM with `migrate_resolve`);
//! - the target settles an in-doubt migration ([`settle`]): it freezes its
//!   `neph-vmm --incoming` (SIGSTOP), then looks for the arrival file the
//!   VMM writes just before the VM first runs: found, it lets the VMM go on
//!   and reports `completed`; not found, the VM never ran here, so it kills
//!   the VMM and reports `failed` (the source then resumes the VM).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
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
    // Over TLS (a node with a certificate, told its peer): the VMM listens
    // on loopback only, and the node's tunnel on the node's address admits
    // only the migration's source node.
    let peer = tunnel_peer(ctx, m);
    let vmm_ip = if peer.is_some() {
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
    } else {
        ip
    };
    let addr = SocketAddr::new(vmm_ip, free_port(vmm_ip)?).to_string();
    let log_start = std::fs::metadata(layout.vmm_log()).map_or(0, |m| m.len());
    // Left by an earlier attempt, it would say a VM arrived that did not.
    match std::fs::remove_file(layout.arrival()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(PrepareError::Io(layout.arrival(), e).to_string()),
    }
    let (mut child, pid, start_ticks) = spawn_incoming(ctx, &layout, &spec, &addr)?;
    let record = VmRecord {
        version: instance::RECORD_VERSION,
        name: name.to_string(),
        pid,
        start_ticks,
        boot_count: instance.boot_count,
        spec,
        incoming: true,
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
    let addr = match &peer {
        None => addr,
        Some(peer) => {
            let listen = SocketAddr::new(ip, free_port(ip)?).to_string();
            let tunnel = Tunnel {
                mode: crate::tunnel::Mode::Accept,
                listen: &listen,
                forward: &addr,
                peer,
                vmm_pid: pid,
                arrival: Some(layout.arrival()),
            };
            match tunnel.spawn(ctx, &layout).await {
                Ok(a) => a,
                Err(why) => {
                    host::kill(pid);
                    let _ = child.wait().await;
                    let _ = std::fs::remove_file(layout.state());
                    return Err(why);
                }
            }
        }
    };
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

/// A free TCP port on `ip` (bound and let go: the VMM or tunnel binds it
/// next, a race other processes on the node could only lose by chance).
fn free_port(ip: IpAddr) -> Result<u16, String> {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port on {ip}: {e}"))
}

/// The peer node's name when this migration goes over TLS: this node has
/// its certificate and the controllers named the other side (an older
/// controller does not; then the stream is plain TCP, as is a node on the
/// transition path, which has no certificate).
fn tunnel_peer(ctx: &StartContext, m: &pb::MigrationAssignment) -> Option<String> {
    let files = nephele_tls::TlsFiles::in_dir(&crate::join::tls_dir(&ctx.cfg.data_dir));
    let peer = m.peer_node.strip_prefix("nodes/").unwrap_or(&m.peer_node);
    (files.cert.exists() && !peer.is_empty()).then(|| peer.to_owned())
}

/// A `neph-node tunnel` process to start (see [`crate::tunnel`]).
struct Tunnel<'a> {
    mode: crate::tunnel::Mode,
    listen: &'a str,
    forward: &'a str,
    peer: &'a str,
    vmm_pid: u32,
    arrival: Option<std::path::PathBuf>,
}

impl Tunnel<'_> {
    /// Starts it detached (it outlives this agent, like a VMM), logging to
    /// `tunnel.log` in the instance directory; returns the address it
    /// listens on once it does.
    async fn spawn(&self, ctx: &StartContext, layout: &Layout) -> Result<String, String> {
        let log_path = layout.dir.join("tunnel.log");
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| format!("cannot open {}: {e}", log_path.display()))
        };
        let log_start = std::fs::metadata(&log_path).map_or(0, |m| m.len());
        let (out, err) = (open_log()?, open_log()?);
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this agent's executable: {e}"))?;
        let mode = match self.mode {
            crate::tunnel::Mode::Accept => "accept",
            crate::tunnel::Mode::Connect => "connect",
        };
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("tunnel")
            .arg("--data-dir")
            .arg(&ctx.cfg.data_dir)
            .args(["--mode", mode, "--listen", self.listen])
            .args(["--forward", self.forward, "--peer-node", self.peer])
            .args(["--vmm-pid", &self.vmm_pid.to_string()]);
        if let Some(a) = &self.arrival {
            cmd.arg("--arrival-file").arg(a);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start the migration tunnel: {e}"))?;
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            let log = std::fs::read(&log_path).unwrap_or_default();
            let fresh = log
                .get(usize::try_from(log_start).unwrap_or(0)..)
                .unwrap_or(&[]);
            let text = String::from_utf8_lossy(fresh);
            if let Some(addr) = text.lines().find_map(|l| {
                l.strip_prefix(crate::tunnel::LISTENING)
                    .map(|a| a.trim().to_owned())
            }) {
                // Reaped in the background: it ends by itself.
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                return Ok(addr);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the migration tunnel exited at start ({status}): {}",
                    text.lines().last().unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(format!(
                    "the migration tunnel did not listen within {LISTEN_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Where a source's VMM sends a migration: written when it starts, so an
/// agent restarted mid-way recognises the migration its VMM runs (the
/// VMM names the address it sends to, a tunnel's on loopback).
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct Outgoing {
    migration: String,
    to: String,
}

fn outgoing_path(layout: &Layout) -> std::path::PathBuf {
    layout.dir.join("outgoing.json")
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
        .arg("--arrival-file")
        .arg(layout.arrival())
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

/// Asks the controllers to decide the switchover; true only once they did.
/// An error that leaves the outcome unknown (no leader, a timeout) is
/// asked again: the controllers answer yes to a switchover already
/// decided for this source.
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
        // The VMM did not hear the yes: it treats that as a no and, since
        // it never paused, the VM runs on here; it reports the failure and
        // the store ends the decided migration (the target never got the
        // commit).
        tracing::warn!(%migration, error = %e, "cannot answer the switchover gate");
    }
    allowed
}

/// What the store says of an outgoing migration, as the reconciler sees
/// it in this node's assignments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreView {
    /// Unfinished: this node's assignment for it.
    Active(pb::MigrationAssignment),
    /// Finished; `here`: the instance is still placed on this node (the
    /// migration failed or was cancelled) or not (it completed).
    Ended {
        /// Whether the instance stays on this node.
        here: bool,
    },
}

impl StoreView {
    fn ended(&self) -> bool {
        matches!(self, StoreView::Ended { .. })
    }
}

/// How an outgoing migration ended, for the reconciler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// The VM runs on the target; this node's copy is gone.
    Moved,
    /// The VM runs here (the migration failed or was cancelled).
    Stayed,
    /// The source VMM ended during the migration.
    Lost,
}

/// Sends `vm` to the migration's target, or attaches to the migration its
/// VMM already runs. `store` follows the migration in the store.
pub(crate) async fn send(
    ctx: &StartContext,
    vm: &Vm,
    m: &pb::MigrationAssignment,
    mut store: watch::Receiver<StoreView>,
) -> Sent {
    let node = ctx.cfg.node_name();
    let migration = m.migration.clone();
    let client = VmmClient::new(&vm.layout.api_socket());
    let report_end =
        |failed: bool, cancelled: bool, reason: String, p: Option<pb::MigrationProgress>| {
            let req = pb::ReportMigrationRequest {
                node: node.clone(),
                migration: migration.clone(),
                progress: p,
                failed,
                cancelled,
                reason,
                ..Default::default()
            };
            report_retrying(&ctx.ctl, req)
        };
    let gate_path = vm.layout.dir.join("gate.sock");
    let _ = std::fs::remove_file(&gate_path);
    let gate = match UnixListener::bind(&gate_path) {
        Ok(l) => l,
        Err(e) => {
            report_end(
                true,
                false,
                format!("cannot serve the switchover gate: {e}"),
                None,
            )
            .await;
            return Sent::Stayed;
        }
    };
    allow_vmm_user(&gate_path, ctx);
    // A VMM already running this migration (this agent restarted) keeps
    // it: attach; it asks the gate at the same path.
    let recorded: Option<Outgoing> = std::fs::read(outgoing_path(&vm.layout))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|o: &Outgoing| o.migration == migration);
    let running = client
        .migrate_status()
        .await
        .ok()
        .filter(|st| !st.is_final() && recorded.as_ref().is_some_and(|o| o.to == st.to));
    if let Some(st) = &running {
        tracing::info!(%migration, state = %st.state, "attached to the migration the VMM runs");
    } else {
        // Over TLS: the VMM sends to this node's tunnel on loopback, which
        // carries the stream to the target node's.
        let to = match tunnel_peer(ctx, m) {
            None => Ok(m.peer_address.clone()),
            Some(peer) => {
                let loopback = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
                match free_port(loopback) {
                    Ok(port) => {
                        let listen = SocketAddr::new(loopback, port).to_string();
                        let tunnel = Tunnel {
                            mode: crate::tunnel::Mode::Connect,
                            listen: &listen,
                            forward: &m.peer_address,
                            peer: &peer,
                            vmm_pid: vm.record.pid,
                            arrival: None,
                        };
                        tunnel.spawn(ctx, &vm.layout).await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        let to = match to {
            Ok(to) => to,
            Err(why) => {
                let _ = std::fs::remove_file(&gate_path);
                report_end(true, false, why, None).await;
                return Sent::Stayed;
            }
        };
        let record = Outgoing {
            migration: migration.clone(),
            to: to.clone(),
        };
        if let Err(e) = serde_json::to_vec(&record)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(outgoing_path(&vm.layout), b))
        {
            tracing::warn!(%migration, error = %e, "cannot record the outgoing migration (an agent restart would not attach to it)");
        }
        tracing::info!(%migration, to = %m.peer_address, via = %to, "migrating");
        if let Err(e) = client.migrate(&to, m.max_downtime_ms, &gate_path).await {
            let _ = std::fs::remove_file(&gate_path);
            report_end(true, false, error_chain(&e), None).await;
            return Sent::Stayed;
        }
    }
    let mut decided = m.decided || running.as_ref().is_some_and(|st| st.decided);
    let mut last = VmmMigration::default();
    let mut tick = tokio::time::interval(POLL);
    let mut last_report = Instant::now();
    let mut cancel_sent = false;
    let mut doubt_reported = false;
    let mut resolved = false;
    let outcome = loop {
        tokio::select! {
            conn = gate.accept() => {
                if let Ok((s, _)) = conn {
                    let p = progress(&last);
                    if answer_gate(s, &ctx.ctl, &node, &migration, p).await {
                        decided = true;
                    }
                }
            }
            changed = store.changed() => {
                if changed.is_err() {
                    // The reconciler is gone (the agent stops): the VMM
                    // goes on by itself; the next agent attaches.
                    break None;
                }
            }
            _ = tick.tick() => {
                match client.migrate_status().await {
                    Ok(st) => {
                        if st.is_final() {
                            break Some(st);
                        }
                        decided |= st.decided;
                        if st.in_doubt() && !doubt_reported {
                            let req = pb::ReportMigrationRequest {
                                node: node.clone(),
                                migration: migration.clone(),
                                progress: Some(progress(&st)),
                                in_doubt: true,
                                reason: st.error.clone().unwrap_or_default(),
                                ..Default::default()
                            };
                            tracing::warn!(%migration, "the commit went out unacknowledged; the VM waits paused until the store settles the migration");
                            doubt_reported = report(&ctx.ctl, req).await.is_ok();
                        }
                        last = st;
                        if last_report.elapsed() >= REPORT_EVERY && !last.in_doubt() {
                            last_report = Instant::now();
                            let req = pb::ReportMigrationRequest {
                                node: node.clone(),
                                migration: migration.clone(),
                                progress: Some(progress(&last)),
                                ..Default::default()
                            };
                            let ctl = ctx.ctl.clone();
                            tokio::spawn(async move {
                                let _ = report(&ctl, req).await;
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
        let view = store.borrow().clone();
        // In doubt, and the store has settled it: tell the VMM.
        if last.in_doubt()
            && !resolved
            && let StoreView::Ended { here } = view
        {
            match client.migrate_resolve(!here).await {
                Ok(()) => {
                    resolved = true;
                    tracing::info!(%migration, moved = !here, "told the VMM where its in-doubt VM runs");
                }
                Err(e) => {
                    tracing::warn!(%migration, error = %error_chain(&e), "cannot settle the in-doubt migration in the VMM")
                }
            }
        }
        // Ended in the store before the switchover was decided (cancelled,
        // or failed at the target): stop sending.
        if view.ended() && !decided && !cancel_sent {
            cancel_sent = true;
            tracing::info!(%migration, "the migration ended in the store; cancelling it in the VMM");
            if let Err(e) = client.migrate_cancel().await {
                tracing::warn!(%migration, error = %error_chain(&e), "cannot cancel the migration in the VMM");
            }
        }
    };
    let _ = std::fs::remove_file(&gate_path);
    match outcome {
        Some(st) if st.state == "completed" => {
            tracing::info!(%migration, downtime_us = st.downtime_us.unwrap_or(0), bytes = st.bytes_sent, "migrated");
            // The target acknowledged: the VM runs there. The report also
            // carries the downtime, known only now.
            let req = pb::ReportMigrationRequest {
                node: node.clone(),
                migration: migration.clone(),
                progress: Some(progress(&st)),
                completed: true,
                ..Default::default()
            };
            report_retrying(&ctx.ctl, req).await;
            Sent::Moved
        }
        Some(st) => {
            let cancelled = st.state == "cancelled";
            let why = st.error.clone().unwrap_or_else(|| st.state.clone());
            tracing::info!(%migration, %why, "the migration ended without a switchover; the VM runs here");
            report_end(!cancelled, cancelled, why, Some(progress(&st))).await;
            Sent::Stayed
        }
        None if host::alive(vm.record.pid, vm.record.start_ticks) => {
            // Only when the agent itself stops: nothing to report.
            Sent::Stayed
        }
        None => {
            let why = failure_with_log(
                &vm.layout,
                "the source VMM ended during the migration".into(),
            )
            .failure
            .unwrap_or_default();
            if decided {
                // It may have sent the commit before it died: only the
                // target knows whether it runs the VM.
                let req = pb::ReportMigrationRequest {
                    node: node.clone(),
                    migration: migration.clone(),
                    progress: Some(progress(&last)),
                    in_doubt: true,
                    reason: why,
                    ..Default::default()
                };
                report_retrying(&ctx.ctl, req).await;
            } else {
                report_end(true, false, why, Some(progress(&last))).await;
            }
            Sent::Lost
        }
    }
}

/// How long a VMM may take to stop for [`settle`].
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settles an in-doubt migration on its target: freezes the incoming VMM
/// (`pid`), then reports `completed` if it wrote its arrival file (and lets
/// it go on), else kills it, since the VM never ran here, and reports
/// `failed`. Returns whether the VM runs here. An error (the VMM would
/// not stop, a report that did not get through) leaves it for the next
/// turn.
pub(crate) async fn settle(
    ctl: &Controllers,
    node: &str,
    migration: &str,
    layout: &Layout,
    pid: u32,
) -> Result<bool, String> {
    let frozen = tokio::task::spawn_blocking(move || host::freeze(pid, FREEZE_TIMEOUT))
        .await
        .unwrap_or(false);
    if !frozen {
        host::thaw(pid);
        return Err(format!(
            "the incoming VMM {pid} did not stop within {FREEZE_TIMEOUT:?}"
        ));
    }
    // Frozen: it cannot write the file, nor wake the vCPUs, from here on.
    let arrived = layout.arrival().exists();
    let req = if arrived {
        host::thaw(pid);
        tracing::info!(%migration, pid, "settled in doubt: the VM runs here");
        pb::ReportMigrationRequest {
            node: node.to_owned(),
            migration: migration.to_owned(),
            completed: true,
            ..Default::default()
        }
    } else {
        host::kill(pid);
        tracing::info!(%migration, pid, "settled in doubt: the VM never ran here; its VMM is stopped");
        pb::ReportMigrationRequest {
            node: node.to_owned(),
            migration: migration.to_owned(),
            failed: true,
            reason: "the commit never reached the target (settled: its VMM had not run the VM and was stopped)".into(),
            ..Default::default()
        }
    };
    match report(ctl, req).await {
        Ok(()) => Ok(arrived),
        // Settled already (the other side was heard first).
        Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(arrived),
        Err(s) => Err(format!(
            "cannot report the settled migration: {}",
            s.message()
        )),
    }
}

/// The VMM may run as another user (`--vmm-user`): let it reach the gate.
fn allow_vmm_user(path: &Path, ctx: &StartContext) {
    if ctx.cfg.vmm_user.is_some() {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
    }
}
