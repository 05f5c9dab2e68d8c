//! The `quiesce` command line (its subcommands are in `cli/`), over the library.

#![deny(unsafe_code)]

mod cli;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("quiesce: error: could not start the async runtime: {e}");
            std::process::exit(cli::EXIT_FAILED);
        }
    };
    let code = runtime.block_on(cli::run(cli));
    // Drop the runtime (and with it every machine guard) before exiting.
    drop(runtime);
    std::process::exit(code);
}
