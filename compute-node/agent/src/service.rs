//! The `nephele.node.v1.Agent` gRPC service the controllers call: an
//! instance's live serial console (relayed both ways to the VM's console
//! socket) and the tail of its console log.
//!
//! Served only over mutual TLS with the node's certificate, to
//! `controller/*` certificates of this cluster (see `daemon.rs`): a
//! controller relays a console only after authorizing its caller on the
//! instance.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use nephele_proto::compute::v1 as compute;
use nephele_proto::node::v1::agent_server::Agent;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::instance::{self, InstanceName, Layout};
use crate::supervisor::Shared;

/// Console log bytes returned when the request does not say.
pub const DEFAULT_LOG_BYTES: u64 = 64 * 1024;
/// The most console log bytes one answer carries.
pub const MAX_LOG_BYTES: u64 = 4 << 20;
/// Largest request the service accepts (console input comes in small
/// pieces).
pub const MAX_DECODING_MESSAGE_SIZE: usize = 1 << 20;
/// Largest answer (a console log tail).
pub const MAX_ENCODING_MESSAGE_SIZE: usize = 8 << 20;

/// The service.
#[derive(Debug, Clone)]
pub struct AgentService {
    data_dir: PathBuf,
    shared: Arc<Shared>,
}

impl AgentService {
    /// Serves the VMs in `shared`, whose files are under `data_dir`.
    pub fn new(data_dir: PathBuf, shared: Arc<Shared>) -> Self {
        Self { data_dir, shared }
    }
}

fn parse(name: &str) -> Result<InstanceName, Status> {
    InstanceName::parse(name).map_err(|e| Status::invalid_argument(e.to_string()))
}

type ConsoleStream = Pin<Box<dyn Stream<Item = Result<compute::ConsoleResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    type ConsoleStream = ConsoleStream;

    async fn console(
        &self,
        req: Request<Streaming<compute::ConsoleRequest>>,
    ) -> Result<Response<ConsoleStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the first console message must name the instance")
        })?;
        let name = parse(&first.name)?;
        let key = name.to_string();
        let Some(vm) = self.shared.vms().get(&key).cloned() else {
            return Err(Status::not_found(format!(
                "{key} does not run on this node"
            )));
        };
        let stream = tokio::net::UnixStream::connect(vm.layout.console_socket())
            .await
            .map_err(|e| {
                Status::unavailable(format!("cannot attach to the console of {key}: {e}"))
            })?;
        let (mut rd, mut wr) = stream.into_split();
        if !first.input.is_empty() {
            wr.write_all(&first.input)
                .await
                .map_err(|e| Status::unavailable(format!("console of {key} closed: {e}")))?;
        }
        // Typed bytes to the guest until the client stops sending.
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if !m.input.is_empty() && wr.write_all(&m.input).await.is_err() {
                    return;
                }
            }
        });
        // Guest output to the client until either side goes away.
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    n = rd.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let out = compute::ConsoleResponse { output: buf[..n].to_vec() };
                            if tx.send(Ok(out)).await.is_err() {
                                return;
                            }
                        }
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_console_log(
        &self,
        req: Request<compute::GetConsoleLogRequest>,
    ) -> Result<Response<compute::ConsoleLog>, Status> {
        let r = req.into_inner();
        let name = parse(&r.name)?;
        let layout = Layout::new(&self.data_dir, &name);
        if !layout.dir.is_dir() {
            return Err(Status::not_found(format!(
                "{name} has no console log on this node"
            )));
        }
        let max = match r.max_bytes {
            0 => DEFAULT_LOG_BYTES,
            n => n.min(MAX_LOG_BYTES),
        };
        let path = layout.console_log();
        let data = tokio::task::spawn_blocking(move || instance::tail(&path, max))
            .await
            .map_err(|e| Status::internal(format!("reading the console log stopped: {e}")))?
            .map_err(|e| Status::internal(format!("cannot read the console log of {name}: {e}")))?;
        Ok(Response::new(compute::ConsoleLog { data }))
    }
}
