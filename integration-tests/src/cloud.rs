//! A whole Nephele cloud as real processes on loopback: a controller cluster
//! (`procs::ControllerCluster`), compute-node agents `neph-node` each with
//! its own data directory, one shared image directory holding the test
//! guest, and the tenant CLI `neph` driven with `-o json`, as a person would.
//!
//! Everything is killed on drop, including the `neph-vmm` processes the
//! agents started (they outlive their agent by design, so the harness finds
//! them by their command line, which names the node's data directory).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::guest::{guest_image, workspace_binary};
use crate::procs::{ControllerCluster, Daemon, StartError, free_port, spawn_until};

/// Errors of the cloud harness.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("could not prepare {path}: {source}")]
    Files {
        path: String,
        source: std::io::Error,
    },
    #[error("the bootstrap admin token did not appear at {0}")]
    NoToken(String),
    #[error("`neph {args}` failed ({status}): {stderr}")]
    Neph {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("`neph {args}` printed no JSON: {source}")]
    Json {
        args: String,
        source: serde_json::Error,
    },
    #[error("timed out after {waited:?} waiting for {what}; last seen: {last}")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
}

fn files(path: &Path) -> impl FnOnce(std::io::Error) -> CloudError + '_ {
    move |source| CloudError::Files {
        path: path.display().to_string(),
        source,
    }
}

/// One compute node: its agent process (absent while killed) and where it
/// keeps its state.
#[derive(Debug)]
pub struct Node {
    pub id: String,
    pub address: String,
    pub data_dir: PathBuf,
    pub agent: Option<Daemon>,
    /// The controller addresses its agent is given; empty: every one.
    pub controllers: Vec<String>,
}

/// Controllers, nodes and the CLI's settings.
#[derive(Debug)]
pub struct Cloud {
    pub controllers: ControllerCluster,
    pub nodes: Vec<Node>,
    pub image_dir: PathBuf,
    pub token_file: PathBuf,
    /// The project the CLI works in.
    pub project: String,
    dir: tempfile::TempDir,
}

impl Cloud {
    /// Starts `controllers` controllers and `nodes` agents, creates the
    /// project `demo`, a flavor `small` (1 vCPU, 128 MiB, 1 GiB) and the
    /// image `test-guest` (the project's test guest), and waits until every
    /// node is UP.
    pub fn start(controllers: u64, nodes: usize) -> Result<Self, CloudError> {
        Self::start_with_env(controllers, nodes, &[])
    }

    /// [`Cloud::start`] with extra `NEPHELE_*` settings for the controllers.
    pub fn start_with_env(
        controllers: u64,
        nodes: usize,
        env: &[(&str, &str)],
    ) -> Result<Self, CloudError> {
        let cluster = ControllerCluster::start_with_env(
            controllers,
            7000 + u64::from(std::process::id()),
            env,
        )?;
        let dir = tempfile::tempdir().map_err(StartError::TempDir)?;
        let token_file = cluster.data_dir(1).join("admin.token");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !token_file.is_file() {
            if Instant::now() > deadline {
                return Err(CloudError::NoToken(token_file.display().to_string()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let image_dir = dir.path().join("images");
        let kernel_dir = image_dir.join("test-guest");
        std::fs::create_dir_all(&kernel_dir).map_err(files(&kernel_dir))?;
        std::fs::copy(guest_image(), kernel_dir.join("kernel")).map_err(files(&kernel_dir))?;
        let mut cloud = Cloud {
            controllers: cluster,
            nodes: Vec::new(),
            image_dir,
            token_file,
            project: "demo".into(),
            dir,
        };
        for _ in 0..nodes {
            cloud.push_node(Vec::new())?;
        }
        cloud.admin(&["project", "create", "demo", "--instances", "20"])?;
        cloud.admin(&[
            "flavor",
            "create",
            "small",
            "--vcpus",
            "1",
            "--memory-mib",
            "128",
            "--disk-gib",
            "1",
        ])?;
        let kernel = kernel_dir.join("kernel").display().to_string();
        cloud.admin(&[
            "image",
            "create",
            "test-guest",
            "--format",
            "pvh-elf",
            "--file",
            &kernel,
        ])?;
        let n = cloud.nodes.len();
        cloud.wait_for("every node UP", Duration::from_secs(30), |c| {
            let list = c.admin(&["node", "list"])?;
            let up = items(&list, "nodes")
                .iter()
                .filter(|n| n["state"] == "UP")
                .count();
            Ok((up == n)
                .then_some(())
                .ok_or(format!("{up} of {n} nodes UP")))
        })?;
        Ok(cloud)
    }

    /// Adds node `node-{n+1}` whose agent is given only `controllers`,
    /// starts it and waits until it is UP; returns its index.
    pub fn add_node(&mut self, controllers: &[String]) -> Result<usize, CloudError> {
        let i = self.push_node(controllers.to_vec())?;
        let id = self.nodes[i].id.clone();
        self.wait_for(&format!("{id} UP"), Duration::from_secs(30), |c| {
            let n = c.admin(&["node", "get", &id])?;
            Ok((n["state"] == "UP")
                .then_some(())
                .ok_or(format!("{id} is {}", n["state"])))
        })?;
        Ok(i)
    }

    fn push_node(&mut self, controllers: Vec<String>) -> Result<usize, CloudError> {
        let i = self.nodes.len();
        let port = free_port()?;
        self.nodes.push(Node {
            id: format!("node-{}", i + 1),
            address: format!("127.0.0.1:{port}"),
            data_dir: self.dir.path().join(format!("node-{}", i + 1)),
            agent: None,
            controllers,
        });
        self.start_agent(i)?;
        Ok(i)
    }

    /// Starts (or restarts) the agent of node `i`.
    /// A node without a certificate joins with a join token made for it
    /// (`neph node join-token create --node`); later starts use the
    /// certificate it keeps in its data directory.
    pub fn start_agent(&mut self, i: usize) -> Result<(), CloudError> {
        self.start_agent_with_env(i, &[])
    }

    /// [`Cloud::start_agent`] with extra environment for the agent (and
    /// the VMMs it starts, which inherit it).
    pub fn start_agent_with_env(
        &mut self,
        i: usize,
        env: &[(&str, &str)],
    ) -> Result<(), CloudError> {
        let joined = self.nodes[i].data_dir.join("tls/cert.pem").is_file();
        let join_token = if joined {
            None
        } else {
            let id = self.nodes[i].id.clone();
            let t = self.admin(&[
                "node",
                "join-token",
                "create",
                "--node",
                &id,
                "--ttl",
                "600",
            ])?;
            Some(t["token"].as_str().unwrap_or_default().to_owned())
        };
        let node = &self.nodes[i];
        std::fs::create_dir_all(&node.data_dir).map_err(files(&node.data_dir))?;
        let mut cmd = Command::new(workspace_binary("neph-node"));
        cmd.arg("run")
            .args(["--node-id", &node.id])
            .args(["--listen", &node.address])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--image-dir")
            .arg(&self.image_dir)
            .arg("--ca-file")
            .arg(self.controllers.ca_file())
            .args(["--capacity-vcpus", "8"])
            .args(["--capacity-memory-mib", "4096"])
            .args(["--capacity-disk-gib", "50"]);
        if let Some(t) = &join_token {
            cmd.env("NEPHELE_JOIN_TOKEN", t);
        }
        cmd.envs(env.iter().copied());
        let controllers = if node.controllers.is_empty() {
            self.controllers.endpoints()
        } else {
            node.controllers.clone()
        };
        for c in controllers {
            cmd.args(["--controller", &c]);
        }
        let agent = spawn_until(cmd, "LISTENING", &format!("neph-node {}", node.id))?;
        self.nodes[i].agent = Some(agent);
        Ok(())
    }

    /// Kills node `i`'s agent with SIGKILL (its VMs keep running).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            a.kill();
        }
    }

    /// Kills node `i` whole: its agent and every VM it started, and waits
    /// (up to 30 s) until those VMs are gone: a SIGKILLed process takes a
    /// moment to end.
    pub fn kill_node(&mut self, i: usize) {
        self.kill_agent(i);
        for pid in self.vm_pids(i) {
            kill9(pid);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.vm_pids(i).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `neph-vmm` processes node `i`'s agent started (alive now).
    pub fn vm_pids(&self, i: usize) -> Vec<u32> {
        processes_mentioning("neph-vmm", &self.nodes[i].data_dir)
    }

    /// The node (`node-1`...) an instance is placed on, from `neph`.
    pub fn node_of(&self, instance: &str) -> Result<String, CloudError> {
        let i = self.neph(&["instance", "get", instance])?;
        Ok(i["node"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("nodes/")
            .to_string())
    }

    /// `neph ARGS -o json` as the bootstrap admin in the project, against
    /// the first controller that answers.
    /// Types `line` into `instance`'s console through `neph instance
    /// console` (stdin a pipe, closed after the line: the CLI exits once
    /// the output settles, or is killed after 30 s) and returns its stdout
    /// and stderr. Given every controller, the CLI uses the first that
    /// answers.
    /// `neph instance console INSTANCE` against this cloud, all three
    /// streams piped.
    fn console_command(&self, instance: &str) -> Command {
        use std::process::Stdio;
        let mut cmd = Command::new(workspace_binary("neph"));
        cmd.env_remove("NEPHELE_PROFILE")
            .args(["--endpoint", &self.controllers.endpoints().join(",")])
            .arg("--token-file")
            .arg(&self.token_file)
            .arg("--ca-file")
            .arg(self.controllers.ca_file())
            .args(["--project", &self.project, "instance", "console", instance])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// An open `neph instance console` session of `instance` (pipe mode):
    /// lines typed go to the guest, what it prints accumulates.
    pub fn console_session(&self, instance: &str) -> Result<ConsoleSession, CloudError> {
        use std::io::Read as _;
        let mut child = self
            .console_command(instance)
            .spawn()
            .map_err(|e| CloudError::Neph {
                args: format!("instance console {instance}"),
                status: "not started".into(),
                stderr: e.to_string(),
            })?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(mut out) = child.stdout.take() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = seen.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Ok(ConsoleSession { child, stdin, seen })
    }

    pub fn console(&self, instance: &str, line: &str) -> (String, String) {
        use std::io::Write as _;
        let spawned = self.console_command(instance).spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => return (String::new(), format!("cannot start neph: {e}")),
        };
        // Give the relay a moment to attach before typing.
        std::thread::sleep(Duration::from_millis(500));
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(format!("{line}\n").as_bytes());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        match child.wait_with_output() {
            Ok(out) => (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ),
            Err(e) => (String::new(), format!("no console output: {e}")),
        }
    }

    pub fn neph(&self, args: &[&str]) -> Result<serde_json::Value, CloudError> {
        self.run_neph(args, true)
    }

    /// Like [`Cloud::neph`] without a project (cluster-wide calls).
    pub fn admin(&self, args: &[&str]) -> Result<serde_json::Value, CloudError> {
        self.run_neph(args, false)
    }

    /// `neph ARGS` as given, with this cloud's endpoint and token; returns
    /// the exit status, stdout and stderr whatever the outcome.
    pub fn neph_raw(&self, args: &[&str], with_project: bool) -> (i32, String, String) {
        self.neph_as(None, args, with_project)
    }

    /// `neph ARGS` with `token` (a secret) instead of the admin's, when
    /// given.
    pub fn neph_as(
        &self,
        token: Option<&str>,
        args: &[&str],
        with_project: bool,
    ) -> (i32, String, String) {
        let mut last = (-1, String::new(), "no controller is alive".to_string());
        for c in self.controllers.members.iter() {
            let mut cmd = Command::new(workspace_binary("neph"));
            cmd.env_remove("NEPHELE_PROFILE")
                .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
                .args(["--endpoint", &c.address])
                .arg("--ca-file")
                .arg(self.controllers.ca_file())
                .args(["-o", "json"]);
            match token {
                Some(t) => cmd.env("NEPHELE_TOKEN", t),
                None => cmd.arg("--token-file").arg(&self.token_file),
            };
            if with_project {
                cmd.args(["--project", &self.project]);
            }
            let Ok(out) = cmd.args(args).output() else {
                continue;
            };
            let code = out.status.code().unwrap_or(-1);
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            last = (
                code,
                String::from_utf8_lossy(&out.stdout).to_string(),
                stderr,
            );
            // Another controller may answer when this one is dead.
            let err = last.2.to_lowercase();
            if !(code == 1 && (err.contains("unavailable") || err.contains("cannot reach"))) {
                return last;
            }
        }
        last
    }

    fn run_neph(&self, args: &[&str], with_project: bool) -> Result<serde_json::Value, CloudError> {
        let (code, stdout, stderr) = self.neph_raw(args, with_project);
        if code != 0 {
            return Err(CloudError::Neph {
                args: args.join(" "),
                status: code.to_string(),
                stderr,
            });
        }
        if stdout.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&stdout).map_err(|source| CloudError::Json {
            args: args.join(" "),
            source,
        })
    }

    /// Polls `check` until it returns `Ok(Ok(v))`; `Ok(Err(why))` means not
    /// yet, and the last `why` goes into the timeout error.
    pub fn wait_for<T>(
        &self,
        what: &str,
        within: Duration,
        mut check: impl FnMut(&Self) -> Result<Result<T, String>, CloudError>,
    ) -> Result<T, CloudError> {
        let deadline = Instant::now() + within;
        loop {
            let last = match check(self) {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(why)) => why,
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(CloudError::Timeout {
                    what: what.into(),
                    waited: within,
                    last,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `instance` is in `state` (`RUNNING`, `STOPPED`...).
    pub fn wait_state(
        &self,
        instance: &str,
        state: &str,
        within: Duration,
    ) -> Result<serde_json::Value, CloudError> {
        self.wait_for(&format!("{instance} {state}"), within, |c| {
            let i = c.neph(&["instance", "get", instance])?;
            Ok(if i["state"] == state {
                Ok(i)
            } else {
                Err(format!("state {} reason {}", i["state"], i["reason"]))
            })
        })
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}

/// The array `key` of a list answer (empty when absent).
pub fn items<'a>(v: &'a serde_json::Value, key: &str) -> &'a [serde_json::Value] {
    v[key]
        .as_array()
        .or_else(|| v.as_array())
        .map_or(&[], Vec::as_slice)
}

/// Sends SIGKILL to `pid` (ignoring a process that is already gone).
pub fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Live processes whose executable name is `program` and whose command line
/// mentions `path`.
pub fn processes_mentioning(program: &str, path: &Path) -> Vec<u32> {
    let needle = path.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmdline.split(|b| *b == 0);
            let exe_matches = args
                .next()
                .and_then(|a| {
                    Path::new(std::str::from_utf8(a).ok()?)
                        .file_name()
                        .map(|n| n == program)
                })
                .unwrap_or(false);
            exe_matches && String::from_utf8_lossy(&cmdline).contains(&needle) && alive(*pid)
        })
        .collect()
}

/// A console session kept open across events (see
/// [`Cloud::console_session`]); killed on drop.
#[derive(Debug)]
pub struct ConsoleSession {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    seen: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ConsoleSession {
    /// Types `line` (and a newline) into the guest's console.
    pub fn type_line(&mut self, line: &str) -> std::io::Result<()> {
        use std::io::Write as _;
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the console's input is closed"))?;
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()
    }

    /// Everything the session printed so far.
    pub fn output(&self) -> String {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until the output holds `text` after byte `from`; returns
    /// where it ends, or `None` after `within`.
    pub fn wait_for(&self, text: &str, from: usize, within: Duration) -> Option<usize> {
        let deadline = Instant::now() + within;
        loop {
            let out = self.output();
            if let Some(i) = out.get(from..).and_then(|o| o.find(text)) {
                return Some(from + i + text.len());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the `neph` process still runs (the stream is open).
    pub fn open(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ConsoleSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
