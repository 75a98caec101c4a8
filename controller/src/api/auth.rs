//! Authentication: bearer tokens in the `authorization` metadata, checked
//! against the tokens in the replicated state (only SHA-256 hashes of their
//! secrets are stored), and the bootstrap admin token `neph-controller init`
//! creates.
//!
//! A token reads `nph_{user}_{token}_{secret}`: the user and token ids name
//! `users/{user}/tokens/{token}` (ids never hold `_`), the secret is 64 hex
//! digits of OS randomness. Lookup is by name, then the hash is compared in
//! constant time.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use nephele_state::model::Role as StateRole;
use nephele_state::{Command, Envelope, Response, State};
use sha2::{Digest as _, Sha256};
use thiserror::Error;
use tonic::metadata::MetadataMap;

use super::authz::Role;
use super::errors::ApiError;
use crate::store::StateStore;

/// The user `neph-controller init` creates, an admin.
pub const BOOTSTRAP_USER: &str = "admin";
/// The file in the data directory the bootstrap token is written to (0600).
pub const BOOTSTRAP_TOKEN_FILE: &str = "admin.token";

/// Who calls, as established from the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `users/{user}`.
    pub user: String,
    /// Cluster administrator.
    pub admin: bool,
    /// Role per project name.
    pub roles: BTreeMap<String, Role>,
}

impl Caller {
    /// The caller's role in `project` (`projects/{project}`), an admin's
    /// being [`Role::Admin`] everywhere.
    pub fn role_in(&self, project: &str) -> Option<Role> {
        if self.admin {
            return Some(Role::Admin);
        }
        self.roles.get(project).copied()
    }

    /// Whether the caller may read resources of `project`.
    pub fn can_read(&self, project: &str) -> bool {
        self.role_in(project).is_some()
    }
}

/// Maps the state's roles onto the API's: viewers read, editors and owners
/// are members.
pub fn api_role(r: StateRole) -> Role {
    match r {
        StateRole::Viewer => Role::Reader,
        StateRole::Editor | StateRole::Owner => Role::Member,
    }
}

/// SHA-256 of a token secret, hex.
pub fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a new token secret could not be made.
#[derive(Debug, Error)]
pub enum NewSecretError {
    /// The OS random source failed.
    #[error("cannot read /dev/urandom")]
    Random(#[source] std::io::Error),
}

/// 32 random bytes from the OS, hex.
pub fn new_secret() -> Result<String, NewSecretError> {
    let mut buf = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(NewSecretError::Random)?;
    Ok(hex(&buf))
}

/// The bearer string for `users/{user}/tokens/{token}` with `secret`.
pub fn format_token(user_id: &str, token_id: &str, secret: &str) -> String {
    format!("nph_{user_id}_{token_id}_{secret}")
}

/// Splits a bearer string into (token name, secret).
pub fn parse_token(bearer: &str) -> Option<(String, &str)> {
    let rest = bearer.strip_prefix("nph_")?;
    let mut parts = rest.splitn(3, '_');
    let user = parts.next()?;
    let token = parts.next()?;
    let secret = parts.next()?;
    nephele_state::names::validate_id(user).ok()?;
    nephele_state::names::validate_id(token).ok()?;
    if secret.is_empty() || secret.len() > 256 {
        return None;
    }
    Some((format!("users/{user}/tokens/{token}"), secret))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of a request's metadata.
pub fn bearer(metadata: &MetadataMap) -> Result<String, ApiError> {
    let value = metadata.get("authorization").ok_or_else(|| {
        ApiError::Unauthenticated(
            "no credentials: send `authorization: Bearer <token>` (neph: set `token` in the profile or NEPHELE_TOKEN)".into(),
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("the authorization metadata is not text".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            ApiError::Unauthenticated(
                "the authorization metadata must read `Bearer <token>`".into(),
            )
        })?;
    Ok(token.trim().to_owned())
}

/// Checks `bearer` against `state` at time `now_ms`.
pub fn authenticate(state: &State, bearer: &str, now_ms: u64) -> Result<Caller, ApiError> {
    let invalid =
        || ApiError::Unauthenticated("the token is not valid; ask an admin for a new one".into());
    let (name, secret) = parse_token(bearer).ok_or_else(invalid)?;
    let token = state.tokens.get(&name).ok_or_else(invalid)?;
    if !constant_time_eq(hash_secret(secret).as_bytes(), token.secret_hash.as_bytes()) {
        return Err(invalid());
    }
    if token.expire_time.is_some_and(|t| t <= now_ms) {
        return Err(ApiError::Unauthenticated(format!(
            "token {name} expired; create a new one"
        )));
    }
    let user_name = name.split("/tokens/").next().unwrap_or_default().to_owned();
    let user = state.users.get(&user_name).ok_or_else(invalid)?;
    Ok(Caller {
        user: user.name.clone(),
        admin: user.operator,
        roles: user
            .roles
            .iter()
            .map(|(p, r)| (p.clone(), api_role(*r)))
            .collect(),
    })
}

/// Why the bootstrap admin token could not be made.
#[derive(Debug, Error)]
pub enum BootstrapError {
    /// No randomness.
    #[error(transparent)]
    Secret(#[from] NewSecretError),
    /// The store refused or failed.
    #[error("cannot record the bootstrap admin: {0}")]
    Store(#[from] ApiError),
    /// The token file could not be written.
    #[error("cannot write the bootstrap token to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Creates the admin user (if missing) and a token for this member,
/// `users/admin/tokens/bootstrap-{member_id}`, writes it to
/// `data_dir/admin.token` with mode 0600 and returns it. Idempotent per
/// member: does nothing and returns `None` if the file already exists.
pub async fn bootstrap_admin<S: StateStore>(
    store: &S,
    member_id: u64,
    data_dir: &Path,
) -> Result<Option<String>, BootstrapError> {
    let path = data_dir.join(BOOTSTRAP_TOKEN_FILE);
    if path.exists() {
        return Ok(None);
    }
    let now = super::now_ms();
    let user = Envelope {
        time: now,
        actor: "system".into(),
        request_id: Some("bootstrap-admin-user".into()),
        fence_term: None,
        command: Command::CreateUser {
            user_id: BOOTSTRAP_USER.into(),
            display_name: "bootstrap administrator".into(),
            operator: true,
        },
    };
    match super::outcome(store.propose(user).await) {
        Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let secret = new_secret()?;
    let token_id = format!("bootstrap-{member_id}");
    let create = Envelope::new(
        now,
        "system",
        Command::CreateToken {
            user: format!("users/{BOOTSTRAP_USER}"),
            token_id: token_id.clone(),
            secret_hash: hash_secret(&secret),
            expire_time: None,
        },
    );
    match super::outcome(store.propose(create).await)? {
        Response::Token(_) => {}
        other => return Err(ApiError::Internal(format!("unexpected answer {other:?}")).into()),
    }
    let token = format_token(BOOTSTRAP_USER, &token_id, &secret);
    write_private(&path, &format!("{token}\n")).map_err(|source| BootstrapError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(Some(token))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let t = format_token("alice", "laptop", "abc123");
        assert_eq!(
            parse_token(&t),
            Some(("users/alice/tokens/laptop".to_owned(), "abc123"))
        );
        for bad in [
            "",
            "nph_",
            "nph_alice",
            "nph_alice_laptop",
            "x_alice_laptop_s",
            "nph_Alice_l_s",
            "nph_a__s",
        ] {
            assert_eq!(parse_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn authentication_checks_hash_expiry_and_user() {
        let mut s = State::default();
        s.users.insert(
            "users/alice".into(),
            nephele_state::model::User {
                name: "users/alice".into(),
                display_name: String::new(),
                operator: false,
                roles: [("projects/p1".to_owned(), StateRole::Viewer)].into(),
                create_time: 0,
            },
        );
        s.tokens.insert(
            "users/alice/tokens/t1".into(),
            nephele_state::model::Token {
                name: "users/alice/tokens/t1".into(),
                secret_hash: hash_secret("s3cret"),
                expire_time: Some(1000),
                create_time: 0,
            },
        );
        let c = authenticate(&s, &format_token("alice", "t1", "s3cret"), 10).unwrap();
        assert_eq!(c.user, "users/alice");
        assert_eq!(c.role_in("projects/p1"), Some(Role::Reader));
        assert_eq!(c.role_in("projects/p2"), None);
        let bad = |b: &str, now| authenticate(&s, b, now).unwrap_err().reason();
        assert_eq!(
            bad(&format_token("alice", "t1", "wrong"), 10),
            "UNAUTHENTICATED"
        );
        assert_eq!(
            bad(&format_token("alice", "t2", "s3cret"), 10),
            "UNAUTHENTICATED"
        );
        assert_eq!(
            bad(&format_token("alice", "t1", "s3cret"), 1000),
            "UNAUTHENTICATED"
        );
        let secret = new_secret().unwrap();
        assert_eq!(secret.len(), 64);
        assert_ne!(secret, new_secret().unwrap());
    }
}
