//! Connecting to a controller over TLS (the controller verified against
//! the cluster CA, [`Trust`]) with a bearer token, and turning failures
//! into messages that say what to do, with the CLI's exit codes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;

/// Exit code when the API refused or failed.
pub const EXIT_API: i32 = 1;
/// Exit code for bad usage or configuration.
pub const EXIT_USAGE: i32 = 2;
/// Exit code when `--wait` timed out.
pub const EXIT_WAIT_TIMEOUT: i32 = 3;

/// Why a command failed; each kind has its exit code.
#[derive(Debug, Error)]
pub enum CliError {
    /// The API refused or could not be reached.
    #[error("{0}")]
    Api(String),
    /// The command line or configuration is wrong.
    #[error("{0}")]
    Usage(String),
    /// `--wait` gave up.
    #[error("{0}")]
    WaitTimeout(String),
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Api(_) => EXIT_API,
            CliError::Usage(_) => EXIT_USAGE,
            CliError::WaitTimeout(_) => EXIT_WAIT_TIMEOUT,
        }
    }
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        let reason = s
            .get_details_error_info()
            .map(|i| i.reason)
            .unwrap_or_default();
        let hint = match reason.as_str() {
            "UNAUTHENTICATED" => {
                " (set `token` or `token_file` in your profile, or NEPHELE_TOKEN; an admin creates tokens with `neph token create`)"
            }
            "NOT_FOUND" => " (check the name with the resource's `list` command)",
            "NO_VALID_HOST" => {
                " (no compute node can take it: a smaller flavor, or an admin adds or enables nodes: `neph node list`)"
            }
            "NOT_LEADER" | "CONTROLLER_STOPPED" => {
                " (the cluster is electing a leader or this controller is stopping; retry, or use another endpoint)"
            }
            "COMMIT_UNKNOWN" => " (retry with the same --request-id to learn the outcome)",
            _ => "",
        };
        let message = match s.code() {
            Code::Unavailable if reason.is_empty() => format!(
                "cannot reach the controller: {}; is it running, and is `endpoint` right (--endpoint, NEPHELE_ENDPOINT, or the profile)?",
                s.message()
            ),
            _ => s.message().to_owned(),
        };
        let tag = if reason.is_empty() {
            format!("{:?}", s.code())
        } else {
            reason
        };
        CliError::Api(format!("{tag}: {message}{hint}"))
    }
}

/// Whether a failed call may be tried again on another controller: it was
/// not served (no leader, controller stopping or unreachable) or its
/// outcome is unknown. Only calls that are idempotent (reads, or writes
/// carrying a request id) are retried.
pub fn retryable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded)
        && s.get_details_error_info()
            .is_none_or(|i| i.reason != "NODE_UNAVAILABLE")
}

/// A new request id for a mutating call the user gave none for, so that
/// retrying it elsewhere cannot apply it twice.
pub fn new_request_id() -> String {
    use sha2::Digest as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!(
        "{now}/{}/{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let digest = sha2::Sha256::digest(seed.as_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("neph-{hex}")
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.0 {
            r.metadata_mut().insert("authorization", h.clone());
        }
        Ok(r)
    }
}

/// The channel every client uses.
pub type Svc = InterceptedService<Channel, Bearer>;

/// The cluster CA certificate the CLI verifies controllers against.
#[derive(Debug, Clone)]
pub struct Trust {
    config: Arc<rustls::ClientConfig>,
    source: String,
}

/// Where a profile's CA certificate usually is, for error messages.
const CA_HINT: &str = "pass --ca-file, set NEPHELE_CA_FILE, or set `ca_file` (or `ca_pem`) in the \
     profile to the cluster's CA certificate (a controller's <data-dir>/tls/ca.pem; `neph dev up` \
     sets it in the dev profile)";

impl Trust {
    /// The CA certificate in the PEM file at `path`.
    pub fn from_file(path: &Path) -> Result<Trust, CliError> {
        let pem = std::fs::read(path).map_err(|e| {
            CliError::Usage(format!(
                "cannot read the CA certificate {}: {e}; {CA_HINT}",
                path.display()
            ))
        })?;
        Trust::from_pem(&pem, &path.display().to_string())
    }

    /// The CA certificate in `pem`; `source` names it in messages.
    pub fn from_pem(pem: &[u8], source: &str) -> Result<Trust, CliError> {
        let config = nephele_tls::server_auth_client_config(pem).map_err(|e| {
            CliError::Usage(format!("{source} holds no usable CA certificate: {e}"))
        })?;
        Ok(Trust {
            config,
            source: source.to_owned(),
        })
    }

    /// The error when no CA certificate was given.
    pub fn missing() -> CliError {
        CliError::Usage(format!(
            "no CA certificate to verify the controller with: {CA_HINT}"
        ))
    }
}

/// An error and its sources, joined by `": "`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A connection to one controller.
#[derive(Debug, Clone)]
pub struct Conn {
    channel: Channel,
    bearer: Bearer,
}

/// Largest response accepted.
const MAX_MESSAGE: usize = 16 << 20;

macro_rules! client {
    ($name:ident, $($ty:ident)::+) => {
        /// A client of this service.
        pub fn $name(&self) -> $($ty)::+<Svc> {
            $($ty)::+::with_interceptor(self.channel.clone(), self.bearer.clone())
                .max_decoding_message_size(MAX_MESSAGE)
        }
    };
}

impl Conn {
    /// Connects to `endpoint` (`host:port`, `http://` or `https://`
    /// optional: it is TLS either way) with `token`, verifying the
    /// controller's certificate against `trust` and the address dialled.
    pub async fn connect(
        endpoint: &str,
        token: Option<String>,
        trust: &Trust,
    ) -> Result<Conn, CliError> {
        let bare = nephele_tls::bare_address(endpoint);
        // The TLS connector dials; tonic is given a plain URI.
        let url = nephele_tls::channel_uri(endpoint);
        let bearer = match token {
            None => Bearer(None),
            Some(t) => Bearer(Some(format!("Bearer {}", t.trim()).parse().map_err(
                |_| {
                    CliError::Usage("the token holds characters a token never has; check it".into())
                },
            )?)),
        };
        let endpoint_cfg = Channel::from_shared(url.clone())
            .map_err(|_| {
                CliError::Usage(format!(
                    "endpoint {endpoint:?} is not an address like 127.0.0.1:7001"
                ))
            })?
            .connect_timeout(Duration::from_secs(5));
        let channel = nephele_tls::connect_channel(endpoint_cfg, trust.config.clone())
            .await
            .map_err(|e| {
                let why = chain(&e);
                if why.contains("certificate") || why.contains("Certificate") {
                    CliError::Api(format!(
                        "the controller at {bare} is not trusted: {why}; is {} the CA certificate of this cluster?",
                        trust.source
                    ))
                } else {
                    CliError::Api(format!(
                        "cannot reach the controller at {bare}: {why}; is it running, and is `endpoint` right (--endpoint, NEPHELE_ENDPOINT, or the profile)?"
                    ))
                }
            })?;
        Ok(Conn { channel, bearer })
    }

    client!(iam, nephele_proto::iam::v1::iam_client::IamClient);
    client!(
        flavors,
        nephele_proto::compute::v1::flavors_client::FlavorsClient
    );
    client!(
        images,
        nephele_proto::compute::v1::images_client::ImagesClient
    );
    client!(
        instances,
        nephele_proto::compute::v1::instances_client::InstancesClient
    );
    client!(
        groups,
        nephele_proto::compute::v1::server_groups_client::ServerGroupsClient
    );
    client!(nodes, nephele_proto::infra::v1::nodes_client::NodesClient);
    client!(
        migrations,
        nephele_proto::infra::v1::migrations_client::MigrationsClient
    );
    client!(
        cluster,
        nephele_proto::infra::v1::cluster_client::ClusterClient
    );
    client!(
        operations,
        nephele_proto::ops::v1::operations_client::OperationsClient
    );
    client!(events, nephele_proto::ops::v1::events_client::EventsClient);
}
