//! Whether a response may be stored by a shared cache, and for how long it is fresh
//! (RFC 9111 sections 3 and 4.2, RFC 5861 stale directives).
//!
//! `http-cache-semantics` decides the base storability (method, status, `no-store`,
//! `private`, `Authorization` per section 3.5); this module adds what it does not cover:
//! the pool's `default_ttl`, stale windows, `Vary`, `Set-Cookie`, and the freshness
//! lifetime itself, kept in the entry so that any replica computes the same.

use std::time::{Duration, SystemTime};

use http::header::{AGE, CACHE_CONTROL, DATE, EXPIRES, LAST_MODIFIED, SET_COOKIE, VARY};
use http::{HeaderMap, StatusCode, request, response};
use http_cache_semantics::{CacheOptions, CachePolicy};

use crate::config::PoolConfig;

/// Why a response was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    /// `no-store`, `private`, `Authorization`, or a status a shared cache may not keep.
    Forbidden,
    SetCookie,
    /// `Vary` names something other than `Accept-Encoding`, or is `*`.
    Vary,
    /// `no-cache`: must be revalidated before every reuse.
    NoCache,
    /// Partial content is never stored as a whole object.
    Partial,
    /// No freshness at all: nothing to reuse.
    NoFreshness,
}

/// Freshness data of a storable response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    pub initial_age: Duration,
    pub lifetime: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub no_stale: bool,
}

/// Statuses that a cache may store without explicit freshness (RFC 9110 section 15.1).
const HEURISTICALLY_CACHEABLE: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];
/// Of those, the ones that are errors: kept only for a route's `negative_ttl`.
const NEGATIVE: [u16; 5] = [404, 405, 410, 414, 501];

/// The parsed `Cache-Control` directives this cache acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl Directives {
    /// Parses every `Cache-Control` field line. A directive that appears twice with
    /// different values, or with an invalid value, is treated as `0` (RFC 9111 section
    /// 4.2.1: the most restrictive reading).
    pub fn parse(headers: &HeaderMap) -> Directives {
        let mut d = Directives::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for item in split_directives(text) {
                let (name, arg) = match item.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (item.trim(), None),
                };
                let seconds = |slot: &mut Option<u64>| {
                    let parsed = delta_seconds(arg);
                    *slot = Some(match *slot {
                        Some(previous) if previous != parsed => 0,
                        _ => parsed,
                    });
                };
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    "no-cache" => d.no_cache = true,
                    "private" => d.private = true,
                    "public" => d.public = true,
                    "must-revalidate" => d.must_revalidate = true,
                    "proxy-revalidate" => d.proxy_revalidate = true,
                    "max-age" => seconds(&mut d.max_age),
                    "s-maxage" => seconds(&mut d.s_maxage),
                    "stale-while-revalidate" => seconds(&mut d.stale_while_revalidate),
                    "stale-if-error" => seconds(&mut d.stale_if_error),
                    _ => {}
                }
            }
        }
        d
    }
}

/// The largest delta-seconds value a cache needs to represent (RFC 9111 section 1.2.2):
/// larger values, and values too large to parse, count as this.
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// Parses delta-seconds; anything that is not all digits is invalid and counts as 0.
fn delta_seconds(arg: Option<&str>) -> u64 {
    match arg {
        Some(a) if !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()) => {
            a.parse::<u64>().unwrap_or(MAX_DELTA_SECONDS).min(MAX_DELTA_SECONDS)
        }
        _ => 0,
    }
}

/// Splits on commas that are not inside a quoted string.
fn split_directives(text: &str) -> impl Iterator<Item = &str> {
    let mut in_quotes = false;
    text.split(move |c| {
        if c == '"' {
            in_quotes = !in_quotes;
        }
        c == ',' && !in_quotes
    })
    .map(str::trim)
    .filter(|s| !s.is_empty())
}

/// Decides whether `res`, the answer to `req`, may be stored, and its freshness.
///
/// `req` is the request as sent to the origin; times are when it was sent and when the
/// response headers arrived.
pub fn evaluate(
    req: &request::Parts,
    res: &response::Parts,
    pool: &PoolConfig,
    negative_ttl: Option<Duration>,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Result<Freshness, NotStorable> {
    if res.status == StatusCode::PARTIAL_CONTENT {
        return Err(NotStorable::Partial);
    }
    let policy = CachePolicy::new_options(req, res, response_time, CacheOptions { shared: true, ..CacheOptions::default() });
    if !policy.is_storable() {
        return Err(NotStorable::Forbidden);
    }
    if res.headers.contains_key(SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    if !vary_is_supported(&res.headers) {
        return Err(NotStorable::Vary);
    }
    let cc = Directives::parse(&res.headers);
    if cc.no_cache {
        return Err(NotStorable::NoCache);
    }
    let date = http_date(&res.headers, DATE);
    let lifetime = explicit_lifetime(&cc, &res.headers, date.unwrap_or(response_time))
        .or_else(|| heuristic_lifetime(res, pool, negative_ttl, date.unwrap_or(response_time)))
        .ok_or(NotStorable::NoFreshness)?;
    let initial_age = initial_age(&res.headers, date, request_time, response_time);
    if lifetime.is_zero() || lifetime <= initial_age {
        return Err(NotStorable::NoFreshness);
    }
    Ok(Freshness {
        initial_age,
        lifetime,
        stale_while_revalidate: cc.stale_while_revalidate.map_or(pool.stale_while_revalidate, Duration::from_secs),
        stale_if_error: cc.stale_if_error.map_or(pool.stale_if_error, Duration::from_secs),
        no_stale: cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some(),
    })
}

/// `s-maxage` over `max-age` over `Expires` - `Date` (RFC 9111 section 4.2.1).
fn explicit_lifetime(cc: &Directives, headers: &HeaderMap, date: SystemTime) -> Option<Duration> {
    if let Some(s) = cc.s_maxage.or(cc.max_age) {
        return Some(Duration::from_secs(s));
    }
    let expires = headers.get(EXPIRES)?;
    // An invalid Expires (such as "0") means already expired.
    let expires = expires.to_str().ok().and_then(|t| httpdate::parse_http_date(t).ok());
    let lifetime = expires.and_then(|e| e.duration_since(date).ok()).unwrap_or_default();
    Some(lifetime.min(Duration::from_secs(MAX_DELTA_SECONDS)))
}

/// No explicit freshness: the pool's `default_ttl`, else 10% of the time since
/// `Last-Modified`; error statuses only for a route's `negative_ttl`.
fn heuristic_lifetime(
    res: &response::Parts,
    pool: &PoolConfig,
    negative_ttl: Option<Duration>,
    date: SystemTime,
) -> Option<Duration> {
    let status = res.status.as_u16();
    if NEGATIVE.contains(&status) {
        return negative_ttl;
    }
    if !HEURISTICALLY_CACHEABLE.contains(&status) {
        return None;
    }
    if !pool.default_ttl.is_zero() {
        return Some(pool.default_ttl);
    }
    let last_modified = http_date(&res.headers, LAST_MODIFIED)?;
    date.duration_since(last_modified).ok().map(|d| (d / 10).min(Duration::from_secs(MAX_DELTA_SECONDS)))
}

/// `corrected_initial_age` (RFC 9111 section 4.2.3).
fn initial_age(headers: &HeaderMap, date: Option<SystemTime>, request_time: SystemTime, response_time: SystemTime) -> Duration {
    let apparent_age = date.and_then(|d| response_time.duration_since(d).ok()).unwrap_or_default();
    let age_value = Duration::from_secs(delta_seconds(headers.get(AGE).and_then(|v| v.to_str().ok()).map(str::trim)));
    let response_delay = response_time.duration_since(request_time).unwrap_or_default();
    apparent_age.max(age_value.saturating_add(response_delay))
}

fn http_date(headers: &HeaderMap, name: http::HeaderName) -> Option<SystemTime> {
    headers.get(name)?.to_str().ok().and_then(|t| httpdate::parse_http_date(t).ok())
}

/// No `Vary`, or `Vary` naming only `Accept-Encoding` (which is part of every key).
fn vary_is_supported(headers: &HeaderMap) -> bool {
    headers.get_all(VARY).iter().all(|value| {
        value.to_str().is_ok_and(|text| {
            text.split(',').map(str::trim).filter(|f| !f.is_empty()).all(|f| f.eq_ignore_ascii_case("accept-encoding"))
        })
    })
}

#[cfg(test)]
mod tests;
