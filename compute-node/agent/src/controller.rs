//! Calling the controllers: any one answers every call (writes are
//! forwarded to the raft leader), so the agent keeps the list of
//! controllers every answer carries, tries the leader first, and moves on to
//! the next controller when one does not answer. Every call carries the
//! bearer token of `--token-file`, over TLS verified against the cluster
//! CA (`--ca-file`).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nephele_proto::node::v1 as pb;
use nephele_proto::node::v1::node_agent_client::NodeAgentClient;
use nephele_proto::node::v1::node_join_client::NodeJoinClient;
use tonic::Code;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Largest message the agent accepts from a controller (a full
/// assignment set of a busy node).
pub const MAX_DECODING_MESSAGE_SIZE: usize = 16 << 20;
/// Largest message the agent sends (heartbeats with every instance).
pub const MAX_ENCODING_MESSAGE_SIZE: usize = 4 << 20;
/// Per-call deadline of unary calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Setting up the controller client failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerClientError {
    /// No addresses.
    #[error("no controller address given; pass --controller HOST:PORT")]
    NoAddress,
    /// A token that cannot be an HTTP header.
    #[error("the token is not a valid bearer token (printable ASCII only)")]
    Token,
    /// An address tonic cannot use.
    #[error("{0:?} is not a valid controller address (HOST:PORT)")]
    Address(String),
}

/// Adds `authorization: Bearer <token>` to every call, when there is a
/// token (a joined node authenticates with its certificate instead).
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(b) = &self.0 {
            r.metadata_mut().insert("authorization", b.clone());
        }
        Ok(r)
    }
}

/// A node-protocol client of one controller.
pub type Client = NodeAgentClient<InterceptedService<Channel, Bearer>>;

#[derive(Debug)]
struct Known {
    /// As given on the command line: the fallback when every learned
    /// address fails.
    seeds: Vec<String>,
    /// From the newest answer.
    learned: Vec<String>,
    leader: Option<String>,
    /// The last address that answered.
    good: Option<String>,
    channels: std::collections::HashMap<String, Channel>,
}

/// The controllers, with failover. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Controllers {
    known: Arc<Mutex<Known>>,
    bearer: Bearer,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Whether a call failed because of the controller rather than the
/// request: try another one.
pub fn retry_elsewhere(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

impl Controllers {
    /// A client of `addresses` (HOST:PORT each) with `token` if any, over
    /// TLS with `tls` (plaintext without: only in-process tests against a
    /// plaintext controller). With the node's certificate in `tls` no token
    /// is needed.
    pub fn new(
        addresses: &[String],
        token: Option<&str>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, ControllerClientError> {
        if addresses.is_empty() {
            return Err(ControllerClientError::NoAddress);
        }
        for a in addresses {
            Endpoint::from_shared(nephele_tls::channel_uri(a))
                .map_err(|_| ControllerClientError::Address(a.clone()))?;
        }
        let bearer = match token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ControllerClientError::Token)?,
            ),
            None => None,
        };
        Ok(Self {
            known: Arc::new(Mutex::new(Known {
                seeds: addresses.to_vec(),
                learned: Vec::new(),
                leader: None,
                good: None,
                channels: Default::default(),
            })),
            bearer: Bearer(bearer),
            tls,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the controller list and leader from an answer.
    pub fn learn(&self, info: Option<&pb::ControllerInfo>) {
        let Some(info) = info else { return };
        let mut k = self.lock();
        if !info.controllers.is_empty() {
            k.learned = info.controllers.clone();
        }
        k.leader = Some(info.leader_address.clone()).filter(|l| !l.is_empty());
    }

    /// The addresses to try, best first: the leader, the last one that
    /// answered, the learned list, the command-line list.
    pub fn order(&self) -> Vec<String> {
        let k = self.lock();
        let mut out: Vec<String> = Vec::new();
        let candidates = k
            .leader
            .iter()
            .chain(k.good.iter())
            .chain(k.learned.iter())
            .chain(k.seeds.iter());
        for a in candidates {
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }

    fn channel(&self, address: &str) -> Option<Channel> {
        let mut k = self.lock();
        let channel = match k.channels.get(address) {
            Some(c) => c.clone(),
            None => {
                let ep = Endpoint::from_shared(nephele_tls::channel_uri(address))
                    .ok()?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(2))
                    .keep_alive_timeout(Duration::from_secs(3))
                    .keep_alive_while_idle(true);
                let c = match &self.tls {
                    Some(tls) => nephele_tls::lazy_channel(ep, tls.clone()),
                    None => ep.connect_lazy(),
                };
                k.channels.insert(address.to_owned(), c.clone());
                c
            }
        };
        Some(channel)
    }

    fn client(&self, address: &str) -> Option<Client> {
        Some(
            NodeAgentClient::with_interceptor(self.channel(address)?, self.bearer.clone())
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE),
        )
    }

    fn answered(&self, address: &str) {
        self.lock().good = Some(address.to_owned());
    }

    /// Runs `call` against the controllers in [`Self::order`] until one
    /// answers (an answer may be an error about the request); the last
    /// controller error when none does.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_with(|a| self.client(a), retry_elsewhere, call)
            .await
    }

    /// Asks the controllers to sign `csr_pem` for this node's own identity
    /// (`NodeJoin/Renew`, over the node's current certificate); a
    /// controller that cannot sign (no operator key) passes to the next.
    pub async fn renew(&self, csr_pem: &str) -> Result<pb::JoinResponse, Status> {
        self.call_with(
            |a| self.channel(a).map(NodeJoinClient::new),
            |s| retry_elsewhere(s) || s.code() == Code::FailedPrecondition,
            |mut c| {
                let req = pb::RenewRequest {
                    csr_pem: csr_pem.to_owned(),
                };
                async move { c.renew(req).await.map(tonic::Response::into_inner) }
            },
        )
        .await
    }

    /// [`Self::call`] with the client `make` gives for an address, moving
    /// on to the next controller on the errors `retry` names.
    async fn call_with<C, T, F, Fut>(
        &self,
        make: impl Fn(&str) -> Option<C>,
        retry: impl Fn(&Status) -> bool,
        mut call: F,
    ) -> Result<T, Status>
    where
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut last = Status::unavailable("no controller address is known");
        for address in self.order() {
            let Some(client) = make(&address) else {
                continue;
            };
            match tokio::time::timeout(CALL_TIMEOUT, call(client)).await {
                Ok(Ok(v)) => {
                    self.answered(&address);
                    return Ok(v);
                }
                Ok(Err(s)) if retry(&s) => {
                    tracing::debug!(controller = %address, error = %s.message(), "controller did not answer; trying the next one");
                    last = s;
                }
                Ok(Err(s)) => {
                    self.answered(&address);
                    return Err(s);
                }
                Err(_) => {
                    last = Status::deadline_exceeded(format!(
                        "controller {address} did not answer within {CALL_TIMEOUT:?}"
                    ));
                }
            }
        }
        Err(last)
    }

    /// Opens the assignment stream on the first controller that answers.
    pub async fn watch(
        &self,
        node: &str,
    ) -> Result<(String, tonic::Streaming<pb::Assignments>), Status> {
        let mut last = Status::unavailable("no controller address is known");
        for address in self.order() {
            let Some(mut client) = self.client(&address) else {
                continue;
            };
            let req = pb::WatchAssignmentsRequest {
                node: node.to_owned(),
            };
            match tokio::time::timeout(CALL_TIMEOUT, client.watch_assignments(req)).await {
                Ok(Ok(r)) => {
                    self.answered(&address);
                    return Ok((address, r.into_inner()));
                }
                Ok(Err(s)) if retry_elsewhere(&s) => last = s,
                Ok(Err(s)) => return Err(s),
                Err(_) => {
                    last = Status::deadline_exceeded(format!(
                        "controller {address} did not answer within {CALL_TIMEOUT:?}"
                    ))
                }
            }
        }
        Err(last)
    }

    /// Forgets `address` as good (its stream broke).
    pub fn failed(&self, address: &str) {
        let mut k = self.lock();
        if k.good.as_deref() == Some(address) {
            k.good = None;
        }
        if k.leader.as_deref() == Some(address) {
            k.leader = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_prefers_the_leader_and_keeps_the_seeds() {
        let c = Controllers::new(&["10.0.0.1:1".into()], Some("t"), None).unwrap();
        assert_eq!(c.order(), vec!["10.0.0.1:1"]);
        c.learn(Some(&pb::ControllerInfo {
            controllers: vec!["10.0.0.2:1".into(), "10.0.0.3:1".into()],
            leader_address: "10.0.0.3:1".into(),
        }));
        assert_eq!(c.order(), vec!["10.0.0.3:1", "10.0.0.2:1", "10.0.0.1:1"]);
        c.failed("10.0.0.3:1");
        assert_eq!(c.order(), vec!["10.0.0.2:1", "10.0.0.3:1", "10.0.0.1:1"]);
        // An answer without a list keeps the one known.
        c.learn(Some(&pb::ControllerInfo::default()));
        assert_eq!(c.order().len(), 3);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(
            Controllers::new(&[], Some("t"), None),
            Err(ControllerClientError::NoAddress)
        ));
        assert!(matches!(
            Controllers::new(&["a:1".into()], Some("bad\ntoken"), None),
            Err(ControllerClientError::Token)
        ));
    }

    #[tokio::test]
    async fn a_dead_controller_is_skipped() {
        // Nothing listens on port 1 of loopback: every call fails over and
        // ends with the last controller error, never a hang or a panic.
        let c = Controllers::new(
            &["127.0.0.1:1".into(), "127.0.0.2:1".into()],
            Some("t"),
            None,
        )
        .unwrap();
        let r = c
            .call(|mut cl| async move { cl.heartbeat(pb::HeartbeatRequest::default()).await })
            .await;
        assert_eq!(r.unwrap_err().code(), Code::Unavailable);
    }
}
