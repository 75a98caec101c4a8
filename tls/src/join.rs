//! One-time, expiring node join tokens (`neph node join-token create`).
//!
//! A token reads `nphj_<id>_<secret>`: `id` is 16 hex digits naming the
//! token (the lookup key), `secret` 64 hex digits of OS randomness. The
//! controllers keep only a [`JoinTokenRecord`]: the id, the SHA-256 of the
//! secret (the secret has 256 bits of entropy, so a fast hash is enough; a
//! password hash is for guessable secrets), when it expires and whether it
//! was used. The token string is shown once, at creation.
//!
//! Redeeming ([`JoinTokenRecord::redeem`]) checks the secret in constant
//! time, the expiry and the one use, and marks the record used: the caller
//! stores the updated record through the replicated state (a command
//! applied by every controller), so the token cannot be used twice even
//! against two different controllers. A record may name the node it is
//! for; redeeming it for another name is refused.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::hex;

/// The prefix of every join token.
pub const JOIN_TOKEN_PREFIX: &str = "nphj_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A join token as the operator sees it, once. Its `Debug` hides the
/// secret; `Display` is the full token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    id: String,
    secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({JOIN_TOKEN_PREFIX}{}_…)", self.id)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{JOIN_TOKEN_PREFIX}{}_{}", self.id, self.secret)
    }
}

/// What the replicated state keeps of a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// The token id (16 hex digits).
    pub id: String,
    /// SHA-256 of the secret, lowercase hex.
    pub secret_sha256: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Expiry, seconds since the Unix epoch: unusable from then on.
    pub expires_at: u64,
    /// The node name it may be used for; `None` is any name.
    pub node: Option<String>,
    /// When it was redeemed (seconds since the Unix epoch), and by which
    /// node; `None` while unused.
    pub used: Option<(u64, String)>,
}

/// Why a token could not be made.
#[derive(Debug, Error)]
pub enum IssueJoinTokenError {
    /// The OS random source failed.
    #[error("the system random source failed")]
    Random,
}

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("not a join token (expected nphj_ followed by 16 and 64 hex digits)")]
pub struct ParseJoinTokenError;

/// Why a join token was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RedeemJoinTokenError {
    /// The record is for another token id.
    #[error("the join token is unknown")]
    Unknown,
    /// The secret does not match.
    #[error("the join token is invalid")]
    WrongSecret,
    /// Past its expiry.
    #[error("the join token expired")]
    Expired,
    /// Already redeemed.
    #[error("the join token was already used (by node {0})")]
    AlreadyUsed(String),
    /// Issued for another node name.
    #[error("the join token is for node {allowed}, not {requested}")]
    WrongNode {
        /// The name it is for.
        allowed: String,
        /// The name it was presented for.
        requested: String,
    },
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sha256_hex(s: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

fn random_hex(n: usize) -> Result<String, IssueJoinTokenError> {
    let mut b = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| IssueJoinTokenError::Random)?;
    Ok(hex(&b))
}

impl JoinToken {
    /// A new token valid for `ttl` from now, for any node name. Returns the
    /// token (show it once) and the record (store it).
    pub fn issue(ttl: Duration) -> Result<(JoinToken, JoinTokenRecord), IssueJoinTokenError> {
        Self::issue_at(SystemTime::now(), ttl, None)
    }

    /// A new token created at `now`, valid for `ttl`, for `node` only when
    /// given.
    pub fn issue_at(
        now: SystemTime,
        ttl: Duration,
        node: Option<String>,
    ) -> Result<(JoinToken, JoinTokenRecord), IssueJoinTokenError> {
        let token = JoinToken {
            id: random_hex(ID_BYTES)?,
            secret: random_hex(SECRET_BYTES)?,
        };
        let created_at = unix(now);
        let record = JoinTokenRecord {
            id: token.id.clone(),
            secret_sha256: sha256_hex(&token.secret),
            created_at,
            expires_at: created_at.saturating_add(ttl.as_secs().max(1)),
            node,
            used: None,
        };
        Ok((token, record))
    }

    /// The token id (the record's key).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// SHA-256 of the secret, lowercase hex: what a record keeps and what
    /// a presented token is compared by.
    pub fn secret_sha256(&self) -> String {
        sha256_hex(&self.secret)
    }
}

impl FromStr for JoinToken {
    type Err = ParseJoinTokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .trim()
            .strip_prefix(JOIN_TOKEN_PREFIX)
            .ok_or(ParseJoinTokenError)?;
        let (id, secret) = rest.split_once('_').ok_or(ParseJoinTokenError)?;
        let is_hex = |x: &str, n: usize| {
            x.len() == n * 2
                && x.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !is_hex(id, ID_BYTES) || !is_hex(secret, SECRET_BYTES) {
            return Err(ParseJoinTokenError);
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

impl JoinTokenRecord {
    /// Checks `token` against this record at `now` for a node named
    /// `node`, without using it up.
    pub fn verify(
        &self,
        token: &JoinToken,
        node: &str,
        now: SystemTime,
    ) -> Result<(), RedeemJoinTokenError> {
        if token.id != self.id {
            return Err(RedeemJoinTokenError::Unknown);
        }
        let presented = sha256_hex(&token.secret);
        #[allow(deprecated)] // Still the constant-time comparison ring offers.
        let same = ring::constant_time::verify_slices_are_equal(
            presented.as_bytes(),
            self.secret_sha256.as_bytes(),
        )
        .is_ok();
        if !same {
            return Err(RedeemJoinTokenError::WrongSecret);
        }
        if let Some((_, by)) = &self.used {
            return Err(RedeemJoinTokenError::AlreadyUsed(by.clone()));
        }
        if unix(now) >= self.expires_at {
            return Err(RedeemJoinTokenError::Expired);
        }
        if let Some(allowed) = &self.node
            && allowed != node
        {
            return Err(RedeemJoinTokenError::WrongNode {
                allowed: allowed.clone(),
                requested: node.to_owned(),
            });
        }
        Ok(())
    }

    /// [`verify`](Self::verify), then marks the record used by `node`.
    pub fn redeem(
        &mut self,
        token: &JoinToken,
        node: &str,
        now: SystemTime,
    ) -> Result<(), RedeemJoinTokenError> {
        self.verify(token, node, now)?;
        self.used = Some((unix(now), node.to_owned()));
        Ok(())
    }

    /// Whether it can no longer be used at `now` (expired or used): the
    /// state may drop it.
    pub fn is_spent(&self, now: SystemTime) -> bool {
        self.used.is_some() || unix(now) >= self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_single_use() {
        let (token, mut record) = JoinToken::issue(Duration::from_secs(600)).unwrap();
        let text = token.to_string();
        assert!(
            text.starts_with("nphj_") && text.len() == 5 + 16 + 1 + 64,
            "{text}"
        );
        assert!(!format!("{token:?}").contains(&token.secret));
        assert!(!record.secret_sha256.contains(&token.secret));
        let parsed: JoinToken = text.parse().unwrap();
        let now = SystemTime::now();
        record.redeem(&parsed, "node-a", now).unwrap();
        assert_eq!(
            record.redeem(&parsed, "node-b", now),
            Err(RedeemJoinTokenError::AlreadyUsed("node-a".into()))
        );
        assert!(record.is_spent(now));
    }

    #[test]
    fn a_token_expires() {
        let t0 = SystemTime::now();
        let (token, mut record) = JoinToken::issue_at(t0, Duration::from_secs(60), None).unwrap();
        assert!(
            record
                .verify(&token, "a", t0 + Duration::from_secs(59))
                .is_ok()
        );
        assert_eq!(
            record.redeem(&token, "a", t0 + Duration::from_secs(60)),
            Err(RedeemJoinTokenError::Expired)
        );
        assert!(record.used.is_none(), "a refused token stays unused");
    }

    #[test]
    fn forged_and_misdirected_tokens_are_refused() {
        let now = SystemTime::now();
        let (token, record) =
            JoinToken::issue_at(now, Duration::from_secs(60), Some("a".into())).unwrap();
        let forged: JoinToken = format!("nphj_{}_{}", token.id, "0".repeat(64))
            .parse()
            .unwrap();
        assert_eq!(
            record.verify(&forged, "a", now),
            Err(RedeemJoinTokenError::WrongSecret)
        );
        let (other, _) = JoinToken::issue(Duration::from_secs(60)).unwrap();
        assert_eq!(
            record.verify(&other, "a", now),
            Err(RedeemJoinTokenError::Unknown)
        );
        assert!(matches!(
            record.verify(&token, "b", now),
            Err(RedeemJoinTokenError::WrongNode { .. })
        ));
        for bad in [
            "",
            "nphj_",
            "nph_0123456789abcdef_00",
            "nphj_0123456789ABCDEF_0000000000000000000000000000000000000000000000000000000000000000",
            "nphj_0123456789abcdef",
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
    }
}
