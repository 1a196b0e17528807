//! The `bulwark` command: parses the command line and hands over to [`bulwark::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    bulwark::cli::main(bulwark::cli::Cli::parse())
}
