//! The shared tier (L2): one pool's Redis endpoint.
//!
//! One multiplexed connection per pool (redis' `ConnectionManager`, which reconnects by
//! itself), so a replica holds `pools` connections whatever its load. Every call has a
//! hard deadline (`redis_timeout`): a slow or absent Redis costs a miss, never an outage.
//! Writes run off the request path, bounded so that a stalled Redis cannot pile up tasks.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Semaphore;

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

pub struct SharedTier {
    /// Cloned per call: clones share one multiplexed connection.
    conn: ConnectionManager,
    timeout: Duration,
    prefix: String,
    metrics: Arc<PoolMetrics>,
    /// Bounds the background writes in flight (see [`MAX_PENDING_WRITES`]).
    writes: Arc<Semaphore>,
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
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config).map_err(wrap)?;
        Ok(SharedTier { conn, timeout: config.timeout, prefix, metrics, writes: Arc::new(Semaphore::new(MAX_PENDING_WRITES)) })
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
