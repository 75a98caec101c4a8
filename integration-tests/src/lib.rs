//! Harness for tests and benchmarks that run real Nephele processes: the
//! hypervisor with the test guest (`guest`), host tap devices and bridges
//! (`netdev`), controller and etcd clusters as processes (`procs`),
//! simulated compute nodes for control-plane benchmarks (`simnode`), and the
//! benchmark report format (`bench`). Multi-process
//! cluster tests live in `tests/`, benchmarks in `src/bin/bench-*.rs`.

pub mod bench;
pub mod cloud;
pub mod guest;
pub mod migration;
pub mod netdev;
pub mod procs;
pub mod simnode;
