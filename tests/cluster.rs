//! The shared tier on a real six-node Redis Cluster (three primaries, three replicas),
//! including a primary killed mid-test.

mod support;

use std::time::{Duration, Instant};

use support::{Bulwark, Origin, RedisCluster, TestConfig, cluster_config};

const HOST: [(&str, &str); 1] = [("host", "shop.example")];

/// Stores `paths` through `writer` and waits until `reader` (empty L1) gets each from L2.
async fn shared_through_l2(writer: &Bulwark, reader: &Bulwark, paths: &[String]) {
    for path in paths {
        let got = writer.get_with(path, &HOST).await;
        assert_eq!(got.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for path in paths {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = reader.get_with(path, &HOST).await;
            assert_eq!((got.status.as_u16(), got.text()), (200, format!("body of {path}").as_str()));
            if got.cache_status() == "bulwark; hit; detail=l2" || got.cache_status() == "bulwark; hit; detail=l1" {
                break;
            }
            assert!(Instant::now() < deadline, "{path} never reached the reader through the cluster");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_aside_on_a_cluster_survives_a_primary_failover() {
    let mut cluster = RedisCluster::start();
    let origin = Origin::start().await;
    let config = cluster_config(&origin.url(), &cluster.urls(), "");
    let writer = Bulwark::start(&config).await;
    let reader = Bulwark::start(&config).await;
    writer.wait_for_subscription().await;
    reader.wait_for_subscription().await;

    // Keys spread over all three primaries' slots.
    let before: Vec<String> = (0..30).map(|i| format!("/before/{i}")).collect();
    shared_through_l2(&writer, &reader, &before).await;
    let l2_hits = reader.metric("bulwark_requests_total", &[("cache", "hit_l2")]).await;
    assert!(l2_hits >= 30.0, "reader got {l2_hits} L2 hits");

    // Cross-replica coalescing and purges work on the cluster too.
    let purge = http::Request::post(format!("http://{}/admin/purge", writer.admin_addr))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(br#"{"urls": ["/before/0"]}"#)))
        .expect("request");
    let answer = writer.request(purge).await;
    assert!(answer.text().contains("\"l2\":1"), "{}", answer.text());

    // The purge reached the reader's L1 through the cluster's pub/sub.
    let deadline = Instant::now() + Duration::from_secs(1);
    while reader.get_with("/before/0", &HOST).await.cache_status() == "bulwark; hit; detail=l1" {
        assert!(Instant::now() < deadline, "the purge never reached the other replica");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Kill a primary; keep serving through the failover. The writer stores new keys (L2
    // writes to every shard); the reader asks for keys it has never seen, so each of its
    // requests consults the cluster before the origin.
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3);
    cluster.kill(primaries[0]);
    let failover_started = Instant::now();
    let mut during: usize = 0;
    while failover_started.elapsed() < Duration::from_secs(4) {
        during += 1;
        let path = format!("/during/{during}");
        let got = writer.get_with(&path, &HOST).await;
        assert_eq!((got.status.as_u16(), got.text()), (200, format!("body of {path}").as_str()), "client error during failover");
        let unseen = format!("/during/{}", during.saturating_sub(1));
        let again = reader.get_with(&unseen, &HOST).await;
        assert_eq!((again.status.as_u16(), again.text()), (200, format!("body of {unseen}").as_str()), "client error during failover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.wait_until_ok();

    // After the failover, L2 hits resume on the replicas that lived through it...
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let path = format!("/recovered/{n}");
        writer.get_with(&path, &HOST).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if reader.get_with(&path, &HOST).await.cache_status() == "bulwark; hit; detail=l2" {
            break;
        }
        assert!(Instant::now() < deadline, "the existing reader never got an L2 hit after the failover");
    }
    // ...and with a fresh reader (empty L1).
    let fresh = Bulwark::start(&config).await;
    fresh.wait_for_subscription().await;
    let after: Vec<String> = (0..30).map(|i| format!("/after/{i}")).collect();
    shared_through_l2(&writer, &fresh, &after).await;
    assert!(fresh.metric("bulwark_requests_total", &[("cache", "hit_l2")]).await >= 30.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_and_corrupt_entries_on_a_cluster() {
    use std::sync::Arc;
    let cluster = RedisCluster::start();
    let origin = Origin::start().await;
    origin.set(|parts| support::Reply::ok(format!("body of {}", parts.uri.path())).delay(Duration::from_millis(200)));
    // About coalescing and corrupt entries, not deadlines: a 500 ms Redis deadline keeps a
    // busy machine (two six-node clusters, 200 clients) from turning the one read of the
    // corrupt entry into a timeout, which is a miss that never sees the entry.
    let config = TestConfig::new(&origin.url()).cluster(&cluster.urls()).pool("redis_timeout", "500ms").to_toml();
    let replicas = [Arc::new(Bulwark::start(&config).await), Arc::new(Bulwark::start(&config).await)];
    for replica in &replicas {
        replica.wait_for_subscription().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 200 concurrent clients over 20 cold keys, spread over two replicas.
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let replica = replicas[i % 2].clone();
            tokio::spawn(async move {
                let path = format!("/spike/{}", i % 20);
                let got = replica.get_with(&path, &HOST).await;
                (path, got)
            })
        })
        .collect();
    for task in tasks {
        let (path, got) = task.await.expect("task");
        assert_eq!((got.status.as_u16(), got.text()), (200, format!("body of {path}").as_str()));
    }
    assert!(origin.total() <= 22, "origin saw {} requests for 20 keys", origin.total());

    // A corrupt entry of this format version: a miss, deleted, counted, never served.
    let key = bulwark::cache::CacheKey::new("http", "shop.example", "/corrupt", None, bulwark::cache::Encodings::IDENTITY);
    let name = format!("bulwark:pdp:v2:{{{:032x}}}", key.hash);
    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("cluster client");
    let mut conn = client.get_async_connection().await.expect("cluster connection");
    let _: () = redis::AsyncCommands::set(&mut conn, &name, b"BWK\x02garbage".as_slice()).await.expect("plant");
    let got = replicas[0].get_with("/corrupt", &HOST).await;
    assert_eq!((got.cache_status(), got.text()), ("bulwark; fwd=miss; stored", "body of /corrupt"));
    assert_eq!(replicas[0].metric("bulwark_l2_corrupt_entries_total", &[("pool", "pdp")]).await, 1.0);
}
