//! The fetch and store phases: ask the origin (conditionally, when a stored copy has a
//! validator), decide whether the answer may be stored, read it (up to
//! `max_object_bytes`) and store it, or stream it through. A 304 refreshes the stored
//! copy without its body being sent again (RFC 9111 section 4.3.4).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{ACCEPT_ENCODING, AGE, CONTENT_LENGTH, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, RANGE, SET_COOKIE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version, request, response};
use http_body_util::BodyExt;

use super::context::RequestContext;
use super::fill::{Filling, Step};
use super::forward::{ClientInfo, forward_headers, origin_uri};
use super::trust::strip_hop_by_hop;
use crate::body::ProxyBody;
use crate::body::shared::Shared;
use crate::cache::entry::{StoreFor, set_date_if_missing, take_tags};
use crate::cache::policy::{self, Freshness, NotStored, RouteRules};
use crate::cache::revalidate::{self, HeadUpdate};
use crate::cache::{CacheKey, Encodings, Entry, Pool, Stored};
use crate::config::{Priority, StaleOnError};
use crate::error::ProxyError;
use crate::memory::Reservation;
use crate::metrics::OriginStatus;
use crate::origin::{Interest, OriginBody, OriginError, OutgoingBody, Timings, Upload, empty_body};
use crate::runtime::RouteRuntime;
use crate::trace::RequestTrace;

/// What the origin's answer became.
pub enum Fetched {
    /// Read whole and storable: the caller stores it. `revalidated` when the origin
    /// confirmed the stored copy with 304 and this is that copy, refreshed.
    Storable { stored: Stored, revalidated: bool },
    /// Not storable (or too large), and why: passed through as it streams in.
    Streamed(response::Parts, ProxyBody, NotStored),
    /// Storable by its head, its body still to read into a copy its readers share.
    Filling(Filling),
}

/// Everything a fetch needs, owned, so it can run in its own task.
#[derive(Clone)]
pub struct FetchJob {
    pub route: Arc<RouteRuntime>,
    /// The route's pool (a job exists only for a route that has one).
    pub pool: Arc<Pool>,
    pub parts: request::Parts,
    pub client: ClientInfo,
    /// Origin timings for the access log, when the request is logged.
    pub timings: Option<Arc<Timings>>,
    /// The trace of the request that leads the fetch (waiters' traces carry no origin
    /// span: the origin saw one request).
    pub trace: Option<Arc<RequestTrace>>,
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
    /// Whether the answer may be stored: false for a request `no-store`, whose fetch is
    /// shared with concurrent `no-store` requests and kept by none.
    pub store: bool,
    /// Who wants the answer, for a fetch run in a flight's task: when they are all gone
    /// while it waits for an origin slot, it is never sent. None for a background refresh.
    pub interest: Option<Interest>,
    /// The pool's purge epoch when the request asked: an answer a purge since then
    /// covers is not stored.
    pub purge_epoch: u64,
    /// The client's `Range` and `If-Range` go to the origin: the key is known not to be
    /// stored, so no stored body will answer the range (such a fetch is never shared).
    /// Otherwise the whole object is asked for, to be stored and cut from.
    pub pass_range: bool,
}

impl FetchJob {
    /// Whether a purge since this job began covers `stored`: storing it now would bring
    /// back what was purged.
    pub fn purged_since(&self, stored: &Stored) -> bool {
        self.pool.purges.covering_since(self.purge_epoch, &stored.entry.key, Some(&stored.entry.tags)).is_some()
    }
}

impl FetchJob {
    /// Fetches at the route's priority, or at `low` for a background refresh.
    /// An answer that is not stored is counted here, once per fill, with its reason
    /// (none for a request `no-store`: it is a bypass, not a miss).
    pub async fn fetch(&self) -> Result<Fetched, ProxyError> {
        let priority = if self.background { Priority::Low } else { self.route.config.priority };
        let fetched = fetch(self, priority).await;
        if let Ok(Fetched::Streamed(_, _, reason)) = &fetched
            && self.store
        {
            self.route.metrics.not_stored(*reason);
        }
        fetched
    }
}

/// Sends a request to the route's origin, counting the outcome per route.
/// With a trace, the request is an origin span of it, and carries that span's
/// `traceparent`.
pub async fn send(
    route: &RouteRuntime,
    mut req: Request<OutgoingBody>,
    priority: Priority,
    timings: Option<&Timings>,
    trace: Option<&RequestTrace>,
) -> Result<Response<OriginBody>, ProxyError> {
    let span = trace.map(|trace| (trace.origin(req.headers_mut(), &route.origin.config.name), std::time::SystemTime::now()));
    let sent = route.origin.send(req, priority, timings).await;
    if let (Some((span, asked)), Some(trace)) = (span, trace) {
        let queue_wait = timings.map_or(std::time::Duration::ZERO, |t| std::time::Duration::from_micros(t.queue_us.load(std::sync::atomic::Ordering::Relaxed)));
        trace.phase("queue_wait", asked, asked + queue_wait, Vec::new());
        span.end(sent.as_ref().ok().map(|res| res.status().as_u16()), queue_wait);
    }
    match sent {
        Ok(res) => {
            route.metrics.origin_response(OriginStatus::Class(res.status().as_u16()));
            Ok(res)
        }
        Err(source) => {
            if let Some(status) = source.metric_status() {
                route.metrics.origin_response(status);
            }
            Err(ProxyError::Origin { origin: route.origin.config.name.clone(), source })
        }
    }
}

/// The headers sent to the origin for a cacheable request: the client's conditional
/// and range headers removed (the cache makes its own), `Accept-Encoding` reduced.
fn origin_headers(job: &FetchJob) -> HeaderMap {
    let mut headers = forward_headers(&job.parts, &job.client, &job.route.origin.config);
    for name in [IF_MATCH, IF_NONE_MATCH, IF_MODIFIED_SINCE, IF_UNMODIFIED_SINCE, ACCEPT_ENCODING] {
        headers.remove(name);
    }
    if !job.pass_range {
        headers.remove(RANGE);
        headers.remove(IF_RANGE);
    }
    headers.insert(ACCEPT_ENCODING, job.encodings.header_value());
    headers
}

/// The request as the storage policy sees it: a GET with the origin's headers, without
/// its `Cache-Control` and `Pragma` when the route ignores them (or a client's `no-store`
/// would make the answer unstorable, and the key hit-for-miss, for everyone), and for a
/// request `no-store` (whether its answer may be shared is the response's to say).
fn policy_request(job: &FetchJob, headers: &HeaderMap) -> request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = job.parts.uri.clone();
    *req.headers_mut() = headers.clone();
    if job.route.config.cache.ignore_request_cache_control || !job.store {
        req.headers_mut().remove(http::header::CACHE_CONTROL);
        req.headers_mut().remove(http::header::PRAGMA);
    }
    req.into_parts().0
}

/// A request to the origin with an empty body.
fn origin_request(job: &FetchJob, method: Method, headers: HeaderMap) -> Result<Request<OutgoingBody>, ProxyError> {
    let mut req = Request::new(empty_body());
    *req.method_mut() = method;
    *req.uri_mut() = origin_uri(&job.route.origin.config, &job.parts.uri)?;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    if let Some(interest) = &job.interest {
        req.extensions_mut().insert(interest.clone());
    }
    Ok(req)
}

fn rules(route: &RouteRuntime) -> RouteRules<'_> {
    RouteRules { rules: &route.config.cache, negative_ttl: route.config.negative_ttl }
}

/// Fetches the job's key from the origin with GET (also for HEAD, so the body can be
/// stored), conditionally when the stored copy has a validator, and reads what may be
/// stored. A 304 that describes another representation than the stored one is not
/// applied: the request is made again without conditions.
pub async fn fetch(job: &FetchJob, priority: Priority) -> Result<Fetched, ProxyError> {
    let route = &job.route;
    let headers = origin_headers(job);
    let policy_req = policy_request(job, &headers);
    let mut conditional = job.stored.as_deref().filter(|e| e.has_validator());
    loop {
        let mut sent = headers.clone();
        if let Some(stored) = conditional {
            revalidate::add_conditionals(&mut sent, stored);
        }
        let req = origin_request(job, Method::GET, sent)?;
        let request_time = job.pool.clock.now();
        let res = send(route, req, priority, job.timings.as_deref(), job.trace.as_deref()).await?;
        let response_time = job.pool.clock.now();
        let (mut res_parts, body) = res.into_parts();
        strip_hop_by_hop(&mut res_parts.headers);
        if route.config.cache.strip_cookies {
            res_parts.headers.remove(SET_COOKIE);
        }
        if let Some(stored) = conditional.filter(|_| res_parts.status == StatusCode::NOT_MODIFIED) {
            if revalidate::describes(&res_parts.headers, stored) {
                return Ok(refreshed(job, &policy_req, stored, res_parts, request_time, response_time));
            }
            tracing::debug!(key = %job.key.text, "304 for another representation; fetching in full");
            conditional = None;
            continue;
        }
        return store_or_stream(job, &policy_req, res_parts, body, request_time, response_time).await;
    }
}

/// The stored copy updated from a 304 (RFC 9111 sections 3.2 and 4.3.4): header fields
/// replaced, freshness computed anew, the body kept.
fn refreshed(
    job: &FetchJob,
    policy_req: &request::Parts,
    stored: &Entry,
    update: response::Parts,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Fetched {
    let mut merged = update;
    let tags = merge_update(job, stored, &mut merged, response_time);
    match policy::evaluate(policy_req, &merged, &job.pool.config, rules(&job.route), request_time, response_time) {
        Ok(freshness) => {
            let stored = build_stored(job, merged, stored.body.clone(), freshness, tags, request_time, response_time);
            Fetched::Storable { stored, revalidated: true }
        }
        Err(reason) => {
            tracing::trace!(?reason, key = %job.key.text, "revalidated response no longer storable");
            merged.headers.remove(AGE);
            Fetched::Streamed(merged, ProxyBody::full(stored.body.clone()), reason)
        }
    }
}

/// Turns a 304 or HEAD answer into the stored response updated by it (RFC 9111 section
/// 3.2): its purge tags taken out (they replace the stored ones when it has any), its
/// `Set-Cookie` dropped when the route strips cookies, a `Date` given if it has none, its
/// fields merged into the stored ones, the stored status kept. Returns the tags.
fn merge_update(job: &FetchJob, stored: &Entry, update: &mut response::Parts, response_time: SystemTime) -> Vec<String> {
    let tags = take_tags(&mut update.headers, &job.pool.config.tag_header);
    if job.route.config.cache.strip_cookies {
        update.headers.remove(SET_COOKIE);
    }
    // The update is a new response: without a Date of its own it gets the time it
    // arrived (RFC 9110 section 6.6.1), or the stored Date would make it look old.
    set_date_if_missing(&mut update.headers, response_time);
    update.headers = revalidate::merge_headers(&stored.headers, &update.headers);
    update.status = stored.status;
    if tags.is_empty() { stored.tags.clone() } else { tags }
}

/// Evaluates a full response: stored when it may be and fits, else streamed through.
async fn store_or_stream(
    job: &FetchJob,
    policy_req: &request::Parts,
    mut res_parts: response::Parts,
    body: OriginBody,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Result<Fetched, ProxyError> {
    let route = &job.route;
    let pool = &job.pool.config;
    let freshness = match policy::evaluate(policy_req, &res_parts, pool, rules(route), request_time, response_time) {
        Ok(freshness) => freshness,
        Err(reason) => {
            tracing::trace!(?reason, key = %job.key.text, "response not stored");
            let body = unstored_body(route, &res_parts, body).await?;
            return Ok(Fetched::Streamed(res_parts, body, reason));
        }
    };
    let declared_len = res_parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|len| len > pool.max_object_bytes as u64) {
        // Too large to store: streamed to everyone who shares the fetch, within
        // `stream_window`, drawn from (at most half of) the body budget, so such fills
        // never starve the ones that are stored; past it, passed through to this
        // request alone.
        let Some(window) = route.body_budget.reserve_from_half(pool.stream_window) else {
            return Ok(Fetched::Streamed(res_parts, ProxyBody::stream(VecDeque::new(), body), NotStored::TooLarge));
        };
        let tags = take_tags(&mut res_parts.headers, &pool.tag_header);
        let head = build_stored(job, res_parts, Bytes::new(), freshness, tags, request_time, response_time);
        let shared = Shared::new(declared_len, window);
        return Ok(Fetched::Filling(Filling::new(route, head, body, declared_len, shared, pool.stream_window).too_large()));
    }
    // The bytes read are drawn from the process's budget (all of a declared length at
    // once): a burst of large misses streams through rather than holding them all.
    let mut reservation = route.body_budget.reservation();
    let declared = declared_len.map_or(0, |len| usize::try_from(len).unwrap_or(usize::MAX));
    if !reservation.grow(declared) {
        return Ok(Fetched::Streamed(res_parts, ProxyBody::stream(VecDeque::new(), body), NotStored::Memory));
    }
    // Purge tags are for this cache only: taken out of the stored response.
    let tags = take_tags(&mut res_parts.headers, &pool.tag_header);
    let head = build_stored(job, res_parts, Bytes::new(), freshness, tags, request_time, response_time);
    let shared = Shared::new(declared_len, reservation);
    let mut filling = Filling::new(route, head, body, declared_len, shared, declared);
    // A small body (most pages) is read whole before anyone gets the head: one write,
    // no task to stream it. So is any body that has all arrived with its head. Any other
    // is handed to its readers now and streams.
    let small = declared_len.is_some_and(|len| len <= READ_WHOLE_STORED as u64);
    loop {
        let step = if small { Some(filling.step(route).await) } else { filling.step(route).now_or_never() };
        match step {
            Some(Step::More) => {}
            Some(Step::End) => return Ok(Fetched::Storable { stored: filling.into_stored(), revalidated: false }),
            Some(Step::Failed(err)) => return Err(err),
            Some(Step::Unstored(_)) | None => return Ok(Fetched::Filling(filling)),
        }
    }
}

/// Storable answers that declare at most this length are read whole before anyone gets
/// their head.
const READ_WHOLE_STORED: usize = 64 * 1024;

/// The entry for a storable response to this job's request.
fn build_stored(
    job: &FetchJob,
    res_parts: response::Parts,
    body: Bytes,
    freshness: Freshness,
    tags: Vec<String>,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Stored {
    let route = &job.route;
    let to = StoreFor {
        primary: &job.primary,
        request_headers: &job.parts.headers,
        key_headers: &route.config.cache.key_headers,
        stale_on_error_always: route.config.stale_on_error == StaleOnError::Always,
        keep_for_revalidation: job.pool.config.keep_for_revalidation,
    };
    Stored::from_response(&to, res_parts, body, freshness, tags, request_time, response_time)
}

/// What a HEAD sent to the origin for a stored GET response became (RFC 9111 section
/// 4.3.5).
pub enum HeadAnswer {
    /// A 200 for the same representation: the stored copy with updated header fields.
    Updated(Stored),
    /// A 200 for another representation: the stored copy must go.
    Invalidated(response::Parts),
    /// Anything else, passed to the client as it is, with why it updated nothing.
    Other(response::Parts, NotStored),
}

/// Validates the stored copy of a HEAD request with a HEAD to the origin: no body is
/// sent either way.
pub async fn head(job: &FetchJob, stored: &Entry) -> Result<HeadAnswer, ProxyError> {
    let headers = origin_headers(job);
    let policy_req = policy_request(job, &headers);
    let req = origin_request(job, Method::HEAD, headers)?;
    let request_time = job.pool.clock.now();
    let res = send(&job.route, req, job.route.config.priority, job.timings.as_deref(), job.trace.as_deref()).await?;
    let response_time = job.pool.clock.now();
    let (mut parts, _) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if parts.status != StatusCode::OK || stored.status != StatusCode::OK {
        return Ok(HeadAnswer::Other(parts, NotStored::Status));
    }
    if revalidate::head_update(&parts.headers, stored) == HeadUpdate::Invalidate {
        return Ok(HeadAnswer::Invalidated(parts));
    }
    let mut merged = Response::new(()).into_parts().0;
    merged.headers = parts.headers.clone();
    let tags = merge_update(job, stored, &mut merged, response_time);
    // Not storable as updated (say, it now carries `Set-Cookie`): the stored copy is
    // left as it was, neither updated nor invalidated.
    Ok(match policy::evaluate(&policy_req, &merged, &job.pool.config, rules(&job.route), request_time, response_time) {
        Ok(freshness) => HeadAnswer::Updated(build_stored(job, merged, stored.body.clone(), freshness, tags, request_time, response_time)),
        Err(reason) => HeadAnswer::Other(parts, reason),
    })
}

fn origin_error(route: &RouteRuntime, source: OriginError) -> ProxyError {
    ProxyError::Origin { origin: route.origin.config.name.clone(), source }
}

enum BodyRead {
    Complete(Bytes),
    /// Over the limit or the memory budget: what was read so far, and the rest still to
    /// stream.
    Unstored(VecDeque<Bytes>, OriginBody),
}

/// Answers that are not stored and declare at most this length are read whole before
/// they are sent on.
const READ_WHOLE_BYTES: usize = 16 * 1024;

/// The body of an answer that is not stored, as its client gets it. One that declares a
/// small length is read whole first, within the origin's `timeout` and from the body
/// budget: the client gets its head and body in one write, with no task to stream it
/// (most uncacheable answers, API calls and personal pages, are small), and an origin
/// failing mid-body is a clean 502 rather than an aborted response. Any other is streamed.
async fn unstored_body(route: &RouteRuntime, res_parts: &response::Parts, body: OriginBody) -> Result<ProxyBody, ProxyError> {
    let declared = res_parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    let Some(declared) = declared.filter(|len| *len <= READ_WHOLE_BYTES) else { return Ok(ProxyBody::stream(VecDeque::new(), body)) };
    let mut reservation = route.body_budget.reservation();
    if !reservation.grow(declared) {
        return Ok(ProxyBody::stream(VecDeque::new(), body));
    }
    let timeout = route.origin.config.timeout;
    match tokio::time::timeout(timeout, read_up_to(body, READ_WHOLE_BYTES, &mut reservation, declared)).await {
        Err(_) => Err(origin_error(route, OriginError::Timeout(timeout))),
        Ok(Err(err)) => Err(origin_error(route, OriginError::Body(err))),
        Ok(Ok(BodyRead::Complete(whole))) => Ok(ProxyBody::full_holding(whole, reservation)),
        // Longer than it said, or the budget ran out: the rest streams.
        Ok(Ok(BodyRead::Unstored(prefix, rest))) => Ok(ProxyBody::stream_holding(prefix, rest, reservation)),
    }
}

/// Reads a body whole if it is at most `limit` bytes, drawing what it reads beyond the
/// `reserved` bytes from `reservation`.
async fn read_up_to(mut body: OriginBody, limit: usize, reservation: &mut Reservation, reserved: usize) -> Result<BodyRead, crate::origin::OriginBodyError> {
    let mut chunks = VecDeque::new();
    let (mut total, mut reserved) = (0usize, reserved);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        total += data.len();
        chunks.push_back(data);
        if total > limit {
            return Ok(BodyRead::Unstored(chunks, body));
        }
        if total > reserved {
            if !reservation.grow(total - reserved) {
                return Ok(BodyRead::Unstored(chunks, body));
            }
            reserved = total;
        }
    }
    Ok(BodyRead::Complete(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().unwrap_or_default(),
        _ => {
            let mut whole = Vec::with_capacity(total);
            chunks.iter().for_each(|c| whole.extend_from_slice(c));
            Bytes::from(whole)
        }
    }))
}

/// Forwards a request that the cache does not handle (other methods, `no-store`),
/// streaming both bodies.
/// A GET or HEAD comes without a body (`None`: its body was read and dropped on arrival).
pub(super) async fn pass_through(
    ctx: &RequestContext,
    parts: request::Parts,
    body: Option<hyper::body::Incoming>,
) -> Result<(response::Parts, ProxyBody), ProxyError> {
    let route = &ctx.route;
    let origin = &route.origin.config;
    let (body, upload) = match body {
        Some(body) => {
            let (upload, done) = Upload::new(body);
            (upload.boxed(), Some(done))
        }
        None => (empty_body(), None),
    };
    let mut req = Request::new(body);
    if let Some(done) = upload {
        req.extensions_mut().insert(done);
    }
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = origin_uri(origin, &parts.uri)?;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = forward_headers(&parts, &ctx.client, origin);
    let res = send(route, req, route.config.priority, ctx.timings.as_deref(), ctx.trace.as_deref()).await?;
    let (mut res_parts, body) = res.into_parts();
    strip_hop_by_hop(&mut res_parts.headers);
    // Only for GET and HEAD: another method's answer failing mid-body must not turn into
    // a 502 that invites resending a request that was acted on.
    let body = if matches!(parts.method, Method::GET | Method::HEAD) {
        unstored_body(route, &res_parts, body).await?
    } else {
        ProxyBody::stream(VecDeque::new(), body)
    };
    Ok((res_parts, body))
}
