//! `neph dev up|status|down` end to end, with real processes: a controller
//! only (always), and a controller with one compute node booting an
//! instance of the test guest (where `/dev/kvm` exists). Each test's cluster
//! lives in its own temporary directory and is brought down on drop, so a
//! failing assertion leaves no process behind. No bridge is made
//! (`--no-bridge`): tests must not touch a developer's `nephdev0`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary next to `neph`, built here when missing (`cargo xtask
/// test` builds every binary before the suite).
fn sibling_binary(name: &str) -> PathBuf {
    let neph = PathBuf::from(env!("CARGO_BIN_EXE_neph"));
    let binary = neph.parent().expect("target dir").join(name);
    if !binary.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", name, "--bin", name])
            .status()
            .expect("run cargo");
        assert!(status.success(), "cannot build {name}");
    }
    binary
}

/// A local cluster in a temporary directory, with its own `neph` config.
struct Dev {
    dir: tempfile::TempDir,
    config: tempfile::TempDir,
    guest: PathBuf,
}

impl Dev {
    fn new(guest: PathBuf) -> Dev {
        Dev {
            dir: tempfile::tempdir().expect("tempdir"),
            config: tempfile::tempdir().expect("tempdir"),
            guest,
        }
    }

    fn dir(&self) -> PathBuf {
        self.dir.path().canonicalize().expect("canonical dir")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_neph"))
            .args(args)
            .env("XDG_CONFIG_HOME", self.config.path())
            .env("NEPHELE_DEV_DIR", self.dir.path())
            .env("NEPH_GUEST_IMAGE", &self.guest)
            .env("NEPHELE_PROFILE", "dev")
            .env_remove("NEPHELE_ENDPOINT")
            .env_remove("NEPHELE_TOKEN")
            .env_remove("NEPHELE_TOKEN_FILE")
            .env_remove("NEPHELE_PROJECT")
            .env_remove("NEPHELE_BIN_DIR")
            .stdin(Stdio::null())
            .output()
            .expect("run neph")
    }

    /// Runs and checks the exit code; returns (stdout, stderr).
    fn expect(&self, args: &[&str], code: i32) -> (String, String) {
        let out = self.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "neph {args:?}\nstdout: {stdout}\nstderr: {stderr}"
        );
        (stdout, stderr)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let (out, _) = self.expect(&a, 0);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("neph {args:?}: {e}: {out}"))
    }

    /// `neph dev status -o json` as (role, id, pid, alive).
    fn processes(&self) -> Vec<(String, String, u64, bool)> {
        let v = self.json(&["dev", "status"]);
        v.as_array()
            .expect("a list")
            .iter()
            .map(|p| {
                (
                    p["role"].as_str().unwrap_or_default().to_owned(),
                    p["id"].as_str().unwrap_or_default().to_owned(),
                    p["pid"].as_u64().unwrap_or_default(),
                    p["alive"].as_bool().unwrap_or_default(),
                )
            })
            .collect()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.run(&["dev", "down"]);
    }
}

/// Whether a live process runs `binary` with `dir` in its command line.
fn any_process_in(dir: &Path, binary: &str) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(e.path().join("exe")) else {
            continue;
        };
        if !exe.to_string_lossy().contains(binary) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn up_status_down_and_restart_with_controllers_only() {
    sibling_binary("neph-controller");
    let scratch = tempfile::tempdir().expect("tempdir");
    let guest = scratch.path().join("guest.elf");
    std::fs::write(&guest, b"not really a kernel").expect("write");
    let dev = Dev::new(guest);

    // Usage errors, before anything starts.
    dev.expect(&["dev", "up", "--controllers", "0"], 2);
    let (_, err) = dev.expect(&["dev", "status"], 1);
    assert!(err.contains("neph dev up"), "{err}");
    let (_, err) = dev.expect(
        &["dev", "up", "--nodes", "0", "--guest-image", "/nonexistent"],
        2,
    );
    assert!(err.contains("cargo xtask guest"), "{err}");
    assert!(!dev.has_state_file(), "a failed up left a state file");

    let (out, err) = dev.expect(&["dev", "up", "--controllers", "3", "--nodes", "0"], 0);
    assert!(out.contains("controller"), "{out}");
    assert!(err.contains("profile `dev`"), "{err}");
    let procs = dev.processes();
    assert_eq!(procs.len(), 3, "{procs:?}");
    assert!(
        procs.iter().all(|p| p.0 == "controller" && p.3),
        "{procs:?}"
    );

    // The profile works, with what `up` registered.
    let flavors = dev.json(&["flavor", "list"]);
    let names: Vec<&str> = flavors
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert!(
        names.contains(&"small") && names.contains(&"medium"),
        "{names:?}"
    );
    assert_eq!(
        dev.json(&["image", "get", "test-guest"])["format"],
        "pvh-elf"
    );
    assert_eq!(dev.json(&["project", "get", "default"])["name"], "default");
    let status = dev.json(&["cluster", "status"]);
    assert_eq!(
        status["controllers"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );

    // Up again: already running, nothing new.
    let (_, err) = dev.expect(&["dev", "up"], 0);
    assert!(err.contains("already runs"), "{err}");
    assert_eq!(dev.processes(), procs);

    // Down: every process gone, the directory kept.
    dev.expect(&["dev", "down"], 0);
    assert!(dev.processes().iter().all(|p| !p.3));
    assert_eq!(
        any_process_in(&dev.dir(), "neph-controller"),
        Vec::<u32>::new()
    );
    assert!(dev.dir().join("cluster.json").is_file());

    // Up restarts the same cluster on its data.
    let (_, err) = dev.expect(&["dev", "up"], 0);
    assert!(err.contains("restarting"), "{err}");
    assert!(dev.processes().iter().all(|p| p.3));
    assert_eq!(
        dev.json(&["image", "get", "test-guest"])["format"],
        "pvh-elf"
    );

    // A killed member makes the cluster partly running: up refuses.
    let victim = dev.processes()[2].2;
    let _ = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while dev.processes()[2].3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, err) = dev.expect(&["dev", "up"], 2);
    assert!(err.contains("neph dev down"), "{err}");

    dev.expect(&["dev", "down", "--purge"], 0);
    assert!(!dev.dir.path().exists());
    assert_eq!(
        any_process_in(dev.dir.path(), "neph-controller"),
        Vec::<u32>::new()
    );
    let (_, err) = dev.expect(&["dev", "down"], 0);
    assert!(err.contains("nothing to stop"), "{err}");
}

impl Dev {
    fn has_state_file(&self) -> bool {
        self.dir().join("cluster.json").is_file()
    }
}

#[test]
fn up_with_a_node_boots_an_instance_and_down_stops_its_vm() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm here, so the node cannot run VMs");
        return;
    }
    let guest = std::env::var_os("NEPH_GUEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images/neph-guest.elf")
        });
    if !guest.is_file() {
        eprintln!(
            "skipped: no test guest at {} (run `cargo xtask guest`)",
            guest.display()
        );
        return;
    }
    for b in ["neph-controller", "neph-node", "neph-vmm"] {
        sibling_binary(b);
    }
    let dev = Dev::new(guest);
    dev.expect(&["dev", "up", "--nodes", "1", "--no-bridge"], 0);
    let procs = dev.processes();
    assert_eq!(
        procs
            .iter()
            .map(|p| (p.0.as_str(), p.1.as_str(), p.3))
            .collect::<Vec<_>>(),
        vec![("controller", "1", true), ("node", "node-1", true)]
    );
    let nodes = dev.json(&["node", "list"]);
    assert_eq!(nodes[0]["state"], "UP", "{nodes}");

    let created = dev.json(&[
        "instance",
        "create",
        "demo",
        "--flavor",
        "small",
        "--image",
        "test-guest",
        "--wait",
        "--timeout",
        "60",
    ]);
    assert_eq!(created["state"], "RUNNING", "{created}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (log, _) = dev.expect(&["instance", "console-log", "demo"], 0);
        if log.contains("NEPH-GUEST READY") {
            break;
        }
        assert!(Instant::now() < deadline, "guest not ready: {log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // An image uploaded from a local file: the controller keeps it, the
    // node fetches it when an instance needs it, and the instance boots.
    let kernel = dev.guest.to_str().expect("utf-8 path").to_owned();
    let image = dev.json(&["image", "create", "uploaded", "--kernel", &kernel]);
    assert_eq!(image["state"], "ACTIVE", "{image}");
    assert_eq!(image["files"], "kernel", "{image}");
    assert_eq!(
        image["size_bytes"],
        std::fs::metadata(&dev.guest).expect("guest").len(),
        "{image}"
    );
    let fetched = dev.dir().join("images").join("uploaded");
    assert!(!fetched.exists(), "fetched before any instance needs it");
    let created = dev.json(&[
        "instance",
        "create",
        "from-upload",
        "--flavor",
        "small",
        "--image",
        "uploaded",
        "--wait",
        "--timeout",
        "60",
    ]);
    assert_eq!(created["state"], "RUNNING", "{created}");
    assert_eq!(
        std::fs::read(fetched.join("kernel")).expect("fetched kernel"),
        std::fs::read(&dev.guest).expect("guest")
    );
    assert_eq!(
        std::fs::read_to_string(fetched.join(".checksum"))
            .expect("checksum file")
            .trim(),
        image["checksum"].as_str().expect("checksum")
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (log, _) = dev.expect(&["instance", "console-log", "from-upload"], 0);
        if log.contains("NEPH-GUEST READY") {
            break;
        }
        assert!(Instant::now() < deadline, "uploaded guest not ready: {log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A file that is not what it says is refused with a usage error
    // before a byte is sent: a raw image needs its disk.
    let (_, err) = dev.expect(
        &[
            "image", "create", "bad", "--kernel", &kernel, "--format", "raw",
        ],
        2,
    );
    assert!(err.contains("needs a disk"), "{err}");

    let vms = any_process_in(&dev.dir(), "neph-vmm");
    assert_eq!(vms.len(), 2, "two VMs expected: {vms:?}");

    // Down stops the agent and the VM it leaves running.
    let (_, err) = dev.expect(&["dev", "down"], 0);
    assert!(err.contains("2 VM"), "{err}");
    for b in ["neph-controller", "neph-node", "neph-vmm"] {
        assert_eq!(any_process_in(&dev.dir(), b), Vec::<u32>::new(), "{b} left");
    }
}
