//! Memory bounded in bytes: storable bodies being read draw from the process's
//! `max_inflight_body_bytes`, pending Redis writes from their pool's
//! `redis_write_queue_bytes`; beyond them responses stream through unstored and writes
//! are dropped and counted, rather than held.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Bulwark, Origin, RedisServer, Reply, TestConfig};

const HOST: [(&str, &str); 1] = [("host", "shop.example")];

/// 700 KiB, storable, sent in 7 chunks over 600 ms (no `Content-Length`).
fn slow_big_pages(origin: &Origin) {
    origin.set(|_| Reply::ok(vec![b'm'; 700 << 10]).header("cache-control", "max-age=60").chunked(7, Duration::from_millis(100)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storable_bodies_beyond_max_inflight_body_bytes_stream_through_unstored() {
    let origin = Origin::start().await;
    slow_big_pages(&origin);
    let bulwark = Arc::new(Bulwark::start(&TestConfig::new(&origin.url()).server("max_inflight_body_bytes", "1MiB").to_toml()).await);
    let tasks: Vec<_> = ["/a", "/b"]
        .into_iter()
        .map(|path| {
            let bulwark = bulwark.clone();
            tokio::spawn(async move { bulwark.get_with(path, &HOST).await })
        })
        .collect();
    for task in tasks {
        let got = task.await.expect("request");
        assert_eq!((got.status.as_u16(), got.body.len()), (200, 700 << 10), "every client gets the whole page");
        // Storable at head time (no length declared): `stored` is decided then.
        assert_eq!(got.cache_status(), "bulwark; fwd=miss; stored");
    }
    // 1.4 MiB at once does not fit in 1 MiB: at least one streams on unstored (both can,
    // when the first one still holds its bytes as the second grows).
    let unstored = bulwark.metric("bulwark_not_stored_total", &[("reason", "memory")]).await;
    assert!(unstored >= 1.0, "{unstored}");
    // The budget comes back: a page that streamed is stored when asked for alone (and
    // nothing was remembered against it); the other is a hit.
    let mut misses = 0;
    for path in ["/a", "/b"] {
        match bulwark.get_with(path, &HOST).await.cache_status() {
            "bulwark; fwd=miss; stored" => misses += 1,
            "bulwark; hit; detail=l1" => {}
            other => panic!("{path}: {other}"),
        }
        assert_eq!(bulwark.get_with(path, &HOST).await.cache_status(), "bulwark; hit; detail=l1", "{path}");
    }
    assert_eq!(f64::from(misses), unstored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_beyond_the_budget_streams_at_once() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok(vec![b'd'; 2 << 20]).header("cache-control", "max-age=60"));
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).server("max_inflight_body_bytes", "1MiB").to_toml()).await;
    let got = bulwark.get_with("/declared", &HOST).await;
    assert_eq!((got.status.as_u16(), got.body.len(), got.cache_status()), (200, 2 << 20, "bulwark; fwd=miss; detail=memory"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_writes_beyond_redis_write_queue_bytes_are_dropped_and_counted() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(vec![b'w'; 300 << 10]).header("cache-control", "max-age=60").header("x-path", parts.uri.path()));
    let config = TestConfig::new(&origin.url())
        .redis(&redis.url())
        .pool("redis_timeout", "2s")
        .pool("redis_write_queue_bytes", "1MiB")
        // The lookups that time out must not open the breaker, which would skip the writes.
        .pool("redis_breaker_failures", 1000)
        .to_toml();
    let bulwark = Arc::new(Bulwark::start(&config).await);
    // Redis frozen: every write waits for its deadline, holding its bytes.
    redis.stall();
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let bulwark = bulwark.clone();
            tokio::spawn(async move { bulwark.get_with(&format!("/w/{i}"), &HOST).await })
        })
        .collect();
    for task in tasks {
        let got = task.await.expect("request");
        assert_eq!((got.status.as_u16(), got.cache_status()), (200, "bulwark; fwd=miss; stored"), "served and kept in L1 all the same");
    }
    redis.resume();
    let dropped = bulwark.metric("bulwark_redis_writes_dropped_total", &[("pool", "pdp"), ("reason", "queue")]).await;
    // Each 300 KiB entry holds about 600 KiB while queued (entry and encoding): at most
    // one fits in 1 MiB at a time.
    assert!(dropped >= 8.0, "{dropped} of 10 writes dropped with the queue full");
}
