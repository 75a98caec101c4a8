//! `cargo xtask bench provision`: how fast the control plane provisions.
//!
//! (a) **create to guest-ready, real VMs**: an all-in-one cloud (one real
//! `neph-controller`, one real `neph-node`, real `neph-vmm` processes
//! booting the test guest). Each sample runs `neph instance create ID
//! --flavor small --image test-guest --wait` as a person would, then waits
//! for the guest's ready marker (`NEPH-GUEST READY`) in the instance's
//! console log; the sample is the time from starting `neph` to that line.
//! Each instance is deleted before the next. Skipped, with the reason, where
//! `/dev/kvm` or the binaries are missing.
//!
//! (b) **control-plane throughput, simulated nodes**: one real
//! `neph-controller` (1 member) and 1,000 *simulated nodes*
//! ([`SimulatedNode`]: the real node protocol, no VMs, no KVM) in this
//! process. 20,000 instances are created with `BatchCreateInstances` (100
//! per call, 4 calls in flight); the figure is instances scheduled *and*
//! acknowledged RUNNING by their simulated node per second, from the first
//! create call to the last acknowledgement, and the p99 of the create calls
//! (`sim_api_p99_ms`). A probe reads a node every 50 ms meanwhile
//! (`sim_get_p99_ms`). If the controller does not keep up, the run says how
//! far it got and where the controller's CPU time went, and reports what it
//! measured; the sizes are never shrunk silently.
//!
//! Flags: `--creates N` (a, default 20), `--nodes N` (b, 1000),
//! `--instances N` (b, 20000), `--skip-real`, `--skip-sim`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nephele_integration_tests::bench::{Metric, Report, Stats};
use nephele_integration_tests::cloud::Cloud;
use nephele_integration_tests::guest::{guest_image, kvm_unavailable, workspace_binary};
use nephele_integration_tests::procs::ControllerCluster;
use nephele_integration_tests::simnode::{Bearer, SimStats, SimulatedNode, Svc};
use nephele_proto::compute::v1 as compute;
use nephele_proto::iam::v1 as iam;
use nephele_proto::infra::v1 as infra;
use tonic::transport::Channel;

const READY_MARKER: &str = "NEPH-GUEST READY";

struct Options {
    creates: usize,
    nodes: usize,
    instances: usize,
    real: bool,
    sim: bool,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        creates: 20,
        nodes: 1000,
        instances: 20_000,
        real: true,
        sim: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = |name: &str| -> anyhow::Result<usize> {
            args.next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} takes a number"))
        };
        match a.as_str() {
            "--creates" => o.creates = number("--creates")?.max(1),
            "--nodes" => o.nodes = number("--nodes")?.max(1),
            "--instances" => o.instances = number("--instances")?,
            "--skip-real" => o.real = false,
            "--skip-sim" => o.sim = false,
            other => bail!(
                "unknown flag {other:?}; flags: --creates N, --nodes N, --instances N, --skip-real, --skip-sim"
            ),
        }
    }
    Ok(o)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    nephele_tls::install_default();
    let o = options()?;
    let mut report = Report::new("provision");

    // (a)
    let real = if o.real {
        match real_skip_reason() {
            Some(reason) => {
                println!("(a) create to guest-ready: SKIPPED: {reason}");
                None
            }
            None => Some(create_to_ready(o.creates)?),
        }
    } else {
        println!("(a) create to guest-ready: skipped (--skip-real)");
        None
    };
    let (ready, running) = match &real {
        Some((r, w)) => (Stats::of(r), Stats::of(w)),
        None => (None, None),
    };
    // A skipped part reports null figures (NaN serialises as null).
    let or_nan = |s: Option<Stats>, f: fn(&Stats) -> f64| s.as_ref().map_or(f64::NAN, f);
    report.push(Metric::alone(
        "create_ready_p50_ms",
        "ms",
        or_nan(ready, |s| s.median),
    ));
    report.push(Metric::alone(
        "create_ready_p99_ms",
        "ms",
        or_nan(ready, |s| s.p99),
    ));
    report.push(Metric::alone(
        "create_running_p50_ms",
        "ms",
        or_nan(running, |s| s.median),
    ));
    report.push(Metric::alone(
        "create_samples",
        "count",
        real.as_ref().map_or(0.0, |(r, _)| r.len() as f64),
    ));

    // (b)
    let sim = if o.sim {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Some(rt.block_on(simulated(o.nodes, o.instances))?)
    } else {
        println!("(b) simulated nodes: skipped (--skip-sim)");
        None
    };
    let sim_or = |f: fn(&SimResult) -> f64| sim.as_ref().map_or(f64::NAN, f);
    report.push(Metric::alone(
        "sim_nodes",
        "count",
        sim_or(|s| s.nodes as f64),
    ));
    report.push(Metric::alone(
        "sim_instances_acked",
        "count",
        sim_or(|s| s.acked as f64),
    ));
    report.push(Metric::alone(
        "sim_instances_per_s",
        "1/s",
        sim_or(|s| s.per_s),
    ));
    report.push(Metric::alone("sim_api_p99_ms", "ms", sim_or(|s| s.api.p99)));
    report.push(Metric::alone(
        "sim_api_p50_ms",
        "ms",
        sim_or(|s| s.api.median),
    ));
    report.push(Metric::alone(
        "sim_get_p99_ms",
        "ms",
        sim_or(|s| s.probe.map_or(f64::NAN, |p| p.p99)),
    ));
    report.push(Metric::alone(
        "sim_register_s",
        "s",
        sim_or(|s| s.register.as_secs_f64()),
    ));
    report.push(Metric::alone(
        "sim_controller_cpu_s",
        "s",
        sim_or(|s| s.controller_cpu_s),
    ));
    println!();
    report.print();
    Ok(())
}

/// Why part (a) cannot run here, if it cannot.
fn real_skip_reason() -> Option<String> {
    if let Some(r) = kvm_unavailable() {
        return Some(r);
    }
    for b in ["neph", "neph-controller", "neph-node", "neph-vmm"] {
        if !workspace_binary(b).is_file() {
            return Some(format!(
                "{} is missing (cargo build --release -p {b})",
                workspace_binary(b).display()
            ));
        }
    }
    if !guest_image().is_file() {
        return Some(format!(
            "no test guest at {} (cargo xtask guest)",
            guest_image().display()
        ));
    }
    None
}

/// (a): samples of (create to ready, create to `--wait` returning), ms.
fn create_to_ready(n: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    println!(
        "(a) create to guest-ready: 1 controller, 1 node agent, real VMs; {n} creates (+1 warm-up)"
    );
    let cloud = Cloud::start(1, 1).context("starting the all-in-one cloud")?;
    let node_dir = cloud.nodes[0].data_dir.clone();
    let mut ready = Vec::new();
    let mut running = Vec::new();
    for k in 0..=n {
        let id = format!("p{k}");
        let log = node_dir
            .join("instances")
            .join(&cloud.project)
            .join(&id)
            .join("console.log");
        let t0 = Instant::now();
        cloud
            .neph(&[
                "instance",
                "create",
                &id,
                "--flavor",
                "small",
                "--image",
                "test-guest",
                "--wait",
                "--timeout",
                "60",
            ])
            .with_context(|| format!("creating {id}"))?;
        let t_running = t0.elapsed();
        let t_ready = wait_marker(&log, t0, Duration::from_secs(30))
            .with_context(|| format!("{id} never printed its ready marker in {}", log.display()))?;
        if k > 0 {
            ready.push(ms(t_ready));
            running.push(ms(t_running));
            println!(
                "  {id}: RUNNING (neph --wait returned) {:>7.1} ms, guest ready {:>7.1} ms",
                ms(t_running),
                ms(t_ready)
            );
        }
        cloud
            .neph(&["instance", "delete", &id, "--wait", "--timeout", "60"])
            .with_context(|| format!("deleting {id}"))?;
    }
    Ok((ready, running))
}

/// Polls a console log for the ready marker; the time since `t0`.
fn wait_marker(log: &Path, t0: Instant, within: Duration) -> Option<Duration> {
    while t0.elapsed() < within {
        if std::fs::read(log)
            .ok()
            .is_some_and(|b| String::from_utf8_lossy(&b).contains(READY_MARKER))
        {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

struct SimResult {
    nodes: usize,
    acked: u64,
    per_s: f64,
    api: Stats,
    probe: Option<Stats>,
    register: Duration,
    controller_cpu_s: f64,
}

/// CPU seconds (user + system) a process has used, from `/proc`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // After `)`: state is field 0 here; utime 11, stime 12.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

fn bearer(token: &str) -> anyhow::Result<Bearer> {
    Ok(Bearer(
        format!("Bearer {}", token.trim())
            .parse()
            .context("the admin token is not ASCII")?,
    ))
}

async fn simulated(nodes: usize, instances: usize) -> anyhow::Result<SimResult> {
    println!(
        "(b) control plane with SIMULATED nodes: 1 controller, {nodes} simulated nodes (no VMs, no KVM), {instances} instances"
    );
    // The simulated nodes use the admin token, not a certificate each.
    let cluster = ControllerCluster::start_with_env(
        1,
        9000 + u64::from(std::process::id()),
        &[("NEPHELE_ALLOW_NODE_TOKENS", "true")],
    )
    .context("starting the controller")?;
    let controller_pid = cluster.members[0].daemon.pid();
    let token_file = cluster.data_dir(1).join("admin.token");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !token_file.is_file() {
        if Instant::now() > deadline {
            bail!("no admin token at {}", token_file.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = std::fs::read_to_string(&token_file)?;
    let url = format!("http://{}", cluster.members[0].address);
    // Several connections, so that one HTTP/2 connection's stream limit
    // does not serialise a thousand watch streams.
    let mut channels = Vec::new();
    for _ in 0..16 {
        let tls = nephele_tls::server_auth_client_config(&std::fs::read(cluster.ca_file())?)?;
        channels.push(nephele_tls::connect_channel(Channel::from_shared(url.clone())?, tls).await?);
    }
    let auth = bearer(&token)?;
    let svc = |c: &Channel| -> Svc {
        tonic::service::interceptor::InterceptedService::new(c.clone(), auth.clone())
    };
    let api = svc(&channels[0]);

    // Cluster resources for the run.
    let mut iam_c = iam::iam_client::IamClient::new(api.clone());
    iam_c
        .create_project(iam::CreateProjectRequest {
            project_id: "bench".into(),
            project: Some(iam::Project {
                quota: Some(iam::Quota {
                    instances: instances as u64,
                    vcpus: instances as u64,
                    memory_mib: instances as u64 * 128,
                    disk_gib: instances as u64,
                }),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    compute::flavors_client::FlavorsClient::new(api.clone())
        .create_flavor(compute::CreateFlavorRequest {
            flavor_id: "sim".into(),
            flavor: Some(compute::Flavor {
                name: String::new(),
                resources: Some(compute::Resources {
                    vcpus: 1,
                    memory_mib: 128,
                    disk_gib: 1,
                }),
            }),
            request_id: String::new(),
        })
        .await?;
    compute::images_client::ImagesClient::new(api.clone())
        .create_image(compute::CreateImageRequest {
            image_id: "sim-image".into(),
            image: Some(compute::Image {
                format: "pvh-elf".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;

    // Register every simulated node, 50 at a time.
    let capacity = compute::Resources {
        vcpus: 64,
        memory_mib: 64 * 1024,
        disk_gib: 2000,
    };
    let stats = Arc::new(SimStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t_reg = Instant::now();
    let mut sims = Vec::new();
    for i in 1..=nodes {
        sims.push(SimulatedNode::new(
            i,
            channels[i % channels.len()].clone(),
            &token,
            capacity,
        )?);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in sims.chunks(50) {
        let mut regs = tokio::task::JoinSet::new();
        for s in chunk {
            let s = s.clone();
            regs.spawn(async move {
                let r = s.register().await;
                (s, r)
            });
        }
        while let Some(r) = regs.join_next().await {
            let (s, interval) = r?;
            let interval = interval?;
            tasks.spawn(s.run(interval, stats.clone(), stop_rx.clone()));
        }
    }
    let register = t_reg.elapsed();
    println!(
        "  {nodes} simulated nodes registered in {:.2} s",
        register.as_secs_f64()
    );
    let mut nodes_c = infra::nodes_client::NodesClient::new(api.clone());
    let up_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut up = 0;
        let mut token = String::new();
        loop {
            let r = nodes_c
                .list_nodes(infra::ListNodesRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                    state: infra::NodeState::Up as i32,
                })
                .await?
                .into_inner();
            up += r.nodes.len();
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        if up >= nodes {
            break;
        }
        if Instant::now() > up_deadline {
            bail!("only {up} of {nodes} simulated nodes UP after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A probe: one cheap read every 50 ms for the whole run.
    let probe = {
        let mut c = infra::nodes_client::NodesClient::new(svc(&channels[1]));
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let t = Instant::now();
                let ok = c
                    .get_node(infra::GetNodeRequest {
                        name: "nodes/sim-node-0001".into(),
                    })
                    .await
                    .is_ok();
                if ok {
                    samples.push(ms(t.elapsed()));
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stop.changed() => return samples,
                }
            }
        })
    };

    // Create in batches of 100, 4 in flight.
    let cpu0 = cpu_seconds(controller_pid);
    let t0 = Instant::now();
    let batches = instances.div_ceil(100);
    let sem = Arc::new(tokio::sync::Semaphore::new(4));
    let mut creates = tokio::task::JoinSet::new();
    for b in 0..batches {
        let count = (instances - b * 100).min(100);
        let permit = sem.clone().acquire_owned().await?;
        let mut ic = compute::instances_client::InstancesClient::new(svc(&channels[2 + b % 4]));
        creates.spawn(async move {
            let t = Instant::now();
            let r = ic
                .batch_create_instances(compute::BatchCreateInstancesRequest {
                    parent: "projects/bench".into(),
                    instance_id: format!("b{b:04}"),
                    count: u32::try_from(count).unwrap_or(100),
                    instance: Some(compute::Instance {
                        flavor: "flavors/sim".into(),
                        image: "images/sim-image".into(),
                        ..Default::default()
                    }),
                    request_id: format!("bench-provision-{b}"),
                })
                .await;
            drop(permit);
            (count, ms(t.elapsed()), r.map(|_| ()))
        });
    }
    let mut api = Vec::new();
    let mut created = 0u64;
    let mut failures = Vec::new();
    while let Some(r) = creates.join_next().await {
        let (count, latency, outcome) = r?;
        api.push(latency);
        match outcome {
            Ok(()) => created += count as u64,
            Err(s) => failures.push(format!("{:?}: {}", s.code(), s.message())),
        }
    }
    let t_created = t0.elapsed();
    println!(
        "  {created} instances created by {} BatchCreateInstances calls in {:.2} s ({} failed{})",
        api.len(),
        t_created.as_secs_f64(),
        failures.len(),
        failures
            .first()
            .map(|f| format!("; first: {f}"))
            .unwrap_or_default()
    );

    // Wait for every acknowledgement; say how it goes.
    let ack_deadline = Instant::now() + Duration::from_secs(600);
    let mut last_print = Instant::now();
    let t_acked;
    loop {
        let acked = stats.acked_running.load(Ordering::Relaxed);
        if acked >= created {
            t_acked = t0.elapsed();
            break;
        }
        if Instant::now() > ack_deadline {
            t_acked = t0.elapsed();
            println!(
                "  GAVE UP after 600 s: {acked} of {created} acknowledged; the controller used {:.1} s of CPU meanwhile",
                cpu_seconds(controller_pid) - cpu0
            );
            break;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            last_print = Instant::now();
            println!(
                "  ... {acked} of {created} acknowledged after {:.1} s (controller CPU {:.1} s, report errors {}, heartbeat errors {})",
                t0.elapsed().as_secs_f64(),
                cpu_seconds(controller_pid) - cpu0,
                stats.report_errors.load(Ordering::Relaxed),
                stats.heartbeat_errors.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let controller_cpu_s = cpu_seconds(controller_pid) - cpu0;
    let acked = stats.acked_running.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let probe = probe.await.ok().and_then(|s| Stats::of(&s));
    tasks.abort_all();
    let per_s = acked as f64 / t_acked.as_secs_f64().max(1e-9);
    let api = Stats::of(&api).context("no create call was made")?;
    println!(
        "  {acked} instances scheduled and acknowledged RUNNING by simulated nodes in {:.2} s: {per_s:.0}/s",
        t_acked.as_secs_f64()
    );
    println!(
        "  BatchCreateInstances (100 each): p50 {:.1} ms, p99 {:.1} ms; probe GetNode p99 {}; controller CPU {:.1} s over the run; {} heartbeats ({} failed), {} assignment sets, {} report retries",
        api.median,
        api.p99,
        probe.map_or("-".into(), |p| format!("{:.1} ms", p.p99)),
        controller_cpu_s,
        stats.heartbeats.load(Ordering::Relaxed),
        stats.heartbeat_errors.load(Ordering::Relaxed),
        stats.assignment_sets.load(Ordering::Relaxed),
        stats.report_errors.load(Ordering::Relaxed),
    );
    drop(cluster);
    Ok(SimResult {
        nodes,
        acked,
        per_s,
        api,
        probe,
        register,
        controller_cpu_s,
    })
}
