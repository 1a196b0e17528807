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
pub(crate) mod link;
mod purge;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use redis::AsyncCommands;
use tokio::sync::{oneshot, watch};

pub use events::{Announcement, Lease, Notice, NoticeHandler, Watch};
pub use purge::PurgeError;

use super::entry::{DecodeError, Entry};
use super::key::CacheKey;
use super::purge::PurgeTarget;
use crate::clock::Clock;
use crate::config::SharedTierConfig;
use crate::memory::ByteBudget;
use crate::metrics::{PoolMetrics, RedisOp, WriteDropped};
use events::{ACQUIRE_LEASE, Events, RELEASE_LEASE, RENEW_LEASE};
use health::Health;
use link::Link;

/// Reads in progress by key hash, each telling its waiters what it read (`Some` once
/// done: the entry, or `None` for none).
type Reads = Mutex<HashMap<u128, watch::Receiver<Option<Option<Entry>>>>>;

/// A read of one key in progress; ends it (in the map) however the read ends.
struct ReadInProgress<'a> {
    reading: &'a Reads,
    hash: u128,
}

impl Drop for ReadInProgress<'_> {
    fn drop(&mut self) {
        lock(self.reading).remove(&self.hash);
    }
}

/// A std mutex held for one map operation; a panic elsewhere cannot leave it half done.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Rewrites a key (keeping its expiry) only if it still holds the value read: a soft
/// purge never overwrites a newer entry, nor recreates an expired one.
const SET_IF_UNCHANGED: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[1], ARGV[2], 'KEEPTTL', 'XX') and 1 or 0 else return 0 end";

/// Adds an entry to a purge index (a sorted set scored by the entry's expiry), drops
/// members that expired, and keeps the set as long as its longest-lived member.
const INDEX_ADD: &str = "redis.call('zadd', KEYS[1], ARGV[2], ARGV[1]) \
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[3]) \
if redis.call('pttl', KEYS[1]) < tonumber(ARGV[4]) then redis.call('pexpire', KEYS[1], ARGV[4]) end \
return 1";

/// Writes a variants marker, keeping the longer of its current and its new expiry: a
/// short-lived variant stored last must not make the marker expire before a long-lived
/// one, which would then be unreachable.
const SET_MARKER: &str = "local ttl = tonumber(ARGV[2]) \
if redis.call('pttl', KEYS[1]) > ttl then ttl = redis.call('pttl', KEYS[1]) end \
redis.call('set', KEYS[1], ARGV[1], 'PX', ttl) return 1";

/// Deletes a key only if it still holds the given (corrupt) value, so a fresh entry
/// written meanwhile, here or by another replica, survives.
/// Deletes KEYS[1] if it is still longer than ARGV[1] bytes.
const DELETE_IF_OVERSIZED: &str = "if redis.call('strlen', KEYS[1]) > tonumber(ARGV[1]) then return redis.call('del', KEYS[1]) else return 0 end";

/// What an entry may hold beyond its body (key, header fields, tags, fixed fields): with
/// `max_object_bytes`, the most of a value read from Redis.
pub const ENTRY_OVERHEAD_BYTES: usize = 1 << 20;

/// Takes up to ARGV[3] tokens from the bucket KEYS[1] (a generic cell rate algorithm:
/// the key holds the time, in microseconds by the Redis clock, when the bucket is full
/// again), refilling one per ARGV[1] nanoseconds and holding at most ARGV[2]; a time
/// further ahead than ARGV[2] tokens (left by a slower rate or a larger burst) is
/// brought back to it. Anything else in the key (not a finite number, another type) is
/// a full bucket, overwritten. Answers {granted, 0}, or {0, microseconds until one is free}.
const TAKE_TOKENS: &str = "local t = redis.call('time') \
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
    local interval, burst, want = tonumber(ARGV[1]) / 1000, tonumber(ARGV[2]), tonumber(ARGV[3]) \
    local limit = now + burst * interval \
    local raw = redis.pcall('get', KEYS[1]) \
    local stored = type(raw) == 'string' and tonumber(raw) or nil \
    if stored == nil or stored ~= stored or stored == math.huge or stored == -math.huge then stored = nil end \
    local full = math.min(math.max(stored or now, now), limit) \
    local granted = math.min(math.floor((limit - full) / interval + 0.000001), want) \
    full = full + granted * interval \
    if full ~= stored then redis.call('set', KEYS[1], string.format('%.3f', full), 'px', math.ceil((full - now) / 1000) + 1000) end \
    if granted < 1 then return {0, math.ceil(full - (burst - 1) * interval - now)} end \
    return {granted, 0}";

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
    /// The pool's name, in log lines.
    pool: String,
    /// Lines about corrupt values read, rate-limited.
    corrupt_log: crate::log_every::Every,
    /// One client per node, for the event subscription (in a cluster, any node hears
    /// every PUBLISH).
    event_clients: Vec<redis::Client>,
    /// Cluster mode: keys that belong together share a `{hash tag}`, and multi-key
    /// batches are sent as single commands (a cluster pipeline must stay in one slot).
    cluster: bool,
    reads: Arc<Link>,
    writes: Arc<Link>,
    /// The pool's Redis breaker: while open, every call below returns at once.
    health: Arc<Health>,
    timeout: Duration,
    prefix: String,
    /// The time entries are written and purged by (their Redis TTL and index scores).
    clock: Clock,
    metrics: Arc<PoolMetrics>,
    /// Bytes of background writes in flight (`redis_write_queue_bytes`): beyond it a
    /// write is dropped and counted, since a cache write is worth less than the memory
    /// of an unbounded backlog.
    write_queue: Arc<ByteBudget>,
    /// The longest value this pool writes, and so reads: anything longer is corrupt.
    max_entry_bytes: usize,
    /// Reads in progress by key hash: concurrent lookups of one key share one read.
    reading: Arc<Reads>,
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
    pub fn new(
        pool: &str,
        config: &SharedTierConfig,
        prefix: String,
        max_object_bytes: usize,
        write_queue_bytes: usize,
        metrics: Arc<PoolMetrics>,
        clock: Clock,
    ) -> Result<SharedTier, SharedTierError> {
        let wrap = |source| SharedTierError { pool: pool.to_owned(), source };
        let ca = config.ca.as_ref();
        let event_clients = config.endpoint.urls().iter().map(|u| link::client(u, ca)).collect::<Result<Vec<_>, _>>().map_err(wrap)?;
        let owner = format!("pool {pool}");
        let reads = Arc::new(Link::new(&owner, &config.endpoint, ca, config.timeout).map_err(wrap)?);
        let writes = Arc::new(Link::new(&owner, &config.endpoint, ca, config.timeout).map_err(wrap)?);
        let probe_key = format!("{prefix}probe");
        let health = Health::new(pool, config.breaker_failures, config.breaker_probe_interval, config.timeout, probe_key, metrics.redis_breaker_open.clone());
        let (stop_tx, stop_rx) = oneshot::channel();
        Ok(SharedTier {
            pool: pool.to_owned(),
            corrupt_log: crate::log_every::Every::new(Duration::from_secs(10)),
            event_clients,
            cluster: matches!(config.endpoint, crate::config::RedisEndpoint::Cluster(_)),
            reads,
            writes,
            health,
            timeout: config.timeout,
            channel: format!("{prefix}events"),
            prefix,
            metrics,
            clock,
            write_queue: ByteBudget::new(write_queue_bytes),
            max_entry_bytes: max_object_bytes.saturating_add(ENTRY_OVERHEAD_BYTES),
            reading: Arc::default(),
            events: Arc::new(Events::new()),
            _stop_events: stop_tx,
            stop_events: Mutex::new(Some(stop_rx)),
        })
    }

    /// Starts the subscriber of the pool's event channel (once; needs a tokio runtime),
    /// handing purges and replacements to `handler`. It reconnects by itself and ends
    /// when the tier is dropped.
    pub fn start_events(&self, handler: NoticeHandler) {
        let Some(stop) = self.stop_events.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        // Start connecting now (a cluster connection is made in the background), so the
        // first requests do not find it missing.
        let _ = (self.reads.conn(), self.writes.conn());
        // After a gap (not the first subscription) the other connections may sit on the
        // same dead path (a failover, a lost NAT entry): made anew at once, so the checks
        // of L1's copies are answered instead of timing out first.
        let (reads, writes) = (self.reads.clone(), self.writes.clone());
        let subscribed_before = AtomicBool::new(false);
        let handler: NoticeHandler = Arc::new(move |notice| {
            if matches!(notice, Notice::Resubscribed { .. }) && subscribed_before.swap(true, Ordering::AcqRel) {
                reads.reset();
                writes.reset();
            }
            handler(notice);
        });
        let epoch_key = format!("{}epoch", self.prefix);
        let task = self.events.clone().run(self.event_clients.clone(), self.channel.clone(), epoch_key, self.metrics.clone(), handler, stop);
        // Its lines name the pool.
        tokio::spawn(tracing::Instrument::instrument(task, tracing::info_span!("events", pool = self.pool)));
    }

    /// Publishes a notice to every replica of the pool (this one included).
    pub async fn publish(&self, notice: &Notice) -> bool {
        let Some(message) = notice.message(self.events.instance) else { return false };
        let mut conn = self.writes.conn();
        let sent = matches!(self.guarded(&self.writes, self.timeout, conn.publish::<_, _, i64>(&self.channel, message)).await, Some(Ok(_)));
        if !sent {
            self.metrics.redis_error(RedisOp::Set);
        }
        sent
    }

    /// Whether the event subscription is up (leases are used only then).
    pub fn events_up(&self) -> bool {
        self.events.is_up()
    }

    /// Runs one call on `link` unless the breaker is open, feeding the breaker; `None`
    /// when skipped or past the deadline.
    async fn guarded<T>(
        &self,
        link: &Arc<Link>,
        deadline: Duration,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<redis::RedisResult<T>> {
        guarded(&self.health, link, deadline, call).await
    }

    /// Looks `key` up; any failure (deadline, connection, corrupt entry) is a miss.
    /// A corrupt entry is deleted and counted.
    pub async fn get(&self, key: &CacheKey) -> Option<Entry> {
        self.read(key, true, self.timeout).await
    }

    /// [`SharedTier::get`] with a shorter deadline (the rest of a lookup's budget);
    /// without `report_corrupt`, a corrupt entry is a miss but not reported again.
    pub async fn get_within(&self, key: &CacheKey, deadline: Duration, report_corrupt: bool) -> Option<Entry> {
        self.read(key, report_corrupt, deadline.min(self.timeout)).await
    }

    /// Whether the pool's Redis breaker is open (every call returns at once).
    pub fn is_down(&self) -> bool {
        self.health.is_open()
    }

    /// The deadline of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn read(&self, key: &CacheKey, report_corrupt: bool, deadline: Duration) -> Option<Entry> {
        if self.health.is_open() {
            return None;
        }
        let entry = self.read_coalesced(key, report_corrupt, deadline).await?;
        // Same hash, another key: a miss; the entry belongs to that other key.
        (entry.key == key.text).then_some(entry)
    }

    /// One read of a key at a time in this process: with a cold L1 (a restart, a new pod)
    /// a hot key is wanted by many requests at once, and its value (maybe megabytes) is
    /// read from Redis once for all of them. A waiter waits no longer than its own
    /// deadline, and reads for itself if the reader went away without an answer.
    async fn read_coalesced(&self, key: &CacheKey, report_corrupt: bool, deadline: Duration) -> Option<Entry> {
        let waiting = {
            let mut reading = lock(&self.reading);
            match reading.get(&key.hash) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    reading.insert(key.hash, rx);
                    Ok(tx)
                }
            }
        };
        match waiting {
            Ok(tx) => {
                let done = ReadInProgress { reading: &self.reading, hash: key.hash };
                let entry = self.read_once(key, report_corrupt, deadline).await;
                drop(done);
                tx.send_replace(Some(entry.clone()));
                entry
            }
            Err(mut rx) => {
                let read = tokio::time::timeout(deadline, rx.wait_for(Option::is_some)).await.map(|read| read.map(|entry| entry.clone().flatten()));
                match read {
                    Ok(Ok(entry)) => entry,
                    Ok(Err(_)) => self.read_once(key, report_corrupt, deadline).await,
                    Err(_) => None,
                }
            }
        }
    }

    /// Reads and decodes the entry stored under `key`'s hash (whatever key it is for).
    async fn read_once(&self, key: &CacheKey, report_corrupt: bool, deadline: Duration) -> Option<Entry> {
        let redis_key = self.entry_key(key);
        let payload = match self.get_bounded(&self.reads, &redis_key, deadline).await {
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
        if payload.len() > self.max_entry_bytes {
            if report_corrupt {
                if let Some(left_out) = self.corrupt_log.due() {
                    tracing::warn!(pool = self.pool, key = %redis_key, limit = self.max_entry_bytes, left_out, "value in Redis longer than any entry of this pool, deleting it");
                }
                self.metrics.l2_corrupt.increment(1);
                self.delete_corrupt(redis_key, DELETE_IF_OVERSIZED, self.max_entry_bytes.to_string().into_bytes());
            }
            return None;
        }
        match Entry::decode(&payload) {
            Ok(entry) => Some(entry),
            Err(DecodeError::OtherVersion(_)) => None,
            Err(DecodeError::Corrupt(_)) if !report_corrupt => None,
            Err(DecodeError::Corrupt(why)) => {
                if let Some(left_out) = self.corrupt_log.due() {
                    tracing::warn!(pool = self.pool, key = %redis_key, why, left_out, "corrupt entry in Redis, deleting it");
                }
                self.metrics.l2_corrupt.increment(1);
                self.delete_corrupt(redis_key, DELETE_IF_UNCHANGED, payload.to_vec());
                None
            }
        }
    }

    /// What Redis holds under `key`, and whether a replica holds its fill lease, read
    /// as they are for inspection: one round trip within `redis_timeout`, asked even
    /// while the breaker is open, and with no effect on the breaker, the metrics or a
    /// corrupt value. The error says why Redis could not answer.
    pub async fn peek(&self, key: &CacheKey) -> Result<Peeked, String> {
        let mut pipe = redis::pipe();
        pipe.cmd("GETRANGE").arg(self.entry_key(key)).arg(0).arg(self.max_entry_bytes).cmd("EXISTS").arg(self.lease_key(key));
        let mut conn = self.reads.conn();
        let (payload, leased) = match self.reads.call(self.timeout, pipe.query_async::<(Vec<u8>, bool)>(&mut conn)).await {
            Some(Ok(answer)) => answer,
            Some(Err(err)) => return Err(format!("redis failed: {err}")),
            None => return Err(format!("redis did not answer within {:?}", self.timeout)),
        };
        if payload.is_empty() {
            return Ok(Peeked { entry: None, leased });
        }
        match Entry::decode(&Bytes::from(payload)) {
            // Same hash, another key: nothing of this key's.
            Ok(entry) => Ok(Peeked { entry: (entry.key == key.text).then_some(entry), leased }),
            Err(err) => Err(format!("the stored value cannot be read: {err}")),
        }
    }

    /// Checks a copy kept through a link gap against Redis, reading only the head of the
    /// stored entry ([`Entry::encoded_head`]): one small read per entry.
    pub async fn confirm(&self, key: &CacheKey, entry: &Entry) -> Confirmation {
        if self.health.is_open() {
            return Confirmation::Unknown;
        }
        let mut cmd = redis::cmd("GETRANGE");
        cmd.arg(self.entry_key(key)).arg(0).arg(super::entry::HEAD_LEN - 1);
        let mut conn = self.reads.conn();
        match self.guarded(&self.reads, self.timeout, cmd.query_async::<Vec<u8>>(&mut conn)).await {
            Some(Ok(head)) if head.is_empty() => Confirmation::Absent,
            Some(Ok(head)) if head == entry.encoded_head() => Confirmation::Same,
            Some(Ok(_)) => Confirmation::Differs,
            Some(Err(_)) | None => {
                self.metrics.redis_error(RedisOp::Get);
                Confirmation::Unknown
            }
        }
    }

    /// The value at `redis_key`, at most `max_entry_bytes + 1` bytes of it: redis-rs reads
    /// a whole bulk string before it returns, so the bound is in the command (`GETRANGE`;
    /// an absent key reads as empty, and no entry is empty).
    async fn get_bounded(&self, link: &Arc<Link>, redis_key: &str, deadline: Duration) -> Option<redis::RedisResult<Option<Bytes>>> {
        let mut cmd = redis::cmd("GETRANGE");
        cmd.arg(redis_key).arg(0).arg(self.max_entry_bytes);
        let mut conn = link.conn();
        let read = self.guarded(link, deadline, cmd.query_async::<Vec<u8>>(&mut conn)).await?;
        Some(read.map(|value| (!value.is_empty()).then(|| Bytes::from(value))))
    }

    /// Deadline of a write: `redis_timeout`, plus time to move a large value at 64 MB/s.
    fn write_deadline(&self, len: usize) -> Duration {
        self.timeout + Duration::from_micros(u64::try_from(len / 64).unwrap_or(u64::MAX))
    }

    /// Writes `entry` in the background (encoding included), to expire when it is no
    /// longer useful; then, with `announce` (a primary hash and the variant hash, if
    /// any), tells the other replicas to drop their older copies.
    pub fn put_in_background(&self, key: &CacheKey, entry: Arc<Entry>, announce: Option<(u128, Option<u128>)>) {
        if self.health.is_open() {
            return;
        }
        let Some(permit) = self.write_queue.reserve(queued_bytes(&entry)) else {
            self.metrics.write_dropped(WriteDropped::Queue);
            return;
        };
        let redis_key = self.entry_key(key);
        let (writes, metrics, health, prefix) = (self.writes.clone(), self.metrics.clone(), self.health.clone(), self.prefix.clone());
        let deadline = self.write_deadline(entry.body.len());
        let (channel, sender, clock, max_entry_bytes) = (self.channel.clone(), self.events.instance, self.clock.clone(), self.max_entry_bytes);
        tokio::spawn(async move {
            let _permit = permit;
            if !write(&health, &writes, deadline, &prefix, &redis_key, &entry, max_entry_bytes, &metrics, clock.now()).await {
                return;
            }
            if let Some(message) = announce.and_then(|(hash, variant)| Notice::Replaced { hash, variant, response_time: entry.response_time }.message(sender)) {
                let mut conn = writes.conn();
                let _ = guarded(&health, &writes, deadline, conn.publish::<_, _, i64>(&channel, message)).await;
            }
        });
    }

    /// Writes `entry` now (a flight's fill, off the requests' path; lease holders' peers
    /// read it right after). It draws from the write queue like a background write.
    pub async fn put(&self, key: &CacheKey, entry: &Entry) -> bool {
        if self.health.is_open() {
            return false;
        }
        let Some(_queued) = self.write_queue.reserve(queued_bytes(entry)) else {
            self.metrics.write_dropped(WriteDropped::Queue);
            return false;
        };
        write(
            &self.health,
            &self.writes,
            self.write_deadline(entry.body.len()),
            &self.prefix,
            &self.entry_key(key),
            entry,
            self.max_entry_bytes,
            &self.metrics,
            self.clock.now(),
        )
        .await
    }

    /// Deletes a corrupt entry in the background with `script` (its one argument `arg`:
    /// the payload it must still hold, or the length it must still exceed), so that
    /// nothing written meanwhile is deleted.
    fn delete_corrupt(&self, redis_key: String, script: &'static str, arg: Vec<u8>) {
        let (writes, health) = (self.writes.clone(), self.health.clone());
        let (timeout, metrics) = (self.timeout, self.metrics.clone());
        tokio::spawn(async move {
            let script = redis::Script::new(script);
            let mut invocation = script.key(&redis_key);
            invocation.arg(arg);
            let mut conn = writes.conn();
            if !matches!(guarded(&health, &writes, timeout, invocation.invoke_async::<i64>(&mut conn)).await, Some(Ok(_))) {
                metrics.redis_error(RedisOp::Del);
            }
        });
    }

    /// `<prefix>v2:<hash>`; in a cluster `<prefix>v2:{<hash>}`, so the entry and its
    /// lease share a slot.
    pub fn entry_key(&self, key: &CacheKey) -> String {
        if self.cluster { format!("{}v{}:{{{:032x}}}", self.prefix, super::entry::FORMAT_VERSION, key.hash) } else { key.redis_key(&self.prefix) }
    }

    fn lease_key(&self, key: &CacheKey) -> String {
        if self.cluster {
            format!("{}v{}:lease:{{{:032x}}}", self.prefix, super::entry::FORMAT_VERSION, key.hash)
        } else {
            format!("{}v{}:lease:{:032x}", self.prefix, super::entry::FORMAT_VERSION, key.hash)
        }
    }

    /// Registers for the announcement of `key`'s fill. Call before asking for the lease,
    /// so a fill that lands in between is not missed.
    pub fn watch_fill(&self, key: &CacheKey) -> Watch {
        self.events.watch(key.hash)
    }

    pub fn unwatch_fill(&self, watch: &Watch) {
        self.events.unwatch(watch.hash, watch.id());
    }

    /// Asks for `key`'s lease for `ttl`; a lease its holder has not renewed for
    /// `stale_after` (or one that holds no token of this fleet) is taken over.
    pub async fn acquire_lease(&self, key: &CacheKey, ttl: Duration, stale_after: Duration) -> Lease {
        if !self.events_up() || self.health.is_open() {
            return Lease::Unavailable;
        }
        let token = format!("bwl:{:016x}", fastrand::u64(..));
        let script = redis::Script::new(ACQUIRE_LEASE);
        let mut acquire = script.key(self.lease_key(key));
        acquire.arg(&token).arg(millis(ttl)).arg(millis(stale_after));
        let mut conn = self.reads.conn();
        match self.guarded(&self.reads, self.timeout, acquire.invoke_async::<i64>(&mut conn)).await {
            Some(Ok(1)) => Lease::Acquired(token),
            Some(Ok(_)) => Lease::Held,
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

    /// Renews a lease we hold for another `ttl` (marking it renewed now); false when it
    /// is no longer ours or Redis did not answer.
    pub async fn renew_lease(&self, key: &CacheKey, token: &str, ttl: Duration) -> bool {
        let script = redis::Script::new(RENEW_LEASE);
        let mut renew = script.key(self.lease_key(key));
        renew.arg(token).arg(millis(ttl));
        let mut conn = self.reads.conn();
        matches!(self.guarded(&self.reads, self.timeout, renew.invoke_async::<i64>(&mut conn)).await, Some(Ok(1)))
    }

    /// Takes up to `want` tokens from the admission bucket `name`, shared by every
    /// replica of the pool (one token per `interval`, at most `burst` saved up): the
    /// tokens granted, or how long until one is free. `None` when Redis cannot answer
    /// now (breaker open, an error, past the deadline): the caller counts alone.
    ///
    /// The bucket is stored as the time it is full again (Redis's clock, in µs), clamped
    /// to `burst` intervals ahead: a bucket left by another rate or burst (a reload, a
    /// rollout) is at worst empty under the new one, never empty for longer.
    pub async fn take_tokens(&self, name: &str, interval: Duration, burst: u32, want: u32) -> Option<Result<u32, Duration>> {
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(TAKE_TOKENS));
        if self.health.is_open() {
            return None;
        }
        let mut take = SCRIPT.key(format!("{}adm:{name}", self.prefix));
        let nanos = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX).max(1);
        take.arg(nanos).arg(burst).arg(want);
        let mut conn = self.reads.conn();
        match self.guarded(&self.reads, self.timeout, take.invoke_async::<(i64, i64)>(&mut conn)).await {
            Some(Ok((granted, _))) if granted > 0 => Some(Ok(u32::try_from(granted).unwrap_or(want).min(want))),
            Some(Ok((_, wait_us))) => Some(Err(Duration::from_micros(u64::try_from(wait_us).unwrap_or(0).max(1)))),
            Some(Err(_)) | None => {
                self.metrics.redis_error(RedisOp::Get);
                None
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

/// What [`SharedTier::peek`] found.
#[derive(Debug)]
pub struct Peeked {
    pub entry: Option<Entry>,
    /// A replica holds the key's fill lease: a fill is in progress somewhere.
    pub leased: bool,
}

/// What Redis holds for a copy kept through a link gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// The same stored response: serve it.
    Same,
    /// Another one (replaced, or soft-purged meanwhile): this copy is outdated.
    Differs,
    /// None (purged, expired or evicted; or Redis restarted empty).
    Absent,
    /// No answer: serve as without a gap.
    Unknown,
}

/// `SET key payload PX ttl` on the write link, then the entry's purge indexes (its URL,
/// path and tags). False when the entry itself was not written, counted as a dropped
/// write when it ran out of time and as an error otherwise; index failures are counted
/// but do not undo a stored entry. `now` is the pool's clock.
#[allow(clippy::too_many_arguments)]
async fn write(
    health: &Arc<Health>,
    link: &Arc<Link>,
    deadline: Duration,
    prefix: &str,
    redis_key: &str,
    entry: &Entry,
    max_entry_bytes: usize,
    metrics: &PoolMetrics,
    now: SystemTime,
) -> bool {
    let keep = entry.keep_for(now);
    let ttl_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
    if ttl_ms == 0 {
        return true;
    }
    let payload = entry.encode();
    if payload.len() > max_entry_bytes {
        // It would read back as corrupt: L1 keeps it alone.
        tracing::debug!(key = %redis_key, len = payload.len(), "entry longer than the pool reads back; not written to Redis");
        metrics.redis_error(RedisOp::Set);
        return false;
    }
    let expires_ms = unix_millis(now).saturating_add(ttl_ms);
    let set = if entry.variants {
        redis::cmd("EVAL").arg(SET_MARKER).arg(1).arg(redis_key).arg(payload.as_ref()).arg(ttl_ms).clone()
    } else {
        redis::Cmd::pset_ex(redis_key, payload.as_ref(), ttl_ms)
    };
    let indexes: Vec<redis::Cmd> = PurgeTarget::of_entry(&entry.key, &entry.tags)
        .iter()
        .map(|target| {
            let index = format!("{prefix}v{}:idx:{}", super::entry::FORMAT_VERSION, target.index_name());
            redis::cmd("EVAL").arg(INDEX_ADD).arg(1).arg(index).arg(redis_key).arg(expires_ms).arg(unix_millis(now)).arg(ttl_ms + 1000).clone()
        })
        .collect();
    if !link.is_cluster() {
        // One round trip: the entry first, its indexes after it.
        let mut all = vec![set];
        all.extend(indexes);
        return match guarded(health, link, deadline, exec(link, &all)).await {
            Some(Ok(_)) => true,
            // The pipeline's first reply tells whether the entry landed; an index error
            // alone fails the whole exec, so check the entry.
            failed => {
                let mut conn = link.conn();
                let landed = matches!(link.call(deadline, redis::cmd("EXISTS").arg(redis_key).query_async::<i64>(&mut conn)).await, Some(Ok(1)));
                match failed {
                    None if !landed => metrics.write_dropped(WriteDropped::Deadline),
                    _ => metrics.redis_error(RedisOp::Set),
                }
                landed
            }
        };
    }
    match guarded(health, link, deadline, set.query_async::<()>(&mut link.conn())).await {
        Some(Ok(())) => {}
        None => {
            metrics.write_dropped(WriteDropped::Deadline);
            return false;
        }
        Some(Err(_)) => {
            metrics.redis_error(RedisOp::Set);
            return false;
        }
    }
    if !matches!(guarded(health, link, deadline, exec(link, &indexes)).await, Some(Ok(_))) {
        metrics.redis_error(RedisOp::Set);
    }
    true
}

/// What a pending write holds: the entry, and its encoding.
fn queued_bytes(entry: &Entry) -> usize {
    usize::try_from(entry.weight()).unwrap_or(usize::MAX).saturating_mul(2)
}

/// Whole milliseconds of `d`, at least 1 (a Redis `PX` of 0 is an error).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn unix_millis(time: SystemTime) -> u64 {
    u64::try_from(time.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// Runs `commands` in one pipeline; in a cluster (where a pipeline must stay in one
/// slot) as concurrent single commands. Fails if any fails.
async fn exec(link: &Link, commands: &[redis::Cmd]) -> redis::RedisResult<Vec<redis::Value>> {
    if !link.is_cluster() {
        let mut pipe = redis::pipe();
        for cmd in commands {
            pipe.add_command(cmd.clone());
        }
        return pipe.query_async(&mut link.conn()).await;
    }
    let calls = commands.iter().map(|cmd| async move { cmd.query_async::<redis::Value>(&mut link.conn()).await });
    futures_util::future::join_all(calls).await.into_iter().collect()
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
        // Not connected yet (a cluster connection being made): neither sick nor well.
        Some(Err(e)) if link::is_not_ready(e) => {}
        // A server that cannot serve (read-only after a failover, loading, cluster down)
        // is sick, and the connection may be stuck on the wrong node: start afresh.
        Some(Err(e)) if link::is_sick_server(e) => {
            link.reset();
            health.failed(link);
        }
        // Any other error reply (wrong type, script error) is not a sick Redis.
        Some(Err(e)) if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()) => health.succeeded(),
        _ => health.failed(link),
    }
    result
}
