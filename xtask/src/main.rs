//! Project tasks: `cargo xtask up`, `cargo xtask test`, `cargo xtask bench`.

fn main() {}
