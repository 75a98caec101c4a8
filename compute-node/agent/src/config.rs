//! The agent's settings: from the command line (`neph-node run ...`, see
//! `main.rs`) to a checked [`AgentConfig`], with the defaults the README
//! documents (the `neph-vmm` next to this executable; capacity measured
//! from the host less a reserve).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nephele_proto::compute::v1::Resources;

use crate::host;
use crate::instance::is_dns_label;

/// Everything `neph-node run` needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `--node-id`: a lowercase DNS label.
    pub node_id: String,
    /// `--controller` (one or more).
    pub controllers: Vec<String>,
    /// `--listen`.
    pub listen: SocketAddr,
    /// `--advertise`: the address controllers reach the agent at (default:
    /// the bound listen address).
    pub advertise: Option<String>,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// `--image-dir`.
    pub image_dir: PathBuf,
    /// The bearer token read from `--token-file`, if given (the
    /// transition path for nodes without a certificate).
    pub token: Option<String>,
    /// `--join-token`: used on first start, when the node has no
    /// certificate yet (see [`crate::join`]).
    pub join_token: Option<String>,
    /// The cluster CA certificate of `--ca-file`, PEM.
    pub ca_pem: Vec<u8>,
    /// Server-authenticated TLS verified against `--ca-file`, no client
    /// certificate: for joining, and for the bearer-token fallback.
    pub controller_tls: std::sync::Arc<rustls::ClientConfig>,
    /// `--vmm`.
    pub vmm: PathBuf,
    /// `--vmm-user`: the user every `neph-vmm` drops to (`--user`).
    pub vmm_user: Option<String>,
    /// `--bridge`.
    pub bridge: Option<String>,
    /// What the node offers.
    pub capacity: Resources,
    /// `--label k=v`.
    pub labels: BTreeMap<String, String>,
}

/// The raw flags, as parsed by `main.rs`.
#[derive(Debug, Clone, Default)]
pub struct RawFlags {
    /// `--node-id`.
    pub node_id: String,
    /// `--controller`.
    pub controllers: Vec<String>,
    /// `--listen`.
    pub listen: String,
    /// `--advertise`.
    pub advertise: Option<String>,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// `--image-dir`.
    pub image_dir: PathBuf,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--join-token`.
    pub join_token: Option<String>,
    /// `--ca-file`.
    pub ca_file: PathBuf,
    /// `--vmm`.
    pub vmm: Option<PathBuf>,
    /// `--vmm-user`.
    pub vmm_user: Option<String>,
    /// `--bridge`.
    pub bridge: Option<String>,
    /// `--capacity-vcpus`.
    pub capacity_vcpus: Option<u64>,
    /// `--capacity-memory-mib`.
    pub capacity_memory_mib: Option<u64>,
    /// `--capacity-disk-gib`.
    pub capacity_disk_gib: Option<u64>,
    /// `--label` (`k=v` each).
    pub labels: Vec<String>,
}

/// The flags do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum LoadConfigError {
    /// Bad node id.
    #[error("--node-id {0:?} is not a lowercase DNS label (a-z, 0-9, '-', at most 63)")]
    NodeId(String),
    /// Bad listen address.
    #[error("--listen {0:?} is not HOST:PORT with an IP address")]
    Listen(String),
    /// No controllers.
    #[error("at least one --controller HOST:PORT is required")]
    NoController,
    /// Token file unreadable.
    #[error("cannot read the token file {0}")]
    TokenFile(PathBuf, #[source] std::io::Error),
    /// CA file unreadable.
    #[error("cannot read the CA certificate {0}")]
    CaFile(PathBuf, #[source] std::io::Error),
    /// CA file unusable.
    #[error("the CA certificate {0} is not usable")]
    BadCa(PathBuf, #[source] Box<nephele_tls::TlsConfigError>),
    /// Token file empty.
    #[error("the token file {0} is empty")]
    EmptyToken(PathBuf),
    /// A directory cannot be made.
    #[error("cannot create directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    /// No VMM binary.
    #[error(
        "the hypervisor binary {0} does not exist; build it (cargo build -p neph-vmm) or pass --vmm PATH"
    )]
    Vmm(PathBuf),
    /// Bad label.
    #[error("--label {0:?} is not KEY=VALUE")]
    Label(String),
    /// Bridge name unusable.
    #[error("--bridge {0:?} is not a network interface name")]
    Bridge(String),
    /// Capacity unknown.
    #[error("cannot measure the host's {0}; pass --capacity-{0}")]
    Capacity(&'static str),
}

impl AgentConfig {
    /// Checks `flags`, reads the token file, makes the data directory and
    /// measures what the flags leave out.
    pub fn load(flags: RawFlags) -> Result<Self, LoadConfigError> {
        if !is_dns_label(&flags.node_id) {
            return Err(LoadConfigError::NodeId(flags.node_id));
        }
        let listen: SocketAddr = flags
            .listen
            .parse()
            .map_err(|_| LoadConfigError::Listen(flags.listen.clone()))?;
        if flags.controllers.is_empty() {
            return Err(LoadConfigError::NoController);
        }
        let token = match &flags.token_file {
            Some(file) => {
                let token = std::fs::read_to_string(file)
                    .map_err(|e| LoadConfigError::TokenFile(file.clone(), e))?
                    .trim()
                    .to_owned();
                if token.is_empty() {
                    return Err(LoadConfigError::EmptyToken(file.clone()));
                }
                Some(token)
            }
            None => None,
        };
        let join_token = flags
            .join_token
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let ca = std::fs::read(&flags.ca_file)
            .map_err(|e| LoadConfigError::CaFile(flags.ca_file.clone(), e))?;
        let controller_tls = nephele_tls::server_auth_client_config(&ca)
            .map_err(|e| LoadConfigError::BadCa(flags.ca_file.clone(), Box::new(e)))?;
        let instances = flags.data_dir.join("instances");
        std::fs::create_dir_all(&instances).map_err(|e| LoadConfigError::Dir(instances, e))?;
        let vmm = match flags.vmm {
            Some(p) => p,
            None => default_vmm(),
        };
        if !vmm.is_file() {
            return Err(LoadConfigError::Vmm(vmm));
        }
        if let Some(b) = &flags.bridge
            && (b.is_empty() || b.len() > 15 || b.contains(['/', ' ']))
        {
            return Err(LoadConfigError::Bridge(b.clone()));
        }
        let mut labels = BTreeMap::new();
        for l in &flags.labels {
            let (k, v) = l
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| LoadConfigError::Label(l.clone()))?;
            labels.insert(k.to_owned(), v.to_owned());
        }
        let capacity = Resources {
            vcpus: flags.capacity_vcpus.unwrap_or_else(host::host_cpus),
            memory_mib: match flags.capacity_memory_mib {
                Some(m) => m,
                None => {
                    let total =
                        host::host_memory_mib().ok_or(LoadConfigError::Capacity("memory-mib"))?;
                    total.saturating_sub(host::memory_reserve_mib(total))
                }
            },
            disk_gib: match flags.capacity_disk_gib {
                Some(d) => d,
                None => host::free_disk_gib(&flags.data_dir)
                    .map_err(|_| LoadConfigError::Capacity("disk-gib"))?
                    .saturating_sub(host::DISK_RESERVE_GIB),
            },
        };
        Ok(Self {
            node_id: flags.node_id,
            controllers: flags.controllers,
            listen,
            advertise: flags.advertise,
            data_dir: flags.data_dir,
            image_dir: flags.image_dir,
            token,
            join_token,
            ca_pem: ca,
            controller_tls,
            vmm,
            vmm_user: flags.vmm_user,
            bridge: flags.bridge,
            capacity,
            labels,
        })
    }

    /// `nodes/{node-id}`.
    pub fn node_name(&self) -> String {
        format!("nodes/{}", self.node_id)
    }

    /// `<data-dir>/instances`.
    pub fn instances_dir(&self) -> PathBuf {
        self.data_dir.join("instances")
    }
}

/// `neph-vmm` next to this executable.
pub fn default_vmm() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().unwrap_or(Path::new(".")).join("neph-vmm")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(d: &Path) -> RawFlags {
        let token = d.join("token");
        std::fs::write(&token, "secret\n").unwrap();
        let vmm = d.join("vmm");
        std::fs::write(&vmm, "").unwrap();
        let ca = d.join("ca.pem");
        nephele_tls::install_default();
        let cert = nephele_tls::Ca::create("c").unwrap().cert_pem().to_owned();
        std::fs::write(&ca, cert).unwrap();
        RawFlags {
            node_id: "node-1".into(),
            controllers: vec!["127.0.0.1:7000".into()],
            listen: "127.0.0.1:0".into(),
            data_dir: d.join("data"),
            image_dir: d.join("images"),
            token_file: Some(token),
            ca_file: ca,
            vmm: Some(vmm),
            labels: vec!["zone=a".into()],
            ..Default::default()
        }
    }

    #[test]
    fn flags_load_with_measured_defaults() {
        let d = tempfile::tempdir().unwrap();
        let c = AgentConfig::load(flags(d.path())).unwrap();
        assert_eq!(c.token.as_deref(), Some("secret"));
        assert_eq!(c.node_name(), "nodes/node-1");
        assert!(c.instances_dir().is_dir());
        assert!(c.capacity.vcpus >= 1 && c.capacity.memory_mib > 0);
        assert_eq!(c.labels["zone"], "a");
        let mut f = flags(d.path());
        f.capacity_vcpus = Some(3);
        f.capacity_memory_mib = Some(4096);
        f.capacity_disk_gib = Some(7);
        let c = AgentConfig::load(f).unwrap();
        assert_eq!(
            (c.capacity.vcpus, c.capacity.memory_mib, c.capacity.disk_gib),
            (3, 4096, 7)
        );
    }

    #[test]
    fn bad_flags_say_what_to_fix() {
        let d = tempfile::tempdir().unwrap();
        type Mutate = fn(&mut RawFlags);
        let cases: Vec<(Mutate, &str)> = vec![
            (|f| f.node_id = "Node_1".into(), "--node-id"),
            (|f| f.listen = "localhost".into(), "--listen"),
            (|f| f.controllers.clear(), "--controller"),
            (
                |f| f.token_file = Some("/nonexistent/token".into()),
                "token file",
            ),
            (|f| f.vmm = Some("/nonexistent/vmm".into()), "--vmm"),
            (|f| f.labels = vec!["novalue".into()], "--label"),
            (|f| f.bridge = Some("a/b".into()), "--bridge"),
        ];
        for (mutate, want) in cases {
            let mut f = flags(d.path());
            mutate(&mut f);
            let e = AgentConfig::load(f).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want}");
        }
        let f = flags(d.path());
        std::fs::write(f.token_file.as_ref().unwrap(), "  \n").unwrap();
        assert!(matches!(
            AgentConfig::load(f),
            Err(LoadConfigError::EmptyToken(_))
        ));
    }
}
