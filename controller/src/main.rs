//! `neph-controller`: the control-plane daemon. It keeps cluster state in a
//! Raft-replicated store and, as leader, runs the scheduler and reconcilers.

fn main() {
    eprintln!("neph-controller: not implemented yet (see issue 3)");
    std::process::exit(1);
}
