//! Authentication: bearer tokens in the `authorization` metadata, checked
//! against the tokens in the replicated state, and the bootstrap admin
//! token `neph-controller init` creates.
//!
//! A token reads `nph_{user}_{token}_{secret}`: the user and token ids name
//! `users/{user}/tokens/{token}` (ids never hold `_`), the secret is 64 hex
//! digits of OS randomness. The state keeps only an argon2id hash of the
//! secret (a PHC string with its own salt), so a copy of the log or a
//! snapshot yields no usable token. Lookup is by name, then the secret is
//! verified against the hash. Tokens from before argon2 (a bare SHA-256
//! hex digest) are still verified, in constant time.
//!
//! Argon2 is slow on purpose (tens of milliseconds), so each controller
//! keeps a [`TokenCache`]: once a secret verified against a stored hash, a
//! SHA-256 digest of the pair answers later calls. Revocation and expiry
//! are read from the state on every call, never from the cache, and
//! verifications run on the blocking pool, at most
//! [`MAX_CONCURRENT_VERIFICATIONS`] at once, so a flood of forged tokens
//! costs CPU but never stalls the API's async workers.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};

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
    /// The call being made, once authorized: what the audit trail records
    /// about the commands it proposes.
    pub origin: Option<nephele_state::Origin>,
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

/// Argon2id verifications running at once, per controller.
pub const MAX_CONCURRENT_VERIFICATIONS: usize = 2;
/// Verified (token, secret) pairs a [`TokenCache`] remembers.
const CACHE_ENTRIES: usize = 10_000;

/// The argon2id hash of a token secret: a PHC string
/// (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`) with a fresh random
/// salt, argon2's default (OWASP-recommended) parameters.
pub fn hash_secret(secret: &str) -> Result<String, NewSecretError> {
    let mut salt = [0u8; 16];
    random(&mut salt)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| NewSecretError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| NewSecretError::Hash(e.to_string()))
}

/// Whether `secret` matches `stored`: an argon2 PHC string, or a legacy
/// SHA-256 hex digest. A malformed stored hash matches nothing.
pub fn verify_secret(secret: &str, stored: &str) -> bool {
    if stored.starts_with('$') {
        return PasswordHash::new(stored).is_ok_and(|h| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &h)
                .is_ok()
        });
    }
    constant_time_eq(
        hex(&Sha256::digest(secret.as_bytes())).as_bytes(),
        stored.as_bytes(),
    )
}

/// Remembers which (token, stored hash, secret) triples verified, as
/// SHA-256 digests, so argon2 runs once per token and controller, not per
/// call. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TokenCache {
    verified: Arc<Mutex<HashMap<String, [u8; 32]>>>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache {
            verified: Arc::default(),
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_VERIFICATIONS)),
        }
    }
}

impl TokenCache {
    fn digest(stored: &str, secret: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(stored.as_bytes());
        h.update([0u8]);
        h.update(secret.as_bytes());
        h.finalize().into()
    }

    /// Whether `secret` matches the token `name`'s `stored` hash; runs
    /// argon2 on the blocking pool unless this triple verified before.
    pub async fn verify(&self, name: &str, stored: &str, secret: &str) -> bool {
        let digest = Self::digest(stored, secret);
        let known = self.lock().get(name).copied();
        if let Some(known) = known {
            // A different secret or a replaced hash falls through to a full
            // verification, which is what decides.
            if constant_time_eq(&known, &digest) {
                return true;
            }
        }
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let (s, h) = (secret.to_owned(), stored.to_owned());
        let ok = tokio::task::spawn_blocking(move || verify_secret(&s, &h))
            .await
            .unwrap_or(false);
        if ok {
            let mut verified = self.lock();
            if verified.len() >= CACHE_ENTRIES {
                verified.clear();
            }
            verified.insert(name.to_owned(), digest);
        }
        ok
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, [u8; 32]>> {
        // The map holds no invariant a panicking holder could break.
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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
    /// Argon2 refused (never with its default parameters).
    #[error("cannot hash the token secret: {0}")]
    Hash(String),
}

fn random(buf: &mut [u8]) -> Result<(), NewSecretError> {
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(NewSecretError::Random)
}

/// 32 random bytes from the OS, hex.
pub fn new_secret() -> Result<String, NewSecretError> {
    let mut buf = [0u8; 32];
    random(&mut buf)?;
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

/// A token found for a bearer string, still to be verified: the secret
/// against `stored` (see [`TokenCache::verify`]).
#[derive(Debug, Clone)]
pub struct Presented {
    /// `users/{user}/tokens/{token}`.
    pub name: String,
    /// The secret the caller sent.
    pub secret: String,
    /// The hash in the state.
    pub stored: String,
    /// Who the token speaks for, once verified.
    pub caller: Caller,
    /// Whether the token has expired (said only to a caller who proved
    /// the secret, see [`Presented::accept`]).
    pub expired: bool,
}

impl Presented {
    /// The caller, once the secret verified (`verified`), unless expired.
    pub fn accept(self, verified: bool) -> Result<Caller, ApiError> {
        if !verified {
            return Err(invalid());
        }
        if self.expired {
            return Err(ApiError::Unauthenticated(format!(
                "token {} expired; create a new one",
                self.name
            )));
        }
        Ok(self.caller)
    }
}

fn invalid() -> ApiError {
    ApiError::Unauthenticated("the token is not valid; ask an admin for a new one".into())
}

/// Looks `bearer` up in `state` at time `now_ms`: the token must exist and
/// belong to an existing user. The secret is not checked here (argon2 is
/// too slow to run inside a read of the state), nor is expiry reported
/// before it is (see [`Presented::accept`]).
pub fn lookup(state: &State, bearer: &str, now_ms: u64) -> Result<Presented, ApiError> {
    let (name, secret) = parse_token(bearer).ok_or_else(invalid)?;
    let token = state.tokens.get(&name).ok_or_else(invalid)?;
    let user_name = name.split("/tokens/").next().unwrap_or_default().to_owned();
    let user = state.users.get(&user_name).ok_or_else(invalid)?;
    Ok(Presented {
        expired: token.expire_time.is_some_and(|t| t <= now_ms),
        secret: secret.to_owned(),
        stored: token.secret_hash.clone(),
        caller: Caller {
            user: user.name.clone(),
            admin: user.operator,
            roles: user
                .roles
                .iter()
                .map(|(p, r)| (p.clone(), api_role(*r)))
                .collect(),
            origin: None,
        },
        name,
    })
}

/// Checks `bearer` against `state` at time `now_ms`, verifying the secret
/// in this thread (tests and tools; the API uses [`lookup`] and a
/// [`TokenCache`]).
pub fn authenticate(state: &State, bearer: &str, now_ms: u64) -> Result<Caller, ApiError> {
    let p = lookup(state, bearer, now_ms)?;
    let verified = verify_secret(&p.secret, &p.stored);
    p.accept(verified)
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
        origin: None,
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
            secret_hash: hash_secret(&secret)?,
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
                secret_hash: hash_secret("s3cret").unwrap(),
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

    #[test]
    fn secrets_are_stored_as_salted_argon2id_and_legacy_hashes_still_verify() {
        let a = hash_secret("s3cret").unwrap();
        let b = hash_secret("s3cret").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "each hash has its own salt");
        assert!(!a.contains("s3cret"));
        assert!(verify_secret("s3cret", &a) && verify_secret("s3cret", &b));
        assert!(!verify_secret("s3creT", &a));
        let legacy = hex(&Sha256::digest(b"old"));
        assert!(verify_secret("old", &legacy));
        assert!(!verify_secret("new", &legacy));
        for garbage in ["", "$", "$argon2id$nonsense", "zz"] {
            assert!(!verify_secret("", garbage), "{garbage:?}");
        }
    }

    #[tokio::test]
    async fn the_cache_never_accepts_a_wrong_secret_or_a_replaced_hash() {
        let cache = TokenCache::default();
        let h1 = hash_secret("one").unwrap();
        assert!(cache.verify("users/a/tokens/t", &h1, "one").await);
        assert!(cache.verify("users/a/tokens/t", &h1, "one").await);
        assert!(!cache.verify("users/a/tokens/t", &h1, "two").await);
        // The token was recreated with another secret: the old one fails.
        let h2 = hash_secret("two").unwrap();
        assert!(!cache.verify("users/a/tokens/t", &h2, "one").await);
        assert!(cache.verify("users/a/tokens/t", &h2, "two").await);
    }
}
