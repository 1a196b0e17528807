//! The pool's event channel (Redis pub/sub) and per-key leases for coalescing misses
//! across replicas.
//!
//! A lease is `SET <prefix>v1:lease:<hash> <token> NX PX <ttl>`: its holder fetches,
//! writes the entry, then releases the lease (only if it still holds its token) and
//! publishes `fill:<hash>` or `nofill:<hash>`. Other replicas register for the key's
//! announcement before asking for the lease, so they are notified rather than polling.
//! Leases are used only while the subscription is up; otherwise a waiter could not hear
//! of the fill, and coalescing falls back to in-process only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::oneshot;

use crate::metrics::{PoolMetrics, RedisOp};

/// What a lease holder announces when its fetch is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// The entry is in Redis now.
    Filled,
    /// Nothing was stored (not storable, or the origin failed): fetch yourself.
    NotFilled,
}

impl Announcement {
    pub fn message(self, hash: u128) -> String {
        let kind = match self {
            Announcement::Filled => "fill",
            Announcement::NotFilled => "nofill",
        };
        format!("{kind}:{hash:032x}")
    }
}

/// The outcome of asking for a key's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// This replica holds it, with this token.
    Acquired(String),
    /// Another replica holds it.
    Held,
    /// Redis or its event channel is unavailable: coalesce in-process only.
    Unavailable,
}

/// Deletes the lease only if it still holds our token.
pub const RELEASE_LEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Local side of the event channel.
#[derive(Default)]
pub struct Events {
    /// One waiter per key at most (only a key's in-process leader waits on a lease); a
    /// std mutex held for one map operation.
    waiters: Mutex<HashMap<u128, oneshot::Sender<Announcement>>>,
    /// Whether the subscription is up. Written by the subscriber task only.
    subscribed: AtomicBool,
}

impl Events {
    pub fn is_up(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    pub fn watch(&self, hash: u128) -> oneshot::Receiver<Announcement> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(hash, tx);
        rx
    }

    pub fn unwatch(&self, hash: u128) {
        self.lock().remove(&hash);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u128, oneshot::Sender<Announcement>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dispatch(&self, payload: &str) {
        let Some((kind, hash)) = payload.split_once(':') else { return };
        let Ok(hash) = u128::from_str_radix(hash, 16) else { return };
        let announcement = match kind {
            "fill" => Announcement::Filled,
            "nofill" => Announcement::NotFilled,
            _ => return,
        };
        let waiter = self.lock().remove(&hash);
        if let Some(tx) = waiter {
            let _ = tx.send(announcement);
        }
    }

    /// Subscribes to `channel` and dispatches its messages until `stop` fires,
    /// reconnecting with backoff whenever the subscription drops.
    pub async fn run(
        self: std::sync::Arc<Self>,
        client: redis::Client,
        channel: String,
        metrics: std::sync::Arc<PoolMetrics>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let session = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                self.subscribed.store(true, Ordering::Release);
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(payload) = msg.get_payload::<String>() {
                        self.dispatch(&payload);
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                result = session => match result {
                    Err(err) => {
                        tracing::debug!(error = %err, channel, "event subscription failed");
                        metrics.redis_error(RedisOp::Connect);
                    }
                    Ok(()) => backoff = Duration::from_millis(50),
                },
                _ = &mut stop => return,
            }
            self.subscribed.store(false, Ordering::Release);
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = &mut stop => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
