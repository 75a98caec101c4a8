//! Harness for multi-process Nephele clusters on loopback: starts real
//! daemons, injects faults, and cleans up after itself.
