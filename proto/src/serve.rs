//! What every Nephele daemon serves besides its own services (feature
//! `serve`): gRPC health, with each named service and the server as a whole
//! (`""`) reported SERVING, and gRPC reflection over
//! [`crate::FILE_DESCRIPTOR_SET`] (and health's own descriptors),
//! advertising exactly the named services plus health and reflection. Used
//! by `neph-node` and `neph-controller`.

use tonic::transport::server::Router;

/// The health service's name.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// The reflection service's name.
pub const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";

/// Adds gRPC health (every name in `services`, plus `""`, SERVING) and
/// gRPC reflection to `router`. Reflection lists `services`, health and
/// itself (not every service the descriptor set holds: a daemon serves
/// only some). It is left out, with a warning on stderr, if the descriptor
/// set does not load (it is compiled in, so that is a build bug).
pub async fn add_health_and_reflection(router: Router, services: &[&str]) -> Router {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in services.iter().copied().chain([""]) {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let router = router.add_service(health_service);
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(HEALTH_SERVICE)
        .with_service_name(REFLECTION_SERVICE);
    for name in services {
        reflection = reflection.with_service_name(*name);
    }
    match reflection.build_v1() {
        Ok(r) => router.add_service(r),
        Err(e) => {
            eprintln!("gRPC reflection is off: the descriptor set did not load: {e}");
            router
        }
    }
}
