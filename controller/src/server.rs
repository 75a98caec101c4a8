//! Starting one controller: the raft member, its gRPC server (the cluster
//! protocol, the public API, the node agent protocol, health and
//! reflection on one port) and the leader's control loops. With the `etcd`
//! feature, [`start_etcd`] does the same over an etcd-backed store.

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use nephele_tls::{ClientAuth, IdentityKind, PeerPolicy, RequirePeer, TlsContext};
use tonic::service::interceptor::InterceptedService;

use crate::api::{Api, ApiConfig};
use crate::raft::{RaftConfig, RaftStore, StartRaftError};
use crate::reconcile::{self, ReconcileConfig, Reconcilers};
use crate::store::StateStore;

/// Settings of what a controller serves besides the store.
#[derive(Debug, Clone, Default)]
pub struct ControllerOptions {
    /// The API services. `api.fence_lease` is the one fencing lease: agents
    /// are told it and the loops wait for it (`reconcile.fence_lease` is
    /// overwritten with it).
    pub api: ApiConfig,
    /// The control loops.
    pub reconcile: ReconcileConfig,
    /// This controller's TLS (see [`crate::tls`]): with it the port speaks
    /// only TLS, the public API server-authenticated (bearer tokens as
    /// before), the cluster protocol mutual TLS admitting only
    /// `controller/*` certificates, and raft traffic to peers goes over
    /// mutual TLS too. `None` serves plaintext: only in-process tests of
    /// the library use that (the daemon always has TLS).
    pub tls: Option<TlsContext>,
}

impl ControllerOptions {
    /// Options with this node timeout and fencing lease (and agents told
    /// to heartbeat often enough for the lease: every `lease / 4`, at most
    /// every 2 s).
    pub fn with_fencing(node_timeout: Duration, fence_lease: Duration) -> Self {
        let mut o = ControllerOptions::default();
        o.reconcile.node_timeout = node_timeout;
        o.api.fence_lease = fence_lease;
        o.reconcile.fence_lease = fence_lease;
        o.api.heartbeat_interval = (fence_lease / 4)
            .min(Duration::from_secs(2))
            .max(Duration::from_millis(20));
        o
    }
}

/// Why a controller could not start or stopped serving.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The listener's address could not be read.
    #[error("cannot read the listening address")]
    Address(#[source] std::io::Error),
    /// The raft member did not start.
    #[error(transparent)]
    Start(#[from] StartRaftError),
    /// The gRPC server failed.
    #[error("the gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    /// The TLS configuration could not be built.
    #[error("cannot build the TLS configuration")]
    Tls(#[from] nephele_tls::TlsConfigError),
}

/// What a controller needs from its store beyond [`StateStore`]: how to
/// stop it.
pub trait Backend: StateStore + Clone {
    /// Why the store stopped working, if it did (the daemon exits on it).
    fn failure(&self) -> Option<String>;
    /// Ends the streams the store serves (before the server stops).
    fn close_streams(&self) {}
    /// Stops the store (may block).
    fn shutdown(&self) {}
}

impl Backend for RaftStore {
    fn failure(&self) -> Option<String> {
        RaftStore::failure(self)
    }
    fn close_streams(&self) {
        RaftStore::close_streams(self);
    }
    fn shutdown(&self) {
        RaftStore::shutdown(self);
    }
}

#[cfg(feature = "etcd")]
impl Backend for crate::store::etcd::EtcdStore {
    fn failure(&self) -> Option<String> {
        crate::store::etcd::EtcdStore::failure(self)
    }
}

/// A controller serving on a socket.
#[derive(Debug)]
pub struct RunningController<S = RaftStore> {
    /// The replicated store.
    pub store: S,
    /// Where it serves.
    pub address: SocketAddr,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    reconcilers: Reconcilers,
}

/// Starts a member on an already bound listener. `config.advertise` empty
/// means "the listener's address".
pub async fn start(
    config: RaftConfig,
    listener: TcpListener,
) -> Result<RunningController, ServeError> {
    start_with(config, listener, ControllerOptions::default()).await
}

/// [`start`] with explicit API and control-loop settings.
pub async fn start_with(
    mut config: RaftConfig,
    listener: TcpListener,
    options: ControllerOptions,
) -> Result<RunningController, ServeError> {
    let address = listener.local_addr().map_err(ServeError::Address)?;
    if config.advertise.is_empty() {
        config.advertise = address.to_string();
    }
    if let Some(tls) = &options.tls
        && config.peer_tls.is_none()
    {
        config.peer_tls = Some(tls.client_config(PeerPolicy::Kind(IdentityKind::Controller))?);
    }
    let store = RaftStore::start(config)?;
    // Only controllers may speak the cluster protocol; without TLS (tests)
    // the interceptor is left out.
    let service = options.tls.as_ref().map(|tls| {
        InterceptedService::new(
            store.service(),
            RequirePeer::kind(IdentityKind::Controller, tls.revocations().clone()),
        )
    });
    let plain = options.tls.is_none().then(|| store.service());
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_optional_service(service)
        .add_optional_service(plain);
    serve(store, router, listener, address, options).await
}

/// Serves the API and runs the control loops over an etcd-backed store
/// (`store = "etcd"`): no cluster protocol, the state lives in etcd and the
/// loops run on whichever controller holds the etcd leadership lease.
#[cfg(feature = "etcd")]
pub async fn start_etcd(
    config: crate::store::etcd::EtcdConfig,
    listener: TcpListener,
    options: ControllerOptions,
) -> Result<RunningController<crate::store::etcd::EtcdStore>, StartEtcdControllerError> {
    let address = listener
        .local_addr()
        .map_err(StartEtcdControllerError::Address)?;
    // etcd may come up after the controllers (both started by one unit
    // file, say): retry for a while before giving up.
    let deadline = tokio::time::Instant::now() + ETCD_START_PATIENCE;
    let store = loop {
        match crate::store::etcd::EtcdStore::start(config.clone()).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, endpoints = ?config.endpoints, "etcd not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    // The same builder as raft's, without the cluster protocol.
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_optional_service::<nephele_proto::cluster::v1::cluster_server::ClusterServer<
        crate::raft::service::ClusterService,
    >>(None);
    serve(store, router, listener, address, options)
        .await
        .map_err(StartEtcdControllerError::Tls)
}

/// How long [`start_etcd`] retries reaching etcd.
#[cfg(feature = "etcd")]
const ETCD_START_PATIENCE: Duration = Duration::from_secs(30);

/// Why an etcd-backed controller could not start.
#[cfg(feature = "etcd")]
#[derive(Debug, Error)]
pub enum StartEtcdControllerError {
    /// The listener's address could not be read.
    #[error("cannot read the listening address")]
    Address(#[source] std::io::Error),
    /// The etcd store did not start.
    #[error(transparent)]
    Start(#[from] crate::store::etcd::StartEtcdError),
    /// The TLS configuration could not be built.
    #[error("cannot build the TLS configuration")]
    Tls(#[source] ServeError),
}

async fn serve<S: Backend>(
    store: S,
    router: tonic::transport::server::Router,
    listener: TcpListener,
    address: SocketAddr,
    options: ControllerOptions,
) -> Result<RunningController<S>, ServeError> {
    let incoming = match &options.tls {
        Some(tls) => Incoming::Tls(nephele_tls::TlsIncoming::new(
            listener,
            tls.server_config(ClientAuth::Optional)?,
        )),
        None => Incoming::Plain(TcpListenerStream::new(listener)),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let shared = std::sync::Arc::new(store.clone());
    let beats = std::sync::Arc::new(reconcile::NodeBeats::default());
    let api = Api::new(
        shared.clone(),
        options.api.clone(),
        beats.clone(),
        options.tls.clone(),
    );
    // Removed nodes and controllers are refused by every handshake and
    // call, as the replicated state says (ends when the store closes its
    // streams).
    crate::api::revocation::keep_current(shared.clone(), api.revocations().clone());
    if let Some(content) = api.image_content() {
        crate::images::keep_swept(shared.clone(), content.clone());
        if let Some(tls) = &options.tls {
            let peers = tls.client_config(nephele_tls::PeerPolicy::Kind(
                nephele_tls::IdentityKind::Controller,
            ))?;
            crate::images::keep_mirrored(shared.clone(), content, peers);
        }
    }
    let router = crate::api::routes(api, router).await;
    // One lease for both: what agents are told is what the loops wait for.
    let mut loops = options.reconcile;
    loops.fence_lease = options.api.fence_lease;
    let reconcilers = reconcile::spawn(shared, loops, beats);
    let server = tokio::spawn(async move {
        let stopped = async {
            let _ = stopped.await;
        };
        match incoming {
            Incoming::Tls(i) => router.serve_with_incoming_shutdown(i, stopped).await,
            Incoming::Plain(i) => router.serve_with_incoming_shutdown(i, stopped).await,
        }
    });
    Ok(RunningController {
        store,
        address,
        stop,
        server,
        reconcilers,
    })
}

/// What the server accepts connections from.
enum Incoming {
    Tls(nephele_tls::TlsIncoming),
    Plain(TcpListenerStream),
}

impl<S: Backend> RunningController<S> {
    /// Stops serving and stops the raft member.
    pub async fn stop(self) -> Result<(), ServeError> {
        let _ = self.stop.send(());
        self.store.close_streams();
        self.reconcilers.stop().await;
        let served = self.server.await;
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
        match served {
            Ok(r) => r.map_err(ServeError::Serve),
            Err(_) => Ok(()),
        }
    }

    /// Waits until the gRPC server ends (it only ends on error or `stop`).
    pub async fn wait(&mut self) -> Result<(), ServeError> {
        match (&mut self.server).await {
            Ok(r) => r.map_err(ServeError::Serve),
            Err(_) => Ok(()),
        }
    }
}
