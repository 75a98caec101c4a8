//! `neph`: the command-line client for tenants and operators,
//! `neph <resource> <verb>`.

fn main() {
    eprintln!("neph: not implemented yet (see issue 5)");
    std::process::exit(2);
}
