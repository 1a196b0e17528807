//! What this replica and its pool's Redis hold for one URL, and the outcome a request
//! for it would get now (`GET /admin/cache`): the request is routed and keyed exactly as
//! a client's would be, and then only looked at. Nothing is promoted, refreshed, leased
//! or counted.

use std::time::{Duration, SystemTime};

use http::header::ACCEPT_ENCODING;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use serde_json::{Value, json};

use super::{cache_aside, forward, target};
use crate::cache::{CacheKey, Encodings, Entry, Inspected};
use crate::config::RouteMode;
use crate::outcome::{Outcome, StaleReason, Tier};
use crate::runtime::{RouteRuntime, Runtime};

/// Why a URL cannot be inspected: the status and a message for the operator.
#[derive(Debug)]
pub struct InspectError {
    pub status: StatusCode,
    pub message: String,
}

impl InspectError {
    fn bad(message: impl Into<String>) -> InspectError {
        InspectError { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

/// Inspects `url` (absolute) as requested with `headers` under `runtime`: the JSON
/// answer of `GET /admin/cache`.
pub(super) async fn inspect(runtime: &Runtime, url: &str, headers: HeaderMap) -> Result<Value, InspectError> {
    let uri: Uri = url.parse().map_err(|_| InspectError::bad(format!("not a URL: {url}")))?;
    let scheme = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => "http",
        Some(s) if s.eq_ignore_ascii_case("https") => "https",
        _ => return Err(InspectError::bad(format!("not an absolute http or https URL: {url}"))),
    };
    let authority = uri.authority().ok_or_else(|| InspectError::bad(format!("the URL has no host: {url}")))?.clone();
    let mut request = Request::builder().method(Method::GET).uri(uri).body(()).map_err(|_| InspectError::bad(format!("not a URL: {url}")))?;
    *request.headers_mut() = headers;
    let (mut parts, ()) = request.into_parts();
    target::normalise(&mut parts).map_err(|err| InspectError::bad(err.to_string()))?;
    let host = forward::normalise_host(authority.as_str(), scheme).map_err(|err| InspectError::bad(err.to_string()))?;
    let host_without_port = forward::without_port(&host);
    let Some(index) = runtime.router.route(host_without_port, parts.uri.path()) else {
        return Err(InspectError { status: StatusCode::NOT_FOUND, message: format!("no route matches {host}{}", parts.uri.path()) });
    };
    let route = &runtime.routes[index];
    let mode = route.mode();
    let Some(pool) = &route.pool else {
        let would_be = mode_outcome(route, mode).unwrap_or(Outcome::Bypass(crate::outcome::BypassReason::Route));
        return Ok(json!({"url": url, "route": route.config.name, "pool": Value::Null, "key": Value::Null, "groups": [], "variants": [],
            "mode": mode.as_str(), "would_be": would_be.as_str()}));
    };
    let rules = &route.config.cache;
    // The headers are taken as a trusted proxy forwards them: an operator asking for
    // the variant a header selects means that header.
    let query = cache_aside::prepare(rules, &mut parts, true).map_err(|err| InspectError::bad(err.to_string()))?;
    let produced = route.origin.config.content_codings;
    let asked = parts.headers.contains_key(ACCEPT_ENCODING).then(|| Encodings::from_headers(parts.headers.get_all(ACCEPT_ENCODING)).within(produced));
    // Without an `Accept-Encoding`, every group the origin can produce; the request as
    // given (without one) is the identity group's.
    let mut groups: Vec<Encodings> = match asked {
        Some(set) => vec![set],
        None => Encodings::all_sets().filter(|set| set.within(produced) == *set).collect(),
    };
    groups.dedup();
    let now = pool.clock.now();
    let mut shown = Vec::with_capacity(groups.len());
    let mut variants = Vec::new();
    let mut would_be = None;
    for set in groups {
        let primary = CacheKey::from_normalised(scheme, &host, parts.uri.path(), &query, set);
        let found = pool.inspect(&primary, &parts.headers, &rules.key_headers).await;
        if set == asked.unwrap_or(Encodings::IDENTITY) {
            would_be = Some(outcome_now(route, mode, &found, now));
        }
        variants
            .extend(found.l1_variants.iter().map(|e| json!({"accept_encoding": accept_encoding(set), "key": e.key, "l1": tier(e, now, true, found.filling)})));
        shown.push(json!({
            "accept_encoding": accept_encoding(set),
            "primary_key": primary.text,
            "variant": (!found.names.is_empty()).then(|| json!({"key": found.key.text, "vary": found.names.iter().map(|n| n.as_str()).collect::<Vec<_>>()})),
            "l1": match &found.l1 { Some((entry, confirmed)) => tier(entry, now, *confirmed, found.filling), None => absent(found.filling) },
            "l2": match &found.l2 {
                None => json!({"present": Value::Null, "error": "the pool has no Redis"}),
                Some(Ok(peeked)) => match &peeked.entry { Some(entry) => tier(entry, now, true, peeked.leased), None => absent(peeked.leased) },
                Some(Err(err)) => json!({"present": Value::Null, "error": err}),
            },
        }));
    }
    let key = CacheKey::from_normalised(scheme, &host, parts.uri.path(), &query, asked.unwrap_or(Encodings::IDENTITY));
    Ok(json!({
        "url": url,
        "route": route.config.name,
        "pool": pool.config.name,
        "key": key.text,
        "mode": mode.as_str(),
        "groups": shown,
        "variants": variants,
        "would_be": would_be.map_or("miss", Outcome::as_str),
    }))
}

/// The outcome the route's mode alone decides, if it does.
fn mode_outcome(route: &RouteRuntime, mode: RouteMode) -> Option<Outcome> {
    match mode {
        RouteMode::Off => Some(Outcome::Off),
        RouteMode::Fallback if route.config.fallback.is_some() => Some(Outcome::Fallback),
        RouteMode::Fallback => Some(Outcome::Off),
        RouteMode::Normal | RouteMode::CacheOnly => None,
    }
}

/// The outcome a request would get now, as the lookup would pick the copy: L1's when it
/// is fresh (or there is no Redis), else Redis's when it is newer, else L1's.
fn outcome_now(route: &RouteRuntime, mode: RouteMode, found: &Inspected, now: SystemTime) -> Outcome {
    if let Some(outcome) = mode_outcome(route, mode) {
        return outcome;
    }
    let l1 = found.l1.as_ref().map(|(entry, _)| &**entry);
    let l2 = match &found.l2 {
        Some(Ok(peeked)) => peeked.entry.as_ref(),
        _ => None,
    };
    let chosen = match (l1, l2) {
        (Some(local), _) if local.is_fresh(now) || found.l2.is_none() => Some((local, Tier::L1)),
        (Some(local), Some(shared)) if shared.response_time <= local.response_time => Some((local, Tier::L1)),
        (_, Some(shared)) => Some((shared, Tier::L2)),
        (Some(local), None) => Some((local, Tier::L1)),
        (None, None) => None,
    };
    match (chosen, mode) {
        (Some((entry, tier)), RouteMode::CacheOnly) => {
            if entry.is_fresh(now) {
                Outcome::Hit(tier)
            } else {
                Outcome::Stale(StaleReason::CacheOnly)
            }
        }
        (None, RouteMode::CacheOnly) if route.config.fallback.is_some() => Outcome::Fallback,
        (None, RouteMode::CacheOnly) => Outcome::Error,
        (Some((entry, tier)), _) if entry.is_fresh(now) => Outcome::Hit(tier),
        (Some((entry, _)), _) if entry.within_stale_while_revalidate(now) => Outcome::Stale(StaleReason::WhileRevalidate),
        _ if found.filling => Outcome::Collapsed,
        _ => Outcome::Miss(crate::outcome::Store::Stored),
    }
}

fn accept_encoding(set: Encodings) -> String {
    set.header_value().to_str().unwrap_or("identity").to_owned()
}

fn absent(filling: bool) -> Value {
    json!({"present": false, "filling": filling})
}

/// Whole seconds, as in `Age`.
fn secs(d: Duration) -> u64 {
    d.as_secs()
}

/// Whole seconds of time left, rounded up: 0 only once nothing is left.
fn secs_left(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// One tier's copy: its age, what is left of its freshness and stale windows, size, tags.
fn tier(entry: &Entry, now: SystemTime, confirmed: bool, filling: bool) -> Value {
    let age = entry.age(now);
    let fresh = if entry.invalidated { Duration::ZERO } else { entry.freshness_lifetime.saturating_sub(age) };
    let window = |stale: Duration, allowed: bool| if allowed { secs_left(entry.freshness_lifetime.saturating_add(stale).saturating_sub(age)) } else { 0 };
    json!({
        "present": true,
        "status": entry.status.as_u16(),
        "age_s": secs(age),
        "fresh_for_s": secs_left(fresh),
        "swr_left_s": window(entry.stale_while_revalidate, !entry.no_stale),
        "sie_left_s": window(entry.stale_if_error, !entry.no_stale || entry.stale_on_error_always),
        "size_bytes": entry.body.len(),
        "tags": entry.tags,
        "soft_purged": entry.invalidated,
        "confirmed": confirmed,
        "filling": filling,
    })
}
