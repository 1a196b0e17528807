//! Keys recently answered with something not storable, for [`HIT_FOR_MISS`]: for a
//! reason in the response (hit-for-miss: requests for them skip coalescing), or for
//! being over `max_object_bytes` ("stream, don't store": requests for them still share
//! one fetch, but skip the cross-replica lease, and their ranges go to the origin).
//!
//! A fixed table of two-slot buckets indexed by the key's own bits (keys are already
//! 128-bit hashes): constant memory (65,536 slots of 32 bytes, 2 MiB a pool) and no
//! housekeeping on the request path, however many distinct keys a cache-buster sends.
//! A new key may take the slot of an older one, which then coalesces again on its next
//! miss (the safe direction); a key is never taken for another, since the whole key is
//! compared.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a key whose answer was not storable skips coalescing.
pub const HIT_FOR_MISS: Duration = Duration::from_secs(5);

const SHARDS: usize = 64;
const BUCKETS_PER_SHARD: usize = 512;

/// What is remembered of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Remembered {
    /// Not storable for a reason in the response: hit-for-miss.
    #[default]
    Uncacheable,
    /// Over `max_object_bytes`: streamed to everyone who shares its fetch, never stored.
    Streamed,
}

/// One remembered key: until when, in milliseconds since the table's start (0 = empty).
#[derive(Clone, Copy, Default)]
struct Slot {
    key: u128,
    until_ms: u64,
    what: Remembered,
}

/// A shard's buckets, two slots each.
type Buckets = Box<[[Slot; 2]]>;

pub struct HitForMiss {
    start: Instant,
    ttl_ms: u64,
    shards: Box<[Mutex<Buckets>]>,
}

impl Default for HitForMiss {
    fn default() -> Self {
        HitForMiss::new(HIT_FOR_MISS)
    }
}

impl HitForMiss {
    pub fn new(ttl: Duration) -> HitForMiss {
        let shards = (0..SHARDS).map(|_| Mutex::new(vec![[Slot::default(); 2]; BUCKETS_PER_SHARD].into_boxed_slice())).collect();
        HitForMiss { start: Instant::now(), ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1), shards }
    }

    /// Milliseconds since the start, never 0 (0 marks an empty slot).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1)
    }

    fn bucket(&self, key: u128) -> (MutexGuard<'_, Buckets>, usize) {
        let shard = (key as usize) % SHARDS;
        let bucket = ((key >> 64) as usize) % BUCKETS_PER_SHARD;
        (self.shards[shard].lock().unwrap_or_else(|poisoned| poisoned.into_inner()), bucket)
    }

    /// What is remembered of `key`, if anything.
    pub fn get(&self, key: u128) -> Option<Remembered> {
        let now = self.now_ms();
        let (buckets, at) = self.bucket(key);
        buckets[at].iter().find(|slot| slot.key == key && slot.until_ms > now).map(|slot| slot.what)
    }

    /// Remembers `key` as `what` for the table's time to live, in its own slot if it has
    /// one, else in the bucket's empty or soonest-ending one.
    pub fn insert(&self, key: u128, what: Remembered) {
        let now = self.now_ms();
        let until_ms = now.saturating_add(self.ttl_ms);
        let (mut buckets, at) = self.bucket(key);
        let bucket = &mut buckets[at];
        let index = match bucket.iter().position(|slot| slot.key == key && slot.until_ms > 0) {
            Some(own) => own,
            None if bucket[0].until_ms <= bucket[1].until_ms => 0,
            None => 1,
        };
        bucket[index] = Slot { key, until_ms, what };
    }

    pub fn remove(&self, key: u128) {
        let (mut buckets, at) = self.bucket(key);
        for slot in buckets[at].iter_mut().filter(|slot| slot.key == key) {
            *slot = Slot::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit_for_miss(table: &HitForMiss, key: u128) -> bool {
        table.get(key) == Some(Remembered::Uncacheable)
    }

    /// Two keys in the same bucket (same shard bits, same bucket bits).
    fn neighbours(n: u128) -> u128 {
        (n << 100) | 7
    }

    #[test]
    fn remembered_key_is_found_until_removed() {
        let table = HitForMiss::default();
        assert!(!hit_for_miss(&table, 42));
        table.insert(42, Remembered::Uncacheable);
        assert!(hit_for_miss(&table, 42));
        table.remove(42);
        assert!(!hit_for_miss(&table, 42));
    }

    #[test]
    fn a_streamed_key_is_not_hit_for_miss_and_one_kind_replaces_the_other() {
        let table = HitForMiss::default();
        table.insert(42, Remembered::Streamed);
        assert_eq!(table.get(42), Some(Remembered::Streamed));
        assert!(!hit_for_miss(&table, 42), "stream, don't store still coalesces");
        table.insert(42, Remembered::Uncacheable);
        assert_eq!(table.get(42), Some(Remembered::Uncacheable));
    }

    #[test]
    fn remembered_key_ends_after_its_time_to_live() {
        let table = HitForMiss::new(Duration::from_millis(30));
        table.insert(42, Remembered::Uncacheable);
        assert!(hit_for_miss(&table, 42));
        std::thread::sleep(Duration::from_millis(80));
        assert!(!hit_for_miss(&table, 42));
    }

    #[test]
    fn key_sharing_a_bucket_is_never_taken_for_another() {
        let table = HitForMiss::default();
        table.insert(neighbours(1), Remembered::Uncacheable);
        assert!(!hit_for_miss(&table, neighbours(2)), "a different key in the same bucket must not read as remembered");
        table.insert(neighbours(2), Remembered::Uncacheable);
        assert!(hit_for_miss(&table, neighbours(1)) && hit_for_miss(&table, neighbours(2)), "a bucket holds two keys");
    }

    #[test]
    fn third_key_in_a_bucket_replaces_the_soonest_ending() {
        let table = HitForMiss::default();
        table.insert(neighbours(1), Remembered::Uncacheable);
        std::thread::sleep(Duration::from_millis(5));
        table.insert(neighbours(2), Remembered::Uncacheable);
        table.insert(neighbours(3), Remembered::Uncacheable);
        assert!(!hit_for_miss(&table, neighbours(1)), "the oldest key gives way");
        assert!(hit_for_miss(&table, neighbours(2)) && hit_for_miss(&table, neighbours(3)));
    }

    #[test]
    fn reinserting_a_key_renews_it_in_place() {
        let table = HitForMiss::default();
        table.insert(neighbours(1), Remembered::Uncacheable);
        table.insert(neighbours(2), Remembered::Uncacheable);
        table.insert(neighbours(1), Remembered::Uncacheable);
        assert!(hit_for_miss(&table, neighbours(1)) && hit_for_miss(&table, neighbours(2)), "renewing must not push out the neighbour");
    }
}
