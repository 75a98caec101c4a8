//! `neph-node` as a real process against a real one-member
//! `neph-controller`, booting the project's test guest under real
//! `neph-vmm` processes: registration; an instance created through the API
//! reaches RUNNING and its guest prints the ready marker (read through the
//! agent's GetConsoleLog); a console round trip through the agent's Console
//! stream; stop, start; kill -9 of the agent leaves the VM running and a
//! restarted agent re-adopts it (same pid, still RUNNING); with the agent
//! dead the VM fences itself when its lease runs out, and the next agent
//! resumes it because its assignment still says RUNNING; delete removes the
//! VM, its process and its directory. The agent joins with a join token
//! and the test reaches its port as a controller does, over mutual TLS
//! with the controller's certificate.
//!
//! Needs `/dev/kvm`, the test guest (`NEPH_GUEST_IMAGE` or `cargo xtask
//! guest`) and the `neph-controller` and `neph-vmm` binaries (built here
//! when missing); without KVM or the guest it prints why and passes. Tests
//! that need no VM: both daemons answer gRPC health and reflection, and
//! `the_agent_port_admits_only_controllers` (what the agent's port refuses:
//! plaintext, no certificate, another CA's certificate, a node's
//! certificate; and that a controller pins the node it dials).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nephele_integration_tests::guest::{READY_MARKER, field, guest_image, skip_without_kvm};
use nephele_proto::compute::v1 as compute;
use nephele_proto::iam::v1 as iam;
use nephele_proto::infra::v1 as infra;
use nephele_proto::node::v1 as node;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const WAIT: Duration = Duration::from_secs(30);
/// The lease the controller gives (NEPHELE_FENCE_LEASE_MS); a controller
/// without that setting gives its default, 10 s.
const LEASE_MS: u64 = 3000;

/// A workspace binary next to this test's `neph-node`, built when missing.
fn binary(package: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_neph-node"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(name);
    if !path.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", package, "--bin", name])
            .status()
            .expect("run cargo");
        assert!(status.success(), "cannot build {name}");
    }
    path
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc {
    child: Child,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills a VM process on drop, in case a test fails with it running (the
/// agent starts VMs detached, so nothing else would).
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Starts `cmd` and returns it with the values of the stdout lines starting
/// with each of `prefixes` (in any order).
fn start_until(mut cmd: Command, prefixes: &[&str]) -> anyhow::Result<(Proc, Vec<String>)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let proc = Proc { child };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                // Keep draining so the process never blocks on stdout.
                continue;
            }
        }
    });
    let mut values = vec![None; prefixes.len()];
    let deadline = Instant::now() + WAIT;
    while values.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .with_context(|| format!("{:?} did not print {prefixes:?}", cmd.get_program()))?;
        for (i, p) in prefixes.iter().enumerate() {
            if let Some(v) = line.strip_prefix(p) {
                values[i] = Some(v.trim().to_owned());
            }
        }
    }
    Ok((proc, values.into_iter().flatten().collect()))
}

#[derive(Clone)]
struct Auth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

type Svc = InterceptedService<Channel, Auth>;

struct Api {
    iam: iam::iam_client::IamClient<Svc>,
    flavors: compute::flavors_client::FlavorsClient<Svc>,
    images: compute::images_client::ImagesClient<Svc>,
    instances: compute::instances_client::InstancesClient<Svc>,
    nodes: infra::nodes_client::NodesClient<Svc>,
    events: nephele_proto::ops::v1::events_client::EventsClient<Svc>,
}

async fn api(address: &str, token: &str, ca_file: &Path) -> anyhow::Result<Api> {
    nephele_tls::install_default();
    let tls = nephele_tls::server_auth_client_config(&std::fs::read(ca_file)?)?;
    let channel =
        nephele_tls::connect_channel(Channel::from_shared(format!("http://{address}"))?, tls)
            .await?;
    let auth = Auth(format!("Bearer {token}").parse()?);
    Ok(Api {
        iam: iam::iam_client::IamClient::with_interceptor(channel.clone(), auth.clone()),
        flavors: compute::flavors_client::FlavorsClient::with_interceptor(
            channel.clone(),
            auth.clone(),
        ),
        images: compute::images_client::ImagesClient::with_interceptor(
            channel.clone(),
            auth.clone(),
        ),
        instances: compute::instances_client::InstancesClient::with_interceptor(
            channel.clone(),
            auth.clone(),
        ),
        nodes: infra::nodes_client::NodesClient::with_interceptor(channel.clone(), auth.clone()),
        events: nephele_proto::ops::v1::events_client::EventsClient::with_interceptor(
            channel, auth,
        ),
    })
}

/// The fixture: a controller, the image directory, and how to start the
/// agent (again).
struct Cluster {
    _controller: Proc,
    controller: String,
    token_file: PathBuf,
    data_dir: PathBuf,
    image_dir: PathBuf,
    stderr_dir: PathBuf,
    starts: u32,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> anyhow::Result<Self> {
        Self::start_with_env(&[])
    }

    /// [`Cluster::start`] with more settings in the controller's
    /// environment.
    fn start_with_env(env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new(binary("neph-controller", "neph-controller"));
        cmd.args(["init", "--id", "1", "--cluster-id", "5"])
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("controller"))
            .arg("--operator-key-file")
            .arg(dir.path().join("operator.key"))
            .env("RUST_LOG", "warn")
            // Short lease; no node timeout during the agent's absences.
            .env("NEPHELE_FENCE_LEASE_MS", LEASE_MS.to_string())
            .env("NEPHELE_NODE_TIMEOUT_MS", "120000")
            .envs(env.iter().copied())
            .stderr(Stdio::null());
        let (controller, v) = start_until(cmd, &["LISTENING ", "ADMIN_TOKEN_FILE "])?;
        let image_dir = dir.path().join("images");
        std::fs::create_dir_all(image_dir.join("guest"))?;
        // Tests that boot VMs skip without it; the others need no guest.
        if guest_image().is_file() {
            std::fs::copy(guest_image(), image_dir.join("guest").join("kernel"))
                .context("copy the test guest into the image directory")?;
        }
        Ok(Self {
            _controller: controller,
            controller: v[0].clone(),
            token_file: PathBuf::from(&v[1]),
            data_dir: dir.path().join("node"),
            image_dir,
            stderr_dir: dir.path().to_path_buf(),
            starts: 0,
            _dir: dir,
        })
    }

    /// The cluster CA certificate `init` made.
    fn ca_file(&self) -> PathBuf {
        self._dir
            .path()
            .join("controller")
            .join("tls")
            .join("ca.pem")
    }

    fn token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(&self.token_file)?.trim().to_owned())
    }

    /// The controller's own TLS files (what it dials agents with).
    fn controller_tls(&self) -> anyhow::Result<nephele_tls::TlsContext> {
        let dir = self._dir.path().join("controller").join("tls");
        Ok(nephele_tls::TlsContext::load(
            &nephele_tls::TlsFiles::in_dir(&dir),
            nephele_tls::Revocations::new(),
        )?)
    }

    /// Starts `neph-node` and returns it with its gRPC address; the first
    /// start joins with `join_token`, later ones use the certificate.
    fn agent(&mut self, join_token: Option<&str>) -> anyhow::Result<(Proc, String)> {
        self.starts += 1;
        let log = std::fs::File::create(self.stderr_dir.join(format!("agent{}.log", self.starts)))?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_neph-node"));
        cmd.args([
            "run",
            "--node-id",
            "node-1",
            "--controller",
            &self.controller,
        ])
        .args(["--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&self.data_dir)
        .arg("--image-dir")
        .arg(&self.image_dir)
        .arg("--ca-file")
        .arg(self.ca_file())
        .arg("--vmm")
        .arg(binary("neph-vmm", "neph-vmm"))
        .args(["--capacity-vcpus", "4", "--capacity-memory-mib", "4096"])
        .args(["--capacity-disk-gib", "20", "--label", "zone=test"])
        .env("RUST_LOG", "info")
        .stderr(log);
        if let Some(t) = join_token {
            cmd.env("NEPHELE_JOIN_TOKEN", t);
        }
        let (p, v) = start_until(cmd, &["LISTENING "])?;
        Ok((p, v[0].clone()))
    }

    fn agent_logs(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                let p = self.stderr_dir.join(format!("agent{i}.log"));
                format!(
                    "--- agent run {i}:\n{}",
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    fn instance_dir(&self) -> PathBuf {
        self.data_dir.join("instances").join("p1").join("vm-1")
    }

    /// The VMM pid from the instance's state record.
    fn vm_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.instance_dir().join("state")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            rest.chars().next()
        })
        .is_some_and(|state| state != 'Z')
}

/// Polls `check` every 50 ms until it returns `Some`, or fails with `what`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn instance_state(api: &Api, name: &str) -> Result<compute::Instance, Status> {
    let mut c = api.instances.clone();
    c.get_instance(compute::GetInstanceRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

async fn wait_state(
    api: &Api,
    name: &str,
    want: compute::InstanceState,
) -> anyhow::Result<compute::Instance> {
    eventually(WAIT, &format!("{name} to be {want:?}"), || async {
        instance_state(api, name)
            .await
            .ok()
            .filter(|i| i.state == want as i32)
    })
    .await
}

/// A join token for `node_id`.
async fn join_token(api: &Api, node_id: &str) -> anyhow::Result<String> {
    Ok(api
        .nodes
        .clone()
        .create_join_token(infra::CreateJoinTokenRequest {
            ttl: None,
            node_id: node_id.into(),
        })
        .await?
        .into_inner()
        .token)
}

/// The agent's `Agent` service as a controller reaches it: mutual TLS with
/// the controller's certificate, the server pinned to `node/node-1`.
async fn agent_client(
    tls: &nephele_tls::TlsContext,
    address: &str,
) -> anyhow::Result<node::agent_client::AgentClient<Channel>> {
    let config = tls.client_config(nephele_tls::PeerPolicy::Exactly(
        nephele_tls::Identity::node("node-1")?,
    ))?;
    let channel =
        nephele_tls::connect_channel(Channel::from_shared(format!("http://{address}"))?, config)
            .await?;
    Ok(node::agent_client::AgentClient::new(channel))
}

async fn console_log(
    tls: &nephele_tls::TlsContext,
    address: &str,
    name: &str,
) -> anyhow::Result<String> {
    let mut a = agent_client(tls, address).await?;
    let log = a
        .get_console_log(compute::GetConsoleLogRequest {
            name: name.into(),
            max_bytes: 0,
        })
        .await?
        .into_inner();
    Ok(String::from_utf8_lossy(&log.data).into_owned())
}

/// Types `line` into the console through the agent and waits for the line
/// holding `expect`; returns what came back up to there.
async fn console_round_trip(
    tls: &nephele_tls::TlsContext,
    address: &str,
    name: &str,
    line: &str,
    expect: &str,
) -> anyhow::Result<String> {
    let mut a = agent_client(tls, address).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(compute::ConsoleRequest {
        name: name.into(),
        input: Vec::new(),
    })
    .await?;
    let mut out = a
        .console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tx.send(compute::ConsoleRequest {
        name: String::new(),
        input: format!("{line}\r").into_bytes(),
    })
    .await?;
    let mut seen = String::new();
    let deadline = Instant::now() + WAIT;
    // The whole line `expect` starts, not just its beginning.
    let whole = |seen: &str| seen.find(expect).is_some_and(|i| seen[i..].contains('\n'));
    while !whole(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, out.message()).await {
            Ok(Ok(Some(m))) => seen.push_str(&String::from_utf8_lossy(&m.output)),
            Ok(Ok(None)) => bail!("console closed; seen {seen:?}"),
            Ok(Err(s)) => bail!("console failed: {s}; seen {seen:?}"),
            Err(_) => bail!("no {expect:?} on the console; seen {seen:?}"),
        }
    }
    Ok(seen)
}

/// The line of `text` that starts with `prefix`.
fn line_of<'a>(text: &'a str, prefix: &str) -> anyhow::Result<&'a str> {
    text.lines()
        .find_map(|l| l.find(prefix).map(|i| l[i..].trim_end()))
        .with_context(|| format!("no {prefix:?} line in {text:?}"))
}

/// The VMM's own view through its control socket.
fn vmm_status(dir: &Path) -> Option<serde_json::Value> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("api.sock")).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).ok()? == 1 && byte[0] != b'\n' {
        buf.push(byte[0]);
    }
    serde_json::from_slice::<serde_json::Value>(&buf)
        .ok()
        .map(|v| v["status"].clone())
}

/// A flavor `small` (1 vCPU, 256 MiB, 1 GiB), the image `guest` (in the
/// agent's image directory) and the project `p1`.
async fn catalog(api: &Api) -> anyhow::Result<()> {
    api.flavors
        .clone()
        .create_flavor(compute::CreateFlavorRequest {
            flavor_id: "small".into(),
            flavor: Some(compute::Flavor {
                name: String::new(),
                resources: Some(compute::Resources {
                    vcpus: 1,
                    memory_mib: 256,
                    disk_gib: 1,
                }),
            }),
            request_id: String::new(),
        })
        .await?;
    api.images
        .clone()
        .create_image(compute::CreateImageRequest {
            image_id: "guest".into(),
            image: Some(compute::Image {
                format: "pvh-elf".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    api.iam
        .clone()
        .create_project(iam::CreateProjectRequest {
            project_id: "p1".into(),
            project: Some(iam::Project::default()),
            request_id: String::new(),
        })
        .await?;
    Ok(())
}

/// Whether VMs cannot run here (no KVM, no test guest); says why.
fn skip_without_vms() -> bool {
    if skip_without_kvm() {
        return true;
    }
    if !guest_image().is_file() {
        eprintln!(
            "skipped: the test guest {} is missing; build it with `cargo xtask guest` or set NEPH_GUEST_IMAGE",
            guest_image().display()
        );
        return true;
    }
    false
}

/// Waits until node-1 is registered and UP.
async fn node_up(api: &Api) -> anyhow::Result<()> {
    eventually(WAIT, "node-1 to be UP", || async {
        api.nodes
            .clone()
            .get_node(infra::GetNodeRequest {
                name: "nodes/node-1".into(),
            })
            .await
            .ok()
            .filter(|n| n.get_ref().state == infra::NodeState::Up as i32)
            .map(|_| ())
    })
    .await
}

/// Creates `projects/p1/instances/{id}` of flavor `flavor`.
async fn create(api: &Api, id: &str, flavor: &str) -> anyhow::Result<()> {
    api.instances
        .clone()
        .create_instance(compute::CreateInstanceRequest {
            parent: "projects/p1".into(),
            instance_id: id.into(),
            instance: Some(compute::Instance {
                flavor: format!("flavors/{flavor}"),
                image: "images/guest".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    Ok(())
}

async fn stop(api: &Api, name: &str, timeout_s: i64) -> anyhow::Result<()> {
    api.instances
        .clone()
        .stop_instance(compute::StopInstanceRequest {
            name: name.into(),
            timeout: Some(prost_types::Duration {
                seconds: timeout_s,
                nanos: 0,
            }),
            request_id: String::new(),
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_instances_survives_restarts_and_fences() -> anyhow::Result<()> {
    if skip_without_vms() {
        return Ok(());
    }
    let mut cluster = Cluster::start()?;
    let result = scenario(&mut cluster).await;
    if result.is_err() {
        eprintln!("{}", cluster.agent_logs());
    }
    result
}

async fn scenario(cluster: &mut Cluster) -> anyhow::Result<()> {
    let token = cluster.token()?;
    let api = api(&cluster.controller, &token, &cluster.ca_file()).await?;
    let tls = cluster.controller_tls()?;
    let (mut agent, address) = cluster.agent(Some(&join_token(&api, "node-1").await?))?;

    // Registered, UP, with the capacity and labels of its flags.
    let mut nodes = api.nodes.clone();
    let n = eventually(WAIT, "node-1 to register", || {
        let mut nodes = nodes.clone();
        async move {
            nodes
                .get_node(infra::GetNodeRequest {
                    name: "nodes/node-1".into(),
                })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await?;
    assert_eq!(n.address, address);
    assert_eq!(n.capacity.map(|c| c.vcpus), Some(4));
    assert_eq!(n.labels.get("zone").map(String::as_str), Some("test"));

    catalog(&api).await?;

    // Create: RUNNING, the guest is up, its console answers.
    let name = "projects/p1/instances/vm-1";
    api.instances
        .clone()
        .create_instance(compute::CreateInstanceRequest {
            parent: "projects/p1".into(),
            instance_id: "vm-1".into(),
            instance: Some(compute::Instance {
                flavor: "flavors/small".into(),
                image: "images/guest".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    let i = wait_state(&api, name, compute::InstanceState::Running).await?;
    assert_eq!(i.node, "nodes/node-1");
    eventually(WAIT, "the ready marker in the console log", || async {
        console_log(&tls, &address, name)
            .await
            .ok()
            .filter(|l| l.contains(READY_MARKER))
    })
    .await?;
    let dir = cluster.instance_dir();
    let disk = std::fs::metadata(dir.join("disk.raw"))?;
    assert_eq!(disk.len(), 1 << 30, "the flavor's disk size");
    console_round_trip(
        &tls,
        &address,
        name,
        "echo hi-from-agent-test",
        "ECHO hi-from-agent-test",
    )
    .await?;

    // Bad input to the agent's service: clear errors.
    let mut a = agent_client(&tls, &address).await?;
    let e = a
        .get_console_log(compute::GetConsoleLogRequest {
            name: "projects/p1/instances/../../etc".into(),
            max_bytes: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = a
        .get_console_log(compute::GetConsoleLogRequest {
            name: "projects/p1/instances/nope".into(),
            max_bytes: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Stop: STOPPED and the VM process is gone; start: RUNNING again.
    let pid = cluster.vm_pid().context("no state record")?;
    let guard = KillPid(pid);
    api.instances
        .clone()
        .stop_instance(compute::StopInstanceRequest {
            name: name.into(),
            timeout: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            request_id: String::new(),
        })
        .await?;
    wait_state(&api, name, compute::InstanceState::Stopped).await?;
    eventually(WAIT, "the stopped VM's process to end", || async {
        (!alive(pid)).then_some(())
    })
    .await?;
    assert!(
        console_log(&tls, &address, name)
            .await?
            .contains("SHUTDOWN"),
        "not a graceful stop"
    );
    drop(guard);
    api.instances
        .clone()
        .start_instance(compute::StartInstanceRequest {
            name: name.into(),
            request_id: String::new(),
        })
        .await?;
    wait_state(&api, name, compute::InstanceState::Running).await?;
    let pid = cluster.vm_pid().context("no state record after start")?;
    let _guard = KillPid(pid);
    assert!(alive(pid));

    // kill -9 the agent: the VM runs on; a new agent re-adopts it.
    agent.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(pid), "killing the agent killed its VM");
    let (agent2, address) = cluster.agent(None)?;
    let mut agent = agent2;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cluster.vm_pid(),
        Some(pid),
        "the VM was replaced, not adopted"
    );
    assert!(alive(pid));
    assert_eq!(
        instance_state(&api, name).await?.state,
        compute::InstanceState::Running as i32
    );
    console_round_trip(&tls, &address, name, "echo adopted", "ECHO adopted").await?;

    // The lease: with the agent dead, the VM fences itself...
    agent.kill();
    let st = eventually(
        Duration::from_millis(LEASE_MS.max(10_000) + 10_000),
        "the VM to fence itself",
        || async { vmm_status(&dir).filter(|s| s["fenced"] == true) },
    )
    .await?;
    assert_eq!(st["state"], "paused", "{st}");
    assert!(alive(pid));
    // ...and the next agent resumes it: its assignment still says RUNNING.
    let (_agent3, address) = cluster.agent(None)?;
    eventually(WAIT, "the agent to resume the fenced VM", || async {
        vmm_status(&dir).filter(|s| s["fenced"] == false && s["state"] == "running")
    })
    .await?;
    assert_eq!(cluster.vm_pid(), Some(pid));
    console_round_trip(&tls, &address, name, "echo resumed", "ECHO resumed").await?;

    // Reboot (a newer boot count): a fresh VM process, RUNNING again.
    let boots = instance_state(&api, name).await?.boot_count;
    api.instances
        .clone()
        .reboot_instance(compute::RebootInstanceRequest {
            name: name.into(),
            request_id: String::new(),
        })
        .await?;
    let new_pid = eventually(WAIT, "a new VM process after the reboot", || async {
        cluster.vm_pid().filter(|p| *p != pid && alive(*p))
    })
    .await?;
    let _guard2 = KillPid(new_pid);
    let i = wait_state(&api, name, compute::InstanceState::Running).await?;
    assert!(i.boot_count > boots, "{} !> {boots}", i.boot_count);
    assert!(!alive(pid), "the old VM process still runs");
    let pid = new_pid;

    // The guest powers itself off: STOPPED, and not booted again.
    console_round_trip(&tls, &address, name, "poweroff", "POWEROFF").await?;
    wait_state(&api, name, compute::InstanceState::Stopped).await?;
    eventually(WAIT, "the powered-off VM's process to end", || async {
        (!alive(pid)).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cluster.vm_pid(),
        None,
        "booted again after a guest poweroff"
    );
    api.instances
        .clone()
        .start_instance(compute::StartInstanceRequest {
            name: name.into(),
            request_id: String::new(),
        })
        .await?;
    wait_state(&api, name, compute::InstanceState::Running).await?;
    let pid = cluster
        .vm_pid()
        .context("no state record after the last start")?;
    let _guard3 = KillPid(pid);

    // Delete: gone from the API, the process ends, the directory goes.
    api.instances
        .clone()
        .delete_instance(compute::DeleteInstanceRequest {
            name: name.into(),
            request_id: String::new(),
        })
        .await?;
    eventually(WAIT, "the instance to be deleted", || async {
        match instance_state(&api, name).await {
            Err(s) if s.code() == Code::NotFound => Some(()),
            _ => None,
        }
    })
    .await?;
    eventually(WAIT, "the VM process to end", || async {
        (!alive(pid)).then_some(())
    })
    .await?;
    eventually(WAIT, "the instance directory to go", || async {
        (!dir.exists()).then_some(())
    })
    .await?;
    nodes = api.nodes.clone();
    let n = nodes
        .get_node(infra::GetNodeRequest {
            name: "nodes/node-1".into(),
        })
        .await?
        .into_inner();
    assert!(n.instances.is_empty(), "{:?}", n.instances);
    Ok(())
}

/// A guest that ignores the power button: the stop asks it (it says so on
/// its console), waits the stop's timeout, then the VM is forced off;
/// with a timeout of 0 the guest is not asked at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_ignoring_the_power_button_is_forced_off_after_the_timeout() -> anyhow::Result<()> {
    if skip_without_vms() {
        return Ok(());
    }
    let mut cluster = Cluster::start()?;
    let result = forced_stop(&mut cluster).await;
    if result.is_err() {
        eprintln!("{}", cluster.agent_logs());
    }
    result
}

async fn forced_stop(cluster: &mut Cluster) -> anyhow::Result<()> {
    let token = cluster.token()?;
    let api = api(&cluster.controller, &token, &cluster.ca_file()).await?;
    let tls = cluster.controller_tls()?;
    let (_agent, address) = cluster.agent(Some(&join_token(&api, "node-1").await?))?;
    node_up(&api).await?;
    catalog(&api).await?;
    let name = "projects/p1/instances/vm-1";
    create(&api, "vm-1", "small").await?;
    wait_state(&api, name, compute::InstanceState::Running).await?;
    eventually(WAIT, "the ready marker in the console log", || async {
        console_log(&tls, &address, name)
            .await
            .ok()
            .filter(|l| l.contains(READY_MARKER))
    })
    .await?;
    let pid = cluster.vm_pid().context("no state record")?;
    let _guard = KillPid(pid);
    console_round_trip(
        &tls,
        &address,
        name,
        "powerbutton ignore",
        "POWERBUTTON OK mode=ignore",
    )
    .await?;

    let asked = Instant::now();
    stop(&api, name, 2).await?;
    wait_state(&api, name, compute::InstanceState::Stopped).await?;
    eventually(WAIT, "the VM process to end", || async {
        (!alive(pid)).then_some(())
    })
    .await?;
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "the VM was off {took:?} after the stop, before its 2 s timeout"
    );
    let log = console_log(&tls, &address, name).await?;
    assert!(
        log.contains("NEPH-GUEST SHUTDOWN ignored"),
        "the guest was never asked to power off: {log}"
    );
    assert!(
        !log.contains("SHUTDOWN requested by the host"),
        "the guest obeyed: {log}"
    );
    let vmm_log = std::fs::read_to_string(cluster.instance_dir().join("vmm.log"))?;
    assert!(
        vmm_log.contains("did not power off within the shutdown timeout"),
        "the VMM did not force it off: {vmm_log}"
    );

    // Started again (the guest obeys the power button after a boot) and
    // stopped with a timeout of 0: forced off without being asked.
    api.instances
        .clone()
        .start_instance(compute::StartInstanceRequest {
            name: name.into(),
            request_id: String::new(),
        })
        .await?;
    wait_state(&api, name, compute::InstanceState::Running).await?;
    let pid = cluster
        .vm_pid()
        .context("no state record after the start")?;
    let _guard2 = KillPid(pid);
    console_round_trip(
        &tls,
        &address,
        name,
        "echo booted-again",
        "ECHO booted-again",
    )
    .await?;
    stop(&api, name, 0).await?;
    wait_state(&api, name, compute::InstanceState::Stopped).await?;
    eventually(WAIT, "the VM process to end", || async {
        (!alive(pid)).then_some(())
    })
    .await?;
    let log = console_log(&tls, &address, name).await?;
    assert_eq!(
        log.matches("NEPH-GUEST SHUTDOWN").count(),
        1,
        "a stop with timeout 0 asked the guest: {log}"
    );
    Ok(())
}

/// Resize small -> medium (1 -> 2 vCPUs, 256 -> 1024 MiB, 1 -> 4 GiB of
/// disk): the next boot has the new size, and its disk grew with the data
/// written before kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resized_instance_boots_with_its_new_flavor_and_a_grown_disk() -> anyhow::Result<()> {
    if skip_without_vms() {
        return Ok(());
    }
    let mut cluster = Cluster::start()?;
    let result = resized(&mut cluster).await;
    if result.is_err() {
        eprintln!("{}", cluster.agent_logs());
    }
    result
}

async fn resized(cluster: &mut Cluster) -> anyhow::Result<()> {
    let token = cluster.token()?;
    let api = api(&cluster.controller, &token, &cluster.ca_file()).await?;
    let tls = cluster.controller_tls()?;
    let (_agent, address) = cluster.agent(Some(&join_token(&api, "node-1").await?))?;
    node_up(&api).await?;
    catalog(&api).await?;
    api.flavors
        .clone()
        .create_flavor(compute::CreateFlavorRequest {
            flavor_id: "medium".into(),
            flavor: Some(compute::Flavor {
                name: String::new(),
                resources: Some(compute::Resources {
                    vcpus: 2,
                    memory_mib: 1024,
                    disk_gib: 4,
                }),
            }),
            request_id: String::new(),
        })
        .await?;
    let name = "projects/p1/instances/vm-1";
    create(&api, "vm-1", "small").await?;
    wait_state(&api, name, compute::InstanceState::Running).await?;
    let pid = cluster.vm_pid().context("no state record")?;
    let _guard = KillPid(pid);
    let seen =
        console_round_trip(&tls, &address, name, "diskwrite 100 8 42", "DISKWRITE OK").await?;
    let written = line_of(&seen, "DISKWRITE OK")?.to_owned();
    let fnv = field(&written, "fnv").context("no fnv")?.to_owned();

    stop(&api, name, 10).await?;
    wait_state(&api, name, compute::InstanceState::Stopped).await?;
    eventually(WAIT, "the VM process to end", || async {
        (!alive(pid)).then_some(())
    })
    .await?;
    let i = api
        .instances
        .clone()
        .resize_instance(compute::ResizeInstanceRequest {
            name: name.into(),
            flavor: "flavors/medium".into(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(i.flavor, "flavors/medium");
    api.instances
        .clone()
        .start_instance(compute::StartInstanceRequest {
            name: name.into(),
            request_id: String::new(),
        })
        .await?;
    wait_state(&api, name, compute::InstanceState::Running).await?;
    let pid = cluster
        .vm_pid()
        .context("no state record after the start")?;
    let _guard2 = KillPid(pid);
    let disk = std::fs::metadata(cluster.instance_dir().join("disk.raw"))?;
    assert_eq!(disk.len(), 4 << 30, "the disk grew to medium's 4 GiB");

    let seen = console_round_trip(&tls, &address, name, "info", "INFO ").await?;
    let info = line_of(&seen, "INFO ")?;
    assert_eq!(field(info, "cpus"), Some("2"), "{info}");
    assert_eq!(field(info, "mem_mib"), Some("1024"), "{info}");
    let seen = console_round_trip(&tls, &address, name, "blk info", "BLK OK").await?;
    let blk = line_of(&seen, "BLK OK")?;
    assert_eq!(
        field(blk, "capacity_sectors"),
        Some((4u64 << 30 >> 9).to_string().as_str()),
        "{blk}"
    );
    let seen =
        console_round_trip(&tls, &address, name, "diskverify 100 8 42", "DISKVERIFY").await?;
    let verified = line_of(&seen, "DISKVERIFY")?;
    assert!(verified.starts_with("DISKVERIFY OK"), "{verified}");
    assert_eq!(field(verified, "fnv"), Some(fnv.as_str()), "{verified}");
    Ok(())
}

/// What the controller serves on its port besides health and reflection.
const CONTROLLER_SERVICES: [&str; 12] = [
    "nephele.iam.v1.Iam",
    "nephele.compute.v1.Flavors",
    "nephele.compute.v1.Images",
    "nephele.compute.v1.Instances",
    "nephele.compute.v1.ServerGroups",
    "nephele.infra.v1.Nodes",
    "nephele.infra.v1.Migrations",
    "nephele.infra.v1.Cluster",
    "nephele.ops.v1.Operations",
    "nephele.ops.v1.Events",
    "nephele.node.v1.NodeAgent",
    "nephele.node.v1.NodeJoin",
];

/// Checks that `channel`'s server reports every one of `services` (and
/// itself, `""`) SERVING over grpc.health.v1, refuses an unknown name, and
/// lists exactly `services`, health and reflection over reflection, each
/// resolvable to its file.
async fn health_and_reflection(
    what: &str,
    channel: Channel,
    services: &[&str],
) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1 as reflection;
    let mut health = HealthClient::new(channel.clone());
    for service in services.iter().copied().chain([""]) {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .with_context(|| format!("{what}: health of {service:?}"))?
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "{what}: {service:?}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nephele.nope.v1.Nope".into(),
        })
        .await
        .expect_err("an unknown service has no health");
    assert_eq!(unknown.code(), Code::NotFound, "{what}: {unknown:?}");

    let mut client = reflection::server_reflection_client::ServerReflectionClient::new(channel);
    let ask = |req: reflection::server_reflection_request::MessageRequest| {
        reflection::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(req),
        }
    };
    let mut requests = vec![ask(
        reflection::server_reflection_request::MessageRequest::ListServices(String::new()),
    )];
    requests.extend(services.iter().map(|s| {
        ask(
            reflection::server_reflection_request::MessageRequest::FileContainingSymbol(
                (*s).to_owned(),
            ),
        )
    }));
    let asked = requests.len();
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .with_context(|| format!("{what}: reflection"))?
        .into_inner();
    let mut got = Vec::new();
    while let Some(a) = answers.message().await? {
        got.push(a.message_response.context("an empty reflection answer")?);
    }
    assert_eq!(got.len(), asked, "{what}: one answer per request");
    use reflection::server_reflection_response::MessageResponse as R;
    let R::ListServicesResponse(list) = &got[0] else {
        bail!("{what}: not a service list: {:?}", got[0]);
    };
    let mut listed: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    listed.sort_unstable();
    let mut want: Vec<&str> = services.to_vec();
    want.extend([
        nephele_proto::serve::HEALTH_SERVICE,
        nephele_proto::serve::REFLECTION_SERVICE,
    ]);
    want.sort_unstable();
    assert_eq!(listed, want, "{what}: the services reflection lists");
    for (service, answer) in services.iter().zip(&got[1..]) {
        assert!(
            matches!(answer, R::FileDescriptorResponse(f) if !f.file_descriptor_proto.is_empty()),
            "{what}: no descriptor of {service}: {answer:?}"
        );
    }
    Ok(())
}

/// Both daemons serve gRPC health and reflection: the controller on its
/// TLS port, the agent on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_daemons_answer_health_and_reflection() -> anyhow::Result<()> {
    let mut cluster = Cluster::start()?;
    nephele_tls::install_default();
    let token = cluster.token()?;
    let api = api(&cluster.controller, &token, &cluster.ca_file()).await?;
    let (_agent, address) = cluster.agent(Some(&join_token(&api, "node-1").await?))?;
    let tls = nephele_tls::server_auth_client_config(&std::fs::read(cluster.ca_file())?)?;
    let controller = nephele_tls::connect_channel(
        Channel::from_shared(format!("http://{}", cluster.controller))?,
        tls,
    )
    .await?;
    health_and_reflection("neph-controller", controller, &CONTROLLER_SERVICES).await?;
    // The agent's port is mutual TLS: health and reflection answer any
    // certificate of the cluster (here the controller's).
    let ctl = cluster.controller_tls()?;
    let config = ctl.client_config(nephele_tls::PeerPolicy::Exactly(
        nephele_tls::Identity::node("node-1")?,
    ))?;
    let agent =
        nephele_tls::connect_channel(Channel::from_shared(format!("http://{address}"))?, config)
            .await?;
    health_and_reflection("neph-node", agent, &["nephele.node.v1.Agent"]).await
}

/// A server verifier that accepts any certificate: a rogue client that does
/// not care whom it talks to, so that only the agent's side decides.
#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &nephele_tls::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &nephele_tls::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        nephele_tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rogue client config: trusts any server, presents `cert` (chain PEM
/// and key PEM) if given.
fn rogue_config(
    cert: Option<(&str, &str)>,
) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    let builder = rustls::ClientConfig::builder_with_provider(nephele_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer));
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(
            rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<_>, _>>()?,
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// GetConsoleLog of an instance the node does not have, over `config`
/// (plaintext without): NOT_FOUND means the call reached the service.
async fn probe(address: &str, config: Option<std::sync::Arc<rustls::ClientConfig>>) -> Code {
    let endpoint = Channel::from_shared(format!("http://{address}"))
        .expect("url")
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    let channel = match config {
        Some(c) => nephele_tls::lazy_channel(endpoint, c),
        None => endpoint.connect_lazy(),
    };
    match node::agent_client::AgentClient::new(channel)
        .get_console_log(compute::GetConsoleLogRequest {
            name: "projects/p1/instances/nope".into(),
            max_bytes: 0,
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// A refused handshake surfaces as a transport failure (in TLS 1.3 the
/// client may finish first and see the refusal only on its first read).
fn transport_refused(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Cancelled | Code::Unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_port_admits_only_controllers() -> anyhow::Result<()> {
    let mut cluster = Cluster::start()?;
    let result = port_scenario(&mut cluster).await;
    if result.is_err() {
        eprintln!("{}", cluster.agent_logs());
    }
    result
}

async fn port_scenario(cluster: &mut Cluster) -> anyhow::Result<()> {
    let token = cluster.token()?;
    let api = api(&cluster.controller, &token, &cluster.ca_file()).await?;
    let (_agent, address) = cluster.agent(Some(&join_token(&api, "node-1").await?))?;
    let ctl = cluster.controller_tls()?;

    // The controller's certificate, pinned to this node: the call reaches
    // the service.
    let pinned = ctl.client_config(nephele_tls::PeerPolicy::Exactly(
        nephele_tls::Identity::node("node-1")?,
    ))?;
    assert_eq!(probe(&address, Some(pinned)).await, Code::NotFound);

    // An oversized request is refused before the service sees it, and the
    // port keeps serving.
    let mut a = agent_client(&ctl, &address).await?;
    let e = a
        .get_console_log(compute::GetConsoleLogRequest {
            name: "x".repeat(neph_node::service::MAX_DECODING_MESSAGE_SIZE + 1),
            max_bytes: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(compute::ConsoleRequest {
        name: "projects/p1/instances/nope".into(),
        input: vec![b'x'; neph_node::service::MAX_DECODING_MESSAGE_SIZE + 1],
    })
    .await?;
    let e = match a
        .console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner().message().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert_eq!(
        probe(
            &address,
            Some(ctl.client_config(nephele_tls::PeerPolicy::Exactly(
                nephele_tls::Identity::node("node-1")?,
            ))?)
        )
        .await,
        Code::NotFound
    );

    // A controller expecting another node refuses this one (a machine that
    // took over a node's address is not that node).
    let other = ctl.client_config(nephele_tls::PeerPolicy::Exactly(
        nephele_tls::Identity::node("node-2")?,
    ))?;
    let code = probe(&address, Some(other)).await;
    assert!(transport_refused(code), "pinned to node-2: {code:?}");

    // Plaintext gets nothing.
    let code = probe(&address, None).await;
    assert!(
        code != Code::Ok && code != Code::NotFound,
        "plaintext: {code:?}"
    );

    // No client certificate: the handshake is refused.
    let code = probe(&address, Some(rogue_config(None)?)).await;
    assert!(transport_refused(code), "no certificate: {code:?}");

    // A controller certificate from another CA (same cluster id even).
    let foreign = nephele_tls::Ca::create("5")?;
    let (cert, key) = foreign.issue(
        &nephele_tls::Identity::controller("1")?,
        &nephele_tls::IssueOptions::for_addresses(["127.0.0.1"]),
    )?;
    let code = probe(&address, Some(rogue_config(Some((&cert.chain_pem, &key)))?)).await;
    assert!(transport_refused(code), "another CA: {code:?}");

    // A node certificate of this cluster (another node joined for it): the
    // handshake passes, the service refuses it.
    let t = join_token(&api, "node-2").await?;
    let req = nephele_tls::CertRequest::generate(&nephele_tls::Identity::node("node-2")?, "5")?;
    let server_auth = nephele_tls::server_auth_client_config(&std::fs::read(cluster.ca_file())?)?;
    let channel = nephele_tls::connect_channel(
        Channel::from_shared(format!("http://{}", cluster.controller))?,
        server_auth,
    )
    .await?;
    let joined = node::node_join_client::NodeJoinClient::new(channel)
        .join(node::JoinRequest {
            token: t,
            node_id: "node-2".into(),
            csr_pem: req.csr_pem,
        })
        .await?
        .into_inner();
    let code = probe(
        &address,
        Some(rogue_config(Some((&joined.cert_pem, &req.key_pem)))?),
    )
    .await;
    assert_eq!(code, Code::PermissionDenied, "a node certificate");
    Ok(())
}

/// The serial of the node's certificate on disk.
fn node_serial(cluster: &Cluster) -> anyhow::Result<String> {
    let files = nephele_tls::TlsFiles::in_dir(&cluster.data_dir.join("tls"));
    Ok(
        nephele_tls::TlsContext::load(&files, nephele_tls::Revocations::new())?
            .identity()
            .serial,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_certificate_before_it_expires() -> anyhow::Result<()> {
    // Node certificates live 15 s: the agent renews at about 10 s.
    let mut cluster = Cluster::start_with_env(&[("NEPHELE_NODE_CERT_VALIDITY_S", "15")])?;
    let result = renewal_scenario(&mut cluster).await;
    if result.is_err() {
        eprintln!("{}", cluster.agent_logs());
    }
    result
}

async fn renewal_scenario(cluster: &mut Cluster) -> anyhow::Result<()> {
    let token = cluster.token()?;
    let api = api(&cluster.controller, &token, &cluster.ca_file()).await?;
    let (_agent, address) = cluster.agent(Some(&join_token(&api, "node-1").await?))?;
    let first = node_serial(cluster)?;
    let joined = Instant::now();
    let renewed = eventually(Duration::from_secs(30), "a renewed certificate", || async {
        node_serial(cluster).ok().filter(|s| *s != first)
    })
    .await?;
    let after = joined.elapsed();
    assert!(
        after >= Duration::from_secs(7),
        "renewed after {after:?}, long before two thirds of 15 s"
    );
    assert!(
        !cluster.data_dir.join("tls/cert.pem.next").exists()
            && !cluster.data_dir.join("tls/key.pem.next").exists(),
        "a renewal left its files behind"
    );
    // Past the first certificate's expiry the node works on the new one:
    // the controller reaches its port, and it keeps heartbeating.
    tokio::time::sleep(Duration::from_secs(16).saturating_sub(joined.elapsed())).await;
    let ctl = cluster.controller_tls()?;
    let pinned = ctl.client_config(nephele_tls::PeerPolicy::Exactly(
        nephele_tls::Identity::node("node-1")?,
    ))?;
    assert_eq!(probe(&address, Some(pinned)).await, Code::NotFound);
    let mut nodes = api.nodes.clone();
    let before = nodes
        .get_node(infra::GetNodeRequest {
            name: "nodes/node-1".into(),
        })
        .await?
        .into_inner()
        .last_heartbeat;
    eventually(WAIT, "a heartbeat with the renewed certificate", || {
        let mut nodes = nodes.clone();
        async move {
            let n = nodes
                .get_node(infra::GetNodeRequest {
                    name: "nodes/node-1".into(),
                })
                .await
                .ok()?
                .into_inner();
            (n.state == infra::NodeState::Up as i32 && n.last_heartbeat != before).then_some(())
        }
    })
    .await?;
    // The renewal is in the node's events.
    let events = api
        .events
        .clone()
        .list_events(nephele_proto::ops::v1::ListEventsRequest {
            resource: "nodes/node-1".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "node.certificate_renewed" && e.message == renewed),
        "{events:#?}"
    );
    Ok(())
}
