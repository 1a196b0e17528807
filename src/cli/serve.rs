//! `bulwark serve --config PATH`.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::server::{Listeners, run_with_file};

pub fn run(path: &Path) -> ExitCode {
    super::init_logging();
    raise_open_files_limit();
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
pub(super) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
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

/// Raises the open-file soft limit to the hard limit, and logs it: every client and
/// origin connection is a file, and a sale's opening burst needs thousands where the
/// usual soft limit is 1,024.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the struct it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        tracing::info!(open_files = limit.rlim_cur, "open-file limit");
        return;
    }
    let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit reads only the struct it is given, which lives for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        tracing::info!(from = limit.rlim_cur, to = raised.rlim_cur, "open-file limit raised to the hard limit");
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), open_files = limit.rlim_cur, "cannot raise the open-file limit");
    }
}
