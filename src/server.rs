//! Listeners, the accept loop, and graceful shutdown.
//!
//! Shutdown follows what a load balancer needs: on the signal `/readyz` turns 503 at
//! once and responses carry `Connection: close`, the listener keeps accepting for
//! `drain_delay` (while the load balancer deregisters the target), then stops; in-flight
//! requests get up to `shutdown_timeout` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::admin;
use crate::client_timers::{Limits, Requests, TimedIo, Tracked};
use crate::clock::Clock;
use crate::config::{Config, ServerConfig};
use crate::connections::Connections;
use crate::proxy::Proxy;
use crate::runtime::BuildError;

/// The two listening sockets of a server instance.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `listen` and `admin_listen`, each with an accept queue of `listen_backlog`
    /// (tokio's `TcpListener::bind` would give 128: a sale's opening burst, or a new pod's
    /// first second, would lose SYNs that clients retry only after 1 s).
    pub async fn bind(config: &ServerConfig) -> Result<Listeners, RunError> {
        let bind = |addr: SocketAddr| {
            let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
            socket
                .and_then(|socket| {
                    socket.set_reuseaddr(true)?;
                    socket.bind(addr)?;
                    socket.listen(config.listen_backlog)
                })
                .map_err(|source| RunError::Bind { addr, source })
        };
        Ok(Listeners { proxy: bind(config.listen)?, admin: bind(config.admin_listen)? })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Purges, mode switches and reloads would be open to every pod that can reach it.
    #[error(
        "the admin listener on {0} is reachable from other hosts and {env} is unset or empty: set {env}, listen on 127.0.0.1, or set [server] admin_open = true to serve /admin/* without a token",
        env = crate::admin::ADMIN_TOKEN_ENV
    )]
    AdminOpen(SocketAddr),
}

/// Runs a server instance on `listeners` until `shutdown` completes, then drains and
/// returns once in-flight requests have finished (or `shutdown_timeout` has passed).
pub async fn run(listeners: Listeners, config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let proxy = Arc::new(Proxy::new(config)?);
    serve(listeners, proxy, shutdown).await
}

/// Like [`run`], for a configuration read from `path`: SIGHUP, `POST /admin/reload` and
/// any change to the file (checked every second, so editors' renames and Kubernetes'
/// symlink swaps are seen too) reload it.
pub async fn run_with_file(listeners: Listeners, config: Config, path: std::path::PathBuf, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_with(listeners, config, Some(path), Clock::system(), shutdown).await
}

/// [`run`] or [`run_with_file`] (with `path`), the pools deciding by `clock`: tests
/// hand in an adjustable clock and move it forward instead of sleeping.
pub async fn run_with(
    listeners: Listeners,
    config: Config,
    path: Option<std::path::PathBuf>,
    clock: Clock,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let proxy = Arc::new(Proxy::with_clock(config, path.clone(), clock)?);
    let Some(path) = path else {
        return serve(listeners, proxy, shutdown).await;
    };
    let watcher = tokio::spawn(watch_file(proxy.clone(), path));
    let hangups = tokio::spawn(reload_on_sighup(proxy.clone()));
    let result = serve(listeners, proxy, shutdown).await;
    watcher.abort();
    hangups.abort();
    result
}

/// Reloads when the file's content changes (whatever way it was replaced).
/// How long a changed config file must stay unchanged before it is applied.
const SETTLE: Duration = Duration::from_millis(300);

async fn watch_file(proxy: Arc<Proxy>, path: std::path::PathBuf) {
    let fingerprint = |bytes: &[u8]| xxhash_rust::xxh3::xxh3_64(bytes);
    let mut seen = tokio::fs::read(&path).await.map(|b| fingerprint(&b)).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok(bytes) = tokio::fs::read(&path).await else { continue };
        let mut now = fingerprint(&bytes);
        if Some(now) == seen {
            continue;
        }
        // Changed: applied once it has stopped changing, so a file caught while it is
        // being written (a slow editor, a copy) is never applied half written.
        let settled = loop {
            tokio::time::sleep(SETTLE).await;
            // Gone for a moment (an editor deleting and writing it anew): looked at again
            // on the next tick, as not yet seen.
            let Ok(bytes) = tokio::fs::read(&path).await else { break false };
            let again = fingerprint(&bytes);
            if again == now {
                break true;
            }
            now = again;
        };
        if settled {
            seen = Some(now);
            let _ = proxy.reload().await;
        }
    }
}

async fn reload_on_sighup(proxy: Arc<Proxy>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler; reload through the admin API");
        return;
    };
    while hangups.recv().await.is_some() {
        let _ = proxy.reload().await;
    }
}

async fn serve(listeners: Listeners, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let server_config = proxy.runtime().config.server.clone();
    if let Ok(addr) = listeners.admin.local_addr()
        && !addr.ip().is_loopback()
        && !server_config.admin_open
        && crate::admin::token().is_none()
    {
        return Err(RunError::AdminOpen(addr));
    }
    for pool in &proxy.runtime().pools {
        pool.start();
    }
    if let Some(url) = &server_config.control_redis_url {
        match crate::control::Control::new(url, server_config.control_redis_ca.as_ref(), &server_config.replica_id) {
            Ok(control) => {
                let _ = proxy.control.set(control.clone());
                control.start(proxy.live.clone()).await;
            }
            Err(err) => tracing::error!(error = %err, "cannot use control_redis_url; route modes stay local"),
        }
    }
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_task = tokio::spawn(admin::serve(listeners.admin, proxy.clone(), async {
        let _ = admin_stopped.await;
    }));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).keep_alive(true).header_read_timeout(server_config.keepalive_idle).max_buf_size(server_config.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_header_list_size(u32::try_from(server_config.max_header_bytes).unwrap_or(u32::MAX));
    let limits = Limits::of(&server_config);
    let acceptor = Acceptor { listener: listeners.proxy, limits, builder, proxy: proxy.clone(), connections: Connections::default() };
    tracing::info!(addr = ?acceptor.listener.local_addr().ok(), "serving");

    acceptor.accept_until(shutdown).await;
    tracing::info!(drain_delay = ?server_config.drain_delay, "shutdown requested: draining");
    proxy.start_draining();
    acceptor.accept_until(tokio::time::sleep(server_config.drain_delay)).await;
    let Acceptor { listener, connections, .. } = acceptor;
    drop(listener);
    tracing::info!("listener closed; waiting for in-flight requests");
    if tokio::time::timeout(server_config.shutdown_timeout, connections.shutdown()).await.is_err() {
        tracing::warn!(timeout = ?server_config.shutdown_timeout, "in-flight requests still running at shutdown timeout");
    }
    if let Some(control) = proxy.control.get() {
        control.leave().await;
    }
    let _ = admin_stop.send(());
    let _ = admin_task.await;
    proxy.flush_access_log();
    proxy.flush_traces().await;
    tracing::info!("stopped");
    Ok(())
}

struct Acceptor {
    listener: TcpListener,
    limits: Limits,
    builder: auto::Builder<TokioExecutor>,
    proxy: Arc<Proxy>,
    connections: Connections,
}

impl Acceptor {
    /// Accepts connections until `stop` completes.
    async fn accept_until(&self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => self.serve(stream, peer),
                    Err(err) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
                () = &mut stop => return,
            }
        }
    }

    fn serve(&self, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let proxy = self.proxy.clone();
        let requests = Arc::new(Requests::default());
        let requests_of_conn = requests.clone();
        let io = TimedIo::new(stream, self.limits, requests.clone());
        let service = service_fn(move |req| {
            let (proxy, active, closer) = (proxy.clone(), requests.start(), requests.closer());
            async move { Ok::<_, Infallible>(proxy.handle(req, peer, Some(closer)).await.map(|body| Tracked::new(body, active))) }
        });
        let conn = self.builder.serve_connection(TokioIo::new(io), service).into_owned();
        self.connections.serve(conn, requests_of_conn, self.limits.keepalive_idle);
    }
}
