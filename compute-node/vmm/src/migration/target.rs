//! The receiving side of a migration (`neph-vmm --incoming HOST:PORT`):
//! listens, takes one migration stream at a time, builds a VM matching the
//! source's configuration with this node's own disks and taps, fills its
//! memory and disks from the stream, loads the machine state, and hands the
//! VM back to run once the source commits.
//!
//! Every byte from the peer is checked (see [`super::protocol`]). A stream
//! that is not a migration, breaks off, or fails a check is refused with an
//! error on stderr; the half-built VM is dropped and the target goes on
//! listening for the next stream, so a stray or hostile connection cannot
//! take the place of the real migration. Disks named with `--disk` on the
//! target are regular files; each is truncated and resized to the source
//! disk's size (so chunks the source skips as zero read as zero).

use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::protocol::{
    self, Complete, JoinInfo, Kind, LoadedReport, MigrationConfig, ProtocolError, ReadyInfo,
    StreamsInfo,
};
use super::source::{error_chain, memory_checksum};
use super::state::{self, MachineState, MachineStateError};
use super::{MigrationState, MigrationStatus, PhaseClock, Side, describe_phases};
use crate::builder::{StartVmError, build_incoming};
use crate::config::{ConsoleConfig, DiskConfig, MacAddr, NetConfig, VmConfig};
use crate::devices::serial::{Console, RestoreSerialError};
use crate::devices::virtio::pci::RestoreVirtioError;
use crate::vm::Vm;
use crate::vstate::memory::GuestMemoryMmap;

/// Longest wait for the next frame once a stream has started.
const FRAME_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the parked vCPU threads to load their state.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);
/// Transit time larger than this is taken as a clock problem, not as time
/// the guest was away (the guest's clock then jumps by at most this).
const MAX_TRANSIT: Duration = Duration::from_secs(60);

/// An incoming migration failed.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The listening socket.
    #[error("cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
    /// The stream.
    #[error("the migration stream was refused")]
    Protocol(#[from] ProtocolError),
    /// The source's VM does not fit what this side was given.
    #[error("the source's VM does not fit this target: {0}")]
    Mismatch(String),
    /// A target disk.
    #[error("cannot prepare disk {0}")]
    Disk(PathBuf, #[source] std::io::Error),
    /// Building the VM.
    #[error("cannot build the VM")]
    Build(#[from] StartVmError),
    /// Writing guest memory.
    #[error("cannot write guest memory at {0:#x}")]
    Memory(u64),
    /// Machine state.
    #[error("cannot load the machine state")]
    State(#[from] MachineStateError),
    /// Serial state.
    #[error("cannot load the serial port state")]
    Serial(#[from] RestoreSerialError),
    /// A virtio device's state.
    #[error("cannot load the state of virtio device {0}")]
    Virtio(usize, #[source] RestoreVirtioError),
    /// An extra memory stream failed or fell behind.
    #[error("a memory stream failed: {0}")]
    Stream(String),
    /// The arrival file could not be written (the VM is not run).
    #[error("cannot write the arrival file {0}")]
    Arrival(PathBuf, #[source] std::io::Error),
    /// The memory checksum differs.
    #[error("guest memory differs from the source's: checksum {ours:#x}, source {theirs:#x}")]
    Checksum {
        /// Computed here.
        ours: u64,
        /// Sent.
        theirs: u64,
    },
}

/// What the target side is given on its command line.
#[derive(Debug, Clone, Default)]
pub struct IncomingConfig {
    /// Where this target's copy of each disk goes, in the source's order.
    pub disks: Vec<PathBuf>,
    /// This node's taps, in the source's order.
    pub taps: Vec<String>,
    /// Console.
    pub console: ConsoleConfig,
    /// Control socket.
    pub api_socket: Option<PathBuf>,
    /// Written just before the vCPUs first run here (protocol version 3):
    /// whoever freezes this process (SIGSTOP) and finds no such file knows
    /// the VM never ran here and never will if the process is killed.
    pub arrival_file: Option<PathBuf>,
    /// Tests only (`NEPH_VMM_TEST_STALL_AT_COMMIT=1`): on `Complete`, hang
    /// without running the VM, as a target that stalls at the commit, so
    /// tests can see a source in doubt settled through the controllers.
    pub stall_at_commit: bool,
    /// The VM this target expects (vCPUs, memory, rng, and the MACs of
    /// `taps` if given): built before the source connects, so the build is
    /// not part of the migration. A source whose VM differs gets one built
    /// for it after its `Config` (slower, never wrong). `None`: build only
    /// then. Disks are pre-built only when each `disks` file exists with
    /// the source's size (the node agent creates it sparse), because a
    /// block device's size is fixed when it is built.
    pub expect: Option<Expected>,
}

/// The shape of the VM a target pre-builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Whether it has an rng device.
    pub rng: bool,
    /// The MAC of each tap, in order (`None`: derived from the tap name,
    /// as a booted VM would).
    pub macs: Vec<Option<MacAddr>>,
    /// Whether each disk is read-only, in order.
    pub readonly: Vec<bool>,
}

/// Listens on `listen` and returns the VM of the first stream that
/// completes, already running. Failed streams are reported on stderr and
/// the next one is awaited.
pub fn receive(
    listen: &str,
    local: &IncomingConfig,
    console: &Arc<Console>,
) -> Result<Vm, IncomingError> {
    let listener =
        TcpListener::bind(listen).map_err(|e| IncomingError::Listen(listen.to_owned(), e))?;
    eprintln!("neph-vmm: waiting for a migration on {listen}");
    // Built while the source connects (the backlog holds its connection).
    let mut prebuilt = prebuild(local, console);
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("neph-vmm: accepting a migration connection failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        match receive_one(stream, Some(&listener), local, console, &mut prebuilt) {
            Ok((vm, status)) => {
                eprintln!(
                    "neph-vmm: migration from {peer} complete; the VM runs here (switchover: {})",
                    describe_phases(&status.switchover)
                );
                let mut vm = vm;
                vm.set_incoming_status(status);
                return Ok(vm);
            }
            Err(e) => {
                eprintln!(
                    "neph-vmm: refused the migration from {peer}: {}",
                    error_chain(&e)
                );
                // A stream that got as far as the VM used it up.
                if prebuilt.is_none() {
                    prebuilt = prebuild(local, console);
                }
            }
        }
    }
}

/// Builds the VM `local` expects, if it says; `None` (with the reason on
/// stderr) when it cannot be built ahead.
fn prebuild(local: &IncomingConfig, console: &Arc<Console>) -> Option<Vm> {
    let e = local.expect.as_ref()?;
    if e.macs.len() != local.taps.len() || e.readonly.len() != local.disks.len() {
        return None;
    }
    let config = local_config(local, e, PathBuf::new(), None, String::new());
    match build_incoming(config, console.clone()) {
        Ok(vm) => Some(vm),
        Err(e) => {
            eprintln!(
                "neph-vmm: the VM is built when the source connects, not ahead: {}",
                error_chain(&e)
            );
            None
        }
    }
}

/// Whether a pre-built VM is the one `want` describes, with disks of
/// `capacities`.
fn fits(vm: &Vm, want: &VmConfig, capacities: &[u64]) -> bool {
    let have = vm.config();
    have.vcpus == want.vcpus
        && have.memory_mib == want.memory_mib
        && have.rng == want.rng
        && have.disks == want.disks
        && vm.disk_capacities() == capacities
        && have.nets.len() == want.nets.len()
        && have
            .nets
            .iter()
            .zip(&want.nets)
            .all(|(a, b)| a.tap == b.tap && a.effective_mac() == b.effective_mac())
}

/// Handles one stream to its end: the VM, started, and the report of the
/// migration. Takes the pre-built VM out of `prebuilt` once the source's
/// configuration has arrived (whether or not it fits).
pub fn receive_one(
    stream: TcpStream,
    listener: Option<&TcpListener>,
    local: &IncomingConfig,
    console: &Arc<Console>,
    prebuilt: &mut Option<Vm>,
) -> Result<(Vm, MigrationStatus), IncomingError> {
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(FRAME_TIMEOUT))
        .map_err(ProtocolError::Io)?;
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let mut w = stream.try_clone().map_err(ProtocolError::Io)?;
    let mut r = BufReader::with_capacity(4 << 20, stream);
    let result = Receiver::new(local, console, listener).run(&mut r, &mut w, prebuilt, &peer);
    if let Err(e) = &result
        && !matches!(e, IncomingError::Protocol(ProtocolError::Aborted(_)))
    {
        let _ = protocol::write_frame(&mut w, Kind::Error, error_chain(e).as_bytes());
    }
    result
}

struct Receiver<'a> {
    local: &'a IncomingConfig,
    console: &'a Arc<Console>,
    /// Where extra memory streams connect (none: one stream only).
    listener: Option<&'a TcpListener>,
}

/// The config for the target's VM: the source's machine with this node's
/// backends.
fn target_config(cfg: &MigrationConfig, local: &IncomingConfig) -> Result<VmConfig, IncomingError> {
    if cfg.disks.len() != local.disks.len() {
        return Err(IncomingError::Mismatch(format!(
            "the source has {} disks, this target was given {} (--disk)",
            cfg.disks.len(),
            local.disks.len()
        )));
    }
    if cfg.nets.len() != local.taps.len() {
        return Err(IncomingError::Mismatch(format!(
            "the source has {} network interfaces, this target was given {} (--net)",
            cfg.nets.len(),
            local.taps.len()
        )));
    }
    let shape = Expected {
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
        rng: cfg.rng,
        macs: cfg.nets.iter().map(|m| Some(MacAddr(*m))).collect(),
        readonly: cfg.disks.iter().map(|d| d.readonly).collect(),
    };
    let config = local_config(
        local,
        &shape,
        PathBuf::from(&cfg.kernel),
        cfg.initrd.as_ref().map(PathBuf::from),
        cfg.cmdline.clone(),
    );
    config
        .validate()
        .map_err(|e| IncomingError::Mismatch(error_chain(&e)))?;
    Ok(config)
}

/// A VM of `shape` on this target's backends (its disks, taps, console and
/// control socket, paired in order with the shape's disks and MACs).
fn local_config(
    local: &IncomingConfig,
    shape: &Expected,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
) -> VmConfig {
    VmConfig {
        kernel,
        initrd,
        cmdline,
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        disks: local
            .disks
            .iter()
            .zip(&shape.readonly)
            .map(|(path, ro)| DiskConfig {
                path: path.clone(),
                readonly: *ro,
            })
            .collect(),
        nets: local
            .taps
            .iter()
            .zip(&shape.macs)
            .map(|(tap, mac)| NetConfig {
                tap: tap.clone(),
                mac: *mac,
            })
            .collect(),
        console: local.console.clone(),
        api_socket: local.api_socket.clone(),
        rng: shape.rng,
    }
}

fn prepare_disk(path: &PathBuf, capacity: u64) -> Result<File, IncomingError> {
    let err = |e| IncomingError::Disk(path.clone(), e);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(err)?;
    if !f.metadata().map_err(err)?.is_file() {
        return Err(err(std::io::Error::other(
            "a migration target disk must be a regular file",
        )));
    }
    f.set_len(0).map_err(err)?;
    f.set_len(capacity).map_err(err)?;
    Ok(f)
}

impl<'a> Receiver<'a> {
    fn new(
        local: &'a IncomingConfig,
        console: &'a Arc<Console>,
        listener: Option<&'a TcpListener>,
    ) -> Self {
        Self {
            local,
            console,
            listener,
        }
    }

    /// `fdatasync`s the disks written since the last call.
    fn sync_disks(&self, files: &[File], unsynced: &mut [bool]) -> Result<(), IncomingError> {
        for (i, (f, dirty)) in files.iter().zip(unsynced.iter_mut()).enumerate() {
            if *dirty {
                f.sync_data()
                    .map_err(|e| IncomingError::Disk(self.local.disks[i].clone(), e))?;
                *dirty = false;
            }
        }
        Ok(())
    }

    fn run(
        &self,
        r: &mut BufReader<TcpStream>,
        w: &mut TcpStream,
        prebuilt: &mut Option<Vm>,
        peer: &str,
    ) -> Result<(Vm, MigrationStatus), IncomingError> {
        let started = Instant::now();
        let version = protocol::read_header(r)?;
        let mut buf = Vec::new();
        let kind = protocol::read_frame(r, &mut buf)?;
        if kind != Kind::Config {
            return Err(unexpected(kind, "Config"));
        }
        let cfg: MigrationConfig = protocol::decode(kind, &buf)?;
        let config = target_config(&cfg, self.local)?;
        let capacities: Vec<u64> = cfg.disks.iter().map(|d| d.capacity).collect();
        let ready = match prebuilt.take() {
            Some(vm) if fits(&vm, &config, &capacities) => Some(vm),
            Some(_) => {
                eprintln!(
                    "neph-vmm: the source's VM ({} vCPUs, {} MiB) is not the one pre-built; \
                     building it now",
                    cfg.vcpus, cfg.memory_mib
                );
                None
            }
            None => None,
        };
        let files = self
            .local
            .disks
            .iter()
            .zip(&capacities)
            .map(|(p, c)| prepare_disk(p, *c))
            .collect::<Result<Vec<_>, _>>()?;
        let mut vm = match ready {
            Some(mut vm) => {
                vm.adopt_boot_files(&config);
                vm
            }
            None => build_incoming(config, self.console.clone())?,
        };
        // The threads start now, parked, off the switchover's path; a
        // failed stream stops them with the VM.
        vm.start_incoming_paused(cfg.boots)?;
        match self.stream(r, w, &mut vm, &cfg, &files, version, peer, started) {
            Ok(status) => Ok((vm, status)),
            Err(e) => {
                vm.discard();
                Err(e)
            }
        }
    }

    /// Memory, disks and state into the started, parked `vm`, up to the
    /// commit (after which the VM runs).
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        r: &mut BufReader<TcpStream>,
        w: &mut TcpStream,
        vm: &mut Vm,
        cfg: &MigrationConfig,
        files: &[File],
        version: u32,
        peer: &str,
        started: Instant,
    ) -> Result<MigrationStatus, IncomingError> {
        let (mem, virtio_count) = {
            let boot = vm
                .boot()
                .ok_or_else(|| IncomingError::Mismatch("no boot was built".into()))?;
            (boot.mem.clone(), boot.virtio.len())
        };
        let session = random_u64();
        let ready = if version >= 2 {
            postcard::to_stdvec(&ReadyInfo {
                session,
                max_streams: protocol::MAX_STREAMS,
            })
            .unwrap_or_default()
        } else {
            Vec::new()
        };
        protocol::write_frame(w, Kind::Ready, &ready).map_err(ProtocolError::Io)?;
        let mut extras = Extras::default();
        let result = self.frames(
            r,
            w,
            vm,
            cfg,
            files,
            version,
            peer,
            started,
            &mem,
            virtio_count,
            session,
            &mut extras,
        );
        // The extra streams' threads end with their connections.
        extras.close();
        result
    }

    /// The frames of the first stream, from `Ready` to the commit.
    #[allow(clippy::too_many_arguments)]
    fn frames(
        &self,
        r: &mut BufReader<TcpStream>,
        w: &mut TcpStream,
        vm: &mut Vm,
        cfg: &MigrationConfig,
        files: &[File],
        version: u32,
        peer: &str,
        started: Instant,
        mem: &GuestMemoryMmap,
        virtio_count: usize,
        session: u64,
        extras: &mut Extras,
    ) -> Result<MigrationStatus, IncomingError> {
        let capacities: Vec<u64> = cfg.disks.iter().map(|d| d.capacity).collect();
        let mut buf = Vec::new();

        let mut machine: Option<MachineState> = None;
        let mut unsynced = vec![false; files.len()];
        let mut scratch = [0u8; protocol::PAGE_SIZE];
        let mut rounds: u32 = 0;
        let mut received: u64 = 0;
        let mut clock = PhaseClock::new();
        loop {
            let kind = protocol::read_frame(r, &mut buf)?;
            received += 5 + buf.len() as u64;
            match kind {
                Kind::Pages => apply_pages(mem, &buf)?,
                Kind::ZeroPages => apply_zero_pages(mem, &buf, &mut scratch)?,
                Kind::Streams if version >= 2 && rounds == 0 && extras.is_empty() => {
                    let info: StreamsInfo = protocol::decode(kind, &buf)?;
                    if !(2..=protocol::MAX_STREAMS).contains(&info.count) {
                        return Err(ProtocolError::Malformed {
                            kind,
                            reason: format!(
                                "{} streams is not 2 to {}",
                                info.count,
                                protocol::MAX_STREAMS
                            ),
                        }
                        .into());
                    }
                    let listener = self.listener.ok_or_else(|| ProtocolError::Malformed {
                        kind,
                        reason: "this target takes one stream".into(),
                    })?;
                    extras.accept(listener, version, session, info.count, mem)?;
                }
                Kind::Sync => {
                    // Disk data goes to stable storage round by round, so
                    // the switchover only waits for the last few chunks.
                    self.sync_disks(files, &mut unsynced)?;
                    rounds = rounds.saturating_add(1);
                    // Every stream has applied its share of the round.
                    extras.wait(rounds)?;
                    protocol::write_frame(w, Kind::Synced, b"").map_err(ProtocolError::Io)?;
                    // The switchover starts after the last Synced.
                    clock = PhaseClock::new();
                }
                Kind::DiskChunk => {
                    let (disk, offset, data) = protocol::parse_disk_chunk(&buf, &capacities)?;
                    files[disk]
                        .write_all_at(data, offset)
                        .map_err(|e| IncomingError::Disk(self.local.disks[disk].clone(), e))?;
                    unsynced[disk] = true;
                }
                Kind::State => {
                    clock.lap("last_pages");
                    let s: MachineState = protocol::decode(kind, &buf)?;
                    s.validate(cfg.vcpus, virtio_count)?;
                    machine = Some(s);
                    clock.lap("decode_state");
                }
                Kind::Complete => {
                    clock.lap("wait_complete");
                    // The extra streams' last pages.
                    extras.wait(rounds.saturating_add(1))?;
                    clock.lap("wait_streams");
                    let c: Complete = protocol::decode(kind, &buf)?;
                    let Some(s) = machine.take() else {
                        return Err(ProtocolError::Malformed {
                            kind,
                            reason: "the machine state has not been sent".into(),
                        }
                        .into());
                    };
                    if let Some(theirs) = c.memory_checksum {
                        let ours = memory_checksum(mem);
                        if ours != theirs {
                            return Err(IncomingError::Checksum { ours, theirs });
                        }
                        eprintln!("neph-vmm: guest memory verified (checksum {ours:#x})");
                        clock.lap("checksum");
                    }
                    self.sync_disks(files, &mut unsynced)?;
                    clock.lap("sync_disks");
                    restore(vm, s, cfg.boots)?;
                    clock.lap("restore");
                    if version >= 3 {
                        if self.local.stall_at_commit {
                            eprintln!(
                                "neph-vmm: test mode: stalling at the commit, the VM does not run"
                            );
                            loop {
                                std::thread::sleep(Duration::from_secs(3600));
                            }
                        }
                        // `Complete` is the commit: run the VM, then say so.
                        if let Some(path) = &self.local.arrival_file {
                            std::fs::write(path, b"arrived\n")
                                .map_err(|e| IncomingError::Arrival(path.clone(), e))?;
                        }
                        vm.resume_incoming();
                        clock.lap("resume");
                        let report = postcard::to_stdvec(&LoadedReport {
                            phases: clock.phases().to_vec(),
                        })
                        .unwrap_or_default();
                        if let Err(e) = protocol::write_frame(w, Kind::Loaded, &report) {
                            // The VM runs here whatever the source heard;
                            // a source that missed this is in doubt until
                            // told.
                            eprintln!(
                                "neph-vmm: the VM runs here but its acknowledgement did not reach the source: {e}"
                            );
                        }
                        vm.announce();
                        return Ok(incoming_status(
                            peer,
                            rounds,
                            received,
                            started,
                            clock.phases(),
                            extras.count(),
                        ));
                    }
                    let report = if version >= 2 {
                        postcard::to_stdvec(&LoadedReport {
                            phases: clock.phases().to_vec(),
                        })
                        .unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    protocol::write_frame(w, Kind::Loaded, &report).map_err(ProtocolError::Io)?;
                    let kind = protocol::read_frame(r, &mut buf)?;
                    clock.lap("wait_commit");
                    return match kind {
                        Kind::Commit => {
                            // The threads are parked: this only wakes them.
                            vm.resume_incoming();
                            clock.lap("resume");
                            vm.announce();
                            Ok(incoming_status(
                                peer,
                                rounds,
                                received,
                                started,
                                clock.phases(),
                                extras.count(),
                            ))
                        }
                        Kind::Abort => Err(ProtocolError::Aborted(
                            String::from_utf8_lossy(&buf).into_owned(),
                        )
                        .into()),
                        other => Err(unexpected(other, "Commit")),
                    };
                }
                Kind::Abort => {
                    return Err(
                        ProtocolError::Aborted(String::from_utf8_lossy(&buf).into_owned()).into(),
                    );
                }
                other => return Err(unexpected(other, "memory, disk or state")),
            }
        }
    }
}

/// What `migrate_status` reports on a target whose VM arrived.
fn incoming_status(
    peer: &str,
    rounds: u32,
    received: u64,
    started: Instant,
    phases: &[super::Phase],
    extra_streams: usize,
) -> MigrationStatus {
    MigrationStatus {
        state: MigrationState::Completed,
        to: peer.to_owned(),
        round: rounds,
        bytes_sent: received,
        bytes_remaining: 0,
        dirty_rate_bps: 0,
        throughput_bps: 0,
        expected_downtime_ms: 0,
        throttle_percent: 0,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        downtime_ms: None,
        downtime_us: None,
        error: None,
        side: Side::Target,
        switchover: phases.to_vec(),
        target_switchover: Vec::new(),
        streams: u8::try_from(extra_streams + 1).unwrap_or(u8::MAX),
        decided: true,
    }
}

/// Whether `gpa` starts a whole guest page.
fn page_ok(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    gpa.is_multiple_of(protocol::PAGE_SIZE as u64)
        && mem.address_in_range(GuestAddress(gpa))
        && gpa
            .checked_add(protocol::PAGE_SIZE as u64 - 1)
            .is_some_and(|end| mem.address_in_range(GuestAddress(end)))
}

/// A random session id (std's hasher keys come from the OS's randomness).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    h.finish()
}

/// How far each extra stream has got: `Sync`s applied, or why it failed.
#[derive(Debug, Default)]
struct Progress {
    syncs: Vec<u32>,
    failed: Option<String>,
}

/// The extra memory streams of a migration and their reader threads.
#[derive(Debug, Default)]
struct Extras {
    progress: Arc<(Mutex<Progress>, Condvar)>,
    /// Clones of the connections, to end the readers.
    streams: Vec<TcpStream>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Longest wait for the extra streams to connect or to catch up.
const EXTRA_TIMEOUT: Duration = Duration::from_secs(30);

impl Extras {
    fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    fn count(&self) -> usize {
        self.streams.len()
    }

    /// Accepts the `count - 1` extra streams of `session` on `listener`;
    /// other connections meanwhile are closed with an error.
    fn accept(
        &mut self,
        listener: &TcpListener,
        version: u32,
        session: u64,
        count: u8,
        mem: &GuestMemoryMmap,
    ) -> Result<(), IncomingError> {
        let want = usize::from(count) - 1;
        let mut joined: Vec<Option<TcpStream>> = (0..want).map(|_| None).collect();
        let deadline = Instant::now() + EXTRA_TIMEOUT;
        listener.set_nonblocking(true).map_err(ProtocolError::Io)?;
        let result = loop {
            if joined.iter().all(Option::is_some) {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(IncomingError::Protocol(ProtocolError::Malformed {
                    kind: Kind::Streams,
                    reason: format!("{want} extra streams did not all join in time"),
                }));
            }
            let (stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => break Err(ProtocolError::Io(e).into()),
            };
            match join(stream, version, session, want) {
                Ok((index, stream)) if joined[index].is_none() => joined[index] = Some(stream),
                Ok((index, _)) => eprintln!(
                    "neph-vmm: refused a second extra stream {} from {peer}",
                    index + 1
                ),
                Err((e, mut stream)) => {
                    eprintln!(
                        "neph-vmm: refused a connection from {peer} during a migration: {}",
                        error_chain(&e)
                    );
                    let _ =
                        protocol::write_frame(&mut stream, Kind::Error, e.to_string().as_bytes());
                }
            }
        };
        let _ = listener.set_nonblocking(false);
        result?;
        {
            let mut p = self.progress.0.lock().unwrap_or_else(|e| e.into_inner());
            p.syncs = vec![0; want];
        }
        for (i, stream) in joined.into_iter().flatten().enumerate() {
            let keep = stream.try_clone().map_err(ProtocolError::Io)?;
            let progress = self.progress.clone();
            let mem = mem.clone();
            let thread = std::thread::Builder::new()
                .name(format!("mig-stream{}", i + 1))
                .spawn(move || read_extra(stream, i, &mem, &progress))
                .map_err(ProtocolError::Io)?;
            self.streams.push(keep);
            self.threads.push(thread);
        }
        Ok(())
    }

    /// Waits until every extra stream has applied `syncs` rounds.
    fn wait(&self, syncs: u32) -> Result<(), IncomingError> {
        if self.streams.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + EXTRA_TIMEOUT;
        let (lock, changed) = &*self.progress;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(why) = &p.failed {
                return Err(IncomingError::Stream(why.clone()));
            }
            if p.syncs.iter().all(|n| *n >= syncs) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(IncomingError::Stream(
                    "an extra stream did not keep up with the round".into(),
                ));
            }
            p = changed
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Closes the connections and joins the readers.
    fn close(&mut self) {
        for s in &self.streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.streams.clear();
    }
}

/// Reads the header and `Join` of a would-be extra stream: its index (0
/// for the first extra) and the stream, or why it was refused.
fn join(
    stream: TcpStream,
    version: u32,
    session: u64,
    want: usize,
) -> Result<(usize, TcpStream), (ProtocolError, TcpStream)> {
    let mut stream = stream;
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    if let Err(e) = stream.set_read_timeout(Some(FRAME_TIMEOUT)) {
        return Err((e.into(), stream));
    }
    let mut buf = Vec::new();
    let info = (|| {
        let v = protocol::read_header(&mut stream)?;
        let kind = protocol::read_frame(&mut stream, &mut buf)?;
        if kind != Kind::Join {
            return Err(ProtocolError::Unexpected {
                got: kind,
                expected: "Join",
            });
        }
        let info: JoinInfo = protocol::decode(kind, &buf)?;
        let bad = |reason: String| ProtocolError::Malformed {
            kind: Kind::Join,
            reason,
        };
        if v != version {
            return Err(bad(format!("version {v} on a version {version} migration")));
        }
        if info.session != session {
            return Err(bad("the session does not match the migration's".into()));
        }
        let index = usize::from(info.index);
        if index == 0 || index > want {
            return Err(bad(format!("stream {} does not exist", info.index)));
        }
        Ok(index - 1)
    })();
    match info {
        Ok(i) => Ok((i, stream)),
        Err(e) => Err((e, stream)),
    }
}

/// The reader of extra stream `i`: applies pages and counts `Sync`s until
/// the connection ends; a bad frame fails the migration.
fn read_extra(
    stream: TcpStream,
    i: usize,
    mem: &GuestMemoryMmap,
    progress: &(Mutex<Progress>, Condvar),
) {
    crate::sandbox::seccomp::install_or_exit(crate::sandbox::seccomp::ThreadKind::Migration);
    let mut r = BufReader::with_capacity(4 << 20, stream);
    let mut buf = Vec::new();
    let mut page = [0u8; protocol::PAGE_SIZE];
    let result = (|| -> Result<(), IncomingError> {
        loop {
            let kind = match protocol::read_frame(&mut r, &mut buf) {
                Ok(k) => k,
                // The end of the migration (or of the source) closes it.
                Err(ProtocolError::Io(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match kind {
                Kind::Pages => apply_pages(mem, &buf)?,
                Kind::ZeroPages => apply_zero_pages(mem, &buf, &mut page)?,
                Kind::Sync => {
                    let mut p = progress.0.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(n) = p.syncs.get_mut(i) {
                        *n = n.saturating_add(1);
                    }
                    progress.1.notify_all();
                }
                other => return Err(unexpected(other, "pages on an extra stream")),
            }
        }
    })();
    if let Err(e) = result {
        let mut p = progress.0.lock().unwrap_or_else(|e| e.into_inner());
        p.failed
            .get_or_insert_with(|| format!("extra stream {}: {}", i + 1, error_chain(&e)));
        progress.1.notify_all();
    }
}

/// Writes the pages of a `Pages` payload into guest memory.
fn apply_pages(mem: &GuestMemoryMmap, payload: &[u8]) -> Result<(), IncomingError> {
    for (gpa, data) in protocol::pages(payload, |gpa| page_ok(mem, gpa))? {
        mem.write_slice(data, GuestAddress(gpa))
            .map_err(|_| IncomingError::Memory(gpa))?;
    }
    Ok(())
}

/// Zeroes the pages of a `ZeroPages` payload that are not zero already
/// (a page never written reads as zero and stays unallocated). Reading
/// rather than remembering what was written keeps this right whichever
/// stream carried a page before.
fn apply_zero_pages(
    mem: &GuestMemoryMmap,
    payload: &[u8],
    scratch: &mut [u8; protocol::PAGE_SIZE],
) -> Result<(), IncomingError> {
    const ZERO: [u8; protocol::PAGE_SIZE] = [0; protocol::PAGE_SIZE];
    for gpa in protocol::zero_pages(payload, |gpa| page_ok(mem, gpa))? {
        mem.read_slice(scratch, GuestAddress(gpa))
            .map_err(|_| IncomingError::Memory(gpa))?;
        if scratch[..] != ZERO[..] {
            mem.write_slice(&ZERO, GuestAddress(gpa))
                .map_err(|_| IncomingError::Memory(gpa))?;
        }
    }
    Ok(())
}

fn unexpected(got: Kind, expected: &'static str) -> IncomingError {
    ProtocolError::Unexpected { got, expected }.into()
}

/// Loads `s` into the boot of `vm`, whose threads are started and parked
/// ([`Vm::start_incoming_paused`]): the VM-wide state and the devices from
/// here, each vCPU's on its own thread.
fn restore(vm: &mut Vm, mut s: MachineState, boots: u64) -> Result<(), IncomingError> {
    let elapsed = state::unix_ns().saturating_sub(s.vm.saved_at_unix_ns);
    let elapsed = elapsed.min(u64::try_from(MAX_TRANSIT.as_nanos()).unwrap_or(u64::MAX));
    {
        let boot = vm
            .boot()
            .ok_or_else(|| IncomingError::Mismatch("no boot was built".into()))?;
        let vcpus = boot
            .vcpus
            .as_ref()
            .ok_or_else(|| IncomingError::Mismatch("the vCPUs were not started".into()))?;
        state::restore_vm(&boot.vm, &s.vm, elapsed)?;
        let saved = Arc::new(std::mem::take(&mut s.vcpus));
        let jobs = saved.clone();
        let results = vcpus.on_each_paused(
            move |id, fd| match jobs.get(usize::from(id)) {
                Some(v) => state::restore_vcpu(fd, v, elapsed).map_err(IncomingError::from),
                None => Err(IncomingError::Mismatch(format!(
                    "no saved state for vCPU {id}"
                ))),
            },
            RESTORE_TIMEOUT,
        );
        if results.len() != saved.len() {
            return Err(IncomingError::Mismatch(format!(
                "{} vCPUs built, {} saved",
                results.len(),
                saved.len()
            )));
        }
        for (id, r) in results.into_iter().enumerate() {
            r.ok_or_else(|| {
                IncomingError::Mismatch(format!("vCPU {id} did not load its state in time"))
            })??;
        }
        boot.devices
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(&s.devices.serial)?;
        for (i, ((dev, _, _), st)) in boot.virtio.iter().zip(&s.devices.virtio).enumerate() {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_state(st)
                .map_err(|e| IncomingError::Virtio(i, e))?;
        }
    }
    vm.continue_from(boots, s.paused);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::protocol::DiskInfo;

    fn cfg(disks: usize) -> MigrationConfig {
        MigrationConfig {
            vcpus: 1,
            memory_mib: 128,
            disks: vec![
                DiskInfo {
                    capacity: 1 << 20,
                    readonly: false
                };
                disks
            ],
            nets: vec![],
            rng: true,
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            boots: 1,
        }
    }

    #[test]
    fn source_config_must_match_local_backends() {
        let local = IncomingConfig::default();
        assert!(target_config(&cfg(0), &local).is_ok());
        assert!(matches!(
            target_config(&cfg(1), &local),
            Err(IncomingError::Mismatch(_))
        ));
        let mut big = cfg(0);
        big.memory_mib = 1 << 40;
        assert!(target_config(&big, &local).is_err());
        let mut none = cfg(0);
        none.vcpus = 0;
        assert!(target_config(&none, &local).is_err());
    }

    #[test]
    fn zero_pages_clear_only_what_is_not_zero() {
        let mem = crate::vstate::memory::create(128 << 20).unwrap();
        let mut page = [0u8; 4096];
        apply_pages(
            &mem,
            &[0x2000u64.to_le_bytes().to_vec(), vec![7; 4096]].concat(),
        )
        .unwrap();
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!(b[0], 7);
        // A page written before (by any stream) is cleared; an untouched
        // one is left alone; a bad address is refused.
        let zeros = [0x2000u64.to_le_bytes(), 0x9000u64.to_le_bytes()].concat();
        apply_zero_pages(&mem, &zeros, &mut page).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!(b[0], 0);
        assert!(apply_zero_pages(&mem, &0x2001u64.to_le_bytes(), &mut page).is_err());
        assert!(
            apply_pages(
                &mem,
                &[(1u64 << 40).to_le_bytes().to_vec(), vec![1; 4096]].concat()
            )
            .is_err()
        );
    }

    #[test]
    fn target_disks_start_zeroed_at_the_source_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, [7u8; 4096]).unwrap();
        let f = prepare_disk(&p, 8192).unwrap();
        let mut b = [1u8; 8192];
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|x| *x == 0));
    }
}
