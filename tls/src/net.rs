//! Putting the configs on the wire: [`TlsIncoming`] turns a listener into
//! the stream of TLS connections tonic serves
//! (`serve_with_incoming[_shutdown]`), [`TlsConnector`] is the connector a
//! tonic `Endpoint` dials through (`connect_with_connector`), and
//! [`connect`] / [`accept`] give raw TLS streams for non-gRPC protocols
//! (the migration stream).
//!
//! Handshakes run concurrently, each bounded by [`HANDSHAKE_TIMEOUT`], at
//! most [`MAX_PENDING_HANDSHAKES`] at a time: a client that connects and
//! says nothing (or presents a refused certificate) costs a task for a
//! while and never reaches the gRPC server. Refused handshakes are logged
//! at debug level with the reason.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, client, server};
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once on one listener.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// A listener's accepted TLS connections, for tonic's
/// `serve_with_incoming`. Dropping it stops accepting.
#[derive(Debug)]
pub struct TlsIncoming {
    rx: mpsc::Receiver<server::TlsStream<TcpStream>>,
    task: JoinHandle<()>,
}

impl TlsIncoming {
    /// Accepts on `listener` and completes each handshake with `config`.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
        TlsIncoming { rx, task }
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for TlsIncoming {
    type Item = Result<server::TlsStream<TcpStream>, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|o| o.map(Ok))
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<server::TlsStream<TcpStream>>,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let Ok(permit) = pending.clone().acquire_owned().await else {
            return;
        };
        let (tcp, remote) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let conn_tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = conn_tx.send(tls).await;
                }
                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake refused"),
                Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
            }
        });
        if tx.is_closed() {
            return;
        }
    }
}

/// Accepts one TLS connection on an already accepted TCP stream, within
/// [`HANDSHAKE_TIMEOUT`].
pub async fn accept(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
) -> io::Result<server::TlsStream<TcpStream>> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Connects to `address` (`host:port`) and completes a TLS handshake with
/// `config`, within [`HANDSHAKE_TIMEOUT`].
pub async fn connect(
    address: &str,
    config: Arc<ClientConfig>,
) -> io::Result<client::TlsStream<TcpStream>> {
    let host = match address.rsplit_once(':') {
        Some((h, _)) => h,
        None => address,
    };
    let name = server_name(host)?;
    let tcp = TcpStream::connect(address).await?;
    let _ = tcp.set_nodelay(true);
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a valid server name"),
        )
    })
}

/// A tonic connector dialling TCP and completing a TLS handshake with its
/// config; the server name is the URI's host.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
}

impl TlsConnector {
    /// A connector using `config`.
    pub fn new(config: Arc<ClientConfig>) -> Self {
        TlsConnector { config }
    }
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let authority = uri.authority().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "the endpoint has no host")
            })?;
            let port = authority.port_u16().unwrap_or(443);
            let address = format!("{}:{port}", authority.host());
            connect(&address, config).await.map(TokioIo::new)
        })
    }
}

/// Connects a tonic channel to `endpoint` through TLS with `config`. The
/// endpoint's URI must say `http://host:port`: TLS is this connector's,
/// and tonic refuses `https://` without a TLS config of its own
/// (`HttpsUriWithoutTlsSupport`).
pub async fn connect_channel(
    endpoint: Endpoint,
    config: Arc<ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    endpoint
        .connect_with_connector(TlsConnector::new(config))
        .await
}

/// `address` (`HOST:PORT`, with `http://` or `https://` or neither) as
/// `HOST:PORT`.
pub fn bare_address(address: &str) -> &str {
    address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address)
}

/// The URI tonic is given for `address`: always `http://HOST:PORT`, since
/// TLS is the connector's ([`lazy_channel`], [`connect_channel`]).
pub fn channel_uri(address: &str) -> String {
    format!("http://{}", bare_address(address))
}

/// [`connect_channel`], connecting on first use (what long-lived clients
/// that must start before their peer is up want).
pub fn lazy_channel(endpoint: Endpoint, config: Arc<ClientConfig>) -> Channel {
    endpoint.connect_with_connector_lazy(TlsConnector::new(config))
}
