//! Subcommands, one file each.

mod check;
mod demo;
mod inspect;
mod serve;
pub mod top;
mod warm;

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
    /// Live per-route and per-pool view of one or more replicas, summed.
    Top {
        /// Admin URL of a replica (`http://10.0.0.5:9901`); repeat, or separate with commas, for several.
        #[arg(long = "admin", required = true, value_delimiter = ',')]
        admins: Vec<String>,
        /// Print one snapshot and exit.
        #[arg(long)]
        once: bool,
        /// With --once: print the snapshot as JSON.
        #[arg(long)]
        json: bool,
        /// Refresh interval of the live view.
        #[arg(long, default_value = "1s", value_parser = parse_duration_arg)]
        interval: std::time::Duration,
    },
    /// What each replica's L1 and the pool's Redis hold for a URL, side by side.
    Inspect {
        /// The URL, absolute (`http://shop.example/products/1`).
        url: String,
        /// Admin URL of a replica; repeat, or separate with commas, for several.
        #[arg(long = "admin", required = true, value_delimiter = ',')]
        admins: Vec<String>,
        /// A request header (`Accept-Encoding: gzip`) selecting the group or variant; repeat for several.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Print every replica's answer as JSON.
        #[arg(long)]
        json: bool,
        /// Bearer token for /admin/* (default: BULWARK_ADMIN_TOKEN).
        #[arg(long)]
        token: Option<String>,
    },
    /// Pre-fill pools by requesting each URL through a running bulwark.
    Warm {
        /// The bulwark to send the requests to (`http://127.0.0.1:8080`).
        #[arg(long)]
        target: String,
        /// File of URLs, one per line (`-` for stdin); each URL's host is sent as `Host`.
        #[arg(long)]
        urls: PathBuf,
        /// Requests in flight at most.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Requests started per second at most (0: no limit).
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// An `Accept-Encoding` value to warm each URL with, one request each; repeat for
        /// several (default: what browsers send, with zstd, with only gzip, and none).
        #[arg(long = "accept-encoding")]
        accept_encodings: Vec<String>,
        /// A request header (`Name: Value`) sent with every request; repeat for several.
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Self-contained demonstration: a sample origin, the proxy, a short spike, a table.
    Demo {
        /// Requests to send in the spike.
        #[arg(long, default_value_t = 3000)]
        requests: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Stay up after the spike, with light traffic, until Ctrl-C (to look at the dashboard).
        #[arg(long)]
        keep: bool,
    },
}

pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config } => serve::run(&config),
        Command::Check { config } => check::run(&config),
        Command::Demo { requests, concurrency, keep } => demo::run(requests, concurrency, keep),
        Command::Top { admins, once, json, interval } => top::run(admins, once, json, interval),
        Command::Inspect { url, admins, headers, json, token } => inspect::run(url, admins, headers, json, token),
        Command::Warm { target, urls, concurrency, rate, accept_encodings, headers } => {
            warm::run(warm::Options { target, urls, concurrency, rate, accept_encodings, headers })
        }
    }
}

fn parse_duration_arg(text: &str) -> Result<std::time::Duration, String> {
    crate::config::units::parse_duration(text)
}

/// Logs to stderr; `RUST_LOG` overrides the default level (`info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only for a person at a terminal: a log collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

/// Runs `work` on a new multi-threaded runtime (or reports why there is none).
fn block_on(work: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(work),
        Err(err) => {
            report(&err);
            ExitCode::FAILURE
        }
    }
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
