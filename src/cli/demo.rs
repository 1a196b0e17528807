//! `bulwark demo`.

use std::process::ExitCode;

pub fn run(_requests: usize, _concurrency: usize) -> ExitCode {
    ExitCode::FAILURE
}
