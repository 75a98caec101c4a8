//! Starting one controller: the raft member plus its gRPC server.

use std::net::SocketAddr;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::raft::{RaftConfig, RaftStore, StartRaftError};

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
}

/// Starts a member on an already bound listener. `config.advertise` empty
/// means "the listener's address".
pub async fn start(
    mut config: RaftConfig,
    listener: TcpListener,
) -> Result<RunningController, ServeError> {
    let address = listener.local_addr().map_err(ServeError::Address)?;
    if config.advertise.is_empty() {
        config.advertise = address.to_string();
    }
    let store = RaftStore::start(config)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let service = store.service();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(service)
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
    })
}

impl RunningController {
    /// Stops serving and stops the raft member.
    pub async fn stop(self) -> Result<(), ServeError> {
        let _ = self.stop.send(());
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
