//! The in-process tier (L1): a moka cache bounded by the real size of its entries, each
//! entry expiring when its freshness and stale windows have run out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;

use crate::clock::Clock;

use super::entry::Entry;
use super::key::CacheKey;
use super::purge::PurgeTarget;
use super::sweep::{Pending, Verdict};

/// What L1 holds under a primary key: one response, or the variants of a URL whose
/// responses vary. Keeping a URL's variants together means a purge of the URL drops
/// them all with one removal, and their number is bounded where they are held.
#[derive(Debug, Clone)]
pub enum Slot {
    Entry(Arc<Entry>),
    Variants(Arc<Variants>),
}

/// A URL's variants held here.
#[derive(Debug)]
pub struct Variants {
    /// Names the request headers that select a variant (in its `Vary` header).
    pub marker: Arc<Entry>,
    /// Those names, parsed once here rather than on every hit.
    pub names: Arc<[http::HeaderName]>,
    /// By variant key hash; at most the pool's `max_variants`.
    pub entries: Vec<(u128, Arc<Entry>)>,
}

impl Variants {
    /// The variant stored under `key`, if held here.
    pub fn find(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.entries.iter().find(|(hash, entry)| *hash == key.hash && entry.key == key.text).map(|(_, e)| e.clone())
    }
}

impl Slot {
    fn weight(&self) -> u32 {
        match self {
            Slot::Entry(entry) => entry.weight(),
            Slot::Variants(v) => v.entries.iter().fold(v.marker.weight(), |sum, (_, e)| sum.saturating_add(e.weight())),
        }
    }

    fn keep_for(&self, now: SystemTime) -> Duration {
        match self {
            Slot::Entry(entry) => entry.keep_for(now),
            Slot::Variants(v) => v.entries.iter().map(|(_, e)| e.keep_for(now)).max().unwrap_or_default(),
        }
    }

    /// This slot with the entries `purged` picks marked soft-purged (the others shared).
    fn soft_purged_where(&self, purged: impl Fn(&Entry) -> bool) -> Slot {
        let mark = |e: &Arc<Entry>| if !e.invalidated && purged(e) { Arc::new(e.soft_purged()) } else { e.clone() };
        match self {
            Slot::Entry(entry) => Slot::Entry(mark(entry)),
            Slot::Variants(v) => Slot::Variants(Arc::new(Variants {
                marker: v.marker.clone(),
                names: v.names.clone(),
                entries: v.entries.iter().map(|(h, e)| (*h, mark(e))).collect(),
            })),
        }
    }

    /// When the slot was last served (a URL's variants go by their marker).
    fn last_used(&self) -> &super::entry::LastUsed {
        match self {
            Slot::Entry(entry) => &entry.last_used,
            Slot::Variants(v) => &v.marker.last_used,
        }
    }

    fn entries(&self) -> impl Iterator<Item = &Arc<Entry>> {
        let (one, many) = match self {
            Slot::Entry(entry) => (Some(entry), None),
            Slot::Variants(v) => (None, Some(v.entries.iter().map(|(_, e)| e))),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    /// Whether `target` covers anything stored here before `before` (a tag on one
    /// variant drops the URL's variants together: more misses, never a stale copy).
    fn purged_by(&self, target: &PurgeTarget, before: SystemTime) -> bool {
        self.entries().any(|e| e.response_time <= before && target.matches(&e.key, &e.tags))
    }
}

/// Per-entry expiry: keep an entry as long as it may still be served (fresh or stale)
/// or revalidated, but never longer than a year, however long the origin asked for.
struct KeepWhileUseful {
    clock: Clock,
}

const LONGEST_KEEP: Duration = Duration::from_secs(365 * 24 * 3600);

impl Expiry<u128, Held> for KeepWhileUseful {
    fn expire_after_create(&self, _key: &u128, held: &Held, _created_at: Instant) -> Option<Duration> {
        Some(held.slot.keep_for(self.clock.now()).min(LONGEST_KEEP))
    }

    fn expire_after_update(&self, _key: &u128, held: &Held, _updated_at: Instant, _until_expiry: Option<Duration>) -> Option<Duration> {
        Some(held.slot.keep_for(self.clock.now()).min(LONGEST_KEEP))
    }
}

/// A slot, and the link generation it was stored or last confirmed in: after a gap in
/// the pool's event link (invalidations may have been missed), a slot of an older
/// generation is checked against Redis before it is reused.
#[derive(Debug, Clone)]
struct Held {
    slot: Slot,
    generation: u64,
}

/// A running sweep: should its task end without finishing (a panic), the next purge
/// registered starts another (reads go on checking the pending purges meanwhile).
struct Sweeping {
    pending: Arc<Pending>,
    done: bool,
}

impl Drop for Sweeping {
    fn drop(&mut self) {
        if !self.done {
            self.pending.abandoned();
        }
    }
}

/// Whether two slots are the same stored values (not merely equal ones).
fn same(a: &Slot, b: &Slot) -> bool {
    match (a, b) {
        (Slot::Entry(a), Slot::Entry(b)) => Arc::ptr_eq(a, b),
        (Slot::Variants(a), Slot::Variants(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// How a slot kept through a link gap stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Stored or confirmed since the last gap.
    Confirmed,
    /// Kept through a gap; `predates_restart` when Redis has since come back empty.
    Unconfirmed { predates_restart: bool },
}

/// The L1 tier of one pool, keyed by primary key hash. Cloning shares the same cache.
#[derive(Clone)]
pub struct LocalTier {
    cache: Cache<u128, Held>,
    clock: Clock,
    /// The link generation: one more after every (re)subscription of the event link.
    generation: Arc<AtomicU64>,
    /// The generation in which Redis was found to have lost its data (a new data epoch).
    restarted: Arc<AtomicU64>,
    /// No copy from before the last gap is left (so counting them needs no scan).
    all_confirmed: Arc<AtomicBool>,
    /// Path and tag purges not yet swept through (checked by every read meanwhile).
    pending: Arc<Pending>,
}

impl LocalTier {
    /// An L1 of `max_bytes` whose entries are kept by `clock`'s time.
    pub fn new(max_bytes: u64, clock: Clock) -> LocalTier {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &u128, held: &Held| held.slot.weight())
            .expire_after(KeepWhileUseful { clock: clock.clone() })
            .build();
        LocalTier {
            cache,
            clock,
            generation: Arc::default(),
            restarted: Arc::default(),
            all_confirmed: Arc::new(AtomicBool::new(true)),
            pending: Arc::default(),
        }
    }

    /// What is held under `hash`, with the pending path and tag purges applied to it
    /// first (the one check a read pays while a sweep runs).
    async fn read(&self, hash: u128) -> Option<Held> {
        let held = self.cache.get(&hash).await?;
        if self.pending.is_empty() {
            return Some(held);
        }
        self.apply_pending(hash, held).await
    }

    /// Applies the pending purges to `held`, stored under `hash`; what is left of it.
    async fn apply_pending(&self, hash: u128, held: Held) -> Option<Held> {
        match self.pending.verdict(held.slot.entries()) {
            Verdict::Keep => Some(held),
            Verdict::Remove => {
                self.replace(hash, &held.slot, None).await;
                None
            }
            Verdict::Mark => {
                let marked = held.slot.soft_purged_where(|e| self.pending.marks(e));
                self.replace(hash, &held.slot, Some(marked.clone())).await;
                Some(Held { slot: marked, generation: held.generation })
            }
        }
    }

    /// Replaces `seen` (if it is still what is held) by `slot`, keeping its standing;
    /// `None` removes it.
    async fn replace(&self, hash: u128, seen: &Slot, slot: Option<Slot>) {
        self.replace_as(hash, seen, slot, None).await;
    }

    /// Replaces `seen` (if it is still what is held) by `slot`, in `generation` or, when
    /// none is given, in the one it was held in; `None` removes it.
    async fn replace_as(&self, hash: u128, seen: &Slot, slot: Option<Slot>, generation: Option<u64>) {
        self.cache
            .entry(hash)
            .and_compute_with(|current| {
                let op = match (current.as_ref().map(|c| c.value()), slot) {
                    (Some(held), Some(slot)) if same(&held.slot, seen) => {
                        moka::ops::compute::Op::Put(Held { slot, generation: generation.unwrap_or(held.generation) })
                    }
                    (Some(held), None) if same(&held.slot, seen) => moka::ops::compute::Op::Remove,
                    _ => moka::ops::compute::Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }

    /// Sweeps the pending purges through L1 until none is left: one task per L1, in
    /// chunks, yielding between them. While purges keep arriving, it rests as long as
    /// its last pass took (at most a second) before the next, so a steady stream of
    /// purges over a large L1 takes at most half a core.
    fn start_sweep(&self) {
        let tier = self.clone();
        tokio::spawn(async move {
            let mut sweep = Sweeping { pending: tier.pending.clone(), done: false };
            loop {
                tier.pending.begin_pass();
                let began = std::time::Instant::now();
                let mut seen = 0u32;
                for (hash, held) in tier.cache.iter() {
                    if tier.pending.verdict(held.slot.entries()) != Verdict::Keep {
                        tier.apply_pending(*hash, held).await;
                    }
                    seen += 1;
                    if seen.is_multiple_of(64) {
                        tokio::task::yield_now().await;
                    }
                }
                if tier.pending.end_pass() {
                    sweep.done = true;
                    return;
                }
                tokio::time::sleep(began.elapsed().min(Duration::from_secs(1))).await;
            }
        });
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// What is held under a primary key.
    pub async fn get_slot(&self, primary_hash: u128) -> Option<Slot> {
        self.read(primary_hash).await.map(|held| held.slot)
    }

    /// What is held under a primary key, with the pending purges applied to the copy
    /// returned but not to L1, and whether it was stored or confirmed since the last gap
    /// in the event link: a look that changes nothing (for inspection).
    pub async fn peek(&self, primary_hash: u128) -> Option<(Slot, bool)> {
        let held = self.cache.get(&primary_hash).await?;
        let slot = match self.pending.verdict(held.slot.entries()) {
            Verdict::Keep => held.slot,
            Verdict::Remove => return None,
            Verdict::Mark => held.slot.soft_purged_where(|e| self.pending.marks(e)),
        };
        Some((slot, held.generation == self.generation()))
    }

    /// What is held under a primary key, and whether it must be checked against Redis.
    pub async fn get_standing(&self, primary_hash: u128) -> Option<(Slot, Standing)> {
        let held = self.read(primary_hash).await?;
        held.slot.last_used().touch(self.clock.now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()));
        let now = self.generation();
        let standing = if held.generation == now {
            Standing::Confirmed
        } else {
            // Trusted only until the next gap: a copy missing after that one may have
            // been purged meanwhile.
            let restarted = self.restarted.load(Ordering::Acquire);
            Standing::Unconfirmed { predates_restart: held.generation < restarted && restarted == now }
        };
        Some((held.slot, standing))
    }

    /// Fills this (new, empty) L1 with what `old` holds, as far as it fits in this one's
    /// `max_bytes`, the most recently used first, leaving out entries over
    /// `max_object_bytes`. Entries are shared, not copied, and keep their standing; with
    /// `unconfirmed` all of them are checked against Redis before their next use (a
    /// new event subscription may have missed what the old one heard). Returns how many
    /// slots were kept.
    pub async fn take_over(&self, old: &LocalTier, max_bytes: u64, max_object_bytes: usize, unconfirmed: bool) -> usize {
        self.generation.store(old.generation(), Ordering::Release);
        self.restarted.store(old.restarted.load(Ordering::Acquire), Ordering::Release);
        self.all_confirmed.store(old.all_confirmed.load(Ordering::Acquire), Ordering::Release);
        old.cache.run_pending_tasks().await;
        let mut held: Vec<(u128, Held)> = old.cache.iter().map(|(hash, held)| (*hash, held)).collect();
        held.sort_unstable_by_key(|(_, h)| std::cmp::Reverse(h.slot.last_used().get()));
        let mut room = max_bytes;
        let mut kept = 0;
        for (hash, h) in held {
            // A path or tag purge the old L1 has not swept yet applies first.
            let Some(h) = (if old.pending.is_empty() { Some(h) } else { old.apply_pending(hash, h).await }) else { continue };
            let weight = u64::from(h.slot.weight());
            if weight > room || h.slot.entries().any(|e| e.body.len() > max_object_bytes) {
                continue;
            }
            room -= weight;
            self.cache.insert(hash, h).await;
            kept += 1;
            if kept % 1024 == 0 {
                // A large L1 must not hold a worker for the whole move.
                tokio::task::yield_now().await;
            }
        }
        if unconfirmed {
            self.begin_generation(false);
        }
        self.cache.run_pending_tasks().await;
        kept
    }

    /// The event link is (re)subscribed: everything held now may have missed
    /// invalidations and is checked before reuse; `restarted` when Redis came back with
    /// a new data epoch (it lost its data).
    pub fn begin_generation(&self, restarted: bool) {
        self.all_confirmed.store(false, Ordering::Release);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if restarted {
            self.restarted.store(generation, Ordering::Release);
        }
    }

    /// Replaces `seen` (if it is still what is held) by `slot`, confirmed; `None`
    /// removes it.
    async fn settle(&self, hash: u128, seen: &Slot, slot: Option<Slot>) {
        self.replace_as(hash, seen, slot, Some(self.generation())).await;
    }

    /// `seen`, checked against Redis, is current: kept as confirmed. Of a URL's variants
    /// only the one checked is kept (the others are read from Redis again when asked for).
    pub async fn confirm(&self, hash: u128, seen: &Slot, variant: Option<&CacheKey>) {
        let slot = match (seen, variant) {
            (Slot::Variants(v), Some(key)) => match v.find(key) {
                Some(entry) => Slot::Variants(Arc::new(Variants { marker: v.marker.clone(), names: v.names.clone(), entries: vec![(key.hash, entry)] })),
                None => return,
            },
            _ => seen.clone(),
        };
        self.settle(hash, seen, Some(slot)).await;
    }

    /// `seen` is outdated (purged, replaced, expired or evicted in Redis): dropped.
    pub async fn forget(&self, hash: u128, seen: &Slot) {
        self.settle(hash, seen, None).await;
    }

    /// `seen` outlived a Redis that came back empty: kept as soft-purged (served within
    /// its stale windows while one refresh runs), confirmed. Returns what is held now.
    pub async fn keep_as_soft_purged(&self, hash: u128, seen: &Slot) -> Slot {
        let marked = seen.soft_purged_where(|_| true);
        self.settle(hash, seen, Some(marked.clone())).await;
        marked
    }

    /// The (non-varying) entry stored under a primary `key`, if any (a hash collision is
    /// a miss).
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        match self.read(key.hash).await?.slot {
            Slot::Entry(entry) if entry.key == key.text => Some(entry),
            _ => None,
        }
    }

    /// Stores a response that does not vary under its primary key.
    pub async fn insert(&self, key: &CacheKey, entry: Arc<Entry>) {
        self.cache.insert(key.hash, Held { slot: Slot::Entry(entry), generation: self.generation() }).await;
    }

    /// Stores a variant with its marker. A URL holds at most `max` variants at once: a
    /// new one beyond that takes the place of the one stored longest ago (so a flood of
    /// rare variants cannot keep the common ones out for long). A marker naming other
    /// headers (the origin changed its `Vary`) starts afresh.
    pub async fn insert_variant(&self, primary: &CacheKey, marker: Arc<Entry>, key: &CacheKey, entry: Arc<Entry>, max: usize) {
        let now = self.clock.now();
        let generation = self.generation();
        self.cache
            .entry(primary.hash)
            .and_compute_with(|current| {
                // Variants kept through a gap, not yet checked, are not joined: a new
                // variant starts the URL's slot afresh, confirmed (the others are read from
                // Redis again when asked for).
                let current = current.as_ref().filter(|c| c.value().generation == generation).map(|c| &c.value().slot);
                let same_names =
                    |v: &Variants| v.marker.key == marker.key && v.marker.headers.get(http::header::VARY) == marker.headers.get(http::header::VARY);
                let mut entries: Vec<(u128, Arc<Entry>)> = match current {
                    // Variants a pending purge covers are left out (never merged back).
                    Some(Slot::Variants(v)) if same_names(v) => v
                        .entries
                        .iter()
                        .filter(|(h, e)| *h != key.hash && !e.keep_for(now).is_zero())
                        .filter(|(_, e)| self.pending.is_empty() || self.pending.verdict(std::iter::once(e)) == Verdict::Keep)
                        .cloned()
                        .collect(),
                    _ => Vec::new(),
                };
                while entries.len() >= max.max(1) {
                    let oldest = entries.iter().enumerate().min_by_key(|(_, (_, e))| e.response_time).map_or(0, |(i, _)| i);
                    entries.swap_remove(oldest);
                }
                entries.push((key.hash, entry.clone()));
                let names = match current {
                    Some(Slot::Variants(v)) if same_names(v) => v.names.clone(),
                    _ => super::marker_names(&marker).into(),
                };
                let slot = Slot::Variants(Arc::new(Variants { marker: marker.clone(), names, entries }));
                std::future::ready(moka::ops::compute::Op::Put(Held { slot, generation }))
            })
            .await;
    }

    /// Copies kept through the last gap and not checked since (`bulwark_l1_unconfirmed`):
    /// a scan of L1, made only while some may be left.
    pub fn unconfirmed(&self) -> u64 {
        if self.all_confirmed.load(Ordering::Acquire) {
            return 0;
        }
        let now = self.generation();
        let left = self.cache.iter().filter(|(_, held)| held.generation != now).count() as u64;
        if left == 0 && self.generation() == now {
            self.all_confirmed.store(true, Ordering::Release);
        }
        left
    }

    /// Bytes held, by the weigher's count (updated by moka's housekeeping).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Purges the entries `target` covers that were stored before `before`: removed, or
    /// for a soft purge replaced by a stale-marked copy. A URL's slots (one per
    /// `Accept-Encoding` group, each holding all its variants) are looked up directly;
    /// path and tag purges are registered, applied by every read at once and swept
    /// through L1 in the background (see [`super::sweep`]).
    /// Returns how many slots it touched (registered purges count as 0 here).
    pub async fn purge(&self, target: &PurgeTarget, soft: bool, before: SystemTime) -> usize {
        if let Some(hashes) = target.variant_hashes() {
            let mut touched = 0;
            for hash in hashes {
                let Some(slot) = self.cache.get(&hash).await.map(|held| held.slot).filter(|slot| slot.purged_by(target, before)) else { continue };
                touched += 1;
                self.purge_one(hash, &slot, soft, target, before).await;
            }
            return touched;
        }
        if self.pending.register(target, soft, before) {
            self.start_sweep();
        }
        0
    }

    async fn purge_one(&self, hash: u128, seen: &Slot, soft: bool, target: &PurgeTarget, before: SystemTime) {
        if !soft {
            self.cache.invalidate(&hash).await;
            return;
        }
        // Mark only the copy we saw: a newer one stored meanwhile stays fresh.
        let marked = seen.soft_purged_where(|e| e.response_time <= before && target.matches(&e.key, &e.tags));
        self.replace(hash, seen, Some(marked)).await;
    }

    /// Drops the copy another replica replaced with a newer one: under `hash`, or for a
    /// URL whose responses vary only its `variant`, if older than `response_time`.
    pub async fn drop_if_older(&self, hash: u128, variant: Option<u128>, response_time: SystemTime) {
        let Some(slot) = self.cache.get(&hash).await.map(|held| held.slot) else { return };
        match (&slot, variant) {
            (Slot::Variants(v), Some(variant)) => {
                if !v.entries.iter().any(|(h, e)| *h == variant && e.response_time < response_time) {
                    return;
                }
                let seen = v.clone();
                self.cache
                    .entry(hash)
                    .and_compute_with(|current| {
                        let op = match current.as_ref().map(|c| c.value()) {
                            Some(Held { slot: Slot::Variants(now), generation }) if Arc::ptr_eq(now, &seen) => {
                                let entries: Vec<(u128, Arc<Entry>)> = now.entries.iter().filter(|(h, _)| *h != variant).cloned().collect();
                                if entries.is_empty() {
                                    moka::ops::compute::Op::Remove
                                } else {
                                    let slot = Slot::Variants(Arc::new(Variants { marker: now.marker.clone(), names: now.names.clone(), entries }));
                                    moka::ops::compute::Op::Put(Held { slot, generation: *generation })
                                }
                            }
                            _ => moka::ops::compute::Op::Nop,
                        };
                        std::future::ready(op)
                    })
                    .await;
            }
            _ => {
                if slot.entries().any(|e| e.response_time < response_time) {
                    self.cache.invalidate(&hash).await;
                }
            }
        }
    }

    /// Drops everything (after missing invalidation messages).
    pub fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// Runs moka's pending housekeeping, so that sizes and counts are current.
    pub async fn sync(&self) {
        self.cache.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(n: usize, tag: &str, at: SystemTime) -> (CacheKey, Arc<Entry>) {
        let key = CacheKey::new("http", "shop.example", &format!("/p/{n}"), None, crate::encodings::Encodings::IDENTITY);
        let entry = Entry { key: key.text.clone(), tags: vec![tag.to_owned()], response_time: at, ..crate::cache::entry::tests::sample() };
        (key, Arc::new(entry))
    }

    #[tokio::test]
    async fn a_reload_never_carries_over_an_entry_a_pending_tag_purge_covers() {
        let clock = Clock::system();
        let old = LocalTier::new(64 << 20, clock.clone());
        let stored = clock.now();
        let mut keys = Vec::new();
        for n in 0..2_000 {
            let (key, entry) = tagged(n, if n % 2 == 0 { "gone" } else { "kept" }, stored);
            old.insert(&key, entry).await;
            keys.push(key);
        }
        // Registered, its sweep not yet run (this runtime runs one task at a time).
        old.purge(&PurgeTarget::tag("gone").expect("tag"), false, stored + Duration::from_secs(1)).await;
        let new = LocalTier::new(64 << 20, clock);
        new.take_over(&old, 64 << 20, 1 << 20, false).await;
        for (n, key) in keys.iter().enumerate() {
            assert_eq!(new.get(key).await.is_some(), n % 2 == 1, "/p/{n}");
        }
    }
}
