//! The console relay: `Instances.Console` and `Instances.GetConsoleLog` are
//! answered by the compute node that holds the instance, through the
//! `nephele.node.v1.Agent` service its agent serves at the address it
//! registered. The caller is authorized on the instance first; the node is
//! then called over mutual TLS: the controller presents its own
//! `controller/<id>` certificate (the only kind an agent's port admits) and
//! accepts only the certificate of exactly `node/<name>`, the node the
//! instance is placed on, so a machine that took over a node's address
//! gets nothing. A controller without TLS (in-process tests of the
//! library) dials plaintext.
//!
//! ```text
//!  neph ──Console(stream)──► controller ──Agent.Console(stream)──► neph-node
//!       ◄──────── output ───            ◄────────── output ──────
//! ```
//!
//! The first request names the instance; the controller forwards it (with
//! any input it carries) and every later request as they come, and every
//! response back. The caller ending its stream ends the relay. When the
//! node's side ends, the relay asks whether the instance now runs on
//! another node (a live migration moved it: the source's VMM exits after
//! the switchover) and, if so, carries on there: a person typing into the
//! console sees the same boot go on, a few milliseconds of output around
//! the switchover aside. Otherwise the relay ends (with the node's error,
//! if it failed).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use nephele_proto::compute::v1 as pb;
use nephele_proto::node::v1::agent_client::AgentClient;
use nephele_state::model::{InstanceState, State};
use nephele_tls::{Identity, PeerPolicy, TlsContext};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use super::errors::ApiError;

/// How long a node may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a console log read may take.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message accepted from a node.
const MAX_MESSAGE: usize = 8 << 20;
/// How long the relay waits, once a node's console ended, for the instance
/// to be placed (RUNNING) on another node before it ends too.
const FOLLOW_WAIT: Duration = Duration::from_secs(10);
/// Console log size when the request does not say.
const DEFAULT_LOG_BYTES: u64 = 64 << 10;
/// Largest console log relayed.
const MAX_LOG_BYTES: u64 = 4 << 20;

/// The relayed console output.
pub type ConsoleStream =
    Pin<Box<dyn Stream<Item = Result<pb::ConsoleResponse, Status>> + Send + 'static>>;

/// Where an instance's console is: its node and that node's agent address.
#[derive(Debug, Clone)]
pub struct ConsoleTarget {
    /// `nodes/{node}`.
    pub node: String,
    /// The agent's `host:port`.
    pub address: String,
}

/// Finds the node of `name`; with `running`, the instance must be RUNNING
/// (a live console), otherwise only placed (its log outlives the VM).
pub fn target(s: &State, name: &str, running: bool) -> Result<ConsoleTarget, ApiError> {
    let i = s
        .instances
        .get(name)
        .ok_or_else(|| ApiError::not_found(name))?;
    if running && i.state != InstanceState::Running {
        return Err(ApiError::FailedPrecondition(format!(
            "instance is not running: {name} is {}; start it first",
            i.state
        )));
    }
    let node = i.node.clone().ok_or_else(|| {
        ApiError::FailedPrecondition(format!(
            "{name} is not placed on a node yet, so it has no console"
        ))
    })?;
    let address = s
        .nodes
        .get(&node)
        .map(|n| n.address.clone())
        .ok_or_else(|| ApiError::not_found(&node))?;
    Ok(ConsoleTarget { node, address })
}

fn node_id(node: &str) -> &str {
    node.strip_prefix("nodes/").unwrap_or(node)
}

/// A node's failure as the API's: transport failures are the node not
/// answering; what the agent itself refused passes through.
fn relay_error(node: &str, status: Status) -> Status {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
            ApiError::NodeUnavailable(format!(
                "node {} does not answer: {}",
                node_id(node),
                status.message()
            ))
            .into()
        }
        Code::NotFound => ApiError::FailedPrecondition(format!(
            "node {} does not run the instance (it may be starting or moving): {}",
            node_id(node),
            status.message()
        ))
        .into(),
        _ => status,
    }
}

async fn connect(
    tls: Option<&TlsContext>,
    t: &ConsoleTarget,
) -> Result<AgentClient<Channel>, ApiError> {
    let unavailable = |e: String| {
        ApiError::NodeUnavailable(format!(
            "node {} does not answer at {}: {e}",
            node_id(&t.node),
            t.address
        ))
    };
    let endpoint = Channel::from_shared(nephele_tls::channel_uri(&t.address))
        .map_err(|e| unavailable(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = match tls {
        Some(tls) => {
            let node = Identity::node(node_id(&t.node))
                .map_err(|e| ApiError::Internal(format!("{} names no node: {e}", t.node)))?;
            let config = tls
                .client_config(PeerPolicy::Exactly(node))
                .map_err(|e| ApiError::Internal(format!("no TLS configuration: {e}")))?;
            tokio::time::timeout(
                CONNECT_TIMEOUT,
                nephele_tls::connect_channel(endpoint, config),
            )
            .await
            .map_err(|_| unavailable("no TLS connection in time".into()))?
        }
        None => endpoint.connect().await,
    }
    .map_err(|e| unavailable(nephele_tls::error_chain(&e)))?;
    Ok(AgentClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Where the instance's console is now, if it runs on a node other than
/// the one given (`None`: it does not, or not yet).
pub type Relocate = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = Option<ConsoleTarget>> + Send>> + Send + Sync,
>;

/// Opens the node's console stream for `t`, sending `first` then whatever
/// the returned sender is given.
async fn open(
    tls: Option<&TlsContext>,
    t: &ConsoleTarget,
    first: pb::ConsoleRequest,
) -> Result<
    (
        tokio::sync::mpsc::Sender<pb::ConsoleRequest>,
        Streaming<pb::ConsoleResponse>,
    ),
    Status,
> {
    let mut agent = connect(tls, t).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // Cannot fail: the receiver is alive and the buffer empty.
    let _ = tx.try_send(first);
    let outbound = agent
        .console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| relay_error(&t.node, s))?
        .into_inner();
    Ok((tx, outbound))
}

/// Relays a console: `first` (already read, naming the instance) and the
/// rest of `inbound` go to the node; its output comes back. When the
/// node's side ends, `relocate` says whether the instance moved, and the
/// relay follows it (see the module doc).
pub async fn relay(
    tls: Option<TlsContext>,
    t: ConsoleTarget,
    first: pb::ConsoleRequest,
    mut inbound: Streaming<pb::ConsoleRequest>,
    relocate: Relocate,
) -> Result<ConsoleStream, Status> {
    let name = first.name.clone();
    let (tx, mut outbound) = open(tls.as_ref(), &t, first).await?;
    // The caller's input goes to the current node's stream.
    let current = Arc::new(Mutex::new(tx));
    let (done_tx, mut done) = tokio::sync::watch::channel(false);
    let input = current.clone();
    tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            let tx = match input.lock() {
                Ok(t) => Some(t.clone()),
                Err(_) => None,
            };
            if let Some(tx) = tx {
                // A node that hung up loses this input; the next node gets
                // what follows.
                let _ = tx.send(m).await;
            }
        }
        let _ = done_tx.send(true);
    });
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut node = t.node;
        loop {
            let ended = loop {
                tokio::select! {
                    m = outbound.message() => match m {
                        Ok(Some(r)) => {
                            if out_tx.send(Ok(r)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break None,
                        Err(s) => break Some(s),
                    },
                    _ = done.changed() => return,
                }
            };
            if *done.borrow() {
                return;
            }
            // Moved? Wait a little for the store to say so.
            let deadline = Instant::now() + FOLLOW_WAIT;
            let moved = loop {
                if let Some(t) = relocate(node.clone()).await {
                    break Some(t);
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let Some(next) = moved else {
                if let Some(s) = ended {
                    let _ = out_tx.send(Err(relay_error(&node, s))).await;
                }
                return;
            };
            tracing::info!(instance = %name, from = %node, to = %next.node, "console follows the instance to its new node");
            let first = pb::ConsoleRequest {
                name: name.clone(),
                input: Vec::new(),
            };
            match open(tls.as_ref(), &next, first).await {
                Ok((tx, out)) => {
                    if let Ok(mut c) = current.lock() {
                        *c = tx;
                    }
                    outbound = out;
                    node = next.node;
                }
                Err(s) => {
                    let _ = out_tx.send(Err(s)).await;
                    return;
                }
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
        out_rx,
    )))
}

/// Reads the tail of the console log from the node.
pub async fn log(
    tls: Option<&TlsContext>,
    t: ConsoleTarget,
    mut request: pb::GetConsoleLogRequest,
) -> Result<pb::ConsoleLog, Status> {
    if request.max_bytes == 0 {
        request.max_bytes = DEFAULT_LOG_BYTES;
    }
    request.max_bytes = request.max_bytes.min(MAX_LOG_BYTES);
    let mut agent = connect(tls, &t).await?;
    match tokio::time::timeout(LOG_TIMEOUT, agent.get_console_log(request)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(relay_error(&t.node, s)),
        Err(_) => Err(relay_error(
            &t.node,
            Status::deadline_exceeded("no console log in time"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_failures_become_stable_reasons() {
        let s = relay_error("nodes/n1", Status::unavailable("connection refused"));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().starts_with("node n1 does not answer"), "{s:?}");
        let s = relay_error("nodes/n1", Status::not_found("no such vm"));
        assert_eq!(s.code(), Code::FailedPrecondition);
        let s = relay_error("nodes/n1", Status::invalid_argument("bad"));
        assert_eq!(s.code(), Code::InvalidArgument);
    }
}
