//! The fetch phase under coalescing: one fetch per key at a time in this process (a
//! flight), and across replicas through the pool's Redis lease.
//!
//! The fetch runs in its own task, so a leader whose client goes away neither cancels
//! it nor strands its waiters. Waiters get the stored entry (`collapsed`), are released
//! together to ask the origin themselves when the answer may not be stored, share the
//! origin's answer when it failed, and after `lock_timeout` take a stale copy or, one of
//! them, take over the flight.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Response, request};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use super::fetch::{self, Fetched};
use super::forward::ClientInfo;
use super::{ProxyBody, RouteRuntime, failed, failure_outcome, respond};
use crate::cache::coalesce::{Answer, Failure, Fill, FlightGuard, Join};
use crate::cache::lease::{PeerOutcome, PeerWait};
use crate::cache::{CacheKey, Encodings, Entry, Stored};
use crate::config::Priority;
use crate::error::{ProxyError, error_response};
use crate::origin::Timings;
use crate::origin::is_failure_status;
use crate::outcome::{Outcome, StaleReason};

/// Failure answers up to this size are read whole and shared with waiters.
const SHARED_ANSWER_BYTES: usize = 64 * 1024;

/// Everything a fetch needs, owned, so it can run in its own task.
#[derive(Clone)]
pub struct FetchJob {
    pub route: Arc<RouteRuntime>,
    pub parts: request::Parts,
    pub client: ClientInfo,
    /// Origin timings for the access log, when the request is logged.
    pub timings: Option<Arc<Timings>>,
    /// The request's primary key (URL and `Accept-Encoding` group).
    pub primary: CacheKey,
    /// The most specific key known (the variant key when the URL's responses vary):
    /// the flight and the cross-replica lease are keyed by it.
    pub key: CacheKey,
    /// The stored copy, if any: its validators make the fetch conditional.
    pub stored: Option<Arc<Entry>>,
    pub encodings: Encodings,
    /// A background refresh: it queues for the origin at `low` priority, so it never
    /// takes a slot from a request that has nothing to serve.
    pub background: bool,
    /// A copy was stored before: other replicas are told to drop theirs once the new
    /// one is written.
    pub replaces: bool,
    /// Whether a stale copy may answer a request that waited `lock_timeout` (not when the
    /// request itself demanded validation: `no-cache`, `max-age`, `min-fresh`).
    pub stale_on_wait: bool,
}

impl FetchJob {
    async fn fetch(&self) -> Result<Fetched, ProxyError> {
        let priority = if self.background { Priority::Low } else { self.route.config.priority };
        fetch::fetch(self, priority).await
    }

    /// What this job's flight asks of the replicas sharing the pool's Redis.
    fn peer_wait(&self) -> PeerWait<'_> {
        PeerWait {
            primary: &self.primary,
            key: &self.key,
            request_headers: &self.parts.headers,
            key_headers: &self.route.config.cache.key_headers,
            replaces: self.stored.as_ref().map(|old| old.response_time),
            // Long enough for the holder's whole fetch, so a live holder keeps it.
            lease_ttl: self.route.origin.config.timeout + self.route.pool.config.lock_timeout,
            accept_recent: self.background || self.stale_on_wait,
        }
    }

    /// This request's key for a stored response: its variant key when the response
    /// varies, else the primary key.
    fn key_for(&self, stored: &Stored) -> CacheKey {
        match &stored.marker {
            None => self.primary.clone(),
            Some(marker) => {
                let names = crate::cache::key::merge_names(&crate::cache::marker_names(marker), &self.route.config.cache.key_headers);
                self.primary.variant(&names, &self.parts.headers)
            }
        }
    }
}

/// What the flight task hands its leader.
enum LeaderResult {
    Fetched(Result<Fetched, ProxyError>),
    /// The origin failed; its answer, read whole to share with the waiters.
    Answer(Arc<Answer>),
    /// No answer from the origin; the error, shared with the waiters.
    Error(Arc<ProxyError>),
    /// Another replica filled the key while we held back.
    FromPeer(Stored),
}

/// A miss (or a stale entry past its stale-while-revalidate window): fetch under
/// coalescing and answer.
pub async fn miss(job: FetchJob, stale: Option<Arc<Entry>>, head: bool) -> (Response<ProxyBody>, Outcome) {
    let pool = job.route.pool.clone();
    if pool.is_hit_for_miss(&job.key).await {
        return direct(&job, stale.as_deref(), head).await;
    }
    let lock_timeout = pool.config.lock_timeout;
    let mut job = job;
    let mut join = pool.join_flight(&job.key);
    // A fill for another variant sends a waiter to its own variant's flight, once.
    let mut rejoined = false;
    let mut abandoned = 0;
    loop {
        let mut waiting = match join {
            Join::Leader(guard) => return lead(job, guard, stale, head).await,
            Join::Waiter(waiting) => waiting,
        };
        let fill = match waiting.wait(lock_timeout).await {
            Some(fill) => fill,
            // The flight may have ended just as the wait timed out.
            None => match waiting.ended() {
                Some(fill) => fill,
                None => {
                    if job.stale_on_wait
                        && let Some(served) = serve_stale(stale.as_deref(), head)
                    {
                        return served;
                    }
                    join = pool.take_over_flight(&job.key, waiting.flight_id);
                    continue;
                }
            },
        };
        match fill {
            Fill::Stored(stored) => {
                let mine = job.key_for(&stored);
                if mine.hash == stored.key.hash {
                    return (respond::from_entry(&stored.entry, head, true, SystemTime::now()), Outcome::Collapsed);
                }
                if rejoined {
                    return direct(&job, stale.as_deref(), head).await;
                }
                rejoined = true;
                job.key = mine;
                join = pool.join_flight(&job.key);
            }
            Fill::Uncacheable => return direct(&job, stale.as_deref(), head).await,
            Fill::Failed { outcome, failure } => {
                if failure.allows_stale()
                    && let Some(served) = stale_if_error(stale.as_deref(), head)
                {
                    return served;
                }
                return (failure_response(&job, &failure, head), outcome);
            }
            // The leader went away, or a background refresh was shed: join again, and
            // after twice ask the origin alone rather than keep meeting new refreshes.
            Fill::Abandoned if abandoned >= 2 => return direct(&job, stale.as_deref(), head).await,
            Fill::Abandoned => {
                abandoned += 1;
                join = pool.join_flight(&job.key);
            }
        }
    }
}

/// The leader's failure as a waiter gets it.
fn failure_response(job: &FetchJob, failure: &Failure, head: bool) -> Response<ProxyBody> {
    match failure {
        Failure::Answer(answer) => respond::from_answer(answer, head),
        Failure::Status(status) => error_response(&ProxyError::OriginStatus { origin: job.route.origin.config.name.clone(), status: *status }),
        Failure::Error(err) => error_response(err),
    }
}

/// Starts a background refresh of the key unless one is already running.
pub fn refresh_in_background(mut job: FetchJob) {
    job.background = true;
    if let Some(guard) = job.route.pool.try_lead_flight(&job.key) {
        tokio::spawn(run_flight(job, guard, None));
    }
}

/// Leads the flight: runs it in its own task and answers from its result. With a stale
/// copy at hand, waits no longer than `lock_timeout` for it, like the waiters.
async fn lead(job: FetchJob, guard: FlightGuard, stale: Option<Arc<Entry>>, head: bool) -> (Response<ProxyBody>, Outcome) {
    let (tx, rx) = oneshot::channel();
    let lock_timeout = job.route.pool.config.lock_timeout;
    let stale_on_wait = job.stale_on_wait;
    tokio::spawn(run_flight(job, guard, Some(tx)));
    let now = SystemTime::now();
    let result = if stale_on_wait && stale.as_ref().is_some_and(|e| e.within_stale_while_revalidate(now) || e.within_stale_if_error(now)) {
        match tokio::time::timeout(lock_timeout, rx).await {
            Ok(result) => result,
            Err(_) => return serve_stale(stale.as_deref(), head).unwrap_or_else(|| failed(&ProxyError::Internal("stale copy vanished"))),
        }
    } else {
        rx.await
    };
    match result {
        Ok(LeaderResult::FromPeer(stored)) => (respond::from_entry(&stored.entry, head, true, SystemTime::now()), Outcome::Collapsed),
        Ok(LeaderResult::Answer(answer)) => match stale_if_error(stale.as_deref(), head) {
            Some(served) => served,
            None => (respond::from_answer(&answer, head), Outcome::Miss { stored: false }),
        },
        Ok(LeaderResult::Fetched(result)) => answer(result, stale.as_deref(), head),
        Ok(LeaderResult::Error(err)) => stale_or_failed(stale.as_deref(), &err, head),
        Err(_) => failed(&ProxyError::Internal("the fetch task ended without an answer")),
    }
}

/// Fetches without coalescing (keys recently answered with something not storable,
/// authenticated requests) and stores the answer if it may be stored.
pub async fn direct(job: &FetchJob, stale: Option<&Entry>, head: bool) -> (Response<ProxyBody>, Outcome) {
    let result = job.fetch().await;
    if let Ok(Fetched::Storable { stored, .. }) = &result {
        job.route.pool.forget_uncacheable(&job.key).await;
        job.route.pool.store(&job.primary, stored, stale.is_some()).await;
    }
    answer(result, stale, head)
}

/// The response for a fetch result, with a stale copy standing in for a failed origin.
fn answer(result: Result<Fetched, ProxyError>, stale: Option<&Entry>, head: bool) -> (Response<ProxyBody>, Outcome) {
    match result {
        Ok(Fetched::Storable { stored: fetched, revalidated }) => {
            let entry = &fetched.entry;
            if revalidated {
                return (respond::from_entry(entry, head, true, SystemTime::now()), Outcome::Revalidated);
            }
            // Age only when the response arrived already aged (it carried `Age`, or its
            // `Date` is in the past): a fresh fetch has age 0, which needs no header.
            let aged = entry.initial_age >= Duration::from_secs(1);
            (respond::from_entry(entry, head, aged, SystemTime::now()), Outcome::Miss { stored: true })
        }
        Ok(Fetched::Streamed(parts, body)) => {
            if is_failure_status(parts.status)
                && let Some(served) = stale_if_error(stale, head)
            {
                return served;
            }
            (respond::streamed(parts, body, head), Outcome::Miss { stored: false })
        }
        Err(err) => stale_or_failed(stale, &err, head),
    }
}

/// A request whose fetch failed with `err`: the stored copy when the error came from
/// upstream and the entry's stale-if-error window allows, else the error's answer.
pub fn stale_or_failed(stale: Option<&Entry>, err: &ProxyError, head: bool) -> (Response<ProxyBody>, Outcome) {
    match stale_if_error(stale.filter(|_| err.allows_stale()), head) {
        Some(served) => served,
        None => failed(err),
    }
}

/// The stored copy, when the origin failed and the entry's stale-if-error window allows.
pub fn stale_if_error(stale: Option<&Entry>, head: bool) -> Option<(Response<ProxyBody>, Outcome)> {
    let now = SystemTime::now();
    let entry = stale.filter(|e| e.within_stale_if_error(now))?;
    Some((respond::from_entry(entry, head, true, now), Outcome::Stale(StaleReason::IfError)))
}

/// A stale copy for a request that waited `lock_timeout`, labelled by the window that
/// allows it.
fn serve_stale(stale: Option<&Entry>, head: bool) -> Option<(Response<ProxyBody>, Outcome)> {
    let now = SystemTime::now();
    let entry = stale?;
    let reason = if entry.within_stale_while_revalidate(now) {
        StaleReason::WhileRevalidate
    } else if entry.within_stale_if_error(now) {
        StaleReason::IfError
    } else {
        return None;
    };
    Some((respond::from_entry(entry, head, true, now), Outcome::Stale(reason)))
}

/// The flight itself: cross-replica lease, fetch, store, tell the waiters and the leader,
/// then (off every request's path) write to Redis and announce the fill.
async fn run_flight(job: FetchJob, guard: FlightGuard, leader: Option<oneshot::Sender<LeaderResult>>) {
    let pool = job.route.pool.clone();
    let mut lease = None;
    match pool.hold_back_for_peers(&job.peer_wait()).await {
        PeerOutcome::Filled(stored) => {
            pool.store_local(&job.primary, &stored).await;
            guard.complete(Fill::Stored(stored.clone()));
            if let Some(tx) = leader {
                let _ = tx.send(LeaderResult::FromPeer(stored));
            }
            return;
        }
        PeerOutcome::Lease(token) => lease = Some(token),
        PeerOutcome::FetchAnyway => {}
    }
    let (fill, result) = match job.fetch().await {
        Ok(Fetched::Storable { stored, revalidated }) => {
            pool.store_local(&job.primary, &stored).await;
            (Fill::Stored(stored.clone()), LeaderResult::Fetched(Ok(Fetched::Storable { stored, revalidated })))
        }
        Ok(Fetched::Streamed(parts, body)) if is_failure_status(parts.status) => {
            let status = parts.status;
            // The leader's outcome: an origin answer, not stored.
            let outcome = Outcome::Miss { stored: false };
            match read_answer(parts, body, job.route.origin.config.timeout).await {
                Ok(answer) => (Fill::Failed { outcome, failure: Failure::Answer(for_waiters(&answer)) }, LeaderResult::Answer(answer)),
                Err(result) => (Fill::Failed { outcome, failure: Failure::Status(status) }, LeaderResult::Fetched(Ok(result))),
            }
        }
        Ok(streamed @ Fetched::Streamed(..)) => {
            pool.remember_uncacheable(&job.key).await;
            (Fill::Uncacheable, LeaderResult::Fetched(Ok(streamed)))
        }
        // A background refresh queues at low priority; requests that joined it must not be
        // shed for that: they join again, and one of them asks at its own priority.
        Err(err) if job.background && err.is_shed() => (Fill::Abandoned, LeaderResult::Fetched(Err(err))),
        Err(err) => {
            let err = Arc::new(err);
            let outcome = failure_outcome(&err);
            (Fill::Failed { outcome, failure: Failure::Error(err.clone()) }, LeaderResult::Error(err))
        }
    };
    guard.complete(fill.clone());
    if let Some(tx) = leader {
        let _ = tx.send(result);
    }
    pool.finish_flight(&job.primary, &job.key, lease, &fill, job.replaces).await;
}

/// Reads a failure answer whole if it is small, to share it; otherwise gives the
/// response back to be streamed to the leader alone.
async fn read_answer(parts: http::response::Parts, body: ProxyBody, timeout: Duration) -> Result<Arc<Answer>, Fetched> {
    let small = body.size_hint().upper().is_some_and(|n| n <= SHARED_ANSWER_BYTES as u64);
    if !small {
        return Err(Fetched::Streamed(parts, body));
    }
    let headers = parts.headers;
    match tokio::time::timeout(timeout, body.collect()).await {
        Ok(Ok(collected)) => Ok(Arc::new(Answer { status: parts.status, headers, body: collected.to_bytes() })),
        _ => Ok(Arc::new(Answer { status: parts.status, headers, body: bytes::Bytes::new() })),
    }
}

/// The leader's answer as its waiters get it: no cookie set for the leader's client goes
/// to other clients.
fn for_waiters(answer: &Arc<Answer>) -> Arc<Answer> {
    if !answer.headers.contains_key(http::header::SET_COOKIE) {
        return answer.clone();
    }
    let mut headers = answer.headers.clone();
    headers.remove(http::header::SET_COOKIE);
    Arc::new(Answer { status: answer.status, headers, body: answer.body.clone() })
}
