//! Writes the `dev` profile into `neph`'s `config.toml`, leaving every other
//! profile, key and comment as it was: the old `[profiles.dev]` table (if
//! any) is cut out and a new one appended, and `default_profile = "dev"` is
//! added when the file names no default. The result is checked by loading
//! it with [`crate::profile::load`] before it replaces the file.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// The profile's name.
pub const PROFILE: &str = "dev";

/// The comment above the profile's table.
const MARK: &str = "# Written by `neph dev up`: the local cluster.";

/// What the `dev` profile holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevProfile {
    /// A controller's address.
    pub endpoint: String,
    /// The admin token file.
    pub token_file: PathBuf,
    /// The cluster CA certificate.
    pub ca_file: PathBuf,
    /// The project.
    pub project: String,
}

/// Why the profile could not be written.
#[derive(Debug, Error)]
pub enum WriteProfileError {
    /// Reading or writing the file failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file would not load afterwards (it was broken before).
    #[error("{0}; fix or remove the file, then run `neph dev up` again")]
    Invalid(String),
}

/// TOML basic string.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Whether a line opens a table (`[x]`, `[[x]]`), and which.
fn table_header(line: &str) -> Option<String> {
    let t = line.trim();
    if !t.starts_with('[') {
        return None;
    }
    let inner = t.trim_start_matches('[');
    let end = inner.find(']')?;
    Some(inner[..end].replace([' ', '"', '\''], ""))
}

/// The new file text: `text` with `[profiles.dev]` replaced by `p`, and a
/// default profile set if there was none. Returns whether the default was
/// set too.
fn rewrite(text: &str, p: &DevProfile) -> (String, bool) {
    let mut kept: Vec<&str> = Vec::new();
    let mut in_dev = false;
    let mut has_default = false;
    let mut in_root = true;
    for line in text.lines() {
        if let Some(h) = table_header(line) {
            in_root = false;
            in_dev = h == format!("profiles.{PROFILE}");
        }
        if in_root && line.trim_start().starts_with("default_profile") {
            has_default = true;
        }
        if !in_dev && line.trim() != MARK {
            kept.push(line);
        }
    }
    while kept.last().is_some_and(|l| l.trim().is_empty()) {
        kept.pop();
    }
    let mut out = String::new();
    if !has_default {
        out.push_str(&format!("default_profile = {}\n", quoted(PROFILE)));
        if !kept.is_empty() {
            out.push('\n');
        }
    }
    for l in &kept {
        out.push_str(l);
        out.push('\n');
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(&format!(
        "{MARK}\n[profiles.{PROFILE}]\nendpoint = {}\ntoken_file = {}\nca_file = {}\nproject = {}\n",
        quoted(&p.endpoint),
        quoted(&p.token_file.to_string_lossy()),
        quoted(&p.ca_file.to_string_lossy()),
        quoted(&p.project)
    ));
    (out, !has_default)
}

/// Writes the profile into the file at `path`; returns whether `dev` is
/// now the default profile (it is made so only if there was none).
pub fn write(path: &Path, p: &DevProfile) -> Result<bool, WriteProfileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(WriteProfileError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            });
        }
    };
    let (new, _) = rewrite(&text, p);
    let io = |source| WriteProfileError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, &new).map_err(io)?;
    // Check what would be in place before it is.
    let loaded = crate::profile::load(&tmp, Some(PROFILE));
    let default = crate::profile::load(&tmp, None);
    if let Err(e) = loaded.as_ref().and(default.as_ref()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(WriteProfileError::Invalid(e.to_string()));
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    let is_default = default
        .ok()
        .is_some_and(|d| d.endpoint.as_deref() == Some(p.endpoint.as_str()));
    Ok(is_default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> DevProfile {
        DevProfile {
            endpoint: "127.0.0.1:4000".into(),
            token_file: "/s/dev/controller-1/admin.token".into(),
            ca_file: "/s/dev/controller-1/tls/ca.pem".into(),
            project: "default".into(),
        }
    }

    #[test]
    fn a_new_file_gets_the_profile_as_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nephele").join("config.toml");
        assert!(write(&path, &dev()).unwrap());
        let p = crate::profile::load(&path, None).unwrap();
        assert_eq!(p.endpoint.as_deref(), Some("127.0.0.1:4000"));
        assert_eq!(p.project.as_deref(), Some("default"));
        assert_eq!(
            p.token_file.as_deref(),
            Some(Path::new("/s/dev/controller-1/admin.token"))
        );
        assert_eq!(
            p.ca_file.as_deref(),
            Some(Path::new("/s/dev/controller-1/tls/ca.pem"))
        );
    }

    #[test]
    fn other_profiles_and_the_default_are_kept_and_dev_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "# mine\ndefault_profile = \"prod\"\n\n[profiles.dev]\nendpoint = \"old:1\"\n\n[profiles.prod]\nendpoint = \"prod:1\" # keep\n",
        )
        .unwrap();
        assert!(!write(&path, &dev()).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("# mine") && text.contains("\"prod:1\" # keep"),
            "{text}"
        );
        assert!(!text.contains("old:1"), "{text}");
        assert_eq!(
            crate::profile::load(&path, None)
                .unwrap()
                .endpoint
                .as_deref(),
            Some("prod:1")
        );
        assert_eq!(
            crate::profile::load(&path, Some("dev"))
                .unwrap()
                .endpoint
                .as_deref(),
            Some("127.0.0.1:4000")
        );
        // Twice gives the same file.
        write(&path, &dev()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn a_broken_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[profiles.x]\nendpoitn = 1\n").unwrap();
        assert!(matches!(
            write(&path, &dev()),
            Err(WriteProfileError::Invalid(_))
        ));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "[profiles.x]\nendpoitn = 1\n"
        );
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(quoted("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
