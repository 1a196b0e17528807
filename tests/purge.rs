//! Purges and invalidation across replicas sharing a pool's Redis.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{Bulwark, Got, Origin, RedisServer, Reply, simple_config};

const HOST: [(&str, &str); 1] = [("host", "shop.example")];

/// An origin whose bodies carry a version, bumped by the test, and purge tags.
fn versioned_origin(origin: &Origin) -> Arc<AtomicUsize> {
    let version = Arc::new(AtomicUsize::new(1));
    let v = version.clone();
    origin.set(move |parts| {
        let path = parts.uri.path().to_owned();
        let tags = if path.starts_with("/products/") { "product category-7" } else { "other" };
        Reply::ok(format!("{path} v{}", v.load(Ordering::SeqCst))).header("surrogate-key", tags)
    });
    version
}

async fn purge(bulwark: &Bulwark, body: &str) -> Got {
    let req = Request::post(format!("http://{}/admin/purge", bulwark.admin_addr)).body(Full::new(Bytes::from(body.to_owned()))).expect("request");
    bulwark.request(req).await
}

/// Plants `count` entries of pool `pdp` indexed under the tag `sale`, directly in Redis
/// (their contents do not matter to a hard purge); a connection for checking after.
fn plant_tagged(redis: &RedisServer, count: u32) -> redis::Connection {
    let mut conn = redis.conn();
    let far_future: u64 = 4_000_000_000_000;
    for chunk in (0..count).collect::<Vec<u32>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let key = format!("bulwark:pdp:v2:{i:032x}");
            pipe.cmd("SET").arg(&key).arg("x").ignore();
            pipe.cmd("ZADD").arg("bulwark:pdp:v2:idx:tag:sale").arg(far_future).arg(&key).ignore();
        }
        pipe.query::<()>(&mut conn).expect("plant");
    }
    conn
}

/// Two replicas sharing one Redis, both holding `paths` in L1.
async fn two_warm_replicas(origin: &Origin, redis: &RedisServer, paths: &[&str]) -> (Bulwark, Bulwark) {
    let config = simple_config(&origin.url(), Some(&redis.url()), "");
    let (one, two) = (Bulwark::start(&config).await, Bulwark::start(&config).await);
    for bulwark in [&one, &two] {
        bulwark.wait_for_subscription().await;
    }
    for path in paths {
        one.get_with(path, &HOST).await;
        // Let the background write land, then warm replica two from L2.
        for _ in 0..100 {
            if two.get_with(path, &HOST).await.cache_status() != "bulwark; fwd=miss; stored" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(two.get_with(path, &HOST).await.cache_status(), "bulwark; hit; detail=l1");
    }
    (one, two)
}

/// Asks `bulwark` for `path` until the answer is not an L1 hit; returns it and how long
/// that took.
async fn until_not_l1(bulwark: &Bulwark, path: &str, headers: &[(&str, &str)]) -> (Got, Duration) {
    let start = Instant::now();
    loop {
        let got = bulwark.get_with(path, headers).await;
        if got.cache_status() != "bulwark; hit; detail=l1" || start.elapsed() > Duration::from_secs(2) {
            return (got, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_url_on_one_replica_is_seen_by_the_other_at_once() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let version = versioned_origin(&origin);
    let (one, two) = two_warm_replicas(&origin, &redis, &["/products/1", "/products/2"]).await;
    version.store(2, Ordering::SeqCst);
    let answer = purge(&one, r#"{"urls": ["http://shop.example/products/1"]}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let counts: serde_json::Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!(counts["l2"], 1, "{counts}");
    assert_eq!(counts["replicas"], "all replicas");
    let (got, took) = until_not_l1(&two, "/products/1", &HOST).await;
    assert_eq!((got.cache_status(), got.text()), ("bulwark; fwd=miss; stored", "/products/1 v2"));
    // The target is 100 ms; 5x margin on this shared machine.
    assert!(took < Duration::from_millis(500), "replica two saw the purge after {took:?}");
    // Other URLs are untouched.
    assert_eq!(two.get_with("/products/2", &HOST).await.text(), "/products/2 v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_tag_reaches_every_tagged_entry_on_every_replica() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let version = versioned_origin(&origin);
    let (one, two) = two_warm_replicas(&origin, &redis, &["/products/1", "/products/2", "/about"]).await;
    version.store(2, Ordering::SeqCst);
    let answer = purge(&one, r#"{"tags": ["category-7"]}"#).await;
    let counts: serde_json::Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!(counts["l2"], 2, "{counts}");
    for path in ["/products/1", "/products/2"] {
        let (got, took) = until_not_l1(&two, path, &HOST).await;
        assert_eq!(got.text(), format!("{path} v2"));
        assert!(took < Duration::from_millis(500), "{path}: {took:?}");
        assert_eq!(one.get_with(path, &HOST).await.text(), format!("{path} v2"));
    }
    assert_eq!(two.get_with("/about", &HOST).await.text(), "/about v1");
    // The tag header is for the cache, not for clients.
    assert_eq!(two.get_with("/about", &HOST).await.header("surrogate-key"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_serves_stale_while_refreshing() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let version = versioned_origin(&origin);
    let (one, two) = two_warm_replicas(&origin, &redis, &["/products/1"]).await;
    let before = origin.total();
    version.store(2, Ordering::SeqCst);
    let answer = purge(&one, r#"{"urls": ["/products/1"], "soft": true}"#).await;
    assert_eq!(answer.status, 200);
    let counts: serde_json::Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!(counts["l2"].as_u64(), Some(1), "the entry in Redis was marked: {counts}");
    let (got, took) = until_not_l1(&two, "/products/1", &HOST).await;
    assert_eq!((got.cache_status(), got.text()), ("bulwark; hit; fwd=stale; detail=stale-while-revalidate", "/products/1 v1"));
    assert!(took < Duration::from_millis(500), "{took:?}");
    // One background refresh brings the new version.
    for _ in 0..100 {
        if two.get_with("/products/1", &HOST).await.text() == "/products/1 v2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(two.get_with("/products/1", &HOST).await.text(), "/products/1 v2");
    assert!(origin.total() - before <= 2, "a soft purge shields the origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_path_purges_every_host() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let version = versioned_origin(&origin);
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "")).await;
    bulwark.wait_for_subscription().await;
    for host in ["shop.example", "eu.shop.example"] {
        bulwark.get_with("/products/9", &[("host", host)]).await;
    }
    version.store(2, Ordering::SeqCst);
    purge(&bulwark, r#"{"urls": ["/products/9"]}"#).await;
    for host in ["shop.example", "eu.shop.example"] {
        assert_eq!(bulwark.get_with("/products/9", &[("host", host)]).await.text(), "/products/9 v2", "{host}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_unsafe_request_invalidates_its_target_everywhere() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let version = versioned_origin(&origin);
    let (one, two) = two_warm_replicas(&origin, &redis, &["/products/1"]).await;
    version.store(2, Ordering::SeqCst);
    let req = Request::post(one.url("/products/1")).header("host", "shop.example").body(Full::new(Bytes::from_static(b"x"))).expect("req");
    assert_eq!(one.request(req).await.status, 200);
    assert_eq!(one.get_with("/products/1", &HOST).await.text(), "/products/1 v2");
    let (got, _) = until_not_l1(&two, "/products/1", &HOST).await;
    assert!(got.text() == "/products/1 v2", "replica two still serves {}", got.text());
}

#[tokio::test]
async fn purge_requests_are_validated_and_local_pools_say_so() {
    let origin = Origin::start().await;
    let version = versioned_origin(&origin);
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    bulwark.get_with("/products/1", &HOST).await;
    version.store(2, Ordering::SeqCst);
    let answer = purge(&bulwark, r#"{"urls": ["http://shop.example/products/1"]}"#).await;
    let counts: serde_json::Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!((counts["l1"].as_u64(), counts["purged"].as_u64()), (Some(1), Some(1)));
    assert!(counts["replicas"].as_str().is_some_and(|r| r.contains("this replica only") && r.contains("pdp")), "{counts}");
    assert_eq!(bulwark.get_with("/products/1", &HOST).await.text(), "/products/1 v2");
    for bad in [
        r#"{"urls": ["ftp://x/"]}"#,
        r#"{"urls": ["/a"], "tags": ["b"]}"#,
        r#"{}"#,
        "not json",
        r#"{"url": ["/a"]}"#,
        r#"{"tags": ["two words"]}"#,
        r#"{"tags": [""]}"#,
        r#"{"urls": ["http://x/a#b"]}"#,
    ] {
        assert_eq!(purge(&bulwark, bad).await.status, 400, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_leaves_l1_serving_stale_copies_refreshed_once_each() {
    let mut redis = RedisServer::start();
    let origin = Origin::start().await;
    let version = versioned_origin(&origin);
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "")).await;
    bulwark.wait_for_subscription().await;
    for i in 0..5 {
        bulwark.get_with(&format!("/products/{i}"), &HOST).await;
    }
    assert_eq!(bulwark.get_with("/products/1", &HOST).await.cache_status(), "bulwark; hit; detail=l1");
    redis.restart();
    version.store(2, Ordering::SeqCst);
    bulwark.until_resubscribed().await;
    // Redis lost everything; this L1 did not: its copies are served at once, as stale
    // copies, while one refresh per key runs. No client waits for the origin.
    for i in 0..5 {
        let start = Instant::now();
        let got = bulwark.get_with(&format!("/products/{i}"), &HOST).await;
        assert_eq!((got.text(), got.cache_status()), (format!("/products/{i} v1").as_str(), "bulwark; hit; fwd=stale; detail=stale-while-revalidate"));
        assert!(start.elapsed() < Duration::from_millis(500), "served from L1 at once, not after {:?}", start.elapsed());
    }
    assert_eq!(bulwark.metric("bulwark_post_gap_refreshes_total", &[("pool", "pdp")]).await, 5.0);
    for i in 0..5 {
        let path = format!("/products/{i}");
        support::eventually("the refreshed copy is served", Duration::from_secs(5), async || {
            bulwark.get_with(&path, &HOST).await.text() == format!("{path} v2")
        })
        .await;
        assert_eq!(origin.count(&path), 2, "one refresh for {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_goes_silent_is_replaced_and_l1_confirmed_against_redis() {
    let redis = RedisServer::start();
    let relay = support::BlackholeRelay::start(redis.port).await;
    let origin = Origin::start().await;
    let version = versioned_origin(&origin);
    // This replica reaches Redis through the relay; the other one directly.
    let through_relay = Bulwark::start(&simple_config(&origin.url(), Some(&relay.url()), "")).await;
    let direct = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "")).await;
    through_relay.wait_for_subscription().await;
    direct.wait_for_subscription().await;
    for path in ["/products/1", "/products/2"] {
        through_relay.get_with(path, &HOST).await;
    }
    support::eventually("both entries in Redis", Duration::from_secs(2), async || redis.entries("bulwark:pdp:").len() >= 2).await;
    // Every open connection through the relay goes silent: no error, no close. A purge
    // sent now is lost on the way to this replica.
    relay.blackhole_existing();
    version.store(2, Ordering::SeqCst);
    let purged = purge(&direct, r#"{"urls": ["http://shop.example/products/2"]}"#).await;
    assert_eq!(purged.status.as_u16(), 200);
    // The heartbeat notices within a few seconds and resubscribes on a new connection.
    through_relay.until_resubscribed().await;
    // Its copies were kept, and each is checked against Redis before its next use: the
    // one Redis still holds is served from L1, the one purged meanwhile is not.
    assert_eq!(through_relay.get_with("/products/1", &HOST).await.cache_status(), "bulwark; hit; detail=l1");
    assert_eq!(through_relay.get_with("/products/2", &HOST).await.text(), "/products/2 v2", "purged while the link was down");
    assert_eq!(origin.count("/products/1"), 1, "the confirmed copy never went to the origin");
    // After that, purges arrive again.
    through_relay.get_with("/products/3", &HOST).await;
    assert_eq!(through_relay.get_with("/products/3", &HOST).await.cache_status(), "bulwark; hit; detail=l1");
    // Its write to Redis lands first: this is about the purge reaching the replica, and
    // a write still retrying on the connection that went silent could land after it.
    let key = bulwark::cache::CacheKey::new("http", "shop.example", "/products/3", None, bulwark::cache::Encodings::IDENTITY).redis_key("bulwark:pdp:");
    support::eventually("/products/3 written to Redis", Duration::from_secs(5), async || redis.keys(&key).len() == 1).await;
    version.store(3, Ordering::SeqCst);
    purge(&direct, r#"{"urls": ["http://shop.example/products/3"]}"#).await;
    let (got, _) = until_not_l1(&through_relay, "/products/3", &HOST).await;
    assert_eq!(got.text(), "/products/3 v3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_over_300_000_entries_completes_in_batches_and_counts_them() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    // A short Redis deadline: one command over all 300,000 members would never finish in it.
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "redis_timeout = \"50ms\"")).await;
    bulwark.wait_for_subscription().await;
    // 300,000 entries indexed under one tag.
    let mut conn = plant_tagged(&redis, 300_000);
    let answer = purge(&bulwark, r#"{"tags": ["sale"]}"#).await;
    assert_eq!(answer.status.as_u16(), 200, "{}", answer.text());
    let counts: serde_json::Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!((counts["purged"].as_u64(), counts["complete"].as_bool()), (Some(300_000), Some(true)), "{counts}");
    let left: i64 = redis::cmd("DBSIZE").query(&mut conn).expect("DBSIZE");
    assert!(left < 10, "{left} keys left in Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_redis_cannot_complete_says_so_and_leaves_every_l1_as_redis_is() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    versioned_origin(&origin);
    let (one, two) = two_warm_replicas(&origin, &redis, &["/products/1"]).await;
    redis.stall();
    let answer = purge(&one, r#"{"tags": ["product"]}"#).await;
    redis.resume();
    assert_eq!(answer.status.as_u16(), 503, "{}", answer.text());
    let counts: serde_json::Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!(counts["complete"].as_bool(), Some(false), "{counts}");
    assert!(counts["replicas"].as_str().is_some_and(|r| r.starts_with("none")), "{counts}");
    assert!(counts["error"].as_str().is_some_and(|e| e.contains("pdp")), "{counts}");
    // Redis still holds the entry: no replica dropped its copy (it would read the same
    // one back from Redis and the purge would look done).
    for replica in [&one, &two] {
        assert_eq!(replica.get_with("/products/1", &HOST).await.cache_status(), "bulwark; hit; detail=l1");
    }
    // Once Redis answers (and the breaker its retries opened has closed again, within a
    // probe interval), the purge goes through everywhere.
    support::eventually("the pool's Redis breaker closed", Duration::from_secs(5), async || {
        one.metric("bulwark_redis_breaker_open", &[("pool", "pdp")]).await == 0.0
    })
    .await;
    let retried = purge(&one, r#"{"tags": ["product"]}"#).await;
    assert_eq!(retried.status.as_u16(), 200, "{}", retried.text());
    for replica in [&one, &two] {
        let (got, _) = until_not_l1(replica, "/products/1", &HOST).await;
        assert_ne!(got.cache_status(), "bulwark; hit; detail=l1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_started_before_a_purge_is_neither_stored_nor_joined_after_it() {
    let origin = Origin::start().await;
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    origin.set(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        Reply::ok(format!("v{n}")).header("cache-control", "max-age=600").delay(Duration::from_millis(800))
    });
    let bulwark = Arc::new(Bulwark::start(&simple_config(&origin.url(), None, "")).await);
    let before = {
        let bulwark = bulwark.clone();
        tokio::spawn(async move { bulwark.get_with("/p", &HOST).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The price changed: purged while the old page is still being fetched.
    assert_eq!(purge(&bulwark, r#"{"urls": ["/p"]}"#).await.status.as_u16(), 200);
    let after = bulwark.get_with("/p", &HOST).await;
    assert_eq!((after.text(), after.cache_status()), ("v2", "bulwark; fwd=miss; stored"), "asked after the purge: not the fill from before it");
    let before = before.await.expect("request");
    assert_eq!((before.text(), before.cache_status()), ("v1", "bulwark; fwd=miss; detail=purged"), "its own answer, not stored");
    let next = bulwark.get_with("/p", &HOST).await;
    assert_eq!((next.text(), next.cache_status()), ("v2", "bulwark; hit; detail=l1"), "the page from after the purge is the one kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_of_ten_thousand_tags_takes_effect_at_once_and_spares_the_rest() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let path = parts.uri.path().to_owned();
        let n = path.trim_start_matches("/p/").to_owned();
        Reply::ok(path).header("surrogate-key", &format!("t{n} all")).header("cache-control", "max-age=600, stale-while-revalidate=600")
    });
    let bulwark = Bulwark::start(&simple_config(&origin.url(), None, "")).await;
    for i in 0..300 {
        assert_eq!(bulwark.get_with(&format!("/p/{i}"), &HOST).await.cache_status(), "bulwark; fwd=miss; stored");
    }
    let tags = |held: std::ops::Range<usize>, soft: bool| {
        let tags: Vec<String> = held.map(|i| format!("t{i}")).chain((0..9_900).map(|i| format!("unused-{i}"))).collect();
        serde_json::json!({ "tags": tags, "soft": soft }).to_string()
    };
    // Hard: tags of the first 100 entries among 10,000. Each is gone at once, whether the
    // background sweep has reached it yet or not; the others are still hits.
    assert_eq!(purge(&bulwark, &tags(0..100, false)).await.status, 200);
    for i in (0..300).rev() {
        let got = bulwark.get_with(&format!("/p/{i}"), &HOST).await;
        let expected = if i < 100 { "bulwark; fwd=miss; stored" } else { "bulwark; hit; detail=l1" };
        assert_eq!(got.cache_status(), expected, "/p/{i}");
    }
    // Soft: the next hundred are served stale while one refresh each runs.
    assert_eq!(purge(&bulwark, &tags(100..200, true)).await.status, 200);
    for i in (100..300).rev() {
        let got = bulwark.get_with(&format!("/p/{i}"), &HOST).await;
        let expected = if i < 200 { "bulwark; hit; fwd=stale; detail=stale-while-revalidate" } else { "bulwark; hit; detail=l1" };
        assert_eq!(got.cache_status(), expected, "/p/{i}");
    }
    assert_eq!(origin.count("/p/250"), 1);
    // Entries stored after the purges are not touched by them.
    for i in 0..100 {
        assert_eq!(bulwark.get_with(&format!("/p/{i}"), &HOST).await.cache_status(), "bulwark; hit; detail=l1", "/p/{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_purge_answers_at_once_and_reports_progress_then_its_outcome() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "redis_timeout = \"50ms\"")).await;
    bulwark.wait_for_subscription().await;
    let mut conn = redis.conn();
    for chunk in (0..100_000).collect::<Vec<u32>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let key = format!("bulwark:pdp:v2:{i:032x}");
            pipe.cmd("SET").arg(&key).arg("x").ignore();
            pipe.cmd("ZADD").arg("bulwark:pdp:v2:idx:tag:sale").arg(4_000_000_000_000u64).arg(&key).ignore();
        }
        pipe.query::<()>(&mut conn).expect("plant");
    }
    let started = Instant::now();
    let answer = purge(&bulwark, r#"{"tags": ["sale"], "async": true}"#).await;
    assert_eq!(answer.status.as_u16(), 202, "{}", answer.text());
    assert!(started.elapsed() < Duration::from_millis(500), "an async purge waited for the purge: {:?}", started.elapsed());
    let id = serde_json::from_slice::<serde_json::Value>(&answer.body).expect("json")["id"].as_str().expect("an id").to_owned();
    let status = |id: String| {
        let bulwark = &bulwark;
        async move {
            let got = bulwark.admin(&format!("/admin/purge/{id}")).await;
            (got.status.as_u16(), serde_json::from_slice::<serde_json::Value>(&got.body).expect("json"))
        }
    };
    let done = loop {
        let (code, body) = status(id.clone()).await;
        if body["running"] == false {
            break (code, body);
        }
        assert_eq!((code, &body["complete"]), (200, &serde_json::Value::from(false)), "{body}");
        // The same fields as the final answer, counted so far.
        for field in ["purged", "l1", "l2"] {
            assert!(body[field].as_u64().is_some_and(|n| n <= 100_000), "{field}: {body}");
        }
        assert!(started.elapsed() < Duration::from_secs(30), "still running: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done.0, 200, "{}", done.1);
    assert_eq!((done.1["purged"].as_u64(), done.1["complete"].as_bool(), done.1["id"].as_str()), (Some(100_000), Some(true), Some(id.as_str())), "{}", done.1);
    let left: i64 = redis::cmd("DBSIZE").query(&mut conn).expect("DBSIZE");
    assert!(left < 10, "{left} keys left in Redis");

    // One Redis could not finish: 202 at once, then 503 with what was done.
    redis.stall();
    let answer = purge(&bulwark, r#"{"tags": ["other"], "async": true}"#).await;
    assert_eq!(answer.status.as_u16(), 202, "{}", answer.text());
    let id = serde_json::from_slice::<serde_json::Value>(&answer.body).expect("json")["id"].as_str().expect("an id").to_owned();
    let failed = loop {
        let (code, body) = status(id.clone()).await;
        if body["running"] == false {
            break (code, body);
        }
        assert!(started.elapsed() < Duration::from_secs(30), "still running: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    redis.resume();
    assert_eq!((failed.0, failed.1["complete"].as_bool()), (503, Some(false)), "{}", failed.1);
    assert!(failed.1["error"].as_str().is_some_and(|e| e.contains("pdp")), "{}", failed.1);
    assert_eq!(status("0123456789abcdef".into()).await.0, 404);
}

// Guards against one slow batch ending a large purge part way: a Redis that stops
// answering for a moment in the middle of it (a fork for a snapshot, a busy moment)
// costs a retry of that batch, not a purge reported failed with stale copies left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_survives_a_redis_that_stalls_for_a_moment_in_the_middle() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let bulwark = Arc::new(Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "redis_timeout = \"50ms\"")).await);
    bulwark.wait_for_subscription().await;
    let mut conn = plant_tagged(&redis, 100_000);
    let purging = {
        let bulwark = bulwark.clone();
        tokio::spawn(async move { purge(&bulwark, r#"{"tags": ["sale"]}"#).await })
    };
    // Stalled once the purge is under way, for longer than a batch's deadline (200 ms).
    support::eventually("the purge under way", Duration::from_secs(5), async || {
        redis::cmd("ZCARD").arg("bulwark:pdp:v2:idx:tag:sale").query::<u64>(&mut conn).is_ok_and(|n| n < 100_000)
    })
    .await;
    redis.stall();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.resume();
    let answer = purging.await.expect("purge");
    assert_eq!(answer.status.as_u16(), 200, "{}", answer.text());
    let counts: serde_json::Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!(counts["complete"].as_bool(), Some(true), "{counts}");
    // A batch whose deletes ran in Redis while the answer timed out is deleted again and
    // found gone: counted short by at most that batch.
    let purged = counts["purged"].as_u64().unwrap_or(0);
    assert!((99_000..=100_000).contains(&purged), "{counts}");
    let left: i64 = redis::cmd("DBSIZE").query(&mut conn).expect("DBSIZE");
    assert!(left < 10, "{left} keys left in Redis: the purge did not finish its work");
}
