//! The shared tier (L2): one pool's Redis endpoint.
//!
//! One multiplexed connection per pool (redis' `ConnectionManager`, which reconnects by
//! itself), so a replica holds `pools` connections whatever its load. Every call has a
//! hard deadline (`redis_timeout`): a slow or absent Redis costs a miss, never an outage.
//! Writes run off the request path, bounded so that a stalled Redis cannot pile up tasks.
//!
//! Replicas coalesce misses through a short lease per key (`SET NX PX` with a random
//! token): the holder fetches, stores, and announces the fill on the pool's event channel
//! (Redis pub/sub, one subscriber connection per pool); the others wait for that message,
//! not polling Redis, and read the entry. So a replica holds two connections per pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use futures_util::StreamExt;
use tokio::sync::{Semaphore, oneshot};

use super::entry::{DecodeError, Entry};
use super::key::CacheKey;
use crate::config::SharedTierConfig;
use crate::metrics::{PoolMetrics, RedisOp};

/// Background writes allowed in flight per pool; beyond this a write is dropped (and
/// counted), since a cache write is worth less than the memory of an unbounded backlog.
const MAX_PENDING_WRITES: usize = 1024;

/// Errors setting up the shared tier.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up Redis for pool {pool}")]
pub struct SharedTierError {
    pool: String,
    #[source]
    source: redis::RedisError,
}

/// What a lease holder announces when its fetch is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// The entry is in Redis now.
    Filled,
    /// Nothing was stored (not storable, or the origin failed): fetch yourself.
    NotFilled,
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
const RELEASE_LEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Local side of the pool's event channel.
#[derive(Default)]
struct Events {
    /// One waiter per key at most (only a key's in-process leader waits on a lease); a
    /// std mutex held for one map operation.
    waiters: Mutex<HashMap<u128, oneshot::Sender<Announcement>>>,
    /// Whether the subscription is up; leases are only used while it is, since a waiter
    /// could not be told of a fill otherwise. Written by the subscriber task only.
    subscribed: AtomicBool,
}

impl Events {
    fn dispatch(&self, payload: &str) {
        let Some((kind, hash)) = payload.split_once(':') else { return };
        let Ok(hash) = u128::from_str_radix(hash, 16) else { return };
        let announcement = match kind {
            "fill" => Announcement::Filled,
            "nofill" => Announcement::NotFilled,
            _ => return,
        };
        let waiter = self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
        if let Some(tx) = waiter {
            let _ = tx.send(announcement);
        }
    }
}

pub struct SharedTier {
    client: redis::Client,
    /// Cloned per call: clones share one multiplexed connection.
    conn: ConnectionManager,
    timeout: Duration,
    prefix: String,
    metrics: Arc<PoolMetrics>,
    /// Bounds the background writes in flight (see [`MAX_PENDING_WRITES`]).
    writes: Arc<Semaphore>,
    events: Arc<Events>,
    channel: String,
    /// Dropped with the tier, which stops the subscriber task.
    _stop_events: oneshot::Sender<()>,
    stop_events: Mutex<Option<oneshot::Receiver<()>>>,
}

impl SharedTier {
    /// Creates the tier without connecting: the connection is made on first use and
    /// re-made after failures, so a Redis that is down at start-up delays nothing.
    pub fn new(pool: &str, config: &SharedTierConfig, prefix: String, metrics: Arc<PoolMetrics>) -> Result<SharedTier, SharedTierError> {
        let wrap = |source| SharedTierError { pool: pool.to_owned(), source };
        let client = redis::Client::open(config.url.as_str()).map_err(wrap)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.timeout))
            .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(250))))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config).map_err(wrap)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        Ok(SharedTier {
            client,
            conn,
            timeout: config.timeout,
            channel: format!("{prefix}events"),
            prefix,
            metrics,
            writes: Arc::new(Semaphore::new(MAX_PENDING_WRITES)),
            events: Arc::new(Events::default()),
            _stop_events: stop_tx,
            stop_events: Mutex::new(Some(stop_rx)),
        })
    }

    /// Starts the subscriber of the pool's event channel (once; needs a tokio runtime).
    /// It reconnects by itself and ends when the tier is dropped.
    pub fn start_events(&self) {
        let Some(mut stop) = self.stop_events.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        let (client, channel, events, metrics) = (self.client.clone(), self.channel.clone(), self.events.clone(), self.metrics.clone());
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                let session = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    events.subscribed.store(true, Ordering::Release);
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        if let Ok(payload) = msg.get_payload::<String>() {
                            events.dispatch(&payload);
                        }
                    }
                    Ok::<(), redis::RedisError>(())
                };
                tokio::select! {
                    result = session => {
                        if let Err(err) = result {
                            tracing::debug!(error = %err, channel, "event subscription failed");
                            metrics.redis_error(RedisOp::Connect);
                        } else {
                            backoff = Duration::from_millis(50);
                        }
                    }
                    _ = &mut stop => return,
                }
                events.subscribed.store(false, Ordering::Release);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = &mut stop => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
    }

    /// Whether the event subscription is up.
    pub fn events_up(&self) -> bool {
        self.events.subscribed.load(Ordering::Acquire)
    }

    fn lease_key(&self, key: &CacheKey) -> String {
        format!("{}v{}:lease:{:032x}", self.prefix, super::entry::FORMAT_VERSION, key.hash)
    }

    /// Registers for the announcement of `key`'s fill. Call before asking for the lease,
    /// so a fill that lands in between is not missed.
    pub fn watch_fill(&self, key: &CacheKey) -> oneshot::Receiver<Announcement> {
        let (tx, rx) = oneshot::channel();
        self.events.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(key.hash, tx);
        rx
    }

    pub fn unwatch_fill(&self, key: &CacheKey) {
        self.events.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&key.hash);
    }

    /// Asks for `key`'s lease for `ttl`.
    pub async fn acquire_lease(&self, key: &CacheKey, ttl: Duration) -> Lease {
        if !self.events_up() {
            return Lease::Unavailable;
        }
        let token = format!("{:016x}", fastrand::u64(..));
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.lease_key(key)).arg(&token).arg("NX").arg("PX").arg(ttl_ms);
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, cmd.query_async::<Option<String>>(&mut conn)).await {
            Ok(Ok(Some(_))) => Lease::Acquired(token),
            Ok(Ok(None)) => Lease::Held,
            _ => {
                self.metrics.redis_error(RedisOp::Set);
                Lease::Unavailable
            }
        }
    }

    /// Releases a lease we hold and announces how the fetch ended.
    pub async fn finish_lease(&self, key: &CacheKey, token: &str, announcement: Announcement) {
        let kind = match announcement {
            Announcement::Filled => "fill",
            Announcement::NotFilled => "nofill",
        };
        let message = format!("{kind}:{:032x}", key.hash);
        let mut conn = self.conn.clone();
        let script = redis::Script::new(RELEASE_LEASE);
        let mut release = script.key(self.lease_key(key));
        release.arg(token);
        let work = async {
            release.invoke_async::<i64>(&mut conn.clone()).await?;
            conn.publish::<_, _, i64>(&self.channel, message).await
        };
        if !matches!(tokio::time::timeout(self.timeout * 2, work).await, Ok(Ok(_))) {
            self.metrics.redis_error(RedisOp::Set);
        }
    }

    /// Writes `entry` now (used by lease holders, whose waiters read it right after).
    pub async fn put(&self, key: &CacheKey, entry: &Entry) -> bool {
        let ttl_ms = u64::try_from(entry.keep_for(SystemTime::now()).as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return false;
        }
        let mut conn = self.conn.clone();
        let set = conn.pset_ex::<_, _, ()>(key.redis_key(&self.prefix), entry.encode().to_vec(), ttl_ms);
        let ok = matches!(tokio::time::timeout(self.timeout, set).await, Ok(Ok(())));
        if !ok {
            self.metrics.redis_error(RedisOp::Set);
        }
        ok
    }

    /// Looks `key` up; any failure (deadline, connection, corrupt entry) is a miss.
    pub async fn get(&self, key: &CacheKey) -> Option<Entry> {
        let redis_key = key.redis_key(&self.prefix);
        let mut conn = self.conn.clone();
        let payload: Vec<u8> = match tokio::time::timeout(self.timeout, conn.get::<_, Option<Vec<u8>>>(&redis_key)).await {
            Ok(Ok(Some(payload))) => payload,
            Ok(Ok(None)) => return None,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "redis GET failed");
                self.metrics.redis_error(RedisOp::Get);
                return None;
            }
            Err(_) => {
                self.metrics.redis_error(RedisOp::Get);
                return None;
            }
        };
        match Entry::decode(&Bytes::from(payload)) {
            Ok(entry) if entry.key == key.text => Some(entry),
            // Same hash, another key: a miss; the entry belongs to that other key.
            Ok(_) | Err(DecodeError::OtherVersion(_)) => None,
            Err(DecodeError::Corrupt(why)) => {
                tracing::warn!(key = %redis_key, why, "corrupt entry in Redis, deleting it");
                self.metrics.l2_corrupt.increment(1);
                self.delete_in_background(redis_key);
                None
            }
        }
    }

    /// Writes `entry` in the background, to expire when it is no longer useful.
    pub fn put_in_background(&self, key: &CacheKey, entry: &Entry) {
        let ttl = entry.keep_for(SystemTime::now());
        let Ok(ttl_ms) = u64::try_from(ttl.as_millis()) else { return };
        if ttl_ms == 0 {
            return;
        }
        let Ok(permit) = self.writes.clone().try_acquire_owned() else {
            self.metrics.redis_error(RedisOp::Set);
            return;
        };
        let payload = entry.encode();
        let redis_key = key.redis_key(&self.prefix);
        let mut conn = self.conn.clone();
        let (timeout, metrics) = (self.timeout, self.metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let set = conn.pset_ex::<_, _, ()>(&redis_key, payload.as_ref(), ttl_ms);
            if !matches!(tokio::time::timeout(timeout, set).await, Ok(Ok(()))) {
                metrics.redis_error(RedisOp::Set);
            }
        });
    }

    fn delete_in_background(&self, redis_key: String) {
        let mut conn = self.conn.clone();
        let (timeout, metrics) = (self.timeout, self.metrics.clone());
        tokio::spawn(async move {
            if !matches!(tokio::time::timeout(timeout, conn.del::<_, ()>(&redis_key)).await, Ok(Ok(()))) {
                metrics.redis_error(RedisOp::Del);
            }
        });
    }
}
