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

pub mod image;
#[cfg(feature = "serve")]
pub mod serve;

/// The encoded `FileDescriptorSet` of every package, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/nephele_descriptor.bin"));

/// `nephele.iam.v1`: projects, users, roles and API tokens.
pub mod iam {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, missing_debug_implementations, clippy::all)]
        tonic::include_proto!("nephele.iam.v1");
    }
}

/// `nephele.compute.v1`: flavors, images, instances and server groups.
pub mod compute {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, missing_debug_implementations, clippy::all)]
        tonic::include_proto!("nephele.compute.v1");
    }
}

/// `nephele.infra.v1`: compute nodes, migrations and cluster status.
pub mod infra {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, missing_debug_implementations, clippy::all)]
        tonic::include_proto!("nephele.infra.v1");
    }
}

/// `nephele.ops.v1`: long-running operations and the event log.
pub mod ops {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, missing_debug_implementations, clippy::all)]
        tonic::include_proto!("nephele.ops.v1");
    }
}

/// `nephele.node.v1`: the controller <-> compute-node agent protocol.
pub mod node {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, missing_debug_implementations, clippy::all)]
        tonic::include_proto!("nephele.node.v1");
    }
}
