//! Keeping this controller's TLS revocation set (the one every handshake on
//! its port and every `RequirePeer` check reads, see
//! [`nephele_tls::Revocations`]) equal to the replicated state: removed
//! nodes (`neph node remove`, [`nephele_state::Command::RemoveNode`]) and
//! removed controllers. Every controller runs [`keep_current`]; the one
//! that commits a removal also refreshes at once ([`refresh`]), so the
//! caller of `RemoveNode` sees the node refused when the call returns, and
//! the others within a watch event (or [`REFRESH_EVERY`] at worst, for
//! changes that reach a member by snapshot).

use std::sync::Arc;
use std::time::Duration;

use nephele_state::{Command, State};
use nephele_tls::{Identity, Revocations};

use crate::store::StateStore;

/// How often the set is read again even without a watch event.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// The identities the state says are revoked.
pub fn revoked(s: &State) -> Vec<Identity> {
    let nodes = s
        .revoked_nodes()
        .filter_map(|n| Identity::node(n.strip_prefix("nodes/")?).ok());
    let controllers = s
        .removed_controllers
        .iter()
        .filter_map(|id| Identity::controller(id.to_string()).ok());
    nodes.chain(controllers).collect()
}

/// Whether an applied command can change the revoked set.
fn revokes(c: &Command) -> bool {
    matches!(c, Command::RemoveNode { .. })
}

/// Reads the revoked identities and replaces the set with them.
pub async fn refresh<S: StateStore>(store: &S, revocations: &Revocations) -> bool {
    match store.read(revoked).await {
        Ok(ids) => {
            revocations.replace(Vec::new(), ids);
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "revocations not refreshed yet");
            false
        }
    }
}

/// Keeps `revocations` current until the store's watch closes.
pub fn keep_current<S: StateStore>(
    store: Arc<S>,
    revocations: Revocations,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = store.watch();
        loop {
            let fresh = refresh(&*store, &revocations).await;
            let wait = if fresh {
                REFRESH_EVERY
            } else {
                Duration::from_millis(200)
            };
            if !crate::store::wait_for_command(&mut changes, wait, revokes).await {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_nodes_and_controllers_are_revoked() {
        let mut s = State::default();
        s.node_members.insert(
            "nodes/a".into(),
            nephele_state::model::NodeMember {
                name: "nodes/a".into(),
                joined: Some(1),
                revoked: Some(2),
            },
        );
        s.node_members.insert(
            "nodes/b".into(),
            nephele_state::model::NodeMember {
                name: "nodes/b".into(),
                joined: Some(1),
                revoked: None,
            },
        );
        s.remove_controller(3);
        assert_eq!(
            revoked(&s),
            [
                Identity::node("a").unwrap(),
                Identity::controller("3").unwrap()
            ]
        );
    }
}
