//! Running the agent: the gRPC server (the `Agent` service, health,
//! reflection; mutual TLS admitting only `controller/*` certificates),
//! registration and heartbeats with lease renewal, the assignment watch,
//! and the reconciler, until a shutdown signal. Stopping the agent never
//! stops a VM.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nephele_proto::infra::v1 as infra;
use nephele_proto::node::v1 as pb;
use nephele_proto::node::v1::agent_server::AgentServer;
use nephele_tls::{ClientAuth, IdentityKind, RequirePeer, TlsIncoming};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;

use crate::config::AgentConfig;
use crate::controller::{ControllerClientError, Controllers};
use crate::host;
use crate::service::{self, AgentService};
use crate::supervisor::{self, Shared, Supervisor};
use crate::vmm::VmmClient;

/// Heartbeat interval until the controllers say otherwise.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Wait between failed registrations and watch attempts, at most.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunAgentError {
    /// Listen.
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    /// Controllers.
    #[error(transparent)]
    Controllers(#[from] ControllerClientError),
    /// The gRPC server failed.
    #[error("the gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    /// The node could not join or load its certificate.
    #[error(transparent)]
    Join(#[from] crate::join::JoinError),
    /// The port's TLS configuration could not be built.
    #[error("cannot build the TLS configuration of the agent's port")]
    Tls(#[from] nephele_tls::TlsConfigError),
}

fn duration(d: Option<prost_types::Duration>, default: Duration) -> Duration {
    d.and_then(|d| {
        Some(Duration::new(
            u64::try_from(d.seconds).ok()?,
            u32::try_from(d.nanos).ok()?,
        ))
    })
    .filter(|d| !d.is_zero())
    .unwrap_or(default)
}

/// Runs the agent until `shutdown` completes. `on_listening` gets the bound
/// address once the gRPC server accepts connections.
pub async fn run(
    cfg: AgentConfig,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunAgentError> {
    let cfg = Arc::new(cfg);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| RunAgentError::Listen(cfg.listen, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| RunAgentError::Listen(cfg.listen, e))?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
    // The node's certificate (joining first with --join-token), or the
    // bearer-token fallback.
    let tls = crate::join::node_tls(&cfg).await?;
    let ctl = Controllers::new(
        &cfg.controllers,
        cfg.token.as_deref(),
        Some(tls.controllers.clone()),
    )?;
    let shared = Arc::new(Shared::default());
    let supervisor = Supervisor::new(cfg.clone(), ctl.clone(), shared.clone()).await;

    let server = match &tls.context {
        // The console is the guests' keyboard: only controllers of this
        // cluster may reach it, over mutual TLS, its kind checked again per
        // call. The revocation set checked there stays empty: agents do not
        // learn removed controllers yet (see docs/threat-model.md).
        Some(ctx) => {
            let agent = InterceptedService::new(
                AgentServer::new(AgentService::new(cfg.data_dir.clone(), shared.clone()))
                    .max_decoding_message_size(service::MAX_DECODING_MESSAGE_SIZE)
                    .max_encoding_message_size(service::MAX_ENCODING_MESSAGE_SIZE),
                RequirePeer::kind(IdentityKind::Controller, ctx.revocations().clone()),
            );
            let router = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(agent);
            let router =
                nephele_proto::serve::add_health_and_reflection(router, &["nephele.node.v1.Agent"])
                    .await;
            let incoming = TlsIncoming::new(listener, ctx.server_config(ClientAuth::Required)?);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
        // Without a certificate there is nothing to authenticate the port
        // with: it serves health only, and no console.
        None => {
            tracing::warn!(
                "this node has no certificate: its port serves no console (join with --join-token)"
            );
            let router = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_optional_service::<AgentServer<AgentService>>(None);
            let router = nephele_proto::serve::add_health_and_reflection(router, &[]).await;
            tokio::spawn(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown),
            )
        }
    };
    on_listening(bound);

    let (tx, rx) = watch::channel(None);
    let node_loop = tokio::spawn(node_loop(
        cfg.clone(),
        ctl.clone(),
        shared.clone(),
        advertise,
    ));
    let renewal = tls
        .context
        .clone()
        .map(|ctx| tokio::spawn(crate::join::renew_forever(cfg.clone(), ctx, ctl.clone())));
    let watch_loop = tokio::spawn(watch_loop(cfg.node_name(), ctl, tx));
    let reconciler = tokio::spawn(supervisor.run(rx));
    let served = server.await;
    node_loop.abort();
    watch_loop.abort();
    if let Some(r) = renewal {
        r.abort();
    }
    reconciler.abort();
    match served {
        Ok(r) => r.map_err(RunAgentError::Serve),
        Err(_) => Ok(()),
    }
}

/// Registers (again whenever the controllers no longer know the node) and
/// heartbeats; every acknowledged call renews the VMs' lease to its send
/// time plus the lease the controllers gave.
async fn node_loop(
    cfg: Arc<AgentConfig>,
    ctl: Controllers,
    shared: Arc<Shared>,
    advertise: String,
) {
    let mut registered = false;
    let mut interval = DEFAULT_INTERVAL;
    let mut backoff = Duration::from_millis(100);
    let mut load = LoadMeter::default();
    loop {
        let sent_ms = host::monotonic_ms();
        let acked_lease = if registered {
            let (load, observed) = load.measure(&shared);
            let req = pb::HeartbeatRequest {
                node: cfg.node_name(),
                load: Some(load),
                instances: observed,
            };
            match ctl
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.heartbeat(req).await }
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    ctl.learn(r.controllers.as_ref());
                    Some(duration(r.lease, Duration::ZERO))
                }
                Err(s) if s.code() == Code::NotFound => {
                    tracing::warn!("the controllers do not know this node; registering again");
                    registered = false;
                    None
                }
                Err(s) => {
                    tracing::warn!(code = ?s.code(), error = %s.message(), "heartbeat not acknowledged");
                    None
                }
            }
        } else {
            let req = pb::RegisterNodeRequest {
                node_id: cfg.node_id.clone(),
                address: advertise.clone(),
                capacity: Some(cfg.capacity),
                labels: cfg.labels.clone().into_iter().collect(),
            };
            match ctl
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.register_node(req).await }
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    ctl.learn(r.controllers.as_ref());
                    interval = duration(r.heartbeat_interval, DEFAULT_INTERVAL);
                    registered = true;
                    tracing::info!(node = %cfg.node_name(), address = %advertise, ?interval, "registered");
                    Some(duration(r.lease, Duration::ZERO))
                }
                Err(s) => {
                    tracing::warn!(code = ?s.code(), error = %s.message(), "registration failed; retrying");
                    None
                }
            }
        };
        match acked_lease {
            Some(lease) if !lease.is_zero() => {
                let ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
                renew_leases(&shared, sent_ms.saturating_add(ms)).await;
            }
            Some(_) => {
                tracing::warn!("the controllers gave no lease; the VMs keep their current one");
            }
            None => {}
        }
        let wait = if registered {
            backoff = Duration::from_millis(100);
            interval
        } else {
            backoff = (backoff * 2).min(MAX_BACKOFF);
            backoff
        };
        tokio::time::sleep(wait).await;
    }
}

/// Moves the lease forward (never back) and hands it to every VM.
async fn renew_leases(shared: &Shared, until_ms: u64) {
    let until = shared
        .lease_until_ms
        .fetch_max(until_ms, Ordering::SeqCst)
        .max(until_ms);
    let calls = supervisor::control_sockets(shared).into_iter().map(|path| async move {
        if let Err(e) = VmmClient::new(&path).lease(until).await {
            tracing::debug!(socket = %path.display(), error = %supervisor::error_chain(&e), "lease not renewed");
        }
    });
    futures::future::join_all(calls).await;
}

/// CPU busy per VM between two heartbeats, from `/proc/<pid>/stat`.
#[derive(Debug, Default)]
struct LoadMeter {
    last: HashMap<u32, (u64, Instant)>,
}

impl LoadMeter {
    fn measure(&mut self, shared: &Shared) -> (infra::Load, Vec<pb::ObservedInstance>) {
        let ticks = host::ticks_per_second() as f64;
        let mut total = infra::Load::default();
        let mut observed = Vec::new();
        let mut seen = HashMap::new();
        for (name, pid, state) in supervisor::vm_pids(shared) {
            let now = Instant::now();
            let stat = host::proc_stat(pid);
            let busy = match (stat, self.last.get(&pid)) {
                (Some(s), Some((prev, at))) => {
                    let secs = now.duration_since(*at).as_secs_f64();
                    if secs > 0.0 {
                        s.cpu_ticks.saturating_sub(*prev) as f64 / ticks / secs
                    } else {
                        0.0
                    }
                }
                _ => 0.0,
            };
            if let Some(s) = stat {
                seen.insert(pid, (s.cpu_ticks, now));
            }
            let mib = host::rss_bytes(pid).unwrap_or(0) >> 20;
            total.cpu_busy += busy;
            total.memory_used_mib += mib;
            total.running_vms += 1;
            observed.push(pb::ObservedInstance {
                name,
                state: state as i32,
                cpu_busy: busy,
                memory_used_mib: mib,
            });
        }
        self.last = seen;
        (total, observed)
    }
}

/// Keeps an assignment stream open on some controller, re-opening it on
/// any failure, and publishes every set it receives.
async fn watch_loop(node: String, ctl: Controllers, tx: watch::Sender<Option<pb::Assignments>>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match ctl.watch(&node).await {
            Ok((address, mut stream)) => {
                tracing::info!(controller = %address, "watching assignments");
                loop {
                    match stream.message().await {
                        Ok(Some(set)) => {
                            backoff = Duration::from_millis(100);
                            ctl.learn(set.controllers.as_ref());
                            tracing::debug!(
                                revision = set.revision,
                                n = set.assignments.len(),
                                "assignments"
                            );
                            if tx.send(Some(set)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            tracing::info!(controller = %address, "assignment stream ended; re-opening");
                            break;
                        }
                        Err(s) => {
                            tracing::info!(controller = %address, error = %s.message(), "assignment stream failed; re-opening");
                            break;
                        }
                    }
                }
                ctl.failed(&address);
            }
            Err(s) => {
                tracing::debug!(code = ?s.code(), error = %s.message(), "cannot watch assignments yet");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
