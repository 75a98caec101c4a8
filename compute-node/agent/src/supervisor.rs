//! The reconciler: drives the `neph-vmm` processes on this node toward the
//! controllers' newest assignment set, level-triggered (every turn reads
//! the whole desired set and what runs, decides one action per instance
//! with [`decide`], and never relies on having seen the changes in
//! between). Slow actions (start, graceful stop, delete) run as tasks, one
//! at a time per instance; their results come back as events.
//!
//! It also re-adopts VMs at start ([`Supervisor::adopt`]): every
//! `instances/*/*/state` whose process still runs and answers on its
//! control socket is kept as it is.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nephele_proto::compute::v1::InstanceState;
use nephele_proto::node::v1 as pb;
use nephele_proto::node::v1::{DesiredState, ReportedState};
use tokio::sync::{mpsc, watch};

use crate::config::AgentConfig;
use crate::controller::Controllers;
use crate::host;
use crate::instance::{self, InstanceName, Layout, PrepareError, VmRecord, VmSpec};
use crate::vmm::VmmClient;

/// How often the reconciler looks at its VMs without being woken.
const TICK: Duration = Duration::from_secs(1);
/// How long a new VM may take to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How often fetched images are swept.
const IMAGE_SWEEP_EVERY: Duration = Duration::from_secs(600);
/// After `stop`, how long before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bytes of `vmm.log` quoted in a failure reason.
const REASON_BYTES: u64 = 1024;

/// What the reconciler shares with the heartbeat loop and the gRPC
/// service.
#[derive(Debug, Default)]
pub struct Shared {
    /// The fencing lease the VMs hold (`CLOCK_MONOTONIC` ms; 0: none yet).
    pub lease_until_ms: AtomicU64,
    /// The VMs that run here now, by instance name.
    pub vms: Mutex<BTreeMap<String, VmView>>,
    /// Held while an image is fetched (one at a time).
    pub image_fetch: tokio::sync::Mutex<()>,
}

impl Shared {
    /// A copy of the VM table.
    pub fn vms(&self) -> BTreeMap<String, VmView> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the lease is still running.
    pub fn lease_valid(&self) -> bool {
        self.lease_until_ms.load(Ordering::SeqCst) > host::monotonic_ms()
    }
}

/// One running VM as others see it.
#[derive(Debug, Clone)]
pub struct VmView {
    /// The `neph-vmm` process.
    pub pid: u32,
    /// Its files.
    pub layout: Layout,
    /// What the heartbeat reports.
    pub state: InstanceState,
}

/// A VM the reconciler holds.
#[derive(Debug, Clone)]
pub(crate) struct Vm {
    pub(crate) record: VmRecord,
    pub(crate) layout: Layout,
    pub(crate) fenced: bool,
    /// Started by this agent process (a waiter reaps it and says how it
    /// ended); otherwise adopted and watched through `/proc`.
    pub(crate) child: bool,
    /// A `neph-vmm --incoming` still waiting for its migration (its control
    /// socket answers only once the VM has arrived).
    pub(crate) incoming: bool,
}

/// How a VM ended by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// `None`: the guest powered off (report STOPPED); else why it failed.
    pub failure: Option<String>,
    /// The assignment generation when it ended (`None` until the first
    /// assignment after a re-adoption): a newer one means the controllers
    /// acted on it.
    pub generation: Option<u64>,
}

/// The facts [`decide`] reads about the assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// Desired state.
    pub desired: DesiredState,
    /// The instance's current state in the store.
    pub state: InstanceState,
    /// Its boot count.
    pub boot_count: u64,
    /// Its generation.
    pub generation: u64,
    /// Graceful stop time.
    pub stop_timeout: Duration,
    /// This node's part in the instance's unfinished migration.
    pub role: Role,
}

/// This node's part in a migration, as [`decide`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// No migration.
    None,
    /// The VM runs here and goes; `ready`: the target's address is known.
    Source {
        /// The target listens.
        ready: bool,
    },
    /// The VM comes here.
    Target {
        /// The switchover is decided: the VM runs here once it arrives.
        decided: bool,
        /// The source sent the commit and heard nothing back: settle where
        /// the VM runs.
        in_doubt: bool,
    },
}

/// The facts [`decide`] reads about the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Have {
    /// The boot count it was started for.
    pub boot_count: u64,
    /// Paused by its lease.
    pub fenced: bool,
    /// Still receiving its migration.
    pub incoming: bool,
}

/// One step toward the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do now.
    Nothing,
    /// Boot a VM.
    Start,
    /// Stop the VM and boot it again (a newer boot count).
    Restart,
    /// Resume a fenced VM (the lease is valid again).
    Resume,
    /// Stop the VM: graceful for that long first, or at once.
    Stop(Option<Duration>),
    /// Stop it, remove its directory and tap; report DELETED if assigned.
    Delete {
        /// Whether the controllers wait for a DELETED report.
        report: bool,
    },
    /// Tell the controllers.
    Report(ReportedState, String),
    /// Start `neph-vmm --incoming` for the migration coming here and report
    /// its address.
    Incoming,
    /// Send the VM to the migration's target.
    Migrate,
    /// Tell the controllers the migration failed (this side cannot go on).
    MigrationFailed(String),
    /// Target: the migrated VM runs here; tell the controllers.
    MigrationArrived,
    /// Target of an in-doubt migration: freeze the incoming VMM and settle
    /// where the VM runs (see `migrate::settle`).
    SettleIncoming,
}

/// Decides the next step for one instance. `want`: its assignment here, if
/// any; `have`: its VM, if one runs; `exit`: how its last VM ended by
/// itself, if it did; `leftovers`: whether its directory exists.
pub fn decide(
    want: Option<&Want>,
    have: Option<&Have>,
    exit: Option<&Exit>,
    lease_valid: bool,
    leftovers: bool,
) -> Action {
    let Some(w) = want else {
        return if have.is_some() || leftovers {
            Action::Delete { report: false }
        } else {
            Action::Nothing
        };
    };
    let exit_report = |e: &Exit| match &e.failure {
        None => Action::Report(
            ReportedState::ReportedStopped,
            "the guest powered off".into(),
        ),
        Some(why) => Action::Report(ReportedState::ReportedFailed, why.clone()),
    };
    if w.desired == DesiredState::DesiredRunning {
        match (w.role, have) {
            // The target: receive, or say why it cannot.
            (Role::Target { .. }, None) => {
                return match exit {
                    Some(e) => Action::MigrationFailed(
                        e.failure
                            .clone()
                            .unwrap_or_else(|| "the incoming VMM ended".into()),
                    ),
                    None => Action::Incoming,
                };
            }
            // In doubt and not arrived (as far as its control socket
            // tells): settle it.
            (Role::Target { in_doubt: true, .. }, Some(h)) if h.incoming => {
                return Action::SettleIncoming;
            }
            // Arrived, and the store does not know yet.
            (Role::Target { decided: true, .. }, Some(h)) if !h.incoming => {
                return Action::MigrationArrived;
            }
            (Role::Target { .. }, Some(_)) => return Action::Nothing,
            // The source: send once the target listens.
            (Role::Source { ready: true }, Some(h)) if !h.fenced && !h.incoming => {
                return Action::Migrate;
            }
            // An incoming VM whose migration ended: it runs here once its
            // commit arrived (its control socket then answers), and is
            // removed when the instance is not placed here.
            (Role::None, Some(h)) if h.incoming => return Action::Nothing,
            _ => {}
        }
        if w.state == InstanceState::Migrating && have.is_some() {
            // Migrating and not ready yet: keep it as it runs.
            return Action::Nothing;
        }
    }
    match w.desired {
        DesiredState::Unspecified => Action::Nothing,
        DesiredState::DesiredRunning => match have {
            Some(h) if h.boot_count < w.boot_count => Action::Restart,
            Some(h) if h.fenced => {
                if lease_valid {
                    Action::Resume
                } else {
                    Action::Nothing
                }
            }
            Some(_) if w.state != InstanceState::Running => {
                Action::Report(ReportedState::ReportedRunning, String::new())
            }
            Some(_) => Action::Nothing,
            None => match exit {
                // It ended by itself and the controllers have not acted
                // on that yet: tell them, do not boot it again.
                Some(e) if e.generation.is_none_or(|g| w.generation <= g) => exit_report(e),
                _ if matches!(
                    w.state,
                    InstanceState::Scheduled | InstanceState::Starting | InstanceState::Running
                ) =>
                {
                    Action::Start
                }
                _ => Action::Nothing,
            },
        },
        DesiredState::DesiredStopped => match have {
            // Fenced, or a stop that asked for no grace: off at once.
            Some(h) if h.fenced || w.stop_timeout.is_zero() => Action::Stop(None),
            Some(_) => Action::Stop(Some(w.stop_timeout)),
            None if w.state == InstanceState::Stopping => match exit {
                Some(
                    e @ Exit {
                        failure: Some(_), ..
                    },
                ) => exit_report(e),
                _ => Action::Report(ReportedState::ReportedStopped, String::new()),
            },
            None => Action::Nothing,
        },
        DesiredState::DesiredDeleted => {
            if have.is_some() || leftovers {
                Action::Delete { report: true }
            } else {
                Action::Report(ReportedState::ReportedDeleted, String::new())
            }
        }
    }
}

enum Event {
    /// A child VM ended.
    Exited { name: String, pid: u32, exit: Exit },
    /// An action task finished.
    Done { name: String, outcome: Outcome },
    /// A report did not reach the controllers: allow it again.
    ReportFailed { name: String },
    /// A migration report did not reach the controllers.
    MigrationReportFailed { migration: String },
}

enum Outcome {
    Started(Box<Vm>, Option<tokio::process::Child>),
    StartFailed(String),
    Stopped,
    Deleted,
    Resumed,
    Unchanged,
    /// The VM went to the migration's target (or stopped here after the
    /// switchover was decided): forget it.
    Migrated,
}

/// The reconciler.
pub struct Supervisor {
    cfg: Arc<AgentConfig>,
    ctl: Controllers,
    shared: Arc<Shared>,
    vms: HashMap<String, Vm>,
    exits: HashMap<String, Exit>,
    busy: HashSet<String>,
    reported: HashMap<String, (ReportedState, u64)>,
    assignments: Option<pb::Assignments>,
    /// Migrations this agent worked on (each is attempted once; a failed
    /// one is final in the store).
    migrations_seen: HashSet<String>,
    /// Migration failures reported.
    migration_reported: HashSet<String>,
    /// Running outgoing migrations: instance -> (migration, what the
    /// store says of it).
    outgoing: HashMap<String, (String, watch::Sender<crate::migrate::StoreView>)>,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("vms", &self.vms.keys().collect::<Vec<_>>())
            .field("busy", &self.busy)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A reconciler holding the VMs [`Self::adopt`] finds.
    pub async fn new(cfg: Arc<AgentConfig>, ctl: Controllers, shared: Arc<Shared>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = Self {
            cfg,
            ctl,
            shared,
            vms: HashMap::new(),
            exits: HashMap::new(),
            busy: HashSet::new(),
            reported: HashMap::new(),
            assignments: None,
            migrations_seen: HashSet::new(),
            migration_reported: HashSet::new(),
            outgoing: HashMap::new(),
            tx,
            rx,
        };
        s.adopt().await;
        s.publish();
        s
    }

    /// Re-adopts the VMs a previous agent process started: every state
    /// record whose process still runs (same pid and start time) and
    /// answers on its control socket with that pid. A record whose VM is
    /// gone becomes an [`Exit`] to report.
    async fn adopt(&mut self) {
        for (name, layout) in instance_dirs(&self.cfg) {
            let path = layout.state();
            if !path.exists() {
                continue;
            }
            let record = match VmRecord::load(&path) {
                Ok(r) if r.name == name.to_string() => r,
                Ok(r) => {
                    tracing::warn!(path = %path.display(), recorded = %r.name, "state record names another instance; ignoring it");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "unreadable state record; ignoring it");
                    continue;
                }
            };
            let key = name.to_string();
            let status = if host::alive(record.pid, record.start_ticks) {
                VmmClient::new(&layout.api_socket()).status().await.ok()
            } else {
                None
            };
            match status {
                // A `neph-vmm --incoming` still waiting for its VM answers
                // nothing yet: adopt it as such (it can still be settled).
                None if record.incoming && host::alive(record.pid, record.start_ticks) => {
                    tracing::info!(instance = %key, pid = record.pid, "re-adopted an incoming VMM");
                    self.vms.insert(
                        key,
                        Vm {
                            record,
                            layout,
                            fenced: false,
                            child: false,
                            incoming: true,
                        },
                    );
                }
                Some(st) if st.pid == record.pid => {
                    tracing::info!(instance = %key, pid = record.pid, fenced = st.fenced, "re-adopted a running VM");
                    self.vms.insert(
                        key,
                        Vm {
                            record,
                            layout,
                            fenced: st.fenced,
                            child: false,
                            incoming: false,
                        },
                    );
                }
                _ => {
                    if host::alive(record.pid, record.start_ticks) {
                        // Runs but does not answer as that VM: leave it
                        // alone rather than kill an unknown process.
                        tracing::warn!(instance = %key, pid = record.pid, "process of a state record does not answer as its VM; not adopting it");
                    }
                    let exit = exit_from_log(&layout, None);
                    tracing::info!(instance = %key, ?exit, "a VM of the previous agent ended while it was away");
                    let _ = std::fs::remove_file(&path);
                    self.exits.insert(key, exit);
                }
            }
        }
    }

    /// Runs until `assignments` closes.
    pub async fn run(mut self, mut assignments: watch::Receiver<Option<pb::Assignments>>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(IMAGE_SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.poll().await,
                _ = sweep.tick() => self.sweep_images(),
                changed = assignments.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.assignments = assignments.borrow_and_update().clone();
                }
                Some(ev) = self.rx.recv() => self.on_event(ev),
            }
            while let Ok(ev) = self.rx.try_recv() {
                self.on_event(ev);
            }
            self.reconcile();
            self.publish();
        }
    }

    /// Removes fetched images no assigned instance has used for
    /// [`crate::image::CACHE_TTL`] (in the background).
    fn sweep_images(&self) {
        // Before the first assignments arrive nothing is known to be unused.
        let Some(assigned) = &self.assignments else {
            return;
        };
        let in_use: HashSet<String> = assigned
            .assignments
            .iter()
            .filter_map(|a| a.instance.as_ref().map(|i| i.image.clone()))
            .collect();
        let dir = self.cfg.image_dir.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            // Holding the fetch lock: no fetch runs meanwhile.
            let _no_fetch = shared.image_fetch.lock().await;
            let removed = tokio::task::spawn_blocking(move || {
                crate::image::sweep(&dir, &in_use, crate::image::CACHE_TTL)
            })
            .await
            .unwrap_or_default();
            for id in removed {
                tracing::info!(image = %id, "removed a fetched image no instance here used for an hour");
            }
        });
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Exited { name, pid, exit } => {
                if self.vms.get(&name).is_some_and(|v| v.record.pid == pid) {
                    let vm = self.vms.remove(&name);
                    if !self.busy.contains(&name) {
                        tracing::info!(instance = %name, ?exit, "VM ended by itself");
                        if let Some(vm) = vm {
                            let _ = std::fs::remove_file(vm.layout.state());
                        }
                        let mut exit = exit;
                        exit.generation = self.want_of(&name).map(|w| w.generation);
                        self.exits.insert(name, exit);
                    }
                }
            }
            Event::Done { name, outcome } => {
                self.busy.remove(&name);
                match outcome {
                    Outcome::Started(vm, child) => {
                        if let Some(child) = child {
                            self.wait_child(&name, vm.record.pid, vm.layout.clone(), child);
                        }
                        let g = self.want_of(&name).map_or(0, |w| w.generation);
                        self.reported
                            .insert(name.clone(), (ReportedState::ReportedRunning, g));
                        self.vms.insert(name, *vm);
                    }
                    Outcome::StartFailed(why) => {
                        tracing::warn!(instance = %name, reason = %why, "VM did not start");
                        self.vms.remove(&name);
                        let generation = self.want_of(&name).map(|w| w.generation);
                        self.exits.insert(
                            name,
                            Exit {
                                failure: Some(why),
                                generation,
                            },
                        );
                    }
                    Outcome::Stopped | Outcome::Deleted => {
                        self.vms.remove(&name);
                    }
                    Outcome::Migrated => {
                        self.outgoing.remove(&name);
                        if let Some(vm) = self.vms.remove(&name) {
                            let _ = std::fs::remove_file(vm.layout.state());
                        }
                    }
                    Outcome::Resumed => {
                        if let Some(vm) = self.vms.get_mut(&name) {
                            vm.fenced = false;
                        }
                    }
                    Outcome::Unchanged => {
                        self.outgoing.remove(&name);
                    }
                }
            }
            Event::ReportFailed { name } => {
                self.reported.remove(&name);
            }
            Event::MigrationReportFailed { migration } => {
                self.migration_reported.remove(&migration);
            }
        }
    }

    fn wait_child(&self, name: &str, pid: u32, layout: Layout, mut child: tokio::process::Child) {
        let tx = self.tx.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let status = child.wait().await;
            let exit = match status {
                Ok(s) if s.success() => Exit {
                    failure: None,
                    generation: None,
                },
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt as _;
                    let how = match (s.code(), s.signal()) {
                        (_, Some(sig)) => format!("the VMM was killed by signal {sig}"),
                        (Some(c), _) => format!("the VMM exited with status {c}"),
                        _ => "the VMM ended".to_owned(),
                    };
                    failure_with_log(&layout, how)
                }
                Err(e) => failure_with_log(&layout, format!("cannot wait for the VMM: {e}")),
            };
            let _ = tx.send(Event::Exited { name, pid, exit });
        });
    }

    /// Looks at every VM not being acted on: adopted ones that ended, and
    /// each one's fenced flag.
    async fn poll(&mut self) {
        let idle: Vec<(String, Vm)> = self
            .vms
            .iter()
            .filter(|(n, _)| !self.busy.contains(*n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let checks = idle.into_iter().map(|(name, vm)| async move {
            if !vm.child && !host::alive(vm.record.pid, vm.record.start_ticks) {
                return (name, vm, None);
            }
            let st = tokio::time::timeout(
                Duration::from_secs(2),
                VmmClient::new(&vm.layout.api_socket()).status(),
            )
            .await;
            (name, vm, Some(st.ok().and_then(Result::ok)))
        });
        for (name, vm, status) in futures::future::join_all(checks).await {
            match status {
                None => {
                    let mut exit = exit_from_log(&vm.layout, None);
                    exit.generation = self.want_of(&name).map(|w| w.generation);
                    tracing::info!(instance = %name, ?exit, "adopted VM ended");
                    let _ = std::fs::remove_file(vm.layout.state());
                    self.vms.remove(&name);
                    self.exits.insert(name, exit);
                }
                Some(Some(st)) => {
                    if let Some(v) = self.vms.get_mut(&name) {
                        if v.incoming {
                            tracing::info!(instance = %name, pid = v.record.pid, "the migrated VM runs here");
                            v.incoming = false;
                            // Also on disk: a restarted agent must not take
                            // the running VM for a VMM still waiting.
                            if v.record.incoming {
                                v.record.incoming = false;
                                if let Err(e) = v.record.save(&v.layout.state()) {
                                    tracing::warn!(instance = %name, error = %e, "cannot record that the migrated VM arrived");
                                }
                            }
                            let until = self.shared.lease_until_ms.load(Ordering::SeqCst);
                            if until > 0 {
                                let c = VmmClient::new(&v.layout.api_socket());
                                let _ = c.lease(until).await;
                            }
                        }
                        if st.fenced && !v.fenced {
                            tracing::warn!(instance = %name, "VM is fenced: its lease ran out");
                        }
                        v.fenced = st.fenced;
                    }
                }
                Some(None) => {}
            }
        }
    }

    fn want_of(&self, name: &str) -> Option<Want> {
        let a = self.assignments.as_ref()?;
        a.assignments
            .iter()
            .find(|x| x.instance.as_ref().is_some_and(|i| i.name == name))
            .map(want)
    }

    /// One pass over every instance assigned here or present here.
    fn reconcile(&mut self) {
        let Some(set) = self.assignments.clone() else {
            // Nothing is known of the desired state yet: touch nothing.
            return;
        };
        let mut assigned: BTreeMap<String, &pb::Assignment> = BTreeMap::new();
        for a in &set.assignments {
            if let Some(i) = &a.instance {
                assigned.insert(i.name.clone(), a);
            }
        }
        let mut names: HashSet<String> = assigned.keys().cloned().collect();
        names.extend(self.vms.keys().cloned());
        let dirs: HashMap<String, Layout> = instance_dirs(&self.cfg)
            .into_iter()
            .map(|(n, l)| (n.to_string(), l))
            .collect();
        names.extend(dirs.keys().cloned());
        let lease_valid = self.shared.lease_valid();
        for (name, (migration, view)) in &self.outgoing {
            use crate::migrate::StoreView;
            let now = match assigned.get(name) {
                Some(a) => match a.migration.as_ref() {
                    Some(m) if &m.migration == migration => StoreView::Active(m.clone()),
                    _ => StoreView::Ended { here: true },
                },
                None => StoreView::Ended { here: false },
            };
            view.send_if_modified(|v| {
                if *v == now {
                    return false;
                }
                if matches!(now, StoreView::Ended { .. }) {
                    tracing::info!(instance = %name, %migration, store = ?now, "the migration ended in the store");
                }
                *v = now;
                true
            });
        }
        for name in names {
            if self.busy.contains(&name) {
                continue;
            }
            let a = assigned.get(&name).copied();
            let w = a.map(want);
            if let (Some(w), Some(e)) = (&w, self.exits.get_mut(&name))
                && e.generation.is_none()
            {
                e.generation = Some(w.generation);
            }
            let have = self.vms.get(&name).map(|v| Have {
                boot_count: v.record.boot_count,
                fenced: v.fenced,
                incoming: v.incoming,
            });
            let action = decide(
                w.as_ref(),
                have.as_ref(),
                self.exits.get(&name),
                lease_valid,
                dirs.contains_key(&name),
            );
            self.act(&name, action, a, w);
        }
    }

    /// Sends a migration report in the background; one that does not get
    /// through (other than a refusal: the migration is over) is sent again
    /// on a later pass.
    fn report_migration(&self, req: pb::ReportMigrationRequest) {
        let (ctl, tx) = (self.ctl.clone(), self.tx.clone());
        tokio::spawn(async move {
            match crate::migrate::report(&ctl, req.clone()).await {
                Ok(()) => {}
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
                Err(s) => {
                    tracing::warn!(error = %s.message(), "migration report did not reach the controllers; will retry");
                    let _ = tx.send(Event::MigrationReportFailed {
                        migration: req.migration,
                    });
                }
            }
        });
    }

    fn act(&mut self, name: &str, action: Action, a: Option<&pb::Assignment>, w: Option<Want>) {
        let generation = w.map_or(0, |w| w.generation);
        match action {
            Action::Nothing => {}
            Action::Report(state, reason) => {
                if self.reported.get(name) == Some(&(state, generation)) {
                    return;
                }
                self.reported.insert(name.to_owned(), (state, generation));
                tracing::info!(instance = %name, state = ?state, %reason, "reporting");
                // The boot the report is about: the running VM's, else the
                // instance's current one.
                let boot_count = self
                    .vms
                    .get(name)
                    .map(|v| v.record.boot_count)
                    .or(w.map(|w| w.boot_count))
                    .unwrap_or(0);
                let (ctl, node, tx, name) = (
                    self.ctl.clone(),
                    self.cfg.node_name(),
                    self.tx.clone(),
                    name.to_owned(),
                );
                tokio::spawn(async move {
                    if let Err(s) = report(&ctl, &node, &name, state, &reason, boot_count).await {
                        tracing::warn!(instance = %name, error = %s.message(), "report did not reach the controllers; will retry");
                        let _ = tx.send(Event::ReportFailed { name });
                    }
                });
            }
            Action::Start | Action::Restart => {
                let Some(a) = a.cloned() else { return };
                let Ok(parsed) = InstanceName::parse(name) else {
                    tracing::warn!(instance = %name, "assignment with an invalid instance name; ignoring it");
                    return;
                };
                self.exits.remove(name);
                let old = if action == Action::Restart {
                    self.vms.get(name).cloned()
                } else {
                    None
                };
                let ctx = self.ctx();
                self.spawn_op(name, async move {
                    if let Some(vm) = old {
                        stop_vm(&vm, None).await;
                    }
                    match start_vm(&ctx, &parsed, &a).await {
                        Ok((vm, child)) => Outcome::Started(Box::new(vm), Some(child)),
                        Err(why) => Outcome::StartFailed(why),
                    }
                });
            }
            Action::Incoming => {
                let Some(a) = a.cloned() else { return };
                let Some(m) = a.migration.clone() else { return };
                if !self.migrations_seen.insert(m.migration.clone()) {
                    return;
                }
                let Ok(parsed) = InstanceName::parse(name) else {
                    return;
                };
                self.exits.remove(name);
                let ctx = self.ctx();
                self.spawn_op(name, async move {
                    match crate::migrate::receive(&ctx, &parsed, &a, &m).await {
                        Ok((vm, child)) => Outcome::Started(Box::new(vm), Some(child)),
                        Err(why) => Outcome::StartFailed(why),
                    }
                });
            }
            Action::Migrate => {
                let Some(m) = a.and_then(|a| a.migration.clone()) else {
                    return;
                };
                let Some(vm) = self.vms.get(name).cloned() else {
                    return;
                };
                if !self.migrations_seen.insert(m.migration.clone()) {
                    return;
                }
                let (view_tx, view) = watch::channel(crate::migrate::StoreView::Active(m.clone()));
                self.outgoing
                    .insert(name.to_owned(), (m.migration.clone(), view_tx));
                let ctx = self.ctx();
                self.spawn_op(name, async move {
                    match crate::migrate::send(&ctx, &vm, &m, view).await {
                        crate::migrate::Sent::Moved => Outcome::Migrated,
                        crate::migrate::Sent::Stayed | crate::migrate::Sent::Lost => {
                            Outcome::Unchanged
                        }
                    }
                });
            }
            Action::MigrationArrived => {
                let Some(m) = a.and_then(|a| a.migration.clone()) else {
                    return;
                };
                if !self.migration_reported.insert(m.migration.clone()) {
                    return;
                }
                tracing::info!(instance = %name, migration = %m.migration, "the migrated VM runs here; telling the controllers");
                self.report_migration(pb::ReportMigrationRequest {
                    node: self.cfg.node_name(),
                    migration: m.migration,
                    completed: true,
                    ..Default::default()
                });
            }
            Action::SettleIncoming => {
                let Some(m) = a.and_then(|a| a.migration.clone()) else {
                    return;
                };
                let Some(vm) = self.vms.get(name).cloned() else {
                    return;
                };
                let (ctl, node) = (self.ctl.clone(), self.cfg.node_name());
                self.spawn_op(name, async move {
                    match crate::migrate::settle(
                        &ctl,
                        &node,
                        &m.migration,
                        &vm.layout,
                        vm.record.pid,
                    )
                    .await
                    {
                        Ok(true) => Outcome::Unchanged,
                        Ok(false) => {
                            let _ = std::fs::remove_file(vm.layout.state());
                            Outcome::Stopped
                        }
                        Err(why) => {
                            tracing::warn!(migration = %m.migration, %why, "cannot settle the in-doubt migration yet");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            Outcome::Unchanged
                        }
                    }
                });
            }
            Action::MigrationFailed(reason) => {
                let Some(m) = a.and_then(|a| a.migration.clone()) else {
                    return;
                };
                if !self.migration_reported.insert(m.migration.clone()) {
                    return;
                }
                // The incoming VMM ended: if it wrote its arrival file, the
                // VM ran here (and died after): the switchover happened.
                let arrived = InstanceName::parse(name)
                    .is_ok_and(|n| Layout::new(&self.cfg.data_dir, &n).arrival().exists());
                if arrived {
                    tracing::warn!(instance = %name, migration = %m.migration, %reason, "the migrated VM ran here, then its VMM ended");
                } else {
                    tracing::warn!(instance = %name, migration = %m.migration, %reason, "the migration cannot go on here");
                }
                self.report_migration(pb::ReportMigrationRequest {
                    node: self.cfg.node_name(),
                    migration: m.migration,
                    failed: !arrived,
                    completed: arrived,
                    reason,
                    ..Default::default()
                });
            }
            Action::Resume => {
                let Some(vm) = self.vms.get(name).cloned() else {
                    return;
                };
                let shared = self.shared.clone();
                self.spawn_op(name, async move {
                    let c = VmmClient::new(&vm.layout.api_socket());
                    let until = shared.lease_until_ms.load(Ordering::SeqCst);
                    if until > 0 {
                        let _ = c.lease(until).await;
                    }
                    match c.resume().await {
                        Ok(()) => {
                            tracing::info!(
                                pid = vm.record.pid,
                                "resumed a fenced VM: its assignment still says RUNNING here"
                            );
                            Outcome::Resumed
                        }
                        Err(e) => {
                            tracing::warn!(error = %error_chain(&e), "cannot resume a fenced VM");
                            Outcome::Unchanged
                        }
                    }
                });
            }
            Action::Stop(graceful) => {
                let Some(vm) = self.vms.get(name).cloned() else {
                    return;
                };
                self.spawn_op(name, async move {
                    stop_vm(&vm, graceful).await;
                    Outcome::Stopped
                });
            }
            Action::Delete { .. } => {
                let Ok(parsed) = InstanceName::parse(name) else {
                    return;
                };
                let vm = self.vms.get(name).cloned();
                self.exits.remove(name);
                let layout = Layout::new(&self.cfg.data_dir, &parsed);
                self.spawn_op(name, async move {
                    if let Some(vm) = &vm {
                        stop_vm(vm, None).await;
                    }
                    if let Err(e) = instance::delete_tap(&parsed.tap()).await {
                        tracing::warn!(error = %error_chain(&e), "cannot delete the instance's tap");
                    }
                    match tokio::fs::remove_dir_all(&layout.dir).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(dir = %layout.dir.display(), error = %e, "cannot remove the instance directory");
                            return Outcome::Unchanged;
                        }
                    }
                    // The project directory goes when it is empty.
                    if let Some(p) = layout.dir.parent() {
                        let _ = tokio::fs::remove_dir(p).await;
                    }
                    tracing::info!(instance = %parsed, "released");
                    Outcome::Deleted
                });
            }
        }
    }

    fn spawn_op(
        &mut self,
        name: &str,
        op: impl std::future::Future<Output = Outcome> + Send + 'static,
    ) {
        self.busy.insert(name.to_owned());
        let tx = self.tx.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let outcome = op.await;
            let _ = tx.send(Event::Done { name, outcome });
        });
    }

    fn ctx(&self) -> StartContext {
        StartContext {
            cfg: self.cfg.clone(),
            ctl: self.ctl.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Publishes the VM table for the heartbeat and the gRPC service.
    fn publish(&self) {
        let view: BTreeMap<String, VmView> = self
            .vms
            .iter()
            .map(|(n, v)| {
                let state =
                    if v.incoming || (self.busy.contains(n) && !self.outgoing.contains_key(n)) {
                        InstanceState::Starting
                    } else if v.fenced {
                        InstanceState::Stopped
                    } else {
                        InstanceState::Running
                    };
                (
                    n.clone(),
                    VmView {
                        pid: v.record.pid,
                        layout: v.layout.clone(),
                        state,
                    },
                )
            })
            .collect();
        *self.shared.vms.lock().unwrap_or_else(|e| e.into_inner()) = view;
    }
}

fn want(a: &pb::Assignment) -> Want {
    let i = a.instance.clone().unwrap_or_default();
    Want {
        desired: DesiredState::try_from(a.desired).unwrap_or(DesiredState::Unspecified),
        state: InstanceState::try_from(i.state).unwrap_or(InstanceState::Unspecified),
        boot_count: i.boot_count,
        generation: i.generation,
        stop_timeout: a
            .stop_timeout
            .and_then(|d| {
                Some(Duration::new(
                    u64::try_from(d.seconds).ok()?,
                    u32::try_from(d.nanos).ok()?,
                ))
            })
            .unwrap_or(Duration::from_secs(30))
            .min(Duration::from_secs(3600)),
        role: match &a.migration {
            Some(m) if m.role == pb::MigrationRole::MigrationSource as i32 => Role::Source {
                ready: !m.peer_address.is_empty(),
            },
            Some(m) if m.role == pb::MigrationRole::MigrationTarget as i32 => Role::Target {
                decided: m.decided,
                in_doubt: m.in_doubt,
            },
            _ => Role::None,
        },
    }
}

/// Every `<data-dir>/instances/<project>/<instance>/` with a valid name.
fn instance_dirs(cfg: &AgentConfig) -> Vec<(InstanceName, Layout)> {
    let mut out = Vec::new();
    let Ok(projects) = std::fs::read_dir(cfg.instances_dir()) else {
        return out;
    };
    for p in projects.flatten() {
        let Ok(instances) = std::fs::read_dir(p.path()) else {
            continue;
        };
        for i in instances.flatten() {
            if !i.path().is_dir() {
                continue;
            }
            let name = format!(
                "projects/{}/instances/{}",
                p.file_name().to_string_lossy(),
                i.file_name().to_string_lossy()
            );
            if let Ok(n) = InstanceName::parse(&name) {
                let l = Layout::new(&cfg.data_dir, &n);
                out.push((n, l));
            }
        }
    }
    out
}

pub(crate) fn failure_with_log(layout: &Layout, how: String) -> Exit {
    let log = instance::tail_text(&layout.vmm_log(), REASON_BYTES);
    let failure = if log.is_empty() {
        how
    } else {
        format!("{how}: {log}")
    };
    Exit {
        failure: Some(failure),
        generation: None,
    }
}

/// How a VM that was not this process's child ended, from its log: an
/// error line means it failed; otherwise it is taken as powered off (a
/// process killed from outside leaves no trace either).
fn exit_from_log(layout: &Layout, generation: Option<u64>) -> Exit {
    let log = instance::tail_text(&layout.vmm_log(), REASON_BYTES);
    // An error, or its seccomp filter stopping it (a bug or an escape).
    let failed = log
        .lines()
        .any(|l| l.contains("neph-vmm: error:") || l.contains("which its seccomp filter forbids"));
    Exit {
        failure: failed.then(|| format!("the VMM failed: {log}")),
        generation,
    }
}

async fn report(
    ctl: &Controllers,
    node: &str,
    instance: &str,
    state: ReportedState,
    reason: &str,
    boot_count: u64,
) -> Result<(), tonic::Status> {
    let req = pb::ReportInstanceStateRequest {
        node: node.to_owned(),
        instance: instance.to_owned(),
        state: state as i32,
        reason: reason.to_owned(),
        boot_count,
    };
    ctl.call(|mut c| {
        let req = req.clone();
        async move { c.report_instance_state(req).await }
    })
    .await
    .map(|r| {
        if let Some(i) = r.into_inner().instance {
            tracing::debug!(instance = %i.name, state = i.state, "controllers took the report");
        }
    })
}

pub(crate) struct StartContext {
    pub(crate) cfg: Arc<AgentConfig>,
    pub(crate) ctl: Controllers,
    pub(crate) shared: Arc<Shared>,
}

/// What an assignment gives a VM about to run here, started or received.
pub(crate) struct Prepared {
    pub(crate) instance: nephele_proto::compute::v1::Instance,
    pub(crate) res: nephele_proto::compute::v1::Resources,
    pub(crate) layout: Layout,
    pub(crate) files: instance::ImageFiles,
}

/// Checks the assignment, makes the instance's directory and finds its
/// image files. Errors are failure reasons for the controllers.
pub(crate) async fn prepare(
    ctx: &StartContext,
    name: &InstanceName,
    a: &pb::Assignment,
) -> Result<Prepared, String> {
    let cfg = &ctx.cfg;
    let instance = a
        .instance
        .clone()
        .ok_or_else(|| PrepareError::Assignment("no instance".into()).to_string())?;
    let image = a
        .image
        .clone()
        .ok_or_else(|| PrepareError::Assignment("no image record".into()).to_string())?;
    let res = instance.resources.unwrap_or_default();
    let layout = Layout::new(&cfg.data_dir, name);
    layout.check_socket_paths().map_err(|e| e.to_string())?;
    tokio::fs::create_dir_all(&layout.dir)
        .await
        .map_err(|e| PrepareError::Io(layout.dir.clone(), e).to_string())?;
    crate::image::ensure(
        &cfg.image_dir,
        &ctx.ctl,
        &cfg.node_name(),
        &image,
        &ctx.shared.image_fetch,
    )
    .await?;
    let files = instance::image_files(&cfg.image_dir, &instance.image, &image.format)
        .map_err(|e| e.to_string())?;
    Ok(Prepared {
        instance,
        res,
        layout,
        files,
    })
}

/// Creates the instance's tap (when the node has a bridge) and says what
/// `neph-vmm` runs: `files` and `disk` from [`prepare`].
pub(crate) async fn vm_spec(
    cfg: &AgentConfig,
    name: &InstanceName,
    instance: &nephele_proto::compute::v1::Instance,
    files: instance::ImageFiles,
    disk: Option<PathBuf>,
) -> Result<VmSpec, String> {
    let res = instance.resources.unwrap_or_default();
    let tap = match &cfg.bridge {
        Some(bridge) => {
            let tap = name.tap();
            instance::create_tap(&tap, bridge)
                .await
                .map_err(|e| e.to_string())?;
            Some(tap)
        }
        None => None,
    };
    let spec = VmSpec {
        image: instance.image.clone(),
        kernel: files.kernel,
        initrd: files.initrd,
        cmdline: files.cmdline,
        vcpus: res.vcpus.max(1),
        memory_mib: res.memory_mib,
        disk,
        tap,
        mac: name.mac(),
    };
    Ok(spec)
}

/// Prepares the instance's directory, disk and tap and spawns `neph-vmm`
/// detached (its own process group, output to `vmm.log`); reports
/// STARTING, waits until the control socket answers, hands it the lease,
/// reports RUNNING. Errors are failure reasons for the controllers.
async fn start_vm(
    ctx: &StartContext,
    name: &InstanceName,
    a: &pb::Assignment,
) -> Result<(Vm, tokio::process::Child), String> {
    let cfg = &ctx.cfg;
    let Prepared {
        instance,
        res,
        layout,
        files,
    } = prepare(ctx, name, a).await?;
    let disk_path = layout.disk();
    let seed = files.disk.clone();
    let disk_gib = res.disk_gib;
    let disk = tokio::task::spawn_blocking(move || {
        instance::prepare_disk(&disk_path, disk_gib, seed.as_deref())
    })
    .await
    .map_err(|e| format!("disk preparation stopped: {e}"))?
    .map_err(|e| error_chain(&e))?;
    let spec = vm_spec(cfg, name, &instance, files, disk).await?;
    if instance.state != InstanceState::Starting as i32
        && let Err(s) = report(
            &ctx.ctl,
            &cfg.node_name(),
            &name.to_string(),
            ReportedState::ReportedStarting,
            "",
            instance.boot_count,
        )
        .await
    {
        tracing::debug!(error = %s.message(), "STARTING report failed; RUNNING follows");
    }
    let (child, pid, start_ticks) = spawn_vmm(
        &cfg.vmm,
        &cfg.node_id,
        cfg.vmm_user.as_deref(),
        &layout,
        &spec,
    )?;
    let record = VmRecord {
        version: instance::RECORD_VERSION,
        name: name.to_string(),
        pid,
        start_ticks,
        boot_count: instance.boot_count,
        spec,
        incoming: false,
    };
    let mut child = child;
    if let Err(e) = record.save(&layout.state()) {
        host::kill(pid);
        let _ = child.wait().await;
        return Err(error_chain(&e));
    }
    let client = VmmClient::new(&layout.api_socket());
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let _ = std::fs::remove_file(layout.state());
            return Err(
                failure_with_log(&layout, format!("the VMM exited at start ({status})"))
                    .failure
                    .unwrap_or_default(),
            );
        }
        if client.status().await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            host::kill(pid);
            let _ = child.wait().await;
            let _ = std::fs::remove_file(layout.state());
            return Err(failure_with_log(
                &layout,
                format!("the VMM did not answer within {START_TIMEOUT:?}"),
            )
            .failure
            .unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let until = ctx.shared.lease_until_ms.load(Ordering::SeqCst);
    if until > 0
        && let Err(e) = client.lease(until).await
    {
        tracing::warn!(error = %error_chain(&e), "cannot hand the new VM its lease");
    }
    tracing::info!(instance = %name, pid, "VM started");
    if let Err(s) = report(
        &ctx.ctl,
        &cfg.node_name(),
        &name.to_string(),
        ReportedState::ReportedRunning,
        "",
        instance.boot_count,
    )
    .await
    {
        tracing::warn!(error = %s.message(), "RUNNING report failed; the reconciler repeats it");
    }
    Ok((
        Vm {
            record,
            layout,
            fenced: false,
            child: true,
            incoming: false,
        },
        child,
    ))
}

/// The VMM's cgroup under `nephele/`: `<node>/<project>/<instance>`, so
/// two copies of one VM on a host (a local migration) get one each.
pub(crate) fn cgroup_name(node: &str, layout: &Layout) -> String {
    let clean = |c: &str| -> String {
        let c: String = c
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() || "_-".contains(ch) {
                    ch
                } else {
                    '_'
                }
            })
            .collect();
        if c.is_empty() { "_".into() } else { c }
    };
    let mut parts: Vec<String> = layout
        .dir
        .components()
        .rev()
        .take(2)
        .map(|c| clean(&c.as_os_str().to_string_lossy()))
        .collect();
    parts.push(clean(node));
    parts.reverse();
    parts.join("/")
}

fn spawn_vmm(
    vmm: &std::path::Path,
    node: &str,
    user: Option<&str>,
    layout: &Layout,
    spec: &VmSpec,
) -> Result<(tokio::process::Child, u32, u64), String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.vmm_log())
        .map_err(|e| format!("cannot open {}: {e}", layout.vmm_log().display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", layout.vmm_log().display()))?;
    let mut cmd = tokio::process::Command::new(vmm);
    cmd.arg("--kernel").arg(&spec.kernel);
    if let Some(i) = &spec.initrd {
        cmd.arg("--initrd").arg(i);
    }
    if let Some(c) = &spec.cmdline {
        cmd.arg("--cmdline").arg(c);
    }
    cmd.args(["--cpus", &spec.vcpus.to_string()])
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
    // The sandbox: seccomp is on by default; a cgroup needs root (the
    // VMM warns and runs on where the host has no memory and cpu
    // controllers).
    if let Some(u) = user {
        cmd.args(["--user", u]);
    }
    if host::is_root() {
        cmd.arg("--cgroup").arg(cgroup_name(node, layout));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        // Its own process group: a signal to the agent's group (Ctrl-C,
        // a service manager stopping the agent) never reaches the VMs.
        .process_group(0)
        .kill_on_drop(false);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", vmm.display()))?;
    let pid = child
        .id()
        .ok_or("the VMM ended before it could be watched")?;
    let start_ticks = host::proc_stat(pid).map_or(0, |s| s.start_ticks);
    Ok((child, pid, start_ticks))
}

/// Stops a VM: a graceful shutdown for `graceful` first if given, then
/// `stop`, then SIGKILL; returns once the process is gone (or after the
/// last resort). Removes its state record.
async fn stop_vm(vm: &Vm, graceful: Option<Duration>) {
    let c = VmmClient::new(&vm.layout.api_socket());
    let (pid, start) = (vm.record.pid, vm.record.start_ticks);
    let gone = |within: Duration| async move {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if !host::alive(pid, start) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        !host::alive(pid, start)
    };
    let mut done = !host::alive(pid, start);
    if !done && vm.incoming {
        // It serves no control socket until its VM arrives; it holds
        // nothing yet.
        host::kill(pid);
        done = gone(STOP_GRACE).await;
    }
    if !done && let Some(t) = graceful {
        match c.shutdown(t).await {
            Ok(()) => done = gone(t + Duration::from_secs(2)).await,
            Err(e) => {
                tracing::info!(error = %error_chain(&e), "graceful shutdown refused; stopping")
            }
        }
    }
    if !done {
        let _ = c.stop().await;
        done = gone(STOP_GRACE).await;
    }
    if !done {
        tracing::warn!(pid, "VMM did not stop; killing it");
        host::kill(pid);
        let _ = gone(STOP_GRACE).await;
    }
    let _ = std::fs::remove_file(vm.layout.state());
}

/// An error and its sources, one sentence.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Where the heartbeat reads each VM's CPU time and memory.
pub fn vm_pids(shared: &Shared) -> Vec<(String, u32, InstanceState)> {
    shared
        .vms()
        .into_iter()
        .map(|(n, v)| (n, v.pid, v.state))
        .collect()
}

/// The paths of the VMs' control sockets, to renew their leases.
pub fn control_sockets(shared: &Shared) -> Vec<PathBuf> {
    shared
        .vms()
        .values()
        .map(|v| v.layout.api_socket())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(desired: DesiredState, state: InstanceState) -> Want {
        Want {
            desired,
            state,
            boot_count: 1,
            generation: 5,
            stop_timeout: Duration::from_secs(3),
            role: Role::None,
        }
    }
    const UP: Have = Have {
        boot_count: 1,
        fenced: false,
        incoming: false,
    };
    const FENCED: Have = Have {
        boot_count: 1,
        fenced: true,
        incoming: false,
    };
    const INCOMING: Have = Have {
        boot_count: 1,
        fenced: false,
        incoming: true,
    };

    #[test]
    fn migrations_receive_send_and_fail() {
        use DesiredState::DesiredRunning as R;
        use InstanceState as S;
        let role = |role| Want {
            role,
            ..w(R, S::Migrating)
        };
        let target = |decided, in_doubt| Role::Target { decided, in_doubt };
        // Target: start --incoming, then wait; its VMM's end fails it.
        assert_eq!(
            decide(Some(&role(target(false, false))), None, None, true, false),
            Action::Incoming
        );
        for decided in [false, true] {
            assert_eq!(
                decide(
                    Some(&role(target(decided, false))),
                    Some(&INCOMING),
                    None,
                    true,
                    true
                ),
                Action::Nothing
            );
        }
        let killed = Exit {
            failure: Some("killed".into()),
            generation: Some(5),
        };
        assert_eq!(
            decide(
                Some(&role(target(true, false))),
                None,
                Some(&killed),
                true,
                true
            ),
            Action::MigrationFailed("killed".into())
        );
        // Decided and arrived (its control socket answers): say so. In
        // doubt and not arrived: settle it; arrived: say so.
        assert_eq!(
            decide(
                Some(&role(target(true, false))),
                Some(&UP),
                None,
                true,
                true
            ),
            Action::MigrationArrived
        );
        assert_eq!(
            decide(
                Some(&role(target(false, false))),
                Some(&UP),
                None,
                true,
                true
            ),
            Action::Nothing
        );
        assert_eq!(
            decide(
                Some(&role(target(true, true))),
                Some(&INCOMING),
                None,
                true,
                true
            ),
            Action::SettleIncoming
        );
        assert_eq!(
            decide(Some(&role(target(true, true))), Some(&UP), None, true, true),
            Action::MigrationArrived
        );
        // Source: send once the target listens, never while fenced, and
        // a migrating instance is not reported RUNNING meanwhile.
        assert_eq!(
            decide(
                Some(&role(Role::Source { ready: true })),
                Some(&UP),
                None,
                true,
                true
            ),
            Action::Migrate
        );
        assert_eq!(
            decide(
                Some(&role(Role::Source { ready: false })),
                Some(&UP),
                None,
                true,
                true
            ),
            Action::Nothing
        );
        assert_eq!(
            decide(
                Some(&role(Role::Source { ready: true })),
                Some(&FENCED),
                None,
                false,
                true
            ),
            Action::Nothing
        );
        // After the switchover the target's VM is waited for, not booted.
        assert_eq!(
            decide(Some(&w(R, S::Running)), Some(&INCOMING), None, true, true),
            Action::Nothing
        );
    }

    #[test]
    fn running_assignments_start_keep_resume_and_reboot() {
        use DesiredState::DesiredRunning as R;
        use InstanceState as S;
        assert_eq!(
            decide(Some(&w(R, S::Scheduled)), None, None, true, false),
            Action::Start
        );
        assert_eq!(
            decide(Some(&w(R, S::Starting)), Some(&UP), None, true, true),
            Action::Report(ReportedState::ReportedRunning, String::new())
        );
        assert_eq!(
            decide(Some(&w(R, S::Running)), Some(&UP), None, true, true),
            Action::Nothing
        );
        // A newer boot count: boot again.
        let mut newer = w(R, S::Starting);
        newer.boot_count = 2;
        assert_eq!(
            decide(Some(&newer), Some(&UP), None, true, true),
            Action::Restart
        );
        // Fenced: resumed only with a valid lease.
        assert_eq!(
            decide(Some(&w(R, S::Running)), Some(&FENCED), None, true, true),
            Action::Resume
        );
        assert_eq!(
            decide(Some(&w(R, S::Running)), Some(&FENCED), None, false, true),
            Action::Nothing
        );
        // Still PENDING: nothing.
        assert_eq!(
            decide(
                Some(&w(DesiredState::Unspecified, S::Pending)),
                None,
                None,
                true,
                false
            ),
            Action::Nothing
        );
    }

    #[test]
    fn a_vm_that_ended_by_itself_is_reported_not_rebooted() {
        use DesiredState::DesiredRunning as R;
        use InstanceState as S;
        let off = Exit {
            failure: None,
            generation: Some(5),
        };
        assert_eq!(
            decide(Some(&w(R, S::Running)), None, Some(&off), true, true),
            Action::Report(
                ReportedState::ReportedStopped,
                "the guest powered off".into()
            )
        );
        let crash = Exit {
            failure: Some("vCPU 0 stopped".into()),
            generation: Some(5),
        };
        assert_eq!(
            decide(Some(&w(R, S::Running)), None, Some(&crash), true, true),
            Action::Report(ReportedState::ReportedFailed, "vCPU 0 stopped".into())
        );
        // The controllers started it again since (newer generation).
        let mut again = w(R, S::Starting);
        again.generation = 9;
        assert_eq!(
            decide(Some(&again), None, Some(&crash), true, true),
            Action::Start
        );
        // Running in the store, nothing here, no exit known: boot it.
        assert_eq!(
            decide(Some(&w(R, S::Running)), None, None, true, false),
            Action::Start
        );
    }

    #[test]
    fn stop_and_delete() {
        use DesiredState::{DesiredDeleted as D, DesiredStopped as St};
        use InstanceState as S;
        assert_eq!(
            decide(Some(&w(St, S::Stopping)), Some(&UP), None, true, true),
            Action::Stop(Some(Duration::from_secs(3)))
        );
        assert_eq!(
            decide(Some(&w(St, S::Stopping)), Some(&FENCED), None, true, true),
            Action::Stop(None)
        );
        let now = Want {
            stop_timeout: Duration::ZERO,
            ..w(St, S::Stopping)
        };
        assert_eq!(
            decide(Some(&now), Some(&UP), None, true, true),
            Action::Stop(None)
        );
        assert_eq!(
            decide(Some(&w(St, S::Stopping)), None, None, true, true),
            Action::Report(ReportedState::ReportedStopped, String::new())
        );
        assert_eq!(
            decide(Some(&w(St, S::Stopped)), None, None, true, true),
            Action::Nothing
        );
        assert_eq!(
            decide(Some(&w(St, S::Error)), None, None, true, true),
            Action::Nothing
        );
        assert_eq!(
            decide(Some(&w(D, S::Deleting)), Some(&UP), None, true, true),
            Action::Delete { report: true }
        );
        assert_eq!(
            decide(Some(&w(D, S::Deleting)), None, None, true, true),
            Action::Delete { report: true }
        );
        assert_eq!(
            decide(Some(&w(D, S::Deleting)), None, None, true, false),
            Action::Report(ReportedState::ReportedDeleted, String::new())
        );
    }

    #[test]
    fn what_is_not_assigned_here_goes() {
        assert_eq!(
            decide(None, Some(&UP), None, true, true),
            Action::Delete { report: false }
        );
        assert_eq!(
            decide(None, None, None, true, true),
            Action::Delete { report: false }
        );
        assert_eq!(decide(None, None, None, true, false), Action::Nothing);
    }
}
