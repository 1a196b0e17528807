//! The cache: keys ([`key`]), the stored entry and its binary format ([`entry`]), the
//! RFC 9111 storage policy ([`policy`]), the in-process tier ([`local`]), the Redis tier
//! ([`shared`]), and the pool that puts both tiers together ([`Pool`]).

pub mod coalesce;
pub mod entry;
pub mod key;
pub mod local;
pub mod policy;
pub mod shared;

use std::sync::Arc;

pub use entry::Entry;
pub use key::{CacheKey, Encodings, PurgeTarget};

use crate::config::PoolConfig;
use crate::metrics::PoolMetrics;
use crate::proxy::Tier;
use local::LocalTier;
use shared::{SharedTier, SharedTierError};

/// What a purge touched in one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeCount {
    pub l1: usize,
    pub l2: usize,
    /// Whether it reached Redis and was broadcast to every replica.
    pub all_replicas: bool,
}

/// One cache pool: its own L1, its own Redis connection, its own metrics.
pub struct Pool {
    pub config: PoolConfig,
    pub l1: LocalTier,
    pub l2: Option<SharedTier>,
    pub metrics: Arc<PoolMetrics>,
    /// Flights in progress for this pool's keys.
    pub coalescer: Arc<coalesce::Coalescer>,
}

impl Pool {
    pub fn new(config: PoolConfig, metrics: PoolMetrics) -> Result<Pool, SharedTierError> {
        let metrics = Arc::new(metrics);
        let l2 = match &config.shared {
            Some(shared) => Some(SharedTier::new(&config.name, shared, config.key_prefix.clone(), metrics.clone())?),
            None => None,
        };
        Ok(Pool { l1: LocalTier::new(config.l1_max_bytes), l2, metrics, coalescer: coalesce::Coalescer::new(), config })
    }

    /// L1, then L2 (bounded by `redis_timeout`); an L2 hit is promoted to L1. A stale
    /// L1 entry is checked against L2 too: another replica may have refreshed it.
    pub async fn lookup(&self, key: &CacheKey) -> Option<(Arc<Entry>, Tier)> {
        let local = self.l1.get(key).await;
        let now = std::time::SystemTime::now();
        if let Some(entry) = &local
            && (entry.is_fresh(now) || self.l2.is_none())
        {
            return Some((entry.clone(), Tier::L1));
        }
        let shared = match &self.l2 {
            Some(l2) => l2.get(key).await.map(Arc::new),
            None => None,
        };
        match (local, shared) {
            (Some(local), Some(shared)) if shared.response_time <= local.response_time => Some((local, Tier::L1)),
            (_, Some(shared)) => {
                self.l1.insert(key, shared.clone()).await;
                Some((shared, Tier::L2))
            }
            (local, None) => local.map(|entry| (entry, Tier::L1)),
        }
    }

    /// Starts the pool's background work: the Redis event subscription, whose purges
    /// and replacements are applied to this pool's L1.
    pub fn start(&self) {
        if let Some(l2) = &self.l2 {
            let l1 = self.l1.clone();
            let handler: shared::NoticeHandler = Arc::new(move |notice| {
                let l1 = l1.clone();
                tokio::spawn(async move {
                    match notice {
                        // Entries stored here before the notice arrived, by this clock:
                        // the purging replica's clock may differ from ours.
                        shared::Notice::Purge { target, soft } => {
                            l1.purge(&target, soft, std::time::SystemTime::now()).await;
                        }
                        shared::Notice::Replaced { hash, response_time } => l1.drop_if_older(hash, response_time).await,
                        shared::Notice::Resubscribed => {
                            tracing::info!("event subscription restored: clearing L1, invalidations may have been missed");
                            l1.clear();
                        }
                    }
                });
            });
            l2.start_events(handler);
        }
    }

    /// Purges `target` here, in Redis, and (through the event channel) on every replica
    /// sharing this pool's Redis.
    pub async fn purge(&self, target: &PurgeTarget, soft: bool) -> PurgeCount {
        let before = std::time::SystemTime::now();
        let local = self.l1.purge(target, soft, before).await;
        let Some(l2) = &self.l2 else {
            return PurgeCount { l1: local, l2: 0, all_replicas: false };
        };
        let shared = l2.purge(target, soft).await;
        let broadcast = l2.publish(&shared::Notice::Purge { target: target.clone(), soft }).await;
        PurgeCount { l1: local, l2: shared.unwrap_or(0), all_replicas: shared.is_ok() && broadcast }
    }

    /// Tells the other replicas a newer copy of `key` was stored.
    pub async fn announce_replacement(&self, key: &CacheKey, entry: &Entry) {
        if let Some(l2) = &self.l2 {
            l2.publish(&shared::Notice::Replaced { hash: key.hash, response_time: entry.response_time }).await;
        }
    }

    /// Stores in L1 now and in L2 in the background; with `replaces`, other replicas
    /// are told to drop their older copies once it is written.
    pub async fn store(&self, key: &CacheKey, entry: Arc<Entry>, replaces: bool) {
        if let Some(l2) = &self.l2 {
            l2.put_in_background(key, entry.clone(), replaces);
        }
        self.l1.insert(key, entry).await;
    }

    /// Refreshes the L1 size gauges (called before `/metrics` is rendered).
    pub async fn update_gauges(&self) {
        self.l1.sync().await;
        self.metrics.l1_bytes.set(self.l1.weighted_size() as f64);
        self.metrics.l1_entries.set(self.l1.entry_count() as f64);
    }
}
