//! Architecture support. Only x86_64 exists; its modules are re-exported
//! so callers write `arch::layout`.

pub mod x86_64;

pub use x86_64::*;
