//! Scheduler benchmark (`cargo xtask bench scheduler`, or directly
//! `cargo run --release -p nephele-scheduler --bin bench-scheduler`).
//!
//! On synthetic clusters from `nephele_scheduler::testing` (mixed node sizes,
//! three zones, labels, anti-affinity, affinity and soft groups, skewed
//! load), on one thread pinned to one CPU (it re-executes itself under
//! `taskset` when available): placement decisions per second and p99
//! latency per decision at 1,000 and 10,000 nodes (each decision committed
//! before the next), batches of 20, and the rebalance, consolidation and
//! drain planners at 10,000 nodes and 100,000 instances. Prints a table,
//! then one line `BENCH {json}`.
//!
//! Environment: `NEPHELE_BENCH_DECISIONS` (default 20000) decisions per
//! cluster size; `NEPHELE_BENCH_PINNED` is set on the pinned re-execution.

use std::collections::HashMap;
use std::env;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use nephele_scheduler::testing::{self, ClusterSpec};
use nephele_scheduler::{
    ConsolidateParams, DrainParams, Explain, NodeState, PlaceError, RebalanceParams, Scheduler,
};

const PINNED: &str = "NEPHELE_BENCH_PINNED";

fn main() -> ExitCode {
    if env::var_os(PINNED).is_none()
        && let Some(code) = reexec_pinned()
    {
        return code;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-scheduler: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs this binary again under `taskset -c <last cpu>`; `None` when taskset
/// is missing (the benchmark then runs unpinned, on one thread anyway).
fn reexec_pinned() -> Option<ExitCode> {
    let exe = env::current_exe().ok()?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let status = Command::new("taskset")
        .arg("-c")
        .arg((cpus - 1).to_string())
        .arg(exe)
        .args(env::args_os().skip(1))
        .env(PINNED, "1")
        .status()
        .ok()?;
    Some(ExitCode::from(
        u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
    ))
}

struct PlaceResult {
    nodes: usize,
    instances: usize,
    decisions: usize,
    no_valid_host: usize,
    /// Decisions per second of CPU time of this thread.
    per_s: f64,
    /// Decisions per second of wall time.
    wall_per_s: f64,
    /// Time spent runnable but waiting for the CPU (other processes).
    waited_ms: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

/// The `per_mille`-th per-mille of sorted latencies, in microseconds.
fn percentile(sorted: &[Duration], per_mille: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) * per_mille).div_ceil(1000);
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

fn bench_place(nodes: usize, decisions: usize) -> Result<PlaceResult, String> {
    let snap = testing::generate(&ClusterSpec::new(nodes, nodes * 10, 42));
    let requests = testing::requests(&snap, decisions + 500, 7);
    let mut s = Scheduler::new(&snap).map_err(|e| e.to_string())?;
    let mut lat = Vec::with_capacity(decisions);
    let mut failed = 0usize;
    // Warm up caches and buffers.
    for r in &requests[decisions..] {
        let _ = s.place(r, Explain::Summary);
    }
    let start = Instant::now();
    let cpu = ThreadTime::now();
    for r in &requests[..decisions] {
        let t = Instant::now();
        let result = s.place(r, Explain::Summary);
        lat.push(t.elapsed());
        match result {
            Ok(plan) => s.commit_placement(&plan).map_err(|e| e.to_string())?,
            Err(PlaceError::NoValidHost(_)) => failed += 1,
            Err(e) => return Err(e.to_string()),
        }
    }
    let total = start.elapsed();
    let (cpu_s, waited) = cpu.elapsed(total);
    lat.sort_unstable();
    Ok(PlaceResult {
        nodes,
        instances: snap.instances.len(),
        decisions,
        no_valid_host: failed,
        per_s: decisions as f64 / cpu_s,
        wall_per_s: decisions as f64 / total.as_secs_f64(),
        waited_ms: waited * 1e3,
        p50_us: percentile(&lat, 500),
        p99_us: percentile(&lat, 990),
        max_us: lat.last().map_or(0.0, |d| d.as_secs_f64() * 1e6),
    })
}

/// CPU time of the calling thread and its wait for a CPU, from
/// `/proc/thread-self/schedstat` (nanoseconds). On a machine shared with
/// other work, throughput per CPU-second is what "on one core" means; the
/// wall-clock rate is printed beside it.
struct ThreadTime(Option<(u64, u64)>);

impl ThreadTime {
    fn read() -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        Some((fields.next()?.ok()?, fields.next()?.ok()?))
    }

    fn now() -> Self {
        Self(Self::read())
    }

    /// (CPU seconds, seconds waiting for a CPU) since `now`; the wall time
    /// and no wait when schedstat is unavailable.
    fn elapsed(&self, wall: Duration) -> (f64, f64) {
        match (self.0, Self::read()) {
            (Some((run0, wait0)), Some((run1, wait1))) if run1 > run0 => (
                (run1 - run0) as f64 / 1e9,
                wait1.saturating_sub(wait0) as f64 / 1e9,
            ),
            _ => (wall.as_secs_f64(), 0.0),
        }
    }
}

fn bench_batches(nodes: usize, batches: usize, size: u32) -> Result<f64, String> {
    let snap = testing::generate(&ClusterSpec::new(nodes, nodes * 10, 43));
    let mut requests = testing::requests(&snap, batches, 9);
    let mut s = Scheduler::new(&snap).map_err(|e| e.to_string())?;
    let mut placed = 0u64;
    let start = Instant::now();
    let cpu = ThreadTime::now();
    for r in &mut requests {
        r.count = size;
        if let Ok(plan) = s.place(r, Explain::Summary) {
            placed += plan.placements.len() as u64;
            s.commit_placement(&plan).map_err(|e| e.to_string())?;
        }
    }
    let (cpu_s, _) = cpu.elapsed(start.elapsed());
    Ok(placed as f64 / cpu_s)
}

struct PlannerResult {
    index_ms: f64,
    rebalance_ms: f64,
    moves: usize,
    before: f64,
    after: f64,
    consolidate_ms: f64,
    emptied: usize,
    drain_ms: f64,
    drained: usize,
}

/// Runs `f`, returning its result and the CPU time it took, in ms.
fn cpu_timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let cpu = ThreadTime::now();
    let out = f();
    let (cpu_s, _) = cpu.elapsed(start.elapsed());
    (out, cpu_s * 1e3)
}

fn bench_planners(nodes: usize, instances: usize) -> Result<PlannerResult, String> {
    let snap = testing::generate(&ClusterSpec::new(nodes, instances, 44));
    let (s, index) = cpu_timed(|| Scheduler::new(&snap));
    let mut s = s.map_err(|e| e.to_string())?;
    let params = RebalanceParams {
        max_migrations: 1000,
        max_migrations_per_node: 1,
        ..RebalanceParams::default()
    };
    let (plan, rebalance) = cpu_timed(|| s.plan_rebalance(&params));
    let plan = plan.map_err(|e| e.to_string())?;
    let (cons, consolidate) = cpu_timed(|| {
        s.plan_consolidation(&ConsolidateParams {
            max_nodes: 20,
            max_migrations: 1000,
            ..ConsolidateParams::default()
        })
    });
    let cons = cons.map_err(|e| e.to_string())?;
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for i in &snap.instances {
        *per_node.entry(i.node.as_str()).or_default() += 1;
    }
    let busiest = snap
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Up)
        .max_by_key(|n| {
            (
                per_node.get(n.id.as_str()).copied().unwrap_or(0),
                n.id.clone(),
            )
        })
        .map(|n| n.id.clone())
        .unwrap_or_default();
    let (drain, drain_time) = cpu_timed(|| s.plan_drain(&busiest, &DrainParams::default()));
    let drain = drain.map_err(|e| e.to_string())?;
    Ok(PlannerResult {
        index_ms: index,
        rebalance_ms: rebalance,
        moves: plan.moves.len(),
        before: plan.imbalance_before,
        after: plan.imbalance_after,
        consolidate_ms: consolidate,
        emptied: cons.nodes_to_empty.len(),
        drain_ms: drain_time,
        drained: drain.moves.len(),
    })
}

fn metric(name: &str, unit: &str, ours: f64) -> serde_json::Value {
    serde_json::json!({
        "name": name, "unit": unit, "ours": (ours * 1000.0).round() / 1000.0,
        "peer": null, "peer_value": null, "ratio": null
    })
}

fn run() -> Result<(), String> {
    let decisions = env::var("NEPHELE_BENCH_DECISIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000usize);
    let pinned = env::var_os(PINNED).is_some();
    println!(
        "scheduler benchmark: one thread{}, {decisions} decisions per size, release build",
        if pinned {
            ", pinned to one CPU"
        } else {
            " (taskset unavailable: not pinned)"
        }
    );
    let small = bench_place(1_000, decisions)?;
    let large = bench_place(10_000, decisions)?;
    let batch = bench_batches(10_000, 1_000, 20)?;
    let planners = bench_planners(10_000, 100_000)?;

    println!();
    println!(
        "{:<28} {:>6} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>5}",
        "placement (each committed)",
        "nodes",
        "instances",
        "per cpu-s",
        "per s",
        "p50 us",
        "p99 us",
        "waited ms",
        "nvh"
    );
    for r in [&small, &large] {
        println!(
            "{:<28} {:>6} {:>9} {:>9.0} {:>9.0} {:>8.1} {:>8.1} {:>9.0} {:>5}",
            format!("{} single decisions", r.decisions),
            r.nodes,
            r.instances,
            r.per_s,
            r.wall_per_s,
            r.p50_us,
            r.p99_us,
            r.waited_ms,
            r.no_valid_host
        );
    }
    println!(
        "  per cpu-s: decisions per second of this thread's CPU time (one core);\n  \
         per s: per wall second; waited: time runnable but preempted by other work"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>9.0}",
        "batches of 20 (inst./cpu-s)", 10_000, "", batch
    );
    println!(
        "  max latency: {:.0} us (1k nodes), {:.0} us (10k nodes)",
        small.max_us, large.max_us
    );
    println!();
    println!("planners at 10,000 nodes / 100,000 instances (CPU time of the thread)");
    println!("  index snapshot          {:>8.1} ms", planners.index_ms);
    println!(
        "  rebalance plan          {:>8.1} ms  {} moves, imbalance {:.4} -> {:.4}",
        planners.rebalance_ms, planners.moves, planners.before, planners.after
    );
    println!(
        "  rebalance from snapshot {:>8.1} ms  (index + plan: the reported rebalance_plan_ms)",
        planners.index_ms + planners.rebalance_ms
    );
    println!(
        "  consolidation plan      {:>8.1} ms  {} nodes to empty",
        planners.consolidate_ms, planners.emptied
    );
    println!(
        "  drain plan (busiest)    {:>8.1} ms  {} moves",
        planners.drain_ms, planners.drained
    );
    println!();
    println!("for context (published, not run here): Nomad 3,750 placements/s (C1M);");
    println!("kube-scheduler harness 680-1,100 pods/s. Bar: >= 10,000/s at 10,000 nodes,");
    println!("rebalance plan < 1 s at 10,000 nodes / 100,000 instances.");

    let line = serde_json::json!({
        "bench": "scheduler",
        "metrics": [
            metric("placements_per_s_1000", "placements/s", small.per_s),
            metric("p99_us_1000", "us", small.p99_us),
            metric("placements_per_s_10000", "placements/s", large.per_s),
            metric("p99_us_10000", "us", large.p99_us),
            metric("placements_per_wall_s_10000", "placements/s", large.wall_per_s),
            metric("batch_instances_per_s_10000", "instances/s", batch),
            metric("rebalance_plan_ms", "ms", planners.index_ms + planners.rebalance_ms),
            metric("rebalance_plan_only_ms", "ms", planners.rebalance_ms),
            metric("consolidate_plan_ms", "ms", planners.consolidate_ms),
            metric("drain_plan_ms", "ms", planners.drain_ms),
        ]
    });
    println!("BENCH {line}");
    Ok(())
}
