use std::time::{Duration, SystemTime};

use http::{Request, Response};

use super::*;
use crate::config::CacheRules;
use crate::config::PoolConfig;
use http::HeaderName;

fn pool() -> PoolConfig {
    PoolConfig {
        name: "p".into(),
        l1_max_bytes: 1 << 20,
        shared: None,
        key_prefix: "bulwark:p:".into(),
        max_object_bytes: 1 << 20,
        stream_window: 16 << 20,
        redis_write_queue_bytes: 64 << 20,
        default_ttl: Duration::from_secs(60),
        stale_while_revalidate: Duration::from_secs(30),
        stale_if_error: Duration::from_secs(600),
        lock_timeout: Duration::from_secs(5),
        tag_header: http::HeaderName::from_static("surrogate-key"),
        max_variants: 32,
        keep_for_revalidation: Duration::from_secs(600),
    }
}

fn no_rules() -> CacheRules {
    CacheRules { targeted_cache_control: vec![HeaderName::from_static("cdn-cache-control")], ..CacheRules::default() }
}

fn eval_with(pool: &PoolConfig, req_headers: &[(&str, &str)], status: u16, res_headers: &[(&str, &str)]) -> Result<Freshness, NotStored> {
    let mut req = Request::get("http://shop.example/p");
    for (n, v) in req_headers {
        req = req.header(*n, *v);
    }
    let mut res = Response::builder().status(status);
    for (n, v) in res_headers {
        res = res.header(*n, *v);
    }
    let (req, _) = req.body(()).expect("request").into_parts();
    let (res, _) = res.body(()).expect("response").into_parts();
    let now = SystemTime::now();
    evaluate(&req, &res, pool, RouteRules { rules: &no_rules(), negative_ttl: None }, now, now)
}

fn eval(status: u16, res_headers: &[(&str, &str)]) -> Result<Freshness, NotStored> {
    eval_with(&pool(), &[], status, res_headers)
}

fn lifetime(status: u16, res_headers: &[(&str, &str)]) -> Duration {
    eval(status, res_headers).expect("storable").lifetime
}

#[test]
fn explicit_freshness_order() {
    assert_eq!(lifetime(200, &[("cache-control", "max-age=10")]), Duration::from_secs(10));
    assert_eq!(lifetime(200, &[("cache-control", "max-age=10, s-maxage=20")]), Duration::from_secs(20));
    let date = httpdate::fmt_http_date(SystemTime::now());
    let expires = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
    let from_expires = lifetime(200, &[("date", &date), ("expires", &expires)]);
    assert!(from_expires >= Duration::from_secs(119) && from_expires <= Duration::from_secs(121), "{from_expires:?}");
    assert_eq!(eval(200, &[("expires", "0")]), Err(NotStored::StaleOnArrival));
    assert_eq!(lifetime(200, &[("cache-control", "max-age=5"), ("expires", &expires)]), Duration::from_secs(5));
}

#[test]
fn default_ttl_applies_only_without_explicit_freshness() {
    assert_eq!(lifetime(200, &[]), Duration::from_secs(60));
    assert_eq!(eval(200, &[("cache-control", "max-age=0")]), Err(NotStored::StaleOnArrival));
    let mut heuristic_only = pool();
    heuristic_only.default_ttl = Duration::ZERO;
    assert_eq!(eval_with(&heuristic_only, &[], 200, &[]), Err(NotStored::NoFreshness));
    let date = httpdate::fmt_http_date(SystemTime::now());
    let modified = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(1000));
    let heuristic = eval_with(&heuristic_only, &[], 200, &[("date", &date), ("last-modified", &modified)]).expect("storable");
    assert!(heuristic.lifetime >= Duration::from_secs(99) && heuristic.lifetime <= Duration::from_secs(101));
}

#[test]
fn forbidden_responses() {
    assert_eq!(eval(200, &[("cache-control", "no-store")]), Err(NotStored::NoStore));
    assert_eq!(eval(200, &[("cache-control", "private, max-age=60")]), Err(NotStored::Private));
    assert_eq!(eval(200, &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]), Err(NotStored::SetCookie));
    assert_eq!(eval(200, &[("cache-control", "no-cache")]), Err(NotStored::NoCacheNoValidator));
    let no_cache = eval(200, &[("cache-control", "no-cache, max-age=60"), ("etag", "\"v1\"")]).expect("stored to revalidate");
    assert_eq!((no_cache.lifetime, no_cache.no_stale), (Duration::ZERO, true));
    let qualified = eval(200, &[("cache-control", "no-cache=\"x-user, X-Trace\", max-age=60")]).expect("storable");
    assert_eq!(qualified.strip, vec![HeaderName::from_static("x-user"), HeaderName::from_static("x-trace")]);
    assert_eq!(
        eval(200, &[("vary", "Cookie, accept-language, cookie")]).expect("varies").vary,
        vec![HeaderName::from_static("accept-language"), HeaderName::from_static("cookie")]
    );
    assert_eq!(eval(200, &[("vary", "*")]), Err(NotStored::VaryStar));
    assert_eq!(eval(200, &[("vary", "a b")]), Err(NotStored::VaryInvalid));
    assert!(eval(200, &[("vary", "Accept-Encoding")]).is_ok());
    assert_eq!(eval(206, &[("cache-control", "max-age=60")]), Err(NotStored::Status));
    assert_eq!(eval(500, &[]), Err(NotStored::Status));
}

#[test]
fn authorization_needs_explicit_permission() {
    assert_eq!(eval_with(&pool(), &[("authorization", "Bearer x")], 200, &[("cache-control", "max-age=60")]), Err(NotStored::Authorization));
    assert!(eval_with(&pool(), &[("authorization", "Bearer x")], 200, &[("cache-control", "public, max-age=60")]).is_ok());
    assert!(eval_with(&pool(), &[("authorization", "Bearer x")], 200, &[("cache-control", "s-maxage=60")]).is_ok());
}

#[test]
fn errors_are_kept_only_when_asked() {
    assert_eq!(eval(404, &[]), Err(NotStored::NoFreshness));
    assert_eq!(lifetime(404, &[("cache-control", "max-age=30")]), Duration::from_secs(30));
    let mut req = Request::get("http://h/").body(()).expect("req").into_parts().0;
    req.headers.clear();
    let res = Response::builder().status(404).body(()).expect("res").into_parts().0;
    let now = SystemTime::now();
    let kept = evaluate(&req, &res, &pool(), RouteRules { rules: &no_rules(), negative_ttl: Some(Duration::from_secs(10)) }, now, now).expect("kept");
    assert_eq!(kept.lifetime, Duration::from_secs(10));
}

#[test]
fn stale_windows_and_age() {
    let f = eval(200, &[("cache-control", "max-age=60, stale-while-revalidate=5, stale-if-error=7"), ("age", "10")]).expect("storable");
    assert_eq!((f.stale_while_revalidate, f.stale_if_error), (Duration::from_secs(5), Duration::from_secs(7)));
    assert_eq!(f.initial_age, Duration::from_secs(10));
    assert!(!f.no_stale);
    assert!(eval(200, &[("cache-control", "max-age=60, must-revalidate")]).expect("storable").no_stale);
    assert!(eval(200, &[("cache-control", "s-maxage=60")]).expect("storable").no_stale);
    let defaults = eval(200, &[("cache-control", "max-age=60")]).expect("storable");
    assert_eq!(defaults.stale_if_error, Duration::from_secs(600));
    assert_eq!(eval(200, &[("cache-control", "max-age=60"), ("age", "61")]), Err(NotStored::StaleOnArrival));
    // Stale on arrival but revalidatable: kept for conditional requests.
    assert!(eval(200, &[("cache-control", "max-age=60"), ("age", "61"), ("etag", "\"a\"")]).is_ok());
    // A list-valued Age counts by its first member; an invalid one is ignored.
    assert_eq!(eval(200, &[("cache-control", "max-age=60"), ("age", "5, 70")]).expect("storable").initial_age, Duration::from_secs(5));
    assert_eq!(eval(200, &[("cache-control", "max-age=60"), ("age", "soon")]).expect("storable").initial_age, Duration::ZERO);
}

#[test]
fn conflicting_duplicates_are_most_restrictive() {
    let d = Directives::parse(&{
        let mut h = HeaderMap::new();
        h.append("cache-control", "max-age=60".parse().expect("hv"));
        h.append("cache-control", "max-age=30, foo=\"a,b\", PUBLIC".parse().expect("hv"));
        h
    });
    assert_eq!(d.max_age, Some(0));
    assert!(d.public);
}

#[test]
fn huge_delta_seconds_are_clamped_not_overflowed() {
    let f = eval(200, &[("cache-control", "max-age=99999999999999999999999, stale-if-error=18446744073709551615"), ("age", "18446744073709551615")]);
    // Age clamps to 2^31 as well, which equals the clamped max-age: no freshness left.
    assert_eq!(f, Err(NotStored::StaleOnArrival));
    let f = eval(200, &[("cache-control", "max-age=99999999999999999999999, stale-if-error=18446744073709551615")]).expect("storable");
    assert_eq!(f.lifetime, Duration::from_secs(MAX_DELTA_SECONDS));
    assert_eq!(f.stale_if_error, Duration::from_secs(MAX_DELTA_SECONDS));
    assert_eq!(eval(200, &[("cache-control", "max-age=-5")]), Err(NotStored::StaleOnArrival));
    let expires = eval(200, &[("date", "Sun, 22 Nov 2026 08:00:00 GMT"), ("expires", "Fri, 31 Dec 9999 23:59:59 GMT")]).expect("storable");
    assert_eq!(expires.lifetime, Duration::from_secs(MAX_DELTA_SECONDS));
}

#[test]
fn targeted_fields_take_precedence() {
    let f = eval(200, &[("cache-control", "no-store"), ("cdn-cache-control", "max-age=120")]).expect("CDN-Cache-Control wins");
    assert_eq!(f.lifetime, Duration::from_secs(120));
    assert_eq!(eval(200, &[("cache-control", "max-age=60"), ("cdn-cache-control", "no-store")]), Err(NotStored::NoStore));
    // An invalid targeted field is ignored: Cache-Control decides.
    assert_eq!(lifetime(200, &[("cache-control", "max-age=60"), ("cdn-cache-control", "max-age=")]), Duration::from_secs(60));
    // Expires is ignored when a targeted field applies.
    let expires = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3000));
    assert_eq!(lifetime(200, &[("expires", &expires), ("cdn-cache-control", "max-age=7")]), Duration::from_secs(7));
}

#[test]
fn route_overrides() {
    let now = SystemTime::now();
    let run = |rules: &CacheRules, status: u16, headers: &[(&str, &str)]| {
        let (req, _) = Request::get("http://h/").body(()).expect("req").into_parts();
        let mut res = Response::builder().status(status);
        for (n, v) in headers {
            res = res.header(*n, *v);
        }
        let (res, _) = res.body(()).expect("res").into_parts();
        evaluate(&req, &res, &pool(), RouteRules { rules, negative_ttl: None }, now, now)
    };
    let forced = CacheRules { force_ttl: Some(Duration::from_secs(300)), ..no_rules() };
    assert_eq!(run(&forced, 200, &[("cache-control", "max-age=0")]).expect("forced").lifetime, Duration::from_secs(300));
    assert_eq!(run(&forced, 200, &[("cache-control", "no-store")]), Err(NotStored::NoStore), "force_ttl never overrides no-store");
    assert_eq!(run(&forced, 404, &[]), Err(NotStored::NoFreshness), "force_ttl is for statuses below 400");
    let ignore = CacheRules { ignore_no_cache: true, ..no_rules() };
    assert_eq!(run(&ignore, 200, &[("cache-control", "no-cache, max-age=30")]).expect("stored").lifetime, Duration::from_secs(30));
}

#[test]
fn request_directives() {
    let parse = |v: &str| {
        let mut h = HeaderMap::new();
        h.insert("cache-control", v.parse().expect("hv"));
        RequestDirectives::parse(&h)
    };
    let d = parse("max-age=5, MIN-FRESH=3, max-stale, only-if-cached");
    assert_eq!((d.max_age, d.min_fresh, d.max_stale, d.only_if_cached), (Some(5), Some(3), Some(None), true));
    assert_eq!(parse("max-stale=10").max_stale, Some(Some(10)));
    assert_eq!(parse("max-age=x").max_age, Some(0));
    assert!(parse("no-cache").no_cache && parse("no-cache").constrains());
    assert!(!parse("no-transform").constrains());
}

#[test]
fn a_request_with_cookie_gets_no_heuristic_freshness() {
    let cookie = [("cookie", "session=alice")];
    // The usual framework default: no Cache-Control at all.
    assert_eq!(eval_with(&pool(), &cookie, 200, &[]), Err(NotStored::CookieHeuristic));
    let mut negative = pool();
    negative.default_ttl = Duration::ZERO;
    let date = httpdate::fmt_http_date(SystemTime::now());
    let modified = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(1000));
    let by_last_modified = [("date", date.as_str()), ("last-modified", modified.as_str())];
    assert_eq!(eval_with(&negative, &cookie, 200, &by_last_modified), Err(NotStored::CookieHeuristic));
    // Explicit freshness is the origin saying the page is shareable.
    assert_eq!(eval_with(&pool(), &cookie, 200, &[("cache-control", "max-age=60")]).expect("explicit").lifetime, Duration::from_secs(60));
    assert_eq!(eval_with(&pool(), &cookie, 200, &[("cache-control", "public")]), Err(NotStored::CookieHeuristic), "public alone is no lifetime");
    // Nothing to guess from: the plain reason.
    assert_eq!(eval_with(&pool(), &cookie, 302, &[]), Err(NotStored::Status));
    let now = SystemTime::now();
    let (req, _) = Request::get("http://h/").header("cookie", "s=1").body(()).expect("req").into_parts();
    let (res, _) = Response::builder().status(200).body(()).expect("res").into_parts();
    let forced = CacheRules { force_ttl: Some(Duration::from_secs(30)), ..no_rules() };
    let keyed = CacheRules { key_headers: vec![http::header::COOKIE], ..no_rules() };
    for (rules, why) in [(&forced, "force_ttl"), (&keyed, "Cookie in key_headers")] {
        assert!(evaluate(&req, &res, &pool(), RouteRules { rules, negative_ttl: None }, now, now).is_ok(), "{why} lifts the rule");
    }
}

#[test]
fn an_authenticated_request_is_stored_only_when_the_response_says_it_is_shared() {
    let auth = [("authorization", "Bearer t")];
    assert_eq!(eval_with(&pool(), &auth, 200, &[("cache-control", "max-age=60")]), Err(NotStored::Authorization));
    assert_eq!(eval_with(&pool(), &auth, 200, &[]), Err(NotStored::Authorization));
    for shared in ["public, max-age=60", "s-maxage=60", "max-age=60, must-revalidate"] {
        assert!(eval_with(&pool(), &auth, 200, &[("cache-control", shared)]).is_ok(), "{shared}");
    }
    let now = SystemTime::now();
    let (req, _) = Request::get("http://h/").header("authorization", "Bearer t").body(()).expect("req").into_parts();
    let (res, _) = Response::builder().status(200).body(()).expect("res").into_parts();
    let forced = CacheRules { force_ttl: Some(Duration::from_secs(30)), ..no_rules() };
    assert_eq!(
        evaluate(&req, &res, &pool(), RouteRules { rules: &forced, negative_ttl: None }, now, now),
        Err(NotStored::Authorization),
        "force_ttl never makes it shared"
    );
}
