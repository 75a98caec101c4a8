//! The [`StateStore`] trait: what the rest of the controller needs from the
//! replicated control-plane state, whatever keeps it (Raft here, etcd later).
//!
//! - [`StateStore::propose`] submits an [`Envelope`] and resolves once it is
//!   committed and applied on this controller, with the state machine's
//!   answer. A refused command is a successful proposal whose outcome is an
//!   [`ApplyError`].
//! - [`StateStore::read`] runs a closure on a linearizable view of the state
//!   (it reflects every write acknowledged before the read started).
//! - [`StateStore::watch`] streams what was applied, in log order.
//! - [`StateStore::leadership`] says who leads in which term, for fencing: a
//!   control loop stamps `Envelope::fence_term` with the term it read, and
//!   the command is refused if it is committed in another term.
//!
//! Backends: [`crate::raft::RaftStore`] (the default) and, with the cargo
//! feature `etcd`, `etcd::EtcdStore`. [`conformance`] holds the one test
//! suite every backend must pass.

pub mod conformance;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod linearizability;

use std::future::Future;
use std::sync::Arc;

use nephele_state::{ApplyError, Command, Envelope, Response, State};
use thiserror::Error;
use tokio::sync::broadcast;

/// A proposal that was committed and applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Position in the replicated log.
    pub index: u64,
    /// What the state machine answered.
    pub outcome: Result<Response, ApplyError>,
}

/// One applied command, as seen by watchers.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// Position in the replicated log.
    pub index: u64,
    /// The command.
    pub envelope: Arc<Envelope>,
    /// What the state machine answered (shared: every watcher receives a
    /// clone of the event, and a thousand node watches copying an instance
    /// each per commit was a fifth of the controller's time).
    pub outcome: Arc<Result<Response, ApplyError>>,
}

/// Waits on `changes` until a command that `wanted` picks is applied
/// successfully, `within` passes, or the watch fell behind (it may have
/// missed one): `true`, look at the state again. `false` once the store
/// closed its watch (stop).
pub async fn wait_for_command(
    changes: &mut broadcast::Receiver<WatchEvent>,
    within: std::time::Duration,
    wanted: impl Fn(&Command) -> bool,
) -> bool {
    let deadline = tokio::time::sleep(within);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return true,
            got = changes.recv() => match got {
                Ok(e) if e.outcome.is_ok() && wanted(&e.envelope.command) => return true,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return true,
                Err(broadcast::error::RecvError::Closed) => return false,
            },
        }
    }
}

/// Who leads, as this controller currently sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    /// This controller's member id.
    pub member_id: u64,
    /// The current term (0 before the first election).
    pub term: u64,
    /// The leader's member id, if one is known.
    pub leader_id: Option<u64>,
}

impl Leadership {
    /// Whether this controller leads.
    pub fn is_leader(&self) -> bool {
        self.leader_id == Some(self.member_id)
    }
}

/// Which backend keeps the state, for status displays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// `raft` or `etcd` (empty for a test double).
    pub kind: &'static str,
    /// Where the backend is reached outside the controllers (the etcd
    /// client URLs and key prefix); empty for raft.
    pub endpoints: Vec<String>,
}

/// Why a proposal did not produce an outcome.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProposeError {
    /// No leader was known until the deadline; the command was not submitted
    /// and can be retried safely.
    #[error("no leader is known; the command was not submitted")]
    NoLeader,
    /// The command was replaced in the log by a new leader; it did not and
    /// will not take effect, and can be retried safely.
    #[error("the command was dropped by a leadership change and did not take effect")]
    Dropped,
    /// The command was submitted but not seen applied in time: it may or may
    /// not take effect. Retry only with a `request_id`.
    #[error("the command was not applied in time; it may or may not take effect")]
    Timeout,
    /// The encoded command is larger than the store accepts.
    #[error("the command is {size} bytes, more than the {max} accepted")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The store stopped (shut down, or failed to persist and fail-stopped).
    #[error("the store is not running: {0}")]
    Stopped(String),
    /// Too many proposals are waiting on this controller already; the
    /// command was not submitted and can be retried after a pause.
    #[error("{limit} proposals are in flight on this controller; the command was not submitted")]
    Overloaded {
        /// The bound on proposals in flight.
        limit: usize,
    },
}

/// Why a linearizable read could not be served.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReadError {
    /// The leader could not confirm its leadership in time (no quorum, or an
    /// election in progress).
    #[error("no quorum confirmed the read in time")]
    Timeout,
    /// The store stopped.
    #[error("the store is not running: {0}")]
    Stopped(String),
}

/// The replicated control-plane state, as the rest of the controller sees it.
pub trait StateStore: Send + Sync + 'static {
    /// Submits `envelope`; resolves once it is committed and applied here.
    fn propose(
        &self,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Committed, ProposeError>> + Send;

    /// Runs `f` on a linearizable view of the state.
    fn read<R, F>(&self, f: F) -> impl Future<Output = Result<R, ReadError>> + Send
    where
        R: Send + 'static,
        F: FnOnce(&State) -> R + Send + 'static;

    /// Streams every command applied from now on, in log order. A receiver
    /// that falls too far behind gets `RecvError::Lagged` and should re-read.
    fn watch(&self) -> broadcast::Receiver<WatchEvent>;

    /// Who leads in which term.
    fn leadership(&self) -> Leadership;

    /// Whether this controller still led in `term` at some instant after
    /// the call began, as a quorum confirmed it. A leader answers an
    /// agent's heartbeat from memory only after this (see
    /// `api::node`, heartbeats), so a deposed leader can never renew an
    /// agent's fencing lease. The default never confirms: such a store's
    /// heartbeats are all committed.
    fn confirm_leadership(&self, term: u64) -> impl Future<Output = bool> + Send {
        let _ = term;
        std::future::ready(false)
    }

    /// Which backend this is, for status displays.
    fn backend(&self) -> BackendInfo {
        BackendInfo::default()
    }
}
