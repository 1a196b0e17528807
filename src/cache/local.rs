//! The in-process tier (L1): a moka cache bounded by the real size of its entries, each
//! entry expiring when its freshness and stale windows have run out.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;

use super::entry::Entry;
use super::key::{CacheKey, PurgeTarget};

/// Per-entry expiry: keep an entry as long as it may still be served (fresh or stale),
/// but never longer than a year, however long the origin asked for.
struct KeepWhileUseful;

const LONGEST_KEEP: Duration = Duration::from_secs(365 * 24 * 3600);

impl Expiry<u128, Arc<Entry>> for KeepWhileUseful {
    fn expire_after_create(&self, _key: &u128, entry: &Arc<Entry>, _created_at: Instant) -> Option<Duration> {
        Some(entry.keep_for(SystemTime::now()).min(LONGEST_KEEP))
    }

    fn expire_after_update(
        &self,
        _key: &u128,
        entry: &Arc<Entry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.keep_for(SystemTime::now()).min(LONGEST_KEEP))
    }
}

/// The L1 tier of one pool. Cloning shares the same cache.
#[derive(Clone)]
pub struct LocalTier {
    cache: Cache<u128, Arc<Entry>>,
}

impl LocalTier {
    pub fn new(max_bytes: u64) -> LocalTier {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &u128, entry: &Arc<Entry>| entry.weight())
            .expire_after(KeepWhileUseful)
            .support_invalidation_closures()
            .build();
        LocalTier { cache }
    }

    /// The entry stored under `key`, if any (a hash collision is a miss).
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.cache.get(&key.hash).await.filter(|entry| entry.key == key.text)
    }

    pub async fn insert(&self, key: &CacheKey, entry: Arc<Entry>) {
        self.cache.insert(key.hash, entry).await;
    }

    /// Bytes held, by the weigher's count (updated by moka's housekeeping).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Purges the entries `target` covers that were stored before `before`: removed, or
    /// for a soft purge replaced by a stale-marked copy. A URL's variants are looked up
    /// directly; path and tag purges of whole entries are registered with moka, which
    /// applies them lazily (no scan on this task); soft path and tag purges scan.
    /// Returns how many entries it touched (registered purges count as 0 here).
    pub async fn purge(&self, target: &PurgeTarget, soft: bool, before: SystemTime) -> usize {
        if let Some(hashes) = target.variant_hashes() {
            let mut touched = 0;
            for hash in hashes {
                let Some(entry) = self.cache.get(&hash).await.filter(|e| e.response_time <= before && target.matches(&e.key, &e.tags)) else { continue };
                touched += 1;
                self.purge_one(hash, &entry, soft).await;
            }
            return touched;
        }
        if !soft {
            let target = target.clone();
            let registered = self.cache.invalidate_entries_if(move |_, entry| entry.response_time <= before && target.matches(&entry.key, &entry.tags));
            if registered.is_err() {
                tracing::warn!("cannot register an L1 purge");
            }
            return 0;
        }
        let matching: Vec<(u128, Arc<Entry>)> = self
            .cache
            .iter()
            .filter(|(_, entry)| entry.response_time <= before && target.matches(&entry.key, &entry.tags))
            .map(|(hash, entry)| (*hash, entry))
            .collect();
        for (hash, entry) in &matching {
            self.purge_one(*hash, entry, true).await;
        }
        matching.len()
    }

    async fn purge_one(&self, hash: u128, entry: &Arc<Entry>, soft: bool) {
        if !soft {
            self.cache.invalidate(&hash).await;
            return;
        }
        if entry.invalidated {
            return;
        }
        // Mark only the copy we saw: a newer one stored meanwhile stays fresh.
        let marked = Arc::new(entry.soft_purged());
        let seen = entry.clone();
        self.cache
            .entry(hash)
            .and_compute_with(|current| {
                let op = match current {
                    Some(current) if Arc::ptr_eq(current.value(), &seen) => moka::ops::compute::Op::Put(marked),
                    _ => moka::ops::compute::Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }

    /// Drops the copy of `hash` if it is older than `response_time` (another replica
    /// stored a newer one).
    pub async fn drop_if_older(&self, hash: u128, response_time: SystemTime) {
        if self.cache.get(&hash).await.is_some_and(|e| e.response_time < response_time) {
            self.cache.invalidate(&hash).await;
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
