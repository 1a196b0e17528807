//! The render phase: one function turns a [`Decision`] into the response the client
//! gets, applying everything that does not depend on where the response came from once:
//! `Age` for stored copies, 304 to the client's conditionals, 206 or 416 to a `Range` on
//! a stored body, the targeted cache-control fields and purge tags removed,
//! `Cache-Status`, and HEAD (headers only).

use std::time::SystemTime;

use http::header::{AGE, CONTENT_LENGTH, CONTENT_RANGE, ETAG, LAST_MODIFIED, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body::Body;

use super::context::RequestContext;
use super::decision::{Decision, Serve};
use crate::body::ProxyBody;
use crate::body::shared::Reader;
use crate::cache::Entry;
use crate::cache::coalesce::Answer;
use crate::cache::range::{RangeRequest, Resolved};
use crate::cache::revalidate::{Conditional, NOT_MODIFIED_FIELDS};
use crate::config::Fallback;
use crate::error::{error_response, plain_response};
use crate::outcome::{Outcome, Store};

/// The `Cache-Status` field (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
static CONTENT_DIGEST: HeaderName = HeaderName::from_static("content-digest");
static CONTENT_MD5: HeaderName = HeaderName::from_static("content-md5");

/// The response for `decision`. `conditional` is the client's, answered with 304 when
/// the response is a stored one (or was just stored) and the client has it already;
/// then `range`, answered from a stored body (hits, stale copies, revalidated, collapsed
/// and just-stored answers alike).
pub(super) fn render(
    ctx: &RequestContext,
    decision: Decision,
    conditional: Option<&Conditional>,
    range: Option<&RangeRequest>,
    now: SystemTime,
) -> Response<ProxyBody> {
    let Decision { serve, outcome } = decision;
    // A stored body, whole, or one being stored: what a range is cut from.
    let mut source = None;
    let mut res = match serve {
        Serve::Entry { entry, age } => {
            source = Some(Source::Stored(entry.body.clone()));
            from_entry(&entry, age, now)
        }
        Serve::Shared { entry, reader, age } => {
            let res = entry_response(&entry, age, now, ProxyBody::empty());
            source = Some(Source::Shared(reader));
            res
        }
        Serve::Answer(answer) => from_answer(&answer),
        // A HEAD sends no body: nothing to bound.
        Serve::Streamed(parts, body) if ctx.head => Response::from_parts(parts, body),
        Serve::Streamed(parts, body) => Response::from_parts(parts, body.with_send_timeout(ctx.send_timeout)),
        Serve::Fallback(fallback) => from_fallback(fallback),
        Serve::Off => off(),
        Serve::Error(err) => error_response(&err),
    };
    // Conditionals and ranges are answered for the cache's own copies.
    let stored = outcome.from_store() || outcome == Outcome::Miss(Store::Stored);
    if let Some(conditional) = conditional.filter(|_| stored) {
        res = not_modified_if(res, conditional);
    }
    // A shared fill answers ranges whether it is stored or not (one too large to store
    // is fetched whole for everyone who shares it, and each range cut from it).
    let shared = matches!(source, Some(Source::Shared(_)));
    let range = range.filter(|_| (stored || shared) && res.status() == StatusCode::OK);
    match source {
        Some(Source::Stored(body)) if range.is_some() => {
            let len = body.len() as u64;
            res = with_range(res, range, len, body, ProxyBody::full, |body, start, end| ProxyBody::full(body.slice(start as usize..=end as usize)));
        }
        // A 304 sends no body: the reader is dropped, and detached from the fill.
        Some(Source::Shared(_)) if res.status() == StatusCode::NOT_MODIFIED => {}
        Some(Source::Shared(reader)) => {
            // A client cut for falling behind loses its connection at once, not when it
            // next reads (HTTP/1.1; an h2 stream is reset when it is next polled).
            let reader = match ctx.closer.clone() {
                Some(closer) => reader.on_cut(Box::new(move || closer.close())),
                None => reader,
            };
            let send = |reader| if ctx.head { ProxyBody::shared(reader) } else { ProxyBody::shared(reader).with_send_timeout(ctx.send_timeout) };
            // Without a declared length a range cannot be placed before the end: the
            // whole body (a server may ignore `Range`, RFC 9110 section 14.2). With one, the
            // part is cut as it streams.
            let len = reader.declared();
            let range = range.filter(|_| len.is_some());
            res = with_range(res, range, len.unwrap_or(0), reader, send, |reader, start, end| send(reader.range(start, end)));
        }
        Some(Source::Stored(_)) | None => {}
    }
    // Targeted cache-control fields (RFC 9213) and purge tags are for this cache: not
    // passed on, whether the response was stored or not.
    let route = &ctx.route;
    for name in &route.config.cache.targeted_cache_control {
        res.headers_mut().remove(name);
    }
    if let Some(pool) = &route.pool {
        res.headers_mut().remove(&pool.config.tag_header);
    }
    add_cache_status(&mut res, outcome);
    if ctx.head { headers_only(res) } else { res }
}

/// Adds our `Cache-Status` member after any from caches closer to the origin (RFC 9211).
fn add_cache_status(res: &mut Response<ProxyBody>, outcome: Outcome) {
    let value = match res.headers().get(&CACHE_STATUS).and_then(|v| v.to_str().ok()) {
        Some(upstream) => HeaderValue::from_str(&format!("{upstream}, {}", outcome.cache_status())).unwrap_or_else(|_| outcome.cache_status_header()),
        None => outcome.cache_status_header(),
    };
    res.headers_mut().insert(CACHE_STATUS.clone(), value);
}

/// What a range is cut from: a stored body, or a reader of one being stored.
enum Source {
    Stored(bytes::Bytes),
    Shared(Reader),
}

/// A response built from a stored entry; `Age` is set when `with_age`.
pub fn from_entry(entry: &Entry, with_age: bool, now: SystemTime) -> Response<ProxyBody> {
    entry_response(entry, with_age, now, ProxyBody::full(entry.body.clone()))
}

/// A stored entry's status and header fields (and `Age` when `with_age`) with `body`.
fn entry_response(entry: &Entry, with_age: bool, now: SystemTime, body: ProxyBody) -> Response<ProxyBody> {
    let mut res = Response::new(body);
    *res.status_mut() = entry.status;
    *res.headers_mut() = entry.headers.clone();
    if with_age {
        res.headers_mut().insert(AGE, HeaderValue::from(entry.age(now).as_secs()));
    }
    res
}

/// `res` (a stored 200 of `len` bytes) with the body `source` gives: the whole of it
/// (`whole`) without `range`, or the part `range` asks for: 206 with `Content-Range`,
/// the part's length and the body `part` gives for its first and last byte; 416 with
/// the body's length when no byte of it is there (a plain answer: the stored response's
/// caching fields must not make a 416 look storable).
fn with_range<S>(
    res: Response<ProxyBody>,
    range: Option<&RangeRequest>,
    len: u64,
    source: S,
    whole: impl FnOnce(S) -> ProxyBody,
    part: impl FnOnce(S, u64, u64) -> ProxyBody,
) -> Response<ProxyBody> {
    let Some(range) = range else { return res.map(|_| whole(source)) };
    match range.resolve(res.headers(), len) {
        Resolved::Whole => res.map(|_| whole(source)),
        Resolved::Part { start, end } => {
            // Digits, a dash, a slash and a space: always a valid value.
            let Ok(content_range) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) else { return res.map(|_| whole(source)) };
            let (mut parts, _) = res.into_parts();
            parts.status = StatusCode::PARTIAL_CONTENT;
            parts.headers.insert(CONTENT_RANGE, content_range);
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(end - start + 1));
            // Digests of the whole content are wrong for a part (RFC 9530 section 2).
            for name in [&CONTENT_DIGEST, &CONTENT_MD5] {
                parts.headers.remove(name);
            }
            // Within the body by `resolve`: start <= end < len.
            Response::from_parts(parts, part(source, start, end))
        }
        Resolved::Unsatisfiable => {
            let mut out = plain_response(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
            // Digits: always a valid value (and none rather than a made-up one).
            if let Ok(content_range) = HeaderValue::from_str(&format!("bytes */{len}")) {
                out.headers_mut().insert(CONTENT_RANGE, content_range);
            }
            out
        }
    }
}

/// An origin answer shared between a flight's leader and waiters.
fn from_answer(answer: &Answer) -> Response<ProxyBody> {
    let mut res = Response::new(ProxyBody::full(answer.body.clone()));
    *res.status_mut() = answer.status;
    *res.headers_mut() = answer.headers.clone();
    res.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(answer.body.len()));
    res
}

/// The response as a HEAD request gets it: the same header fields and no body. The
/// body built for it is dropped here, its length kept in `Content-Length`, so the body
/// that goes out is at its end and is recorded as sent whole (the server never polls a
/// HEAD response's body).
fn headers_only(res: Response<ProxyBody>) -> Response<ProxyBody> {
    let (mut parts, body) = res.into_parts();
    if body.is_end_stream() {
        return Response::from_parts(parts, body);
    }
    if !parts.headers.contains_key(CONTENT_LENGTH)
        && let Some(len) = body.size_hint().exact()
    {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    Response::from_parts(parts, ProxyBody::empty())
}

/// Route mode `off`.
fn off() -> Response<ProxyBody> {
    let mut res = plain_response(StatusCode::SERVICE_UNAVAILABLE, "this route is switched off\n");
    res.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("5"));
    res
}

/// A route's configured static response.
fn from_fallback(fallback: Fallback) -> Response<ProxyBody> {
    let Fallback { status, mut headers, body } = fallback;
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    // A stand-in, not the page: a CDN or browser in front must not keep it past the
    // incident, unless the route's fallback says how long it may.
    if !headers.contains_key(http::header::CACHE_CONTROL) {
        headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    let mut res = Response::new(ProxyBody::full(body));
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    res
}

/// A 304 in place of `res` when the client's conditional says it already has this
/// representation (RFC 9110 section 13.1): the fields a 304 carries (section 15.4.5),
/// `Last-Modified` when there is no `ETag`, and `Age`.
fn not_modified_if(res: Response<ProxyBody>, conditional: &Conditional) -> Response<ProxyBody> {
    if !conditional.not_modified(res.status(), res.headers()) {
        return res;
    }
    let (parts, _) = res.into_parts();
    let mut out = Response::new(ProxyBody::empty());
    *out.status_mut() = StatusCode::NOT_MODIFIED;
    let headers = out.headers_mut();
    let last_modified = (!parts.headers.contains_key(ETAG)).then_some(&LAST_MODIFIED);
    for name in NOT_MODIFIED_FIELDS.iter().chain([&AGE]).chain(last_modified) {
        for value in parts.headers.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    out
}
