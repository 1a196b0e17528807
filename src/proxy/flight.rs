//! The fetch phase under coalescing: one fetch per key at a time in this process (a
//! flight), and across replicas through the pool's Redis lease.
//!
//! The fetch runs in its own task, so a leader whose client goes away neither cancels
//! it nor strands its waiters. Waiters get the stored entry (`collapsed`), are released
//! together to ask the origin themselves when the answer may not be stored for a reason
//! in the response, join a new fetch when the answer was the leader's own, share the
//! origin's answer when it failed, and after `lock_timeout` take a stale copy or, one of
//! them, take over the flight.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{AUTHORIZATION, COOKIE};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use super::admit::{admit, precheck};
use super::decision::{Decision, Serve, failure_outcome};
use super::fetch::{FetchJob, Fetched};
use super::fill::{FillRead, Filling, WindowFill};
use crate::body::ProxyBody;
use crate::body::shared::Reader;
use crate::cache::coalesce::{Answer, Failure, Fill, FlightGuard, Join, Remembered, Streaming};
use crate::cache::lease::{LeaseToken, PeerOutcome, PeerWait};
use crate::cache::policy::may_serve;
use crate::cache::range::{RangeRequest, Resolved};
use crate::cache::{CacheKey, Entry, Stored};
use crate::error::ProxyError;
use crate::origin::is_failure_status;
use crate::outcome::{NotStored, Outcome, StaleReason, Store};

/// Failure answers up to this size are read whole and shared with waiters.
const SHARED_ANSWER_BYTES: usize = 64 * 1024;

/// What this job's flight asks of the replicas sharing the pool's Redis.
fn peer_wait(job: &FetchJob) -> PeerWait<'_> {
    PeerWait {
        primary: &job.primary,
        key: &job.key,
        request_headers: &job.parts.headers,
        key_headers: &job.route.config.cache.key_headers,
        replaces: job.stored.as_ref().map(|old| old.response_time),
        // Long enough for the holder's whole fetch, so a live holder keeps it.
        lease_ttl: job.route.origin.config.timeout + job.pool.config.lock_timeout,
        accept_recent: job.background || job.stale_on_wait,
    }
}

/// This job's key for a stored response: its variant key when the response varies,
/// else the primary key.
fn key_for(job: &FetchJob, stored: &Stored) -> CacheKey {
    match &stored.marker {
        None => job.primary.clone(),
        Some(marker) => {
            let names = crate::cache::key::merge_names(&crate::cache::marker_names(marker), &job.route.config.cache.key_headers);
            job.primary.variant(&names, &job.parts.headers)
        }
    }
}

/// What the flight task hands its leader.
enum LeaderResult {
    Fetched(Result<Fetched, ProxyError>),
    /// The origin failed; its answer, read whole to share with the waiters, and why it
    /// was not stored.
    Answer(Arc<Answer>, NotStored),
    /// No answer from the origin; the error, shared with the waiters.
    Error(Arc<ProxyError>),
    /// Another replica filled the key while we held back.
    FromPeer(Stored),
    /// A storable answer's head: its body streams to the reader, counted as `outcome`.
    Streaming(Arc<Streaming>, Reader, Outcome),
    /// Over an admission budget: what the leader gets instead of a fetch.
    Refused(Decision),
}

/// A miss (or a stale entry past its stale-while-revalidate window): fetch under
/// coalescing and decide what to serve. The caller applies stale-if-error to it.
pub async fn miss(mut job: FetchJob, stale: Option<Arc<Entry>>) -> Decision {
    let pool = job.pool.clone();
    // A key known not to be stored: hit-for-miss asks alone; a ranged request for one
    // over `max_object_bytes` asks alone with its `Range` (never shared: its 206 is its own).
    let alone = match job.store.then(|| pool.remembered(&job.key)).flatten() {
        Some(Remembered::Uncacheable) => true,
        Some(Remembered::Streamed) => asks_range(&job),
        None => false,
    };
    if alone {
        job.pass_range = passes_range(&job);
        return direct_admitted(&job).await;
    }
    let lock_timeout = pool.config.lock_timeout;
    let mut join = pool.join_flight(&job.key);
    // A fill for another variant sends a waiter to its own variant's flight, once.
    let mut rejoined = false;
    let mut refetched = false;
    let mut abandoned = 0;
    let mut refused_since = None;
    loop {
        let mut waiting = match join {
            Join::Leader(guard) => return lead(job, guard, stale).await,
            Join::Waiter(waiting) => waiting,
        };
        let fill = match waiting.wait(lock_timeout).await {
            Some(fill) => fill,
            // The flight may have ended just as the wait timed out.
            None => match waiting.ended() {
                Some(fill) => fill,
                None => {
                    if job.stale_on_wait
                        && let Some(served) = serve_stale(stale.as_ref(), pool.clock.now())
                    {
                        return served;
                    }
                    join = pool.take_over_flight(&job.key, waiting.flight_id);
                    continue;
                }
            },
        };
        // A stored or streaming fill this request may not have (it carries
        // `Authorization`, the fill does not say it is shared) is asked for alone; one for
        // another variant sends it to its own variant's flight, once.
        if let Some(head) = fill.head() {
            let refused = !may_serve(&job.parts.headers, &head.entry.headers, &job.route.config.cache);
            let mine = key_for(&job, head);
            if refused || mine.hash != head.key.hash {
                drop(fill);
                // A request `no-store` joins no other flight: it must not be stored.
                if refused || rejoined || !job.store {
                    return direct_admitted(&job).await;
                }
                rejoined = true;
                job.key = mine;
                join = pool.join_flight(&job.key);
                continue;
            }
        }
        match fill {
            Fill::Stored(stored) => return Decision::entry(stored.entry, Outcome::Collapsed),
            Fill::Streaming(streaming) => {
                // A range beyond what could have been stored, of an answer too large to
                // store: asked of the origin with its own `Range` rather than read through.
                if streaming.not_stored.is_some() && range_starts_beyond(&job, &streaming) {
                    drop((streaming, waiting));
                    job.pass_range = passes_range(&job);
                    return direct_admitted(&job).await;
                }
                let outcome = streaming.not_stored.map_or(Outcome::Collapsed, |reason| Outcome::Miss(Store::Not(reason)));
                match streaming.shared.attach() {
                    Some(reader) => return Decision::new(Serve::Shared { entry: streaming.head.entry.clone(), reader, age: true }, outcome),
                    // Its body failed just now: join again (the flight is about to end).
                    None if abandoned >= 2 => return direct_admitted(&job).await,
                    None => {
                        abandoned += 1;
                        join = pool.join_flight(&job.key);
                    }
                }
            }
            Fill::Uncacheable => {
                job.pass_range = passes_range(&job);
                return direct_admitted(&job).await;
            }
            // The leader's own answer: a new fetch among the waiters, once; then alone.
            Fill::Personal if refetched => return direct_admitted(&job).await,
            Fill::Personal => {
                refetched = true;
                join = pool.join_flight(&job.key);
            }
            Fill::Failed { outcome, failure } => return Decision::new(failure_serve(&job, failure), outcome),
            // The leader went away, or a background refresh was shed: join again, and
            // after twice ask the origin alone rather than keep meeting new refreshes.
            Fill::Abandoned if abandoned >= 2 => return direct_admitted(&job).await,
            Fill::Abandoned => {
                abandoned += 1;
                join = pool.join_flight(&job.key);
            }
            // Not a failure of the fetch: the next leader is charged to its own client (a
            // refused one leaves, costing nothing), so the waiters stay coalesced. Only
            // after `lock_timeout` of refused leaders (a bot leading again and again) does
            // a waiter ask alone, charged too.
            Fill::Refused => {
                let since = *refused_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= lock_timeout {
                    return direct_admitted(&job).await;
                }
                join = pool.join_flight(&job.key);
            }
        }
    }
}

/// The leader's failure as a waiter gets it.
fn failure_serve(job: &FetchJob, failure: Failure) -> Serve {
    match failure {
        Failure::Answer(answer) => Serve::Answer(answer),
        Failure::Status(status) => Serve::Error(Arc::new(ProxyError::OriginStatus { origin: job.route.origin.config.name.clone(), status })),
        Failure::Error(err) => Serve::Error(err),
    }
}

/// Starts a background refresh of the key unless one is already running.
pub fn refresh_in_background(mut job: FetchJob) {
    job.background = true;
    if let Some(guard) = job.pool.try_lead_flight(&job.key) {
        tokio::spawn(async move {
            // The request found the old copy just before a refresh stored a new one and
            // ended its flight: nothing left to refresh (the guard ends this one unused).
            if let Some(old) = &job.stored
                && job.pool.has_newer_local(&job.primary, &job.key, old.response_time).await
            {
                return;
            }
            run_flight(job, guard, None).await;
        });
    }
}

/// Leads the flight: runs it in its own task and answers from its result. With a stale
/// copy at hand, waits no longer than `lock_timeout` for it, like the waiters.
async fn lead(mut job: FetchJob, guard: FlightGuard, stale: Option<Arc<Entry>>) -> Decision {
    // Over budget already: refused before it holds back for the other replicas, so it
    // costs Redis no lease. Its waiters lead again among themselves.
    if let Some(refused) = precheck(&job) {
        guard.complete(Fill::Refused);
        return refused;
    }
    let (tx, rx) = oneshot::channel();
    let lock_timeout = job.pool.config.lock_timeout;
    let stale_on_wait = job.stale_on_wait;
    let clock = job.pool.clock.clone();
    // This request wants the answer until it has one or its client is gone.
    let wants = guard.interest().hold();
    // A ranged request may have to ask again, alone (see `range_starts_beyond`).
    let alone = asks_range(&job).then(|| Box::new(job.clone()));
    job.interest = Some(guard.interest().clone());
    tokio::spawn(run_flight(job, guard, Some(tx)));
    let now = clock.now();
    let result = if stale_on_wait && stale.as_ref().is_some_and(|e| e.within_stale_while_revalidate(now) || e.within_stale_if_error(now)) {
        match tokio::time::timeout(lock_timeout, rx).await {
            Ok(result) => result,
            Err(_) => {
                // Served stale: the fetch goes on as a refresh of the copy.
                wants.keep();
                return serve_stale(stale.as_ref(), clock.now()).unwrap_or_else(|| Decision::failed(ProxyError::Internal("stale copy vanished")));
            }
        }
    } else {
        rx.await
    };
    match result {
        Ok(LeaderResult::FromPeer(stored)) => Decision::entry(stored.entry, Outcome::Collapsed),
        Ok(LeaderResult::Streaming(streaming, reader, outcome)) => {
            if streaming.not_stored.is_some()
                && let Some(mut job) = alone.filter(|job| range_starts_beyond(job, &streaming))
            {
                drop((streaming, reader));
                job.pass_range = passes_range(&job);
                // Boxed: a rare path, kept out of every request's future.
                return Box::pin(direct_admitted(&job)).await;
            }
            let entry = streaming.head.entry.clone();
            let age = entry.initial_age >= Duration::from_secs(1);
            Decision::new(Serve::Shared { entry, reader, age }, outcome)
        }
        Ok(LeaderResult::Answer(answer, reason)) => Decision::new(Serve::Answer(answer), Outcome::Miss(Store::Not(reason))),
        Ok(LeaderResult::Fetched(result)) => answer(result),
        Ok(LeaderResult::Error(err)) => Decision::failed(err),
        Ok(LeaderResult::Refused(refused)) => refused,
        Err(_) => Decision::failed(ProxyError::Internal("the fetch task ended without an answer")),
    }
}

/// A key known not to be stored sends the client's `Range` on: only for GET, the one
/// method range handling is defined for (a HEAD is fetched as a GET, and must get the
/// whole representation's headers).
fn passes_range(job: &FetchJob) -> bool {
    job.parts.method == http::Method::GET
}

/// The complete length a 206's `Content-Range` gives (`bytes a-b/N`), if it gives one.
fn complete_length(headers: &http::HeaderMap) -> Option<u64> {
    let value = headers.get(http::header::CONTENT_RANGE)?.to_str().ok()?;
    value.strip_prefix("bytes ")?.rsplit_once('/')?.1.trim().parse().ok()
}

/// Whether the request asks for a single range bulwark would answer.
fn asks_range(job: &FetchJob) -> bool {
    RangeRequest::from_request(&job.parts.method, &job.parts.headers).is_some()
}

/// Whether the request's range, placed in the streaming answer's declared length, starts
/// past `max_object_bytes` (or half `stream_window`, if less): reading the shared fill up
/// to it would take longest, and a reader skipping that far ahead would drag the origin
/// at its pace and leave the others behind the window.
fn range_starts_beyond(job: &FetchJob, streaming: &Streaming) -> bool {
    let (Some(range), Some(len)) = (RangeRequest::from_request(&job.parts.method, &job.parts.headers), streaming.shared.declared()) else { return false };
    let pool = &job.pool.config;
    let beyond = pool.max_object_bytes.min(pool.stream_window / 2) as u64;
    matches!(range.resolve(&streaming.head.entry.headers, len), Resolved::Part { start, .. } if start > beyond)
}

/// [`direct`], charged to the route's admission budgets first.
async fn direct_admitted(job: &FetchJob) -> Decision {
    match admit(job) {
        Some(refused) => refused,
        None => direct(job).await,
    }
}

/// Fetches without coalescing (keys recently answered with something not storable, and
/// waiters a flight could not serve) and stores the answer if it may be stored.
pub async fn direct(job: &FetchJob) -> Decision {
    let result = match job.fetch().await {
        Ok(Fetched::Filling(filling)) => return stream_alone(job, filling),
        other => other,
    };
    // Still not storable, by the response's own word: remembered again, so a key that
    // stays uncacheable stays hit-for-miss (and its ranges keep going to the origin)
    // rather than falling back into a flight every few seconds. A 206 says nothing of
    // the whole object unless it forbids storing outright.
    if let Ok(Fetched::Streamed(parts, _, reason)) = &result
        && job.store
        && !is_failure_status(parts.status)
        && !leaders_own(job, parts, *reason)
        && !(parts.status == http::StatusCode::PARTIAL_CONTENT && *reason == NotStored::Status)
    {
        job.pool.remember_not_stored(&job.key, *reason);
    }
    // A 206 whose whole is too large to store (`Content-Range: bytes a-b/N`, N over
    // `max_object_bytes`) keeps its key "stream, don't store", so the next seek into it
    // goes to the origin with its range again rather than leading a whole fetch.
    if let Ok(Fetched::Streamed(parts, _, _)) = &result
        && job.store
        && parts.status == http::StatusCode::PARTIAL_CONTENT
        && complete_length(&parts.headers).is_some_and(|len| len > job.pool.config.max_object_bytes as u64)
    {
        job.pool.remember_not_stored(&job.key, NotStored::TooLarge);
    }
    if let Ok(Fetched::Storable { stored, .. }) = &result
        && job.store
        && job.purged_since(stored)
    {
        job.route.metrics.not_stored(NotStored::Purged);
        return Decision::new(Serve::Entry { entry: stored.entry.clone(), age: false }, Outcome::Miss(Store::Not(NotStored::Purged)));
    }
    if let Ok(Fetched::Storable { stored, .. }) = &result
        && job.store
    {
        job.pool.forget_uncacheable(&job.key);
        Box::pin(crate::trace::timed(job.trace.as_deref(), "store", job.pool.store(&job.primary, stored, job.replaces))).await;
    }
    answer(result)
}

/// An answer fetched without coalescing whose body goes through a shared fill: read
/// (and stored, if it may be) in its own task, and streamed to the request as it arrives.
fn stream_alone(job: &FetchJob, filling: Filling) -> Decision {
    let Some(reader) = filling.attach() else { return Decision::failed(ProxyError::Internal("a new fill refused its reader")) };
    let entry = filling.head.entry.clone();
    let purged = job.store && job.purged_since(&filling.head);
    let outcome = head_outcome(purged, filling.not_stored());
    if let Outcome::Miss(Store::Not(reason)) = outcome
        && job.store
    {
        job.route.metrics.not_stored(reason);
        if reason == NotStored::TooLarge {
            job.pool.remember_not_stored(&job.key, reason);
        }
    }
    let store = job.store && outcome == Outcome::Miss(Store::Stored);
    let filling_head = filling.head.clone();
    let job = job.clone();
    tokio::spawn(async move {
        let shared = filling.shared.clone();
        let _ends = shared.writer_guard();
        match filling.read(&job.route).await {
            FillRead::Complete(_) if store && job.purged_since(&filling_head) => {
                job.route.metrics.not_stored(NotStored::Purged);
                shared.finish();
            }
            FillRead::Complete(stored) => {
                if store {
                    job.pool.forget_uncacheable(&job.key);
                    Box::pin(crate::trace::timed(job.trace.as_deref(), "store", job.pool.store(&job.primary, &stored, job.replaces))).await;
                }
                shared.finish();
            }
            FillRead::Unstored(reason, rest) => {
                // Grown past what it may store, or the budget: counted now (one known
                // too large by its head was counted already).
                if store {
                    job.route.metrics.not_stored(reason);
                    if reason == NotStored::TooLarge {
                        job.pool.remember_not_stored(&job.key, reason);
                    }
                }
                rest.run().await;
            }
            FillRead::Failed(err) => tracing::debug!(error = %err, "origin body failed while streamed"),
        }
    });
    let age = entry.initial_age >= Duration::from_secs(1);
    Decision::new(Serve::Shared { entry, reader, age }, outcome)
}

/// The outcome of a fill's first reader, decided when its head goes out: purged since
/// the request asked, or known from the head not to be stored (and why), or stored.
fn head_outcome(purged: bool, not_stored: Option<NotStored>) -> Outcome {
    match (purged, not_stored) {
        (true, _) => Outcome::Miss(Store::Not(NotStored::Purged)),
        (false, Some(reason)) => Outcome::Miss(Store::Not(reason)),
        (false, None) => Outcome::Miss(Store::Stored),
    }
}

/// What a fetch result serves.
fn answer(result: Result<Fetched, ProxyError>) -> Decision {
    match result {
        Ok(Fetched::Storable { stored, revalidated: true }) => Decision::entry(stored.entry, Outcome::Revalidated),
        Ok(Fetched::Storable { stored, revalidated: false }) => {
            // Age only when the response arrived already aged (it carried `Age`, or its
            // `Date` is in the past): a fresh fetch has age 0, which needs no header.
            let age = stored.entry.initial_age >= Duration::from_secs(1);
            Decision::new(Serve::Entry { entry: stored.entry, age }, Outcome::Miss(Store::Stored))
        }
        Ok(Fetched::Streamed(parts, body, reason)) => Decision::new(Serve::Streamed(parts, body), Outcome::Miss(Store::Not(reason))),
        Ok(Fetched::Filling(_)) => Decision::failed(ProxyError::Internal("a fill reached the answer unread")),
        Err(err) => Decision::failed(err),
    }
}

/// A stale copy for a request that waited `lock_timeout`, labelled by the window that
/// allows it.
fn serve_stale(stale: Option<&Arc<Entry>>, now: SystemTime) -> Option<Decision> {
    let entry = stale?;
    let reason = if entry.within_stale_while_revalidate(now) {
        StaleReason::WhileRevalidate
    } else if entry.within_stale_if_error(now) {
        StaleReason::IfError
    } else {
        return None;
    };
    Some(Decision::entry(entry.clone(), Outcome::Stale(reason)))
}

/// The flight itself: cross-replica lease, fetch, store, tell the waiters and the leader,
/// then (off every request's path) write to Redis and announce the fill.
async fn run_flight(job: FetchJob, guard: FlightGuard, leader: Option<oneshot::Sender<LeaderResult>>) {
    let pool = job.pool.clone();
    let mut lease = None;
    // A fetch for requests `no-store` stores nothing, so no replica waits for it; nor
    // for a key lately too large to store (each replica streams its own fetch).
    if job.store && !pool.is_streamed(&job.key) {
        match Box::pin(pool.hold_back_for_peers(&peer_wait(&job))).await {
            PeerOutcome::Filled(stored) if may_serve(&job.parts.headers, &stored.entry.headers, &job.route.config.cache) => {
                Box::pin(pool.store_local(&job.primary, &stored)).await;
                guard.complete(Fill::Stored(stored.clone()));
                if let Some(tx) = leader {
                    let _ = tx.send(LeaderResult::FromPeer(stored));
                }
                return;
            }
            PeerOutcome::Lease(token) => lease = Some(token),
            // Another replica's fill this request may not have, or no word from the peers.
            PeerOutcome::Filled(_) | PeerOutcome::FetchAnyway => {}
        }
    }
    // Charged only now that it will reach the origin: a key another replica filled took
    // no token. Refused, the leader gets the refusal, the waiters lead again among
    // themselves, and the other replicas fetch for themselves.
    if let Some(refused) = admit(&job) {
        guard.complete(Fill::Refused);
        if let Some(tx) = leader {
            let _ = tx.send(LeaderResult::Refused(refused));
        }
        if job.store {
            Box::pin(pool.finish_flight(&job.primary, &job.key, lease, &Fill::Refused, false)).await;
        }
        return;
    }
    // The lease is renewed while the fetch runs: queue wait, headers and body.
    let fetched = Box::pin(pool.renewing(&job.key, lease.as_ref(), peer_wait(&job).lease_ttl, job.fetch())).await;
    let (fill, result) = match fetched {
        Ok(Fetched::Filling(filling)) => return Box::pin(stream_fill(job, guard, leader, lease, filling)).await,
        // Purged while it was fetched: not stored, and not handed to the waiters (those
        // who asked after the purge are in a flight of their own; the others fetch anew).
        Ok(Fetched::Storable { stored, .. }) if job.store && job.purged_since(&stored) => {
            job.route.metrics.not_stored(NotStored::Purged);
            let entry = &stored.entry;
            let answer = Arc::new(Answer { status: entry.status, headers: entry.headers.clone(), body: entry.body.clone() });
            (Fill::Personal, LeaderResult::Answer(answer, NotStored::Purged))
        }
        Ok(Fetched::Storable { stored, revalidated }) => {
            if job.store {
                Box::pin(crate::trace::timed(job.trace.as_deref(), "store", pool.store_local(&job.primary, &stored))).await;
            }
            (Fill::Stored(stored.clone()), LeaderResult::Fetched(Ok(Fetched::Storable { stored, revalidated })))
        }
        Ok(Fetched::Streamed(parts, body, reason)) if is_failure_status(parts.status) => {
            let status = parts.status;
            // The leader's outcome: an origin answer, not stored.
            let outcome = Outcome::Miss(Store::Not(reason));
            match Box::pin(read_answer(parts, body, reason, job.route.origin.config.timeout)).await {
                Ok(answer) => (Fill::Failed { outcome, failure: Failure::Answer(for_waiters(&answer)) }, LeaderResult::Answer(answer, reason)),
                Err(result) => (Fill::Failed { outcome, failure: Failure::Status(status) }, LeaderResult::Fetched(Ok(result))),
            }
        }
        Ok(Fetched::Streamed(parts, body, reason)) if leaders_own(&job, &parts, reason) => {
            (Fill::Personal, LeaderResult::Fetched(Ok(Fetched::Streamed(parts, body, reason))))
        }
        Ok(Fetched::Streamed(parts, body, reason)) => {
            if job.store {
                pool.remember_not_stored(&job.key, reason);
            }
            (Fill::Uncacheable, LeaderResult::Fetched(Ok(Fetched::Streamed(parts, body, reason))))
        }
        // A background refresh queues at low priority; requests that joined it must not be
        // shed for that: they join again, and one of them asks at its own priority. A
        // fetch that everyone gave up on while it queued was never sent: anyone who
        // joined since joins again.
        Err(err) if (job.background && err.is_shed()) || err.is_unwanted() => (Fill::Abandoned, LeaderResult::Fetched(Err(err))),
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
    if job.store {
        Box::pin(pool.finish_flight(&job.primary, &job.key, lease, &fill, job.replaces)).await;
    }
}

/// An answer's head came: the leader and the waiters read its body as it arrives.
/// A storable one is read whole by the flight, stored in L1 and the flight closed before
/// the last byte is released, then written to Redis. Purged since the request asked, it
/// is streamed but not stored (the waiters join a new fetch). Too large to store (by its
/// head, or once it grows past `max_object_bytes`), it streams to everyone who joins
/// while its first byte is still kept, the other replicas told at once to fetch for
/// themselves. Over the body budget, it streams on to those reading it. Failing part
/// way, it fails them all and nothing is stored.
async fn stream_fill(job: FetchJob, guard: FlightGuard, leader: Option<oneshot::Sender<LeaderResult>>, lease: Option<LeaseToken>, filling: Filling) {
    let pool = job.pool.clone();
    let _ends = filling.shared.writer_guard();
    let purged = job.store && job.purged_since(&filling.head);
    let not_stored = filling.not_stored();
    let streaming = Arc::new(Streaming { head: filling.head.clone(), shared: filling.shared.clone(), not_stored });
    let outcome = head_outcome(purged, not_stored);
    if let Some(tx) = leader {
        let result = match filling.attach() {
            Some(reader) => LeaderResult::Streaming(streaming.clone(), reader, outcome),
            // Only a body failed already refuses a reader.
            None => LeaderResult::Error(Arc::new(ProxyError::Origin {
                origin: job.route.origin.config.name.clone(),
                source: crate::origin::OriginError::Body(crate::origin::OriginBodyError::Interrupted),
            })),
        };
        let _ = tx.send(result);
    }
    let shared = filling.shared.clone();
    let filling_head = filling.head.clone();
    if purged {
        job.route.metrics.not_stored(NotStored::Purged);
        let fill = Fill::Personal;
        guard.complete(fill.clone());
        Box::pin(pool.finish_flight(&job.primary, &job.key, lease, &fill, job.replaces)).await;
        match Box::pin(filling.read(&job.route)).await {
            FillRead::Complete(_) => shared.finish(),
            FillRead::Unstored(_, rest) => rest.run().await,
            FillRead::Failed(_) => {}
        }
        return;
    }
    if let Some(reason) = not_stored {
        let rest = filling.into_window();
        return Box::pin(stream_unstored(&job, guard, lease, streaming, reason, rest)).await;
    }
    guard.publish(Fill::Streaming(streaming.clone()));
    drop(streaming);
    let fill = match Box::pin(filling.read(&job.route)).await {
        // Purged while its body came: not stored (storing it would bring back what was
        // purged, and a flight begun after the purge would be handed it); the waiters
        // that have not joined fetch anew.
        FillRead::Complete(stored) if job.store && job.purged_since(&stored) => {
            job.route.metrics.not_stored(NotStored::Purged);
            guard.complete(Fill::Personal);
            shared.finish();
            Fill::Personal
        }
        FillRead::Complete(stored) => {
            if job.store {
                Box::pin(crate::trace::timed(job.trace.as_deref(), "store", pool.store_local(&job.primary, &stored))).await;
            }
            let fill = Fill::Stored(stored);
            guard.complete(fill.clone());
            shared.finish();
            fill
        }
        // Too large after all: from now on like one known too large by its head (those
        // reading already keep the outcome their head went out with).
        FillRead::Unstored(NotStored::TooLarge, rest) => {
            let streaming = Arc::new(Streaming { head: filling_head, shared, not_stored: Some(NotStored::TooLarge) });
            return Box::pin(stream_unstored(&job, guard, lease, streaming, NotStored::TooLarge, rest)).await;
        }
        // The body budget ran out: the process's doing, nothing remembered; the waiters
        // that have not joined fetch anew.
        FillRead::Unstored(reason, rest) => {
            if job.store {
                job.route.metrics.not_stored(reason);
            }
            let fill = Fill::Personal;
            guard.complete(fill.clone());
            if job.store {
                Box::pin(pool.finish_flight(&job.primary, &job.key, lease, &fill, job.replaces)).await;
            }
            return rest.run().await;
        }
        FillRead::Failed(err) => {
            let fill = Fill::Failed { outcome: Outcome::Error, failure: Failure::Error(Arc::new(err)) };
            guard.complete(fill.clone());
            fill
        }
    };
    // The readers hold the shared copy as long as they need it; the Redis write does not.
    drop(shared);
    if job.store {
        Box::pin(pool.finish_flight(&job.primary, &job.key, lease, &fill, job.replaces)).await;
    }
}

/// An answer too large to store, streaming: counted once, remembered as "stream, don't
/// store", the other replicas told to fetch for themselves, and shared with everyone who
/// joins while its first byte is still kept; then the flight ends (later requests share a
/// new fetch) and it streams on to its readers.
async fn stream_unstored(job: &FetchJob, guard: FlightGuard, lease: Option<LeaseToken>, streaming: Arc<Streaming>, reason: NotStored, mut rest: WindowFill) {
    let pool = &job.pool;
    if job.store {
        job.route.metrics.not_stored(reason);
        pool.remember_not_stored(&job.key, reason);
    }
    // Published before the Redis round trip: joiners meanwhile get this fill's outcome.
    guard.publish(Fill::Streaming(streaming.clone()));
    if job.store {
        Box::pin(pool.finish_flight(&job.primary, &job.key, lease, &Fill::Uncacheable, false)).await;
    }
    let more = rest.run_while_joinable().await;
    guard.complete(Fill::Streaming(streaming));
    if more {
        rest.run().await;
    }
}

/// Whether an answer that is not stored is the leader's own, not the key's: a 4xx (a
/// client can provoke one with a bad header), or an answer to a request that carried
/// `Cookie` or `Authorization` (its page, or unstorable because of them). One client
/// must not hand its error to the others, nor switch coalescing off for everyone by
/// making the key hit-for-miss.
fn leaders_own(job: &FetchJob, parts: &http::response::Parts, reason: NotStored) -> bool {
    parts.status.is_client_error()
        // The process's memory budget is no reason in the response: nothing remembered.
        || matches!(reason, NotStored::Authorization | NotStored::CookieHeuristic | NotStored::Memory)
        || job.parts.headers.contains_key(COOKIE)
        || job.parts.headers.contains_key(AUTHORIZATION)
}

/// Reads a failure answer whole if it is small, to share it; otherwise gives the
/// response back to be streamed to the leader alone.
async fn read_answer(parts: http::response::Parts, body: ProxyBody, reason: NotStored, timeout: Duration) -> Result<Arc<Answer>, Fetched> {
    let small = body.size_hint().upper().is_some_and(|n| n <= SHARED_ANSWER_BYTES as u64);
    if !small {
        return Err(Fetched::Streamed(parts, body, reason));
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
