//! `bulwark check --config PATH`.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

pub fn run(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            for warning in config.warnings() {
                eprintln!("{}: warning: {warning}", path.display());
            }
            println!("{}: ok ({} routes, {} pools, {} origins)", path.display(), config.routes.len(), config.pools.len(), config.origins.len());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}
