//! `neph-node`: the compute-node agent. It registers with the controllers,
//! reports capacity and health, and runs one `neph-vmm` process per VM.

fn main() {
    eprintln!("neph-node: not implemented yet (see issue 5)");
    std::process::exit(1);
}
