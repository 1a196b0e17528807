//! Whether a response may be stored by a shared cache, and for how long it is fresh
//! (RFC 9111 sections 3 and 4.2, RFC 5861 stale directives).
//!
//! `http-cache-semantics` decides the base storability (method, status, `no-store`,
//! `private`, `Authorization` per section 3.5); this module adds what it does not cover:
//! the pool's `default_ttl`, stale windows, `Vary`, `Set-Cookie`, and the freshness
//! lifetime itself, kept in the entry so that any replica computes the same.

use std::time::{Duration, SystemTime};

pub mod reuse;
mod targeted;

use http::header::{AGE, AUTHORIZATION, CACHE_CONTROL, COOKIE, DATE, ETAG, EXPIRES, LAST_MODIFIED, SET_COOKIE};
use http::{HeaderMap, HeaderName, StatusCode, request, response};
use http_cache_semantics::{CacheOptions, CachePolicy};

use crate::cache::key::Vary;
use crate::config::{CacheRules, PoolConfig};
pub use crate::outcome::NotStored;

/// Freshness data of a storable response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freshness {
    pub initial_age: Duration,
    pub lifetime: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub no_stale: bool,
    /// Header fields that may not be stored (`no-cache="..."` names them): removed from
    /// the stored copy.
    pub strip: Vec<HeaderName>,
    /// The request headers the response varies on (its `Vary`, without
    /// `Accept-Encoding`), sorted.
    pub vary: Vec<HeaderName>,
}

/// Statuses that a cache may store without explicit freshness (RFC 9110 section 15.1).
const HEURISTICALLY_CACHEABLE: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];
/// Of those, the ones that are errors: kept only for a route's `negative_ttl`.
const NEGATIVE: [u16; 5] = [404, 405, 410, 414, 501];

/// What the route says about a response, besides the pool's defaults.
#[derive(Debug, Clone, Copy)]
pub struct RouteRules<'a> {
    pub rules: &'a CacheRules,
    pub negative_ttl: Option<Duration>,
}

/// The parsed `Cache-Control` directives this cache acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    /// Unqualified `no-cache`: stored, but revalidated before every reuse.
    pub no_cache: bool,
    /// `no-cache="field, ..."`: the named fields are not stored (RFC 9111 section 5.2.2.4).
    pub no_cache_fields: Vec<String>,
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
    /// Whether a response may be stored for, and served to, requests with
    /// `Authorization` (RFC 9111 section 3.5): `public`, `s-maxage` or `must-revalidate`.
    pub fn shared_with_authenticated(&self) -> bool {
        self.public || self.s_maxage.is_some() || self.must_revalidate
    }

    /// Parses every `Cache-Control` field line. A directive that appears twice with
    /// different values, or with an invalid value, is treated as `0` (RFC 9111 section
    /// 4.2.1: the most restrictive reading).
    pub fn parse(headers: &HeaderMap) -> Directives {
        let mut d = Directives::default();
        for (name, arg) in each_directive(headers) {
            let seconds = |slot: &mut Option<u64>| {
                let parsed = delta_seconds(arg);
                *slot = Some(match *slot {
                    Some(previous) if previous != parsed => 0,
                    _ => parsed,
                });
            };
            match name.as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => match arg {
                    Some(fields) if !fields.is_empty() => {
                        d.no_cache_fields.extend(fields.split(',').map(|f| f.trim().to_ascii_lowercase()).filter(|f| !f.is_empty()));
                    }
                    _ => d.no_cache = true,
                },
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
        d
    }
}

/// The largest delta-seconds value a cache needs to represent (RFC 9111 section 1.2.2):
/// larger values, and values too large to parse, count as this.
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// Parses delta-seconds; anything that is not all digits is invalid and counts as 0.
fn delta_seconds(arg: Option<&str>) -> u64 {
    match arg {
        Some(a) if !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()) => a.parse::<u64>().unwrap_or(MAX_DELTA_SECONDS).min(MAX_DELTA_SECONDS),
        _ => 0,
    }
}

/// Every directive of every `Cache-Control` field line: its name, lowercase, and its
/// argument, unquoted. Field lines that are not text are skipped.
fn each_directive(headers: &HeaderMap) -> impl Iterator<Item = (String, Option<&str>)> {
    headers.get_all(CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()).flat_map(split_directives).map(|item| match item.split_once('=') {
        Some((n, a)) => (n.trim().to_ascii_lowercase(), Some(a.trim().trim_matches('"'))),
        None => (item.trim().to_ascii_lowercase(), None),
    })
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

/// The headers whose cache directives apply to this cache: the response's own, or, when
/// one of the route's targeted fields (RFC 9213) is present and valid, those with
/// `Cache-Control` replaced by it and `Expires` removed.
pub fn effective_headers<'a>(headers: &'a HeaderMap, rules: &CacheRules) -> std::borrow::Cow<'a, HeaderMap> {
    match targeted::select(headers, &rules.targeted_cache_control) {
        None => std::borrow::Cow::Borrowed(headers),
        Some(cache_control) => {
            let mut replaced = headers.clone();
            replaced.remove(EXPIRES);
            replaced.insert(CACHE_CONTROL, cache_control);
            std::borrow::Cow::Owned(replaced)
        }
    }
}

/// Whether a stored response, with these header fields, may answer a request with these:
/// always, except that a request with `Authorization` gets only responses that say they
/// are shared (RFC 9111 section 3.5; in the field that applies to this cache).
pub fn may_serve(request: &HeaderMap, stored: &HeaderMap, rules: &CacheRules) -> bool {
    !request.contains_key(AUTHORIZATION) || Directives::parse(&effective_headers(stored, rules)).shared_with_authenticated()
}

/// Decides whether `res`, the answer to `req`, may be stored, and its freshness.
///
/// `req` is the request as sent to the origin; times are when it was sent and when the
/// response headers arrived. A response that is stale on arrival, or `no-cache`, is
/// stored only when it has a validator, to be revalidated before any reuse.
pub fn evaluate(
    req: &request::Parts,
    res: &response::Parts,
    pool: &PoolConfig,
    route: RouteRules<'_>,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Result<Freshness, NotStored> {
    if res.status == StatusCode::PARTIAL_CONTENT {
        return Err(NotStored::Status);
    }
    let headers = effective_headers(&res.headers, route.rules);
    let mut cc = Directives::parse(&headers);
    // The reasons a client or an operator can act on, before the library's verdict
    // (which covers them too, and the method and status besides).
    if cc.no_store {
        return Err(NotStored::NoStore);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    if req.headers.contains_key(AUTHORIZATION) && !cc.shared_with_authenticated() {
        return Err(NotStored::Authorization);
    }
    let policy = match &headers {
        std::borrow::Cow::Borrowed(_) => CachePolicy::new_options(req, res, response_time, shared()),
        std::borrow::Cow::Owned(replaced) => {
            let mut targeted = http::Response::new(());
            *targeted.status_mut() = res.status;
            *targeted.headers_mut() = replaced.clone();
            CachePolicy::new_options(req, &targeted.into_parts().0, response_time, shared())
        }
    };
    if !policy.is_storable() {
        return Err(NotStored::Status);
    }
    if res.headers.contains_key(SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    let vary = match Vary::parse(&res.headers) {
        Vary::None => Vec::new(),
        Vary::Names(names) => names,
        Vary::Star => return Err(NotStored::VaryStar),
        Vary::Invalid => return Err(NotStored::VaryInvalid),
    };
    if route.rules.ignore_no_cache {
        cc.no_cache = false;
        cc.no_cache_fields.clear();
    }
    let has_validator = res.headers.contains_key(ETAG) || res.headers.contains_key(LAST_MODIFIED);
    if cc.no_cache && !has_validator {
        return Err(NotStored::NoCacheNoValidator);
    }
    let date = http_date(&res.headers, DATE);
    let forced = route.rules.force_ttl.filter(|_| res.status.as_u16() < 400 && !req.headers.contains_key(AUTHORIZATION));
    // A request with `Cookie` (the ones the route ignores already removed) may get a page
    // rendered for its session: only the origin's explicit word (or the route's
    // `force_ttl`) makes such an answer shareable, never a guess. Keying on `Cookie`
    // lifts the rule: each session then has its own copy. An authenticated request's
    // answer gets no guessed lifetime either (`public` or `must-revalidate` alone say it
    // may be shared, not for how long), and `force_ttl` never applies to it (above).
    let personal = if req.headers.contains_key(AUTHORIZATION) {
        Some(NotStored::Authorization)
    } else {
        (req.headers.contains_key(COOKIE) && !route.rules.key_headers.contains(&COOKIE)).then_some(NotStored::CookieHeuristic)
    };
    let lifetime = match forced {
        Some(ttl) => ttl,
        None if cc.no_cache => Duration::ZERO,
        None => match explicit_lifetime(&cc, &headers, date.unwrap_or(response_time)) {
            Some(explicit) => explicit,
            None => match (heuristic_lifetime(res, &cc, pool, route.negative_ttl, date.unwrap_or(response_time)), personal) {
                (Some(_), Some(reason)) => return Err(reason),
                (Some(heuristic), None) => heuristic,
                (None, _) => return Err(NotStored::NoFreshness),
            },
        },
    };
    let initial_age = initial_age(&res.headers, date, request_time, response_time);
    // A forced TTL counts from when the response arrived here.
    let initial_age = if forced.is_some() { Duration::ZERO } else { initial_age };
    if lifetime <= initial_age && !has_validator {
        return Err(NotStored::StaleOnArrival);
    }
    let strip = cc.no_cache_fields.iter().filter_map(|f| HeaderName::from_bytes(f.as_bytes()).ok()).collect();
    Ok(Freshness {
        initial_age,
        lifetime,
        stale_while_revalidate: cc.stale_while_revalidate.map_or(pool.stale_while_revalidate, Duration::from_secs),
        stale_if_error: cc.stale_if_error.map_or(pool.stale_if_error, Duration::from_secs),
        no_stale: cc.no_cache || cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some(),
        strip,
        vary,
    })
}

fn shared() -> CacheOptions {
    CacheOptions { shared: true, ..CacheOptions::default() }
}

/// `s-maxage` over `max-age` over `Expires` - `Date` (RFC 9111 section 4.2.1).
fn explicit_lifetime(cc: &Directives, headers: &HeaderMap, date: SystemTime) -> Option<Duration> {
    if let Some(s) = cc.s_maxage.or(cc.max_age) {
        return Some(Duration::from_secs(s));
    }
    let expires = headers.get(EXPIRES)?;
    // An invalid Expires (such as "0") means already expired.
    let expires = expires.to_str().ok().and_then(crate::cache::date::parse);
    let lifetime = expires.and_then(|e| e.duration_since(date).ok()).unwrap_or_default();
    Some(lifetime.min(Duration::from_secs(MAX_DELTA_SECONDS)))
}

/// No explicit freshness (RFC 9111 section 4.2.2), for heuristically cacheable statuses
/// and responses marked `public`: the pool's `default_ttl`, else 10% of the time since
/// `Last-Modified`; error statuses only for a route's `negative_ttl`.
fn heuristic_lifetime(res: &response::Parts, cc: &Directives, pool: &PoolConfig, negative_ttl: Option<Duration>, date: SystemTime) -> Option<Duration> {
    let status = res.status.as_u16();
    if NEGATIVE.contains(&status) {
        return negative_ttl;
    }
    if !HEURISTICALLY_CACHEABLE.contains(&status) && !cc.public {
        return None;
    }
    if !pool.default_ttl.is_zero() {
        return Some(pool.default_ttl);
    }
    let last_modified = http_date(&res.headers, LAST_MODIFIED)?;
    date.duration_since(last_modified).ok().map(|d| (d / 10).min(Duration::from_secs(MAX_DELTA_SECONDS)))
}

/// `corrected_initial_age` (RFC 9111 section 4.2.3). A list-valued `Age` counts by its
/// first member; an invalid one is ignored (section 5.1).
pub fn initial_age(headers: &HeaderMap, date: Option<SystemTime>, request_time: SystemTime, response_time: SystemTime) -> Duration {
    let apparent_age = date.and_then(|d| response_time.duration_since(d).ok()).unwrap_or_default();
    let first = headers.get(AGE).and_then(|v| v.to_str().ok()).and_then(|v| v.split(',').next()).map(str::trim);
    let age_value = Duration::from_secs(delta_seconds(first));
    let response_delay = response_time.duration_since(request_time).unwrap_or_default();
    apparent_age.max(age_value.saturating_add(response_delay))
}

pub fn http_date(headers: &HeaderMap, name: http::HeaderName) -> Option<SystemTime> {
    headers.get(name)?.to_str().ok().and_then(crate::cache::date::parse)
}

/// The request's cache directives (RFC 9111 section 5.2.1).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestDirectives {
    pub no_cache: bool,
    pub no_store: bool,
    pub only_if_cached: bool,
    pub max_age: Option<u64>,
    /// `max-stale` with its limit; `Some(None)` without one (any staleness).
    pub max_stale: Option<Option<u64>>,
    pub min_fresh: Option<u64>,
}

impl RequestDirectives {
    /// Parses every `Cache-Control` field line of a request. Invalid arguments count as 0
    /// (the most cautious reading for `max-age`; `max-stale=invalid` allows nothing).
    pub fn parse(headers: &HeaderMap) -> RequestDirectives {
        let mut d = RequestDirectives::default();
        for (name, arg) in each_directive(headers) {
            match name.as_str() {
                "no-cache" => d.no_cache = true,
                "no-store" => d.no_store = true,
                "only-if-cached" => d.only_if_cached = true,
                "max-age" => d.max_age = Some(d.max_age.map_or(delta_seconds(arg), |m| m.min(delta_seconds(arg)))),
                "max-stale" => d.max_stale = Some(arg.map(|a| delta_seconds(Some(a)))),
                "min-fresh" => d.min_fresh = Some(d.min_fresh.unwrap_or(0).max(delta_seconds(arg))),
                _ => {}
            }
        }
        d
    }

    /// Whether the request says anything that changes how a stored response is chosen.
    pub fn constrains(&self) -> bool {
        self.no_cache || self.only_if_cached || self.max_age.is_some() || self.max_stale.is_some() || self.min_fresh.is_some()
    }
}

#[cfg(test)]
mod tests;
