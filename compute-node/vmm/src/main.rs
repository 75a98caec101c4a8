//! The `neph-vmm` executable: a thin shell over the library.

fn main() {
    eprintln!("neph-vmm: not implemented yet (see issue 2)");
    std::process::exit(1);
}
