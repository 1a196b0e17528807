//! Origin protection during a spike: coalescing in-process and across replicas, stale
//! serving, bulkheads with priorities, and the origin breaker.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{Bulwark, Origin, RedisServer, Reply, TestConfig, simple_config};

const HOST: [(&str, &str); 1] = [("host", "shop.example")];

/// Sends `clients` concurrent GETs, client i asking for key i % keys on instance i % n.
async fn spike(instances: &[String], clients: usize, keys: usize) -> Vec<(usize, support::Got)> {
    let client = support::client();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let client = client.clone();
            let url = format!("{}/products/{}", instances[i % instances.len()], i % keys);
            tokio::spawn(async move {
                let req = Request::get(url).header("host", "shop.example").body(Full::<Bytes>::default()).expect("req");
                let res = client.request(req).await.expect("request");
                let (parts, body) = res.into_parts();
                let body = http_body_util::BodyExt::collect(body).await.expect("body").to_bytes();
                (i % keys, support::Got { status: parts.status, headers: parts.headers, body })
            })
        })
        .collect();
    let mut out = Vec::with_capacity(clients);
    for task in tasks {
        out.push(task.await.expect("client task"));
    }
    out
}

fn slow_origin_reply(parts: &http::request::Parts) -> Reply {
    Reply::ok(format!("body of {}", parts.uri.path())).delay(Duration::from_millis(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_fifty_cold_keys_fifty_origin_requests() {
    let origin = Origin::start().await;
    origin.set(slow_origin_reply);
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let results = spike(&[format!("http://{}", bulwark.addr)], 500, 50).await;
    for (key, got) in &results {
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), format!("body of /products/{key}"));
    }
    assert_eq!(origin.total(), 50);
    let labels = |cache| [("pool", "pdp"), ("cache", cache)];
    assert_eq!(bulwark.metric("bulwark_requests_total", &labels("miss")).await, 50.0);
    // Everyone else either waited for a fill or came after it.
    let collapsed = bulwark.metric("bulwark_requests_total", &labels("collapsed")).await;
    let hits = bulwark.metric("bulwark_requests_total", &labels("hit_l1")).await;
    assert_eq!(collapsed + hits, 450.0);
    assert!(collapsed > 0.0);
    let collapsed_headers = results.iter().filter(|(_, g)| g.cache_status() == "bulwark; fwd=miss; collapsed").count();
    assert_eq!(collapsed_headers as f64, collapsed);
}

/// A `bulwark serve` process on the shared Redis, ready to take part in leases.
struct Process {
    serve: support::ServeProcess,
    url: String,
}

impl Process {
    async fn start(origin: &str, redis: &str, extra: &str, origin_timeout: &str) -> Process {
        // These tests are about the lease protocol, not Redis deadlines: a 500 ms deadline
        // keeps a machine busy with 500 clients and three replicas from turning lease
        // calls into misses (which fetch without a lease, by design).
        let config = TestConfig::new(origin).redis(redis).pool("redis_timeout", "500ms").pool_toml(extra).origin("timeout", origin_timeout).to_toml();
        let serve = support::ServeProcess::start(&config, std::process::Stdio::null(), std::process::Stdio::null()).await;
        // Ready when its Redis event subscription is up: before that it cannot take part
        // in leases.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(text) = serve.metrics().await
                && support::metric_value(&text, "bulwark_redis_events_subscribed", &[("pool", "pdp")]) == 1.0
            {
                break;
            }
            assert!(Instant::now() < deadline, "bulwark serve did not become ready");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        Process { url: serve.url(""), serve }
    }

    fn kill(&mut self) {
        self.serve.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_sharing_redis_coalesce_across_replicas() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.set(slow_origin_reply);
    let mut processes = Vec::new();
    for _ in 0..3 {
        processes.push(Process::start(&origin.url(), &redis.url(), "lock_timeout = \"5s\"", "5s").await);
    }
    let urls: Vec<String> = processes.iter().map(|p| p.url.clone()).collect();
    let start = Instant::now();
    let results = spike(&urls, 500, 50).await;
    let elapsed = start.elapsed();
    for (key, got) in &results {
        assert_eq!((got.status.as_u16(), got.text()), (200, format!("body of /products/{key}").as_str()));
    }
    let total = origin.total();
    assert!(total <= 55, "origin saw {total} requests for 50 keys across 3 replicas");
    assert!(total >= 50);
    // Replicas were told of each fill: nobody sat out the 5 s lock_timeout.
    assert!(elapsed < Duration::from_secs(3), "spike took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lease_holder_is_replaced_by_one_replica() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(format!("body of {}", parts.uri.path())).delay(Duration::from_millis(800)));
    // Lease time = origin timeout (1 s) + lock_timeout (300 ms).
    let extra = "lock_timeout = \"300ms\"";
    let mut holder = Process::start(&origin.url(), &redis.url(), extra, "1s").await;
    let peer = Process::start(&origin.url(), &redis.url(), extra, "1s").await;
    let get = |url: String| {
        tokio::spawn(async move {
            let req = Request::get(format!("{url}/products/1")).header("host", "shop.example").body(Full::<Bytes>::default()).expect("req");
            let res = support::client().request(req).await;
            match res {
                Ok(res) => {
                    let body = http_body_util::BodyExt::collect(res.into_body()).await.map(|b| b.to_bytes());
                    body.ok()
                }
                Err(_) => None,
            }
        })
    };
    let from_holder = get(holder.url.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let from_peer = get(peer.url.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The holder dies mid-fetch, lease held, nothing announced.
    holder.kill();
    assert!(from_holder.await.expect("task").is_none());
    let body = from_peer.await.expect("task").expect("the peer answers");
    assert_eq!(&body[..], b"body of /products/1");
    assert_eq!(origin.total(), 2, "the dead holder's fetch and one replacement");
}

#[tokio::test]
async fn warm_cache_survives_an_origin_that_fails_or_dies() {
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(format!("stored {}", parts.uri.path())).header("cache-control", "max-age=2"));
    // A breaker that never opens here, so "origin gone" is served as connection refused.
    let config = TestConfig::new(&origin.url())
        .pool_toml("stale_while_revalidate = \"0s\"\nstale_if_error = \"1m\"")
        .origin("breaker_consecutive_failures", 1000)
        .origin("breaker_min_requests", 1000)
        .to_toml();
    let bulwark = Bulwark::start(&config).await;
    for i in 0..20 {
        assert_eq!(bulwark.get_with(&format!("/p/{i}"), &HOST).await.status, 200);
    }
    bulwark.advance(Duration::from_secs(3));
    origin.set(|_| Reply::ok("down").status(503));
    for i in 0..20 {
        let got = bulwark.get_with(&format!("/p/{i}"), &HOST).await;
        assert_eq!((got.status.as_u16(), got.text()), (200, format!("stored /p/{i}").as_str()));
        assert_eq!(got.cache_status(), "bulwark; hit; detail=stale-if-error");
    }
    origin.stop();
    drop(origin);
    for i in 0..20 {
        let got = bulwark.get_with(&format!("/p/{i}"), &HOST).await;
        assert_eq!((got.status.as_u16(), got.text()), (200, format!("stored /p/{i}").as_str()), "origin gone");
    }
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("cache", "stale_if_error")]).await, 40.0);
    assert_eq!(bulwark.metric("bulwark_origin_requests_total", &[("status", "connect_error")]).await, 20.0);
    assert_eq!(bulwark.metric("bulwark_origin_breaker_open", &[("origin", "catalog")]).await, 0.0);
}

#[tokio::test]
async fn must_revalidate_forbids_stale_unless_the_route_says_always() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("strict").header("cache-control", "max-age=2, must-revalidate"));
    let base = TestConfig::new(&origin.url()).pool("stale_while_revalidate", "0s");
    let (always, base) = (base.clone().route("stale_on_error", "always").to_toml(), base.to_toml());
    let strict = Bulwark::start(&base).await;
    let lenient = Bulwark::start(&always).await;
    strict.get("/m").await;
    lenient.get("/m").await;
    strict.advance(Duration::from_secs(3));
    lenient.advance(Duration::from_secs(3));
    origin.set(|_| Reply::ok("down").status(503));
    assert_eq!(strict.get("/m").await.status, 503);
    let got = lenient.get("/m").await;
    assert_eq!((got.status.as_u16(), got.text(), got.cache_status()), (200, "strict", "bulwark; hit; detail=stale-if-error"));
}

#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    let origin = Origin::start().await;
    let version = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let v = version.clone();
    origin.set(move |_| {
        let n = v.load(std::sync::atomic::Ordering::SeqCst);
        Reply::ok(format!("v{n}"))
            // v2 lives long: with a 2 s fetch behind a 10 s lifetime, early expiration
            // (XFetch) refreshes a hit of it with a few per cent chance on a loaded machine,
            // which is a third origin request this test did not mean to count.
            .header("cache-control", if n == 1 { "max-age=2, stale-while-revalidate=30" } else { "max-age=3600" })
            .delay(Duration::from_millis(if n == 1 { 0 } else { 2000 }))
    });
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    assert_eq!(bulwark.get("/s").await.text(), "v1");
    bulwark.advance(Duration::from_secs(3));
    version.store(2, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..10 {
        let start = Instant::now();
        let got = bulwark.get("/s").await;
        assert_eq!((got.text(), got.cache_status()), ("v1", "bulwark; hit; fwd=stale; detail=stale-while-revalidate"));
        // Served without waiting for the refresh: all ten take less than its 2 s, each
        // far less than half of it.
        assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    }
    assert_eq!(origin.total(), 2, "ten stale hits, one background refresh");
    support::eventually("the refreshed copy is served", Duration::from_secs(10), async || {
        let got = bulwark.get("/s").await;
        (got.text(), got.cache_status()) == ("v2", "bulwark; hit; detail=l1")
    })
    .await;
    assert_eq!(origin.total(), 2, "stale hits while the refresh ran asked for no other");
}

#[tokio::test]
async fn a_leader_whose_client_disconnects_still_fills_its_waiters() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("filled").delay(Duration::from_millis(500)));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let url = bulwark.url("/leader");
    let leader = tokio::spawn(async move { support::client().get(url.parse().expect("uri")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let url = bulwark.url("/leader");
    let waiter = tokio::spawn(async move {
        let res = support::client().get(url.parse().expect("uri")).await.expect("waiter");
        let status = res.headers()["cache-status"].to_str().expect("ascii").to_owned();
        let body = http_body_util::BodyExt::collect(res.into_body()).await.expect("body").to_bytes();
        (status, body)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    leader.abort();
    let (status, body) = waiter.await.expect("waiter task");
    assert_eq!((status.as_str(), &body[..]), ("bulwark; fwd=miss; collapsed", &b"filled"[..]));
    assert_eq!(origin.total(), 1);
    // And the entry was stored for everyone after.
    assert_eq!(bulwark.get("/leader").await.cache_status(), "bulwark; hit; detail=l1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_answers_release_waiters_together_then_skip_the_wait() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("personal").header("cache-control", "private").delay(Duration::from_millis(300)));
    let bulwark = Arc::new(Bulwark::start(&simple_config(&origin.url(), None, "")).await);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let b = bulwark.clone();
            tokio::spawn(async move { b.get("/private").await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task").text(), "personal");
    }
    // One leader, then the nine waiters together (each held 300 ms by the origin), not
    // one after another.
    assert_eq!(origin.total(), 10);
    let together = origin.log.max_inflight.swap(0, std::sync::atomic::Ordering::SeqCst);
    assert!(together >= 5, "waiters were serialised: at most {together} at the origin at once");
    // Hit-for-miss: concurrent requests now go straight to the origin, in parallel.
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let b = bulwark.clone();
            tokio::spawn(async move { b.get("/private").await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task").cache_status(), "bulwark; fwd=miss; detail=private");
    }
    // Five 300 ms fetches at once, not in a row.
    let together = origin.log.max_inflight.load(std::sync::atomic::Ordering::SeqCst);
    assert!(together >= 3, "hit-for-miss requests were serialised: at most {together} at the origin at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_lock_timeout_one_waiter_takes_over_not_the_herd() {
    let origin = Origin::start().await;
    let bulwark = Arc::new(Bulwark::start(&simple_config(&origin.url(), None, "lock_timeout = \"1s\"")).await);
    // The first fetches hang far beyond lock_timeout; nothing is stored.
    origin.set(|_| Reply::ok("late").delay(Duration::from_secs(3)));
    let start = Instant::now();
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let b = bulwark.clone();
            tokio::spawn(async move { b.get("/slow").await })
        })
        .collect();
    // After one lock_timeout exactly one waiter has taken over: two origin requests.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(start.elapsed())).await;
    assert_eq!(origin.total(), 2, "one leader, then exactly one takeover");
    origin.set(|_| Reply::ok("quick"));
    for task in waiters {
        assert_eq!(task.await.expect("task").status, 200);
    }
    // The third leader (after the second timeout) got the quick answer for everyone left.
    assert!(origin.total() <= 4, "the herd was released: {} origin requests", origin.total());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_lock_timeout_waiters_get_the_stale_copy() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("old").header("cache-control", "max-age=2"));
    let config = simple_config(&origin.url(), None, "lock_timeout = \"300ms\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"1m\"");
    let bulwark = Arc::new(Bulwark::start(&config).await);
    assert_eq!(bulwark.get("/st").await.text(), "old");
    bulwark.advance(Duration::from_secs(3));
    origin.set(|_| Reply::ok("new").delay(Duration::from_secs(2)));
    let start = Instant::now();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let b = bulwark.clone();
            tokio::spawn(async move { (b.get("/st").await, start.elapsed()) })
        })
        .collect();
    for task in tasks {
        let (got, elapsed) = task.await.expect("task");
        // Leader and waiters alike: the stored copy after lock_timeout, not the 2 s origin.
        assert_eq!(got.text(), "old");
        // Past the stale-while-revalidate window (0 s): served by stale-if-error.
        assert_eq!(got.cache_status(), "bulwark; hit; detail=stale-if-error");
        // lock_timeout is 300 ms; 5x margin.
        assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    }
    assert_eq!(origin.total(), 2, "one fetch, still running for the next request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_origin_bounded_in_flight_and_low_priority_shed_first() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let path = parts.uri.path();
        if path == "/low/cached" {
            return Reply::ok("stored copy").header("cache-control", "max-age=2");
        }
        Reply::ok(format!("body of {path}")).header("cache-control", "no-store").delay(Duration::from_secs(2))
    });
    let config = format!(
        r#"
[server]
drain_delay = "0s"
[[origins]]
name = "catalog"
url = "{}"
max_concurrency = 8
max_queue = 8
queue_timeout = "3s"
[[pools]]
name = "pdp"
stale_while_revalidate = "0s"
[[routes]]
name = "critical"
path_prefix = "/critical/"
pool = "pdp"
origin = "catalog"
priority = "critical"
[[routes]]
name = "low"
path_prefix = "/low/"
pool = "pdp"
origin = "catalog"
priority = "low"
"#,
        origin.url()
    );
    let bulwark = Arc::new(Bulwark::start(&config).await);
    // A low-priority page with a stored copy, stale by the time the origin is saturated.
    assert_eq!(bulwark.get("/low/cached").await.text(), "stored copy");
    bulwark.advance(Duration::from_secs(3));
    let send = |path: String| {
        let b = bulwark.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let got = b.get(&path).await;
            (got, start.elapsed())
        })
    };
    // Eight requests fill the origin's slots for 2 s.
    let busy: Vec<_> = (0..8).map(|i| send(format!("/critical/busy/{i}"))).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Then 12 low and 12 critical requests arrive together; the queue holds 8.
    let mut wave = Vec::new();
    for i in 0..12 {
        wave.push(("low", send(format!("/low/{i}"))));
        wave.push(("critical", send(format!("/critical/{i}"))));
    }
    let stale = bulwark.get("/low/cached").await;
    assert_eq!((stale.status.as_u16(), stale.text()), (200, "stored copy"), "shed with a stored copy: the copy");
    assert_eq!(stale.cache_status(), "bulwark; hit; detail=stale-if-error");
    let (mut served_critical, mut shed_critical, mut shed_low) = (0, 0, 0);
    for (route, task) in wave {
        let (got, elapsed) = task.await.expect("task");
        match (route, got.status.as_u16()) {
            ("critical", 200) => served_critical += 1,
            (_, 503) => {
                assert_eq!(got.cache_status(), "bulwark; detail=shed");
                assert!(got.header("retry-after").is_some());
                // Within queue_timeout (3 s).
                assert!(elapsed < Duration::from_secs(3) + Duration::from_millis(500), "{elapsed:?}");
                if route == "low" { shed_low += 1 } else { shed_critical += 1 }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for task in busy {
        assert_eq!(task.await.expect("task").0.status, 200);
    }
    // Low requests go first: every one of them is shed, and the queue's eight places
    // go to critical requests, which get the freed slots.
    assert_eq!((shed_low, served_critical, shed_critical), (12, 8, 4));
    assert_eq!(origin.log.max_inflight.load(std::sync::atomic::Ordering::SeqCst), 8);
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("route", "low"), ("cache", "shed")]).await, 12.0);
    assert_eq!(bulwark.metric("bulwark_origin_inflight", &[("origin", "catalog")]).await, 0.0);
}

#[tokio::test]
async fn breaker_opens_answers_fast_without_the_origin_and_closes_after_a_probe() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("broken").status(500).header("cache-control", "no-store"));
    let config = TestConfig::new(&origin.url()).origin("breaker_consecutive_failures", 3).origin("breaker_open_for", "300ms").to_toml();
    let bulwark = Bulwark::start(&config).await;
    for i in 0..3 {
        assert_eq!(bulwark.get(&format!("/b/{i}")).await.status, 500);
    }
    assert_eq!(bulwark.metric("bulwark_origin_breaker_open", &[("origin", "catalog")]).await, 1.0);
    for i in 0..5 {
        let got = bulwark.get(&format!("/c/{i}")).await;
        assert_eq!((got.status.as_u16(), got.cache_status()), (503, "bulwark; detail=shed"));
    }
    assert_eq!(origin.total(), 3, "an open breaker keeps requests off the origin");
    origin.set(|_| Reply::ok("healthy"));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(bulwark.get("/probe").await.text(), "healthy");
    assert_eq!(bulwark.metric("bulwark_origin_breaker_open", &[("origin", "catalog")]).await, 0.0);
    assert_eq!(bulwark.get("/after").await.status, 200);
}

/// Opens an h2c connection to `addr` and sends `streams` GETs with random queries at
/// once, each reset (its future dropped) after `reset_after`.
async fn reset_h2c_streams(addr: std::net::SocketAddr, streams: usize, reset_after: Duration) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp)).await.expect("h2c handshake");
    tokio::spawn(conn);
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let mut sender = sender.clone();
            tokio::spawn(async move {
                let uri = format!("http://shop.example/products/1?q={}", fastrand::u64(..));
                let req = Request::get(uri).body(Full::<Bytes>::default()).expect("request");
                let _ = tokio::time::timeout(reset_after, async move {
                    if sender.ready().await.is_ok() {
                        let _ = sender.send_request(req).await;
                    }
                })
                .await;
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("stream task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_whose_clients_reset_before_an_origin_slot_never_reach_the_origin() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("page").delay(Duration::from_secs(1)));
    let config = TestConfig::new(&origin.url()).origin("max_concurrency", 8).origin("queue_timeout", "5s").to_toml();
    let bulwark = Arc::new(Bulwark::start(&config).await);
    // 1,000 streams on five connections (the server admits 200 at a time on each).
    let resets: Vec<_> = (0..5).map(|_| tokio::spawn(reset_h2c_streams(bulwark.addr, 200, Duration::from_millis(50)))).collect();
    for reset in resets {
        reset.await.expect("connection task");
    }
    // A buyer arriving while the first eight still hold every slot.
    let buyer = bulwark.get("/products/2").await;
    assert_eq!((buyer.status.as_u16(), buyer.text()), (200, "page"), "not shed behind fetches nobody wants");
    let reached = origin.total();
    assert!(reached <= 8 + 1, "the reset streams stopped at the queue: the origin saw {reached} requests");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(origin.total(), reached, "nothing left in the queue reaches the origin later");
}
