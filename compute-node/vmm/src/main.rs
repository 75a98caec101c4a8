//! The `neph-vmm` executable: a thin shell over the library. Parses the
//! command line into a `VmConfig`, wires the console and the sockets, runs
//! the VM (or receives one with `--incoming`); exits 0 when the guest
//! powers off, is stopped or has migrated away, 1 on error.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use neph_vmm::config::{ConfigError, ConsoleConfig, DiskConfig, NetConfig};
use neph_vmm::devices::serial::Console;
use neph_vmm::migration::target::{Expected, IncomingConfig};
use neph_vmm::sandbox::cgroup::{self, JoinCgroupError, Limits};
use neph_vmm::sandbox::privilege::{self, Credentials};
use neph_vmm::sandbox::seccomp::{self, SeccompMode, ThreadKind};
use neph_vmm::{VmConfig, VmExit, api, migration};

/// Run one KVM virtual machine.
#[derive(Debug, Parser)]
#[command(name = "neph-vmm", version)]
struct Args {
    /// Kernel: PVH ELF, 64-bit ELF or bzImage.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["probe", "incoming"]
    )]
    kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// vCPUs (1 to 16).
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u64,
    /// Guest memory in MiB (128 to 65536).
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    memory: u64,
    /// A virtio-blk disk: PATH[,readonly]; repeatable.
    #[arg(long, value_name = "PATH[,readonly]")]
    disk: Vec<String>,
    /// A virtio-net interface on an existing tap: tap=NAME[,mac=MAC]; repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<String>,
    /// Control socket (line-delimited JSON; see the crate docs).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Append the serial console to this file instead of stdout (no stdin).
    #[arg(long, value_name = "PATH")]
    console_log: Option<PathBuf>,
    /// Serve the serial console as a two-way stream on this unix socket.
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,
    /// Leave out the virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// Receive a live migration on HOST:PORT instead of booting a kernel:
    /// the VM's shape comes from the source; --disk (copied into, in the
    /// source's order), --net, the console and --api-socket are this side's.
    /// The VM is built ahead from --cpus, --memory and --no-rng (and rebuilt
    /// if the source's differs), so give the source's values.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["kernel", "initrd", "probe"])]
    incoming: Option<String>,
    /// With --incoming: write this file just before the migrated VM first
    /// runs here. Whoever stops this process (SIGSTOP) and finds no such
    /// file knows the VM never ran here (how a node agent settles a
    /// migration whose source is in doubt).
    #[arg(long, value_name = "PATH", requires = "incoming")]
    arrival_file: Option<PathBuf>,
    /// Print what this host's KVM supports and exit.
    #[arg(long)]
    probe: bool,
    /// With --probe: print JSON.
    #[arg(long, requires = "probe")]
    json: bool,
    /// Seccomp filters per thread: enforce (a forbidden call stops the
    /// VMM), log (the kernel logs forbidden calls, nothing is stopped) or
    /// off.
    #[arg(
        long,
        value_name = "MODE",
        env = "NEPH_VMM_SECCOMP",
        default_value = "enforce"
    )]
    seccomp: SeccompMode,
    /// Accept the control request `seccomp_probe` (tests of the filters).
    #[arg(long, hide = true)]
    seccomp_probe: bool,
    /// Started as root: become this user (NAME, UID or UID:GID) once
    /// /dev/kvm, the taps, the disks and the sockets are open, with no
    /// capabilities left.
    #[arg(long, value_name = "USER")]
    user: Option<Credentials>,
    /// Run in the cgroup nephele/NAME, limited to the guest's memory plus
    /// an overhead and one CPU per vCPU (a warning if the host has no
    /// memory and cpu controllers).
    #[arg(long, value_name = "NAME")]
    cgroup: Option<String>,
}

fn config_from(args: Args) -> anyhow::Result<VmConfig> {
    let kernel = args.kernel.context("--kernel is required")?;
    let vcpus = u8::try_from(args.cpus).map_err(|_| ConfigError::Vcpus(args.cpus))?;
    let disks = args
        .disk
        .iter()
        .map(|d| {
            d.parse::<DiskConfig>()
                .with_context(|| format!("--disk {d}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let nets = args
        .net
        .iter()
        .map(|n| n.parse::<NetConfig>().with_context(|| format!("--net {n}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(VmConfig {
        kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus,
        memory_mib: args.memory,
        disks,
        nets,
        console: ConsoleConfig {
            log: args.console_log,
            socket: args.console_socket,
        },
        api_socket: args.api_socket,
        rng: !args.no_rng,
    })
}

fn incoming_from(args: &Args) -> anyhow::Result<IncomingConfig> {
    let mut disks = Vec::new();
    let mut readonly = Vec::new();
    for d in &args.disk {
        let c = d
            .parse::<DiskConfig>()
            .with_context(|| format!("--disk {d}"))?;
        disks.push(c.path);
        readonly.push(c.readonly);
    }
    let mut taps = Vec::new();
    let mut macs = Vec::new();
    for n in &args.net {
        let c = n
            .parse::<NetConfig>()
            .with_context(|| format!("--net {n}"))?;
        taps.push(c.tap);
        macs.push(c.mac);
    }
    // The VM is pre-built from --cpus, --memory and --no-rng (their
    // defaults if not given); a source with another shape gets its VM
    // built when it connects.
    let vcpus = u8::try_from(args.cpus).map_err(|_| ConfigError::Vcpus(args.cpus))?;
    Ok(IncomingConfig {
        expect: Some(Expected {
            vcpus,
            memory_mib: args.memory,
            rng: !args.no_rng,
            macs,
            readonly,
        }),
        disks,
        taps,
        console: ConsoleConfig {
            log: args.console_log.clone(),
            socket: args.console_socket.clone(),
        },
        api_socket: args.api_socket.clone(),
        arrival_file: args.arrival_file.clone(),
        stall_at_commit: std::env::var_os("NEPH_VMM_TEST_STALL_AT_COMMIT")
            .is_some_and(|v| v == "1"),
    })
}

fn probe(json: bool) -> anyhow::Result<()> {
    let kvm = kvm_ioctls::Kvm::new().context("cannot open /dev/kvm")?;
    let report = neph_vmm::probe::report(&kvm);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.probe {
        return probe(args.json);
    }
    seccomp::set_mode(args.seccomp).context("cannot install the seccomp violation reporter")?;
    if args.seccomp_probe {
        seccomp::enable_probe();
    }
    if let Some(name) = &args.cgroup {
        let vcpus = u8::try_from(args.cpus).map_err(|_| ConfigError::Vcpus(args.cpus))?;
        match cgroup::join(name, Limits::for_vm(vcpus, args.memory)) {
            Ok(p) => eprintln!(
                "neph-vmm: in cgroup {}",
                p.dirs()
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
            Err(e @ JoinCgroupError::Unavailable(_)) => {
                eprintln!("neph-vmm: warning: running without memory and CPU limits: {e}");
            }
            Err(e) => return Err(e).context("cannot put the VMM into its cgroup"),
        }
    }
    let user = args.user;
    let drop_privileges = move || -> anyhow::Result<()> {
        if let Some(to) = user {
            privilege::drop_to(to)?;
            eprintln!("neph-vmm: running as uid {} gid {}", to.uid, to.gid);
        }
        Ok(())
    };
    let incoming = match &args.incoming {
        Some(addr) => Some((addr.clone(), incoming_from(&args)?)),
        None => None,
    };
    let (console_log, console_socket, api_socket) = match &incoming {
        Some((_, i)) => (
            i.console.log.clone(),
            i.console.socket.clone(),
            i.api_socket.clone(),
        ),
        None => (
            args.console_log.clone(),
            args.console_socket.clone(),
            args.api_socket.clone(),
        ),
    };
    let sink: Box<dyn Write + Send> = match &console_log {
        Some(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open console log {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let console = Console::new(sink);
    if let Some(path) = &console_socket {
        api::console::serve(path, console.clone())?;
    }
    // The sockets are this process's: leave no stale files behind, on
    // success or error.
    let _cleanup = RemoveOnDrop(
        [&api_socket, &console_socket]
            .into_iter()
            .flatten()
            .cloned()
            .collect(),
    );
    let stdin_console = console_log.is_none();
    // Bound now, while the socket's directory is writable (root).
    let api_listener = match &api_socket {
        Some(path) => Some(
            api::server::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?,
        ),
        None => None,
    };
    seccomp::prepare_process();
    let vm = match incoming {
        Some((addr, local)) => {
            // The hostile peer's stream is read under the run loop's
            // filter; the privileges go once the VM is here (a target
            // whose pre-built VM does not fit the source reopens
            // /dev/kvm, its taps and disks).
            seccomp::install_or_exit(ThreadKind::Vmm);
            let vm = migration::target::receive(&addr, &local, &console)?;
            drop_privileges()?;
            vm
        }
        None => {
            let vm = neph_vmm::build(config_from(args)?, console.clone())?;
            drop_privileges()?;
            seccomp::install_or_exit(ThreadKind::Vmm);
            vm
        }
    };
    if let Some(listener) = api_listener {
        api::server::serve_listener(listener, vm.handle())?;
    }
    let _raw = if stdin_console {
        let raw = neph_vmm::terminal::RawTerminal::enable();
        let c = console.clone();
        std::thread::Builder::new()
            .name("stdin".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                seccomp::install_or_exit(ThreadKind::Console);
                api::console::feed(std::io::stdin().lock(), &c)
            })
            .context("cannot start the stdin thread")?;
        raw
    } else {
        None
    };
    let exit = vm.run();
    drop(_raw);
    match exit? {
        VmExit::Migrated => eprintln!("neph-vmm: migrated"),
        VmExit::ShutdownTimedOut => eprintln!(
            "neph-vmm: the guest did not power off within the shutdown timeout; stopped it"
        ),
        _ => {}
    }
    Ok(())
}

/// Removes socket files when dropped.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("neph-vmm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
