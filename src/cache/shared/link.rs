//! One multiplexed Redis connection that heals itself.
//!
//! redis' `ConnectionManager` reconnects after I/O errors, but a connection that silently
//! stops answering (a failover, a dropped NAT entry, a half-open socket) produces only
//! timeouts, which it does not treat as fatal. So after a few deadline misses in a row the
//! link replaces the manager with a fresh one.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Deadline misses in a row after which the connection is replaced.
const TIMEOUTS_BEFORE_RECONNECT: u32 = 3;

pub struct Link {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Swapped (rarely) by whichever request sees the last timeout of a run; read by
    /// every call. ArcSwap keeps reads lock-free.
    current: ArcSwap<ConnectionManager>,
    /// Deadline misses since the last answer; reset by any answer.
    timeouts: AtomicU32,
}

impl Link {
    /// Creates the link without connecting (the first call connects).
    pub fn new(client: redis::Client, timeout: Duration) -> redis::RedisResult<Link> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Link { client, config, current: ArcSwap::from_pointee(manager), timeouts: AtomicU32::new(0) })
    }

    /// A handle on the current connection (cheap: clones share the socket).
    pub fn conn(&self) -> ConnectionManager {
        (**self.current.load()).clone()
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
        self.timeouts.store(0, Ordering::Relaxed);
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(fresh) => {
                tracing::info!("replacing an unresponsive Redis connection");
                self.current.store(std::sync::Arc::new(fresh));
            }
            Err(err) => tracing::warn!(error = %err, "cannot create a Redis connection"),
        }
    }

    /// Runs one call under `deadline`, recording the result for the link's health.
    /// `None` when it timed out.
    pub async fn call<T>(&self, deadline: Duration, call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Option<redis::RedisResult<T>> {
        match tokio::time::timeout(deadline, call).await {
            Ok(result) => {
                match &result {
                    Err(e) if e.is_timeout() => self.timed_out(),
                    // The manager reconnects by itself after I/O errors.
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
