//! Starting one controller: the raft member, its gRPC server (the cluster
//! protocol, the public API, the node agent protocol, health and
//! reflection on one port) and the leader's control loops.

use std::net::SocketAddr;

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
    /// The API services.
    pub api: ApiConfig,
    /// The control loops.
    pub reconcile: ReconcileConfig,
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
    let router = crate::api::routes(Api::new(shared.clone(), options.api), router).await;
    let reconcilers = reconcile::spawn(shared, options.reconcile);
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
