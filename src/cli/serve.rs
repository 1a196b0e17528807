//! `bulwark serve --config PATH`.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::server::{Listeners, run_with_file};

pub fn run(path: &Path) -> ExitCode {
    super::init_logging();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::FAILURE;
        }
    };
    super::block_on(async {
        // Handlers first, so a SIGTERM during start-up is a clean shutdown, not a kill.
        let shutdown = shutdown_signal();
        let served = async {
            let listeners = Listeners::bind(&config.server).await?;
            run_with_file(listeners, config, path.to_owned(), shutdown).await
        };
        match served.await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                super::report(&err);
                ExitCode::FAILURE
            }
        }
    })
}

/// Installs SIGTERM and SIGINT handlers now; the returned future completes on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers; waiting for Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
