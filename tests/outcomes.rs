//! Outcomes that tell the truth: the `cache` label and `Cache-Status` say what happened,
//! so the hit ratio operators watch during an event cannot rise during an outage, and a
//! route switched to `cache-only` says that it served a stale copy because of the
//! switch, not because something failed.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::{Bulwark, Origin, Reply, TestConfig, simple_config};

/// Labels that count as hits in a pool's hit ratio (DESIGN.md, "Hit ratio of a pool").
const HIT_LABELS: [&str; 8] = ["hit_l1", "hit_l2", "collapsed", "revalidated", "stale_while_revalidate", "stale_if_error", "stale_cache_only", "stale_limited"];
/// Labels left out of the hit ratio's denominator.
const NOT_LOOKED_UP: [&str; 4] = ["bypass", "fallback", "off", "limited"];

/// The pool's hit ratio since start, as the dashboard computes it from the counters.
async fn hit_ratio(bulwark: &Bulwark) -> f64 {
    let text = bulwark.metrics().await;
    let count = |cache: &str| support::metric_value(&text, "bulwark_requests_total", &[("pool", "pdp"), ("cache", cache)]);
    let hits: f64 = HIT_LABELS.iter().map(|l| count(l)).sum();
    let all = support::metric_value(&text, "bulwark_requests_total", &[("pool", "pdp")]);
    let excluded: f64 = NOT_LOOKED_UP.iter().map(|l| count(l)).sum();
    hits / (all - excluded)
}

/// Sends `n` concurrent GETs for `path`; returns (status, Cache-Status, body) of each.
async fn concurrent_gets(bulwark: &Bulwark, path: &str, n: usize) -> Vec<(u16, String, Bytes)> {
    let client = support::client();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let client = client.clone();
            let url = bulwark.url(path);
            tokio::spawn(async move {
                let res = client.request(Request::get(url).body(Full::<Bytes>::default()).expect("request")).await.expect("response");
                let status = res.status().as_u16();
                let cache_status = res.headers().get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let body = http_body_util::BodyExt::collect(res.into_body()).await.expect("body").to_bytes();
                (status, cache_status, body)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.expect("client task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_503_shared_by_fifty_coalesced_requests_is_not_counted_as_hits() {
    let origin = Origin::start().await;
    // Slow enough that all fifty arrive while the leader waits, small enough to share.
    origin.set(|_| Reply::ok("down for maintenance").status(503).without_header("cache-control").delay(Duration::from_millis(500)));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let results = concurrent_gets(&bulwark, "/products/1", 50).await;
    for (status, cache_status, body) in &results {
        assert_eq!((*status, &body[..]), (503, &b"down for maintenance"[..]), "every client gets the origin's answer");
        assert!(!cache_status.contains("collapsed") && !cache_status.contains("hit"), "a shared failure is no hit: {cache_status}");
    }
    assert!(origin.total() < 50, "still coalesced: the origin saw {} requests for 50 clients", origin.total());
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("cache", "collapsed")]).await, 0.0);
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("cache", "miss")]).await, 50.0, "the leader's outcome, for each");
    assert_eq!(hit_ratio(&bulwark).await, 0.0, "an origin outage must not raise the hit ratio");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_a_timed_out_fetch_get_the_leaders_error_and_its_cause() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("too late").delay(Duration::from_secs(3)));
    let config = TestConfig::new(&origin.url()).origin("timeout", "300ms").to_toml();
    let bulwark = Bulwark::start(&config).await;
    let results = concurrent_gets(&bulwark, "/products/2", 20).await;
    for (status, cache_status, body) in &results {
        assert_eq!((*status, cache_status.as_str()), (504, "bulwark; fwd=miss; detail=error"));
        let text = std::str::from_utf8(body).expect("text");
        assert!(text.contains("did not answer within 300ms"), "the cause reaches every waiter: {text:?}");
    }
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("cache", "error")]).await, 20.0);
    assert_eq!(hit_ratio(&bulwark).await, 0.0);
}

async fn set_mode(bulwark: &Bulwark, mode: &str) {
    let answer = bulwark.admin_send(Method::PUT, "/admin/routes/all/mode", &format!(r#"{{"mode": "{mode}"}}"#)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

#[tokio::test]
async fn cache_only_serving_a_copy_past_its_freshness_is_stale_cache_only() {
    let origin = Origin::start().await;
    // Stale on arrival (its Age exceeds max-age) and kept for its validator; no stale
    // window allows serving it, and must-revalidate forbids it: only the operator's
    // switch to cache-only does.
    origin.set(|_| Reply::ok("kept").header("cache-control", "max-age=60, must-revalidate").header("age", "120").header("etag", "\"v1\""));
    let config = simple_config(&origin.url(), None, "stale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"");
    let bulwark = Bulwark::start(&config).await;
    assert_eq!(bulwark.get("/products/3").await.cache_status(), "bulwark; fwd=miss; stored");
    set_mode(&bulwark, "cache-only").await;
    let served = bulwark.get("/products/3").await;
    assert_eq!((served.status.as_u16(), served.text(), served.cache_status()), (200, "kept", "bulwark; hit; detail=stale-cache-only"));
    assert!(served.header("age").is_some_and(|a| a.parse::<u64>().is_ok_and(|a| a >= 120)));
    assert_eq!(origin.total(), 1, "cache-only never asks the origin");
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("cache", "stale_cache_only")]).await, 1.0);
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("cache", "stale_if_error")]).await, 0.0, "nothing failed");
}

#[tokio::test]
async fn cache_only_within_the_stale_windows_is_still_stale_cache_only() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("kept").header("cache-control", "max-age=60").header("age", "65").header("etag", "\"v1\""));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "stale_while_revalidate = \"30s\"\nstale_if_error = \"10m\"")).await;
    bulwark.get("/products/4").await;
    set_mode(&bulwark, "cache-only").await;
    let served = bulwark.get("/products/4").await;
    assert_eq!((served.text(), served.cache_status()), ("kept", "bulwark; hit; detail=stale-cache-only"));
    assert_eq!(origin.total(), 1, "no background refresh in cache-only");
}

#[tokio::test]
async fn cache_only_never_calls_the_origin_whatever_the_method_or_headers() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    set_mode(&bulwark, "cache-only").await;
    let got = bulwark.get_with("/account/orders", &[("authorization", "Bearer alice")]).await;
    assert_eq!((got.status.as_u16(), got.cache_status()), (504, "bulwark; fwd=miss; detail=error"));
    let no_store = bulwark.get_with("/products/1", &[("cache-control", "no-store")]).await;
    assert_eq!(no_store.status.as_u16(), 504, "a request no-store is not sent either");
    let post = bulwark.request(Request::post(bulwark.url("/cart")).body(Full::new(Bytes::from_static(b"item=1"))).expect("request")).await;
    assert_eq!(post.status.as_u16(), 504, "nor a POST");
    assert_eq!(origin.total(), 0, "cache-only: the origin rests, whoever asks");
}

#[tokio::test]
async fn a_one_second_body_is_recorded_with_a_duration_of_at_least_one_second() {
    let origin = Origin::start().await;
    // Not storable, so streamed through as it arrives: five chunks, 250 ms apart.
    origin.set(|_| Reply::ok("x".repeat(5000)).header("cache-control", "no-store").chunked(5, Duration::from_millis(250)));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let got = bulwark.get("/feeds/slow").await;
    assert_eq!((got.status.as_u16(), got.body.len()), (200, 5000));
    let labels = [("route", "all"), ("cache", "miss")];
    support::eventually("the request is recorded", Duration::from_secs(5), async || {
        bulwark.metric("bulwark_request_duration_seconds_count", &labels).await == 1.0
    })
    .await;
    let seconds = bulwark.metric("bulwark_request_duration_seconds_sum", &labels).await;
    assert!(seconds >= 1.0, "the duration covers the body: {seconds} s");
    assert_eq!(bulwark.metric("bulwark_client_aborts_total", &[("route", "all")]).await, 0.0);
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_body_is_counted_with_its_decided_outcome() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("y".repeat(10_000)).header("cache-control", "no-store").chunked(10, Duration::from_millis(200)));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let res = support::client().request(Request::get(bulwark.url("/feeds/long")).body(Full::<Bytes>::default()).expect("request")).await.expect("head");
    assert_eq!(res.headers().get("cache-status").and_then(|v| v.to_str().ok()), Some("bulwark; fwd=miss; detail=no-store"));
    let mut body = res.into_body();
    let first = http_body_util::BodyExt::frame(&mut body).await.expect("a first frame").expect("frame");
    assert!(first.is_data());
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("route", "all")]).await, 0.0, "not recorded before its body ends");
    drop(body);
    support::eventually("the hang-up is counted", Duration::from_secs(5), async || {
        bulwark.metric("bulwark_client_aborts_total", &[("route", "all")]).await == 1.0
    })
    .await;
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("route", "all"), ("cache", "miss")]).await, 1.0);
}

#[tokio::test]
async fn a_head_answered_with_an_error_body_is_not_counted_as_a_client_abort() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    set_mode(&bulwark, "off").await;
    let req = Request::head(bulwark.url("/products/5")).body(Full::<Bytes>::default()).expect("request");
    let got = bulwark.request(req).await;
    assert_eq!((got.status.as_u16(), got.cache_status(), got.body.len()), (503, "bulwark; detail=off", 0));
    assert_eq!(got.header("content-length"), Some("27"), "the length the GET's body has");
    support::eventually("the HEAD is recorded", Duration::from_secs(5), async || {
        bulwark.metric("bulwark_requests_total", &[("route", "all"), ("cache", "off")]).await == 1.0
    })
    .await;
    assert_eq!(bulwark.metric("bulwark_client_aborts_total", &[("route", "all")]).await, 0.0, "the server never reads a HEAD's body");
}

#[tokio::test]
async fn cache_only_serves_a_stored_copy_to_only_if_cached_as_stale_cache_only() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("kept").header("cache-control", "max-age=60").header("age", "90").header("etag", "\"v1\""));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "stale_while_revalidate = \"0s\"")).await;
    bulwark.get("/products/6").await;
    set_mode(&bulwark, "cache-only").await;
    let served = bulwark.get_with("/products/6", &[("cache-control", "only-if-cached")]).await;
    assert_eq!((served.status.as_u16(), served.text(), served.cache_status()), (200, "kept", "bulwark; hit; detail=stale-cache-only"));
    let max_stale = bulwark.get_with("/products/6", &[("cache-control", "max-stale")]).await;
    assert_eq!(max_stale.cache_status(), "bulwark; hit; detail=stale-cache-only", "stale, whatever the request accepts");
    assert_eq!(origin.total(), 1);
}

#[tokio::test]
async fn cache_only_serves_an_s_maxage_copy_past_its_freshness_instead_of_504() {
    let origin = Origin::start().await;
    // s-maxage implies proxy-revalidate (RFC 9111 section 5.2.2.10): no stale window
    // applies to it, so only the switch to cache-only may serve it stale.
    origin.set(|_| Reply::ok("pdp").header("cache-control", "public, s-maxage=5"));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    assert_eq!(bulwark.get("/products/9").await.cache_status(), "bulwark; fwd=miss; stored");
    set_mode(&bulwark, "cache-only").await;
    bulwark.advance(Duration::from_secs(30));
    let served = bulwark.get("/products/9").await;
    assert_eq!((served.status.as_u16(), served.text(), served.cache_status()), (200, "pdp", "bulwark; hit; detail=stale-cache-only"));
    assert_eq!(origin.total(), 1);
}

#[tokio::test]
async fn a_streamed_answer_with_a_content_length_sent_whole_is_not_a_client_abort() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("z".repeat(100_000)).header("cache-control", "no-store"));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let got = bulwark.get("/feeds/sized").await;
    assert_eq!((got.status.as_u16(), got.body.len(), got.header("content-length")), (200, 100_000, Some("100000")));
    support::eventually("the request is recorded", Duration::from_secs(5), async || {
        bulwark.metric("bulwark_requests_total", &[("route", "all"), ("cache", "miss")]).await == 1.0
    })
    .await;
    assert_eq!(bulwark.metric("bulwark_client_aborts_total", &[("route", "all")]).await, 0.0);
}

#[tokio::test]
async fn a_client_gone_mid_body_releases_its_origin_slot_before_the_origins_next_chunk() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("y".repeat(4_000)).header("cache-control", "no-store").chunked(4, Duration::from_secs(4)));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let res = support::client().request(Request::get(bulwark.url("/feeds/slow")).body(Full::<Bytes>::default()).expect("request")).await.expect("head");
    let mut body = res.into_body();
    let first = http_body_util::BodyExt::frame(&mut body).await.expect("a first frame").expect("frame");
    assert!(first.is_data());
    assert_eq!(bulwark.metric("bulwark_origin_inflight", &[]).await, 1.0);
    drop(body);
    support::eventually("the origin slot is released", Duration::from_secs(2), async || bulwark.metric("bulwark_origin_inflight", &[]).await == 0.0).await;
}
