//! The configurations shipped in `config/` are what new users copy: each passes `bulwark
//! check`, and the event-day shop, served against a local origin and Redis, does what its
//! comments promise (private areas passed through, product pages kept through an origin
//! outage, searches answered empty when search fails, analytics cookies ignored).

mod support;

use std::process::Command;
use std::time::Duration;

use support::{Bulwark, Origin, RedisServer, Reply};

#[test]
fn every_shipped_config_passes_bulwark_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).expect("config/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        // The secrets the shop reads from its environment, as its pods get them.
        let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
            .args(["check", "--config"])
            .arg(&path)
            .env("REDIS_PASSWORD", "from-a-secret")
            .output()
            .expect("run bulwark check");
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} configs in config/");
}

fn local_shop(origin: &Origin, redis: &RedisServer) -> String {
    support::shop::local_shop(&origin.url(), redis.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_config_keeps_private_pages_private_and_pages_up_through_an_outage() {
    let (origin, redis) = (Origin::start().await, RedisServer::start());
    origin.set(|parts| match parts.uri.path() {
        "/healthz" => Reply::ok("ok"),
        p if p.starts_with("/products/") => Reply::ok(format!("product {p}")).header("cache-control", "s-maxage=60"),
        p if p.starts_with("/account") => Reply::ok(format!("account of {:?}", parts.headers.get("cookie"))).header("cache-control", "max-age=600"),
        p if p.starts_with("/category/") => Reply::ok(format!("listing {}", parts.uri)).header("cache-control", "max-age=60"),
        "/api/search" => Reply::ok("search is down").status(503),
        _ => Reply::ok("page").header("cache-control", "max-age=60"),
    });
    let bulwark = Bulwark::start(&local_shop(&origin, &redis)).await;
    let cookie = |value: &str| [("cookie", format!("session={value}"))];

    // Private areas: passed through every time, whatever the origin says about caching.
    for user in ["alice", "bob"] {
        let got = bulwark.get_with("/account/orders", &cookie(user).each_ref().map(|(n, v)| (*n, v.as_str()))).await;
        assert_eq!(got.cache_status(), "bulwark; fwd=bypass");
        assert!(got.text().contains(user), "{user} got someone else's page: {}", got.text());
    }

    // Product pages: stored, and kept through an origin outage although the catalog sends
    // s-maxage (stale_on_error = "always").
    assert_eq!(bulwark.get("/products/1").await.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(bulwark.get("/products/1?utm_source=mail").await.cache_status(), "bulwark; hit; detail=l1");
    origin.set(|parts| match parts.uri.path() {
        "/healthz" => Reply::ok("ok"),
        _ => Reply::ok("database maintenance").status(503),
    });
    bulwark.advance(Duration::from_secs(20 * 60));
    let outage = bulwark.get("/products/1").await;
    assert_eq!((outage.status.as_u16(), outage.text(), outage.cache_status()), (200, "product /products/1", "bulwark; hit; detail=stale-if-error"));

    // Searches get the empty result when search fails, with nobody at the console.
    let search = bulwark.get("/api/search?q=shoes").await;
    assert_eq!((search.status.as_u16(), search.cache_status()), (200, "bulwark; detail=fallback"));
    assert!(search.text().contains("\"results\":[]"), "{}", search.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_config_keys_listings_on_their_parameters_and_ignores_analytics_cookies() {
    let (origin, redis) = (Origin::start().await, RedisServer::start());
    origin.set(|parts| match parts.uri.path() {
        "/healthz" => Reply::ok("ok"),
        _ => Reply::ok(format!("listing {}", parts.uri)).header("cache-control", "max-age=60"),
    });
    let bulwark = Bulwark::start(&local_shop(&origin, &redis)).await;
    let first = bulwark.get_with("/category/shoes?page=2&utm_campaign=sale", &[("cookie", "_ga=GA1.2.3; _fbp=fb.1")]).await;
    assert_eq!(first.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(first.text(), "listing /category/shoes?page=2", "only the listed parameters reach the catalog");
    let again = bulwark.get_with("/category/shoes?page=2&cb=123", &[("cookie", "_gid=GA1.2.9")]).await;
    assert_eq!(again.cache_status(), "bulwark; hit; detail=l1", "a cache-buster and analytics cookies change nothing");
}
