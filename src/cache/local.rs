//! The in-process tier (L1): a moka cache bounded by the real size of its entries, each
//! entry expiring when its freshness and stale windows have run out.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;

use super::entry::Entry;
use super::key::CacheKey;

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

    pub async fn remove(&self, key: &CacheKey) {
        self.cache.invalidate(&key.hash).await;
    }

    /// Bytes held, by the weigher's count (updated by moka's housekeeping).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Runs moka's pending housekeeping, so that sizes and counts are current.
    pub async fn sync(&self) {
        self.cache.run_pending_tasks().await;
    }
}
