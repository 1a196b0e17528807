//! Whether a stored response may be reused for a request, and when to refresh one
//! that is still fresh: pure decisions on an entry, the request's directives and "now".

use std::time::{Duration, SystemTime};

use super::RequestDirectives;
use crate::cache::Entry;

/// What to do with a stored entry for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Fresh,
    /// Stale, but the request's `max-stale` accepts it.
    MaxStale,
    /// Stale within stale-while-revalidate.
    WhileRevalidate,
    /// Must be validated with the origin (or replaced) before use.
    Validate,
}

/// Freshness of `entry` against the request's directives (RFC 9111 sections 4.2 and
/// 5.2.1, RFC 5861): `no-cache`, `max-age` and `min-fresh` demand validation;
/// `max-stale` accepts a stale copy unless the response forbids serving it stale.
pub fn choose(entry: &Entry, now: SystemTime, directives: &RequestDirectives) -> Choice {
    if directives.no_cache {
        return Choice::Validate;
    }
    let age = entry.age(now);
    if directives.max_age.is_some_and(|max| age > Duration::from_secs(max)) {
        return Choice::Validate;
    }
    let remaining = entry.freshness_lifetime.saturating_sub(age);
    if directives.min_fresh.is_some_and(|min| remaining < Duration::from_secs(min)) {
        return Choice::Validate;
    }
    if entry.is_fresh(now) {
        return Choice::Fresh;
    }
    if let Some(limit) = directives.max_stale
        && !entry.no_stale
    {
        let staleness = age.saturating_sub(entry.freshness_lifetime);
        if limit.is_none_or(|l| staleness <= Duration::from_secs(l)) {
            return Choice::MaxStale;
        }
    }
    if entry.within_stale_while_revalidate(now) {
        return Choice::WhileRevalidate;
    }
    Choice::Validate
}

/// Probabilistic early expiration (XFetch): a fresh entry is refreshed before it
/// expires with a probability that grows as expiry nears, so the more often a key is
/// requested, the surer it is refreshed in time, and hot keys do not expire together.
pub fn should_refresh_early(entry: &Entry, now: SystemTime) -> bool {
    let remaining = entry.freshness_lifetime.saturating_sub(entry.age(now));
    // How long a refresh takes, at least 1% of the lifetime.
    let fetch_time = entry.response_time.duration_since(entry.request_time).unwrap_or_default();
    let delta = fetch_time.max(entry.freshness_lifetime / 100).as_secs_f64();
    let draw = fastrand::f64().max(f64::MIN_POSITIVE);
    remaining.as_secs_f64() <= delta * -draw.ln()
}

#[cfg(test)]
mod tests {
    use http::header::CACHE_CONTROL;

    use super::*;

    fn aged(lifetime: u64, age: u64) -> (Entry, SystemTime) {
        let entry = Entry {
            freshness_lifetime: Duration::from_secs(lifetime),
            initial_age: Duration::ZERO,
            stale_while_revalidate: Duration::from_secs(5),
            ..crate::cache::entry::tests::sample()
        };
        let now = entry.response_time + Duration::from_secs(age);
        (entry, now)
    }

    fn directives(text: &'static str) -> RequestDirectives {
        let mut headers = http::HeaderMap::new();
        headers.insert(CACHE_CONTROL, http::HeaderValue::from_static(text));
        RequestDirectives::parse(&headers)
    }

    #[test]
    fn request_directives_choose() {
        let (fresh, at) = aged(60, 10);
        assert_eq!(choose(&fresh, at, &RequestDirectives::default()), Choice::Fresh);
        assert_eq!(choose(&fresh, at, &directives("no-cache")), Choice::Validate);
        assert_eq!(choose(&fresh, at, &directives("max-age=5")), Choice::Validate);
        assert_eq!(choose(&fresh, at, &directives("max-age=10")), Choice::Fresh);
        assert_eq!(choose(&fresh, at, &directives("min-fresh=55")), Choice::Validate);
        assert_eq!(choose(&fresh, at, &directives("min-fresh=50")), Choice::Fresh);
        let (stale, at) = aged(60, 70);
        assert_eq!(choose(&stale, at, &RequestDirectives::default()), Choice::Validate);
        assert_eq!(choose(&stale, at, &directives("max-stale=20")), Choice::MaxStale);
        assert_eq!(choose(&stale, at, &directives("max-stale=5")), Choice::Validate);
        assert_eq!(choose(&stale, at, &directives("max-stale")), Choice::MaxStale);
        let must_revalidate = Entry { no_stale: true, ..stale.clone() };
        assert_eq!(choose(&must_revalidate, at, &directives("max-stale")), Choice::Validate);
        let (swr, at) = aged(60, 63);
        assert_eq!(choose(&swr, at, &RequestDirectives::default()), Choice::WhileRevalidate);
    }

    fn entry_aged(lifetime: Duration, age: Duration) -> (Entry, SystemTime) {
        let now = SystemTime::now();
        let entry = Entry {
            request_time: now - age - Duration::from_millis(100),
            response_time: now - age,
            initial_age: Duration::ZERO,
            freshness_lifetime: lifetime,
            ..crate::cache::entry::tests::sample()
        };
        (entry, now)
    }

    #[test]
    fn early_refresh_grows_likelier_as_expiry_nears() {
        let rate = |age_secs: f64| {
            let (entry, now) = entry_aged(Duration::from_secs(60), Duration::from_secs_f64(age_secs));
            (0..10_000).filter(|_| should_refresh_early(&entry, now)).count() as f64 / 10_000.0
        };
        // delta = max(fetch time 0.1 s, 1% of 60 s) = 0.6 s.
        assert_eq!(rate(1.0), 0.0, "far from expiry: never");
        let at_delta = rate(60.0 - 0.6);
        assert!((0.30..0.44).contains(&at_delta), "one delta before expiry: about e^-1, got {at_delta}");
        let closer = rate(60.0 - 0.1);
        assert!(closer > at_delta, "closer to expiry: likelier ({closer} vs {at_delta})");
        assert_eq!(rate(60.0), 1.0, "at expiry: always");
    }
}
