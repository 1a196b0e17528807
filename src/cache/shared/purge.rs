//! Purges in the shared tier: what a target covers, found through its Redis index and
//! deleted (or marked soft-purged) in bounded batches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{SET_IF_UNCHANGED, SharedTier, exec, unix_millis};
use crate::cache::entry::Entry;
use crate::cache::purge::PurgeTarget;

impl SharedTier {
    fn index_key(&self, target: &PurgeTarget) -> String {
        format!("{}v{}:idx:{}", self.prefix, crate::cache::entry::FORMAT_VERSION, target.index_name())
    }

    /// Purges what `target` covers from Redis: deleted, or for a soft purge rewritten as
    /// stale (only if unchanged meanwhile), in batches of [`PURGE_BATCH`] index members,
    /// each within the Redis deadline, however many the index holds; the whole purge
    /// within [`PURGE_DEADLINE`]. Returns how many entries it touched, or, when Redis
    /// failed part way, how many it had touched by then; `progress` counts them as
    /// each batch is done.
    pub async fn purge(&self, target: &PurgeTarget, soft: bool, progress: &AtomicUsize) -> Result<usize, PurgeError> {
        if self.health.is_open() {
            return Err(PurgeError { done: 0, why: "the pool's Redis is unavailable" });
        }
        let index = self.index_key(target);
        let deadline = self.timeout * 4;
        let started = std::time::Instant::now();
        let now_ms = unix_millis(self.clock.now());
        if soft {
            return self.soft_purge(&index, now_ms, deadline, started, progress).await;
        }
        let mut done = 0;
        loop {
            if started.elapsed() > PURGE_DEADLINE {
                return Err(PurgeError { done, why: "the purge ran out of time" });
            }
            // Each batch leaves the index as it is purged: the next one starts at 0.
            let mut range = redis::cmd("ZRANGEBYSCORE");
            range.arg(&index).arg(now_ms).arg("+inf").arg("LIMIT").arg(0).arg(PURGE_BATCH);
            let Some(members) = self.step(deadline, started, || query::<Vec<String>>(&self.writes, &range)).await else {
                return Err(PurgeError::failed(done));
            };
            if members.is_empty() {
                return Ok(done);
            }
            let last = members.len() < PURGE_BATCH;
            {
                let deletes: Vec<redis::Cmd> = members.iter().map(redis::Cmd::del).collect();
                // Deleted again after a failure, a key already gone counts 0: a batch whose
                // first deletes ran while their answer timed out is counted short.
                let Some(deleted) = self.step(deadline, started, || exec(&self.writes, &deletes)).await else {
                    return Err(PurgeError::failed(done));
                };
                let deleted = deleted.iter().filter(|n| matches!(n, redis::Value::Int(1..))).count();
                done += deleted;
                progress.fetch_add(deleted, Ordering::Relaxed);
                // Remove exactly the members purged: one indexed meanwhile stays findable.
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(&index).arg(&members);
                if self.step(deadline, started, || query::<i64>(&self.writes, &zrem)).await.is_none() {
                    return Err(PurgeError::failed(done));
                }
            }
            if last {
                return Ok(done);
            }
        }
    }

    /// One step of a purge (reading a batch, deleting it, taking it out of the index: each
    /// safe to do twice) within `deadline`, tried again after a failure for up to
    /// [`PURGE_STEP_PATIENCE`] while the breaker lets calls through and the purge has time
    /// left: a Redis that stops answering for a moment (a fork, a busy second) must not
    /// end a purge of 300,000 entries part way. `None` when it kept failing.
    async fn step<T, F, Fut>(&self, deadline: Duration, started: std::time::Instant, mut attempt: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let first = std::time::Instant::now();
        loop {
            if let Some(Ok(value)) = self.guarded(&self.writes, deadline, attempt()).await {
                return Some(value);
            }
            if self.health.is_open() || first.elapsed() > PURGE_STEP_PATIENCE || started.elapsed() > PURGE_DEADLINE {
                return None;
            }
            tokio::time::sleep(PURGE_RETRY_PAUSE).await;
        }
    }

    /// A soft purge leaves the members indexed (the entries stay, marked): it walks the
    /// index with `ZSCAN`, which returns every member present throughout at least once
    /// however other replicas change the index meanwhile (positions would shift under a
    /// paged range); members seen twice are marked once.
    async fn soft_purge(&self, index: &str, now_ms: u64, deadline: Duration, started: std::time::Instant, progress: &AtomicUsize) -> Result<usize, PurgeError> {
        let mut conn = self.writes.conn();
        let (mut done, mut cursor) = (0, 0u64);
        let mut seen = std::collections::HashSet::new();
        loop {
            if started.elapsed() > PURGE_DEADLINE {
                return Err(PurgeError { done, why: "the purge ran out of time" });
            }
            let mut scan = redis::cmd("ZSCAN");
            scan.arg(index).arg(cursor).arg("COUNT").arg(PURGE_BATCH);
            let (next, pairs): (u64, Vec<(String, f64)>) = match self.guarded(&self.writes, deadline, scan.query_async(&mut conn)).await {
                Some(Ok(page)) => page,
                _ => return Err(PurgeError::failed(done)),
            };
            // Live members only (the score is the entry's expiry), each once.
            let members: Vec<String> =
                pairs.into_iter().filter(|(_, expires)| *expires >= now_ms as f64).map(|(m, _)| m).filter(|m| seen.insert(m.clone())).collect();
            let touched = self.soft_purge_batch(&members, deadline).await.map_err(|()| PurgeError::failed(done))?;
            done += touched;
            progress.fetch_add(touched, Ordering::Relaxed);
            if next == 0 {
                return Ok(done);
            }
            cursor = next;
        }
    }

    /// Marks the entries at `members` soft-purged (each only if unchanged meanwhile);
    /// returns how many it found.
    async fn soft_purge_batch(&self, members: &[String], deadline: Duration) -> Result<usize, ()> {
        let mut touched = 0;
        let mut conn = self.writes.conn();
        for key in members {
            let payload = match self.get_bounded(&self.writes, key, deadline).await {
                Some(Ok(Some(payload))) => payload,
                // Gone meanwhile (expired, purged): nothing to mark.
                Some(Ok(None)) => continue,
                Some(Err(_)) | None => return Err(()),
            };
            if payload.len() > self.max_entry_bytes {
                continue;
            }
            let Ok(entry) = Entry::decode(&payload) else { continue };
            touched += 1;
            if entry.invalidated {
                continue;
            }
            let script = redis::Script::new(SET_IF_UNCHANGED);
            let mut invocation = script.key(key);
            invocation.arg(payload.as_ref()).arg(entry.soft_purged().encode().as_ref());
            if !matches!(self.guarded(&self.writes, deadline, invocation.invoke_async::<i64>(&mut conn)).await, Some(Ok(_))) {
                return Err(());
            }
        }
        Ok(touched)
    }
}

/// A purge that Redis could not complete: what it had done, and what failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{why} ({done} entries purged by then)")]
pub struct PurgeError {
    pub done: usize,
    pub why: &'static str,
}

impl PurgeError {
    /// Redis failed (or did not answer) after `done` entries were purged.
    fn failed(done: usize) -> PurgeError {
        PurgeError { done, why: "the pool's Redis failed while purging" }
    }
}

/// Index members purged per batch.
const PURGE_BATCH: usize = 1000;
/// How long one purge step is tried again after failing (see [`SharedTier::step`]), and
/// the pause between tries.
const PURGE_STEP_PATIENCE: Duration = Duration::from_secs(1);
const PURGE_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// One command on `link`'s current connection.
async fn query<T: redis::FromRedisValue>(link: &super::link::Link, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    cmd.query_async(&mut link.conn()).await
}

/// The longest one target's purge may run (a soft purge rewrites each entry).
const PURGE_DEADLINE: Duration = Duration::from_secs(60);
