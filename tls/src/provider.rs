//! The one rustls [`CryptoProvider`] of the project: `ring`, with TLS 1.3
//! only.
//!
//! Every TLS config this crate builds uses [`provider`], so no component can
//! end up with a different cipher suite list or, through some dependency's
//! default features, aws-lc-rs or OpenSSL. Binaries also call
//! [`install_default`] first thing in `main`, so that any rustls use that
//! does not go through this crate picks the same provider instead of
//! panicking on an ambiguous default.

use std::sync::{Arc, OnceLock};

use rustls::SupportedProtocolVersion;
use rustls::crypto::CryptoProvider;
use rustls::version::TLS13;

/// The protocol versions every config allows: TLS 1.3 only. All peers are
/// our own components, so there is no older client to accommodate.
pub static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] = &[&TLS13];

/// The ALPN protocol every config offers: gRPC runs over HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// The project's crypto provider (`ring`, its default cipher suites, key
/// exchange groups and signature algorithms).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Makes [`provider`] the process-wide rustls default. Idempotent: a second
/// call, or a default already installed by someone else, is not an error
/// (this crate never relies on the process default, it passes [`provider`]
/// explicitly).
pub fn install_default() {
    if CryptoProvider::get_default().is_none() {
        // Losing a race against another thread installing one is fine.
        let _ = provider().as_ref().clone().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_is_ring_with_tls13_suites() {
        let p = provider();
        assert!(Arc::ptr_eq(&p, &provider()), "one instance per process");
        assert!(
            p.cipher_suites.iter().any(|s| s.version() == &TLS13),
            "ring offers TLS 1.3 suites"
        );
        install_default();
        install_default();
        assert!(CryptoProvider::get_default().is_some());
    }
}
