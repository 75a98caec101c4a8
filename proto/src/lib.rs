//! The Nephele gRPC API: `.proto` files under `proto/nephele/<area>/v1/`,
//! compiled by `build.rs` with protox and tonic-prost-build (no `protoc`).
//!
//! Each protobuf package `nephele.<area>.v1` is the Rust module
//! `nephele_proto::<area>::v1`.

/// `nephele.cluster.v1`: traffic between controllers (raft messages, proposal
/// forwarding, status, membership changes).
pub mod cluster {
    /// Version 1 of the cluster protocol.
    pub mod v1 {
        #![allow(missing_docs, missing_debug_implementations, clippy::all)]
        tonic::include_proto!("nephele.cluster.v1");
    }
}
