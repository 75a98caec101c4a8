//! `neph` against a real `neph-controller` process on loopback: output
//! formats, exit codes (0 ok, 1 API error, 2 usage, 3 wait timed out) and
//! error messages. A fake compute node (`fake_node`, a test double that only
//! registers and heartbeats over the node protocol) lets instances be
//! scheduled; nothing runs them, which is what the `--wait` timeout needs.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nephele_proto::compute::v1 as compute;
use nephele_proto::infra::v1 as infra;
use nephele_proto::node::v1 as node;

/// The controller binary next to `neph`: `cargo xtask test` builds every
/// workspace binary before the suite; a bare `cargo nextest run -p neph`
/// builds it here.
fn controller_binary() -> PathBuf {
    let neph = PathBuf::from(env!("CARGO_BIN_EXE_neph"));
    let dir = neph.parent().expect("target dir").to_path_buf();
    let binary = dir.join("neph-controller");
    if !binary.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "neph-controller", "--bin", "neph-controller"])
            .status()
            .expect("run cargo");
        assert!(status.success(), "cannot build neph-controller");
    }
    binary
}

struct Controller {
    child: Child,
    address: String,
    token_file: PathBuf,
    /// The cluster CA certificate `init` made (`<data>/tls/ca.pem`).
    ca_file: PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_controller(data: &Path) -> Controller {
    launch(
        &[
            "init",
            "--id",
            "1",
            "--cluster-id",
            "9",
            "--listen",
            "127.0.0.1:0",
        ],
        data,
        true,
    )
}

/// Starts `neph-controller ARGS --data-dir DATA` and waits for its
/// `LISTENING` line (and with `token`, its `ADMIN_TOKEN_FILE` line).
fn launch(args: &[&str], data: &Path, token: bool) -> Controller {
    let mut cmd = Command::new(controller_binary());
    cmd.args(args);
    if !args.contains(&"--operator-key-file") {
        cmd.arg("--operator-key-file")
            .arg(data.join("operator.key"));
    }
    let mut child = cmd
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start neph-controller");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut address = None;
    let mut token_file = (!token).then(|| data.join("admin.token"));
    while address.is_none() || token_file.is_none() {
        let line = lines.next().expect("controller output").expect("line");
        if let Some(a) = line.strip_prefix("LISTENING ") {
            address = Some(a.to_owned());
        } else if let Some(f) = line.strip_prefix("ADMIN_TOKEN_FILE ") {
            token_file = Some(PathBuf::from(f));
        }
    }
    Controller {
        child,
        address: address.unwrap_or_default(),
        token_file: token_file.unwrap_or_default(),
        ca_file: data.join("tls").join("ca.pem"),
    }
}

struct Neph {
    config_home: tempfile::TempDir,
}

impl Neph {
    fn new(c: &Controller) -> Neph {
        let config_home = tempfile::tempdir().expect("tempdir");
        let dir = config_home.path().join("nephele");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "default_profile = \"t\"\n[profiles.t]\nendpoint = \"{}\"\ntoken_file = \"{}\"\nca_file = \"{}\"\nproject = \"p1\"\n\n[profiles.nobody]\nendpoint = \"{}\"\ntoken = \"nph_admin_bootstrap-1_0000\"\nca_file = \"{}\"\n\n[profiles.noca]\nendpoint = \"{}\"\ntoken_file = \"{}\"\n",
                c.address,
                c.token_file.display(),
                c.ca_file.display(),
                c.address,
                c.ca_file.display(),
                c.address,
                c.token_file.display(),
            ),
        )
        .expect("write config");
        Neph { config_home }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run neph")
    }

    /// `neph ARGS` with this profile, not started yet.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_neph"));
        c.args(args)
            .env("XDG_CONFIG_HOME", self.config_home.path())
            .env_remove("NEPHELE_ENDPOINT")
            .env_remove("NEPHELE_TOKEN")
            .env_remove("NEPHELE_TOKEN_FILE")
            .env_remove("NEPHELE_PROJECT")
            .env_remove("NEPHELE_PROFILE")
            .env_remove("NEPHELE_CA_FILE");
        c
    }

    /// Runs and checks the exit code; returns stdout.
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

    /// Creates flavor `small`, image `guest` and project `p1`.
    fn catalog(&self) {
        let small = [
            "flavor",
            "create",
            "small",
            "--vcpus",
            "1",
            "--memory-mib",
            "256",
        ];
        self.expect(&small, 0);
        self.expect(&["image", "create", "guest"], 0);
        self.expect(&["project", "create", "p1"], 0);
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let (out, _) = self.expect(&a, 0);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("neph {args:?}: {e}: {out}"))
    }
}

/// The load the fake node reports with every heartbeat.
const FAKE_LOAD: infra::Load = infra::Load {
    cpu_busy: 0.25,
    memory_used_mib: 64,
    running_vms: 1,
};

/// Registers `nodes/n1` and heartbeats it in the background until a
/// heartbeat is refused; the thread returns that refusal.
fn fake_node(c: &Controller, token: &str) -> std::thread::JoinHandle<tonic::Status> {
    fake_node_with(c, token, false)
}

/// [`fake_node`]; with `serve`, it also serves `EchoAgent` at its
/// registered address and reports what it is told to run as RUNNING. It
/// joins like a real node (a join token made for `n1`, its CSR signed by
/// the controller) and uses its certificate both ways: mutual TLS to the
/// controller, and on its `Agent` port, which the controller's console
/// relay dials with its own certificate.
fn fake_node_with(
    c: &Controller,
    token: &str,
    serve: bool,
) -> std::thread::JoinHandle<tonic::Status> {
    let (address, token) = (format!("http://{}", c.address), token.trim().to_owned());
    nephele_tls::install_default();
    let ca_pem = std::fs::read(&c.ca_file).expect("ca.pem");
    let tls = nephele_tls::server_auth_client_config(&ca_pem).expect("CA");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let endpoint = tonic::transport::Channel::from_shared(address).expect("url");
            let anonymous = nephele_tls::connect_channel(endpoint.clone(), tls)
                .await
                .expect("connect");
            let header: tonic::metadata::MetadataValue<_> =
                format!("Bearer {token}").parse().expect("ascii");
            let join_token = infra::nodes_client::NodesClient::with_interceptor(
                anonymous.clone(),
                move |mut r: tonic::Request<()>| {
                    r.metadata_mut().insert("authorization", header.clone());
                    Ok(r)
                },
            )
            .create_join_token(infra::CreateJoinTokenRequest {
                ttl: None,
                node_id: "n1".into(),
            })
            .await
            .expect("join token")
            .into_inner()
            .token;
            let cluster = nephele_tls::ca::cluster_of_ca_pem(&ca_pem).expect("cluster id");
            let csr = nephele_tls::CertRequest::generate(
                &nephele_tls::Identity::node("n1").expect("id"),
                &cluster,
            )
            .expect("csr");
            let joined = node::node_join_client::NodeJoinClient::new(anonymous)
                .join(node::JoinRequest {
                    token: join_token,
                    node_id: "n1".into(),
                    csr_pem: csr.csr_pem,
                })
                .await
                .expect("join")
                .into_inner();
            let dir = tempfile::tempdir().expect("tempdir");
            let files = nephele_tls::TlsFiles::in_dir(dir.path());
            std::fs::write(&files.cert, &joined.cert_pem).expect("cert");
            std::fs::write(&files.key, &csr.key_pem).expect("key");
            std::fs::write(&files.ca, &joined.ca_pem).expect("ca");
            let ctx = nephele_tls::TlsContext::load(&files, nephele_tls::Revocations::new())
                .expect("node TLS");
            let mtls = ctx
                .client_config(nephele_tls::PeerPolicy::Kind(
                    nephele_tls::IdentityKind::Controller,
                ))
                .expect("client config");
            let channel = nephele_tls::connect_channel(endpoint, mtls)
                .await
                .expect("connect with the node certificate");
            let mut agent = node::node_agent_client::NodeAgentClient::new(channel);
            let agent_address = if serve {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let a = listener.local_addr().expect("address").to_string();
                let incoming = nephele_tls::TlsIncoming::new(
                    listener,
                    ctx.server_config(nephele_tls::ClientAuth::Required)
                        .expect("server config"),
                );
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(node::agent_server::AgentServer::with_interceptor(
                            EchoAgent,
                            nephele_tls::RequirePeer::kind(
                                nephele_tls::IdentityKind::Controller,
                                nephele_tls::Revocations::new(),
                            ),
                        ))
                        .serve_with_incoming(incoming),
                );
                a
            } else {
                "127.0.0.1:1".to_owned()
            };
            agent
                .register_node(node::RegisterNodeRequest {
                    node_id: "n1".into(),
                    address: agent_address,
                    capacity: Some(compute::Resources {
                        vcpus: 4,
                        memory_mib: 4096,
                        disk_gib: 100,
                    }),
                    labels: Default::default(),
                })
                .await
                .expect("register");
            let _ = ready_tx.send(());
            // The node's files live as long as it does.
            let _dir = dir;
            loop {
                let beat = agent
                    .heartbeat(node::HeartbeatRequest {
                        node: "nodes/n1".into(),
                        load: Some(FAKE_LOAD),
                        instances: vec![],
                    })
                    .await;
                if let Err(refused) = beat {
                    return refused;
                }
                if serve {
                    run_assignments(&mut agent).await;
                }
                tokio::time::sleep(Duration::from_millis(if serve { 100 } else { 500 })).await;
            }
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("node registered");
    handle
}

/// Reports every instance assigned to run (and not running) as RUNNING.
async fn run_assignments<T>(agent: &mut node::node_agent_client::NodeAgentClient<T>)
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let Ok(a) = agent
        .get_assignments(node::WatchAssignmentsRequest {
            node: "nodes/n1".into(),
        })
        .await
    else {
        return;
    };
    for a in a.into_inner().assignments {
        let Some(i) = a.instance else { continue };
        if a.desired == node::DesiredState::DesiredRunning as i32
            && i.state != compute::InstanceState::Running as i32
        {
            let _ = agent
                .report_instance_state(node::ReportInstanceStateRequest {
                    node: "nodes/n1".into(),
                    instance: i.name,
                    state: node::ReportedState::ReportedRunning as i32,
                    reason: String::new(),
                    boot_count: i.boot_count,
                })
                .await;
        }
    }
}

/// A test double for a node agent's `Agent` service: answers every typed
/// chunk with `echo: <chunk>`; its console log is [`LOG`].
struct EchoAgent;

const LOG: &[u8] = b"NEPH-GUEST BOOT\nready\n";

type Output = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<compute::ConsoleResponse, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl node::agent_server::Agent for EchoAgent {
    type ConsoleStream = Output;

    async fn console(
        &self,
        req: tonic::Request<tonic::Streaming<compute::ConsoleRequest>>,
    ) -> Result<tonic::Response<Output>, tonic::Status> {
        let mut input = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(m)) = input.message().await {
                if m.input.is_empty() {
                    continue;
                }
                let mut output = b"echo: ".to_vec();
                output.extend_from_slice(&m.input);
                if tx
                    .send(Ok(compute::ConsoleResponse { output }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_console_log(
        &self,
        req: tonic::Request<compute::GetConsoleLogRequest>,
    ) -> Result<tonic::Response<compute::ConsoleLog>, tonic::Status> {
        let max = usize::try_from(req.into_inner().max_bytes).unwrap_or(usize::MAX);
        Ok(tonic::Response::new(compute::ConsoleLog {
            data: LOG[LOG.len().saturating_sub(max)..].to_vec(),
        }))
    }
}

#[test]
fn formats_exit_codes_and_errors() {
    let data = tempfile::tempdir().expect("tempdir");
    let c = start_controller(data.path());
    let neph = Neph::new(&c);

    // Usage errors exit 2, before any connection.
    neph.expect(&["bogus"], 2);
    neph.expect(&["instance", "create", "x"], 2);
    neph.expect(&["instance", "list", "-o", "xml"], 2);
    let (out, _) = neph.expect(&["--help"], 0);
    assert!(out.contains("instance"));
    let (out, _) = neph.expect(&["completion", "bash"], 0);
    assert!(out.contains("neph"));
    let (_, err) = neph.expect(&["--profile", "missing", "flavor", "list"], 2);
    assert!(err.contains("profile \"missing\""), "{err}");

    // Cluster resources as the bootstrap admin, in every format.
    let f = neph.json(&[
        "flavor",
        "create",
        "small",
        "--vcpus",
        "1",
        "--memory-mib",
        "256",
        "--disk-gib",
        "1",
    ]);
    assert_eq!(f["name"], "small");
    assert_eq!(f["vcpus"], 1);
    let (yaml, _) = neph.expect(&["image", "create", "guest", "-o", "yaml"], 0);
    assert!(yaml.contains("name: guest"), "{yaml}");
    let (table, _) = neph.expect(&["project", "create", "p1", "--instances", "5"], 0);
    assert!(table.contains("p1"), "{table}");
    let (table, _) = neph.expect(&["flavor", "list"], 0);
    assert!(table.contains("NAME") && table.contains("small"), "{table}");
    let status = neph.json(&["cluster", "status"]);
    assert_eq!(status["leader_id"], 1);

    // API errors exit 1 and say what to do.
    let (_, err) = neph.expect(
        &[
            "instance", "create", "web-1", "--flavor", "small", "--image", "guest",
        ],
        1,
    );
    assert!(
        err.contains("NO_VALID_HOST") && err.contains("neph node list"),
        "{err}"
    );
    let (_, err) = neph.expect(&["instance", "get", "nope"], 1);
    assert!(err.contains("NOT_FOUND"), "{err}");
    let (_, err) = neph.expect(&["--profile", "nobody", "flavor", "list"], 1);
    assert!(
        err.contains("UNAUTHENTICATED") && err.contains("token"),
        "{err}"
    );
    let (_, err) = neph.expect(&["--endpoint", "127.0.0.1:1", "flavor", "list"], 1);
    assert!(err.contains("cannot reach the controller"), "{err}");
    let (_, err) = neph.expect(&["--profile", "nobody", "instance", "list"], 2);
    assert!(err.contains("project"), "{err}");

    // With a (fake) node, creates succeed; nothing runs the instance, so
    // waiting for it times out with exit 3.
    let token = std::fs::read_to_string(&c.token_file).expect("token file");
    let _node = fake_node(&c, &token);
    let op = neph.json(&[
        "instance", "create", "web-1", "--flavor", "small", "--image", "guest",
    ]);
    assert_eq!(op["verb"], "create");
    assert_eq!(op["done"], false);
    let (_, err) = neph.expect(
        &[
            "instance",
            "create",
            "web-2",
            "--flavor",
            "small",
            "--image",
            "guest",
            "--wait",
            "--timeout",
            "2",
        ],
        3,
    );
    assert!(err.contains("neph operation wait"), "{err}");
    let list = neph.json(&["instance", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, ["web-1", "web-2"]);
    let (_, err) = neph.expect(
        &[
            "instance", "create", "web-1", "--flavor", "small", "--image", "guest",
        ],
        1,
    );
    assert!(err.contains("ALREADY_EXISTS"), "{err}");
    let events = neph.json(&["event", "list"]);
    assert!(
        events
            .as_array()
            .expect("array")
            .iter()
            .any(|e| e["kind"] == "instance.scheduled"),
        "{events}"
    );
    // The refused duplicate is in the audit trail: who, what, from where,
    // and the result.
    let audit = neph.json(&["event", "list", "--audit"]);
    let refused = audit
        .as_array()
        .expect("array")
        .iter()
        .find(|r| {
            r["rpc"] == "/nephele.compute.v1.Instances/CreateInstance"
                && r["result"].as_str().is_some_and(|t| t.contains("exists"))
        })
        .unwrap_or_else(|| panic!("no refused create in {audit}"));
    assert!(
        refused["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("users/"))
    );
    assert!(
        refused["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    );
    assert_eq!(refused["resource"], "projects/p1/instances/web-1");
    let nodes = neph.json(&["node", "list"]);
    assert_eq!(nodes[0]["name"], "n1");
}

#[test]
fn set_quota_changes_only_the_limits_given() {
    let data = tempfile::tempdir().expect("tempdir");
    let c = start_controller(data.path());
    let neph = Neph::new(&c);
    neph.expect(
        &[
            "project",
            "create",
            "p1",
            "--instances",
            "5",
            "--vcpus",
            "7",
            "--memory-mib",
            "2048",
            "--disk-gib",
            "30",
        ],
        0,
    );
    let limits = |p: &serde_json::Value| {
        ["instances", "vcpus", "memory_mib", "disk_gib"]
            .map(|k| p[k].as_str().unwrap_or_default().to_owned())
    };
    let p = neph.json(&["project", "set-quota", "p1", "--instances", "50"]);
    assert_eq!(limits(&p), ["0/50", "0/7", "0/2048", "0/30"], "{p}");
    let p = neph.json(&[
        "project",
        "set-quota",
        "p1",
        "--vcpus",
        "9",
        "--disk-gib",
        "40",
    ]);
    assert_eq!(limits(&p), ["0/50", "0/9", "0/2048", "0/40"], "{p}");
    let p = neph.json(&["project", "get", "p1"]);
    assert_eq!(limits(&p), ["0/50", "0/9", "0/2048", "0/40"], "{p}");
    // Nothing to change is a usage error, before any call.
    let (_, err) = neph.expect(&["project", "set-quota", "p1"], 2);
    assert!(err.contains("--instances"), "{err}");
}

/// A controller that can never serve anything: its only peer does not
/// exist, so it never has a quorum (every call ends UNAVAILABLE).
/// Its certificate comes from the CA of the controller whose data
/// directory is `ca_of`, so one profile trusts both.
fn start_quorumless_controller(data: &Path, ca_of: &Path) -> Controller {
    let key = ca_of.join("operator.key");
    let sealed = ca_of.join("tls").join("ca.sealed");
    let args = [
        "init",
        "--id",
        "1",
        "--cluster-id",
        "9",
        "--listen",
        "127.0.0.1:0",
        "--peers",
        "2=127.0.0.1:1",
        "--operator-key-file",
        key.to_str().expect("utf-8"),
        "--sealed-ca",
        sealed.to_str().expect("utf-8"),
    ];
    launch(&args, data, false)
}

/// Restarts a controller from its data directory.
fn restart_controller(data: &Path) -> Controller {
    launch(
        &["run", "--id", "1", "--listen", "127.0.0.1:0"],
        data,
        false,
    )
}

#[test]
fn creates_are_idempotent_across_kill_9_and_fail_over_to_another_endpoint() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut c = start_controller(data.path());
    let neph = Neph::new(&c);
    neph.catalog();
    let token = std::fs::read_to_string(&c.token_file).expect("token file");
    let node = fake_node(&c, &token);
    let create = [
        "instance",
        "create",
        "web",
        "--flavor",
        "small",
        "--image",
        "guest",
        "--ha",
        "--request-id",
        "r-web",
    ];
    let first = neph.json(&create);
    let web = neph.json(&["instance", "get", "web"]);
    assert_eq!(web["ha"], true);
    assert_eq!(web["boot_count"], 1);

    // kill -9 after the commit, restart from the data directory: the retry
    // gets the very same operation (the request id lives in the replicated
    // state), and nothing is created twice.
    let _ = c.child.kill();
    let _ = c.child.wait();
    let _ = node.join();
    let c = restart_controller(data.path());
    let quorumless_data = tempfile::tempdir().expect("tempdir");
    let dead = start_quorumless_controller(quorumless_data.path(), data.path());
    // A profile whose first controller cannot serve: neph moves on to the
    // next with the same request id.
    let dir = neph.config_home.path().join("nephele");
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "default_profile = \"t\"\n[profiles.t]\nendpoints = [\"{}\", \"{}\"]\ntoken_file = \"{}\"\nca_file = \"{}\"\nproject = \"p1\"\n",
            dead.address,
            c.address,
            c.token_file.display(),
            c.ca_file.display()
        ),
    )
    .expect("write config");
    let mut args = create.to_vec();
    args.extend(["-o", "json"]);
    let (out, err) = neph.expect(&args, 0);
    let again: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(again["name"], first["name"], "{out}");
    assert!(err.contains("trying"), "{err}");
    // Reads of one instance move on too.
    let web = neph.json(&["instance", "get", "web"]);
    assert_eq!(web["ha"], true);
    let list = neph.json(&["--endpoint", &c.address, "instance", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    // Bad input is not retried elsewhere: it fails at once.
    let endpoints = format!("{},{}", c.address, dead.address);
    let (_, err) = neph.expect(
        &[
            "--endpoint",
            &endpoints,
            "instance",
            "create",
            "Bad_Name",
            "--flavor",
            "small",
            "--image",
            "guest",
        ],
        1,
    );
    assert!(
        err.contains("INVALID_ARGUMENT") && !err.contains("trying"),
        "{err}"
    );
}

#[test]
fn console_from_a_pipe_console_log_and_event_watch() {
    let data = tempfile::tempdir().expect("tempdir");
    let c = start_controller(data.path());
    let neph = Neph::new(&c);
    neph.catalog();
    let token = std::fs::read_to_string(&c.token_file).expect("token file");
    let _node = fake_node_with(&c, &token, true);
    let web = neph.json(&[
        "instance",
        "create",
        "web",
        "--flavor",
        "small",
        "--image",
        "guest",
        "--wait",
        "--timeout",
        "20",
    ]);
    assert_eq!(web["state"], "RUNNING", "{web}");

    // From a pipe: every line goes in, the echoes come out, and neph exits
    // once the input ended and the output settled.
    let mut child = neph
        .command(&["instance", "console", "web", "--settle-ms", "500"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn neph");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"uname\n").expect("write");
        stdin.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(300));
        stdin.write_all(b"ls\n").expect("write");
    }
    let out = child.wait_with_output().expect("neph console");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout, "echo: uname\necho: ls\n");

    terminal_console(&neph, &c.address);

    let (log, _) = neph.expect(&["instance", "console-log", "web", "--max-bytes", "6"], 0);
    assert_eq!(log, "ready\n");

    // Watch from the newest event on: a reboot shows up with who did it.
    let events = neph.json(&["event", "list"]);
    let last = events
        .as_array()
        .and_then(|e| e.last())
        .and_then(|e| e["seq"].as_u64())
        .expect("an event");
    let after = last.to_string();
    let mut watch = neph
        .command(&["event", "watch", "--after", &after, "-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watch");
    neph.expect(
        &["instance", "reboot", "web", "--wait", "--timeout", "20"],
        0,
    );
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    while let Some(Ok(line)) = lines.next() {
        let e: serde_json::Value = serde_json::from_str(&line).expect("json line");
        assert!(e["seq"].as_u64() > Some(last), "{e}");
        let done = e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("STARTING -> RUNNING"));
        seen.push(e);
        if done {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(
        seen.iter().any(|e| e["actor"] == "users/admin"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("reboot requested"))),
        "{seen:?}"
    );
}

/// `neph instance console web` on a terminal (a pty from util-linux
/// `script`): raw input reaches the guest, Ctrl-] detaches with exit 0.
fn terminal_console(neph: &Neph, endpoint: &str) {
    use std::io::Write as _;
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipping the terminal console check: no `script` (util-linux) here");
        return;
    }
    let line = format!(
        "{} --endpoint {endpoint} instance console web",
        env!("CARGO_BIN_EXE_neph")
    );
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &line, "/dev/null"])
        .env("XDG_CONFIG_HOME", neph.config_home.path())
        .env_remove("NEPHELE_ENDPOINT")
        .env_remove("NEPHELE_PROFILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start script");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stdout = child.stdout.take().expect("stdout");
    let sink = seen.clone();
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = sink.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let wait_for = |what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !seen.lock().map(|s| s.contains(what)).unwrap_or(false) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {what:?} on the terminal: {:?}",
                seen.lock().map(|s| s.clone())
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut stdin = child.stdin.take().expect("stdin");
    wait_for("Escape character is '^]'");
    // Let neph switch the terminal to raw mode after its banner.
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(b"uname\r").expect("type");
    stdin.flush().expect("flush");
    wait_for("echo: uname\r");
    stdin.write_all(&[0x1d]).expect("detach key");
    stdin.flush().expect("flush");
    wait_for("detached");
    let status = child.wait().expect("script");
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_controller_is_verified_against_the_profile_ca() {
    let data = tempfile::tempdir().expect("tempdir");
    let c = start_controller(data.path());
    let neph = Neph::new(&c);
    // The profile's CA verifies the controller.
    neph.expect(&["flavor", "list"], 0);

    // A certificate from another cluster's CA is refused, and said so.
    let other = tempfile::tempdir().expect("tempdir");
    let pem = {
        nephele_tls::install_default();
        nephele_tls::Ca::create("other")
            .expect("CA")
            .cert_pem()
            .to_owned()
    };
    let wrong = other.path().join("ca.pem");
    std::fs::write(&wrong, pem).expect("write");
    let wrong_flag = wrong.to_str().expect("utf-8");
    let (_, err) = neph.expect(&["--ca-file", wrong_flag, "flavor", "list"], 1);
    assert!(
        err.contains("is not trusted") && err.contains("UnknownIssuer"),
        "{err}"
    );

    // No CA at all: a usage error that says where to get one.
    let (_, err) = neph.expect(&["--profile", "noca", "flavor", "list"], 2);
    assert!(
        err.contains("no CA certificate") && err.contains("--ca-file"),
        "{err}"
    );
    // A file that is not a certificate.
    let junk = other.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").expect("write");
    let (_, err) = neph.expect(
        &["--ca-file", junk.to_str().expect("utf-8"), "flavor", "list"],
        2,
    );
    assert!(err.contains("no usable CA certificate"), "{err}");

    // A plaintext client gets nothing from the port.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let plain = rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", c.address))
            .expect("url")
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(3))
            .connect()
            .await?;
        compute::flavors_client::FlavorsClient::new(channel)
            .list_flavors(compute::ListFlavorsRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| anyhow::anyhow!("{s}"))?;
        anyhow::Ok(())
    });
    assert!(plain.is_err(), "a plaintext call was answered");
}

#[test]
fn node_remove_takes_a_node_out_for_good() {
    let data = tempfile::tempdir().expect("tempdir");
    let c = start_controller(data.path());
    let neph = Neph::new(&c);
    let token = std::fs::read_to_string(&c.token_file).expect("token file");
    let node = fake_node(&c, &token);
    let list = neph.json(&["node", "list"]);
    assert_eq!(list[0]["name"], "n1", "{list}");
    let (_, err) = neph.expect(&["node", "remove", "n1"], 0);
    assert!(err.contains("removed nodes/n1"), "{err}");
    let list = neph.json(&["node", "list"]);
    assert_eq!(list, serde_json::json!([]), "{list}");
    // The node's own calls are refused from then on: its loop ends, on
    // the revocation.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !node.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the removed node's heartbeats are still answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = node.join().expect("the fake node's thread");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    // No join token for it any more, and no second removal.
    let (_, err) = neph.expect(&["node", "join-token", "create", "--node", "n1"], 1);
    assert!(err.contains("removed"), "{err}");
    let (_, err) = neph.expect(&["node", "remove", "n1"], 1);
    assert!(err.contains("removed"), "{err}");
}

#[test]
fn instance_list_filters_by_label_state_and_node() {
    let data = tempfile::tempdir().expect("tempdir");
    let c = start_controller(data.path());
    let neph = Neph::new(&c);
    neph.catalog();
    let token = std::fs::read_to_string(&c.token_file).expect("token file");
    let _node = fake_node(&c, &token);
    for (id, labels) in [
        ("web-1", &["tier=web", "env=prod"][..]),
        ("web-2", &["tier=web", "env=dev"]),
        ("db-1", &["tier=db"]),
    ] {
        let mut args = vec![
            "instance", "create", id, "--flavor", "small", "--image", "guest",
        ];
        for l in labels {
            args.extend(["--label", l]);
        }
        neph.expect(&args, 0);
    }
    let names = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["instance", "list"];
        a.extend(args);
        neph.json(&a)
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|i| i["name"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(names(&["--label", "tier=web"]), ["web-1", "web-2"]);
    assert_eq!(
        names(&["--label", "tier=web", "--label", "env=prod"]),
        ["web-1"]
    );
    assert!(names(&["--label", "tier=cache"]).is_empty());
    // The fake node runs nothing: once placed, all three wait SCHEDULED
    // on n1.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut scheduled = names(&["--state", "scheduled", "--node", "n1"]);
    while scheduled.len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        scheduled = names(&["--state", "scheduled", "--node", "n1"]);
    }
    assert_eq!(scheduled, ["db-1", "web-1", "web-2"]);
    assert!(names(&["--state", "running"]).is_empty());
    assert!(names(&["--node", "n2"]).is_empty());
    assert_eq!(
        names(&["--label", "tier=db", "--state", "scheduled"]),
        ["db-1"]
    );
    let (_, err) = neph.expect(&["instance", "list", "--label", "tier"], 2);
    assert!(err.contains("key=value"), "{err}");
}

#[test]
fn node_show_has_instances_allocation_and_load() {
    let data = tempfile::tempdir().expect("tempdir");
    let c = start_controller(data.path());
    let neph = Neph::new(&c);
    neph.catalog();
    let token = std::fs::read_to_string(&c.token_file).expect("token file");
    let _node = fake_node(&c, &token);
    for id in ["web-1", "web-2"] {
        neph.expect(
            &[
                "instance", "create", id, "--flavor", "small", "--image", "guest",
            ],
            0,
        );
    }
    // Both placed on n1 (1 vCPU, 256 MiB, 0 GiB each) and a heartbeat with
    // the fake node's load seen.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut n = neph.json(&["node", "show", "n1"]);
    while (n["instances"].as_array().map_or(0, Vec::len) < 2 || n["load"].is_null())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
        n = neph.json(&["node", "show", "n1"]);
    }
    assert_eq!(n["name"], "n1");
    assert_eq!(n["state"], "UP");
    assert_eq!(
        n["instances"],
        serde_json::json!(["projects/p1/instances/web-1", "projects/p1/instances/web-2"]),
        "{n}"
    );
    assert_eq!(
        n["allocated"],
        serde_json::json!({"vcpus": 2, "memory_mib": 512, "disk_gib": 0}),
        "{n}"
    );
    assert_eq!(
        n["capacity"],
        serde_json::json!({"vcpus": 4, "memory_mib": 4096, "disk_gib": 100}),
        "{n}"
    );
    assert_eq!(
        n["load"],
        serde_json::json!({"cpu_busy": 0.25, "memory_used_mib": 64, "running_vms": 1}),
        "{n}"
    );
    // `get` is the same command; the table names every part.
    assert_eq!(
        neph.json(&["node", "get", "n1"])["instances"],
        n["instances"]
    );
    let (table, _) = neph.expect(&["node", "show", "n1"], 0);
    for part in ["ALLOCATED", "LOAD", "INSTANCES", "web-2", "running_vms=1"] {
        assert!(table.contains(part), "{part} missing from {table}");
    }
}
