//! Subcommands, one file each.

mod check;
mod demo;
pub mod scrape;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bulwark", version, about = "Cache-aside HTTP edge service")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 when valid, else print PATH:LINE:COL: message.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Self-contained demonstration: a sample origin, the proxy, a short spike, a table.
    Demo {
        /// Requests to send in the spike.
        #[arg(long, default_value_t = 3000)]
        requests: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config } => serve::run(&config),
        Command::Check { config } => check::run(&config),
        Command::Demo { requests, concurrency } => demo::run(requests, concurrency),
    }
}

/// Logs to stderr; `RUST_LOG` overrides the default level (`info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// Prints an error and its chain of causes.
fn report(err: &dyn std::error::Error) {
    eprintln!("error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
}
