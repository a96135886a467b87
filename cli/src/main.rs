//! `nimbus` binary: parse, run, map errors to exit codes
//! (1 API error or failed wait, 2 usage error, 3 API unreachable).

use clap::Parser;
use nimbus_cli::args::Cli;
use nimbus_cli::{commands, error};

fn main() {
    // clap prints usage errors itself and exits with code 2.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(error::EXIT_API);
        }
    };
    if let Err(e) = runtime.block_on(commands::execute(cli)) {
        eprintln!("{}", error::render(&e));
        std::process::exit(e.exit_code());
    }
}
