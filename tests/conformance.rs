//! HTTP caching conformance: one test per rule, each naming its section of RFC 9111
//! (HTTP Caching), RFC 9110 (HTTP Semantics), RFC 5861 (stale directives), RFC 9211
//! (`Cache-Status`) or RFC 9213 (targeted cache control), run against bulwark with a
//! real in-process origin. Negative cases (what must NOT be stored or served) sit
//! beside the positive ones.
//!
//! Many tests use the origin's `Age` header to place a response exactly in its
//! lifetime without sleeping: a response whose `Age` exceeds its freshness lifetime is
//! stale on arrival, so whichever directive the cache chose decides whether it is kept.
//!
//! | section | rule | test (✗ = includes what must not be stored or served) |
//! |---|---|---|
//! | RFC 9111 3 | 206 and statuses not understood are not stored | `rfc9111_3_partial_and_unknown_statuses_are_not_stored` ✗ |
//! | RFC 9111 3.5 | `Authorization`: stored only with `public`/`s-maxage`/`must-revalidate`, never reused | `rfc9111_3_5_authenticated_requests` ✗ |
//! | RFC 9111 4.1 | variants stored and selected by `Vary`, normalised values | `rfc9111_4_1_variants_are_stored_and_selected_by_vary` |
//! | RFC 9111 4.1 | `Vary: *` never matches | `rfc9111_4_1_vary_star_never_matches` ✗ |
//! | RFC 9111 4.1 | `Accept-Encoding` reduced to what the origin produces | `rfc9111_4_1_accept_encoding_is_reduced_to_what_the_origin_produces` |
//! | RFC 9111 4.1 | variants per URL bounded | `rfc9111_4_1_variants_per_url_are_bounded` |
//! | RFC 9111 4.1 | variants shared through Redis | `rfc9111_4_1_variants_are_shared_through_redis` |
//! | RFC 9111 4.1 | coalesced requests get their own variant | `rfc9111_4_1_collapsed_requests_get_their_own_variant` ✗ |
//! | RFC 9111 4.1, RFC 9110 7.6.1 | `Connection`-named headers select no variant | `connection_named_headers_cannot_poison_a_variant` ✗ |
//! | RFC 9111 4.1 | a variants marker outlives every variant | `a_variants_marker_outlives_every_variant` |
//! | RFC 9111 4.2.1 | `s-maxage` over `max-age` over `Expires` | `rfc9111_4_2_1_freshness_lifetime_precedence` ✗ |
//! | RFC 9111 4.2.1, 5.3 | invalid `Expires`, conflicting or invalid directives: no freshness | `rfc9111_5_3_and_4_2_1_invalid_or_conflicting_values_mean_no_freshness` ✗ |
//! | RFC 9111 4.2.2 | heuristic freshness only for heuristic statuses or `public` | `rfc9111_4_2_2_heuristic_freshness` ✗ |
//! | RFC 9111 4.2.3 | `Age` calculation | `rfc9111_4_2_3_age_calculation` |
//! | RFC 9111 4.2.4 | `must-revalidate`, `proxy-revalidate`, `s-maxage`: never served stale | `rfc9111_4_2_4_must_revalidate_is_never_served_stale` ✗ |
//! | RFC 9111 4.3.1 | `If-Modified-Since` from `Last-Modified` | `rfc9111_4_3_1_last_modified_validation` |
//! | RFC 9111 4.3.2, RFC 9110 13.1 | client conditionals answered 304 from the cache | `rfc9111_4_3_2_client_conditionals_are_answered_from_the_cache` |
//! | RFC 9111 4.3.4 | a 304 refreshes headers and freshness, not the body | `rfc9111_4_3_4_a_304_refreshes_the_stored_response` |
//! | RFC 9111 4.3.4 | a 304 for another representation is not applied | `rfc9111_4_3_4_a_304_for_another_representation_is_not_applied` ✗ |
//! | RFC 9111 4.3.5 | HEAD answers update or invalidate the stored GET | `rfc9111_4_3_5_head_responses_update_or_invalidate_the_stored_get` |
//! | RFC 9111 4.4 | invalidation drops every variant | `rfc9111_4_4_invalidation_drops_every_variant` ✗ |
//! | RFC 9111 5.2.1.1, 5.2.1.3 | request `max-age`, `min-fresh` | `rfc9111_5_2_1_1_and_5_2_1_3_request_max_age_and_min_fresh` |
//! | RFC 9111 5.2.1.2 | request `max-stale` (not over `must-revalidate`) | `rfc9111_5_2_1_2_request_max_stale` ✗ |
//! | RFC 9111 5.2.1.4 | request `no-cache` validates | `rfc9111_5_2_1_4_request_no_cache_validates` |
//! | RFC 9111 5.2.1.4 | ... not with a slow origin's stale copy | `rfc9111_5_2_1_4_a_slow_origin_does_not_turn_no_cache_into_a_stale_hit` ✗ |
//! | RFC 9111 5.2.1.4 | ... not with an older copy from a peer | `rfc9111_5_2_1_4_request_no_cache_is_not_answered_by_an_older_peer_copy` ✗ |
//! | RFC 9111 5.2.1.5 | request `no-store` | `rfc9111_5_2_1_5_request_no_store` ✗ |
//! | RFC 9111 5.2.1.7 | `only-if-cached` | `rfc9111_5_2_1_7_only_if_cached` ✗ |
//! | RFC 9111 5.2.2.4 | `no-cache` stored, revalidated before every reuse | `rfc9111_5_2_2_4_no_cache_is_stored_and_revalidated_before_every_reuse` ✗ |
//! | RFC 9111 5.2.2.4 | `no-cache="field"` | `rfc9111_5_2_2_4_qualified_no_cache_fields_are_not_stored` ✗ |
//! | RFC 9111 5.2.2.5, 5.2.2.7 | `no-store`, `private` | `rfc9111_5_2_2_5_and_5_2_2_7_no_store_and_private_are_not_stored` ✗ |
//! | RFC 9110 5.6.7, RFC 9111 4.2 | all three HTTP-date formats, names in any case, GMT only | `rfc9110_5_6_7_all_three_date_formats_are_accepted` ✗ |
//! | RFC 9111 4.3.2 | `If-Modified-Since` without `Last-Modified` judged by `Date` | `rfc9111_4_3_2_if_modified_since_without_last_modified_uses_date` |
//! | RFC 9111 4.4 | a method of unknown safety invalidates | `rfc9111_4_4_a_method_of_unknown_safety_invalidates` |
//! | RFC 9110 6.6.1 | stored responses get a `Date` | `rfc9110_6_6_1_stored_responses_get_a_date` |
//! | RFC 9110 9.3.2 | HEAD from a stored GET | `rfc9110_9_3_2_head_is_answered_from_a_stored_get` |
//! | RFC 9110 15.1 | heuristically cacheable statuses; negative caching | `rfc9110_15_1_heuristically_cacheable_statuses` ✗ |
//! | RFC 9211 2 | `Cache-Status` members | `rfc9211_cache_status_members` |
//! | RFC 9213 2 | `CDN-Cache-Control` precedence, removal, invalid ignored | `rfc9213_cdn_cache_control_takes_precedence_and_is_removed` ✗ |
//! | RFC 9213 2.2 | `Surrogate-Control` when configured | `rfc9213_surrogate_control_when_configured` ✗ |
//! | route overrides | `force_ttl`, `ignore_no_cache`, `ignore_query_params`, `query_params`, `key_headers`, `strip_cookies` | `route_*` |
//! | poisoning | unkeyed headers, path normalisation, malformed values | `unkeyed_headers_do_not_reach_the_origin` ✗, `paths_are_normalised_consistently` ✗, `malformed_and_oversized_directives_are_survived` |
//! | coalescing | a shed background refresh does not shed its joiners | `a_request_joining_a_shed_background_refresh_asks_again` |
//! | coalescing | replicas held back take a peer's fetch, even stale on arrival | `replicas_held_back_take_a_peers_fetch_even_when_it_is_stale_on_arrival` |
//! | coalescing | a shared failure answer's cookie only for its own client | `a_shared_failure_answer_keeps_its_cookie_for_its_own_client_only` ✗ |
//! | purge tags | never reach clients | `purge_tags_never_reach_clients` ✗ |

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{Bulwark, Origin, RedisServer, Reply, TestConfig, simple_config};

const STORED: &str = "bulwark; fwd=miss; stored";
/// The `Cache-Status` of a miss not stored for `reason`.
fn not_stored(reason: &str) -> String {
    format!("bulwark; fwd=miss; detail={reason}")
}
const HIT: &str = "bulwark; hit; detail=l1";
const REVALIDATED: &str = "bulwark; fwd=stale; fwd-status=304; stored";

/// A config with pool keys `pool_extra` and route keys `route_extra`.
/// The test config with `pool_extra` and `route_extra` (TOML `key = value` lines) set.
fn config(origin: &Origin, pool_extra: &str, route_extra: &str) -> TestConfig {
    TestConfig::new(&origin.url()).pool_toml(pool_extra).route_toml(route_extra)
}

async fn start(origin: &Origin, pool_extra: &str, route_extra: &str) -> Bulwark {
    Bulwark::start(&config(origin, pool_extra, route_extra).to_toml()).await
}

fn header<'a>(parts: &'a http::request::Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Asks twice: the second answer tells whether the first was stored.
async fn stored_after_one(bulwark: &Bulwark, path: &str) -> bool {
    let first = bulwark.get(path).await;
    first.cache_status() == STORED && bulwark.get(path).await.cache_status() == HIT
}

fn http_date(offset_secs: i64) -> String {
    let now = SystemTime::now();
    let at = if offset_secs >= 0 { now + Duration::from_secs(offset_secs as u64) } else { now - Duration::from_secs((-offset_secs) as u64) };
    httpdate::fmt_http_date(at)
}

// --- Storing responses (RFC 9111 section 3) ---------------------------------------

/// RFC 9111 section 4.2.1: `s-maxage` over `max-age` over `Expires`. The response is
/// 11 s old on arrival, so it is kept only if the lifetime that applies is longer.
#[tokio::test]
async fn rfc9111_4_2_1_freshness_lifetime_precedence() {
    let origin = Origin::start().await;
    let far = http_date(3600);
    origin.set(move |parts| {
        let reply = Reply::ok("x").header("age", "11");
        match parts.uri.path() {
            "/s-maxage-wins" => reply.header("cache-control", "max-age=1000, s-maxage=10"),
            "/max-age-wins" => reply.header("cache-control", "max-age=10").header("expires", &far),
            "/expires" => reply.without_header("cache-control").header("expires", &far),
            "/s-maxage-long" => reply.header("cache-control", "max-age=10, s-maxage=1000"),
            _ => reply,
        }
    });
    let bulwark = start(&origin, "default_ttl = \"0s\"", "").await;
    assert!(!stored_after_one(&bulwark, "/s-maxage-wins").await, "s-maxage=10 applies, not max-age=1000");
    assert!(!stored_after_one(&bulwark, "/max-age-wins").await, "max-age=10 applies, not Expires");
    assert!(stored_after_one(&bulwark, "/expires").await, "Expires - Date applies without max-age");
    assert!(stored_after_one(&bulwark, "/s-maxage-long").await, "s-maxage=1000 applies, not max-age=10");
}

/// RFC 9111 section 5.2.2.5 (response `no-store`) and 5.2.2.7 (`private`): a shared
/// cache stores neither.
#[tokio::test]
async fn rfc9111_5_2_2_5_and_5_2_2_7_no_store_and_private_are_not_stored() {
    let origin = Origin::start().await;
    origin.set(|parts| match parts.uri.path() {
        "/no-store" => Reply::ok("x").header("cache-control", "no-store, max-age=60"),
        "/private" => Reply::ok("x").header("cache-control", "private, max-age=60"),
        "/private-fields" => Reply::ok("x").header("cache-control", "private=\"x-user\", max-age=60"),
        _ => Reply::ok("x"),
    });
    let bulwark = start(&origin, "", "").await;
    for (path, reason) in [("/no-store", "no-store"), ("/private", "private"), ("/private-fields", "private")] {
        assert_eq!(bulwark.get(path).await.cache_status(), not_stored(reason), "{path}");
        assert_eq!(bulwark.get(path).await.cache_status(), not_stored(reason), "{path}");
        assert_eq!(origin.count(path), 2, "{path}");
    }
}

/// RFC 9111 section 5.2.2.4: `no-cache` responses may be stored but are revalidated
/// before every reuse; without a validator they cannot be, so they are not kept.
#[tokio::test]
async fn rfc9111_5_2_2_4_no_cache_is_stored_and_revalidated_before_every_reuse() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        if parts.uri.path() == "/no-validator" {
            return Reply::ok("x").header("cache-control", "no-cache, max-age=60");
        }
        if header(parts, "if-none-match") == Some("\"v1\"") {
            return Reply::ok("").status(304).header("etag", "\"v1\"").header("cache-control", "no-cache, max-age=60");
        }
        Reply::ok("the page").header("cache-control", "no-cache, max-age=60").header("etag", "\"v1\"")
    });
    let bulwark = start(&origin, "", "").await;
    assert_eq!(bulwark.get("/page").await.cache_status(), STORED);
    for _ in 0..3 {
        let got = bulwark.get("/page").await;
        assert_eq!((got.cache_status(), got.text()), (REVALIDATED, "the page"));
    }
    assert_eq!(origin.count("/page"), 4, "every reuse went to the origin");
    assert_eq!(header(&origin.last_request().0, "if-none-match"), Some("\"v1\""));
    assert_eq!(bulwark.get("/no-validator").await.cache_status(), not_stored("no-cache-no-validator"));
    assert_eq!(bulwark.get("/no-validator").await.cache_status(), not_stored("no-cache-no-validator"));
}

/// RFC 9111 section 5.2.2.4: `no-cache="field"` keeps the response but not the named
/// fields.
#[tokio::test]
async fn rfc9111_5_2_2_4_qualified_no_cache_fields_are_not_stored() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("x").header("cache-control", "no-cache=\"X-User\", max-age=60").header("x-user", "alice").header("x-kept", "1"));
    let bulwark = start(&origin, "", "").await;
    let first = bulwark.get("/q").await;
    assert_eq!((first.cache_status(), first.header("x-user")), (STORED, None));
    let hit = bulwark.get("/q").await;
    assert_eq!((hit.cache_status(), hit.header("x-user"), hit.header("x-kept")), (HIT, None, Some("1")));
}

/// RFC 9111 sections 4.2.4 and 5.2.2.2 / 5.2.2.8: `must-revalidate`, `proxy-revalidate`
/// and `s-maxage` forbid serving a stale copy, even when the origin fails.
#[tokio::test]
async fn rfc9111_4_2_4_must_revalidate_is_never_served_stale() {
    let origin = Origin::start().await;
    let failing = Arc::new(AtomicUsize::new(0));
    let flag = failing.clone();
    origin.set(move |parts| {
        if flag.load(Ordering::SeqCst) == 1 {
            return Reply::ok("down").status(503);
        }
        let cc = match parts.uri.path() {
            "/must" => "max-age=2, must-revalidate",
            "/proxy" => "max-age=2, proxy-revalidate",
            "/s-maxage" => "s-maxage=2",
            _ => "max-age=2",
        };
        Reply::ok("copy").header("cache-control", cc)
    });
    let bulwark = start(&origin, "stale_while_revalidate = \"0s\"", "").await;
    for path in ["/must", "/proxy", "/s-maxage", "/plain"] {
        assert_eq!(bulwark.get(path).await.cache_status(), STORED, "{path}");
    }
    bulwark.advance(Duration::from_secs(3));
    failing.store(1, Ordering::SeqCst);
    for path in ["/must", "/proxy", "/s-maxage"] {
        let got = bulwark.get(path).await;
        assert_eq!(got.status, 503, "{path} must not be served stale");
    }
    let plain = bulwark.get("/plain").await;
    assert_eq!((plain.status.as_u16(), plain.cache_status()), (200, "bulwark; hit; detail=stale-if-error"));
}

/// RFC 9111 section 4.2.2: heuristic freshness only for heuristically cacheable statuses
/// (or `public`) with no explicit expiry; 10% of the time since `Last-Modified`.
#[tokio::test]
async fn rfc9111_4_2_2_heuristic_freshness() {
    let origin = Origin::start().await;
    let modified = http_date(-10_000);
    origin.set(move |parts| {
        let reply = Reply::ok("x").without_header("cache-control");
        match parts.uri.path() {
            "/modified" => reply.header("last-modified", &modified),
            "/unmodified" => reply,
            "/found" => reply.status(302).header("location", "/x").header("last-modified", &modified),
            "/found-public" => reply.status(302).header("location", "/x").header("last-modified", &modified).header("cache-control", "public"),
            _ => reply,
        }
    });
    let bulwark = start(&origin, "default_ttl = \"0s\"", "").await;
    assert!(stored_after_one(&bulwark, "/modified").await);
    assert!(!stored_after_one(&bulwark, "/unmodified").await, "no Last-Modified, no default_ttl: no heuristic");
    assert_eq!(bulwark.get("/found").await.cache_status(), not_stored("status"), "302 is not heuristically cacheable");
    assert_eq!(bulwark.get("/found-public").await.cache_status(), STORED, "public makes it so");
}

/// RFC 9111 section 5.3: an invalid `Expires` (such as `0`) means already expired.
/// Section 4.2.1: conflicting duplicate directives and invalid values count as 0.
#[tokio::test]
async fn rfc9111_5_3_and_4_2_1_invalid_or_conflicting_values_mean_no_freshness() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let reply = Reply::ok("x");
        match parts.uri.path() {
            "/expires-0" => reply.without_header("cache-control").header("expires", "0"),
            "/conflict" => reply.header("cache-control", "max-age=60, max-age=3600"),
            "/invalid" => reply.header("cache-control", "max-age=soon"),
            "/quoted" => reply.header("cache-control", "max-age=\"60\""),
            _ => reply,
        }
    });
    let bulwark = start(&origin, "default_ttl = \"0s\"", "").await;
    for path in ["/expires-0", "/conflict", "/invalid"] {
        assert!(!stored_after_one(&bulwark, path).await, "{path}");
    }
    assert!(stored_after_one(&bulwark, "/quoted").await, "a quoted delta-seconds is read (section 1.2.2 leniency)");
}

/// RFC 9111 section 3.5: a response to a request with `Authorization` is stored only
/// with `public`, `s-maxage` or `must-revalidate`, and a stored response answers an
/// authenticated request only when it has one of them.
#[tokio::test]
async fn rfc9111_3_5_authenticated_requests() {
    let origin = Origin::start().await;
    origin.set(|parts| match parts.uri.path() {
        "/public" => Reply::ok("shared").header("cache-control", "public, max-age=60"),
        _ => Reply::ok("mine"),
    });
    let bulwark = start(&origin, "", "").await;
    let auth = [("authorization", "Bearer t")];
    assert_eq!(bulwark.get_with("/plain", &auth).await.cache_status(), not_stored("authorization"));
    assert_eq!(bulwark.get_with("/public", &auth).await.cache_status(), STORED);
    assert_eq!(bulwark.get("/public").await.cache_status(), HIT);
    assert_eq!(bulwark.get_with("/public", &auth).await.cache_status(), HIT, "public: reused for an authenticated request");
    assert_eq!(bulwark.get("/anonymous").await.cache_status(), STORED);
    assert_eq!(bulwark.get("/anonymous").await.cache_status(), HIT);
    assert_eq!(bulwark.get_with("/anonymous", &auth).await.cache_status(), not_stored("authorization"), "not shared: the origin is asked");
}

// --- Statuses (RFC 9110 section 15.1, RFC 9111 section 3) ------------------------------

/// RFC 9110 section 15.1: 200, 203, 204, 300, 301 and 308 are heuristically cacheable;
/// 404, 405, 410, 414 and 501 too, and bulwark keeps those only for a route's
/// `negative_ttl` (or explicit freshness).
#[tokio::test]
async fn rfc9110_15_1_heuristically_cacheable_statuses() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let status: u16 = parts.uri.path().trim_start_matches("/s/").parse().unwrap_or(200);
        Reply::ok("x").status(status).without_header("cache-control").header("location", "/elsewhere")
    });
    let bulwark = start(&origin, "default_ttl = \"60s\"", "").await;
    for status in [200, 203, 204, 300, 301, 308] {
        let path = format!("/s/{status}");
        assert_eq!(bulwark.get(&path).await.cache_status(), STORED, "{status}");
        assert_eq!(bulwark.get(&path).await.cache_status(), HIT, "{status}");
    }
    // Kept only for negative_ttl, or (302, 307, 500) not storable without explicit freshness.
    for (status, reason) in [
        (404, "no-freshness"),
        (405, "no-freshness"),
        (410, "no-freshness"),
        (414, "no-freshness"),
        (501, "no-freshness"),
        (302, "status"),
        (307, "status"),
        (500, "status"),
    ] {
        let path = format!("/s/{status}");
        assert_eq!(bulwark.get(&path).await.cache_status(), not_stored(reason), "{status} without explicit freshness");
    }
    let negative = start(&origin, "", "negative_ttl = \"10s\"").await;
    for status in [404, 405, 410, 414, 501] {
        let path = format!("/s/{status}");
        assert_eq!(negative.get(&path).await.cache_status(), STORED, "{status} with negative_ttl");
        assert_eq!(negative.get(&path).await.cache_status(), HIT, "{status} with negative_ttl");
    }
}

/// RFC 9111 section 3.3 / 3.4: partial content (206) is never stored as a whole
/// object, and a status the cache does not understand (500) is not stored even with
/// explicit freshness.
#[tokio::test]
async fn rfc9111_3_partial_and_unknown_statuses_are_not_stored() {
    let origin = Origin::start().await;
    origin.set(|parts| match parts.uri.path() {
        "/partial" => Reply::ok("par").status(206).header("content-range", "bytes 0-2/10"),
        _ => Reply::ok("err").status(500),
    });
    let bulwark = start(&origin, "", "").await;
    for path in ["/partial", "/error"] {
        assert_eq!(bulwark.get(path).await.cache_status(), not_stored("status"), "{path}");
        assert_eq!(bulwark.get(path).await.cache_status(), not_stored("status"), "{path}");
    }
}

// --- Age (RFC 9111 section 4.2.3) ----------------------------------------------------

/// RFC 9111 section 4.2.3: `Age` = corrected initial age (the larger of the apparent age
/// from `Date` and the origin's `Age` plus the response delay) plus resident time; a
/// list-valued `Age` counts by its first member (section 5.1).
#[tokio::test]
async fn rfc9111_4_2_3_age_calculation() {
    let origin = Origin::start().await;
    let old_date = http_date(-100);
    origin.set(move |parts| match parts.uri.path() {
        "/aged" => Reply::ok("x").header("age", "30"),
        "/list" => Reply::ok("x").header("age", "30, 500"),
        "/dated" => Reply::ok("x").header("date", &old_date).header("cache-control", "max-age=600"),
        _ => Reply::ok("x"),
    });
    let bulwark = start(&origin, "", "").await;
    let age = |got: &support::Got| got.header("age").and_then(|a| a.parse::<u64>().ok()).expect("Age on a stored response");
    for (path, low, high) in [("/aged", 30, 32), ("/list", 30, 32), ("/dated", 100, 103)] {
        let miss = bulwark.get(path).await;
        assert!((low..=high).contains(&age(&miss)), "{path} miss: {:?}", miss.header("age"));
        let hit = bulwark.get(path).await;
        assert_eq!(hit.cache_status(), HIT, "{path}");
        assert!((low..=high).contains(&age(&hit)), "{path} hit: {:?}", hit.header("age"));
    }
    bulwark.advance(Duration::from_secs(2));
    assert!(age(&bulwark.get("/aged").await) >= 32, "resident time is added");
}

/// RFC 9110 section 6.6.1: a cached response without a valid `Date` gets the time it was
/// received; an invalid `Date` does not make the response look old (RFC 9111 4.2.3).
#[tokio::test]
async fn rfc9110_6_6_1_stored_responses_get_a_date() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("x").header("date", "not a date"));
    let bulwark = start(&origin, "", "").await;
    bulwark.get("/d").await;
    let hit = bulwark.get("/d").await;
    assert_eq!(hit.cache_status(), HIT);
    let date = hit.header("date").and_then(|d| httpdate::parse_http_date(d).ok()).expect("a valid Date");
    let skew = SystemTime::now().duration_since(date).unwrap_or_default();
    assert!(skew < Duration::from_secs(3), "{skew:?}");
    assert!(hit.header("age").and_then(|a| a.parse::<u64>().ok()).is_some_and(|a| a <= 1));
}

// --- Request directives (RFC 9111 section 5.2.1) ------------------------------------

fn etag_origin(origin: &Origin, cache_control: &'static str, age: &'static str) {
    origin.set(move |parts| {
        if header(parts, "if-none-match") == Some("\"v1\"") {
            return Reply::ok("").status(304).header("etag", "\"v1\"").header("cache-control", cache_control);
        }
        Reply::ok("body v1").header("etag", "\"v1\"").header("cache-control", cache_control).header("age", age)
    });
}

/// RFC 9111 section 5.2.1.4: request `no-cache` makes a fresh entry be validated with
/// the origin (conditionally, so the body is not sent again).
#[tokio::test]
async fn rfc9111_5_2_1_4_request_no_cache_validates() {
    let origin = Origin::start().await;
    etag_origin(&origin, "max-age=60", "0");
    let bulwark = start(&origin, "", "").await;
    assert_eq!(bulwark.get("/r").await.cache_status(), STORED);
    let got = bulwark.get_with("/r", &[("cache-control", "no-cache")]).await;
    assert_eq!((got.cache_status(), got.text()), (REVALIDATED, "body v1"));
    assert_eq!(origin.count("/r"), 2);
    assert_eq!(bulwark.get("/r").await.cache_status(), HIT);
    // The same with Redis: the copy in Redis is the one being validated, not an answer.
    let redis = RedisServer::start();
    let shared = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "")).await;
    let host = ("host", "shop.example");
    assert_eq!(shared.get_with("/rr", &[host]).await.cache_status(), STORED);
    for _ in 0..200 {
        if !redis.entries("bulwark:pdp:").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(shared.get_with("/rr", &[host, ("cache-control", "no-cache")]).await.cache_status(), REVALIDATED);
    assert_eq!(origin.count("/rr"), 2);
    // The route may be told to ignore the client's directives.
    let ignoring = start(&origin, "", "ignore_request_cache_control = true").await;
    ignoring.get("/i").await;
    assert_eq!(ignoring.get_with("/i", &[("cache-control", "no-cache")]).await.cache_status(), HIT);
    assert_eq!(ignoring.get_with("/i", &[("cache-control", "no-store")]).await.cache_status(), HIT, "no-store too: clients cannot force origin requests");
}

/// RFC 9111 section 5.2.1.4 across replicas: a copy in Redis stored before the request
/// came (here planted without the notice that would normally accompany it, as a lost
/// notice leaves it) is no validation: the origin is asked.
#[tokio::test]
async fn rfc9111_5_2_1_4_request_no_cache_is_not_answered_by_an_older_peer_copy() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    etag_origin(&origin, "max-age=600", "0");
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "")).await;
    for _ in 0..300 {
        if bulwark.metric("bulwark_redis_events_subscribed", &[("pool", "pdp")]).await == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let host = ("host", "shop.example");
    assert_eq!(bulwark.get_with("/peer", &[host]).await.cache_status(), STORED);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let key = bulwark::cache::CacheKey::new("http", "shop.example", "/peer", None, bulwark::cache::Encodings::IDENTITY);
    let mut headers = http::HeaderMap::new();
    headers.insert("etag", http::HeaderValue::from_static("\"v1\""));
    headers.insert("cache-control", http::HeaderValue::from_static("max-age=600"));
    let planted = support::fresh_entry(&key.text, headers, b"a peer's copy");
    redis::cmd("SET").arg(key.redis_key("bulwark:pdp:")).arg(planted.encode().as_ref()).query::<()>(&mut redis.conn()).expect("plant");
    let got = bulwark.get_with("/peer", &[host, ("cache-control", "no-cache")]).await;
    assert_eq!((got.cache_status(), got.text()), (REVALIDATED, "body v1"));
    assert_eq!(origin.count("/peer"), 2);
}

/// RFC 9111 section 5.2.2.4 across replicas: a `no-cache` response (stored only to be
/// revalidated) fetched by one replica holding the key's lease answers the requests the
/// other replicas held back meanwhile, as it does for waiters in one process.
#[tokio::test]
async fn replicas_held_back_take_a_peers_fetch_even_when_it_is_stale_on_arrival() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("page").header("cache-control", "no-cache").header("etag", "\"e\"").delay(Duration::from_millis(400)));
    let config = simple_config(&origin.url(), Some(&redis.url()), "");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let replica = Bulwark::start(&config).await;
        for _ in 0..300 {
            if replica.metric("bulwark_redis_events_subscribed", &[("pool", "pdp")]).await == 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        replicas.push(Arc::new(replica));
    }
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let replica = replicas[i % 3].clone();
            tokio::spawn(async move { replica.get_with("/nc", &[("host", "shop.example")]).await })
        })
        .collect();
    for task in tasks {
        let got = task.await.expect("task");
        assert_eq!((got.status.as_u16(), got.text()), (200, "page"));
    }
    assert!(origin.count("/nc") <= 2, "origin saw {} requests", origin.count("/nc"));
}

/// A failure answer shared with coalesced waiters carries no `Set-Cookie` to them; the
/// client whose request fetched it keeps its cookie.
#[tokio::test]
async fn a_shared_failure_answer_keeps_its_cookie_for_its_own_client_only() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("down").status(503).header("set-cookie", "session=abc").delay(Duration::from_millis(300)));
    let bulwark = Arc::new(start(&origin, "", "").await);
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let bulwark = bulwark.clone();
            tokio::spawn(async move { bulwark.get("/fail").await })
        })
        .collect();
    let mut with_cookie = 0;
    for task in tasks {
        let got = task.await.expect("task");
        assert_eq!(got.status, 503);
        with_cookie += usize::from(got.header("set-cookie").is_some());
    }
    assert_eq!(origin.count("/fail"), 1);
    assert_eq!(with_cookie, 1, "only the leader's client gets the cookie");
}

/// A request that joins a background refresh (which queues at low priority) is not shed
/// with it: when the refresh is shed, the request asks the origin at its own priority.
#[tokio::test]
async fn a_request_joining_a_shed_background_refresh_asks_again() {
    let origin = Origin::start().await;
    origin.set(|parts| match parts.uri.path() {
        "/busy" => Reply::ok("busy").header("cache-control", "no-store").delay(Duration::from_millis(1200)),
        _ => Reply::ok("page").header("cache-control", "max-age=2, stale-while-revalidate=30, stale-if-error=0"),
    });
    let config = config(&origin, "", "priority = \"critical\"").origin("max_concurrency", 1).origin("max_queue", 2).origin("queue_timeout", "800ms").to_toml();
    let bulwark = Arc::new(Bulwark::start(&config).await);
    assert_eq!(bulwark.get("/k").await.cache_status(), STORED);
    bulwark.advance(Duration::from_secs(3));
    let busy = {
        let bulwark = bulwark.clone();
        tokio::spawn(async move { bulwark.get("/busy").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Stale within stale-while-revalidate: served, and a low-priority refresh queues
    // behind /busy until it is shed.
    let stale = bulwark.get("/k").await;
    assert_eq!(stale.cache_status(), "bulwark; hit; fwd=stale; detail=stale-while-revalidate");
    let validated = bulwark.get_with("/k", &[("cache-control", "no-cache")]).await;
    assert_eq!((validated.status.as_u16(), validated.cache_status()), (200, STORED));
    assert_eq!(busy.await.expect("busy").status, 200);
}

/// RFC 9111 section 5.2.1.1 (`max-age`) and 5.2.1.3 (`min-fresh`): an entry older than
/// the client accepts, or not fresh long enough, is validated.
#[tokio::test]
async fn rfc9111_5_2_1_1_and_5_2_1_3_request_max_age_and_min_fresh() {
    let origin = Origin::start().await;
    etag_origin(&origin, "max-age=600", "20");
    let bulwark = start(&origin, "", "").await;
    assert_eq!(bulwark.get("/m").await.cache_status(), STORED);
    assert_eq!(bulwark.get_with("/m", &[("cache-control", "max-age=300")]).await.cache_status(), HIT);
    assert_eq!(bulwark.get_with("/m", &[("cache-control", "max-age=5")]).await.cache_status(), REVALIDATED);
    assert_eq!(bulwark.get_with("/m", &[("cache-control", "min-fresh=60")]).await.cache_status(), HIT);
    assert_eq!(bulwark.get_with("/m", &[("cache-control", "min-fresh=3600")]).await.cache_status(), REVALIDATED);
    assert_eq!(origin.count("/m"), 3);
}

/// RFC 9111 section 5.2.1.2: `max-stale` accepts a stale copy (up to its limit), unless
/// the response forbids serving it stale (section 4.2.4).
#[tokio::test]
async fn rfc9111_5_2_1_2_request_max_stale() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let cc = if parts.uri.path() == "/must" { "max-age=10, must-revalidate" } else { "max-age=10" };
        // 30 s old on arrival: stale by 20 s, kept only for revalidation (it has an ETag).
        Reply::ok("old copy").header("cache-control", cc).header("age", "30").header("etag", "\"e\"")
    });
    let bulwark = start(&origin, "stale_while_revalidate = \"0s\"", "").await;
    for path in ["/s", "/must"] {
        assert_eq!(bulwark.get(path).await.cache_status(), STORED, "{path}");
    }
    let accepted = bulwark.get_with("/s", &[("cache-control", "max-stale=60")]).await;
    assert_eq!((accepted.cache_status(), accepted.text()), (HIT, "old copy"));
    let unlimited = bulwark.get_with("/s", &[("cache-control", "max-stale")]).await;
    assert_eq!(unlimited.cache_status(), HIT);
    let too_stale = bulwark.get_with("/s", &[("cache-control", "max-stale=5")]).await;
    assert_ne!(too_stale.cache_status(), HIT, "stale by 20 s, the client accepts 5 s");
    let must = bulwark.get_with("/must", &[("cache-control", "max-stale=60")]).await;
    assert_ne!(must.cache_status(), HIT, "must-revalidate wins over max-stale");
}

/// RFC 9111 section 5.2.1.4 under coalescing: a request that demanded validation is not
/// answered with the stored copy when the origin is slow (as other waiters may be after
/// `lock_timeout`); it waits for the origin's answer.
#[tokio::test]
async fn rfc9111_5_2_1_4_a_slow_origin_does_not_turn_no_cache_into_a_stale_hit() {
    let origin = Origin::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    origin.set(move |_| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        let reply = Reply::ok(format!("version {n}")).header("cache-control", "max-age=60");
        if n == 0 { reply } else { reply.delay(Duration::from_millis(400)) }
    });
    let bulwark = start(&origin, "lock_timeout = \"100ms\"", "").await;
    bulwark.get("/slow").await;
    let validated = bulwark.get_with("/slow", &[("cache-control", "no-cache")]).await;
    assert_eq!((validated.cache_status(), validated.text()), (STORED, "version 1"));
}

/// RFC 9111 section 5.2.1.7: `only-if-cached` gets a stored response or 504, and never
/// reaches the origin.
#[tokio::test]
async fn rfc9111_5_2_1_7_only_if_cached() {
    let origin = Origin::start().await;
    let bulwark = start(&origin, "", "").await;
    let only = [("cache-control", "only-if-cached")];
    let missing = bulwark.get_with("/o", &only).await;
    assert_eq!(missing.status, 504);
    assert_eq!(origin.total(), 0);
    bulwark.get("/o").await;
    let stored = bulwark.get_with("/o", &only).await;
    assert_eq!((stored.status.as_u16(), stored.cache_status()), (200, HIT));
    assert_eq!(origin.total(), 1);
}

/// RFC 9111 section 5.2.1.5: request `no-store` is neither answered from nor stored in
/// the cache.
#[tokio::test]
async fn rfc9111_5_2_1_5_request_no_store() {
    let origin = Origin::start().await;
    let bulwark = start(&origin, "", "").await;
    bulwark.get("/n").await;
    let got = bulwark.get_with("/n", &[("cache-control", "no-store")]).await;
    assert_eq!(got.cache_status(), "bulwark; fwd=bypass");
    assert_eq!(origin.count("/n"), 2);
    assert_eq!(bulwark.get_with("/never", &[("cache-control", "no-store")]).await.cache_status(), "bulwark; fwd=bypass");
    assert_eq!(bulwark.get("/never").await.cache_status(), STORED, "the bypassed response was not stored");
}

// --- Vary (RFC 9111 section 4.1) -----------------------------------------------------

fn language_origin(origin: &Origin, delay: Duration) {
    origin.set(move |parts| {
        let lang = header(parts, "accept-language").unwrap_or("none").to_owned();
        Reply::ok(format!("page in {lang}")).header("vary", "Accept-Language").delay(delay)
    });
}

/// RFC 9111 section 4.1: a response is reused only for requests whose headers named by
/// `Vary` match; each variant is stored apart. Values are compared after
/// normalisation (whitespace, and case for case-insensitive fields).
#[tokio::test]
async fn rfc9111_4_1_variants_are_stored_and_selected_by_vary() {
    let origin = Origin::start().await;
    language_origin(&origin, Duration::ZERO);
    let bulwark = start(&origin, "", "").await;
    let en = [("accept-language", "en-US, en;q=0.8")];
    let de = [("accept-language", "de")];
    assert_eq!(bulwark.get_with("/v", &en).await.cache_status(), STORED);
    assert_eq!(bulwark.get_with("/v", &de).await.cache_status(), STORED);
    let en_hit = bulwark.get_with("/v", &[("accept-language", "EN-us,en;q=0.8")]).await;
    assert_eq!((en_hit.cache_status(), en_hit.text()), (HIT, "page in en-US, en;q=0.8"));
    let de_hit = bulwark.get_with("/v", &de).await;
    assert_eq!((de_hit.cache_status(), de_hit.text()), (HIT, "page in de"));
    let none = bulwark.get("/v").await;
    assert_eq!((none.cache_status(), none.text()), (STORED, "page in none"), "absent is its own variant");
    assert_eq!(origin.total(), 3);
}

/// RFC 9111 section 4.1 with `Accept-Encoding`: the client's codings are reduced to those
/// the origin can produce (`content_codings`), so clients differing only in codings the
/// origin never uses share one variant; the origin is asked for exactly that set.
#[tokio::test]
async fn rfc9111_4_1_accept_encoding_is_reduced_to_what_the_origin_produces() {
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(format!("coded for {}", header(parts, "accept-encoding").unwrap_or("-"))).header("vary", "Accept-Encoding"));
    let gzip_only = Bulwark::start(&config(&origin, "", "").origin("content_codings", vec!["gzip"]).to_toml()).await;
    let first = gzip_only.get_with("/ae", &[("accept-encoding", "br, gzip, zstd")]).await;
    assert_eq!((first.cache_status(), first.text()), (STORED, "coded for gzip"));
    assert_eq!(gzip_only.get_with("/ae", &[("accept-encoding", "gzip;q=0.5")]).await.cache_status(), HIT);
    assert_eq!(gzip_only.get_with("/ae", &[("accept-encoding", "br")]).await.text(), "coded for identity");
    let zstd = Bulwark::start(&config(&origin, "", "").origin("content_codings", vec!["zstd", "br"]).to_toml()).await;
    assert_eq!(zstd.get_with("/ae", &[("accept-encoding", "gzip, zstd, br")]).await.text(), "coded for br, zstd");
    assert_eq!(zstd.get_with("/ae", &[("accept-encoding", "zstd;q=0, br")]).await.text(), "coded for br");
}

/// Purge tags are for this cache only: the tag header never reaches clients, stored or not.
#[tokio::test]
async fn purge_tags_never_reach_clients() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let reply = Reply::ok("x").header("surrogate-key", "product-1 category-2");
        if parts.uri.path() == "/uncached" { reply.header("cache-control", "no-store") } else { reply }
    });
    let bulwark = start(&origin, "", "").await;
    for path in ["/cached", "/cached", "/uncached"] {
        assert_eq!(bulwark.get(path).await.header("surrogate-key"), None, "{path}");
    }
}

/// RFC 9111 section 4.1: `Vary: *` never matches, so such a response is not stored.
#[tokio::test]
async fn rfc9111_4_1_vary_star_never_matches() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("x").header("vary", "*"));
    let bulwark = start(&origin, "", "").await;
    assert!(!stored_after_one(&bulwark, "/star").await);
}

/// RFC 9111 section 4.1 with the pool's `max_variants`: the set of variants per URL is
/// bounded; a new variant takes the place of the one stored longest ago, so a flood of
/// rare values cannot keep the common ones out.
#[tokio::test]
async fn rfc9111_4_1_variants_per_url_are_bounded() {
    let origin = Origin::start().await;
    language_origin(&origin, Duration::ZERO);
    let bulwark = start(&origin, "max_variants = 2", "").await;
    let lang = |l: &'static str| [("accept-language", l)];
    for l in ["en", "de"] {
        assert_eq!(bulwark.get_with("/b", &lang(l)).await.cache_status(), STORED);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let third = bulwark.get_with("/b", &lang("fr")).await;
    assert_eq!((third.cache_status(), third.text()), (STORED, "page in fr"));
    assert_eq!(bulwark.get_with("/b", &lang("fr")).await.cache_status(), HIT);
    assert_eq!(bulwark.get_with("/b", &lang("de")).await.cache_status(), HIT, "the newer of the first two stays");
    assert_eq!(bulwark.get_with("/b", &lang("en")).await.cache_status(), STORED, "the oldest made room");
    assert_eq!(bulwark.get_with("/b", &lang("de")).await.cache_status(), STORED, "and now de, the oldest, did");
    assert_eq!(origin.total(), 5);
}

/// RFC 9110 section 7.6.1 with RFC 9111 section 4.1: a header the client names in
/// `Connection` does not reach the origin, so it must not select a variant either; and
/// `Connection: host` cannot take `Host` away from the origin request.
#[tokio::test]
async fn connection_named_headers_cannot_poison_a_variant() {
    let origin = Origin::start().await;
    language_origin(&origin, Duration::ZERO);
    let bulwark = start(&origin, "", "").await;
    let poisoned = bulwark.get_with("/cn", &[("accept-language", "de"), ("connection", "accept-language, host")]).await;
    assert_eq!(poisoned.text(), "page in none");
    assert_eq!(header(&origin.last_request().0, "host").map(|h| h.starts_with("127.0.0.1")), Some(true), "Host was kept");
    let german = bulwark.get_with("/cn", &[("accept-language", "de")]).await;
    assert_eq!((german.cache_status(), german.text()), (STORED, "page in de"), "not served the page stored without the header");
}

/// A variants marker in Redis lives as long as its longest-lived variant, whichever was
/// stored last.
#[tokio::test]
async fn a_variants_marker_outlives_every_variant() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.set(|parts| {
        let lang = header(parts, "accept-language").unwrap_or("none").to_owned();
        let cc = if lang == "en" { "max-age=3600" } else { "max-age=5" };
        Reply::ok(lang).header("vary", "Accept-Language").header("cache-control", cc)
    });
    let bulwark = Bulwark::start(&simple_config(
        &origin.url(),
        Some(&redis.url()),
        "stale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"\nkeep_for_revalidation = \"0s\"",
    ))
    .await;
    let host = ("host", "shop.example");
    bulwark.get_with("/long", &[host, ("accept-language", "en")]).await;
    bulwark.get_with("/long", &[host, ("accept-language", "de")]).await;
    let primary = bulwark::cache::CacheKey::new("http", "shop.example", "/long", None, bulwark::cache::Encodings::IDENTITY);
    let marker_key = primary.redis_key("bulwark:pdp:");
    let mut conn = redis.conn();
    let mut ttl: i64 = 0;
    for _ in 0..200 {
        ttl = redis::cmd("PTTL").arg(&marker_key).query(&mut conn).expect("PTTL");
        if redis.entries("bulwark:pdp:").len() >= 3 && ttl > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ttl > 3_000_000, "marker expires in {ttl} ms, before the 3600 s variant");
}
/// RFC 9111 section 4.1 across replicas: variants are shared through the pool's Redis,
/// found from another replica in one lookup budget.
#[tokio::test]
async fn rfc9111_4_1_variants_are_shared_through_redis() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    language_origin(&origin, Duration::ZERO);
    let config = simple_config(&origin.url(), Some(&redis.url()), "");
    let first = Bulwark::start(&config).await;
    let second = Bulwark::start(&config).await;
    let host = ("host", "shop.example");
    for lang in ["en", "de"] {
        assert_eq!(first.get_with("/shared", &[host, ("accept-language", lang)]).await.cache_status(), STORED);
    }
    // Two entries and the variants marker land in Redis off the request path.
    for _ in 0..200 {
        if redis.entries("bulwark:pdp:").len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for lang in ["en", "de"] {
        let got = second.get_with("/shared", &[host, ("accept-language", lang)]).await;
        assert_eq!((got.cache_status(), got.text()), ("bulwark; hit; detail=l2", format!("page in {lang}").as_str()));
    }
    assert_eq!(origin.total(), 2);
}

/// RFC 9111 section 4.1 under coalescing: requests waiting on one fetch are served its
/// answer only if their own headers select it; the others fetch their own variant,
/// coalesced among themselves.
#[tokio::test]
async fn rfc9111_4_1_collapsed_requests_get_their_own_variant() {
    let origin = Origin::start().await;
    language_origin(&origin, Duration::from_millis(300));
    let bulwark = Arc::new(start(&origin, "", "").await);
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let bulwark = bulwark.clone();
            let lang = ["en", "de"][i % 2];
            tokio::spawn(async move { (lang, bulwark.get_with("/cold", &[("accept-language", lang)]).await) })
        })
        .collect();
    for task in tasks {
        let (lang, got) = task.await.expect("task");
        assert_eq!(got.text(), format!("page in {lang}"), "a request was served another variant");
    }
    assert!(origin.total() <= 3, "origin saw {} requests for 2 variants", origin.total());
}

/// RFC 9111 section 4.4 with variants: invalidating a URL drops every variant of it.
#[tokio::test]
async fn rfc9111_4_4_invalidation_drops_every_variant() {
    let origin = Origin::start().await;
    language_origin(&origin, Duration::ZERO);
    let bulwark = start(&origin, "", "").await;
    for lang in ["en", "de"] {
        bulwark.get_with("/inv", &[("accept-language", lang)]).await;
    }
    let post = bulwark.request(Request::post(bulwark.url("/inv")).body(Full::new(Bytes::from_static(b"x"))).expect("req")).await;
    assert_eq!(post.status, 200);
    for lang in ["en", "de"] {
        assert_eq!(bulwark.get_with("/inv", &[("accept-language", lang)]).await.cache_status(), STORED, "{lang}");
    }
}

// --- Revalidation (RFC 9111 section 4.3) ---------------------------------------------

/// RFC 9111 sections 4.3.1, 4.3.3 and 4.3.4: a stale entry with an `ETag` is revalidated
/// with `If-None-Match`; a 304 refreshes its header fields and freshness, and the body
/// is not sent again.
#[tokio::test]
async fn rfc9111_4_3_4_a_304_refreshes_the_stored_response() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        if header(parts, "if-none-match") == Some("\"v1\"") {
            return Reply::ok("").status(304).header("etag", "\"v1\"").header("cache-control", "max-age=600").header("x-version", "2");
        }
        // Stale on arrival: kept for revalidation only.
        Reply::ok("body v1").header("etag", "\"v1\"").header("cache-control", "max-age=10").header("age", "30").header("x-version", "1")
    });
    let bulwark = start(&origin, "stale_while_revalidate = \"0s\"", "").await;
    assert_eq!(bulwark.get("/e").await.cache_status(), STORED);
    let revalidated = bulwark.get("/e").await;
    assert_eq!((revalidated.cache_status(), revalidated.text(), revalidated.header("x-version")), (REVALIDATED, "body v1", Some("2")));
    assert!(revalidated.header("age").is_some());
    let hit = bulwark.get("/e").await;
    assert_eq!((hit.cache_status(), hit.text(), hit.header("x-version")), (HIT, "body v1", Some("2")), "fresh again for 600 s");
    assert_eq!(origin.total(), 2);
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("cache", "revalidated")]).await, 1.0);
}

/// RFC 9111 section 4.3.1: with `Last-Modified` (and no `ETag`) the validation request
/// carries `If-Modified-Since`.
#[tokio::test]
async fn rfc9111_4_3_1_last_modified_validation() {
    let origin = Origin::start().await;
    let modified = http_date(-3600);
    let modified2 = modified.clone();
    origin.set(move |parts| {
        if header(parts, "if-modified-since") == Some(modified2.as_str()) {
            return Reply::ok("").status(304).header("cache-control", "max-age=600");
        }
        Reply::ok("dated").header("last-modified", &modified2).header("cache-control", "max-age=10").header("age", "30")
    });
    let bulwark = start(&origin, "stale_while_revalidate = \"0s\"", "").await;
    bulwark.get("/lm").await;
    let got = bulwark.get("/lm").await;
    assert_eq!((got.cache_status(), got.text()), (REVALIDATED, "dated"));
    assert_eq!(header(&origin.last_request().0, "if-modified-since"), Some(modified.as_str()));
}

/// RFC 9111 section 4.3.4: a 304 whose strong validator is not the stored one does not
/// update it; the cache asks again without conditions.
#[tokio::test]
async fn rfc9111_4_3_4_a_304_for_another_representation_is_not_applied() {
    let origin = Origin::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    origin.set(move |parts| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        if n == 0 {
            return Reply::ok("body v1").header("etag", "\"v1\"").header("cache-control", "max-age=10").header("age", "30");
        }
        if parts.headers.contains_key("if-none-match") {
            return Reply::ok("").status(304).header("etag", "\"v2\"").header("cache-control", "max-age=600");
        }
        Reply::ok("body v2").header("etag", "\"v2\"").header("cache-control", "max-age=600")
    });
    let bulwark = start(&origin, "stale_while_revalidate = \"0s\"", "").await;
    bulwark.get("/w").await;
    let got = bulwark.get("/w").await;
    assert_eq!((got.cache_status(), got.text(), got.header("etag")), (STORED, "body v2", Some("\"v2\"")));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "first fetch, the mismatched 304, the full fetch");
}

/// RFC 9110 section 13.1.2 / 13.1.3 and RFC 9111 section 4.3.2: a client's
/// `If-None-Match` or `If-Modified-Since` on a stored response is answered 304 by the
/// cache, with the fields a 304 carries (RFC 9110 section 15.4.5) and no body.
#[tokio::test]
async fn rfc9111_4_3_2_client_conditionals_are_answered_from_the_cache() {
    let origin = Origin::start().await;
    let modified = http_date(-3600);
    let lm = modified.clone();
    origin.set(move |_| Reply::ok("full body").header("etag", "W/\"abc\"").header("last-modified", &lm).header("x-other", "1"));
    let bulwark = start(&origin, "", "").await;
    bulwark.get("/c").await;
    let matched = bulwark.get_with("/c", &[("if-none-match", "\"zzz\", \"abc\"")]).await;
    assert_eq!((matched.status.as_u16(), matched.cache_status(), matched.body.len()), (304, HIT, 0));
    assert_eq!(matched.header("etag"), Some("W/\"abc\""));
    assert!(matched.header("age").is_some() && matched.header("cache-control").is_some());
    assert_eq!(matched.header("x-other"), None);
    let other = bulwark.get_with("/c", &[("if-none-match", "\"nope\"")]).await;
    assert_eq!((other.status.as_u16(), other.text()), (200, "full body"));
    let since = bulwark.get_with("/c", &[("if-modified-since", &http_date(0))]).await;
    assert_eq!(since.status, 304);
    let before = bulwark.get_with("/c", &[("if-modified-since", &http_date(-7200))]).await;
    assert_eq!(before.status, 200);
    // On the miss that stores the response, too; the origin never sees the client's conditionals.
    let first = bulwark.get_with("/c2", &[("if-none-match", "W/\"abc\"")]).await;
    assert_eq!((first.status.as_u16(), first.cache_status()), (304, STORED));
    assert_eq!(header(&origin.last_request().0, "if-none-match"), None);
    assert_eq!(origin.total(), 2);
}

// --- HEAD (RFC 9110 section 9.3.2, RFC 9111 section 4.3.5) -----------------------------

/// RFC 9110 section 9.3.2: HEAD is answered from a stored GET response, without a body.
#[tokio::test]
async fn rfc9110_9_3_2_head_is_answered_from_a_stored_get() {
    let origin = Origin::start().await;
    let bulwark = start(&origin, "", "").await;
    bulwark.get("/h").await;
    let head = bulwark.request(Request::head(bulwark.url("/h")).body(Full::default()).expect("req")).await;
    assert_eq!((head.cache_status(), head.body.len(), head.header("content-length")), (HIT, 0, Some("10")));
    assert_eq!(origin.total(), 1);
}

/// RFC 9111 section 4.3.5: a HEAD that must be validated is sent to the origin as HEAD;
/// a 200 for the same representation updates the stored GET response; one for another
/// representation invalidates it.
#[tokio::test]
async fn rfc9111_4_3_5_head_responses_update_or_invalidate_the_stored_get() {
    let origin = Origin::start().await;
    let version = Arc::new(AtomicUsize::new(1));
    let current = version.clone();
    origin.set(move |_| {
        let v = current.load(Ordering::SeqCst);
        Reply::ok("sixteen byte bod").header("etag", &format!("\"v{v}\"")).header("x-seen", &format!("{v}"))
    });
    let bulwark = start(&origin, "", "").await;
    assert_eq!(bulwark.get("/hd").await.header("x-seen"), Some("1"));
    let head = || Request::head(bulwark.url("/hd")).header("cache-control", "no-cache").body(Full::default()).expect("req");
    let updated = bulwark.request(head()).await;
    assert_eq!((updated.status.as_u16(), updated.cache_status()), (200, STORED));
    assert_eq!(origin.last_request().0.method, http::Method::HEAD);
    assert_eq!(bulwark.get("/hd").await.cache_status(), HIT, "updated, still stored");
    version.store(2, Ordering::SeqCst);
    let changed = bulwark.request(head()).await;
    assert_eq!(changed.header("etag"), Some("\"v2\""));
    // The stored v1 is now stale (not deleted): served once more while it is refreshed.
    let stale = bulwark.get("/hd").await;
    assert_eq!((stale.cache_status(), stale.header("x-seen")), ("bulwark; hit; fwd=stale; detail=stale-while-revalidate", Some("1")));
    let mut refreshed = None;
    for _ in 0..100 {
        let got = bulwark.get("/hd").await;
        if got.header("x-seen") == Some("2") {
            refreshed = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refreshed.map(|g| g.cache_status().to_owned()).as_deref(), Some(HIT), "refreshed to v2 in the background");
}

// --- Targeted cache control (RFC 9213) -----------------------------------------------

/// RFC 9213 section 2: `CDN-Cache-Control` takes precedence over `Cache-Control` and
/// `Expires` for bulwark, and is removed before the response goes to the client; an
/// invalid one is ignored (section 2.1).
#[tokio::test]
async fn rfc9213_cdn_cache_control_takes_precedence_and_is_removed() {
    let origin = Origin::start().await;
    origin.set(|parts| match parts.uri.path() {
        "/cdn-allows" => Reply::ok("x").header("cache-control", "no-store").header("cdn-cache-control", "max-age=60"),
        "/cdn-forbids" => Reply::ok("x").header("cache-control", "max-age=60").header("cdn-cache-control", "no-store"),
        _ => Reply::ok("x").header("cache-control", "max-age=60").header("cdn-cache-control", "max-age=60,"),
    });
    let bulwark = start(&origin, "", "").await;
    let allowed = bulwark.get("/cdn-allows").await;
    assert_eq!((allowed.cache_status(), allowed.header("cache-control"), allowed.header("cdn-cache-control")), (STORED, Some("no-store"), None));
    assert_eq!(bulwark.get("/cdn-allows").await.cache_status(), HIT);
    assert!(!stored_after_one(&bulwark, "/cdn-forbids").await);
    assert!(stored_after_one(&bulwark, "/invalid").await, "an invalid CDN-Cache-Control is ignored");
}

/// RFC 9213 section 2.2 with a configured target list: `Surrogate-Control` when the
/// route names it; otherwise it is an ordinary header.
#[tokio::test]
async fn rfc9213_surrogate_control_when_configured() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("x").header("cache-control", "private").header("surrogate-control", "max-age=60"));
    let configured = start(&origin, "", "targeted_cache_control = [\"Surrogate-Control\", \"CDN-Cache-Control\"]").await;
    let got = configured.get("/sc").await;
    assert_eq!((got.cache_status(), got.header("surrogate-control")), (STORED, None));
    let default = start(&origin, "", "").await;
    let got = default.get("/sc").await;
    assert_eq!((got.cache_status(), got.header("surrogate-control")), (not_stored("private").as_str(), Some("max-age=60")));
}

// --- Route overrides (README "Route overrides") --------------------------------------

/// `force_ttl`: the route's lifetime replaces the origin's, for storable responses.
#[tokio::test]
async fn route_force_ttl_overrides_origin_freshness() {
    let origin = Origin::start().await;
    origin.set(|parts| match parts.uri.path() {
        "/secret" => Reply::ok("x").header("cache-control", "no-store"),
        _ => Reply::ok("x").header("cache-control", "max-age=0"),
    });
    let bulwark = start(&origin, "", "force_ttl = \"5m\"").await;
    assert!(stored_after_one(&bulwark, "/f").await);
    assert!(!stored_after_one(&bulwark, "/secret").await, "never overrides no-store");
}

/// `ignore_no_cache`: origin `no-cache` is treated as absent.
#[tokio::test]
async fn route_ignore_no_cache() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("x").header("cache-control", "no-cache, max-age=60"));
    let bulwark = start(&origin, "", "ignore_no_cache = true").await;
    assert!(stored_after_one(&bulwark, "/nc").await);
    assert_eq!(origin.total(), 1);
}

/// `ignore_query_params`: named (or `prefix*`) parameters are left out of the key and
/// of the request sent to the origin.
#[tokio::test]
async fn route_ignore_query_params() {
    let origin = Origin::start().await;
    let bulwark = start(&origin, "", "ignore_query_params = [\"utm_*\", \"fbclid\"]").await;
    let first = bulwark.get("/p?utm_source=mail&id=7&fbclid=abc").await;
    assert_eq!((first.cache_status(), first.text()), (STORED, "body of /p?id=7"));
    assert_eq!(bulwark.get("/p?id=7&utm_campaign=sale").await.cache_status(), HIT);
    assert_eq!(bulwark.get("/p?id=8").await.cache_status(), STORED);
}

/// `query_params`: an allow-list. Only the listed parameters (or `prefix*`) enter the
/// key and the request sent to the origin, so a cache-buster's random parameters hit.
#[tokio::test]
async fn route_query_params_keep_only_the_listed_parameters() {
    let origin = Origin::start().await;
    let bulwark = start(&origin, "", "query_params = [\"page\", \"f_*\"]").await;
    let first = bulwark.get("/p?x=91&page=2&f_color=red&cb=1").await;
    assert_eq!((first.cache_status(), first.text()), (STORED, "body of /p?f_color=red&page=2"));
    assert_eq!(bulwark.get("/p?page=2&f_color=red&x=12345").await.cache_status(), HIT);
    assert_eq!(bulwark.get("/p?f_color=red&page=2").await.cache_status(), HIT);
    assert_eq!(bulwark.get("/p?page=3&f_color=red").await.cache_status(), STORED);
    let bare = bulwark.get("/p?x=1").await;
    assert_eq!((bare.cache_status(), bare.text()), (STORED, "body of /p"), "no listed parameter: no query at all");
    assert_eq!(origin.total(), 3);
}

/// `query_params` applies to what invalidates a URL too: a purge URL and a successful
/// unsafe request carrying unlisted parameters reach the entry their URL keys to;
/// a purge that kept them would find nothing, and the stale copy would stay.
#[tokio::test]
async fn route_query_params_normalise_purge_urls_and_invalidations() {
    let origin = Origin::start().await;
    let bulwark = start(&origin, "", "query_params = [\"page\"]").await;
    for path in ["/q?page=1", "/q?page=2"] {
        assert_eq!(bulwark.get(path).await.cache_status(), STORED);
    }
    let bulwark = &bulwark;
    let purge = |body: String| async move { bulwark.admin_send(http::Method::POST, "/admin/purge", &body).await };
    let answer = purge(format!(r#"{{"urls": ["{}"]}}"#, bulwark.url("/q?page=1&utm_source=mail"))).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(bulwark.get("/q?page=1").await.cache_status(), STORED, "the URL purge found its entry");
    let answer = purge(r#"{"urls": ["/q?sid=9&page=1"]}"#.to_owned()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(bulwark.get("/q?page=1").await.cache_status(), STORED, "the path purge found its entry");
    assert_eq!(bulwark.get("/q?page=2").await.cache_status(), HIT, "another page is not purged");
    let req = http::Request::post(bulwark.url("/q?page=2&token=abc")).body(http_body_util::Full::new(bytes::Bytes::new())).expect("request");
    assert_eq!(bulwark.request(req).await.status, 200);
    assert_eq!(bulwark.get("/q?page=2").await.cache_status(), STORED, "the POST invalidated its page");
}

/// `key_headers`: request headers added to the key, and passed to the origin.
#[tokio::test]
async fn route_key_headers() {
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(format!("for {}", header(parts, "x-country").unwrap_or("nowhere"))));
    let bulwark = start(&origin, "", "key_headers = [\"X-Country\"]").await;
    for country in ["DE", "FR"] {
        let got = bulwark.get_with("/k", &[("x-country", country)]).await;
        assert_eq!((got.cache_status(), got.text()), (STORED, format!("for {country}").as_str()));
    }
    let hit = bulwark.get_with("/k", &[("x-country", "DE")]).await;
    assert_eq!((hit.cache_status(), hit.text()), (HIT, "for DE"));
}

/// `strip_cookies`: `Cookie` is not sent to the origin and `Set-Cookie` (which would
/// make the response unstorable) is removed from cacheable responses.
#[tokio::test]
async fn route_strip_cookies() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("x").header("set-cookie", "session=1"));
    let bulwark = start(&origin, "", "strip_cookies = true").await;
    let got = bulwark.get_with("/sc", &[("cookie", "session=abc")]).await;
    assert_eq!((got.cache_status(), got.header("set-cookie")), (STORED, None));
    assert_eq!(header(&origin.last_request().0, "cookie"), None);
    assert_eq!(bulwark.get("/sc").await.cache_status(), HIT);
}

// --- Poisoning defences --------------------------------------------------------------

/// Headers that change the response but are not in the key never reach the origin on
/// a cacheable request, not even from a trusted proxy, unless the route keys them.
#[tokio::test]
async fn unkeyed_headers_do_not_reach_the_origin() {
    let origin = Origin::start().await;
    let trusted = config(&origin, "", "").server("trusted_proxies", vec!["127.0.0.1/32"]);
    let bulwark = Bulwark::start(&trusted.to_toml()).await;
    let risky = [
        ("x-forwarded-host", "evil.example"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-http-method-override", "DELETE"),
        ("forwarded", "host=evil.example"),
        ("x-host", "evil.example"),
    ];
    bulwark.get_with("/poison", &risky).await;
    let (parts, _) = origin.last_request();
    for (name, _) in risky {
        assert!(!parts.headers.contains_key(name), "{name} reached the origin");
    }
    let keyed = Bulwark::start(&trusted.route("key_headers", vec!["X-Forwarded-Host"]).to_toml()).await;
    keyed.get_with("/kh", &[("x-forwarded-host", "a.example")]).await;
    assert_eq!(header(&origin.last_request().0, "x-forwarded-host"), Some("a.example"));
    assert_eq!(keyed.get_with("/kh", &[("x-forwarded-host", "b.example")]).await.cache_status(), STORED, "keyed apart");
}

/// RFC 3986 sections 5.2.4 and 6.2.2 applied to the key, to routing and to the origin
/// request alike: dot segments removed, unreserved percent-encodings decoded; a
/// malformed percent-encoding is a 400.
#[tokio::test]
async fn paths_are_normalised_consistently() {
    let origin = Origin::start().await;
    let other = Origin::start().await;
    other.set(|_| Reply::ok("admin"));
    let config = config(&origin, "", "")
        .with_route("name = \"admin\"\npath_prefix = \"/admin/\"\npool = \"pdp\"\norigin = \"other\"")
        .with_origin(&format!("name = \"other\"\nurl = \"{}\"", other.url()))
        .to_toml();
    let bulwark = Bulwark::start(&config).await;
    let first = bulwark.get("/a/./b/%2e%2e/c%7e").await;
    assert_eq!((first.cache_status(), first.text()), (STORED, "body of /a/c~"));
    assert_eq!(bulwark.get("/a/c~").await.cache_status(), HIT);
    // Routing sees the normalised path: a traversal cannot reach another route's origin
    // under this route's name, nor this route's origin under another's.
    assert_eq!(bulwark.get("/x/%2E%2E/admin/panel").await.text(), "admin");
    assert_eq!(bulwark.get("/admin/../products/1").await.text(), "body of /products/1");
    // An encoded slash is not a separator: no traversal through it.
    assert_eq!(bulwark.get("/x/..%2Fadmin/panel").await.text(), "body of /x/..%2Fadmin/panel");
    assert_eq!(bulwark.get("/bad%zzpath").await.status, 400);
    assert_eq!(bulwark.get("/ok?bad=%g1").await.status, 400);
}

/// Malformed and oversized `Cache-Control` and `Vary` values are handled without a
/// panic: the response is served, and stored only when the values allow it.
#[tokio::test]
async fn malformed_and_oversized_directives_are_survived() {
    let origin = Origin::start().await;
    let huge_cc = format!("max-age=60, {}", "x-junk=\"a,b\", ".repeat(2000));
    let huge_vary = (0..200).map(|i| format!("x-h{i}")).collect::<Vec<_>>().join(", ");
    origin.set(move |parts| match parts.uri.path() {
        "/huge-cc" => Reply::ok("a").header("cache-control", &huge_cc),
        "/huge-vary" => Reply::ok("b").header("vary", &huge_vary),
        "/odd" => Reply::ok("c").header("cache-control", "max-age=60,,=,\"unterminated, max-age=").header("vary", ",,, ,"),
        _ => Reply::ok("d").header("cache-control", "max-age=99999999999999999999999999"),
    });
    let bulwark = start(&origin, "", "").await;
    assert_eq!(bulwark.get("/huge-cc").await.cache_status(), STORED);
    let vary = bulwark.get("/huge-vary").await;
    assert_eq!((vary.status.as_u16(), vary.cache_status()), (200, not_stored("vary-invalid").as_str()), "more than 16 Vary names: not stored");
    assert_eq!(bulwark.get("/odd").await.status, 200);
    assert_eq!(bulwark.get("/overflow").await.cache_status(), STORED);
    let client_cc = "max-age=".to_owned() + &"9".repeat(4000);
    assert_eq!(bulwark.get_with("/huge-cc", &[("cache-control", client_cc.as_str())]).await.status, 200);
}

// --- Cache-Status (RFC 9211) ---------------------------------------------------------

/// RFC 9211 section 2: one member per cache, ours last (closest to the client), with
/// `hit`, `fwd` and `stored` as the outcome says.
#[tokio::test]
async fn rfc9211_cache_status_members() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("x").header("cache-status", "origin-cache; hit"));
    let bulwark = start(&origin, "", "").await;
    assert_eq!(bulwark.get("/cs").await.cache_status(), "origin-cache; hit, bulwark; fwd=miss; stored");
    assert_eq!(bulwark.get("/cs").await.cache_status(), "origin-cache; hit, bulwark; hit; detail=l1");
}

// --- Dates (RFC 9110 section 5.6.7) and invalidation by unknown methods ---------------

/// `offset_secs` from now in the obsolete RFC 850 form: `Sunday, 06-Nov-94 08:49:37 GMT`.
fn rfc850_date(offset_secs: i64) -> String {
    let imf = http_date(offset_secs);
    let fields: Vec<&str> = imf.split([',', ' ']).filter(|f| !f.is_empty()).collect();
    let long = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let day = long.iter().find(|d| d.starts_with(fields[0])).expect("weekday");
    format!("{day}, {}-{}-{} {} GMT", fields[1], fields[2], &fields[3][2..], fields[4])
}

/// `offset_secs` from now in asctime form: `Sun Nov  6 08:49:37 1994`.
fn asctime_date(offset_secs: i64) -> String {
    let imf = http_date(offset_secs);
    let fields: Vec<&str> = imf.split([',', ' ']).filter(|f| !f.is_empty()).collect();
    let day: u32 = fields[1].parse().expect("day");
    format!("{} {} {day:>2} {} {}", fields[0], fields[2], fields[4], fields[3])
}

/// RFC 9110 section 5.6.7: a recipient accepts all three HTTP-date formats; RFC 9111
/// section 4.2: names in any case. A zone other than GMT makes `Expires` invalid, which
/// means already expired.
#[tokio::test]
async fn rfc9110_5_6_7_all_three_date_formats_are_accepted() {
    let origin = Origin::start().await;
    let (rfc850, asctime, upper, utc) = (rfc850_date(3600), asctime_date(3600), http_date(3600).to_uppercase(), http_date(3600).replace("GMT", "UTC"));
    let in_an_hour = http_date(3600);
    let other_day = if in_an_hour.starts_with("Mon") { "Tue" } else { "Mon" };
    let wrong_weekday = format!("{other_day}{}", &in_an_hour[3..]);
    origin.set(move |parts| {
        let reply = Reply::ok("x").without_header("cache-control");
        match parts.uri.path() {
            "/rfc850" => reply.header("expires", &rfc850),
            "/asctime" => reply.header("expires", &asctime),
            "/upper" => reply.header("expires", &upper),
            "/wrong-weekday" => reply.header("expires", &wrong_weekday),
            "/utc" => reply.header("expires", &utc),
            _ => reply,
        }
    });
    let bulwark = start(&origin, "default_ttl = \"0s\"", "").await;
    for path in ["/rfc850", "/asctime", "/upper", "/wrong-weekday"] {
        assert!(stored_after_one(&bulwark, path).await, "{path}: Expires an hour ahead was not honoured");
    }
    assert!(!stored_after_one(&bulwark, "/utc").await, "an Expires in UTC is invalid: already expired");
    // The client's If-Modified-Since in the RFC 850 form is understood too.
    let modified = http_date(-3600);
    origin.set(move |_| Reply::ok("page").header("cache-control", "max-age=600").header("last-modified", &modified));
    bulwark.get("/page").await;
    let conditional = bulwark.get_with("/page", &[("if-modified-since", &rfc850_date(-60))]).await;
    assert_eq!(conditional.status, 304);
    let asctime_conditional = bulwark.get_with("/page", &[("if-modified-since", &asctime_date(-60))]).await;
    assert_eq!(asctime_conditional.status, 304);
}

/// RFC 9111 section 4.3.2: with no `Last-Modified`, `If-Modified-Since` is evaluated
/// against the stored response's `Date`.
#[tokio::test]
async fn rfc9111_4_3_2_if_modified_since_without_last_modified_uses_date() {
    let origin = Origin::start().await;
    let date = http_date(-120);
    origin.set(move |_| Reply::ok("page").header("cache-control", "max-age=600").header("date", &date));
    let bulwark = start(&origin, "", "").await;
    bulwark.get("/d").await;
    let after = bulwark.get_with("/d", &[("if-modified-since", &http_date(-60))]).await;
    assert_eq!(after.status, 304, "the client has it since after the response's Date");
    let before = bulwark.get_with("/d", &[("if-modified-since", &http_date(-600))]).await;
    assert_eq!((before.status.as_u16(), before.text()), (200, "page"));
}

/// RFC 9111 section 4.4: a successful response to a method whose safety is unknown
/// invalidates the target URI, as an unsafe one does; OPTIONS, TRACE and the WebDAV
/// methods registered as safe do not.
#[tokio::test]
async fn rfc9111_4_4_a_method_of_unknown_safety_invalidates() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("x").header("cache-control", "max-age=600"));
    let bulwark = start(&origin, "", "").await;
    let send = |method: &'static [u8]| {
        let method = http::Method::from_bytes(method).expect("method");
        Request::builder().method(method).uri(bulwark.url("/doc")).body(Full::default()).expect("request")
    };
    assert_eq!(bulwark.get("/doc").await.cache_status(), STORED);
    assert_eq!(bulwark.request(send(b"OPTIONS")).await.status, 200);
    assert_eq!(bulwark.get("/doc").await.cache_status(), HIT, "OPTIONS is safe: nothing invalidated");
    assert_eq!(bulwark.request(send(b"PROPFIND")).await.status, 200);
    assert_eq!(bulwark.get("/doc").await.cache_status(), HIT, "PROPFIND is registered as safe");
    assert_eq!(bulwark.request(send(b"FROBNICATE")).await.status, 200);
    assert_eq!(bulwark.get("/doc").await.cache_status(), STORED, "a method of unknown safety: the stored copy was dropped");
}
