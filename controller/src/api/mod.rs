//! The public gRPC API (`nephele.iam.v1`, `nephele.compute.v1`,
//! `nephele.infra.v1`, `nephele.ops.v1`) and the node agent protocol
//! (`nephele.node.v1`), served by every controller over the
//! [`StateStore`]: writes go through `propose` (which forwards to the raft
//! leader), reads through the linearizable `read`, so any controller answers
//! any call.
//!
//! - [`errors`]: status codes and the stable `ErrorInfo` reasons (the table).
//! - [`auth`]: bearer tokens, hashing, the bootstrap admin token.
//! - [`authz`]: the one table of which role each RPC needs.
//! - [`convert`]: state model <-> protobuf messages.
//! - `iam.rs`, `compute.rs`, `infra.rs`, `ops.rs`, `node.rs`: the services,
//!   all implemented on [`Api`].
//! - `console.rs`: the console and console-log relay to the instance's
//!   node (`nephele.node.v1.Agent`).
//!
//! [`routes`] adds every service (plus gRPC health and reflection) to a
//! tonic router, each with explicit message size limits.

pub mod auth;
pub mod authz;
pub mod convert;
pub mod errors;

mod compute;
mod console;
mod iam;
mod infra;
pub mod join;
mod migration;
mod node;
mod ops;
pub mod revocation;

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nephele_proto::compute::v1 as compute_pb;
use nephele_proto::iam::v1 as iam_pb;
use nephele_proto::infra::v1 as infra_pb;
use nephele_proto::node::v1 as node_pb;
use nephele_proto::ops::v1 as ops_pb;
use nephele_state::{Command, Envelope, Response, State};
use sha2::{Digest as _, Sha256};
use tonic::metadata::MetadataMap;
use tonic::transport::server::Router;

use self::auth::Caller;
use self::authz::Target;
use self::errors::ApiError;
use crate::reconcile::NodeBeats;
use crate::store::{Committed, ProposeError, StateStore};

/// Largest request message a server accepts.
pub const MAX_DECODING_MESSAGE_SIZE: usize = 4 << 20;
/// Largest response message a server sends.
pub const MAX_ENCODING_MESSAGE_SIZE: usize = 16 << 20;
/// Page size when a list request does not say.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size; larger requests are clamped.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Settings of the API services.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// How often agents are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// Graceful stop time when a stop request does not say.
    pub default_stop_timeout: Duration,
    /// Longest WaitOperation.
    pub max_wait: Duration,
    /// How long an agent's VMs may run after it sent its last acknowledged
    /// heartbeat (see `proto/nephele/node/v1/node.proto`, fencing).
    pub fence_lease: Duration,
    /// The leader answers heartbeats from memory ([`NodeBeats`]) and
    /// commits one (refreshing the node's recorded `last_heartbeat`) only
    /// when the recorded one is older than this, or the node is DOWN.
    pub heartbeat_commit_interval: Duration,
    /// The operator key: with it this controller opens the sealed cluster
    /// CA of the replicated state to sign node certificates
    /// (`NodeJoin/Join`); without it (and without `node_ca`) it refuses
    /// joins.
    pub operator_key: Option<Arc<nephele_tls::OperatorKey>>,
    /// A cluster CA given open (in-process tests); otherwise the state's
    /// is opened with `operator_key`.
    pub node_ca: Option<join::NodeCa>,
    /// How long the node certificates this controller signs (join and
    /// renewal) are valid; agents renew at two thirds of it.
    pub node_cert_validity: Duration,
    /// Also accept NodeAgent calls from clients without a node
    /// certificate that carry an admin bearer token (the transition path,
    /// `--allow-node-tokens`). Off by default: only node certificates.
    /// A plaintext server (in-process tests of the library) has no
    /// certificates to require and always accepts the token.
    pub allow_node_tokens: bool,
    /// Where this controller keeps the content of uploaded images
    /// (`<data-dir>/images`); `None`: it takes no uploads and serves no
    /// image content (in-process tests without a data directory).
    pub image_dir: Option<std::path::PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            heartbeat_interval: Duration::from_secs(2),
            default_stop_timeout: Duration::from_secs(30),
            max_wait: Duration::from_secs(60),
            fence_lease: Duration::from_secs(10),
            heartbeat_commit_interval: Duration::from_secs(30),
            operator_key: None,
            node_ca: None,
            node_cert_validity: nephele_tls::ca::DEFAULT_VALIDITY,
            allow_node_tokens: false,
            image_dir: None,
        }
    }
}

struct Inner<S> {
    store: Arc<S>,
    config: ApiConfig,
    /// Measured load per node from the heartbeats this controller received
    /// (not replicated: load is fresh or useless).
    loads: Mutex<HashMap<String, infra_pb::Load>>,
    /// Token secrets verified by this controller.
    tokens: auth::TokenCache,
    /// How many refused calls this controller may still write to the
    /// audit trail (see [`DenialBudget`]).
    denials: Mutex<DenialBudget>,
    /// Heartbeats answered from memory as the leader; the liveness loop
    /// reads the same map.
    beats: Arc<NodeBeats>,
    /// This controller's TLS (its certificate dials the agents' ports);
    /// `None` on a plaintext server (in-process tests).
    tls: Option<nephele_tls::TlsContext>,
    /// The revoked identities (the TLS context's set, kept current from
    /// the state by [`revocation::keep_current`]).
    revocations: nephele_tls::Revocations,
    /// The state's cluster CA opened with the operator key, and the record
    /// it was opened from (opened at the first join).
    opened_ca: Mutex<Option<(nephele_state::model::SealedCaRecord, Arc<nephele_tls::Ca>)>>,
    /// The uploaded images' content this controller holds.
    images: Option<crate::images::ImageContent>,
}

/// Refused calls cost a raft write each to audit, and an unauthenticated
/// client can make them as fast as it likes. So each controller records at
/// most [`DenialBudget::BURST`] at once and [`DenialBudget::PER_SECOND`]
/// after that; the next record says how many were left out.
#[derive(Debug)]
struct DenialBudget {
    tokens: f64,
    last: std::time::Instant,
    suppressed: u64,
}

impl DenialBudget {
    const BURST: f64 = 50.0;
    const PER_SECOND: f64 = 10.0;

    fn new() -> Self {
        DenialBudget {
            tokens: Self::BURST,
            last: std::time::Instant::now(),
            suppressed: 0,
        }
    }

    /// `Some(n)` when this refusal is to be recorded, `n` being how many
    /// before it were not; `None` when it is to be left out.
    fn take(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * Self::PER_SECOND;
        self.tokens = (self.tokens + refill).min(Self::BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// A call as authentication and the audit trail see it: its metadata and,
/// when the transport knows it, the client's address.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    metadata: &'a MetadataMap,
    peer: Option<std::net::SocketAddr>,
}

/// What the audit trail records about where `call` to `rpc` came from.
fn origin(call: Call<'_>, rpc: &str) -> nephele_state::Origin {
    nephele_state::Origin {
        peer: call.peer.map(|p| p.to_string()).unwrap_or_default(),
        rpc: rpc.to_owned(),
    }
}

impl<'a, T> From<&'a tonic::Request<T>> for Call<'a> {
    fn from(req: &'a tonic::Request<T>) -> Self {
        Call {
            metadata: req.metadata(),
            peer: req.remote_addr(),
        }
    }
}

impl<'a> From<&'a MetadataMap> for Call<'a> {
    fn from(metadata: &'a MetadataMap) -> Self {
        Call {
            metadata,
            peer: None,
        }
    }
}

/// The API services over one store. Cheap to clone.
pub struct Api<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Api<S> {
    fn clone(&self) -> Self {
        Api {
            inner: self.inner.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Api<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Wall-clock milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A proposal's result as an API result.
pub fn outcome(r: Result<Committed, ProposeError>) -> Result<Response, ApiError> {
    Ok(r?.outcome?)
}

/// `Some` for a non-empty request id.
fn request_id(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// An id for a resource a command creates on the caller's behalf (an
/// operation, a migration): derived from the request id when there is one,
/// so a retry proposes the very same command, random otherwise.
fn derived_id(prefix: &str, request_id: Option<&str>, salt: &str) -> Result<String, ApiError> {
    let digest = match request_id {
        Some(r) => Sha256::digest(format!("{r}\0{salt}").as_bytes()).to_vec(),
        None => {
            let s = auth::new_secret().map_err(|e| ApiError::Internal(e.to_string()))?;
            s.into_bytes()
        }
    };
    let hex: String = Sha256::digest(&digest)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("{prefix}-{hex}"))
}

/// A parsed page request: how many, and after which key.
#[derive(Debug, Clone)]
struct Page {
    size: usize,
    after: Option<String>,
}

impl Page {
    fn parse(page_size: i32, page_token: &str) -> Result<Page, ApiError> {
        let size = match usize::try_from(page_size) {
            Err(_) => {
                return Err(ApiError::InvalidArgument(
                    "page_size must not be negative".into(),
                ));
            }
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) => n.min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode_token(page_token).ok_or_else(|| {
                ApiError::InvalidArgument(
                    "page_token is not one this API returned; start again without it".into(),
                )
            })?)
        };
        Ok(Page { size, after })
    }

    /// Takes up to `size` items of `map` after the token (and starting with
    /// `prefix`) that `f` maps to `Some`; returns them and the next token.
    fn take<T, U>(
        &self,
        map: &BTreeMap<String, T>,
        prefix: &str,
        mut f: impl FnMut(&T) -> Option<U>,
    ) -> (Vec<U>, String) {
        let start = match &self.after {
            Some(a) => Bound::Excluded(a.clone()),
            None => Bound::Included(prefix.to_owned()),
        };
        let mut out = Vec::new();
        let mut last = None;
        for (k, v) in map.range((start, Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            if out.len() == self.size {
                return (
                    out,
                    last.map(|l: &String| encode_token(l)).unwrap_or_default(),
                );
            }
            if let Some(u) = f(v) {
                out.push(u);
                last = Some(k);
            }
        }
        (out, String::new())
    }
}

/// Page tokens are the last key returned, hex-encoded: opaque to clients,
/// stable across controllers.
fn encode_token(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) || token.len() > 4096 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

impl<S: StateStore> Api<S> {
    /// The API over `store`.
    /// `beats` must be the map the liveness loop reads
    /// ([`crate::reconcile::spawn`]), or nodes that heartbeat only into
    /// memory would be judged silent. `tls` is this controller's (see
    /// [`crate::server::ControllerOptions::tls`]).
    pub fn new(
        store: Arc<S>,
        config: ApiConfig,
        beats: Arc<NodeBeats>,
        tls: Option<nephele_tls::TlsContext>,
    ) -> Self {
        let images = config.image_dir.clone().and_then(|dir| {
            crate::images::ImageContent::open(dir.clone())
                .inspect_err(|e| {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot open the image content directory: this controller takes no uploads");
                })
                .ok()
        });
        Api {
            inner: Arc::new(Inner {
                store,
                config,
                loads: Mutex::new(HashMap::new()),
                tokens: auth::TokenCache::default(),
                denials: Mutex::new(DenialBudget::new()),
                beats,
                revocations: tls
                    .as_ref()
                    .map(|t| t.revocations().clone())
                    .unwrap_or_default(),
                tls,
                opened_ca: Mutex::new(None),
                images,
            }),
        }
    }

    fn store(&self) -> &S {
        &self.inner.store
    }

    /// The uploaded images' content this controller holds, if it keeps any.
    pub fn image_content(&self) -> Option<crate::images::ImageContent> {
        self.inner.images.clone()
    }

    /// The revocation set this API checks (and the TLS handshakes, when
    /// the server has TLS).
    pub fn revocations(&self) -> &nephele_tls::Revocations {
        &self.inner.revocations
    }

    /// Reads linearizably.
    async fn read<R, F>(&self, f: F) -> Result<R, ApiError>
    where
        R: Send + 'static,
        F: FnOnce(&State) -> R + Send + 'static,
    {
        Ok(self.store().read(f).await?)
    }

    /// Reads linearizably; `f` may fail.
    async fn read_try<R, F>(&self, f: F) -> Result<R, ApiError>
    where
        R: Send + 'static,
        F: FnOnce(&State) -> Result<R, ApiError> + Send + 'static,
    {
        self.store().read(f).await?
    }

    /// Reads the resource `name` from the map `map` picks, converted;
    /// NOT_FOUND when it is not there.
    async fn get_one<T, U>(
        &self,
        name: String,
        map: fn(&State) -> &BTreeMap<String, T>,
        convert: fn(&T) -> U,
    ) -> Result<U, ApiError>
    where
        T: 'static,
        U: Send + 'static,
    {
        self.read_try(move |s| {
            map(s)
                .get(&name)
                .map(convert)
                .ok_or_else(|| ApiError::not_found(name))
        })
        .await
    }

    /// Proposes `command` as `actor`.
    async fn propose(
        &self,
        actor: &str,
        request_id: Option<String>,
        command: Command,
    ) -> Result<Response, ApiError> {
        self.submit(actor.to_owned(), request_id, command, None)
            .await
    }

    /// Proposes `command` on behalf of an authorized person: it goes into
    /// the audit trail with the call's origin and its result.
    async fn propose_as(
        &self,
        caller: &Caller,
        request_id: Option<String>,
        command: Command,
    ) -> Result<Response, ApiError> {
        self.submit(
            caller.user.clone(),
            request_id,
            command,
            caller.origin.clone(),
        )
        .await
    }

    async fn submit(
        &self,
        actor: String,
        request_id: Option<String>,
        command: Command,
        origin: Option<nephele_state::Origin>,
    ) -> Result<Response, ApiError> {
        let envelope = Envelope {
            time: now_ms(),
            actor,
            request_id,
            fence_term: None,
            command,
            origin,
        };
        outcome(self.store().propose(envelope).await)
    }

    /// Who calls.
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, ApiError> {
        let bearer = auth::bearer(metadata)?;
        let now = now_ms();
        let presented = self
            .read_try(move |s| auth::lookup(s, &bearer, now))
            .await?;
        let verified = self
            .inner
            .tokens
            .verify(&presented.name, &presented.stored, &presented.secret)
            .await;
        presented.accept(verified)
    }

    /// Authenticates and authorizes `rpc` on `target`. A refusal goes into
    /// the audit trail (within this controller's [`DenialBudget`]).
    async fn authorize<'a>(
        &self,
        call: impl Into<Call<'a>>,
        rpc: &str,
        target: Target<'_>,
    ) -> Result<Caller, ApiError> {
        let call = call.into();
        let origin = origin(call, rpc);
        let (actor, checked) = match self.authenticate(call.metadata).await {
            Ok(caller) => (
                caller.user.clone(),
                authz::authorize(&caller, rpc, target).map(|()| caller),
            ),
            Err(e) => ("anonymous".to_owned(), Err(e)),
        };
        match checked {
            Ok(mut caller) => {
                caller.origin = Some(origin);
                Ok(caller)
            }
            Err(e) => {
                self.record_denial(actor, origin, target, &e).await;
                Err(e)
            }
        }
    }

    /// Writes a refused call into the audit trail, best effort: the caller
    /// gets its refusal whether or not the record could be written.
    async fn record_denial(
        &self,
        actor: String,
        origin: nephele_state::Origin,
        target: Target<'_>,
        error: &ApiError,
    ) {
        let resource = match target {
            Target::Cluster => String::new(),
            Target::Project(p) | Target::User(p) => p.to_owned(),
        };
        self.record_denial_of(actor, origin, resource, error).await;
    }

    /// [`Self::record_denial`] about a named resource.
    async fn record_denial_of(
        &self,
        actor: String,
        origin: nephele_state::Origin,
        resource: String,
        error: &ApiError,
    ) {
        if !matches!(
            error,
            ApiError::PermissionDenied(_) | ApiError::Unauthenticated(_)
        ) {
            return;
        }
        let Some(left_out) = self
            .inner
            .denials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let mut reason = format!("{}: {error}", error.reason());
        if left_out > 0 {
            reason.push_str(&format!(
                " ({left_out} refusals before this one were not recorded: too many)"
            ));
        }
        let command = Command::RecordDenial { resource, reason };
        if let Err(e) = self.submit(actor, None, command, Some(origin)).await {
            tracing::debug!(error = %e, "refused call not audited");
        }
    }

    /// Every controller's address and the leader's, for agents.
    async fn controller_info(&self) -> Result<node_pb::ControllerInfo, ApiError> {
        let leader = self.store().leadership().leader_id;
        self.read(move |s| node_pb::ControllerInfo {
            controllers: s.controllers.values().cloned().collect(),
            leader_address: leader
                .and_then(|l| s.controllers.get(&l).cloned())
                .unwrap_or_default(),
        })
        .await
    }
}

/// The project of a project-scoped name, as an authorization target; names
/// outside projects are cluster-wide.
fn project_target(name: &str) -> Target<'_> {
    match nephele_state::names::project_of(name) {
        Some(p) => Target::Project(p),
        None => Target::Cluster,
    }
}

/// Adds every API service, gRPC health and gRPC reflection to `router`.
pub async fn routes<S: StateStore>(api: Api<S>, router: Router) -> Router {
    macro_rules! limited {
        ($server:path) => {{
            use $server as server;
            server::new(api.clone())
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE)
        }};
    }
    let router = router
        .add_service(limited!(iam_pb::iam_server::IamServer))
        .add_service(limited!(compute_pb::flavors_server::FlavorsServer))
        .add_service(limited!(compute_pb::images_server::ImagesServer))
        .add_service(limited!(compute_pb::instances_server::InstancesServer))
        .add_service(limited!(
            compute_pb::server_groups_server::ServerGroupsServer
        ))
        .add_service(limited!(infra_pb::nodes_server::NodesServer))
        .add_service(limited!(infra_pb::migrations_server::MigrationsServer))
        .add_service(limited!(infra_pb::cluster_server::ClusterServer))
        .add_service(limited!(ops_pb::operations_server::OperationsServer))
        .add_service(limited!(ops_pb::events_server::EventsServer))
        .add_service(limited!(node_pb::node_agent_server::NodeAgentServer))
        .add_service(limited!(node_pb::node_join_server::NodeJoinServer));
    nephele_proto::serve::add_health_and_reflection(
        router,
        &[
            "nephele.iam.v1.Iam",
            "nephele.compute.v1.Flavors",
            "nephele.compute.v1.Images",
            "nephele.compute.v1.Instances",
            "nephele.compute.v1.ServerGroups",
            "nephele.infra.v1.Nodes",
            "nephele.infra.v1.Migrations",
            "nephele.infra.v1.Cluster",
            "nephele.ops.v1.Operations",
            "nephele.ops.v1.Events",
            "nephele.node.v1.NodeAgent",
            "nephele.node.v1.NodeJoin",
        ],
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_a_map_in_order() {
        let map: BTreeMap<String, u32> = (0..7).map(|i| (format!("k/{i}"), i)).collect();
        let mut token = String::new();
        let mut seen = Vec::new();
        loop {
            let page = Page::parse(3, &token).unwrap();
            let (items, next) = page.take(&map, "k/", |v| (v % 2 == 0).then_some(*v));
            seen.extend(items);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, vec![0, 2, 4, 6]);
        assert!(Page::parse(-1, "").is_err());
        assert!(Page::parse(1, "zz").is_err());
        assert_eq!(Page::parse(5000, "").unwrap().size, MAX_PAGE_SIZE);
        assert_eq!(
            decode_token(&encode_token("projects/p1")).as_deref(),
            Some("projects/p1")
        );
    }

    #[test]
    fn derived_ids_are_stable_with_a_request_id() {
        let a = derived_id("op", Some("r1"), "x").unwrap();
        assert_eq!(a, derived_id("op", Some("r1"), "x").unwrap());
        assert_ne!(a, derived_id("op", Some("r1"), "y").unwrap());
        assert_ne!(
            derived_id("op", None, "x").unwrap(),
            derived_id("op", None, "x").unwrap()
        );
        nephele_state::names::validate_id(&a).unwrap();
    }
}
