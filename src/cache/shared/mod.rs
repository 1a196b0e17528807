//! The shared tier (L2): one pool's Redis endpoint.
//!
//! A replica holds three connections per pool, whatever its load: one multiplexed
//! connection for reads and leases, one for writes (so a large value being written
//! never holds up small reads), and one subscribed to the pool's event channel. Every
//! call has a hard deadline (`redis_timeout`; writes get more time for large values): a
//! slow or absent Redis costs a miss, never an outage. Background writes are bounded so
//! that a stalled Redis cannot pile up tasks.

mod events;
mod health;
mod link;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use redis::AsyncCommands;
use tokio::sync::{Semaphore, oneshot};

pub use events::{Announcement, Lease, Watch};

use super::entry::{DecodeError, Entry};
use super::key::CacheKey;
use crate::config::SharedTierConfig;
use crate::metrics::{PoolMetrics, RedisOp};
use events::{Events, RELEASE_LEASE};
use health::Health;
use link::Link;

/// Background writes allowed in flight per pool; beyond this a write is dropped (and
/// counted), since a cache write is worth less than the memory of an unbounded backlog.
const MAX_PENDING_WRITES: usize = 1024;

/// Deletes a key only if it still holds the given (corrupt) value, so a fresh entry
/// written meanwhile, here or by another replica, survives.
const DELETE_IF_UNCHANGED: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Errors setting up the shared tier.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up Redis for pool {pool}")]
pub struct SharedTierError {
    pool: String,
    #[source]
    source: redis::RedisError,
}

pub struct SharedTier {
    client: redis::Client,
    reads: Arc<Link>,
    writes: Arc<Link>,
    /// The pool's Redis breaker: while open, every call below returns at once.
    health: Arc<Health>,
    timeout: Duration,
    prefix: String,
    metrics: Arc<PoolMetrics>,
    /// Bounds the background writes in flight (see [`MAX_PENDING_WRITES`]).
    pending_writes: Arc<Semaphore>,
    events: Arc<Events>,
    channel: String,
    /// Dropped with the tier, which stops the subscriber task.
    _stop_events: oneshot::Sender<()>,
    /// Taken by [`SharedTier::start_events`], once.
    stop_events: Mutex<Option<oneshot::Receiver<()>>>,
}

impl SharedTier {
    /// Creates the tier without connecting: connections are made on first use and
    /// re-made after failures, so a Redis that is down at start-up delays nothing.
    pub fn new(pool: &str, config: &SharedTierConfig, prefix: String, metrics: Arc<PoolMetrics>) -> Result<SharedTier, SharedTierError> {
        let wrap = |source| SharedTierError { pool: pool.to_owned(), source };
        let client = redis::Client::open(config.url.as_str()).map_err(wrap)?;
        let reads = Arc::new(Link::new(client.clone(), config.timeout).map_err(wrap)?);
        let writes = Arc::new(Link::new(client.clone(), config.timeout).map_err(wrap)?);
        let health = Health::new(config.breaker_failures, config.breaker_probe_interval, config.timeout, metrics.redis_breaker_open.clone());
        let (stop_tx, stop_rx) = oneshot::channel();
        Ok(SharedTier {
            client,
            reads,
            writes,
            health,
            timeout: config.timeout,
            channel: format!("{prefix}events"),
            prefix,
            metrics,
            pending_writes: Arc::new(Semaphore::new(MAX_PENDING_WRITES)),
            events: Arc::new(Events::default()),
            _stop_events: stop_tx,
            stop_events: Mutex::new(Some(stop_rx)),
        })
    }

    /// Starts the subscriber of the pool's event channel (once; needs a tokio runtime).
    /// It reconnects by itself and ends when the tier is dropped.
    pub fn start_events(&self) {
        let Some(stop) = self.stop_events.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        let task = self.events.clone().run(self.client.clone(), self.channel.clone(), self.metrics.clone(), stop);
        tokio::spawn(task);
    }

    /// Whether the event subscription is up (leases are used only then).
    pub fn events_up(&self) -> bool {
        self.events.is_up()
    }

    /// Whether the pool's Redis breaker is open (the shared tier is being skipped).
    pub fn breaker_open(&self) -> bool {
        self.health.is_open()
    }

    /// Runs one call on `link` unless the breaker is open, feeding the breaker; `None`
    /// when skipped or past the deadline.
    async fn guarded<T>(&self, link: &Arc<Link>, deadline: Duration, call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Option<redis::RedisResult<T>> {
        guarded(&self.health, link, deadline, call).await
    }

    /// Looks `key` up; any failure (deadline, connection, corrupt entry) is a miss.
    /// A corrupt entry is deleted and counted.
    pub async fn get(&self, key: &CacheKey) -> Option<Entry> {
        self.read(key, true).await
    }

    /// Looks `key` up again right after [`SharedTier::get`] (a lease holder's check): a
    /// corrupt entry is a miss but is not reported a second time.
    pub async fn recheck(&self, key: &CacheKey) -> Option<Entry> {
        self.read(key, false).await
    }

    async fn read(&self, key: &CacheKey, report_corrupt: bool) -> Option<Entry> {
        let redis_key = key.redis_key(&self.prefix);
        if self.health.is_open() {
            return None;
        }
        let mut conn = self.reads.conn();
        let payload: Vec<u8> = match self.guarded(&self.reads, self.timeout, conn.get::<_, Option<Vec<u8>>>(&redis_key)).await {
            Some(Ok(Some(payload))) => payload,
            Some(Ok(None)) => return None,
            Some(Err(err)) => {
                tracing::debug!(error = %err, "redis GET failed");
                self.metrics.redis_error(RedisOp::Get);
                return None;
            }
            None => {
                self.metrics.redis_error(RedisOp::Get);
                return None;
            }
        };
        let payload = Bytes::from(payload);
        match Entry::decode(&payload) {
            Ok(entry) if entry.key == key.text => Some(entry),
            // Same hash, another key: a miss; the entry belongs to that other key.
            Ok(_) | Err(DecodeError::OtherVersion(_)) => None,
            Err(DecodeError::Corrupt(_)) if !report_corrupt => None,
            Err(DecodeError::Corrupt(why)) => {
                tracing::warn!(key = %redis_key, why, "corrupt entry in Redis, deleting it");
                self.metrics.l2_corrupt.increment(1);
                self.delete_if_unchanged(redis_key, payload);
                None
            }
        }
    }

    /// Deadline of a write: `redis_timeout`, plus time to move a large value at 64 MB/s.
    fn write_deadline(&self, len: usize) -> Duration {
        self.timeout + Duration::from_micros(u64::try_from(len / 64).unwrap_or(u64::MAX))
    }

    /// Writes `entry` in the background (encoding included), to expire when it is no
    /// longer useful.
    pub fn put_in_background(&self, key: &CacheKey, entry: Arc<Entry>) {
        if self.health.is_open() {
            return;
        }
        let Ok(permit) = self.pending_writes.clone().try_acquire_owned() else {
            self.metrics.redis_error(RedisOp::Set);
            return;
        };
        let redis_key = key.redis_key(&self.prefix);
        let (writes, metrics, health) = (self.writes.clone(), self.metrics.clone(), self.health.clone());
        let deadline = self.write_deadline(entry.body.len());
        tokio::spawn(async move {
            let _permit = permit;
            if !write(&health, &writes, deadline, &redis_key, &entry).await {
                metrics.redis_error(RedisOp::Set);
            }
        });
    }

    /// Writes `entry` now (lease holders, whose peers read it right after).
    pub async fn put(&self, key: &CacheKey, entry: &Entry) -> bool {
        if self.health.is_open() {
            return false;
        }
        let ok = write(&self.health, &self.writes, self.write_deadline(entry.body.len()), &key.redis_key(&self.prefix), entry).await;
        if !ok {
            self.metrics.redis_error(RedisOp::Set);
        }
        ok
    }

    fn delete_if_unchanged(&self, redis_key: String, payload: Bytes) {
        let (writes, health) = (self.writes.clone(), self.health.clone());
        let (timeout, metrics) = (self.timeout, self.metrics.clone());
        tokio::spawn(async move {
            let script = redis::Script::new(DELETE_IF_UNCHANGED);
            let mut invocation = script.key(&redis_key);
            invocation.arg(payload.as_ref());
            let mut conn = writes.conn();
            if !matches!(guarded(&health, &writes, timeout, invocation.invoke_async::<i64>(&mut conn)).await, Some(Ok(_))) {
                metrics.redis_error(RedisOp::Del);
            }
        });
    }

    fn lease_key(&self, key: &CacheKey) -> String {
        format!("{}v{}:lease:{:032x}", self.prefix, super::entry::FORMAT_VERSION, key.hash)
    }

    /// Registers for the announcement of `key`'s fill. Call before asking for the lease,
    /// so a fill that lands in between is not missed.
    pub fn watch_fill(&self, key: &CacheKey) -> Watch {
        self.events.watch(key.hash)
    }

    pub fn unwatch_fill(&self, watch: &Watch) {
        self.events.unwatch(watch.hash, watch.id());
    }

    /// Unwatches by hash and id (when the watch itself was consumed by a wait).
    pub fn unwatch_id(&self, hash: u128, id: u64) {
        self.events.unwatch(hash, id);
    }

    /// Asks for `key`'s lease for `ttl`.
    pub async fn acquire_lease(&self, key: &CacheKey, ttl: Duration) -> Lease {
        if !self.events_up() || self.health.is_open() {
            return Lease::Unavailable;
        }
        let token = format!("{:016x}", fastrand::u64(..));
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.lease_key(key)).arg(&token).arg("NX").arg("PX").arg(ttl_ms);
        let mut conn = self.reads.conn();
        match self.guarded(&self.reads, self.timeout, cmd.query_async::<Option<String>>(&mut conn)).await {
            Some(Ok(Some(_))) => Lease::Acquired(token),
            Some(Ok(None)) => Lease::Held,
            Some(Err(_)) => {
                self.metrics.redis_error(RedisOp::Set);
                Lease::Unavailable
            }
            None => {
                self.metrics.redis_error(RedisOp::Set);
                Lease::Uncertain(token)
            }
        }
    }

    /// Releases a lease we hold and announces how the fetch ended.
    pub async fn finish_lease(&self, key: &CacheKey, token: &str, announcement: Announcement) {
        let script = redis::Script::new(RELEASE_LEASE);
        let mut release = script.key(self.lease_key(key));
        release.arg(token);
        let mut conn = self.writes.conn();
        let work = async {
            release.invoke_async::<i64>(&mut conn).await?;
            conn.publish::<_, _, i64>(&self.channel, announcement.message(key.hash)).await
        };
        if !matches!(self.guarded(&self.writes, self.timeout * 2, work).await, Some(Ok(_))) {
            self.metrics.redis_error(RedisOp::Set);
        }
    }
}

/// `SET key payload PX ttl` on the write link; false when it failed or had nothing to keep.
async fn write(health: &Arc<Health>, link: &Arc<Link>, deadline: Duration, redis_key: &str, entry: &Entry) -> bool {
    let ttl_ms = u64::try_from(entry.keep_for(SystemTime::now()).as_millis()).unwrap_or(u64::MAX);
    if ttl_ms == 0 {
        return true;
    }
    let payload = entry.encode();
    let mut conn = link.conn();
    matches!(guarded(health, link, deadline, conn.pset_ex::<_, _, ()>(redis_key, payload.as_ref(), ttl_ms)).await, Some(Ok(())))
}

/// One call under the breaker: skipped while it is open, its result fed to it.
async fn guarded<T>(
    health: &Arc<Health>,
    link: &Arc<Link>,
    deadline: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Option<redis::RedisResult<T>> {
    if health.is_open() {
        return None;
    }
    let result = link.call(deadline, call).await;
    match &result {
        Some(Ok(_)) => health.succeeded(),
        // A server-side error reply (wrong type, script error) is not a sick Redis.
        Some(Err(e)) if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()) => health.succeeded(),
        _ => health.failed(link),
    }
    result
}
