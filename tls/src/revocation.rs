//! The revocation hook: a set of revoked certificate serials and revoked
//! identities that the caller keeps up to date (the controllers from the
//! replicated state, `neph node remove`; agents from what the controllers
//! tell them), checked by every TLS handshake of [`crate::config`] and
//! again on every call by [`crate::interceptor::RequirePeer`] (a connection
//! opened before the revocation does not outlive it for new calls).
//!
//! Revoking a serial refuses one certificate; revoking an identity refuses
//! every certificate naming it, including ones issued later, until the
//! identity is restored.
//!
//! Holders of long calls (a node's assignment watch) learn of every change
//! through [`Revocations::subscribe`] instead of polling the set.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use thiserror::Error;

use crate::identity::{Identity, PeerIdentity};

/// A shared, updatable revocation set. Clones share the set.
#[derive(Debug, Clone)]
pub struct Revocations {
    inner: Arc<RwLock<Revoked>>,
    /// Counts the changes; its receivers wake at each one.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations {
            inner: Arc::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

#[derive(Debug, Default)]
struct Revoked {
    serials: HashSet<String>,
    identities: HashSet<Identity>,
}

/// Why a certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RevokedError {
    /// Its serial is revoked.
    #[error("certificate {serial} of {identity} is revoked")]
    Serial {
        /// The serial, hex.
        serial: String,
        /// Its holder.
        identity: Identity,
    },
    /// Its holder is revoked.
    #[error("{0} is revoked")]
    Identity(Identity),
}

impl Revocations {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuses the certificate with this serial (hex, any case).
    pub fn revoke_serial(&self, serial: &str) {
        self.update(|r| {
            r.serials.insert(serial.to_ascii_lowercase());
        });
    }

    /// Refuses every certificate of `identity`.
    pub fn revoke_identity(&self, identity: Identity) {
        self.update(|r| {
            r.identities.insert(identity);
        });
    }

    /// Accepts `identity` again (certificates whose serial is revoked stay
    /// refused).
    pub fn restore_identity(&self, identity: &Identity) {
        self.update(|r| {
            r.identities.remove(identity);
        });
    }

    /// Replaces the whole set (what a component does each time the
    /// replicated list changes).
    pub fn replace(
        &self,
        serials: impl IntoIterator<Item = String>,
        identities: impl IntoIterator<Item = Identity>,
    ) {
        let serials = serials
            .into_iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        let identities = identities.into_iter().collect();
        self.update(|r| {
            r.serials = serials;
            r.identities = identities;
        });
    }

    /// A receiver that sees a change (`changed()` returns) after each
    /// update of the set, whether or not it revoked anything new: check
    /// again then.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether a peer's certificate may be used.
    pub fn check(&self, peer: &PeerIdentity) -> Result<(), RevokedError> {
        let r = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if r.identities.contains(&peer.identity) {
            return Err(RevokedError::Identity(peer.identity.clone()));
        }
        if r.serials.contains(&peer.serial) {
            return Err(RevokedError::Serial {
                serial: peer.serial.clone(),
                identity: peer.identity.clone(),
            });
        }
        Ok(())
    }

    /// Changes the set, then tells the subscribers.
    fn update(&self, change: impl FnOnce(&mut Revoked)) {
        {
            // The set stays consistent even if a writer panicked: every
            // write is one insert, remove or assignment.
            let mut w = self.inner.write().unwrap_or_else(|e| e.into_inner());
            change(&mut w);
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, serial: &str) -> PeerIdentity {
        PeerIdentity {
            identity: Identity::node(name).unwrap(),
            cluster_id: "c".into(),
            serial: serial.into(),
        }
    }

    #[test]
    fn serials_and_identities_are_refused_until_restored() {
        let r = Revocations::new();
        let shared = r.clone();
        assert!(r.check(&peer("a", "01")).is_ok());
        shared.revoke_serial("0A");
        assert!(matches!(
            r.check(&peer("a", "0a")),
            Err(RevokedError::Serial { .. })
        ));
        assert!(r.check(&peer("a", "0b")).is_ok());
        shared.revoke_identity(Identity::node("a").unwrap());
        assert_eq!(
            r.check(&peer("a", "0b")).unwrap_err().to_string(),
            "node/a is revoked"
        );
        r.restore_identity(&Identity::node("a").unwrap());
        assert!(r.check(&peer("a", "0b")).is_ok());
        r.replace(["0B".to_owned()], []);
        assert!(r.check(&peer("a", "0a")).is_ok());
        assert!(r.check(&peer("a", "0b")).is_err());
    }

    #[test]
    fn subscribers_see_every_change() {
        let r = Revocations::new();
        let mut rx = r.subscribe();
        assert!(!rx.has_changed().unwrap(), "nothing changed yet");
        r.clone().revoke_identity(Identity::node("a").unwrap());
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        r.replace([], []);
        assert!(rx.has_changed().unwrap(), "a replacement is a change too");
    }
}
