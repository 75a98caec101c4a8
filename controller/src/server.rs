//! Starting one controller: the raft member, its gRPC server (the cluster
//! protocol, the public API, the node agent protocol, health and
//! reflection on one port) and the leader's control loops.

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::{Api, ApiConfig};
use crate::raft::{RaftConfig, RaftStore, StartRaftError};
use crate::reconcile::{self, ReconcileConfig, Reconcilers};

/// Settings of what a controller serves besides the store.
#[derive(Debug, Clone, Default)]
pub struct ControllerOptions {
    /// The API services. `api.fence_lease` is the one fencing lease: agents
    /// are told it and the loops wait for it (`reconcile.fence_lease` is
    /// overwritten with it).
    pub api: ApiConfig,
    /// The control loops.
    pub reconcile: ReconcileConfig,
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
}

/// A controller serving on a socket.
#[derive(Debug)]
pub struct RunningController {
    /// The replicated store.
    pub store: RaftStore,
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
    let store = RaftStore::start(config)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let service = store.service();
    let shared = std::sync::Arc::new(store.clone());
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(service);
    let router = crate::api::routes(Api::new(shared.clone(), options.api.clone()), router).await;
    // One lease for both: what agents are told is what the loops wait for.
    let mut loops = options.reconcile;
    loops.fence_lease = options.api.fence_lease;
    let reconcilers = reconcile::spawn(shared, loops);
    let server = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await
    });
    Ok(RunningController {
        store,
        address,
        stop,
        server,
        reconcilers,
    })
}

impl RunningController {
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
