//! `neph-controller`: the control-plane daemon, as a library the thin binary
//! (`src/main.rs`) and the tests drive.
//!
//! - [`store`]: the [`StateStore`](store::StateStore) trait every state
//!   backend implements, and its shared conformance suite.
//! - [`raft`]: the Raft backend (raft-rs, redb storage, gRPC transport).
//! - [`config`]: the daemon's configuration (TOML file, `NEPHELE_*`
//!   environment, flags).
//! - [`server`]: starting a member and serving it over gRPC.
//! - [`api`]: the public gRPC API and the node agent protocol, with
//!   authentication, authorization and the stable error reasons.
//! - [`tls`]: the cluster CA and this controller's certificate on disk.
//! - [`images`]: the content of uploaded images this controller holds.
//! - [`reconcile`]: the leader's control loops (scheduling, node liveness,
//!   operation completion).
//!
//! The state machine itself lives in the `nephele-state` crate.

pub mod api;
pub mod config;
pub mod images;
pub mod raft;
pub mod reconcile;
pub mod server;
pub mod store;
pub mod tls;
