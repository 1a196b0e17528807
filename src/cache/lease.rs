//! Coalescing across replicas: before a flight's leader asks the origin, it takes the
//! key's lease in the pool's Redis, or, while another replica holds it, waits for that
//! replica's announcement and uses its fill. After the fetch, the holder writes the
//! entry to Redis, releases the lease and announces the outcome.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderName};

use super::coalesce::Fill;
use super::shared::{Announcement, Lease};
use super::{CacheKey, Pool, Stored};

/// What a flight asks of its peers.
pub struct PeerWait<'a> {
    /// The request's primary key, and the most specific key known (the variant key when
    /// the URL varies): the lease is keyed by it.
    pub primary: &'a CacheKey,
    pub key: &'a CacheKey,
    /// The request's headers and the route's `key_headers`, to find its variant.
    pub request_headers: &'a HeaderMap,
    pub key_headers: &'a [HeaderName],
    /// When the copy this fetch replaces was received: a peer's fill must be newer.
    pub replaces: Option<SystemTime>,
    /// How long a lease lives: long enough for the holder's whole fetch.
    pub lease_ttl: Duration,
    /// Whether a fresh copy a peer stored just before this request may serve it (not
    /// for a request that demanded validation).
    pub accept_recent: bool,
}

/// What holding back for peers came to.
pub enum PeerOutcome {
    /// Another replica stored the entry: use it.
    Filled(Stored),
    /// We (may) hold the key's lease: fetch, then [`Pool::finish_flight`] with it.
    Lease(LeaseToken),
    /// No lease to be had (no Redis, Redis unavailable, or waited as long as a lease can
    /// live): fetch without one.
    FetchAnyway,
}

/// The token of a lease this replica (may) hold.
pub struct LeaseToken(String);

impl Pool {
    /// Runs `work` (the fetch of a lease's holder) while renewing the lease every third
    /// of `lock_timeout`, so that a live fetch never loses it however long it queues or
    /// reads, and a dead holder's lease is taken over `lock_timeout` after it stopped.
    /// The renewals run beside `work` in the same task, never pausing it.
    pub async fn renewing<T>(&self, key: &CacheKey, lease: Option<&LeaseToken>, ttl: Duration, work: impl std::future::Future<Output = T>) -> T {
        let (Some(l2), Some(LeaseToken(token))) = (&self.l2, lease) else { return work.await };
        let every = (self.config.lock_timeout / 3).max(Duration::from_millis(10));
        let renew = async {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !l2.renew_lease(key, token, ttl).await {
                    tracing::debug!(key = %key.text, "lease not renewed");
                }
            }
        };
        tokio::pin!(work);
        tokio::select! {
            biased;
            out = &mut work => out,
            () = renew => work.await,
        }
    }

    /// Asks for the key's lease; while another replica holds it, waits for its
    /// announcement (`lock_timeout` at a time, then asks again: a lease expires with a
    /// dead holder). After a failure announcement the replicas compete again, so one of
    /// them tries next.
    pub async fn hold_back_for_peers(&self, wait: &PeerWait<'_>) -> PeerOutcome {
        let Some(l2) = &self.l2 else { return PeerOutcome::FetchAnyway };
        let lock_timeout = self.config.lock_timeout;
        let give_up = Instant::now() + wait.lease_ttl + lock_timeout;
        loop {
            let mut watch = l2.watch_fill(wait.key);
            match l2.acquire_lease(wait.key, wait.lease_ttl, lock_timeout).await {
                Lease::Unavailable => {
                    l2.unwatch_fill(&watch);
                    return PeerOutcome::FetchAnyway;
                }
                Lease::Uncertain(token) => {
                    l2.unwatch_fill(&watch);
                    return PeerOutcome::Lease(LeaseToken(token));
                }
                Lease::Acquired(token) => {
                    l2.unwatch_fill(&watch);
                    // A peer may have filled the key just before we asked.
                    // A copy stored before this request: not for a request that demanded
                    // validation. `peer_fill` returns only copies newer than the one being
                    // revalidated: the same copy would defeat an early refresh.
                    let recent = self.peer_fill(wait, true).await.filter(|s| wait.accept_recent && s.entry.is_fresh(self.clock.now()));
                    if let Some(stored) = recent {
                        l2.finish_lease(wait.key, &token, Announcement::Filled).await;
                        return PeerOutcome::Filled(stored);
                    }
                    return PeerOutcome::Lease(LeaseToken(token));
                }
                Lease::Held => {
                    let left = give_up.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        l2.unwatch_fill(&watch);
                        return PeerOutcome::FetchAnyway;
                    }
                    match tokio::time::timeout(lock_timeout.min(left), &mut watch.rx).await {
                        Ok(Ok(Announcement::Filled)) => {
                            // Fetched by a peer while this request waited: as good as
                            // joining its fetch, whatever the request demanded.
                            return match self.peer_fill(wait, false).await {
                                Some(stored) => PeerOutcome::Filled(stored),
                                None => PeerOutcome::FetchAnyway,
                            };
                        }
                        Ok(Ok(Announcement::Uncacheable)) => return PeerOutcome::FetchAnyway,
                        // Failed, the subscription dropped, or no word in time: ask again.
                        Ok(Ok(Announcement::Failed)) | Ok(Err(_)) => {}
                        Err(_) => l2.unwatch_fill(&watch),
                    }
                }
            }
        }
    }

    /// This request's entry as a peer stored it in Redis (its variant, if the URL varies),
    /// if it is newer than the copy this fetch replaces; a `recheck` follows this request's
    /// own lookup closely.
    async fn peer_fill(&self, wait: &PeerWait<'_>, recheck: bool) -> Option<Stored> {
        let found = self.lookup_shared(wait.primary, wait.request_headers, wait.key_headers, None, recheck).await?;
        if wait.replaces.is_some_and(|old| found.entry.response_time <= old) {
            return None;
        }
        Some(Stored { key: found.key, entry: Arc::new(found.entry), marker: found.marker })
    }

    /// Off every request's path, once the flight's waiters have their answer: a stored
    /// fill is written to Redis (and, when it `replaces` a copy, the other replicas are
    /// told to drop theirs); the lease, if held, is released with the announcement.
    pub async fn finish_flight(&self, primary: &CacheKey, key: &CacheKey, lease: Option<LeaseToken>, fill: &Fill, replaces: bool) {
        let Some(l2) = &self.l2 else { return };
        let announcement = match fill {
            Fill::Stored(stored) if self.store_shared_now(primary, stored).await => {
                if replaces {
                    self.announce_replacement(primary, stored).await;
                }
                Announcement::Filled
            }
            Fill::Uncacheable => Announcement::Uncacheable,
            _ => Announcement::Failed,
        };
        if let Some(LeaseToken(token)) = lease {
            l2.finish_lease(key, &token, announcement).await;
        }
    }
}
