//! `neph`: the command-line client for tenants and operators,
//! `neph <resource> <verb>`.
//!
//! - `profile.rs`: profiles in `$XDG_CONFIG_HOME/nephele/config.toml`.
//! - `client.rs`: connecting with a bearer token; errors, hints, exit codes
//!   (0 ok, 1 API error, 2 usage, 3 `--wait` timed out).
//! - `output.rs`: `-o table|json|yaml`.
//! - `records.rs`: API messages as printable records.
//! - `commands.rs`: every command.
//! - `console.rs`: `neph instance console` (raw terminal or pipe).
//! - `dev/`: `neph dev up|status|down`, a local cluster.

mod client;
mod commands;
mod console;
mod dev;
mod output;
mod profile;
mod records;

use clap::Parser as _;

fn main() {
    nephele_tls::install_default();
    let cli = match commands::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0, usage errors exit 2.
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                client::EXIT_USAGE
            } else {
                0
            });
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("neph: cannot start: {e}");
            std::process::exit(client::EXIT_API);
        }
    };
    if let Err(e) = runtime.block_on(commands::run(cli)) {
        eprintln!("neph: {e}");
        std::process::exit(e.exit_code());
    }
}
