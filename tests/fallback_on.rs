//! `fallback_on`: a route's static response stands in, in normal mode, for an origin that
//! cannot answer for the reasons the route lists, and only when nothing stored may be
//! served: the empty search result of the seed incident, with nobody at the console.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{Bulwark, Origin, Reply, TestConfig};

const FALLBACK: &str = "bulwark; detail=fallback";

/// A route with an empty JSON fallback served on `reasons`.
fn config(origin: &str, reasons: &str) -> TestConfig {
    TestConfig::new(origin)
        .route_toml(&format!("fallback = {{ status = 200, headers = {{ \"content-type\" = \"application/json\" }}, body = \"[]\" }}\nfallback_on = {reasons}"))
}

fn assert_fallback(got: &support::Got, what: &str) {
    assert_eq!((got.status.as_u16(), got.text(), got.cache_status()), (200, "[]", FALLBACK), "{what}");
    assert_eq!(got.header("cache-control"), Some("no-store"), "{what}: a CDN in front must not keep a stand-in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_request_gets_the_fallback() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("results").header("cache-control", "no-store").delay(Duration::from_millis(600)));
    let config = config(&origin.url(), r#"["shed"]"#).origin("max_concurrency", 1).origin("max_queue", 0);
    let bulwark = Arc::new(Bulwark::start(&config.to_toml()).await);
    let busy = {
        let bulwark = bulwark.clone();
        tokio::spawn(async move { bulwark.get("/search?q=a").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_fallback(&bulwark.get("/search?q=b").await, "no slot and no queue");
    let busy = busy.await.expect("first");
    assert_eq!((busy.status.as_u16(), busy.text()), (200, "results"), "the request that had the slot is answered");
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("route", "all"), ("cache", "fallback")]).await, 1.0);
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("route", "all"), ("cache", "shed")]).await, 0.0);
}

#[tokio::test]
async fn a_timed_out_request_gets_the_fallback_and_an_error_status_does_not_unless_listed() {
    let origin = Origin::start().await;
    origin.set(|parts| match parts.uri.path() {
        "/slow" => Reply::ok("late").delay(Duration::from_secs(2)),
        _ => Reply::ok("down").status(503),
    });
    let bulwark = Bulwark::start(&config(&origin.url(), r#"["timeout"]"#).origin("timeout", "300ms").to_toml()).await;
    assert_fallback(&bulwark.get("/slow").await, "the origin's timeout");
    let answered = bulwark.get("/down").await;
    assert_eq!((answered.status.as_u16(), answered.text()), (503, "down"), "a 503 is not a timeout");
}

#[tokio::test]
async fn an_open_breaker_gets_the_fallback() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("down").status(503));
    let config = config(&origin.url(), r#"["breaker"]"#).origin("breaker_consecutive_failures", 2).origin("breaker_open_for", "30s");
    let bulwark = Bulwark::start(&config.to_toml()).await;
    for i in 0..2 {
        assert_eq!(bulwark.get(&format!("/search?q={i}")).await.status, 503, "the origin's own answers, until the breaker opens");
    }
    assert_eq!(bulwark.metric("bulwark_origin_breaker_open", &[("origin", "catalog")]).await, 1.0);
    let before = origin.total();
    assert_fallback(&bulwark.get("/search?q=next").await, "the breaker is open");
    assert_eq!(origin.total(), before, "an open breaker asks nothing of the origin");
}

#[tokio::test]
async fn an_unreachable_origin_or_a_failure_status_gets_the_fallback_but_a_not_found_does_not() {
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let bulwark = Bulwark::start(&config(&dead, r#"["error"]"#).to_toml()).await;
    assert_fallback(&bulwark.get("/search?q=a").await, "connection refused");

    let origin = Origin::start().await;
    origin.set(|parts| match parts.uri.path() {
        "/missing" => Reply::ok("no such page").status(404),
        _ => Reply::ok("oops").status(500),
    });
    let bulwark = Bulwark::start(&config(&origin.url(), r#"["error"]"#).to_toml()).await;
    assert_fallback(&bulwark.get("/search?q=a").await, "a 500");
    let missing = bulwark.get("/missing").await;
    assert_eq!((missing.status.as_u16(), missing.text()), (404, "no such page"), "a 404 is the origin's answer, not a failure");
    // An unsafe request that failed must not look done.
    let post = Request::post(bulwark.url("/search")).body(Full::new(Bytes::from_static(b"{}"))).expect("request");
    let got = bulwark.request(post).await;
    assert_eq!((got.status.as_u16(), got.text()), (500, "oops"), "a POST gets the origin's failure, never the fallback");
}

#[tokio::test]
async fn a_stored_copy_within_stale_if_error_comes_before_the_fallback() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("stored results").header("cache-control", "max-age=1, stale-if-error=600"));
    let config = config(&origin.url(), r#"["error", "timeout", "shed", "breaker"]"#).pool("stale_while_revalidate", "0s");
    let bulwark = Bulwark::start(&config.to_toml()).await;
    assert_eq!(bulwark.get("/search?q=a").await.status, 200);
    origin.set(|_| Reply::ok("down").status(503));
    bulwark.advance(Duration::from_secs(5));
    let got = bulwark.get("/search?q=a").await;
    assert_eq!((got.status.as_u16(), got.text(), got.cache_status()), (200, "stored results", "bulwark; hit; detail=stale-if-error"));
    assert_fallback(&bulwark.get("/search?q=never-stored").await, "nothing stored for this one");
}

#[tokio::test]
async fn bulwark_check_rejects_fallback_on_without_a_fallback_or_with_an_unknown_reason() {
    let without = TestConfig::new("http://127.0.0.1:1").route_toml("fallback_on = [\"error\"]").to_toml();
    let err = bulwark::Config::parse(&without, std::path::Path::new("shop.toml")).expect_err("fallback_on without a fallback");
    assert!(err.to_string().contains("fallback_on needs a `fallback`") && err.to_string().starts_with("shop.toml:"), "{err}");
    let unknown = config("http://127.0.0.1:1", r#"["slow"]"#).to_toml();
    let err = bulwark::Config::parse(&unknown, std::path::Path::new("shop.toml")).expect_err("unknown reason");
    assert!(err.to_string().contains("slow"), "{err}");
}
