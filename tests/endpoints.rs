//! Origins with several endpoints: balancing, passive ejection, active health checks,
//! slow start, DNS discovery (driven through `bulwark::origin::discovery::pin_answer`,
//! which stands in for the system resolver), draining and retries on another endpoint.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{Bulwark, Origin, Reply, TestConfig, eventually};
use tokio::net::TcpListener;

fn no_store(origin: &Origin) {
    origin.set(|parts| Reply::ok(format!("from {}", parts.uri.path())).header("cache-control", "no-store"));
}

async fn origins(n: usize) -> Vec<Origin> {
    let mut all = Vec::new();
    for _ in 0..n {
        let origin = Origin::start().await;
        no_store(&origin);
        all.push(origin);
    }
    all
}

/// Clients requesting distinct, uncacheable paths in a loop until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failed: Arc<std::sync::Mutex<Vec<u16>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(bulwark: &Arc<Bulwark>, clients: usize) -> Traffic {
        let (stop, sent, failed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
        let tasks = (0..clients)
            .map(|client| {
                let (bulwark, stop, sent, failed) = (bulwark.clone(), stop.clone(), sent.clone(), failed.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let got = bulwark.get(&format!("/item/{client}/{i}")).await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        if got.status != 200 {
                            failed.lock().expect("lock").push(got.status.as_u16());
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
            })
            .collect();
        Traffic { stop, sent, failed, tasks }
    }

    /// Stops the clients; the statuses of the requests that were not answered 200.
    async fn stop(self) -> (usize, Vec<u16>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("client task");
        }
        let failed = self.failed.lock().expect("lock").clone();
        (self.sent.load(Ordering::Relaxed), failed)
    }
}

/// Each endpoint's state in `GET /admin/origins`, by address.
async fn states(bulwark: &Bulwark) -> Vec<(String, String)> {
    let got = bulwark.admin("/admin/origins").await;
    let doc: serde_json::Value = serde_json::from_slice(&got.body).expect("origins JSON");
    doc["origins"][0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| (e["address"].as_str().unwrap_or_default().to_owned(), e["state"].as_str().unwrap_or_default().to_owned()))
        .collect()
}

async fn state_of(bulwark: &Bulwark, addr: SocketAddr) -> Option<String> {
    states(bulwark).await.into_iter().find(|(a, _)| *a == addr.to_string()).map(|(_, s)| s)
}

const HEALTH_CHECK: &str = r#"health_check = { path = "/healthz", interval = "200ms", timeout = "150ms", unhealthy_after = 2, healthy_after = 2 }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_costs_no_get_an_error_and_returns_ramped_once_its_check_passes() {
    let mut origins = origins(3).await;
    let urls: Vec<String> = origins.iter().map(Origin::url).collect();
    let config = TestConfig::new("http://unused")
        .endpoints(&urls)
        .origin_toml(HEALTH_CHECK)
        .origin("eject_after_failures", 3)
        .origin("eject_for", "1s")
        .origin("slow_start", "3s");
    let bulwark = Arc::new(Bulwark::start(&config.to_toml()).await);
    let traffic = Traffic::start(&bulwark, 6);
    eventually("traffic on every endpoint", Duration::from_secs(5), async || origins.iter().all(|o| o.total() > 5)).await;

    let dead = origins[1].addr;
    origins[1].stop();
    eventually("the killed endpoint out of rotation", Duration::from_secs(5), async || {
        state_of(&bulwark, dead).await.is_some_and(|s| s == "ejected" || s == "unhealthy")
    })
    .await;
    assert!(bulwark.metric("bulwark_origin_ejections_total", &[("origin", "catalog")]).await >= 1.0, "it was not ejected by its failures");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(state_of(&bulwark, dead).await.as_deref(), Some("unhealthy"), "a dead endpoint back in rotation once its ejection ended");

    // It answers again: back after two passing checks, its share ramping up.
    origins[1] = Origin::start_on(TcpListener::bind(dead).await.expect("rebind the endpoint")).await;
    no_store(&origins[1]);
    eventually("the endpoint ramping up again", Duration::from_secs(5), async || state_of(&bulwark, dead).await.as_deref() == Some("slow_start")).await;
    eventually("traffic on the returned endpoint", Duration::from_secs(5), async || origins[1].total() > origins[1].count("/healthz") + 5).await;
    let (sent, failed) = traffic.stop().await;
    assert!(failed.is_empty(), "{} of {sent} GETs failed: {failed:?}", failed.len());
    assert!(bulwark.metric("bulwark_origin_retries_total", &[("origin", "catalog")]).await >= 1.0);
    assert_eq!(bulwark.metric("bulwark_origin_breaker_open", &[("origin", "catalog")]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_gets_a_small_share_and_the_breaker_stays_closed() {
    let origins = origins(3).await;
    origins[0].set(|_| Reply::ok("slow").header("cache-control", "no-store").delay(Duration::from_millis(300)));
    origins[1].set(|_| Reply::ok("fast").header("cache-control", "no-store").delay(Duration::from_millis(5)));
    origins[2].set(|_| Reply::ok("fast").header("cache-control", "no-store").delay(Duration::from_millis(5)));
    let urls: Vec<String> = origins.iter().map(Origin::url).collect();
    let bulwark = Arc::new(Bulwark::start(&TestConfig::new("http://unused").endpoints(&urls).to_toml()).await);
    let traffic = Traffic::start(&bulwark, 32);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (sent, failed) = traffic.stop().await;
    assert!(failed.is_empty(), "{failed:?}");
    let slow = origins[0].total();
    let all: usize = origins.iter().map(Origin::total).sum();
    eprintln!("slow endpoint: {slow} of {all} requests ({sent} sent)");
    assert!((slow as f64) < 0.15 * all as f64, "the 300 ms endpoint got {slow} of {all}");
    assert_eq!(bulwark.metric("bulwark_origin_breaker_open", &[("origin", "catalog")]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_its_health_check_never_gets_a_client_request() {
    let origins = origins(3).await;
    origins[2].set(|_| Reply::ok("sick").status(503));
    let urls: Vec<String> = origins.iter().map(Origin::url).collect();
    let bulwark = Bulwark::start(&TestConfig::new("http://unused").endpoints(&urls).origin_toml(HEALTH_CHECK).to_toml()).await;
    for i in 0..40 {
        let got = bulwark.get(&format!("/p/{i}")).await;
        assert_eq!(got.status, 200, "request {i} failed: {}", got.text());
    }
    assert!(origins[2].count("/healthz") >= 1);
    assert_eq!(origins[2].total(), origins[2].count("/healthz"), "a client request reached the endpoint failing its check");
    assert_eq!(state_of(&bulwark, origins[2].addr).await.as_deref(), Some("unhealthy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_500_to_one_url_is_not_ejected_but_one_answering_503_is() {
    let origins = origins(2).await;
    let broken_with = |origin: &Origin, status: u16| {
        origin.set(move |parts| match parts.uri.path() {
            "/broken" => Reply::ok("bug").status(status).header("cache-control", "no-store"),
            path => Reply::ok(format!("from {path}")).header("cache-control", "no-store"),
        })
    };
    broken_with(&origins[0], 500);
    broken_with(&origins[1], 500);
    let urls: Vec<String> = origins.iter().map(Origin::url).collect();
    // The origin's breaker kept closed (a URL answering 500 everywhere would open it).
    let config = TestConfig::new("http://unused")
        .endpoints(&urls)
        .origin("eject_after_failures", 2)
        .origin("max_ejected_percent", 100)
        .origin("breaker_consecutive_failures", 1000)
        .origin("breaker_min_requests", 1000);
    let bulwark = Bulwark::start(&config.to_toml()).await;
    for _ in 0..30 {
        assert_eq!(bulwark.get("/broken").await.status, 500);
    }
    assert_eq!(bulwark.metric("bulwark_origin_ejections_total", &[("origin", "catalog")]).await, 0.0);
    assert_eq!(states(&bulwark).await.iter().filter(|(_, s)| s == "healthy").count(), 2);
    // The same with a 503: the endpoint itself says it is failing.
    broken_with(&origins[0], 503);
    broken_with(&origins[1], 503);
    for _ in 0..30 {
        bulwark.get("/broken").await;
    }
    assert_eq!(bulwark.metric("bulwark_origin_ejections_total", &[("origin", "catalog")]).await, 1.0, "one ejected, never the last one");
}

/// Origins on one port of 127.0.0.2, .3 and .4 (as a headless Service's pods would be).
async fn pods() -> (u16, Vec<Origin>) {
    loop {
        let first = TcpListener::bind("127.0.0.2:0").await.expect("bind 127.0.0.2");
        let port = first.local_addr().expect("addr").port();
        let (Ok(second), Ok(third)) = (TcpListener::bind(("127.0.0.3", port)).await, TcpListener::bind(("127.0.0.4", port)).await) else { continue };
        let mut pods = Vec::new();
        for listener in [first, second, third] {
            let origin = Origin::start_on(listener).await;
            no_store(&origin);
            pods.push(origin);
        }
        return (port, pods);
    }
}

fn ips(pods: &[&Origin]) -> Option<Vec<std::net::IpAddr>> {
    Some(pods.iter().map(|p| p.addr.ip()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_dns_answer_is_followed_under_steady_keep_alive_load() {
    let (port, pods) = pods().await;
    let host = format!("pods-{}.endpoints.test", fastrand::u64(..));
    bulwark::origin::discovery::pin_answer(&host, ips(&[&pods[0], &pods[1]]));
    let config = TestConfig::new(&format!("http://{host}:{port}")).origin("discovery", "dns").origin("resolve_interval", "300ms");
    let bulwark = Arc::new(Bulwark::start(&config.to_toml()).await);
    let traffic = Traffic::start(&bulwark, 4);
    eventually("traffic on A and B", Duration::from_secs(5), async || pods[0].total() > 10 && pods[1].total() > 10).await;
    assert_eq!(pods[2].total(), 0);

    bulwark::origin::discovery::pin_answer(&host, ips(&[&pods[1], &pods[2]]));
    let changed = Instant::now();
    eventually("traffic on C", Duration::from_millis(1300 * 5), async || pods[2].total() > 0).await;
    eprintln!("C got its first request {:?} after the answer changed", changed.elapsed());
    eventually("A drained and forgotten", Duration::from_secs(5), async || state_of(&bulwark, pods[0].addr).await.is_none()).await;
    let on_a = pods[0].total();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(pods[0].total(), on_a, "A got requests after it drained");
    let (sent, failed) = traffic.stop().await;
    assert!(failed.is_empty(), "{} of {sent} failed: {failed:?}", failed.len());
    assert!(pods[1].total() > 0 && pods[2].total() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_lookup_keeps_the_endpoints_and_three_empty_answers_leave_none() {
    let (port, pods) = pods().await;
    let host = format!("pods-{}.endpoints.test", fastrand::u64(..));
    bulwark::origin::discovery::pin_answer(&host, ips(&[&pods[0]]));
    let config = TestConfig::new(&format!("http://{host}:{port}")).origin("discovery", "dns").origin("resolve_interval", "100ms");
    let bulwark = Bulwark::start(&config.to_toml()).await;
    assert_eq!(bulwark.get("/a").await.status, 200);
    bulwark::origin::discovery::pin_answer(&host, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(bulwark.get("/b").await.status, 200, "a failing lookup dropped the endpoints");
    bulwark::origin::discovery::pin_answer(&host, Some(Vec::new()));
    eventually("no endpoints after three empty answers", Duration::from_secs(5), async || states(&bulwark).await.is_empty()).await;
    let got = bulwark.get("/c").await;
    assert_eq!(got.status, 503, "{}", got.text());
    assert!(got.header("retry-after").is_some());
    bulwark::origin::discovery::pin_answer(&host, ips(&[&pods[1]]));
    eventually("the endpoint found again", Duration::from_secs(5), async || bulwark.get("/d").await.status == 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_refusing_a_post_is_never_retried_and_gets_within_budget() {
    let refusing: Vec<String> = (0..2).map(|_| format!("http://127.0.0.1:{}", support::free_port())).collect();
    // The breaker kept closed, so that every request tries the origin.
    let config = TestConfig::new("http://unused").endpoints(&refusing).origin("breaker_consecutive_failures", 1000).origin("breaker_min_requests", 1000);
    let bulwark = Bulwark::start(&config.to_toml()).await;
    let post =
        bulwark.request(http::Request::post(bulwark.url("/order")).body(http_body_util::Full::new(bytes::Bytes::from_static(b"x"))).expect("request")).await;
    assert_eq!(post.status, 502);
    assert_eq!(bulwark.metric("bulwark_origin_retries_total", &[("origin", "catalog")]).await, 0.0, "a POST was retried");
    for i in 0..100 {
        assert_eq!(bulwark.get(&format!("/g/{i}")).await.status, 502);
    }
    let retries = bulwark.metric("bulwark_origin_retries_total", &[("origin", "catalog")]).await;
    // 20% of the requests in the last ten seconds, and never fewer than three.
    assert!((1.0..=0.2 * 101.0 + 3.0).contains(&retries), "{retries} retries for 101 requests");
}

/// This replica's share of the fleet budget in `GET /admin/origins`.
async fn fleet_share(bulwark: &Bulwark) -> Option<u64> {
    let doc: serde_json::Value = serde_json::from_slice(&bulwark.admin("/admin/origins").await.body).expect("origins JSON");
    doc["origins"][0]["fleet_share"].as_u64()
}

async fn shares(replicas: &[Arc<Bulwark>]) -> Vec<Option<u64>> {
    let mut all = Vec::new();
    for replica in replicas {
        all.push(fleet_share(replica).await);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_fleet_budget_and_follow_replicas_joining_and_leaving() {
    let redis = support::RedisServer::start();
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("slow").header("cache-control", "no-store").delay(Duration::from_millis(200)));
    let config = |id: &str| {
        TestConfig::new(&origin.url())
            .server("control_redis_url", redis.url())
            .server("replica_id", id)
            .origin("fleet_max_concurrency", 12)
            .origin("max_concurrency", 64)
            .origin("queue_timeout", "3s")
            .to_toml()
    };
    let mut replicas = Vec::new();
    for id in ["r1", "r2", "r3"] {
        replicas.push(Arc::new(Bulwark::start(&config(id)).await));
    }
    eventually("every replica takes 12 / 3", Duration::from_secs(5), async || shares(&replicas).await == [Some(4); 3]).await;
    assert_eq!(replicas[0].metric("bulwark_origin_concurrency_limit", &[("origin", "catalog")]).await, 4.0);
    // 24 clients against a budget of 12.
    let traffic: Vec<Traffic> = replicas.iter().map(|r| Traffic::start(r, 8)).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = origin.log.max_inflight.load(Ordering::SeqCst);
    eprintln!("three replicas, fleet budget 12: at most {peak} requests in flight at the origin");
    assert!((10..=12).contains(&peak), "{peak} requests in flight at once for a budget of 12");

    let fourth = Arc::new(Bulwark::start(&config("r4")).await);
    replicas.push(fourth.clone());
    eventually("every share lowered to 12 / 4", Duration::from_secs(5), async || shares(&replicas).await == [Some(3); 4]).await;
    replicas.pop();
    Arc::try_unwrap(fourth).ok().expect("the fourth replica is not shared").stop().await.expect("stop");
    eventually("every share raised to 12 / 3 again", Duration::from_secs(5), async || shares(&replicas).await == [Some(4); 3]).await;
    for traffic in traffic {
        let (sent, failed) = traffic.stop().await;
        assert!(failed.is_empty(), "{} of {sent} failed: {failed:?}", failed.len());
    }
    // Without a control Redis, max_concurrency alone, reloads included.
    let alone = TestConfig::new(&origin.url()).origin("fleet_max_concurrency", 12).origin("max_concurrency", 64);
    let path = std::env::temp_dir().join(format!("bulwark-fleet-{}.toml", fastrand::u64(..)));
    std::fs::write(&path, alone.to_toml()).expect("write config");
    let alone_bulwark = Bulwark::start_with_file(&path).await;
    assert_eq!(fleet_share(&alone_bulwark).await, None);
    assert_eq!(alone_bulwark.metric("bulwark_origin_concurrency_limit", &[("origin", "catalog")]).await, 64.0);
    std::fs::write(&path, alone.origin("timeout", "4s").to_toml()).expect("write config");
    assert_eq!(alone_bulwark.admin_send(http::Method::POST, "/admin/reload", "").await.status, 200);
    assert_eq!(
        alone_bulwark.metric("bulwark_origin_concurrency_limit", &[("origin", "catalog")]).await,
        64.0,
        "a reload took the whole fleet budget as the limit"
    );
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_replaced_by_a_reload_stops_checking_its_endpoints() {
    let (before, after) = (Origin::start().await, Origin::start().await);
    let config = |origin: &Origin| TestConfig::new(&origin.url()).origin_toml(HEALTH_CHECK).to_toml();
    let path = std::env::temp_dir().join(format!("bulwark-replaced-{}.toml", fastrand::u64(..)));
    std::fs::write(&path, config(&before)).expect("write config");
    let bulwark = Bulwark::start_with_file(&path).await;
    eventually("the first origin checked", Duration::from_secs(5), async || before.count("/healthz") >= 2).await;
    std::fs::write(&path, config(&after)).expect("write config");
    assert_eq!(bulwark.admin_send(http::Method::POST, "/admin/reload", "").await.status, 200);
    eventually("the new origin checked", Duration::from_secs(5), async || after.count("/healthz") >= 2).await;
    // No request holds the old origin: its checks stop (one round may have been on its way).
    let checked = before.count("/healthz");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(before.count("/healthz") <= checked + 1, "the replaced origin is still checked: {} after {checked}", before.count("/healthz"));
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_bounded_per_origin_not_per_endpoint() {
    // max_concurrency 1 over four endpoints: each gets a connection as the balancer
    // moves between them, but the origin keeps at most twice its concurrency open.
    let origins = origins(4).await;
    let urls: Vec<String> = origins.iter().map(Origin::url).collect();
    // A connection counts as idle once silent longer than any request on it could be:
    // here max(timeout, send_timeout) + 1 s = 2 s.
    let config = TestConfig::new("http://unused")
        .endpoints(&urls)
        .origin("max_concurrency", 1)
        .origin("timeout", "1s")
        .origin("pool_idle_timeout", "60s")
        .server("send_timeout", "1s");
    let bulwark = Bulwark::start(&config.to_toml()).await;
    for i in 0..100 {
        assert_eq!(bulwark.get(&format!("/p/{i}")).await.status, 200);
    }
    let open = || origins.iter().map(|o| o.log.open_connections.load(Ordering::SeqCst)).sum::<usize>();
    assert_eq!(open(), 4, "the test needs a connection on every endpoint (none idle long enough to close yet)");
    // Idle long enough: the next response closes those beyond two.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(bulwark.get("/after").await.status, 200);
    eventually("at most twice max_concurrency open", Duration::from_secs(2), async || open() <= 2).await;
}
