//! One multiplexed Redis connection (to a server, or to a cluster) that heals itself.
//!
//! redis' `ConnectionManager` reconnects after I/O errors, but a connection that silently
//! stops answering (a failover, a dropped NAT entry, a half-open socket) produces only
//! timeouts, which it does not treat as fatal. So after a few deadline misses in a row the
//! link replaces its connection with a fresh one. A cluster connection follows slot moves
//! and failovers itself; it is (re)made in the background, never on a request's path.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::PemFile;

/// Deadline misses in a row after which the connection is replaced.
const TIMEOUTS_BEFORE_RECONNECT: u32 = 3;

pub use crate::config::RedisEndpoint as Endpoint;

enum Backend {
    Single {
        client: redis::Client,
        config: ConnectionManagerConfig,
        /// Swapped (rarely) after a run of timeouts; read by every call.
        current: ArcSwap<ConnectionManager>,
    },
    Cluster {
        client: ClusterClient,
        /// `None` until connected (or after a run of timeouts): calls fail fast while a
        /// background task connects.
        current: Arc<ArcSwapOption<ClusterConnection>>,
        /// Whether that background task is running.
        connecting: Arc<AtomicBool>,
    },
}

pub struct Link {
    backend: Backend,
    /// Deadline misses since the last answer; reset by any answer.
    timeouts: AtomicU32,
    /// Whose Redis this is, in log lines: `pool pdp`, `control`.
    owner: String,
    /// Lines about replacing connections, rate-limited (a Redis that is down would
    /// otherwise log one per probe).
    log: crate::log_every::Every,
}

/// A connection handle for one call.
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    /// The cluster connection is being made: the call fails at once.
    Down,
}

fn not_connected() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::ClusterConnectionNotFound, "Redis cluster connection not ready"))
}

/// The connection is still being made (not a sign of a sick Redis).
pub fn is_not_ready(err: &redis::RedisError) -> bool {
    err.kind() == redis::ErrorKind::ClusterConnectionNotFound
}

/// Error replies of a server that cannot serve now: read-only (a demoted primary),
/// master down, loading, cluster down.
pub fn is_sick_server(err: &redis::RedisError) -> bool {
    use redis::ServerErrorKind as S;
    matches!(err.kind(), redis::ErrorKind::Server(S::ReadOnly | S::MasterDown | S::BusyLoading | S::ClusterDown))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Down => async { Err(not_connected()) }.boxed(),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, cmd: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Down => async { Err(not_connected()) }.boxed(),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Down => 0,
        }
    }
}

/// A client for `url`; a `rediss://` one trusts `ca` if given, else the public roots.
pub fn client(url: &str, ca: Option<&PemFile>) -> redis::RedisResult<redis::Client> {
    match ca {
        None => redis::Client::open(url),
        Some(ca) => redis::Client::build_with_tls(url, tls_roots(ca)),
    }
}

fn tls_roots(ca: &PemFile) -> redis::TlsCertificates {
    redis::TlsCertificates { client_tls: None, root_cert: Some(ca.pem.clone()) }
}

impl Link {
    /// Creates the link without connecting (the first call connects).
    pub fn new(owner: &str, endpoint: &Endpoint, ca: Option<&PemFile>, timeout: Duration) -> redis::RedisResult<Link> {
        let backend = match endpoint {
            Endpoint::Single(url) => {
                let client = client(url, ca)?;
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(1));
                let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
                Backend::Single { client, config, current: ArcSwap::from_pointee(manager) }
            }
            Endpoint::Cluster(nodes) => {
                let mut builder = ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(timeout.max(Duration::from_millis(250)))
                    .response_timeout(timeout)
                    .retries(1);
                if let Some(ca) = ca {
                    builder = builder.certs(tls_roots(ca));
                }
                let client = builder.build()?;
                Backend::Cluster { client, current: Arc::new(ArcSwapOption::empty()), connecting: Arc::new(AtomicBool::new(false)) }
            }
        };
        Ok(Link { backend, timeouts: AtomicU32::new(0), owner: owner.to_owned(), log: crate::log_every::Every::new(Duration::from_secs(30)) })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster { .. })
    }

    /// A handle on the current connection (cheap: clones share the socket).
    pub fn conn(&self) -> Conn {
        match &self.backend {
            Backend::Single { current, .. } => Conn::Single((**current.load()).clone()),
            Backend::Cluster { client, current, connecting } => match current.load_full() {
                Some(conn) => Conn::Cluster((*conn).clone()),
                None => {
                    connect_cluster(client.clone(), current.clone(), connecting.clone());
                    Conn::Down
                }
            },
        }
    }

    /// Records that a call got an answer (an error reply counts: the socket works).
    pub fn answered(&self) {
        self.timeouts.store(0, Ordering::Relaxed);
    }

    /// Records a deadline miss; replaces the connection after a run of them.
    pub fn timed_out(&self) {
        if self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 < TIMEOUTS_BEFORE_RECONNECT {
            return;
        }
        if let Some(left_out) = self.log.due() {
            tracing::info!(redis = self.owner, left_out, "replacing a Redis connection after deadline misses in a row");
        }
        self.reset();
    }

    /// Replaces the connection now.
    pub fn reset(&self) {
        self.timeouts.store(0, Ordering::Relaxed);
        tracing::debug!(redis = self.owner, "replacing the Redis connection");
        match &self.backend {
            Backend::Single { client, config, current } => match ConnectionManager::new_lazy_with_config(client.clone(), config.clone()) {
                Ok(fresh) => current.store(Arc::new(fresh)),
                Err(err) => {
                    if let Some(left_out) = self.log.due() {
                        tracing::warn!(redis = self.owner, error = %err, left_out, "cannot create a Redis connection");
                    }
                }
            },
            Backend::Cluster { current, .. } => current.store(None),
        }
    }

    /// Runs one call under `deadline`, recording the result for the link's health.
    /// `None` when it timed out.
    pub async fn call<T>(&self, deadline: Duration, call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Option<redis::RedisResult<T>> {
        match tokio::time::timeout(deadline, call).await {
            Ok(result) => {
                match &result {
                    Err(e) if e.is_timeout() => self.timed_out(),
                    // The connection reconnects by itself after I/O errors.
                    Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() => {}
                    _ => self.answered(),
                }
                Some(result)
            }
            Err(_) => {
                self.timed_out();
                None
            }
        }
    }
}

/// Connects to the cluster in the background (one attempt at a time); calls fail fast
/// meanwhile.
fn connect_cluster(client: ClusterClient, current: Arc<ArcSwapOption<ClusterConnection>>, connecting: Arc<AtomicBool>) {
    if connecting.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async move {
        match client.get_async_connection().await {
            Ok(conn) => current.store(Some(Arc::new(conn))),
            Err(err) => {
                tracing::debug!(error = %err, "cannot connect to the Redis cluster");
                // Do not retry faster than this, however many calls ask.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        connecting.store(false, Ordering::Release);
    });
}
