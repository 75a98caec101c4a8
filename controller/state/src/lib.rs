//! The control-plane state machine: every resource the API holds, and the
//! pure function [`apply`] that changes it. No I/O and no Raft types, so it can
//! be property-tested and replayed from a log.
//!
//! - [`model`]: the resources (projects, users, tokens, flavors, images,
//!   instances, server groups, nodes, migrations, operations, events, a
//!   generic key-value area) and [`State`], which holds them all.
//! - [`command`]: [`Command`], the [`Envelope`] the leader stamps (time,
//!   actor, request id, fencing term) and [`Response`].
//! - [`apply`](mod@apply): validation and effects; [`ApplyError`].
//! - [`names`]: AIP-122 resource names (`projects/p1/instances/web-1`).
//! - [`codec`]: versioned binary encodings for the log, replies and snapshots.
//!
//! Determinism: `apply` reads time only from the envelope, iterates only
//! ordered maps, and its outcome depends only on (state, envelope, log term).
//! A snapshot is the whole [`State`] encoded with [`codec::encode_snapshot`].

pub mod apply;
pub mod codec;
pub mod command;
pub mod model;
pub mod names;

pub use apply::{
    ApplyError, MAX_AUDIT_RECORDS, MAX_BATCH_CREATE, MAX_EVENTS, MAX_KV_KEY_LEN, MAX_KV_VALUE_LEN,
    MAX_STOP_TIMEOUT_MS, REQUEST_ID_RETENTION_MS, apply,
};
pub use command::{Command, Envelope, InstanceSpec, NewInstance, Origin, QuotaUpdate, Response};
pub use model::State;
