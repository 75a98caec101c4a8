//! The daemon's configuration: a TOML file (`--config`), overridden by
//! `NEPHELE_*` environment variables, overridden by flags.
//!
//! ```toml
//! id = 1
//! cluster_id = 42
//! listen = "127.0.0.1:7001"
//! advertise = "127.0.0.1:7001"   # defaults to listen
//! data_dir = "/var/lib/nephele/controller-1"
//! peers = ["2=127.0.0.1:7002", "3=127.0.0.1:7003"]
//! snapshot_interval = 10000
//! tick_ms = 50
//! election_ticks = 10
//! node_timeout_ms = 10000
//! fence_lease_ms = 10000
//! # How long a stop lets the guest power off before its node forces the
//! # VM off, when the stop request does not say.
//! default_stop_timeout_ms = 30000
//! # Automatic load balancing: act when the imbalance (standard deviation
//! # of node CPU utilisation, in percentage points; 0 turns it off) stays
//! # above the threshold for the window; then wait the cooldown.
//! rebalance_threshold_pct = 10
//! rebalance_window_ms = 30000
//! rebalance_cooldown_ms = 60000
//! # Automatic moves (drains, rebalancing) at once: per node (as source or
//! # target) and in the whole cluster, counting those already running.
//! max_migrations_per_node = 2
//! max_migrations = 4
//! # The state store: "raft" (the default, replicated among controllers)
//! # or "etcd" (an existing etcd cluster keeps the state; peers, cluster_id
//! # and the raft settings are then unused).
//! store = "raft"
//! etcd_endpoints = ["http://127.0.0.1:2379"]
//! etcd_prefix = "/nephele"
//! etcd_lease_ttl_s = 2
//! ```
//!
//! | flag | environment | file key |
//! |---|---|---|
//! | `--config` | `NEPHELE_CONFIG` | |
//! | `--id` | `NEPHELE_ID` | `id` |
//! | `--cluster-id` | `NEPHELE_CLUSTER_ID` | `cluster_id` |
//! | `--listen` | `NEPHELE_LISTEN` | `listen` |
//! | `--advertise` | `NEPHELE_ADVERTISE` | `advertise` |
//! | `--data-dir` | `NEPHELE_DATA_DIR` | `data_dir` |
//! | `--peers` (comma-separated `id=host:port`) | `NEPHELE_PEERS` | `peers` |
//! | `--snapshot-interval` | `NEPHELE_SNAPSHOT_INTERVAL` | `snapshot_interval` |
//! | `--tick-ms` | `NEPHELE_TICK_MS` | `tick_ms` |
//! | `--election-ticks` | `NEPHELE_ELECTION_TICKS` | `election_ticks` |
//! | `--node-timeout-ms` | `NEPHELE_NODE_TIMEOUT_MS` | `node_timeout_ms` |
//! | `--fence-lease-ms` | `NEPHELE_FENCE_LEASE_MS` | `fence_lease_ms` |
//! | `--node-cert-validity-s` | `NEPHELE_NODE_CERT_VALIDITY_S` | `node_cert_validity_s` |
//! | `--default-stop-timeout-ms` | `NEPHELE_DEFAULT_STOP_TIMEOUT_MS` | `default_stop_timeout_ms` |
//! | `--rebalance-threshold-pct` | `NEPHELE_REBALANCE_THRESHOLD_PCT` | `rebalance_threshold_pct` |
//! | `--rebalance-window-ms` | `NEPHELE_REBALANCE_WINDOW_MS` | `rebalance_window_ms` |
//! | `--rebalance-cooldown-ms` | `NEPHELE_REBALANCE_COOLDOWN_MS` | `rebalance_cooldown_ms` |
//! | `--max-migrations-per-node` | `NEPHELE_MAX_MIGRATIONS_PER_NODE` | `max_migrations_per_node` |
//! | `--max-migrations` | `NEPHELE_MAX_MIGRATIONS` | `max_migrations` |
//! | `--store` (`raft` or `etcd`) | `NEPHELE_STORE` | `store` |
//! | `--etcd-endpoints` (comma-separated URLs) | `NEPHELE_ETCD_ENDPOINTS` | `etcd_endpoints` |
//! | `--etcd-prefix` | `NEPHELE_ETCD_PREFIX` | `etcd_prefix` |
//! | `--etcd-lease-ttl-s` | `NEPHELE_ETCD_LEASE_TTL_S` | `etcd_lease_ttl_s` |
//! | `--operator-key-file` | `NEPHELE_OPERATOR_KEY_FILE` (or the key in `NEPHELE_OPERATOR_KEY`) | |
//! | `--sealed-ca` | `NEPHELE_SEALED_CA` | |
//! | `--allow-node-tokens` | `NEPHELE_ALLOW_NODE_TOKENS` | |
//!
//! The port speaks only TLS (see `crate::tls`): `init` creates the
//! cluster CA (its key sealed with the operator key) unless the sealed CA
//! file exists, and every controller without a certificate in
//! `<data-dir>/tls/` issues itself one from the sealed CA with the
//! operator key; once it has one, neither is needed to start.
//!
//! With `store = "etcd"` every controller of the site points at the same
//! etcd endpoints and prefix; the one holding the etcd leadership lease
//! runs the control loops, and a new one takes over within the lease TTL
//! (default 2 s) when it dies. `init` then only creates the bootstrap admin
//! token (once per prefix); `run` starts any further controller.
//!
//! A node silent for the node timeout (default 10 s) is marked DOWN; its
//! HA instances restart elsewhere once the fencing lease (default 10 s,
//! what agents let their VMs run past their last acknowledged heartbeat)
//! has passed on top of it. Agents are told to heartbeat every `lease / 4`
//! (at most every 2 s).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::raft::RaftConfig;

/// Settings given on the command line or in the environment (all optional:
/// the file and defaults fill the rest).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long, env = "NEPHELE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This controller's member id (non-zero, never reused).
    #[arg(long, env = "NEPHELE_ID")]
    pub id: Option<u64>,
    /// Cluster id; required with `init` and when joining, checked otherwise.
    #[arg(long, env = "NEPHELE_CLUSTER_ID")]
    pub cluster_id: Option<u64>,
    /// Address to serve the cluster protocol on (`host:port`, port 0 picks one).
    #[arg(long, env = "NEPHELE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address peers reach this controller at (defaults to the bound address).
    #[arg(long, env = "NEPHELE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Data directory (raft log and snapshots).
    #[arg(long, env = "NEPHELE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Other controllers as `id=host:port`, comma-separated. With `init` they
    /// are the initial members.
    #[arg(long, env = "NEPHELE_PEERS", value_delimiter = ',')]
    pub peers: Option<Vec<String>>,
    /// Applied entries between log compactions.
    #[arg(long, env = "NEPHELE_SNAPSHOT_INTERVAL")]
    pub snapshot_interval: Option<u64>,
    /// Raft tick length in milliseconds.
    #[arg(long, env = "NEPHELE_TICK_MS")]
    pub tick_ms: Option<u64>,
    /// Ticks before a follower without a leader campaigns.
    #[arg(long, env = "NEPHELE_ELECTION_TICKS")]
    pub election_ticks: Option<usize>,
    /// Milliseconds without a heartbeat before a node is marked DOWN.
    #[arg(long, env = "NEPHELE_NODE_TIMEOUT_MS")]
    pub node_timeout_ms: Option<u64>,
    /// The fencing lease given to agents, in milliseconds.
    #[arg(long, env = "NEPHELE_FENCE_LEASE_MS")]
    pub fence_lease_ms: Option<u64>,
    /// How long the node certificates this controller signs are valid, in
    /// seconds (default one year; agents renew at two thirds of it).
    #[arg(long, env = "NEPHELE_NODE_CERT_VALIDITY_S")]
    pub node_cert_validity_s: Option<u64>,
    /// How long a stop lets the guest power off before its node forces the
    /// VM off, in milliseconds, when the stop request does not say
    /// (default 30000, at most an hour).
    #[arg(long, env = "NEPHELE_DEFAULT_STOP_TIMEOUT_MS")]
    pub default_stop_timeout_ms: Option<u64>,
    /// Node CPU imbalance (standard deviation of utilisation, percentage
    /// points) above which the leader rebalances; 0 turns it off.
    #[arg(long, env = "NEPHELE_REBALANCE_THRESHOLD_PCT")]
    pub rebalance_threshold_pct: Option<u32>,
    /// How long the imbalance must last before moves start, milliseconds.
    #[arg(long, env = "NEPHELE_REBALANCE_WINDOW_MS")]
    pub rebalance_window_ms: Option<u64>,
    /// Pause after starting moves before planning again, milliseconds.
    #[arg(long, env = "NEPHELE_REBALANCE_COOLDOWN_MS")]
    pub rebalance_cooldown_ms: Option<u64>,
    /// Automatic migrations (drains, rebalancing) a node takes part in at
    /// once, as source or target (default 2).
    #[arg(long, env = "NEPHELE_MAX_MIGRATIONS_PER_NODE")]
    pub max_migrations_per_node: Option<u32>,
    /// Automatic migrations the cluster runs at once (default 4).
    #[arg(long, env = "NEPHELE_MAX_MIGRATIONS")]
    pub max_migrations: Option<u32>,
    /// Where the state lives: `raft` (replicated among the controllers, the
    /// default) or `etcd` (an existing etcd cluster).
    #[arg(long, env = "NEPHELE_STORE")]
    pub store: Option<StoreKind>,
    /// etcd client URLs, comma-separated (with `--store etcd`).
    #[arg(long, env = "NEPHELE_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// Key prefix of this cluster's state in etcd (default `/nephele`).
    #[arg(long, env = "NEPHELE_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// TTL in seconds of the etcd leadership lease (default 2): how long a
    /// dead leader's loops stay unowned.
    #[arg(long, env = "NEPHELE_ETCD_LEASE_TTL_S")]
    pub etcd_lease_ttl_s: Option<i64>,
    /// The operator key file (mode 0600) that seals the cluster CA's key;
    /// `init` creates it when missing. Needed when this controller has no
    /// certificate yet, and to sign node certificates (`NodeJoin/Join`):
    /// given it, the controller keeps the CA key open in memory; without
    /// it, it refuses joins. `NEPHELE_OPERATOR_KEY` may hold the key itself
    /// (64 hex digits) instead.
    #[arg(long, env = "NEPHELE_OPERATOR_KEY_FILE")]
    pub operator_key_file: Option<PathBuf>,
    /// The sealed cluster CA (default `<data-dir>/tls/ca.sealed`): `init`
    /// creates it unless it exists (initial members given the same file
    /// share one CA); a controller joining later is given a copy.
    #[arg(long, env = "NEPHELE_SEALED_CA")]
    pub sealed_ca: Option<PathBuf>,
    /// Also accept NodeAgent calls from agents without a node certificate
    /// that carry an admin bearer token (the transition path for agents
    /// that have not joined; any holder of an admin token can then act as
    /// any node). By default only node certificates are accepted there.
    #[arg(long, env = "NEPHELE_ALLOW_NODE_TOKENS")]
    pub allow_node_tokens: bool,
}

/// Which backend keeps the control-plane state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Raft among the controllers (the default).
    #[default]
    Raft,
    /// An existing etcd cluster (needs the `etcd` cargo feature).
    Etcd,
}

/// The resolved store settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// Raft among the controllers.
    Raft,
    /// etcd.
    Etcd {
        /// Client URLs.
        endpoints: Vec<String>,
        /// Key prefix.
        prefix: String,
        /// Leadership lease TTL in seconds.
        lease_ttl_s: i64,
    },
}

/// The configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Flags::id`].
    pub id: Option<u64>,
    /// See [`Flags::cluster_id`].
    pub cluster_id: Option<u64>,
    /// See [`Flags::listen`].
    pub listen: Option<SocketAddr>,
    /// See [`Flags::advertise`].
    pub advertise: Option<String>,
    /// See [`Flags::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`Flags::peers`].
    pub peers: Option<Vec<String>>,
    /// See [`Flags::snapshot_interval`].
    pub snapshot_interval: Option<u64>,
    /// See [`Flags::tick_ms`].
    pub tick_ms: Option<u64>,
    /// See [`Flags::election_ticks`].
    pub election_ticks: Option<usize>,
    /// See [`Flags::node_timeout_ms`].
    pub node_timeout_ms: Option<u64>,
    /// See [`Flags::fence_lease_ms`].
    pub fence_lease_ms: Option<u64>,
    /// See [`Flags::node_cert_validity_s`].
    pub node_cert_validity_s: Option<u64>,
    /// See [`Flags::default_stop_timeout_ms`].
    pub default_stop_timeout_ms: Option<u64>,
    /// See [`Flags::rebalance_threshold_pct`].
    pub rebalance_threshold_pct: Option<u32>,
    /// See [`Flags::rebalance_window_ms`].
    pub rebalance_window_ms: Option<u64>,
    /// See [`Flags::rebalance_cooldown_ms`].
    pub rebalance_cooldown_ms: Option<u64>,
    /// See [`Flags::max_migrations_per_node`].
    pub max_migrations_per_node: Option<u32>,
    /// See [`Flags::max_migrations`].
    pub max_migrations: Option<u32>,
    /// See [`Flags::store`].
    pub store: Option<StoreKind>,
    /// See [`Flags::etcd_endpoints`].
    pub etcd_endpoints: Option<Vec<String>>,
    /// See [`Flags::etcd_prefix`].
    pub etcd_prefix: Option<String>,
    /// See [`Flags::etcd_lease_ttl_s`].
    pub etcd_lease_ttl_s: Option<i64>,
}

/// The resolved configuration of one controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Member id.
    pub id: u64,
    /// Cluster id, if given.
    pub cluster_id: Option<u64>,
    /// Listen address.
    pub listen: SocketAddr,
    /// Advertised address (`None`: the bound address).
    pub advertise: Option<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Peers by id.
    pub peers: BTreeMap<u64, String>,
    /// Applied entries between compactions.
    pub snapshot_interval: u64,
    /// Tick length.
    pub tick: Duration,
    /// Election timeout in ticks.
    pub election_ticks: usize,
    /// Silence before a node is DOWN.
    pub node_timeout: Duration,
    /// The fencing lease.
    pub fence_lease: Duration,
    /// Validity of the node certificates this controller signs.
    pub node_cert_validity: Duration,
    /// Graceful stop time when a stop request does not say.
    pub default_stop_timeout: Duration,
    /// Rebalance threshold in percentage points (0: off).
    pub rebalance_threshold_pct: u32,
    /// How long an imbalance lasts before the balancer acts.
    pub rebalance_window: Duration,
    /// The balancer's pause after it started moves.
    pub rebalance_cooldown: Duration,
    /// Automatic migrations per node at once.
    pub max_migrations_per_node: u32,
    /// Automatic migrations in the cluster at once.
    pub max_migrations: u32,
    /// The state store.
    pub store: StoreChoice,
}

/// Why the configuration is unusable.
#[derive(Debug, Error)]
pub enum LoadConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("configuration file {path} is invalid")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// A required setting is missing everywhere.
    #[error("{0} is required (flag, NEPHELE_* variable or configuration file)")]
    Missing(&'static str),
    /// A peer is not `id=host:port`.
    #[error("peer {0:?} is not of the form id=host:port with a non-zero id")]
    BadPeer(String),
    /// A setting has an unusable value.
    #[error("{0}")]
    Invalid(String),
}

/// Parses `id=host:port` peer specs.
pub fn parse_peers(specs: &[String]) -> Result<BTreeMap<u64, String>, LoadConfigError> {
    let mut out = BTreeMap::new();
    for spec in specs {
        let spec = spec.trim();
        if spec.is_empty() {
            continue;
        }
        let (id, addr) = spec
            .split_once('=')
            .ok_or_else(|| LoadConfigError::BadPeer(spec.to_owned()))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| LoadConfigError::BadPeer(spec.to_owned()))?;
        if id == 0 || addr.trim().is_empty() {
            return Err(LoadConfigError::BadPeer(spec.to_owned()));
        }
        out.insert(id, addr.trim().to_owned());
    }
    Ok(out)
}

impl ControllerConfig {
    /// Resolves flags (which already include the environment) over the file
    /// over defaults.
    pub fn load(flags: &Flags) -> Result<ControllerConfig, LoadConfigError> {
        let file = match &flags.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| LoadConfigError::Read {
                        path: path.clone(),
                        source,
                    })?;
                toml::from_str::<FileConfig>(&text).map_err(|source| LoadConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => FileConfig::default(),
        };
        Self::merge(flags, file)
    }

    /// Merges flags over a parsed file.
    pub fn merge(flags: &Flags, file: FileConfig) -> Result<ControllerConfig, LoadConfigError> {
        let id = flags.id.or(file.id).ok_or(LoadConfigError::Missing("id"))?;
        if id == 0 {
            return Err(LoadConfigError::Invalid("id must not be 0".into()));
        }
        let peers = parse_peers(
            flags
                .peers
                .as_ref()
                .or(file.peers.as_ref())
                .map_or(&[], |v| v),
        )?;
        if peers.contains_key(&id) {
            return Err(LoadConfigError::Invalid(format!(
                "peers must not list this controller's own id {id}"
            )));
        }
        let tick_ms = flags.tick_ms.or(file.tick_ms).unwrap_or(50);
        if tick_ms == 0 {
            return Err(LoadConfigError::Invalid("tick_ms must not be 0".into()));
        }
        let election_ticks = flags.election_ticks.or(file.election_ticks).unwrap_or(10);
        if election_ticks < 2 {
            return Err(LoadConfigError::Invalid(
                "election_ticks must be at least 2".into(),
            ));
        }
        let node_timeout_ms = flags
            .node_timeout_ms
            .or(file.node_timeout_ms)
            .unwrap_or(10_000);
        let fence_lease_ms = flags
            .fence_lease_ms
            .or(file.fence_lease_ms)
            .unwrap_or(10_000);
        if node_timeout_ms < 100 || fence_lease_ms < 100 {
            return Err(LoadConfigError::Invalid(
                "node_timeout_ms and fence_lease_ms must be at least 100".into(),
            ));
        }
        let node_cert_validity_s = flags
            .node_cert_validity_s
            .or(file.node_cert_validity_s)
            .unwrap_or(nephele_tls::ca::DEFAULT_VALIDITY.as_secs());
        if node_cert_validity_s < 10 {
            return Err(LoadConfigError::Invalid(
                "node_cert_validity_s must be at least 10".into(),
            ));
        }
        let default_stop_timeout_ms = flags
            .default_stop_timeout_ms
            .or(file.default_stop_timeout_ms)
            .unwrap_or(30_000);
        if default_stop_timeout_ms > nephele_state::MAX_STOP_TIMEOUT_MS {
            return Err(LoadConfigError::Invalid(format!(
                "default_stop_timeout_ms must be at most {} (an hour)",
                nephele_state::MAX_STOP_TIMEOUT_MS
            )));
        }
        let rebalance_threshold_pct = flags
            .rebalance_threshold_pct
            .or(file.rebalance_threshold_pct)
            .unwrap_or(10);
        if rebalance_threshold_pct > 100 {
            return Err(LoadConfigError::Invalid(
                "rebalance_threshold_pct must be 0 (off) to 100".into(),
            ));
        }
        let max_migrations_per_node = flags
            .max_migrations_per_node
            .or(file.max_migrations_per_node)
            .unwrap_or(2);
        let max_migrations = flags.max_migrations.or(file.max_migrations).unwrap_or(4);
        if max_migrations_per_node == 0 || max_migrations == 0 {
            return Err(LoadConfigError::Invalid(
                "max_migrations_per_node and max_migrations must be at least 1".into(),
            ));
        }
        let store = match flags.store.or(file.store).unwrap_or_default() {
            StoreKind::Raft => StoreChoice::Raft,
            StoreKind::Etcd => {
                let endpoints: Vec<String> = flags
                    .etcd_endpoints
                    .clone()
                    .or(file.etcd_endpoints)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect();
                if endpoints.is_empty() {
                    return Err(LoadConfigError::Missing(
                        "etcd_endpoints (with store = etcd)",
                    ));
                }
                let prefix = flags
                    .etcd_prefix
                    .clone()
                    .or(file.etcd_prefix)
                    .unwrap_or_else(|| "/nephele".into());
                if prefix.is_empty() || prefix.ends_with('/') {
                    return Err(LoadConfigError::Invalid(format!(
                        "etcd_prefix {prefix:?} must be non-empty and not end with '/'"
                    )));
                }
                let lease_ttl_s = flags
                    .etcd_lease_ttl_s
                    .or(file.etcd_lease_ttl_s)
                    .unwrap_or(2);
                if lease_ttl_s < 1 {
                    return Err(LoadConfigError::Invalid(
                        "etcd_lease_ttl_s must be at least 1".into(),
                    ));
                }
                StoreChoice::Etcd {
                    endpoints,
                    prefix,
                    lease_ttl_s,
                }
            }
        };
        Ok(ControllerConfig {
            store,
            id,
            cluster_id: flags.cluster_id.or(file.cluster_id),
            listen: flags
                .listen
                .or(file.listen)
                .ok_or(LoadConfigError::Missing("listen"))?,
            advertise: flags.advertise.clone().or(file.advertise),
            data_dir: flags
                .data_dir
                .clone()
                .or(file.data_dir)
                .ok_or(LoadConfigError::Missing("data_dir"))?,
            peers,
            snapshot_interval: flags
                .snapshot_interval
                .or(file.snapshot_interval)
                .unwrap_or(10_000)
                .max(1),
            tick: Duration::from_millis(tick_ms),
            election_ticks,
            node_timeout: Duration::from_millis(node_timeout_ms),
            fence_lease: Duration::from_millis(fence_lease_ms),
            node_cert_validity: Duration::from_secs(node_cert_validity_s),
            default_stop_timeout: Duration::from_millis(default_stop_timeout_ms),
            rebalance_threshold_pct,
            rebalance_window: Duration::from_millis(
                flags
                    .rebalance_window_ms
                    .or(file.rebalance_window_ms)
                    .unwrap_or(30_000),
            ),
            rebalance_cooldown: Duration::from_millis(
                flags
                    .rebalance_cooldown_ms
                    .or(file.rebalance_cooldown_ms)
                    .unwrap_or(60_000),
            ),
            max_migrations_per_node,
            max_migrations,
        })
    }

    /// The raft settings for this controller, advertised at `advertise`.
    pub fn raft_config(&self, advertise: String, init: bool) -> RaftConfig {
        let mut c = RaftConfig::new(self.id, self.data_dir.clone(), advertise);
        c.cluster_id = self.cluster_id;
        c.peers = self.peers.clone();
        c.init = init;
        c.tick = self.tick;
        c.election_ticks = self.election_ticks;
        c.snapshot_interval = self.snapshot_interval;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file() {
        let file: FileConfig = toml::from_str(
            r#"
            id = 1
            cluster_id = 9
            listen = "127.0.0.1:7001"
            data_dir = "data"
            peers = ["2=127.0.0.1:7002", "3=h:7003"]
            "#,
        )
        .unwrap();
        let flags = Flags {
            id: Some(4),
            peers: Some(vec!["1=a:1".into()]),
            ..Default::default()
        };
        let c = ControllerConfig::merge(&flags, file).unwrap();
        assert_eq!(c.id, 4);
        assert_eq!(c.cluster_id, Some(9));
        assert_eq!(c.peers, BTreeMap::from([(1, "a:1".to_owned())]));
        assert_eq!(c.tick, Duration::from_millis(50));
        assert_eq!(c.node_timeout, Duration::from_secs(10));
        let flags = Flags {
            fence_lease_ms: Some(700),
            ..flags
        };
        let file: FileConfig = toml::from_str(
            "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\nnode_timeout_ms = 900",
        )
        .unwrap();
        let c = ControllerConfig::merge(&flags, file).unwrap();
        assert_eq!(c.node_timeout, Duration::from_millis(900));
        assert_eq!(c.fence_lease, Duration::from_millis(700));
        assert_eq!(c.default_stop_timeout, Duration::from_secs(30));
        let file: FileConfig = toml::from_str(
            "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\ndefault_stop_timeout_ms = 4000",
        )
        .unwrap();
        let c = ControllerConfig::merge(&flags, file.clone()).unwrap();
        assert_eq!(c.default_stop_timeout, Duration::from_secs(4));
        let hours = Flags {
            default_stop_timeout_ms: Some(2 * 3600 * 1000),
            ..flags.clone()
        };
        assert!(ControllerConfig::merge(&hours, file).is_err());
        let too_short = Flags {
            node_timeout_ms: Some(5),
            ..flags
        };
        assert!(ControllerConfig::merge(&too_short, FileConfig::default()).is_err());
    }

    #[test]
    fn refuses_bad_settings() {
        assert!(matches!(
            ControllerConfig::merge(&Flags::default(), FileConfig::default()),
            Err(LoadConfigError::Missing("id"))
        ));
        for bad in ["x", "0=a:1", "a=b", "2="] {
            assert!(parse_peers(&[bad.to_owned()]).is_err(), "{bad}");
        }
        assert!(toml::from_str::<FileConfig>("idd = 1").is_err());
        let flags = Flags {
            id: Some(1),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            data_dir: Some("d".into()),
            peers: Some(vec!["1=a:1".into()]),
            ..Default::default()
        };
        assert!(ControllerConfig::merge(&flags, FileConfig::default()).is_err());
    }

    #[test]
    fn chooses_the_store() {
        let base = "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\n";
        let c = ControllerConfig::merge(&Flags::default(), toml::from_str(base).unwrap()).unwrap();
        assert_eq!(c.store, StoreChoice::Raft);
        let file: FileConfig = toml::from_str(&format!(
            "{base}store = \"etcd\"\netcd_endpoints = [\"http://e:2379\"]"
        ))
        .unwrap();
        let c = ControllerConfig::merge(&Flags::default(), file.clone()).unwrap();
        assert_eq!(
            c.store,
            StoreChoice::Etcd {
                endpoints: vec!["http://e:2379".into()],
                prefix: "/nephele".into(),
                lease_ttl_s: 2,
            }
        );
        // Flags win; an etcd store without endpoints is refused.
        let flags = Flags {
            etcd_prefix: Some("/site-a".into()),
            etcd_endpoints: Some(vec!["http://a:1".into(), "http://b:1".into()]),
            ..Default::default()
        };
        let c = ControllerConfig::merge(&flags, file).unwrap();
        assert!(matches!(
            c.store,
            StoreChoice::Etcd { ref endpoints, ref prefix, .. }
                if endpoints.len() == 2 && prefix == "/site-a"
        ));
        let flags = Flags {
            store: Some(StoreKind::Etcd),
            ..Default::default()
        };
        assert!(matches!(
            ControllerConfig::merge(&flags, toml::from_str(base).unwrap()),
            Err(LoadConfigError::Missing(_))
        ));
        assert!(toml::from_str::<FileConfig>("store = \"zookeeper\"").is_err());
    }
}
