//! Nephele's TLS and PKI (issue 7): the one rustls crypto provider of the
//! project. The cluster CA, join tokens and the TLS configs of every
//! component follow in this crate.

pub mod provider;

pub use provider::{install_default, provider};
