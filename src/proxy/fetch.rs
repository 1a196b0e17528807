//! The fetch and store phases: ask the origin, decide whether the answer may be stored,
//! read it (up to `max_object_bytes`) and store it, or stream it through.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, AGE, CONTENT_LENGTH, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, RANGE};
use http::{HeaderValue, Method, Request, Response, Version, request, response};
use http_body_util::{BodyExt, Empty};

use super::forward::{ClientInfo, forward_headers, origin_uri, strip_hop_by_hop};
use super::{ProxyBody, RouteRuntime};
use crate::cache::policy;
use crate::cache::{CacheKey, Encodings, Entry};
use crate::config::{Priority, StaleOnError};
use crate::error::ProxyError;
use crate::metrics::OriginStatus;
use crate::origin::{OriginBody, OriginError, OutgoingBody};

/// What the origin's answer became.
pub enum Fetched {
    /// Read whole and storable: the caller stores it.
    Storable(Arc<Entry>),
    /// Not storable (or too large): passed through as it streams in.
    Streamed(response::Parts, ProxyBody),
}

/// Sends a request to the route's origin, counting the outcome per route.
pub async fn send(route: &RouteRuntime, req: Request<OutgoingBody>, priority: Priority, client: &ClientInfo) -> Result<Response<OriginBody>, ProxyError> {
    match route.origin.send(req, priority, client.timings.as_deref()).await {
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

fn empty_body() -> OutgoingBody {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

/// Fetches `key` from the origin with GET (also for HEAD, so the body can be stored),
/// without the client's conditional or range headers, and reads what may be stored.
pub async fn fetch(
    route: &RouteRuntime,
    parts: &request::Parts,
    client: &ClientInfo,
    key: &CacheKey,
    encodings: Encodings,
    priority: Priority,
) -> Result<Fetched, ProxyError> {
    let origin = &route.origin.config;
    let mut headers = forward_headers(parts, client, origin);
    for name in [IF_MATCH, IF_NONE_MATCH, IF_MODIFIED_SINCE, IF_UNMODIFIED_SINCE, IF_RANGE, RANGE, ACCEPT_ENCODING] {
        headers.remove(name);
    }
    headers.insert(ACCEPT_ENCODING, encodings.header_value());
    let mut policy_req = Request::new(());
    *policy_req.method_mut() = Method::GET;
    *policy_req.uri_mut() = parts.uri.clone();
    *policy_req.headers_mut() = headers.clone();
    let (policy_req, ()) = policy_req.into_parts();

    let mut req = Request::new(empty_body());
    *req.uri_mut() = origin_uri(origin, &parts.uri)?;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    let request_time = SystemTime::now();
    let res = send(route, req, priority, client).await?;
    let response_time = SystemTime::now();
    let (mut res_parts, body) = res.into_parts();
    strip_hop_by_hop(&mut res_parts.headers);

    let pool = &route.pool.config;
    let freshness =
        match policy::evaluate(&policy_req, &res_parts, pool, route.config.negative_ttl, request_time, response_time) {
            Ok(freshness) => freshness,
            Err(reason) => {
                tracing::trace!(?reason, key = %key.text, "response not stored");
                return Ok(Fetched::Streamed(res_parts, ProxyBody::stream(VecDeque::new(), body)));
            }
        };
    let declared_len = res_parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|len| len > pool.max_object_bytes as u64) {
        return Ok(Fetched::Streamed(res_parts, ProxyBody::stream(VecDeque::new(), body)));
    }
    let read = tokio::time::timeout(origin.timeout, read_up_to(body, pool.max_object_bytes)).await;
    let body = match read {
        Err(_) => return Err(origin_error(route, OriginError::Timeout(origin.timeout))),
        Ok(Err(err)) => return Err(origin_error(route, OriginError::Body(err))),
        Ok(Ok(BodyRead::TooLarge(prefix, rest))) => return Ok(Fetched::Streamed(res_parts, ProxyBody::stream(prefix, rest))),
        Ok(Ok(BodyRead::Complete(body))) => body,
    };
    res_parts.headers.remove(AGE);
    res_parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    // Purge tags are for this cache only: taken out of the stored response.
    let tags = take_tags(&mut res_parts.headers, &pool.tag_header);
    // A little jitter (up to 5% shorter) so entries stored together do not all expire
    // together; never longer than the origin allows.
    let jitter = freshness.lifetime.mul_f64(fastrand::f64() * 0.05);
    let entry = Arc::new(Entry {
        key: key.text.clone(),
        status: res_parts.status,
        headers: compact_headers(&res_parts.headers),
        // hyper hands out slices of its read buffers; a stored entry must own exactly
        // its bytes, or each small entry would pin a whole buffer beyond what L1 weighs.
        body: Bytes::copy_from_slice(&body),
        request_time,
        response_time,
        initial_age: freshness.initial_age,
        freshness_lifetime: freshness.lifetime - jitter,
        stale_while_revalidate: freshness.stale_while_revalidate,
        stale_if_error: freshness.stale_if_error,
        no_stale: freshness.no_stale,
        stale_on_error_always: route.config.stale_on_error == StaleOnError::Always,
        tags,
        invalidated: false,
    });
    Ok(Fetched::Storable(entry))
}

/// Tags an entry carries, at most this many, each at most `MAX_TAG_BYTES`.
const MAX_TAGS: usize = 64;
const MAX_TAG_BYTES: usize = 128;

/// Removes the tag header and returns its space-separated tags.
fn take_tags(headers: &mut http::HeaderMap, name: &http::HeaderName) -> Vec<String> {
    let values: Vec<HeaderValue> = headers.get_all(name).iter().cloned().collect();
    headers.remove(name);
    values
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(str::split_whitespace)
        .filter(|t| t.len() <= MAX_TAG_BYTES)
        .take(MAX_TAGS)
        .map(str::to_owned)
        .collect()
}

/// Copies header values into their own allocations (see the body copy above).
fn compact_headers(headers: &http::HeaderMap) -> http::HeaderMap {
    let mut out = http::HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let Ok(mut copy) = HeaderValue::from_bytes(value.as_bytes()) {
            copy.set_sensitive(value.is_sensitive());
            out.append(name.clone(), copy);
        }
    }
    out
}

fn origin_error(route: &RouteRuntime, source: OriginError) -> ProxyError {
    ProxyError::Origin { origin: route.origin.config.name.clone(), source }
}

enum BodyRead {
    Complete(Bytes),
    /// Over the limit: what was read so far, and the rest still to stream.
    TooLarge(VecDeque<Bytes>, OriginBody),
}

/// Reads a body whole if it is at most `limit` bytes.
async fn read_up_to(mut body: OriginBody, limit: usize) -> Result<BodyRead, crate::origin::OriginBodyError> {
    let mut chunks = VecDeque::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        total += data.len();
        chunks.push_back(data);
        if total > limit {
            return Ok(BodyRead::TooLarge(chunks, body));
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
pub async fn pass_through(
    route: &RouteRuntime,
    parts: request::Parts,
    body: hyper::body::Incoming,
    client: &ClientInfo,
) -> Result<Response<ProxyBody>, ProxyError> {
    let origin = &route.origin.config;
    let mut req = Request::new(body.boxed());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = origin_uri(origin, &parts.uri)?;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = forward_headers(&parts, client, origin);
    let res = send(route, req, route.config.priority, client).await?;
    let (mut res_parts, body) = res.into_parts();
    strip_hop_by_hop(&mut res_parts.headers);
    let head = parts.method == Method::HEAD;
    Ok(super::respond::streamed(res_parts, ProxyBody::stream(VecDeque::new(), body), head))
}
