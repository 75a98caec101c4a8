//! Real daemon processes for tests and benchmarks: `neph-controller`
//! members and etcd servers on loopback ports, each with its own temporary
//! data directory, killed (and their directories removed) on drop.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::guest::workspace_binary;

/// Errors while starting daemons.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not come up within {waited:?}")]
    Timeout { what: String, waited: Duration },
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    #[error("could not make a data directory: {0}")]
    TempDir(std::io::Error),
    #[error("`{program}` is not installed ({hint})")]
    Missing { program: String, hint: String },
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16, StartError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(StartError::Port)
}

/// A process killed with SIGKILL on drop.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `neph-controller` member.
#[derive(Debug)]
pub struct Controller {
    pub id: u64,
    pub address: String,
    pub daemon: Daemon,
}

/// A cluster of `neph-controller` processes on loopback.
#[derive(Debug)]
pub struct ControllerCluster {
    pub cluster_id: u64,
    pub members: Vec<Controller>,
    _dir: tempfile::TempDir,
}

impl ControllerCluster {
    /// Starts `n` members that form a new cluster, and waits until each
    /// listens.
    pub fn start(n: u64, cluster_id: u64) -> Result<Self, StartError> {
        Self::start_with_env(n, cluster_id, &[])
    }

    /// [`ControllerCluster::start`] with extra `NEPHELE_*` settings in each
    /// member's environment.
    pub fn start_with_env(
        n: u64,
        cluster_id: u64,
        env: &[(&str, &str)],
    ) -> Result<Self, StartError> {
        let dir = tempfile::tempdir().map_err(StartError::TempDir)?;
        let members_addr: Vec<(u64, String)> = (1..=n)
            .map(|id| free_port().map(|p| (id, format!("127.0.0.1:{p}"))))
            .collect::<Result<_, _>>()?;
        let mut members = Vec::new();
        for (id, address) in &members_addr {
            let (id, address) = (*id, address.clone());
            let peers: Vec<String> = members_addr
                .iter()
                .filter(|(p, _)| *p != id)
                .map(|(p, a)| format!("{p}={a}"))
                .collect();
            // One CA for the cluster: the first `init` creates it (key
            // sealed with the operator key), the others issue their
            // certificates from it.
            let mut cmd = Command::new(workspace_binary("neph-controller"));
            cmd.arg("init")
                .arg("--operator-key-file")
                .arg(dir.path().join("operator.key"))
                .arg("--sealed-ca")
                .arg(dir.path().join("ca.sealed"))
                .args(["--id", &id.to_string()])
                .args(["--cluster-id", &cluster_id.to_string()])
                .args(["--listen", &address])
                .arg("--data-dir")
                .arg(dir.path().join(format!("c{id}")))
                .envs(env.iter().copied());
            if !peers.is_empty() {
                cmd.args(["--peers", &peers.join(",")]);
            }
            let daemon = spawn_until(cmd, "LISTENING", &format!("neph-controller {id}"))?;
            members.push(Controller {
                id,
                address,
                daemon,
            });
        }
        Ok(Self {
            cluster_id,
            members,
            _dir: dir,
        })
    }

    /// Member `id`'s data directory (it holds `admin.token` once the
    /// cluster has a leader).
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self._dir.path().join(format!("c{id}"))
    }

    /// The cluster CA certificate clients verify the controllers with.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir(1).join("tls").join("ca.pem")
    }

    /// Member `id`'s TLS directory (its `controller/<id>` certificate).
    pub fn tls_dir(&self, id: u64) -> PathBuf {
        self.data_dir(id).join("tls")
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.address.clone()).collect()
    }

    /// The leader's id as one member reports it (`neph-controller status`),
    /// 0 when it knows none.
    pub fn leader_seen_by(&self, member: &Controller) -> u64 {
        let out = Command::new(workspace_binary("neph-controller"))
            .arg("status")
            .args(["--endpoint", &member.address])
            .args(["--cluster-id", &self.cluster_id.to_string()])
            .arg("--tls-dir")
            .arg(self.tls_dir(member.id))
            .output();
        let Ok(out) = out else { return 0 };
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["leader_id"].as_u64().or_else(|| v["leader"].as_u64()))
            .unwrap_or(0)
    }

    /// Waits until some member reports a leader, and returns its id.
    pub fn wait_leader(&self, within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            for m in &self.members {
                let leader = self.leader_seen_by(m);
                if leader != 0 {
                    return Some(leader);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A cluster of etcd servers (Debian's `etcd-server`) on loopback.
#[derive(Debug)]
pub struct EtcdCluster {
    pub client_urls: Vec<String>,
    pub members: Vec<Daemon>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    pub fn start(n: u64) -> Result<Self, StartError> {
        let etcd = which("etcd").ok_or_else(|| StartError::Missing {
            program: "etcd".into(),
            hint: "apt-get install etcd-server".into(),
        })?;
        let dir = tempfile::tempdir().map_err(StartError::TempDir)?;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_, StartError>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut members = Vec::new();
        let mut client_urls = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new(&etcd);
            cmd.args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(dir.path().join(format!("e{i}")))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = cmd.spawn().map_err(|source| StartError::Spawn {
                what: "etcd".into(),
                source,
            })?;
            members.push(Daemon { child });
            client_urls.push(client_url);
        }
        let cluster = Self {
            client_urls,
            members,
            _dir: dir,
        };
        cluster.wait_healthy(Duration::from_secs(20))?;
        Ok(cluster)
    }

    fn wait_healthy(&self, within: Duration) -> Result<(), StartError> {
        let deadline = Instant::now() + within;
        for url in &self.client_urls {
            let addr = url.trim_start_matches("http://");
            loop {
                if std::net::TcpStream::connect(addr).is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(StartError::Timeout {
                        what: format!("etcd at {url}"),
                        waited: within,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

/// Starts `cmd` and waits for a stdout line containing `marker`; the rest of
/// its stdout is drained in the background so it never blocks.
pub fn spawn_until(mut cmd: Command, marker: &str, what: &str) -> Result<Daemon, StartError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| StartError::Spawn {
            what: what.into(),
            source,
        })?;
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        let marker = marker.to_string();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && line.contains(&marker) {
                    let _ = tx.send(());
                    sent = true;
                }
            }
        });
    }
    let waited = Duration::from_secs(20);
    let daemon = Daemon { child };
    match rx.recv_timeout(waited) {
        Ok(()) => Ok(daemon),
        Err(_) => Err(StartError::Timeout {
            what: what.into(),
            waited,
        }),
    }
}

/// The path of `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// An example binary of this workspace (`target/<profile>/examples/<name>`).
pub fn workspace_example(name: &str) -> PathBuf {
    let bin = workspace_binary(name);
    bin.parent()
        .unwrap_or(Path::new("."))
        .join("examples")
        .join(name)
}
