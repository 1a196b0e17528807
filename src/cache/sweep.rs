//! Path and tag purges of L1, applied in the background.
//!
//! A purge of a path or a tag cannot look its entries up: they have to be found. Each one
//! is registered in one set of pending purges, which a single task per L1 sweeps through
//! the cache in chunks, and which every L1 read checks the slot it found against until
//! the sweep is done. However many targets a purge names (the admin API takes 10,000),
//! a read costs one flag load when nothing is pending, and a hash lookup per tag of the
//! entry while a sweep runs: no moka predicate per target checked on every get, no
//! whole-L1 scan per target on a request's task.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use xxhash_rust::xxh3::xxh3_128;

use super::entry::Entry;
use super::key::path_part;
use super::purge::PurgeTarget;

/// The purges of one L1 not yet swept through it.
#[derive(Debug, Default)]
pub struct Pending {
    /// Set while anything is pending: all a read looks at otherwise.
    any: AtomicBool,
    /// Whether a sweep task is running (at most one).
    sweeping: AtomicBool,
    set: RwLock<Set>,
}

/// Two generations of pending purges, so that ending a pass is a swap under the lock,
/// never a walk over millions of targets while reads wait.
#[derive(Debug, Default)]
struct Set {
    /// Registered before the pass under way began: done when it ends.
    swept: Covers,
    /// Registered since: for the next pass.
    fresh: Covers,
}

#[derive(Debug, Default)]
struct Covers {
    tags: HashMap<String, Cover>,
    /// By hash of `/path?query`, as [`PurgeTarget::Path`].
    paths: HashMap<u128, Cover>,
}

impl Covers {
    fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.paths.is_empty()
    }
}

/// What purges of one tag or path cover.
#[derive(Debug, Clone, Copy, Default)]
struct Cover {
    /// Entries stored at or before this are removed.
    hard: Option<SystemTime>,
    /// Entries stored at or before this are marked stale (soft-purged).
    soft: Option<SystemTime>,
}

impl Cover {
    fn add(&mut self, soft: bool, before: SystemTime) {
        let until = if soft { &mut self.soft } else { &mut self.hard };
        *until = Some(until.map_or(before, |b| b.max(before)));
    }

    fn merge(&mut self, other: Cover) {
        self.hard = self.hard.max(other.hard);
        self.soft = self.soft.max(other.soft);
    }
}

/// What the pending purges do to an entry (or to a slot: removed if any of its entries
/// is, since a purge of one variant drops its URL's variants together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Remove,
    /// Some entries are to be marked soft-purged.
    Mark,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        !self.any.load(Ordering::Acquire)
    }

    /// Registers a path or tag purge (a URL purge is looked up, not registered: `false`).
    /// Returns whether the caller must start a sweep.
    pub fn register(&self, target: &PurgeTarget, soft: bool, before: SystemTime) -> bool {
        {
            let mut set = self.write();
            match target {
                PurgeTarget::Tag(tag) => set.fresh.tags.entry(tag.clone()).or_default().add(soft, before),
                PurgeTarget::Path(hash) => set.fresh.paths.entry(*hash).or_default().add(soft, before),
                PurgeTarget::Url(_) => return false,
            }
            self.any.store(true, Ordering::Release);
        }
        !self.sweeping.swap(true, Ordering::AcqRel)
    }

    /// A pass over L1 begins: it covers what was registered so far.
    pub fn begin_pass(&self) {
        let mut set = self.write();
        let fresh = std::mem::take(&mut set.fresh);
        if set.swept.is_empty() {
            set.swept = fresh;
            return;
        }
        // An abandoned pass left its part: it is covered by this one too (rare: a merge).
        for (tag, cover) in fresh.tags {
            set.swept.tags.entry(tag).or_default().merge(cover);
        }
        for (hash, cover) in fresh.paths {
            set.swept.paths.entry(hash).or_default().merge(cover);
        }
    }

    /// The pass that began last is done: forgets what it covered. Returns whether the
    /// sweep may stop (nothing registered meanwhile), then marked stopped.
    pub fn end_pass(&self) -> bool {
        let mut set = self.write();
        let done = std::mem::take(&mut set.swept);
        let stop = set.fresh.is_empty();
        if stop {
            // Under the lock: a registration either came before (and is in `fresh`) or
            // comes after, and then starts a sweep of its own.
            self.any.store(false, Ordering::Release);
            self.sweeping.store(false, Ordering::Release);
        }
        drop(set);
        // Freed with no lock held: it may hold millions of targets.
        drop(done);
        stop
    }

    /// The sweep stopped before it was done: the next registration starts another.
    pub fn abandoned(&self) {
        self.sweeping.store(false, Ordering::Release);
    }

    /// The verdict on a slot's entries.
    pub fn verdict<'a>(&self, entries: impl Iterator<Item = &'a std::sync::Arc<Entry>>) -> Verdict {
        let set = self.read();
        let mut verdict = Verdict::Keep;
        for entry in entries {
            match set.verdict(entry) {
                Verdict::Remove => return Verdict::Remove,
                Verdict::Mark => verdict = Verdict::Mark,
                Verdict::Keep => {}
            }
        }
        verdict
    }

    /// Whether `entry` is to be marked soft-purged.
    pub fn marks(&self, entry: &Entry) -> bool {
        self.read().verdict(entry) == Verdict::Mark
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Set> {
        self.set.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Set> {
        self.set.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Set {
    fn verdict(&self, entry: &Entry) -> Verdict {
        let (mut hard, mut soft) = (None, None);
        let mut consider = |cover: &Cover| {
            hard = hard.max(cover.hard);
            soft = soft.max(cover.soft);
        };
        for covers in [&self.swept, &self.fresh] {
            if !covers.tags.is_empty() {
                entry.tags.iter().filter_map(|tag| covers.tags.get(tag)).for_each(&mut consider);
            }
            if !covers.paths.is_empty()
                && let Some(cover) = covers.paths.get(&xxh3_128(path_part(&entry.key).as_bytes()))
            {
                consider(cover);
            }
        }
        if hard.is_some_and(|until| entry.response_time <= until) {
            Verdict::Remove
        } else if !entry.invalidated && soft.is_some_and(|until| entry.response_time <= until) {
            Verdict::Mark
        } else {
            Verdict::Keep
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn stored_at(key: &str, tags: &[&str], at: SystemTime) -> Arc<Entry> {
        Arc::new(Entry { key: key.into(), tags: tags.iter().map(|t| (*t).to_owned()).collect(), response_time: at, ..crate::cache::entry::tests::sample() })
    }

    #[test]
    fn a_pending_purge_covers_entries_stored_before_it_only_and_hard_wins_over_soft() {
        let pending = Pending::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let old = stored_at("http://a/p/1\nae=identity", &["sale", "p1"], t0);
        let new = stored_at("http://a/p/1\nae=identity", &["sale"], t0 + Duration::from_secs(10));
        assert!(pending.is_empty());
        assert_eq!(pending.verdict([&old].into_iter()), Verdict::Keep);
        assert!(pending.register(&PurgeTarget::tag("sale").expect("tag"), true, t0 + Duration::from_secs(5)), "the first starts a sweep");
        assert!(!pending.register(&PurgeTarget::tag("p1").expect("tag"), false, t0), "one sweep at a time");
        assert_eq!(pending.verdict([&new].into_iter()), Verdict::Keep, "stored after the purge");
        assert_eq!(pending.verdict([&old].into_iter()), Verdict::Remove, "the hard purge of p1 covers it");
        assert_eq!(pending.verdict([&new, &stored_at("http://a/p/2\nae=identity", &["sale"], t0)].into_iter()), Verdict::Mark);
        let marked = Arc::new(stored_at("http://a/p/2\nae=identity", &["sale"], t0).soft_purged());
        assert_eq!(pending.verdict([&marked].into_iter()), Verdict::Keep, "already soft-purged");
    }

    #[test]
    fn a_pass_forgets_only_what_was_registered_before_it_began() {
        let pending = Pending::default();
        let now = SystemTime::now();
        let path = PurgeTarget::from_url("/p/1").expect("path");
        assert!(pending.register(&path, false, now));
        pending.begin_pass();
        // Registered while the pass runs: still pending after it.
        pending.register(&PurgeTarget::tag("late").expect("tag"), false, now);
        let entry = stored_at("https://b/p/1\nae=gzip", &["late"], now);
        let other_host = stored_at("https://c/p/1\nae=gzip", &[], now);
        assert_eq!(pending.verdict([&other_host].into_iter()), Verdict::Remove, "a path covers every host");
        assert!(!pending.end_pass());
        assert!(!pending.is_empty());
        assert_eq!(pending.verdict([&other_host].into_iter()), Verdict::Keep, "swept: forgotten");
        assert_eq!(pending.verdict([&entry].into_iter()), Verdict::Remove);
        pending.begin_pass();
        assert!(pending.end_pass());
        assert!(pending.is_empty());
        assert_eq!(pending.verdict([&entry].into_iter()), Verdict::Keep);
        assert!(pending.register(&path, false, now), "a sweep ended: the next registration starts one");
    }
}
