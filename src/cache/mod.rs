//! The cache: keys and variant keys ([`key`]), purge targets ([`purge`]), the stored entry and its binary format
//! ([`entry`]), the RFC 9111 storage policy ([`policy`]), revalidation and the client's
//! conditionals ([`revalidate`]), byte ranges of stored bodies ([`range`]), the in-process tier ([`local`]), the Redis tier
//! ([`shared`]), and the pool that puts both tiers together ([`Pool`]).

pub mod coalesce;
pub mod date;
pub mod entry;
mod hit_for_miss;
pub mod key;
pub mod lease;
pub mod local;
pub mod policy;
pub mod purge;
pub mod range;
pub mod revalidate;
pub mod shared;
mod sweep;

use std::sync::Arc;

pub use crate::encodings::Encodings;
pub use entry::Entry;
pub use key::CacheKey;
pub use local::Slot;
pub use purge::PurgeTarget;

use http::{HeaderMap, HeaderName};

use crate::clock::Clock;
use crate::config::PoolConfig;
use crate::metrics::PoolMetrics;
use crate::outcome::Tier;
use crate::trace::RequestTrace;
use local::{LocalTier, Standing};
use shared::{Confirmation, SharedTier, SharedTierError};

/// What a purge touched in one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeCount {
    pub l1: usize,
    pub l2: usize,
    /// Whether it reached Redis and was broadcast to every replica.
    pub all_replicas: bool,
    /// What kept the purge from completing, if anything did.
    pub error: Option<&'static str>,
}

/// A stored entry found by a lookup, and the tier it came from.
#[derive(Debug, Clone)]
pub struct Found {
    pub entry: Arc<Entry>,
    pub tier: Tier,
}

/// What a lookup found, and the request's variant key when the URL's responses vary
/// (`None`: the primary key): the key a fetch coalesces under.
#[derive(Debug)]
pub struct Lookup {
    pub found: Option<Found>,
    pub key: Option<CacheKey>,
}

/// An entry read from L2, the key it is stored under, and its variants marker.
pub struct SharedFound {
    pub entry: Entry,
    pub key: CacheKey,
    pub marker: Option<Arc<Entry>>,
}

/// A response to store: under `key`, with the variants marker for its primary key when
/// it varies.
#[derive(Debug, Clone)]
pub struct Stored {
    pub key: CacheKey,
    pub entry: Arc<Entry>,
    pub marker: Option<Arc<Entry>>,
}

/// What [`Pool::inspect`] found for one request.
#[derive(Debug)]
pub struct Inspected {
    /// The key the request's response is stored under (its variant's, when it varies).
    pub key: CacheKey,
    /// The request headers that select a variant, when the URL's responses vary.
    pub names: Vec<HeaderName>,
    /// L1's copy, and whether it was stored or confirmed since the last event-link gap.
    pub l1: Option<(Arc<Entry>, bool)>,
    /// Every variant of the URL held in L1.
    pub l1_variants: Vec<Arc<Entry>>,
    /// What Redis holds (`None`: the pool has no Redis), or why it could not say.
    pub l2: Option<Result<shared::Peeked, String>>,
    /// A fill of the key is in progress on this replica.
    pub filling: bool,
}

/// The header names a variants marker lists.
pub fn marker_names(marker: &Entry) -> Vec<HeaderName> {
    match key::Vary::parse(&marker.headers) {
        key::Vary::Names(names) => names,
        _ => Vec::new(),
    }
}

/// One cache pool: its own L1, its own Redis connection, its own metrics.
pub struct Pool {
    pub config: PoolConfig,
    pub l1: LocalTier,
    pub l2: Option<SharedTier>,
    pub metrics: Arc<PoolMetrics>,
    /// Flights in progress for this pool's keys (reached through the flight methods).
    coalescer: Arc<coalesce::Coalescer>,
    /// Purges applied to this pool, here or told by other replicas.
    pub purges: Arc<purge::PurgeLog>,
    /// The wall time this pool's freshness decisions, `Age` and tier lifetimes go by.
    pub clock: Clock,
    /// The pool that replaced this one on a reload (and took over its L1): purges still
    /// made through this one (by a request or purge that began before the reload) reach
    /// its L1 too.
    successor: std::sync::OnceLock<std::sync::Weak<Pool>>,
}

impl Pool {
    pub fn new(config: PoolConfig, metrics: PoolMetrics, clock: Clock) -> Result<Pool, SharedTierError> {
        Pool::with_purge_log(config, metrics, clock, Arc::default())
    }

    /// A pool that replaces `previous` on a reload: it shares its purge log, and
    /// [`Pool::take_over`] then moves `previous`'s L1 contents into it.
    pub fn succeeding(previous: &Pool, config: PoolConfig, metrics: PoolMetrics, clock: Clock) -> Result<Pool, SharedTierError> {
        Pool::with_purge_log(config, metrics, clock, previous.purges.clone())
    }

    /// Whether a pool of `config` can keep what a pool of `self.config` holds: the same
    /// pool, Redis endpoint and key prefix (sizes, freshness and deadlines may differ).
    pub fn same_store(&self, config: &PoolConfig) -> bool {
        let endpoint = |c: &PoolConfig| c.shared.as_ref().map(|s| s.endpoint.clone());
        self.config.name == config.name && self.config.key_prefix == config.key_prefix && endpoint(&self.config) == endpoint(config)
    }

    /// Purges this pool's L1 and those of the pools that replaced it since.
    async fn purge_l1(&self, target: &PurgeTarget, soft: bool) -> usize {
        let mut touched = self.l1.purge(target, soft, self.clock.now()).await;
        let mut next = self.successor.get().and_then(std::sync::Weak::upgrade);
        while let Some(pool) = next {
            touched += pool.l1.purge(target, soft, pool.clock.now()).await;
            next = pool.successor.get().and_then(std::sync::Weak::upgrade);
        }
        touched
    }

    /// Moves `previous`'s L1 contents into this pool's (new, empty) L1: see
    /// [`LocalTier::take_over`]. With Redis, every entry moved is confirmed against it
    /// before its next use.
    pub async fn take_over(self: &Arc<Self>, previous: &Pool) -> usize {
        let _ = previous.successor.set(Arc::downgrade(self));
        self.l1.take_over(&previous.l1, self.config.l1_max_bytes, self.config.max_object_bytes, self.l2.is_some()).await
    }

    /// Applies to L1 the purges recorded since `epoch` (those that reached the pool this
    /// one replaced while its entries were being moved), or drops all of L1 when they
    /// are no longer all remembered.
    pub async fn apply_purges_since(&self, epoch: u64) {
        let now = self.clock.now();
        match self.purges.since(epoch) {
            Some(targets) => {
                for target in targets {
                    self.l1.purge(&target, false, now).await;
                }
            }
            None => self.l1.clear(),
        }
    }

    fn with_purge_log(config: PoolConfig, metrics: PoolMetrics, clock: Clock, purges: Arc<purge::PurgeLog>) -> Result<Pool, SharedTierError> {
        let metrics = Arc::new(metrics);
        let l2 = match &config.shared {
            Some(shared) => Some(SharedTier::new(
                &config.name,
                shared,
                config.key_prefix.clone(),
                config.max_object_bytes,
                config.redis_write_queue_bytes,
                metrics.clone(),
                clock.clone(),
            )?),
            None => None,
        };
        Ok(Pool {
            l1: LocalTier::new(config.l1_max_bytes, clock.clone()),
            l2,
            metrics,
            coalescer: coalesce::Coalescer::new(purges.clone()),
            purges,
            config,
            clock,
            successor: std::sync::OnceLock::new(),
        })
    }

    /// L1, then L2 (all of it within one `redis_timeout`); an L2 hit is promoted to L1.
    /// A stale L1 entry is checked against L2 too: another replica may have refreshed it.
    ///
    /// When the URL's responses vary (a variants marker under the primary key, or the
    /// route's `key_headers`), the request's variant is looked up: its key is returned
    /// even on a miss, so a fetch coalesces with requests for the same variant only.
    /// With a `trace`, the L1 and L2 parts are recorded as its phases.
    pub async fn lookup(&self, primary: &CacheKey, headers: &HeaderMap, key_headers: &[HeaderName], trace: Option<&RequestTrace>) -> Lookup {
        let l1_start = trace.map(|_| std::time::SystemTime::now());
        let held = self.l1.get_standing(primary.hash).await;
        let (slot, standing) = match held {
            Some((slot, standing)) => (Some(slot), standing),
            None => (None, Standing::Confirmed),
        };
        let (mut local, marker, key) = match slot.clone() {
            Some(Slot::Entry(entry)) if entry.key == primary.text && key_headers.is_empty() => (Some(entry), None, None),
            Some(Slot::Variants(v)) if v.marker.key == primary.text => {
                let key = if key_headers.is_empty() {
                    primary.variant(&v.names, headers)
                } else {
                    primary.variant(&key::merge_names(&v.names, key_headers), headers)
                };
                (v.find(&key), Some(v.marker.clone()), Some(key))
            }
            // Nothing here yet: the route's key headers are the best guess of the variant.
            _ if !key_headers.is_empty() => (None, None, Some(primary.variant(&key::merge_names(&[], key_headers), headers))),
            _ => (None, None, None),
        };
        if let (Some(entry), Some(slot), Standing::Unconfirmed { predates_restart }, Some(l2)) = (&local, &slot, standing, &self.l2) {
            // Kept through a gap in the event link: checked against Redis first.
            match l2.confirm(key.as_ref().unwrap_or(primary), entry).await {
                Confirmation::Same => self.l1.confirm(primary.hash, slot, key.as_ref()).await,
                // No answer: served as it would be without a gap.
                Confirmation::Unknown => {}
                // Redis came back empty: kept, as soft-purged (stale while one refresh runs).
                Confirmation::Absent if predates_restart => {
                    self.metrics.post_gap_refreshes.increment(1);
                    let kept = self.l1.keep_as_soft_purged(primary.hash, slot).await;
                    let entry = match (&kept, &key) {
                        (Slot::Variants(v), Some(key)) => v.find(key),
                        (Slot::Entry(entry), None) => Some(entry.clone()),
                        _ => None,
                    };
                    return Lookup { found: entry.map(|entry| Found { entry, tier: Tier::L1 }), key };
                }
                // Purged, replaced, expired or evicted while the link was down.
                Confirmation::Absent | Confirmation::Differs => {
                    self.l1.forget(primary.hash, slot).await;
                    local = None;
                }
            }
        }
        let now = self.clock.now();
        let l1_end = trace.map(|_| std::time::SystemTime::now());
        if let (Some(trace), Some(start), Some(end)) = (trace, l1_start, l1_end) {
            trace.phase("l1", start, end, vec![opentelemetry::KeyValue::new("bulwark.found", local.is_some())]);
        }
        if let Some(entry) = &local
            && (entry.is_fresh(now) || self.l2.is_none())
        {
            return Lookup { found: Some(Found { entry: entry.clone(), tier: Tier::L1 }), key };
        }
        let shared = self.lookup_shared(primary, headers, key_headers, key.clone().zip(marker), false).await;
        if let (Some(trace), Some(start), true) = (trace, l1_end, self.l2.is_some()) {
            trace.phase("l2", start, std::time::SystemTime::now(), vec![opentelemetry::KeyValue::new("bulwark.found", shared.is_some())]);
        }
        match (local, shared) {
            (Some(local), Some(shared)) if shared.entry.response_time <= local.response_time => {
                Lookup { found: Some(Found { entry: local, tier: Tier::L1 }), key: shared.marker.map(|_| shared.key) }
            }
            (_, Some(shared)) => {
                let entry = Arc::new(shared.entry);
                let variant = shared.marker.as_ref().map(|_| shared.key.clone());
                let stored = Stored { key: shared.key, entry: entry.clone(), marker: shared.marker };
                self.store_local(primary, &stored).await;
                Lookup { found: Some(Found { entry, tier: Tier::L2 }), key: variant }
            }
            (local, None) => Lookup { found: local.map(|entry| Found { entry, tier: Tier::L1 }), key },
        }
    }

    /// What each tier holds for a request with `headers` under `primary`, looked up as
    /// [`Pool::lookup`] would but changing nothing: no promotion to L1, no confirmation
    /// of copies kept through a gap, no metric, no breaker.
    pub async fn inspect(&self, primary: &CacheKey, headers: &HeaderMap, key_headers: &[HeaderName]) -> Inspected {
        let variant_of = |names: &[HeaderName]| primary.variant(&key::merge_names(names, key_headers), headers);
        let (mut key, mut names, mut l1, mut l1_variants) = (None, Vec::new(), None, Vec::new());
        match self.l1.peek(primary.hash).await {
            Some((Slot::Entry(entry), confirmed)) if entry.key == primary.text && key_headers.is_empty() => l1 = Some((entry, confirmed)),
            Some((Slot::Variants(v), confirmed)) if v.marker.key == primary.text => {
                let variant = variant_of(&v.names);
                l1 = v.find(&variant).map(|entry| (entry, confirmed));
                l1_variants = v.entries.iter().map(|(_, e)| e.clone()).collect();
                names = key::merge_names(&v.names, key_headers);
                key = Some(variant);
            }
            _ if !key_headers.is_empty() => {
                names = key_headers.to_vec();
                key = Some(variant_of(&[]));
            }
            _ => {}
        }
        let l2 = match &self.l2 {
            None => None,
            Some(l2) => Some(match l2.peek(primary).await {
                Ok(found) => match found.entry {
                    Some(marker) if marker.variants => {
                        names = key::merge_names(&marker_names(&marker), key_headers);
                        let variant = primary.variant(&names, headers);
                        let found = l2.peek(&variant).await;
                        key = Some(variant);
                        found.map(|found| shared::Peeked { entry: found.entry.filter(|e| !e.variants), leased: found.leased })
                    }
                    // A response stored before the route gained key_headers is not this request's.
                    Some(_) if !key_headers.is_empty() => Ok(shared::Peeked { entry: None, leased: found.leased }),
                    entry => Ok(shared::Peeked { entry, leased: found.leased }),
                },
                Err(err) => Err(err),
            }),
        };
        let key = key.unwrap_or_else(|| primary.clone());
        let filling = self.coalescer.is_filling(key.hash);
        Inspected { key, names, l1, l1_variants, l2, filling }
    }

    /// Whether L1 holds a copy for `key` (under `primary`) that arrived after `than`: a
    /// refresh that ended just as a request found the old copy and asked for another.
    pub async fn has_newer_local(&self, primary: &CacheKey, key: &CacheKey, than: std::time::SystemTime) -> bool {
        let entry = match self.l1.get_slot(primary.hash).await {
            Some(Slot::Entry(entry)) if entry.key == primary.text => Some(entry),
            Some(Slot::Variants(v)) if v.marker.key == primary.text => v.find(key),
            _ => None,
        };
        entry.is_some_and(|entry| entry.response_time > than)
    }

    /// The request's entry in L2 (variant-aware), all of it within one `redis_timeout`.
    /// `known` is the variant key and marker when L1 already knows the URL varies. A
    /// `recheck` right after a lookup does not report a corrupt entry a second time.
    pub async fn lookup_shared(
        &self,
        primary: &CacheKey,
        headers: &HeaderMap,
        key_headers: &[HeaderName],
        known: Option<(CacheKey, Arc<Entry>)>,
        recheck: bool,
    ) -> Option<SharedFound> {
        let l2 = self.l2.as_ref()?;
        let budget = l2.timeout();
        if let Some((key, marker)) = known {
            let entry = l2.get_within(&key, budget, !recheck).await.filter(|e| !e.variants)?;
            return Some(SharedFound { entry, key, marker: Some(marker) });
        }
        let start = std::time::Instant::now();
        let first = l2.get_within(primary, budget, !recheck).await?;
        if !first.variants {
            // A response stored before the route gained key_headers is not this request's.
            return key_headers.is_empty().then(|| SharedFound { entry: first, key: primary.clone(), marker: None });
        }
        let names = key::merge_names(&marker_names(&first), key_headers);
        let key = primary.variant(&names, headers);
        let left = l2.timeout().saturating_sub(start.elapsed());
        if left.is_zero() {
            return None;
        }
        let entry = l2.get_within(&key, left, !recheck).await.filter(|e| !e.variants)?;
        Some(SharedFound { entry, key, marker: Some(Arc::new(first)) })
    }
    /// Starts the pool's background work: the Redis event subscription, whose purges
    /// and replacements are applied to this pool's L1.
    pub fn start(&self) {
        if let Some(l2) = &self.l2 {
            let (l1, clock, purges) = (self.l1.clone(), self.clock.clone(), self.purges.clone());
            // The last data epoch Redis told, to know it lost its data when it changes.
            let last_epoch: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
            let handler: shared::NoticeHandler = Arc::new(move |notice| {
                if let shared::Notice::Resubscribed { data_epoch } = &notice {
                    // Here, not in the task below: before any request can store anew.
                    let mut last = last_epoch.lock().unwrap_or_else(|p| p.into_inner());
                    let restarted = matches!((&*last, data_epoch), (Some(old), Some(new)) if old != new);
                    if last.is_none() && !restarted {
                        tracing::info!("event subscription up");
                    } else {
                        tracing::info!(restarted, "event subscription up again: L1 kept, each copy confirmed against Redis before its next use");
                    }
                    l1.begin_generation(restarted);
                    if data_epoch.is_some() {
                        last.clone_from(data_epoch);
                    }
                    return;
                }
                if let shared::Notice::Purge { target, .. } = &notice {
                    purges.record(target);
                }
                let (l1, clock) = (l1.clone(), clock.clone());
                tokio::spawn(async move {
                    match notice {
                        // Entries stored here before the notice arrived, by this clock:
                        // the purging replica's clock may differ from ours.
                        shared::Notice::Purge { target, soft } => {
                            l1.purge(&target, soft, clock.now()).await;
                        }
                        shared::Notice::Replaced { hash, variant, response_time } => l1.drop_if_older(hash, variant, response_time).await,
                        shared::Notice::Resubscribed { .. } => {}
                    }
                });
            });
            l2.start_events(handler);
        }
    }

    /// Purges `target` in Redis, then here and (through the event channel) on every
    /// replica sharing this pool's Redis. When Redis fails part way nobody's L1 is
    /// touched and nothing is broadcast: an L1 copy dropped while Redis still holds the
    /// entry would be read back from Redis, and the purge would look done while the old
    /// copy lives on. A pool without Redis purges this L1 only.
    pub async fn purge(&self, target: &PurgeTarget, soft: bool) -> PurgeCount {
        self.purge_counting(target, soft, &std::sync::atomic::AtomicUsize::new(0)).await
    }

    /// [`Pool::purge`], counting in `progress` the Redis entries purged as it goes.
    pub async fn purge_counting(&self, target: &PurgeTarget, soft: bool, progress: &std::sync::atomic::AtomicUsize) -> PurgeCount {
        let Some(l2) = &self.l2 else {
            self.purges.record(target);
            let local = self.purge_l1(target, soft).await;
            return PurgeCount { l1: local, l2: 0, all_replicas: false, error: None };
        };
        let shared = match l2.purge(target, soft, progress).await {
            Ok(n) => n,
            Err(err) => return PurgeCount { l1: 0, l2: err.done, all_replicas: false, error: Some(err.why) },
        };
        // Everything stored here before now, Redis's part done: a copy read from Redis
        // while it ran goes too, and a fetch that started before now stores nothing.
        self.purges.record(target);
        let local = self.purge_l1(target, soft).await;
        let broadcast = l2.publish(&shared::Notice::Purge { target: target.clone(), soft }).await;
        let error = (!broadcast).then_some("purged in Redis and here, but the other replicas could not be told");
        PurgeCount { l1: local, l2: shared, all_replicas: broadcast, error }
    }

    /// Stores in L1 only (a copy read from L2, or a fill while the lease holder writes
    /// L2 itself). A URL keeps at most `max_variants` variants here.
    pub async fn store_local(&self, primary: &CacheKey, stored: &Stored) {
        match &stored.marker {
            None => self.l1.insert(&stored.key, stored.entry.clone()).await,
            Some(marker) => self.l1.insert_variant(primary, marker.clone(), &stored.key, stored.entry.clone(), self.config.max_variants).await,
        }
    }

    /// Stores in L1 now and in L2 in the background; with `replaces`, other replicas
    /// are told to drop their older copies once it is written.
    pub async fn store(&self, primary: &CacheKey, stored: &Stored, replaces: bool) {
        self.store_local(primary, stored).await;
        if let Some(l2) = &self.l2 {
            if let Some(marker) = &stored.marker {
                l2.put_in_background(primary, marker.clone(), None);
            }
            let announce = replaces.then(|| (primary.hash, stored.marker.as_ref().map(|_| stored.key.hash)));
            l2.put_in_background(&stored.key, stored.entry.clone(), announce);
        }
    }

    /// Writes to L2 now (a lease holder, whose peers read it right after). False when
    /// the entry (or its marker) was not written.
    pub async fn store_shared_now(&self, primary: &CacheKey, stored: &Stored) -> bool {
        let Some(l2) = &self.l2 else { return false };
        if let Some(marker) = &stored.marker
            && !l2.put(primary, marker).await
        {
            return false;
        }
        l2.put(&stored.key, &stored.entry).await
    }

    /// Tells the other replicas a newer copy of `stored` was stored (of its variant only,
    /// when the URL varies).
    pub async fn announce_replacement(&self, primary: &CacheKey, stored: &Stored) {
        if let Some(l2) = &self.l2 {
            let variant = stored.marker.as_ref().map(|_| stored.key.hash);
            l2.publish(&shared::Notice::Replaced { hash: primary.hash, variant, response_time: stored.entry.response_time }).await;
        }
    }

    /// Leads a new flight for `key`, or waits on the one in progress.
    pub fn join_flight(&self, key: &CacheKey) -> coalesce::Join {
        self.coalescer.join(key.hash, &key.text)
    }

    /// After waiting too long on flight `stale_id`: one caller leads a new flight, the
    /// others wait on it (see [`coalesce::Coalescer::take_over`]).
    pub fn take_over_flight(&self, key: &CacheKey, stale_id: u64) -> coalesce::Join {
        self.coalescer.take_over(key.hash, stale_id)
    }

    /// Leads a new flight only if none is in progress (a background refresh).
    pub fn try_lead_flight(&self, key: &CacheKey) -> Option<coalesce::FlightGuard> {
        self.coalescer.try_lead(key.hash)
    }

    /// What is remembered of `key`'s recent answers not stored: not storable by the
    /// response's word (hit-for-miss), or over `max_object_bytes` (its requests still
    /// share a fetch, without the cross-replica lease).
    pub fn remembered(&self, key: &CacheKey) -> Option<coalesce::Remembered> {
        self.coalescer.remembered(key.hash)
    }

    /// Whether `key` was lately over `max_object_bytes` ("stream, don't store").
    pub fn is_streamed(&self, key: &CacheKey) -> bool {
        self.remembered(key) == Some(coalesce::Remembered::Streamed)
    }

    pub fn forget_uncacheable(&self, key: &CacheKey) {
        self.coalescer.forget(key.hash);
    }

    /// Remembers why `key`'s answer was not stored, if the reason is the response's own:
    /// over `max_object_bytes` ("stream, don't store"), or anything else (hit-for-miss).
    pub fn remember_not_stored(&self, key: &CacheKey, reason: crate::outcome::NotStored) {
        if reason == crate::outcome::NotStored::TooLarge {
            self.coalescer.remember(key.hash, coalesce::Remembered::Streamed);
        } else {
            self.coalescer.remember(key.hash, coalesce::Remembered::Uncacheable);
        }
    }

    /// Refreshes the L1 size gauges (called before `/metrics` is rendered).
    pub async fn update_gauges(&self) {
        self.l1.sync().await;
        self.metrics.l1_bytes.set(self.l1.weighted_size() as f64);
        self.metrics.l1_entries.set(self.l1.entry_count() as f64);
        self.metrics.l1_unconfirmed.set(self.l1.unconfirmed() as f64);
    }
}
