//! Cache-aside behaviour against a real in-process origin: hits, misses, what is and is
//! not stored, headers, and metrics counted exactly.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::{Bulwark, Origin, RedisServer, Reply, TestConfig, simple_config};

#[tokio::test]
async fn n_requests_to_a_cold_key_give_one_miss_and_n_minus_one_hits() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let first = bulwark.get("/products/1?b=2&a=1").await;
    assert_eq!(first.status, 200);
    // The origin is asked exactly what the key says: parameters ordered by name.
    assert_eq!(first.text(), "body of /products/1?a=1&b=2");
    assert_eq!(first.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(first.header("age"), None);
    for _ in 0..19 {
        let hit = bulwark.get("/products/1?b=2&a=1").await;
        assert_eq!(hit.text(), "body of /products/1?a=1&b=2");
        assert_eq!(hit.cache_status(), "bulwark; hit; detail=l1");
        assert!(hit.header("age").is_some_and(|a| a.parse::<u64>().is_ok()));
    }
    // Same parameters in another order: the same entry.
    assert_eq!(bulwark.get("/products/1?a=1&b=2").await.cache_status(), "bulwark; hit; detail=l1");
    assert_eq!(origin.total(), 1);
    let labels = |cache| [("route", "all"), ("pool", "pdp"), ("cache", cache)];
    assert_eq!(bulwark.metric("bulwark_requests_total", &labels("miss")).await, 1.0);
    assert_eq!(bulwark.metric("bulwark_requests_total", &labels("hit_l1")).await, 20.0);
    assert_eq!(bulwark.metric("bulwark_request_duration_seconds_count", &labels("hit_l1")).await, 20.0);
    assert_eq!(bulwark.metric("bulwark_origin_requests_total", &[("origin", "catalog"), ("route", "all"), ("status", "2xx")]).await, 1.0);
    let metrics = bulwark.metrics().await;
    assert!(metrics.contains("bulwark_request_duration_seconds_bucket{"), "histogram with buckets expected");
    assert!(support::metric_value(&metrics, "bulwark_l1_entries", &[("pool", "pdp")]) >= 1.0);
    assert!(support::metric_value(&metrics, "bulwark_l1_bytes", &[("pool", "pdp")]) > 0.0);
}

#[tokio::test]
async fn l2_hits_are_shared_between_instances_and_promoted_to_l1() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let config = simple_config(&origin.url(), Some(&redis.url()), "");
    let first = Bulwark::start(&config).await;
    let second = Bulwark::start(&config).await;
    // Both instances must see the same Host: it is part of the key.
    let host = [("host", "shop.example")];
    assert_eq!(first.get_with("/products/7", &host).await.cache_status(), "bulwark; fwd=miss; stored");
    // The write to Redis happens off the request path: wait until it lands.
    support::eventually("the entry lands in Redis", Duration::from_secs(2), async || redis.entries("bulwark:pdp:").len() == 1).await;
    let from_l2 = second.get_with("/products/7", &host).await;
    assert_eq!(from_l2.cache_status(), "bulwark; hit; detail=l2");
    assert_eq!(from_l2.text(), "body of /products/7");
    assert!(from_l2.header("age").is_some());
    assert_eq!(second.get_with("/products/7", &host).await.cache_status(), "bulwark; hit; detail=l1");
    assert_eq!(origin.total(), 1);
    assert_eq!(second.metric("bulwark_requests_total", &[("cache", "hit_l2")]).await, 1.0);
}

#[tokio::test]
async fn responses_a_shared_cache_must_not_store_are_not_stored() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let path = parts.uri.path();
        let reply = Reply::ok(format!("body of {path}"));
        match path {
            "/no-store" => reply.header("cache-control", "no-store"),
            "/private" => reply.header("cache-control", "private, max-age=60"),
            "/cookie" => reply.header("set-cookie", "session=1"),
            "/vary-star" => reply.header("vary", "*"),
            "/vary-invalid" => reply.header("vary", "accept language"),
            "/max-age-0" => reply.header("cache-control", "max-age=0"),
            "/no-cache" => reply.header("cache-control", "no-cache"),
            "/error" => reply.status(500),
            "/not-found" => reply.status(404).without_header("cache-control"),
            _ => reply,
        }
    });
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let reasons = [
        ("/no-store", "no-store"),
        ("/private", "private"),
        ("/cookie", "set-cookie"),
        ("/vary-star", "vary-star"),
        ("/vary-invalid", "vary-invalid"),
        ("/max-age-0", "stale-on-arrival"),
        ("/no-cache", "no-cache-no-validator"),
        ("/error", "status"),
        ("/not-found", "no-freshness"),
    ];
    for (path, reason) in reasons {
        for _ in 0..2 {
            let got = bulwark.get(path).await;
            assert_eq!(got.cache_status(), format!("bulwark; fwd=miss; detail={reason}"), "{path}");
            assert_eq!(got.text(), format!("body of {path}"));
        }
        assert_eq!(origin.count(path), 2, "{path} should reach the origin every time");
        // Each fill counted once, with its reason.
        assert_eq!(bulwark.metric("bulwark_not_stored_total", &[("route", "all"), ("reason", reason)]).await, 2.0, "{path}");
    }
    let stored = bulwark.get("/with-default-ttl").await;
    assert_eq!(stored.cache_status(), "bulwark; fwd=miss; stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_a_private_page_each_get_their_own_and_each_fill_is_counted_once() {
    let origin = Origin::start().await;
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    origin.set(move |_| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Reply::ok(format!("the page of user {n}")).header("cache-control", "private, max-age=60").delay(Duration::from_millis(300))
    });
    let bulwark = std::sync::Arc::new(Bulwark::start(&simple_config(&origin.url(), None, "")).await);
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let bulwark = bulwark.clone();
            tokio::spawn(async move { bulwark.get("/account").await })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    for request in requests {
        let got = request.await.expect("request");
        assert_eq!(got.cache_status(), "bulwark; fwd=miss; detail=private");
        bodies.insert(got.text().to_owned());
    }
    assert_eq!(bodies.len(), 5, "a private answer was served to a request that did not ask for it: {bodies:?}");
    let fills = origin.count("/account") as f64;
    assert_eq!(bulwark.metric("bulwark_not_stored_total", &[("route", "all"), ("reason", "private")]).await, fills, "once per fill");
}

#[tokio::test]
async fn default_ttl_applies_when_the_origin_gives_no_freshness() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("plain").without_header("cache-control"));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "default_ttl = \"2s\"\nstale_while_revalidate = \"0s\"")).await;
    assert_eq!(bulwark.get("/a").await.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(bulwark.get("/a").await.cache_status(), "bulwark; hit; detail=l1");
    bulwark.advance(Duration::from_secs(3));
    assert_eq!(bulwark.get("/a").await.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(origin.total(), 2);
}

#[tokio::test]
async fn accept_encoding_is_normalised_into_the_key() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let ae = parts.headers.get("accept-encoding").and_then(|v| v.to_str().ok()).unwrap_or("none").to_owned();
        Reply::ok(format!("encoded for {ae}")).header("vary", "Accept-Encoding")
    });
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let gzip = bulwark.get_with("/p", &[("accept-encoding", "gzip, deflate")]).await;
    assert_eq!(gzip.text(), "encoded for gzip");
    let gzip_again = bulwark.get_with("/p", &[("accept-encoding", "deflate, gzip;q=0.8")]).await;
    assert_eq!((gzip_again.cache_status(), gzip_again.text()), ("bulwark; hit; detail=l1", "encoded for gzip"));
    let identity = bulwark.get("/p").await;
    assert_eq!((identity.cache_status(), identity.text()), ("bulwark; fwd=miss; stored", "encoded for identity"));
    let br = bulwark.get_with("/p", &[("accept-encoding", "br, gzip")]).await;
    assert_eq!(br.text(), "encoded for br, gzip");
    assert_eq!(origin.total(), 3);
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get_and_a_head_miss_fetches_with_get() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let head = bulwark.request(Request::head(bulwark.url("/h")).body(Full::default()).expect("req")).await;
    assert_eq!(head.cache_status(), "bulwark; fwd=miss; stored");
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("10"));
    assert_eq!(origin.last_request().0.method, Method::GET);
    let get = bulwark.get("/h").await;
    assert_eq!((get.cache_status(), get.text()), ("bulwark; hit; detail=l1", "body of /h"));
    assert_eq!(origin.total(), 1);
}

#[tokio::test]
async fn other_methods_pass_through_with_their_bodies() {
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(format!("{} done", parts.method)));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    for _ in 0..2 {
        let req = Request::post(bulwark.url("/cart")).body(Full::new(Bytes::from_static(b"item=1"))).expect("req");
        let got = bulwark.request(req).await;
        assert_eq!((got.cache_status(), got.text()), ("bulwark; fwd=bypass", "POST done"));
        assert_eq!(origin.last_request().1, Bytes::from_static(b"item=1"));
    }
    let no_store = bulwark.get_with("/x", &[("cache-control", "no-store")]).await;
    assert_eq!(no_store.cache_status(), "bulwark; fwd=bypass");
    assert_eq!(bulwark.get("/x").await.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(origin.total(), 4);
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("cache", "bypass")]).await, 3.0);
}

#[tokio::test]
async fn forwarded_headers_and_hop_by_hop_removal() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("x").header("connection", "x-internal").header("x-internal", "secret").header("keep-alive", "timeout=5"));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let got = bulwark
        .get_with(
            "/fwd",
            &[("host", "Shop.Example"), ("x-forwarded-for", "203.0.113.9"), ("connection", "x-drop"), ("x-drop", "1"), ("x-forwarded-proto", "https")],
        )
        .await;
    assert_eq!(got.header("x-internal"), None);
    assert_eq!(got.header("keep-alive"), None);
    let (parts, _) = origin.last_request();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(header("host").as_deref(), Some("shop.example"), "the host as the key has it");
    assert_eq!(header("x-forwarded-for").as_deref(), Some("203.0.113.9, 127.0.0.1"));
    // The peer is not a trusted proxy, so its X-Forwarded-Proto is not believed.
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(header("via").as_deref(), Some("1.1 bulwark"));
    assert_eq!(header("x-drop"), None);
}

#[tokio::test]
async fn large_responses_stream_through_and_are_not_stored() {
    let origin = Origin::start().await;
    let big = Bytes::from(vec![b'x'; 200_000]);
    let big2 = big.clone();
    origin.set(move |_| Reply::ok(big2.clone()));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "max_object_bytes = \"64KiB\"")).await;
    for _ in 0..2 {
        let got = bulwark.get("/big").await;
        assert_eq!(got.cache_status(), "bulwark; fwd=miss; detail=too-large");
        assert_eq!(got.body, big);
    }
    assert_eq!(origin.total(), 2);
}

#[tokio::test]
async fn routing_by_prefix_and_host_with_404_for_no_route() {
    let origin = Origin::start().await;
    let other = Origin::start().await;
    other.set(|_| Reply::ok("from other"));
    let config = format!(
        r#"
[[origins]]
name = "catalog"
url = "{}"
[[origins]]
name = "other"
url = "{}"
[[pools]]
name = "pdp"
[[pools]]
name = "general"
[[routes]]
name = "products"
path_prefix = "/products/"
pool = "pdp"
origin = "catalog"
[[routes]]
name = "shop-only"
path_prefix = "/"
host = "*.shop.example"
pool = "general"
origin = "other"
"#,
        origin.url(),
        other.url()
    );
    let bulwark = Bulwark::start(&config).await;
    assert_eq!(bulwark.get("/products/1").await.text(), "body of /products/1");
    assert_eq!(bulwark.get_with("/cart", &[("host", "www.shop.example:80")]).await.text(), "from other");
    let none = bulwark.get("/cart").await;
    assert_eq!(none.status, 404);
    assert!(none.text().contains("no route"), "{}", none.text());
    assert_eq!(bulwark.metric("bulwark_unrouted_requests_total", &[]).await, 1.0);
    // Pools are separate: the same URL on two pools is two entries.
    assert_eq!(bulwark.metric("bulwark_requests_total", &[("pool", "general"), ("cache", "miss")]).await, 1.0);
    let bad = bulwark.get_with("/products/1", &[("host", "bad host")]).await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn origin_failures_map_to_statuses_and_stale_copies_stand_in() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "stale_while_revalidate = \"0s\"")).await;
    origin.set(|_| Reply::ok("fresh copy").header("cache-control", "max-age=2"));
    assert_eq!(bulwark.get("/s").await.cache_status(), "bulwark; fwd=miss; stored");
    bulwark.advance(Duration::from_secs(3));
    origin.set(|_| Reply::ok("down").status(503));
    let stale = bulwark.get("/s").await;
    assert_eq!((stale.status.as_u16(), stale.cache_status(), stale.text()), (200, "bulwark; hit; detail=stale-if-error", "fresh copy"));
    // Nothing stored: the origin's error goes to the client.
    let error = bulwark.get("/never-stored").await;
    assert_eq!((error.status.as_u16(), error.cache_status()), (503, "bulwark; fwd=miss; detail=status"));
    // Origin gone: 502 with the error outcome.
    origin.stop();
    let dead = Bulwark::start(&simple_config("http://127.0.0.1:1", None, "")).await;
    let refused = dead.get("/x").await;
    assert_eq!((refused.status.as_u16(), refused.cache_status()), (502, "bulwark; fwd=miss; detail=error"));
    assert_eq!(dead.metric("bulwark_origin_requests_total", &[("status", "connect_error")]).await, 1.0);
}

#[tokio::test]
async fn origin_timeout_is_a_504() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("slow").delay(Duration::from_secs(3)));
    let config = TestConfig::new(&origin.url()).origin("timeout", "200ms").to_toml();
    let bulwark = Bulwark::start(&config).await;
    let got = bulwark.get("/slow").await;
    assert_eq!((got.status.as_u16(), got.cache_status()), (504, "bulwark; fwd=miss; detail=error"));
    assert_eq!(bulwark.metric("bulwark_origin_requests_total", &[("status", "timeout")]).await, 1.0);
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>();
    for expected in ["bulwark; fwd=miss; stored", "bulwark; hit; detail=l1"] {
        let res = client.request(Request::get(bulwark.url("/h2")).body(Full::default()).expect("req")).await.expect("h2 request");
        assert_eq!(res.version(), http::Version::HTTP_2);
        assert_eq!(res.headers()["cache-status"], expected);
    }
}

#[tokio::test]
async fn health_endpoints_and_routes_listing() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some("redis://127.0.0.1:1/0"), "")).await;
    assert_eq!(bulwark.admin("/healthz").await.status, 200);
    assert_eq!(bulwark.admin("/readyz").await.status, 200);
    let routes: serde_json::Value = serde_json::from_slice(&bulwark.admin("/admin/routes").await.body).expect("json");
    assert_eq!(routes["routes"][0]["name"], "all");
    assert_eq!(routes["routes"][0]["pool"], "pdp");
    assert_eq!(routes["routes"][0]["mode"], "normal");
}

#[tokio::test]
async fn uncached_bodies_stream_through_as_the_origin_sends_them() {
    use http_body_util::BodyExt;
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok(vec![b'a'; 4000]).header("cache-control", "no-store").chunked(4, Duration::from_millis(400)));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    let start = std::time::Instant::now();
    let res = support::client().get(bulwark.url("/stream").parse().expect("uri")).await.expect("request");
    let mut body = res.into_body();
    let first = body.frame().await.expect("a frame").expect("frame ok");
    let first_at = start.elapsed();
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    let mut total = first.into_data().map_or(0, |d| d.len());
    while let Some(frame) = body.frame().await {
        total += frame.expect("frame ok").into_data().map_or(0, |d| d.len());
    }
    let done_at = start.elapsed();
    assert_eq!(total, 4000);
    // The origin takes 1.2 s in all; the first chunk must not wait for the last.
    assert!(done_at >= Duration::from_millis(1100), "{done_at:?}");
    assert!(first_at < Duration::from_millis(600), "first bytes after {first_at:?}: buffered, not streamed");
}

#[tokio::test]
async fn a_stalled_origin_body_is_cut_and_frees_its_slot() {
    use http_body_util::BodyExt;
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok(vec![b'a'; 100]).header("cache-control", "no-store").chunked(2, Duration::from_secs(30)));
    let config = TestConfig::new(&origin.url()).origin("timeout", "300ms").to_toml();
    let bulwark = Bulwark::start(&config).await;
    let start = std::time::Instant::now();
    let res = support::client().get(bulwark.url("/stall").parse().expect("uri")).await.expect("headers arrive");
    assert_eq!(res.status(), 200);
    let outcome = res.into_body().collect().await;
    assert!(outcome.is_err(), "a body cut short must not look complete");
    // Idle timeout 300 ms; 5x margin.
    assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
    assert_eq!(bulwark.metric("bulwark_origin_inflight", &[("origin", "catalog")]).await, 0.0);
}

#[tokio::test]
async fn a_small_unstored_answer_stalling_mid_body_is_a_clean_502_not_a_truncated_200() {
    // Declared small and not stored: read whole before it is sent, so a stall is an
    // failed answer the client is told of (or a stale copy serves), never a cut body.
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok(vec![b'a'; 100]).header("cache-control", "no-store").header("content-length", "100").chunked(2, Duration::from_secs(30)));
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).origin("timeout", "300ms").to_toml()).await;
    let start = std::time::Instant::now();
    let got = bulwark.get("/stall").await;
    assert_eq!(got.status, 502, "{}", got.text());
    assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
    assert_eq!(bulwark.metric("bulwark_origin_inflight", &[("origin", "catalog")]).await, 0.0);
    // Whole, it arrives as it was sent.
    origin.set(|_| Reply::ok(vec![b'b'; 100]).header("cache-control", "no-store").header("content-length", "100").chunked(4, Duration::from_millis(20)));
    let got = bulwark.get("/slow-but-whole").await;
    assert_eq!((got.status.as_u16(), got.body.len()), (200, 100));
}

#[tokio::test]
async fn an_authenticated_answer_is_stored_only_when_the_origin_allows_it() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let authed = parts.headers.contains_key("authorization");
        let body = if authed { "private account page" } else { "public page" };
        let reply = Reply::ok(body);
        match (parts.uri.path(), authed) {
            ("/shared", true) => reply.header("cache-control", "public, max-age=60"),
            _ => reply,
        }
    });
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    // max-age alone does not allow storing an answer to an authenticated request.
    let authed = bulwark.get_with("/acct", &[("authorization", "Bearer t")]).await;
    assert_eq!((authed.cache_status(), authed.text()), ("bulwark; fwd=miss; detail=authorization", "private account page"));
    let anonymous = bulwark.get("/acct").await;
    assert_eq!((anonymous.cache_status(), anonymous.text()), ("bulwark; fwd=miss; stored", "public page"));
    // public does.
    let shared = bulwark.get_with("/shared", &[("authorization", "Bearer t")]).await;
    assert_eq!(shared.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(bulwark.get("/shared").await.cache_status(), "bulwark; hit; detail=l1");
}

#[tokio::test]
async fn client_routing_headers_cannot_poison_the_cache() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    bulwark.get_with("/p", &[("x-forwarded-host", "evil.example"), ("forwarded", "host=evil.example"), ("x-original-url", "/admin")]).await;
    let (parts, _) = origin.last_request();
    for name in ["x-forwarded-host", "forwarded", "x-original-url"] {
        assert!(!parts.headers.contains_key(name), "{name} reached the origin from an untrusted client");
    }
}

#[tokio::test]
async fn route_hosts_match_whatever_the_port() {
    let origin = Origin::start().await;
    let config = TestConfig::new(&origin.url()).route("host", "shop.example").to_toml();
    let bulwark = Bulwark::start(&config).await;
    assert_eq!(bulwark.get_with("/x", &[("host", "shop.example:8080")]).await.status, 200);
    assert_eq!(bulwark.get_with("/x", &[("host", "other.example:8080")]).await.status, 404);
}

#[tokio::test]
async fn upstream_cache_status_is_kept() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("x").header("cache-status", "origin-cache; hit"));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    assert_eq!(bulwark.get("/cs").await.cache_status(), "origin-cache; hit, bulwark; fwd=miss; stored");
    assert_eq!(bulwark.get("/cs").await.cache_status(), "origin-cache; hit, bulwark; hit; detail=l1");
}
