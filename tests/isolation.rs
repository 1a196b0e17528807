//! Pools are isolated: one pool's Redis dying or stalling changes nothing for another.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{Bulwark, Origin, RedisServer, Reply};

fn two_pools(origin: &str, redis_a: &str, redis_b: &str) -> String {
    format!(
        r#"
[server]
drain_delay = "0s"
[[origins]]
name = "catalog"
url = "{origin}"
[[pools]]
name = "a"
redis_url = "{redis_a}"
redis_timeout = "50ms"
[[pools]]
name = "b"
redis_url = "{redis_b}"
redis_timeout = "50ms"
[[routes]]
name = "a"
path_prefix = "/a/"
pool = "a"
origin = "catalog"
[[routes]]
name = "b"
path_prefix = "/b/"
pool = "b"
origin = "catalog"
"#
    )
}

/// Per-request latencies and statuses of a load loop on one pool.
#[derive(Default)]
struct Load {
    latencies: Vec<Duration>,
    failures: usize,
}

impl Load {
    fn p99(&mut self) -> Duration {
        self.latencies.sort();
        self.latencies.get(self.latencies.len() * 99 / 100).copied().unwrap_or_default()
    }
}

/// Requests `prefix` + one of `keys` keys (warm) plus a cold key every `cold_every`
/// requests, until `stop`.
async fn load(bulwark: Arc<Bulwark>, prefix: &'static str, keys: usize, stop: Arc<AtomicBool>) -> Load {
    let mut out = Load::default();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let path = if i.is_multiple_of(10) { format!("{prefix}cold/{i}") } else { format!("{prefix}{}", i % keys) };
        let start = Instant::now();
        let got = bulwark.get_with(&path, &[("host", "shop.example")]).await;
        out.latencies.push(start.elapsed());
        if got.status != 200 || !got.text().starts_with("body of") {
            out.failures += 1;
        }
    }
    out
}

async fn run_phase(bulwark: &Arc<Bulwark>, for_how_long: Duration) -> (Load, Load) {
    let stop = Arc::new(AtomicBool::new(false));
    let a = tokio::spawn(load(bulwark.clone(), "/a/", 20, stop.clone()));
    let b = tokio::spawn(load(bulwark.clone(), "/b/", 20, stop.clone()));
    tokio::time::sleep(for_how_long).await;
    stop.store(true, Ordering::Relaxed);
    (a.await.expect("load a"), b.await.expect("load b"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_pools_redis_leaves_the_other_pool_alone() {
    let mut redis_a = RedisServer::start();
    let redis_b = RedisServer::start();
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(format!("body of {}", parts.uri.path())).delay(Duration::from_millis(5)));
    let bulwark = Arc::new(Bulwark::start(&two_pools(&origin.url(), &redis_a.url(), &redis_b.url())).await);

    let (mut a_before, mut b_before) = run_phase(&bulwark, Duration::from_secs(2)).await;
    assert_eq!((a_before.failures, b_before.failures), (0, 0));
    let b_hits_before = bulwark.metric("bulwark_requests_total", &[("pool", "b"), ("cache", "hit_l1")]).await;

    redis_a.kill();
    let (mut a_during, mut b_during) = run_phase(&bulwark, Duration::from_secs(2)).await;
    assert_eq!(a_during.failures, 0, "pool a answers every request from L1 or the origin");
    assert_eq!(b_during.failures, 0);
    assert_eq!(bulwark.metric("bulwark_redis_breaker_open", &[("pool", "a")]).await, 1.0);
    assert_eq!(bulwark.metric("bulwark_redis_breaker_open", &[("pool", "b")]).await, 0.0);
    assert_eq!(bulwark.metric("bulwark_redis_errors_total", &[("pool", "b")]).await, 0.0);
    // Pool b's hit ratio is what it was: every warm key a hit, every tenth request cold.
    let b_hits = bulwark.metric("bulwark_requests_total", &[("pool", "b"), ("cache", "hit_l1")]).await - b_hits_before;
    let b_requests = b_during.latencies.len() as f64;
    assert!(b_hits / b_requests > 0.85, "pool b hit ratio fell to {}", b_hits / b_requests);
    let (b_p99_before, b_p99_during) = (b_before.p99(), b_during.p99());
    eprintln!("p99: a {:?} -> {:?}, b {:?} -> {:?}", a_before.p99(), a_during.p99(), b_p99_before, b_p99_during);
    // b's p99 stays in the same range (5x margin plus a small floor for a noisy machine).
    assert!(b_p99_during < b_p99_before * 5 + Duration::from_millis(20), "b p99 {b_p99_before:?} -> {b_p99_during:?}");

    redis_a.restart();
    let fresh = Bulwark::start(&two_pools(&origin.url(), &redis_a.url(), &redis_b.url())).await;
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        n += 1;
        let path = format!("/a/after/{n}");
        assert_eq!(bulwark.get_with(&path, &[("host", "shop.example")]).await.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if fresh.get_with(&path, &[("host", "shop.example")]).await.cache_status() == "bulwark; hit; detail=l2" {
            break;
        }
        assert!(Instant::now() < deadline, "pool a never returned to L2 hits");
    }
    assert_eq!(bulwark.metric("bulwark_redis_breaker_open", &[("pool", "a")]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_a_deadline_per_probe_not_per_request() {
    let redis_a = RedisServer::start();
    let redis_b = RedisServer::start();
    let origin = Origin::start().await;
    let origin_latency = Duration::from_millis(5);
    origin.set(move |parts| Reply::ok(format!("body of {}", parts.uri.path())).delay(origin_latency));
    let bulwark = Arc::new(Bulwark::start(&two_pools(&origin.url(), &redis_a.url(), &redis_b.url())).await);
    let _ = run_phase(&bulwark, Duration::from_millis(500)).await;

    let (_, mut b_before) = run_phase(&bulwark, Duration::from_secs(1)).await;
    let b_hits_before = bulwark.metric("bulwark_requests_total", &[("pool", "b"), ("cache", "hit_l1")]).await;
    redis_a.stall();
    let (mut a, mut b) = run_phase(&bulwark, Duration::from_secs(3)).await;
    redis_a.resume();
    assert_eq!((a.failures, b.failures), (0, 0));
    // Pool b: same hit ratio, same latency range, no Redis errors, breaker closed.
    let b_hits = bulwark.metric("bulwark_requests_total", &[("pool", "b"), ("cache", "hit_l1")]).await - b_hits_before;
    assert!(b_hits / b.latencies.len() as f64 > 0.85, "pool b hit ratio {}", b_hits / b.latencies.len() as f64);
    let (b_p99_before, b_p99) = (b_before.p99(), b.p99());
    assert!(b_p99 < b_p99_before * 5 + Duration::from_millis(20), "pool b p99 {b_p99_before:?} -> {b_p99:?}");
    assert_eq!(bulwark.metric("bulwark_redis_errors_total", &[("pool", "b")]).await, 0.0);
    assert_eq!(bulwark.metric("bulwark_redis_breaker_open", &[("pool", "b")]).await, 0.0);
    let p99 = a.p99();
    eprintln!("pool a p99 with its Redis stalled: {p99:?} over {} requests", a.latencies.len());
    // redis_timeout (50 ms) + origin latency; the p99 must stay under it.
    assert!(p99 < Duration::from_millis(50) + origin_latency, "p99 {p99:?}");
    // Requests that paid a Redis deadline: the first few, before the breaker opened, and
    // none after (probes run in the background).
    let waited = a.latencies.iter().filter(|l| **l >= Duration::from_millis(45)).count();
    assert!(waited <= 6, "{waited} requests waited for the stalled Redis");
    // After SIGCONT the probe closes pool a's breaker.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bulwark.metric("bulwark_redis_breaker_open", &[("pool", "a")]).await != 0.0 {
        assert!(Instant::now() < deadline, "pool a's breaker did not close after SIGCONT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
