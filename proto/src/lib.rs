//! The Nephele gRPC API: `.proto` files under `proto/nephele/<area>/v1/`,
//! compiled by `build.rs` with protox and tonic-prost-build (no `protoc`).
