//! The shared tier under faults: Redis killed, stalled, absent, or holding corrupt entries.
//! The pool must keep serving from L1 and the origin, never wait past `redis_timeout`
//! on Redis, count the errors, and recover by itself.

mod support;

use std::time::{Duration, Instant};

use bulwark::cache::{CacheKey, Encodings, Entry};
use bytes::Bytes;
use support::{Bulwark, Origin, RedisServer, simple_config};

const HOST: [(&str, &str); 1] = [("host", "shop.example")];

fn redis_key(path: &str) -> String {
    CacheKey::new("http", "shop.example", path, None, Encodings::IDENTITY).redis_key("bulwark:pdp:")
}

#[tokio::test]
async fn redis_killed_mid_test_then_restarted() {
    let mut redis = RedisServer::start();
    let origin = Origin::start().await;
    let config = simple_config(&origin.url(), Some(&redis.url()), "");
    let bulwark = Bulwark::start(&config).await;
    for i in 0..10 {
        assert_eq!(bulwark.get_with(&format!("/warm/{i}"), &HOST).await.cache_status(), "bulwark; fwd=miss; stored");
    }
    support::eventually("warm entries in Redis", Duration::from_secs(2), async || redis.entries("bulwark:pdp:").len() == 10).await;

    redis.kill();
    // Warm keys still come from L1; cold keys from the origin. Nobody sees an error.
    for i in 0..10 {
        let warm = bulwark.get_with(&format!("/warm/{i}"), &HOST).await;
        assert_eq!((warm.status.as_u16(), warm.cache_status()), (200, "bulwark; hit; detail=l1"));
        let start = Instant::now();
        let cold = bulwark.get_with(&format!("/cold/{i}"), &HOST).await;
        assert_eq!((cold.status.as_u16(), cold.text()), (200, format!("body of /cold/{i}").as_str()));
        // At most one redis_timeout (50 ms) plus a local origin; 3x margin.
        assert!(start.elapsed() < Duration::from_millis(150 + 100), "cold request took {:?}", start.elapsed());
    }
    let errors = bulwark.metric("bulwark_redis_errors_total", &[("pool", "pdp")]).await;
    assert!(errors >= 5.0, "failed Redis calls are counted, got {errors}");
    // After five failures in a row the pool stops asking Redis.
    assert_eq!(bulwark.metric("bulwark_redis_breaker_open", &[("pool", "pdp")]).await, 1.0);
    assert!(errors < 10.0, "lookups while the breaker is open are skipped, not failed: {errors}");

    redis.restart();
    support::eventually("breaker closed by its probe", Duration::from_secs(5), async || {
        bulwark.metric("bulwark_redis_breaker_open", &[("pool", "pdp")]).await == 0.0
    })
    .await;
    // Writes recover: a new key reaches the restarted (empty) Redis.
    let mut n = 0;
    support::eventually("writes to the restarted Redis", Duration::from_secs(10), async || {
        n += 1;
        bulwark.get_with(&format!("/after/{n}"), &HOST).await;
        !redis.entries("bulwark:pdp:").is_empty()
    })
    .await;
    // Reads recover: a fresh instance (empty L1) gets L2 hits.
    let stored: Vec<String> = redis.entries("bulwark:pdp:");
    assert!(!stored.is_empty());
    let fresh = Bulwark::start(&config).await;
    let path = format!("/after/{n}");
    support::eventually("L2 hits after restart", Duration::from_secs(5), async || redis.keys(&redis_key(&path)).len() == 1).await;
    let got = fresh.get_with(&path, &HOST).await;
    assert_eq!((got.cache_status(), got.text()), ("bulwark; hit; detail=l2", format!("body of {path}").as_str()));
}

#[tokio::test]
async fn stalled_redis_costs_at_most_one_deadline_per_request() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "")).await;
    // Baseline: cold keys with a healthy Redis (one L2 miss, one origin fetch each).
    let mut baseline = Duration::ZERO;
    for i in 0..20 {
        let start = Instant::now();
        assert_eq!(bulwark.get_with(&format!("/before/{i}"), &HOST).await.cache_status(), "bulwark; fwd=miss; stored");
        baseline = baseline.max(start.elapsed());
    }
    redis.stall();
    let mut slowest = Duration::ZERO;
    let mut after_open = Vec::new();
    for i in 0..20 {
        let open = bulwark.metric("bulwark_redis_breaker_open", &[("pool", "pdp")]).await == 1.0;
        let start = Instant::now();
        let got = bulwark.get_with(&format!("/stalled/{i}"), &HOST).await;
        let took = start.elapsed();
        slowest = slowest.max(took);
        if open {
            after_open.push(took);
        }
        assert_eq!((got.status.as_u16(), got.cache_status()), (200, "bulwark; fwd=miss; stored"));
    }
    // At most one redis_timeout (50 ms) on top of the baseline; 3x margin. Two sequential
    // Redis waits, or waiting on a reconnect, would exceed it.
    assert!(slowest < baseline + Duration::from_millis(150), "slowest {slowest:?}, baseline {baseline:?}");
    // Once the breaker is open, requests do not wait for Redis at all.
    assert!(after_open.len() >= 10, "the breaker opened after a few deadline misses");
    for took in &after_open {
        assert!(*took < baseline + Duration::from_millis(25), "waited {took:?} with the breaker open (baseline {baseline:?})");
    }
    redis.resume();
    support::eventually("breaker closed after SIGCONT", Duration::from_secs(5), async || {
        bulwark.metric("bulwark_redis_breaker_open", &[("pool", "pdp")]).await == 0.0
    })
    .await;
}

#[tokio::test]
async fn pool_with_unreachable_redis_serves_from_l1_and_origin() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some("redis://127.0.0.1:1/0"), "")).await;
    for _ in 0..3 {
        assert_eq!(bulwark.get("/p").await.status, 200);
    }
    assert_eq!(origin.total(), 1);
    assert!(bulwark.metric("bulwark_redis_errors_total", &[("pool", "pdp"), ("op", "get")]).await >= 1.0);
}

#[tokio::test]
async fn corrupt_entries_are_misses_deleted_and_counted() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "")).await;
    let mut conn = redis.conn();
    let key = redis_key("/corrupt");
    // Current format version, garbage after it.
    let garbage: &[u8] = b"BWK\x02this is not an entry";
    redis::cmd("SET").arg(&key).arg(garbage).query::<()>(&mut conn).expect("plant");
    let got = bulwark.get_with("/corrupt", &HOST).await;
    assert_eq!((got.cache_status(), got.text()), ("bulwark; fwd=miss; stored", "body of /corrupt"));
    assert_eq!(bulwark.metric("bulwark_l2_corrupt_entries_total", &[("pool", "pdp")]).await, 1.0);
    // The garbage is gone: deleted, then replaced by the fresh entry.
    support::eventually("corrupt entry replaced", Duration::from_secs(2), async || {
        let value: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut conn).expect("GET");
        value.is_some_and(|v| Entry::decode(&Bytes::from(v)).is_ok())
    })
    .await;
}

#[tokio::test]
async fn entries_of_another_format_version_are_left_alone() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "")).await;
    let mut conn = redis.conn();
    // A newer replica's entry under its own versioned key: never read, never touched.
    let newer_key = redis_key("/versioned").replace(":v2:", ":v3:");
    redis::cmd("SET").arg(&newer_key).arg(b"BWK\x03future format".as_slice()).query::<()>(&mut conn).expect("plant");
    // A payload of another version under this version's key: a miss, not corruption.
    let key = redis_key("/other-version");
    redis::cmd("SET").arg(&key).arg(b"BWK\x03future format".as_slice()).query::<()>(&mut conn).expect("plant");
    assert_eq!(bulwark.get_with("/versioned", &HOST).await.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(bulwark.get_with("/other-version", &HOST).await.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(bulwark.metric("bulwark_l2_corrupt_entries_total", &[("pool", "pdp")]).await, 0.0);
    let newer: Vec<u8> = redis::cmd("GET").arg(&newer_key).query(&mut conn).expect("GET");
    assert_eq!(newer, b"BWK\x03future format");
}

#[tokio::test]
async fn an_entry_whose_key_differs_is_never_served() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "")).await;
    // A valid entry for another URL, planted under this URL's hash (a collision).
    let entry = support::fresh_entry("http://shop.example/someone-else\nae=identity", http::HeaderMap::new(), b"not yours");
    let mut conn = redis.conn();
    redis::cmd("SET").arg(redis_key("/mine")).arg(entry.encode().as_ref()).query::<()>(&mut conn).expect("plant");
    let got = bulwark.get_with("/mine", &HOST).await;
    assert_eq!((got.cache_status(), got.text()), ("bulwark; fwd=miss; stored", "body of /mine"));
}

#[tokio::test]
async fn a_silently_dead_connection_is_replaced() {
    let redis = RedisServer::start();
    let relay = support::BlackholeRelay::start(redis.port).await;
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&relay.url()), "")).await;
    assert_eq!(bulwark.get_with("/a", &HOST).await.cache_status(), "bulwark; fwd=miss; stored");
    support::eventually("entry in Redis", Duration::from_secs(2), async || redis.keys(&redis_key("/a")).len() == 1).await;

    // The open connections stop answering; no RST, no error: only deadline misses.
    relay.blackhole_existing();
    let fresh = Bulwark::start(&simple_config(&origin.url(), Some(&relay.url()), "")).await;
    let _ = fresh.get_with("/warm-up", &HOST).await;
    relay.blackhole_existing();
    // Requests keep working (origin), and after a few deadline misses the link
    // reconnects: L2 hits come back without any help.
    let mut n = 0;
    support::eventually("L2 hits through a new connection", Duration::from_secs(10), async || {
        n += 1;
        let got = fresh.get_with("/a", &HOST).await;
        assert_eq!(got.status, 200);
        if got.cache_status() == "bulwark; hit; detail=l2" {
            return true;
        }
        // "/a" came from the origin and sits in L1 now: plant a new key each round.
        let path = format!("/b/{n}");
        let mut conn = redis.conn();
        let entry = support::fresh_entry(&format!("http://shop.example{path}\nae=identity"), http::HeaderMap::new(), b"not yours");
        redis::cmd("SET").arg(redis_key(&path)).arg(entry.encode().as_ref()).query::<()>(&mut conn).expect("plant");
        fresh.get_with(&path, &HOST).await.cache_status() == "bulwark; hit; detail=l2"
    })
    .await;
    assert!(fresh.metric("bulwark_redis_errors_total", &[("pool", "pdp")]).await >= 3.0, "deadline misses are counted");
}

/// An entry for `path` whose header count says 0xFFFF, with a valid checksum: the crafted
/// value that once panicked the decoder (`HeaderMap::with_capacity` beyond its limit).
fn crafted_header_count(path: &str) -> Vec<u8> {
    let key = format!("http://shop.example{path}\nae=identity");
    let mut bytes = support::fresh_entry(&key, http::HeaderMap::new(), b"x").encode().to_vec();
    let at = 4 + 2 + 7 * 8 + 1 + 4 + key.len();
    bytes[at..at + 2].copy_from_slice(&0xFFFFu16.to_be_bytes());
    bytes.truncate(bytes.len() - 8);
    let checksum = xxhash_rust::xxh3::xxh3_64(&bytes);
    bytes.extend_from_slice(&checksum.to_be_bytes());
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_entry_or_a_huge_value_in_redis_is_a_miss_deleted_and_counted() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    // Answers not stored, so nothing is written back under the planted keys.
    origin.set(|parts| support::Reply::ok(format!("body of {}", parts.uri.path())).header("cache-control", "no-store"));
    // Reading the 8 MiB head of the huge value can take longer than the tests' usual 50 ms
    // deadline on a busy machine; a missed deadline is a miss, but not a corrupt entry.
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "redis_timeout = \"2s\"")).await;
    let mut conn = redis.conn();
    redis::cmd("SET").arg(redis_key("/crafted")).arg(crafted_header_count("/crafted")).query::<()>(&mut conn).expect("plant");
    // 100 MiB under a pool whose entries are at most max_object_bytes (8 MiB) + overhead.
    redis::cmd("SET").arg(redis_key("/huge")).arg(vec![b'B'; 100 << 20]).query::<()>(&mut conn).expect("plant");
    let sent_before = net_output_bytes(&mut conn);
    for path in ["/crafted", "/huge"] {
        let got = bulwark.get_with(path, &HOST).await;
        assert_eq!((got.status.as_u16(), got.text()), (200, format!("body of {path}").as_str()), "a miss served by the origin");
    }
    assert_eq!(bulwark.metric("bulwark_l2_corrupt_entries_total", &[("pool", "pdp")]).await, 2.0);
    let sent = net_output_bytes(&mut conn) - sent_before;
    assert!(sent < 20 << 20, "Redis sent {sent} bytes: the huge value was not read whole");
    support::eventually("both planted values deleted", Duration::from_secs(2), async || {
        let exists: i64 = redis::cmd("EXISTS").arg(redis_key("/crafted")).arg(redis_key("/huge")).query(&mut conn).expect("EXISTS");
        exists == 0
    })
    .await;
}

/// Redis's `total_net_output_bytes`.
fn net_output_bytes(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(conn).expect("INFO");
    info.lines().find_map(|l| l.strip_prefix("total_net_output_bytes:")).and_then(|v| v.trim().parse().ok()).expect("total_net_output_bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_replica_reads_a_hot_key_from_redis_once_for_all_its_requests() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let page = bytes::Bytes::from(vec![b'p'; 1 << 20]);
    origin.set(move |_| support::Reply::ok(page.clone()).header("cache-control", "public, max-age=600"));
    // A deadline long enough to outlast the pause below.
    let config = simple_config(&origin.url(), Some(&redis.url()), "redis_timeout = \"3s\"");
    let warm = Bulwark::start(&config).await;
    assert_eq!(warm.get_with("/hot", &HOST).await.cache_status(), "bulwark; fwd=miss; stored");
    support::eventually("the entry is in Redis", Duration::from_secs(2), async || redis.entries("bulwark:pdp:").len() == 1).await;
    // A new pod: its L1 is empty, Redis holds the key. Redis holds every command for
    // 500 ms, so all 200 requests are looking the key up at once.
    let cold = std::sync::Arc::new(Bulwark::start(&config).await);
    let mut conn = redis.conn();
    let sent_before = net_output_bytes(&mut conn);
    redis::cmd("CLIENT").arg("PAUSE").arg(500).arg("ALL").query::<()>(&mut conn).expect("CLIENT PAUSE");
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let cold = cold.clone();
            tokio::spawn(async move { cold.get_with("/hot", &HOST).await })
        })
        .collect();
    for request in requests {
        let got = request.await.expect("request");
        assert_eq!((got.status.as_u16(), got.body.len()), (200, 1 << 20));
    }
    let sent = net_output_bytes(&mut conn) - sent_before;
    assert!(sent < 4 << 20, "Redis sent {} MiB for 200 requests of a 1 MiB key", sent >> 20);
    assert_eq!(origin.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_set_by_hand_and_never_released_holds_nobody_up() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "lock_timeout = \"1s\"")).await;
    bulwark.wait_for_subscription().await;
    let hash = CacheKey::new("http", "shop.example", "/held", None, Encodings::IDENTITY).hash;
    let mut conn = redis.conn();
    redis::cmd("SET").arg(format!("bulwark:pdp:v2:lease:{hash:032x}")).arg("x").arg("PX").arg(15_000).query::<()>(&mut conn).expect("plant");
    let start = Instant::now();
    let got = bulwark.get_with("/held", &HOST).await;
    assert_eq!((got.status.as_u16(), got.text()), (200, "body of /held"));
    assert!(start.elapsed() < Duration::from_secs(2), "answered after {:?}: lock_timeout is 1 s", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_fetch_longer_than_lock_timeout_keeps_its_lease() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    origin.set(|parts| support::Reply::ok(format!("body of {}", parts.uri.path())).delay(Duration::from_millis(2000)));
    let config = simple_config(&origin.url(), Some(&redis.url()), "lock_timeout = \"400ms\"");
    let (holder, peer) = (std::sync::Arc::new(Bulwark::start(&config).await), Bulwark::start(&config).await);
    holder.wait_for_subscription().await;
    peer.wait_for_subscription().await;
    let first = {
        let holder = holder.clone();
        tokio::spawn(async move { holder.get_with("/slow", &HOST).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Waits past lock_timeout several times: the holder renews, so the peer never takes over.
    let second = peer.get_with("/slow", &HOST).await;
    assert_eq!(second.text(), "body of /slow");
    assert_eq!(first.await.expect("holder").cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(origin.total(), 1, "one fetch across both replicas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_event_link_keeps_l1_and_confirms_each_copy_cheaply() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let page = bytes::Bytes::from(vec![b'k'; 200 << 10]);
    origin.set(move |_| support::Reply::ok(page.clone()).header("cache-control", "public, max-age=600"));
    let bulwark = Bulwark::start(&simple_config(&origin.url(), Some(&redis.url()), "")).await;
    bulwark.wait_for_subscription().await;
    let paths: Vec<String> = (0..10).map(|i| format!("/kept/{i}")).collect();
    for path in &paths {
        bulwark.get_with(path, &HOST).await;
    }
    support::eventually("the entries are in Redis", Duration::from_secs(2), async || redis.entries("bulwark:pdp:").len() >= 10).await;
    let mut conn = redis.conn();
    // The subscription killed by Redis (a failover does the same), then Redis frozen for
    // 3 s (a fork, a slow script): each is a gap in which invalidations may be missed.
    for gap in ["kill", "stall"] {
        if gap == "kill" {
            let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query(&mut conn).expect("CLIENT KILL");
            assert_eq!(killed, 1);
            bulwark.until_resubscribed().await;
        } else {
            redis.stall();
            tokio::time::sleep(Duration::from_secs(3)).await;
            redis.resume();
            // Whether the heartbeat (a PING every 2 s, 2 s to answer) saw the stall as a
            // gap depends on where in its cycle it came: either way the copies stay.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            bulwark.wait_for_subscription().await;
            for i in 4..8 {
                bulwark.get_with(&format!("/warm-up/{i}"), &HOST).await;
            }
        }
        let sent_before = net_output_bytes(&mut conn);
        let unconfirmed = bulwark.metric("bulwark_l1_unconfirmed", &[("pool", "pdp")]).await;
        assert!(gap == "stall" || unconfirmed >= 10.0, "{gap}: {unconfirmed} copies waiting for their check");
        for path in &paths {
            let got = bulwark.get_with(path, &HOST).await;
            assert_eq!((got.status.as_u16(), got.cache_status()), (200, "bulwark; hit; detail=l1"), "{gap}: {path} kept in L1");
        }
        // The warm-up keys of an earlier gap are copies from before this one too.
        for i in 0..8 {
            bulwark.get_with(&format!("/warm-up/{i}"), &HOST).await;
        }
        assert_eq!(bulwark.metric("bulwark_l1_unconfirmed", &[("pool", "pdp")]).await, 0.0, "{gap}: every copy checked");
        let sent = net_output_bytes(&mut conn) - sent_before;
        // Ten checks of an entry's head, not ten 200 KiB values.
        assert!(sent < 100 << 10, "{gap}: Redis sent {sent} bytes to confirm 10 copies");
    }
    for path in &paths {
        assert_eq!(origin.count(path), 1, "{path} never went to the origin again");
    }
}
