//! Building the entry to store from an origin's response: the stored header fields
//! (no `Age`, a `Content-Length`, a `Date`, the fields `no-cache="..."` names taken
//! out, values in their own allocations), its variant key and marker, its freshness
//! with a little jitter, and its purge tags.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{AGE, CONTENT_LENGTH, DATE};
use http::{HeaderMap, HeaderName, HeaderValue, response};

use super::Entry;
use crate::cache::policy::{self, Freshness};
use crate::cache::{CacheKey, Stored, key};

/// Whom an entry is stored for: the request's keys and headers, and the route's and
/// pool's settings that go into every entry.
pub struct StoreFor<'a> {
    /// The request's primary key (URL and `Accept-Encoding` group).
    pub primary: &'a CacheKey,
    /// The request's headers, for its variant key when the response varies.
    pub request_headers: &'a HeaderMap,
    /// The route's `key_headers`.
    pub key_headers: &'a [HeaderName],
    /// The route's `stale_on_error = "always"`.
    pub stale_on_error_always: bool,
    /// The pool's `keep_for_revalidation`.
    pub keep_for_revalidation: Duration,
}

impl Stored {
    /// The entry for a storable response, under its variant key (and with its variants
    /// marker) when it varies by `Vary` or by the route's `key_headers`.
    pub fn from_response(
        to: &StoreFor<'_>,
        mut res_parts: response::Parts,
        body: Bytes,
        freshness: Freshness,
        tags: Vec<String>,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Stored {
        res_parts.headers.remove(AGE);
        res_parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        set_date_if_missing(&mut res_parts.headers, response_time);
        for name in &freshness.strip {
            res_parts.headers.remove(name);
        }
        let names = key::merge_names(&freshness.vary, to.key_headers);
        let key = if names.is_empty() { to.primary.clone() } else { to.primary.variant(&names, to.request_headers) };
        // A little jitter (up to 5% shorter) so entries stored together do not all expire
        // together; never longer than the origin allows.
        let jitter = freshness.lifetime.mul_f64(fastrand::f64() * 0.05);
        let entry = Arc::new(Entry {
            key: key.text.clone(),
            status: res_parts.status,
            headers: compact_headers(&res_parts.headers),
            body,
            request_time,
            response_time,
            initial_age: freshness.initial_age,
            freshness_lifetime: freshness.lifetime - jitter,
            stale_while_revalidate: freshness.stale_while_revalidate,
            stale_if_error: freshness.stale_if_error,
            no_stale: freshness.no_stale,
            stale_on_error_always: to.stale_on_error_always,
            tags,
            invalidated: false,
            keep_for_revalidation: to.keep_for_revalidation,
            variants: false,
            last_used: super::LastUsed::default(),
        });
        let marker = (!names.is_empty()).then(|| Arc::new(Entry::variants_marker(to.primary.text.clone(), &names, &entry)));
        Stored { key, entry, marker }
    }
}

/// RFC 9110 section 6.6.1: a cached response without a (valid) `Date` gets the time it
/// was received.
pub fn set_date_if_missing(headers: &mut HeaderMap, received: SystemTime) {
    if policy::http_date(headers, DATE).is_none()
        && let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(received))
    {
        headers.insert(DATE, date);
    }
}

/// Tags an entry carries, at most this many, each at most `MAX_TAG_BYTES`.
const MAX_TAGS: usize = 64;
const MAX_TAG_BYTES: usize = 128;

/// Removes the tag header and returns its space-separated tags.
pub fn take_tags(headers: &mut HeaderMap, name: &HeaderName) -> Vec<String> {
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

/// Copies header values into their own allocations (a stored entry owns exactly its bytes).
fn compact_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let Ok(mut copy) = HeaderValue::from_bytes(value.as_bytes()) {
            copy.set_sensitive(value.is_sensitive());
            out.append(name.clone(), copy);
        }
    }
    out
}
