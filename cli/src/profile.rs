//! Profiles: `$XDG_CONFIG_HOME/nephele/config.toml` (or
//! `~/.config/nephele/config.toml`), overridden by `NEPHELE_*` environment
//! variables and flags.
//!
//! ```toml
//! default_profile = "dev"
//!
//! [profiles.dev]
//! endpoint = "http://127.0.0.1:7001"
//! # or several controllers: a call the first cannot serve (UNAVAILABLE)
//! # is retried on the next, with the same request id
//! endpoints = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
//! token_file = "/var/lib/nephele/c1/admin.token"   # or token = "nph_..."
//! ca_file = "/var/lib/nephele/c1/tls/ca.pem"       # or ca_pem = "-----BEGIN ..."
//! project = "p1"
//! output = "table"                               # table, json or yaml
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// One profile's settings; every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Controller address (`http://host:port` or `host:port`).
    pub endpoint: Option<String>,
    /// Several controller addresses, tried in order (after `endpoint`).
    pub endpoints: Option<Vec<String>>,
    /// Bearer token.
    pub token: Option<String>,
    /// File holding the bearer token (e.g. a controller's `admin.token`).
    pub token_file: Option<PathBuf>,
    /// The cluster CA certificate controllers are verified against (a
    /// controller's `<data-dir>/tls/ca.pem`).
    pub ca_file: Option<PathBuf>,
    /// The same certificate inline, PEM.
    pub ca_pem: Option<String>,
    /// Project short id or `projects/{id}`.
    pub project: Option<String>,
    /// Output format.
    pub output: Option<String>,
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Profile used when none is named.
    pub default_profile: Option<String>,
    /// Profiles by name.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// Why the configuration could not be loaded.
#[derive(Debug, Error)]
pub enum LoadConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{path} is not a valid configuration: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A named profile does not exist.
    #[error(
        "profile {name:?} is not in {path}; add a [profiles.{name}] table or pick another with --profile"
    )]
    NoProfile {
        /// The name.
        name: String,
        /// The file.
        path: PathBuf,
    },
}

/// Where the configuration file is.
pub fn config_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("nephele").join("config.toml")
}

/// Loads `name` (or the default profile) from the file at `path`; a missing
/// file is an empty configuration.
pub fn load(path: &Path, name: Option<&str>) -> Result<Profile, LoadConfigError> {
    let file = match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str::<ConfigFile>(&text).map_err(|e| LoadConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ConfigFile::default(),
        Err(source) => {
            return Err(LoadConfigError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let chosen = name.map(str::to_owned).or(file.default_profile.clone());
    match chosen {
        None => Ok(file.profiles.get("default").cloned().unwrap_or_default()),
        Some(n) => file
            .profiles
            .get(&n)
            .cloned()
            .ok_or(LoadConfigError::NoProfile {
                name: n,
                path: path.to_owned(),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_load_by_name_and_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        assert!(load(&path, None).unwrap().endpoint.is_none());
        std::fs::write(
            &path,
            "default_profile = \"a\"\n[profiles.a]\nendpoint = \"x:1\"\n[profiles.b]\nproject = \"p\"\n",
        )
        .unwrap();
        assert_eq!(load(&path, None).unwrap().endpoint.as_deref(), Some("x:1"));
        std::fs::write(
            &path,
            "[profiles.default]\nendpoints = [\"a:1\", \"b:2\"]\n",
        )
        .unwrap();
        assert_eq!(
            load(&path, None).unwrap().endpoints,
            Some(vec!["a:1".to_owned(), "b:2".to_owned()])
        );
        std::fs::write(
            &path,
            "default_profile = \"a\"\n[profiles.a]\nendpoint = \"x:1\"\n[profiles.b]\nproject = \"p\"\n",
        )
        .unwrap();
        assert_eq!(
            load(&path, Some("b")).unwrap().project.as_deref(),
            Some("p")
        );
        assert!(matches!(
            load(&path, Some("c")),
            Err(LoadConfigError::NoProfile { .. })
        ));
        std::fs::write(&path, "[profiles.a]\nendpoitn = 1\n").unwrap();
        assert!(matches!(
            load(&path, None),
            Err(LoadConfigError::Parse { .. })
        ));
    }
}
