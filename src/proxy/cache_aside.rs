//! The cache-aside phases of a cacheable (GET or HEAD) request: prepare (the route's
//! rules applied to the request), key, lookup, choose (freshness against the request's
//! directives), then serve the stored copy, refresh it, validate it, or fetch under
//! coalescing.

use std::sync::Arc;

use http::header::{ACCEPT_ENCODING, CACHE_CONTROL, COOKIE};
use http::request;

use super::context::RequestContext;
use super::decision::{Decision, Serve, or_stale_if_error};
use super::fetch::{self, FetchJob, HeadAnswer};
use super::{flight, target, trust};
use crate::body::ProxyBody;
use crate::cache::key::{normalise_query_for, url_part};
use crate::cache::policy::reuse::{Choice, choose, should_refresh_early};
use crate::cache::policy::{self, RequestDirectives};
use crate::cache::{CacheKey, Encodings, Entry, Found, Pool, PurgeTarget};
use crate::config::{CacheRules, RouteMode};
use crate::error::ProxyError;
use crate::outcome::{BypassReason, NotStored, Outcome, StaleReason, Store};

/// Applies the route's rules to a cacheable request: headers that `Connection` names
/// removed before anything is keyed on them, cookies stripped (or the ignored ones) if asked, unkeyed headers
/// removed, the query normalised without the ignored parameters. Returns the normalised
/// query; [`target::for_origin`] puts it into the request when one goes to the origin (the
/// origin is asked exactly what the key says), so a hit rebuilds no URI.
pub(super) fn prepare(rules: &CacheRules, parts: &mut request::Parts, trusted: bool) -> Result<String, ProxyError> {
    // Hop-by-hop headers, and those the client names in `Connection`, never reach the
    // origin: they must not select a variant either, or the origin's answer without
    // them would be stored as the answer with them.
    trust::strip_hop_by_hop(&mut parts.headers);
    if rules.strip_cookies {
        parts.headers.remove(COOKIE);
    } else {
        trust::remove_ignored_cookies(&mut parts.headers, &rules.ignore_cookies);
    }
    trust::strip_unkeyed(&mut parts.headers, &rules.key_headers, trusted);
    let raw = parts.uri.query().unwrap_or("");
    let query = normalise_query_for(raw, rules).map_err(|_| ProxyError::BadRequest("malformed percent-encoding in the query"))?;
    Ok(query.into_owned())
}

/// A cacheable request with the route's rules applied, and its primary key (URL and
/// `Accept-Encoding` group).
struct Keyed {
    query: String,
    encodings: Encodings,
    primary: CacheKey,
}

impl Keyed {
    fn new(ctx: &RequestContext, parts: &mut request::Parts) -> Result<Keyed, ProxyError> {
        let (route, client) = (&ctx.route, &ctx.client);
        let query = prepare(&route.config.cache, parts, client.trusted)?;
        let encodings = Encodings::from_headers(parts.headers.get_all(ACCEPT_ENCODING)).within(route.origin.config.content_codings);
        let primary = CacheKey::from_normalised(client.scheme, &client.host, parts.uri.path(), &query, encodings);
        Ok(Keyed { query, encodings, primary })
    }

    /// The fetch of this request's key (`key`, else the primary key), made conditional by
    /// `stored`, storing what it may.
    fn job(&self, ctx: &RequestContext, pool: &Arc<Pool>, parts: request::Parts, key: Option<CacheKey>, stored: Option<Arc<Entry>>) -> FetchJob {
        FetchJob {
            route: ctx.route.clone(),
            pool: pool.clone(),
            parts: target::for_origin(parts, &self.query),
            key: key.unwrap_or_else(|| self.primary.clone()),
            client: ctx.client.clone(),
            timings: ctx.timings.clone(),
            trace: ctx.trace.clone(),
            primary: self.primary.clone(),
            replaces: stored.is_some(),
            stored,
            encodings: self.encodings,
            background: false,
            stale_on_wait: true,
            store: true,
            interest: None,
            purge_epoch: pool.purges.epoch(),
            pass_range: false,
        }
    }
}

/// A request `no-store` (RFC 9111 section 5.2.1.5) on a caching route: never looked up
/// and nothing of it stored, but coalesced with the concurrent `no-store` requests for
/// its key, each served as `bypass`.
pub(super) async fn unstored(ctx: &RequestContext, pool: &Arc<Pool>, mut parts: request::Parts) -> Decision {
    let keyed = match Keyed::new(ctx, &mut parts) {
        Ok(keyed) => keyed,
        Err(err) => return Decision::failed(err),
    };
    let flight = keyed.primary.unstored_flight();
    let job = FetchJob { store: false, stale_on_wait: false, ..keyed.job(ctx, pool, parts, Some(flight), None) };
    flight::miss(job, None).await.counted_as_bypass(BypassReason::RequestNoStore)
}

/// Prepare, key, lookup, choose; then a stored copy, a background refresh, a
/// validation, or a coalesced fetch, with the one stale-on-error rule applied to what
/// the origin answered.
pub(super) async fn cache_aside(ctx: &RequestContext, pool: &Arc<Pool>, mut parts: request::Parts) -> Decision {
    let (route, mode) = (&ctx.route, ctx.mode);
    let rules = &route.config.cache;
    let keyed = match Keyed::new(ctx, &mut parts) {
        Ok(keyed) => keyed,
        Err(err) => return Decision::failed(err),
    };
    let directives = if rules.ignore_request_cache_control || !parts.headers.contains_key(CACHE_CONTROL) {
        RequestDirectives::default()
    } else {
        RequestDirectives::parse(&parts.headers)
    };
    let job = |parts, key, stored| FetchJob { stale_on_wait: !directives.constrains(), ..keyed.job(ctx, pool, parts, key, stored) };
    let cache_only = mode == RouteMode::CacheOnly;
    let lookup = pool.lookup(&keyed.primary, &parts.headers, &rules.key_headers, ctx.trace.as_deref()).await;
    // RFC 9111 section 3.5: a stored response serves a request with `Authorization` only
    // when it says it is shared; any other is, for this request, not there.
    let found = lookup.found.filter(|found| policy::may_serve(&parts.headers, &found.entry.headers, rules));
    let now = ctx.now();
    if cache_only {
        // The operator chose stored copies over the origin: any copy still kept is
        // served, whatever its freshness, the request's directives or `must-revalidate`
        // say, labelled as such; with nothing stored, the fallback, else 504.
        return match found {
            Some(Found { entry, tier, .. }) => {
                let outcome = if entry.is_fresh(now) { Outcome::Hit(tier) } else { Outcome::Stale(StaleReason::CacheOnly) };
                Decision::entry(entry, outcome)
            }
            None => Decision::cache_only_miss(route),
        };
    }
    let Some(Found { entry, tier, .. }) = found else {
        if directives.only_if_cached {
            // RFC 9111 section 5.2.1.7: a stored response or 504, never the origin.
            return Decision::failed(ProxyError::NotCached);
        }
        return flight::miss(job(parts, lookup.key, None), None).await;
    };
    let refresh = |parts| flight::refresh_in_background(job(parts, lookup.key.clone(), Some(entry.clone())));
    match choose(&entry, now, &directives) {
        Choice::Fresh => {
            if should_refresh_early(&entry, now) {
                refresh(parts);
            }
            return Decision::entry(entry, Outcome::Hit(tier));
        }
        Choice::MaxStale => {
            refresh(parts);
            return Decision::entry(entry, Outcome::Hit(tier));
        }
        Choice::WhileRevalidate => {
            if !directives.only_if_cached {
                refresh(parts);
            }
            return Decision::entry(entry, Outcome::Stale(StaleReason::WhileRevalidate));
        }
        Choice::Validate if directives.only_if_cached => return Decision::failed(ProxyError::NotCached),
        Choice::Validate => {}
    }
    let decision = if ctx.head && directives.constrains() {
        validate_with_head(job(parts, lookup.key.clone(), Some(entry.clone())), &entry).await
    } else {
        flight::miss(job(parts, lookup.key.clone(), Some(entry.clone())), Some(entry.clone())).await
    };
    or_stale_if_error(decision, Some(&entry), ctx.now())
}

/// A HEAD whose stored copy must be validated asks the origin with HEAD: nothing but
/// headers moves either way. A 200 for the same representation updates the stored
/// copy; one for another representation marks the URL's stored copies stale (a soft
/// purge: here, in Redis and on every replica), so the next GET refreshes each once,
/// shielded by coalescing and stale-while-revalidate, and nothing is deleted
/// (RFC 9111 section 4.3.5).
async fn validate_with_head(job: FetchJob, stored: &Entry) -> Decision {
    if let Some(refused) = super::admit::admit(&job) {
        return refused;
    }
    let pool = job.pool.clone();
    match fetch::head(&job, stored).await {
        Ok(HeadAnswer::Updated(updated)) => {
            pool.store(&job.primary, &updated, true).await;
            Decision::entry(updated.entry, Outcome::Miss(Store::Stored))
        }
        Ok(HeadAnswer::Invalidated(parts)) => {
            if !stored.invalidated {
                let target = PurgeTarget::Url(url_part(&job.primary.text).to_owned());
                // In its own task, like unsafe-method invalidation: a client that hangs
                // up does not leave it half done.
                let _ = tokio::spawn(async move { pool.purge(&target, true).await }).await;
            }
            job.route.metrics.not_stored(NotStored::Purged);
            Decision::new(Serve::Streamed(parts, ProxyBody::empty()), Outcome::Miss(Store::Not(NotStored::Purged)))
        }
        Ok(HeadAnswer::Other(parts, reason)) => {
            job.route.metrics.not_stored(reason);
            Decision::new(Serve::Streamed(parts, ProxyBody::empty()), Outcome::Miss(Store::Not(reason)))
        }
        Err(err) => Decision::failed(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unkeyed_headers_and_ignored_parameters_are_removed() {
        let rules = CacheRules {
            ignore_query_params: vec![crate::config::ParamPattern::Prefix("utm_".into())],
            key_headers: vec![http::HeaderName::from_static("x-forwarded-host")],
            strip_cookies: true,
            ..CacheRules::default()
        };
        let (mut parts, ()) = http::Request::get("/p?utm_source=x&b=2&a=%7e")
            .header("x-forwarded-host", "kept.example")
            .header("x-original-url", "/admin")
            .header("x-http-method-override", "DELETE")
            .header("cookie", "s=1")
            .header("te", "trailers")
            .body(())
            .expect("request")
            .into_parts();
        let query = prepare(&rules, &mut parts, true).expect("prepared");
        assert_eq!(query, "a=~&b=2");
        assert_eq!(target::for_origin(parts.clone(), &query).uri.to_string(), "/p?a=~&b=2");
        assert!(parts.headers.contains_key("x-forwarded-host"), "keyed: passed on");
        for gone in ["x-original-url", "x-http-method-override", "cookie", "te"] {
            assert!(!parts.headers.contains_key(gone), "{gone}");
        }
        let (mut bad, ()) = http::Request::get("/p?a=%zz").body(()).expect("request").into_parts();
        assert!(prepare(&rules, &mut bad, true).is_err());
        let (mut untrusted, ()) = http::Request::get("/p").header("x-forwarded-host", "evil.example").body(()).expect("request").into_parts();
        prepare(&rules, &mut untrusted, false).expect("prepared");
        assert!(!untrusted.headers.contains_key("x-forwarded-host"), "keyed, but never sent for an untrusted peer: not keyed either");
    }
}
