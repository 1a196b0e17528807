//! Running an event: route modes switched at runtime (here and across replicas) and
//! configuration reloads under load.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use support::{Bulwark, Origin, RedisServer, Reply, TestConfig};

/// Routes `search` (with a fallback) and `products` on one pool and origin, the route
/// modes shared through `control` when given.
fn config(origin: &str, control: Option<&str>) -> TestConfig {
    let config = TestConfig::new(origin)
        .route("name", "search")
        .route("path_prefix", "/search")
        .route_toml(r#"fallback = { status = 200, headers = { "content-type" = "application/json" }, body = "[]" }"#)
        .with_route("name = \"products\"\npath_prefix = \"/products/\"\npool = \"pdp\"\norigin = \"catalog\"");
    match control {
        Some(url) => config.server("control_redis_url", url),
        None => config,
    }
}

async fn set_mode(bulwark: &Bulwark, route: &str, mode: &str) -> support::Got {
    bulwark.admin_send(Method::PUT, &format!("/admin/routes/{route}/mode"), &format!(r#"{{"mode": "{mode}"}}"#)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_mode_takes_effect_on_the_next_request_under_load() {
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(format!("results for {}", parts.uri)));
    let bulwark = Arc::new(Bulwark::start(&config(&origin.url(), None).to_toml()).await);
    // Load on another route all along: it never fails.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let load = {
        let (b, stop, failures) = (bulwark.clone(), stop.clone(), failures.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                if b.get(&format!("/products/{}", i % 50)).await.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    assert_eq!(bulwark.get("/search?q=shoes").await.text(), "results for /search?q=shoes");
    let mode_gauge = async |mode: &str| bulwark.metric("bulwark_route_mode", &[("route", "search"), ("mode", mode)]).await;
    assert_eq!((mode_gauge("normal").await, mode_gauge("off").await), (1.0, 0.0), "the mode at start is shown");

    let answer = set_mode(&bulwark, "search", "off").await;
    assert_eq!(answer.status, 200);
    assert_eq!((mode_gauge("normal").await, mode_gauge("off").await), (0.0, 1.0), "a switched mode is shown");
    assert!(answer.text().contains(r#""scope":"this replica""#), "{}", answer.text());
    let off = bulwark.get("/search?q=shoes").await;
    assert_eq!((off.status.as_u16(), off.cache_status()), (503, "bulwark; detail=off"));
    assert!(off.header("retry-after").is_some());

    assert_eq!(set_mode(&bulwark, "search", "fallback").await.status, 200);
    let fallback = bulwark.get("/search?q=shoes").await;
    assert_eq!((fallback.status.as_u16(), fallback.text(), fallback.cache_status()), (200, "[]", "bulwark; detail=fallback"));
    assert_eq!(fallback.header("content-type"), Some("application/json"));
    assert_eq!(fallback.header("cache-control"), Some("no-store"), "a CDN in front must not keep a stand-in");

    assert_eq!(origin.count("/search?q=shoes"), 1);
    assert_eq!(set_mode(&bulwark, "search", "cache-only").await.status, 200);
    let cached = bulwark.get("/search?q=shoes").await;
    assert_eq!((cached.text(), cached.cache_status()), ("results for /search?q=shoes", "bulwark; hit; detail=l1"));
    let not_cached = bulwark.get("/search?q=boots").await;
    assert_eq!((not_cached.text(), not_cached.cache_status()), ("[]", "bulwark; detail=fallback"));
    // cache-only never calls the origin for that route (the load on /products goes on).
    assert_eq!((origin.count("/search?q=shoes"), origin.count("/search?q=boots")), (1, 0));

    assert_eq!(set_mode(&bulwark, "search", "normal").await.status, 200);
    assert_eq!(bulwark.get("/search?q=boots").await.text(), "results for /search?q=boots");

    let routes: serde_json::Value = serde_json::from_slice(&bulwark.admin("/admin/routes").await.body).expect("json");
    assert_eq!(routes["routes"][0]["mode"], "normal");
    // Errors: unknown route, fallback without a fallback response, bad body.
    assert_eq!(set_mode(&bulwark, "nope", "off").await.status, 404);
    assert_eq!(set_mode(&bulwark, "products", "fallback").await.status, 409);
    assert_eq!(set_mode(&bulwark, "search", "sideways").await.status, 400);

    stop.store(true, Ordering::Relaxed);
    load.await.expect("load");
    assert_eq!(failures.load(Ordering::Relaxed), 0);
}

/// The body of a mode-change answer as JSON.
fn answer_json(got: &support::Got) -> serde_json::Value {
    serde_json::from_str(got.text()).unwrap_or_else(|_| panic!("a JSON answer: {}", got.text()))
}

fn ids(answer: &serde_json::Value, field: &str) -> Vec<String> {
    answer[field].as_array().unwrap_or_else(|| panic!("{field} in {answer}")).iter().map(|v| v.as_str().expect("an id").to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_control_redis_modes_reach_every_replica_and_new_ones_start_in_them() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let text = |id: &str| config(&origin.url(), Some(&redis.url())).server("replica_id", id).to_toml();
    let one = Bulwark::start(&text("one")).await;
    let two = Bulwark::start(&text("two")).await;
    // A replica is waited for once its first heartbeat has landed; on a loaded machine
    // that can be after its start returns (it reads the stored modes again when its
    // subscription comes up, so a change made before then still reaches it).
    let start = Instant::now();
    loop {
        let answer = set_mode(&one, "search", "off").await;
        let body = answer_json(&answer);
        if answer.status == 200 && ids(&body, "confirmed") == ["one", "two"] && ids(&body, "missing").is_empty() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "replica two never joined: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Confirmed means applied: replica two refuses at once.
    assert_eq!(two.get("/search?q=x").await.status, 503);
    let three = Bulwark::start(&text("three")).await;
    assert_eq!(three.get("/search?q=x").await.status, 503, "a new replica did not start in the current mode");
    // A replica that shut down is not waited for, nor listed missing (its heartbeat
    // stopped before it left).
    three.stop().await.expect("stop");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let answer = set_mode(&one, "search", "normal").await;
    let body = answer_json(&answer);
    assert_eq!(answer.status, 200, "{body}");
    assert_eq!(ids(&body, "confirmed"), ["one", "two"]);
    // Without a control Redis the answer says where it applied.
    let alone = Bulwark::start(&config(&origin.url(), None).to_toml()).await;
    let answer = answer_json(&set_mode(&alone, "search", "off").await);
    assert_eq!(answer["scope"], "this replica", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_control_connection_went_silent_is_listed_missing_then_catches_up() {
    let redis = RedisServer::start();
    let relay = support::BlackholeRelay::start(redis.port).await;
    let origin = Origin::start().await;
    let direct = Bulwark::start(&config(&origin.url(), Some(&redis.url())).server("replica_id", "direct").to_toml()).await;
    let relayed = Bulwark::start(&config(&origin.url(), Some(&relay.url())).server("replica_id", "relayed").to_toml()).await;
    // Both known and subscribed before the cut: under a loaded machine the relayed
    // replica's first heartbeat can land after its start returns.
    let start = Instant::now();
    loop {
        let answer = set_mode(&direct, "search", "cache-only").await;
        let body = answer_json(&answer);
        if answer.status == 200 && ids(&body, "confirmed") == ["direct", "relayed"] {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the relayed replica never joined: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every connection of the relayed replica to the control Redis goes silent, with no
    // error: only a heartbeat can tell.
    relay.blackhole_existing();
    let answer = set_mode(&direct, "search", "off").await;
    let body = answer_json(&answer);
    assert_eq!(answer.status, 202, "{body}");
    assert_eq!(ids(&body, "confirmed"), ["direct"]);
    assert_eq!(ids(&body, "missing"), ["relayed"]);

    // It notices within 3 s (1 s heartbeat), subscribes again and reads the modes back.
    let start = Instant::now();
    while relayed.get("/search?q=x").await.status != 503 {
        assert!(start.elapsed() < Duration::from_secs(6), "the relayed replica never applied the change made while it was cut off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its read-back acknowledges: the next change is confirmed by both.
    let answer = set_mode(&direct, "search", "normal").await;
    let body = answer_json(&answer);
    assert_eq!(answer.status, 200, "{body}");
    assert_eq!(ids(&body, "confirmed"), ["direct", "relayed"]);
    assert_eq!(relayed.get("/search?q=x").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_changed_under_load_swaps_without_failures_and_a_broken_one_changes_nothing() {
    let origin = Origin::start().await;
    let path = std::env::temp_dir().join(format!("bulwark-reload-{}-{}.toml", std::process::id(), support::free_port()));
    std::fs::write(&path, config(&origin.url(), None).to_toml()).expect("write config");
    let bulwark = Arc::new(Bulwark::start_with_file(&path).await);
    assert_eq!(bulwark.get("/products/1").await.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(set_mode(&bulwark, "search", "off").await.status, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let load = {
        let (b, stop, failures) = (bulwark.clone(), stop.clone(), failures.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if b.get("/products/1").await.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // A new route, written the way editors do: a new file renamed over the old one.
    let new_route = "name = \"cart\"\npath_prefix = \"/cart\"\npool = \"pdp\"\norigin = \"catalog\"";
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, config(&origin.url(), None).with_route(new_route).to_toml()).expect("write");
    std::fs::rename(&tmp, &path).expect("rename");
    let deadline = Instant::now() + Duration::from_secs(5);
    while bulwark.get("/cart").await.status != 200 {
        assert!(Instant::now() < deadline, "the new route never went live");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The unchanged pool kept its L1; the route kept its runtime mode (the file does not set one).
    assert_eq!(bulwark.get("/products/1").await.cache_status(), "bulwark; hit; detail=l1");
    assert_eq!(bulwark.get("/search").await.status, 503);
    assert_eq!(bulwark.metric("bulwark_config_reloads_total", &[("result", "ok")]).await, 1.0);

    // A broken file: rejected with the same message as `bulwark check`, nothing changes.
    std::fs::write(&path, "[[routes]]\nname = 1\n").expect("write broken");
    let answer = bulwark.admin_send(Method::POST, "/admin/reload", "").await;
    assert_eq!(answer.status, 400);
    assert!(answer.text().contains(&format!("{}:2:8", path.display())), "{}", answer.text());
    assert_eq!(bulwark.get("/cart").await.status, 200);
    assert!(bulwark.metric("bulwark_config_reloads_total", &[("result", "error")]).await >= 1.0);

    stop.store(true, Ordering::Relaxed);
    load.await.expect("load");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no request failed during the reloads");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_mode_survives_an_unrelated_reload_and_yields_to_a_changed_file_value() {
    let origin = Origin::start().await;
    let path = std::env::temp_dir().join(format!("bulwark-modes-{}-{}.toml", std::process::id(), support::free_port()));
    let write = |mode: &str, extra_route: bool| {
        let mut text = config(&origin.url(), None).route("mode", mode);
        if extra_route {
            text = text.with_route("name = \"cart\"\npath_prefix = \"/cart\"\npool = \"pdp\"\norigin = \"catalog\"");
        }
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text.to_toml()).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
    };
    write("normal", false);
    let bulwark = Bulwark::start_with_file(&path).await;
    assert_eq!(set_mode(&bulwark, "search", "fallback").await.status, 200);
    // An unrelated edit to a file that says mode = "normal" for the route.
    write("normal", true);
    assert_eq!(bulwark.admin_send(Method::POST, "/admin/reload", "").await.status, 200);
    assert_eq!(bulwark.get("/cart").await.status, 200, "the edit applied");
    let got = bulwark.get("/search?q=x").await;
    assert_eq!(got.cache_status(), "bulwark; detail=fallback", "the operator's switch held through an unrelated reload");
    // The file's value for the route changes: it applies.
    write("cache-only", true);
    assert_eq!(bulwark.admin_send(Method::POST, "/admin/reload", "").await.status, 200);
    let routes: serde_json::Value = serde_json::from_slice(&bulwark.admin("/admin/routes").await.body).expect("json");
    let search = routes["routes"].as_array().and_then(|r| r.iter().find(|r| r["name"] == "search")).cloned().expect("search route");
    assert_eq!(search["mode"], "cache-only", "{routes}");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_the_changed_settings_that_need_a_restart() {
    let origin = Origin::start().await;
    let path = std::env::temp_dir().join(format!("bulwark-restart-{}-{}.toml", std::process::id(), support::free_port()));
    // As the test instance listens (it binds free ports itself).
    let base = || config(&origin.url(), None).server("listen", "127.0.0.1:0").server("admin_listen", "127.0.0.1:0");
    std::fs::write(&path, base().to_toml()).expect("write");
    let bulwark = Bulwark::start_with_file(&path).await;
    let reload = async || serde_json::from_slice::<serde_json::Value>(&bulwark.admin_send(Method::POST, "/admin/reload", "").await.body).expect("json");
    assert_eq!(reload().await["restart_required"], serde_json::json!([]), "nothing changed");
    let moved = base().server("listen", "127.0.0.1:1").server("drain_delay", "3s").route("priority", "low");
    std::fs::write(&path, moved.to_toml()).expect("write");
    let answer = reload().await;
    assert_eq!(answer["reloaded"], true, "{answer}");
    assert_eq!(answer["restart_required"], serde_json::json!(["server.listen", "server.drain_delay"]), "{answer}");
    // Still serving where it listened; what could apply did.
    assert_eq!(bulwark.get("/products/1").await.status, 200);
    let routes: serde_json::Value = serde_json::from_slice(&bulwark.admin("/admin/routes").await.body).expect("json");
    assert!(routes["routes"].as_array().expect("routes").iter().any(|r| r["priority"] == "low"), "{routes}");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn a_fallback_that_says_how_long_it_may_be_kept_keeps_its_cache_control() {
    let origin = Origin::start().await;
    let text = TestConfig::new(&origin.url())
        .route_toml(r#"fallback = { status = 200, headers = { "cache-control" = "public, max-age=5" }, body = "later" }"#)
        .route("mode", "fallback")
        .to_toml();
    let bulwark = Bulwark::start(&text).await;
    let got = bulwark.get("/anything").await;
    assert_eq!((got.text(), got.header("cache-control")), ("later", Some("public, max-age=5")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_json_sums_the_replicas_metrics() {
    let origin = Origin::start().await;
    let text = config(&origin.url(), None).to_toml();
    let (one, two) = (Bulwark::start(&text).await, Bulwark::start(&text).await);
    for i in 0..30 {
        one.get(&format!("/products/{}", i % 7)).await;
    }
    for i in 0..12 {
        two.get(&format!("/products/{}", i % 5)).await;
        two.get("/search?q=x").await;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["top", "--once", "--json"])
        .args(["--admin", &format!("http://{}", one.admin_addr)])
        .args(["--admin", &format!("http://{}", two.admin_addr)])
        .output()
        .expect("run bulwark top");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let snapshot: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(snapshot["replicas"], 2);
    let (m1, m2) = (one.metrics().await, two.metrics().await);
    let summed = |name: &str, labels: &[(&str, &str)]| support::metric_value(&m1, name, labels) + support::metric_value(&m2, name, labels);
    for route in ["products", "search"] {
        let requests = snapshot["routes"][route]["requests"].as_f64().expect("requests");
        assert_eq!(requests, summed("bulwark_requests_total", &[("route", route)]), "{route}");
        for outcome in ["miss", "hit_l1"] {
            let value = snapshot["routes"][route]["outcomes"][outcome].as_f64().unwrap_or(0.0);
            assert_eq!(value, summed("bulwark_requests_total", &[("route", route), ("cache", outcome)]), "{route} {outcome}");
        }
        let origin_requests = snapshot["routes"][route]["origin_requests"].as_f64().expect("origin");
        assert_eq!(origin_requests, summed("bulwark_origin_requests_total", &[("route", route)]));
    }
    assert_eq!(snapshot["routes"]["products"]["requests"], 42.0);
    assert_eq!(snapshot["pools"]["pdp"]["requests"], 54.0);
    // The live view renders too (one frame, as text).
    let text_out = std::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["top", "--once", "--admin", &format!("http://{}", one.admin_addr)])
        .output()
        .expect("run bulwark top");
    let text = String::from_utf8_lossy(&text_out.stdout);
    assert!(text.contains("products") && text.contains("hit ratio"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_shows_ratios_over_its_interval_so_a_pool_missing_now_shows_zero() {
    let origin = Origin::start().await;
    let bulwark = std::sync::Arc::new(Bulwark::start(&config(&origin.url(), None).to_toml()).await);
    // A high hit ratio since the start...
    for _ in 0..200 {
        bulwark.get("/products/1").await;
    }
    // ...and nothing but misses while top measures.
    let stop = Arc::new(AtomicBool::new(false));
    let misses = {
        let (bulwark, stop) = (bulwark.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                bulwark.get(&format!("/products/new-{i}")).await;
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let admins = format!("http://{},http://{}", bulwark.admin_addr, bulwark.admin_addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
            .args(["top", "--once", "--interval", "1s", "--admin", &admins])
            .output()
            .expect("run bulwark top")
    })
    .await
    .expect("join");
    stop.store(true, Ordering::Relaxed);
    misses.await.expect("misses");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("rates over the last interval"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let row = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} row:\n{text}")).to_owned();
    let products = row("products ");
    assert!(products.split_whitespace().nth(3) == Some("0.0%"), "the route's hit ratio over the interval: {products}");
    let pool = row("pdp ");
    assert!(pool.split_whitespace().nth(2) == Some("0.0%"), "the pool's hit ratio over the interval, not since the start: {pool}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_a_thousand_urls_within_its_concurrency_limit() {
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(format!("page {}", parts.uri.path())).delay(Duration::from_millis(5)));
    let bulwark = Bulwark::start(&config(&origin.url(), None).to_toml()).await;
    let list: String = (0..1000).map(|i| format!("http://shop.example/products/{i}\n")).collect();
    let path = std::env::temp_dir().join(format!("bulwark-warm-{}-{}.txt", std::process::id(), support::free_port()));
    std::fs::write(&path, format!("# warm list\n\n{list}")).expect("write list");
    let run = |path: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
            .args(["warm", "--target", &format!("http://{}", bulwark.addr), "--concurrency", "8", "--rate", "0", "--accept-encoding", "gzip", "--urls"])
            .arg(path)
            .output()
            .expect("run bulwark warm")
    };
    let first = run(&path);
    let summary = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(first.status.success(), "{summary}\n{}", String::from_utf8_lossy(&first.stderr));
    assert!(summary.contains("1000 URLs, 1000 requests: 1000 stored, 0 already fresh, 0 answered but not stored, 0 failed"), "{summary}");
    assert_eq!(origin.total(), 1000);
    let max = origin.log.max_inflight.load(Ordering::SeqCst);
    assert!(max <= 8, "the origin saw {max} requests at once with --concurrency 8");
    assert!(max >= 2, "requests did run concurrently ({max})");
    // Entries are stored under the listed host: a client asking for it gets hits.
    assert_eq!(bulwark.get_with("/products/7", &[("host", "shop.example"), ("accept-encoding", "gzip")]).await.cache_status(), "bulwark; hit; detail=l1");
    let second = run(&path);
    assert!(String::from_utf8_lossy(&second.stdout).contains("1000 URLs, 1000 requests: 0 stored, 1000 already fresh"));
    // A bad URL is reported with its reason and a non-zero exit.
    std::fs::write(&path, "http://shop.example/ok\nnot a url\n").expect("write");
    let bad = run(&path);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("failed (1): not a URL"), "{}", String::from_utf8_lossy(&bad.stdout));
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_fills_what_browsers_behind_the_load_balancer_will_ask_for() {
    let origin = Origin::start().await;
    // Behind an ALB: X-Forwarded-Proto is believed, and https pages are keyed apart.
    let bulwark = Bulwark::start(&config(&origin.url(), None).server("trusted_proxies", vec!["127.0.0.1/32"]).to_toml()).await;
    let path = std::env::temp_dir().join(format!("bulwark-warm-{}-{}.txt", std::process::id(), support::free_port()));
    std::fs::write(&path, "https://shop.example/products/1\nhttps://shop.example/products/2\n").expect("write list");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["warm", "--target", &format!("http://{}", bulwark.addr), "--rate", "0", "--header", "X-Country: de", "--urls"])
        .arg(&path)
        .output()
        .expect("run bulwark warm");
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{summary}{}", String::from_utf8_lossy(&out.stderr));
    // The origin makes br and gzip: browsers' value, only gzip and none are three groups;
    // with zstd added it is the browsers' group again.
    assert!(summary.contains("2 URLs, 8 requests: 6 stored, 2 already fresh"), "{summary}");
    assert!(summary.contains("Accept-Encoding: gzip, deflate, br: 2 stored"), "{summary}");
    assert!(summary.contains("Accept-Encoding: gzip, deflate, br, zstd: 0 stored, 2 already fresh"), "{summary}");
    assert!(summary.contains("no Accept-Encoding: 2 stored"), "{summary}");
    assert_eq!(origin.total(), 6);
    assert_eq!(origin.last_request().0.headers.get("x-country").and_then(|v| v.to_str().ok()), Some("de"), "--header is sent");
    // A browser's request through the load balancer is a hit.
    let browser = [("host", "shop.example"), ("x-forwarded-proto", "https"), ("accept-encoding", "gzip, deflate, br")];
    assert_eq!(bulwark.get_with("/products/1", &browser).await.cache_status(), "bulwark; hit; detail=l1");
    let _ = std::fs::remove_file(&path);
}

/// Runs `bulwark serve` with `server_extra` in [server], sends `n` GETs over `keys`
/// keys, stops it, and returns its stdout lines.
async fn access_log_lines(origin: &Origin, server_extra: &str, n: usize, keys: usize) -> Vec<String> {
    use std::io::Read;
    let text = config(&origin.url(), None).server_toml(server_extra).to_toml();
    let mut serve = support::ServeProcess::start(&text, std::process::Stdio::piped(), std::process::Stdio::null()).await;
    let client = support::client();
    for i in 0..n {
        let res = client.get(serve.url(&format!("/products/{}", i % keys)).parse().expect("uri")).await.expect("request");
        let _ = http_body_util::BodyExt::collect(res.into_body()).await;
    }
    serve.signal("-TERM");
    let mut out = String::new();
    serve.child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read");
    let _ = serve.child.wait();
    out.lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_json_text_and_sampling() {
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(format!("page {}", parts.uri.path())).delay(Duration::from_millis(3)));
    let lines = access_log_lines(&origin, "access_log = \"json\"", 100, 10).await;
    assert_eq!(lines.len(), 100);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).expect("json line");
    assert_eq!((first["method"].as_str(), first["target"].as_str(), first["status"].as_u64()), (Some("GET"), Some("/products/0"), Some(200)));
    assert_eq!((first["route"].as_str(), first["pool"].as_str(), first["cache"].as_str()), (Some("products"), Some("pdp"), Some("miss")));
    assert!(first["origin_us"].as_u64().is_some_and(|us| us >= 3000), "{first}");
    assert!(first["total_us"].as_u64().is_some_and(|t| t >= first["origin_us"].as_u64().unwrap_or(0)));
    let hits = lines.iter().filter(|l| l.contains("\"cache\":\"hit_l1\"")).count();
    assert_eq!(hits, 90);

    let text = access_log_lines(&origin, "access_log = \"text\"\naccess_log_sample = 0.25", 400, 10).await;
    assert!((40..=180).contains(&text.len()), "sampled {} of 400 at 0.25", text.len());
    assert!(text.iter().all(|l| l.contains(" GET ") && l.contains("route=products") && l.contains("cache=")), "{:?}", text.first());
    assert!(access_log_lines(&origin, "", 20, 10).await.is_empty(), "off by default");
}

/// A config file of its own, removed on drop.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let path = std::env::temp_dir().join(format!("bulwark-operate-{}-{}.toml", std::process::id(), support::free_port()));
        std::fs::write(&path, text).expect("write config");
        ConfigFile(path)
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).expect("write config");
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_shrinks_l1_keeps_the_most_recently_used_entries_and_drops_none_needlessly() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("x".repeat(10_000)));
    let text = |l1: &str, ttl: &str| config(&origin.url(), None).pool("l1_max_bytes", l1).pool("default_ttl", ttl).to_toml();
    let file = ConfigFile::new(&text("1MiB", "10m"));
    let bulwark = Bulwark::start_with_file(&file.0).await;
    for i in 0..20 {
        assert_eq!(bulwark.get(&format!("/products/{i}")).await.cache_status(), "bulwark; fwd=miss; stored");
    }
    // Five of them used again, later than the others.
    bulwark.advance(Duration::from_secs(5));
    for i in 15..20 {
        assert_eq!(bulwark.get(&format!("/products/{i}")).await.cache_status(), "bulwark; hit; detail=l1");
    }

    // Freshness changed only: everything kept.
    file.write(&text("1MiB", "20m"));
    assert_eq!(bulwark.admin_send(Method::POST, "/admin/reload", "").await.status, 200);
    for i in 0..20 {
        assert_eq!(bulwark.get(&format!("/products/{i}")).await.cache_status(), "bulwark; hit; detail=l1", "/products/{i}");
    }
    bulwark.advance(Duration::from_secs(5));
    for i in 15..20 {
        bulwark.get(&format!("/products/{i}")).await;
    }

    // L1 shrunk to room for about nine of the twenty: the five used last are among them.
    file.write(&text("100KiB", "20m"));
    assert_eq!(bulwark.admin_send(Method::POST, "/admin/reload", "").await.status, 200);
    for i in 15..20 {
        assert_eq!(bulwark.get(&format!("/products/{i}")).await.cache_status(), "bulwark; hit; detail=l1", "/products/{i}");
    }
    let kept = (0..15).filter(|i| origin.count(&format!("/products/{i}")) == 1).count();
    let mut refetched = 0;
    for i in 0..15 {
        if bulwark.get(&format!("/products/{i}")).await.cache_status() != "bulwark; hit; detail=l1" {
            refetched += 1;
        }
    }
    assert_eq!(kept, 15, "nothing refetched before these requests");
    assert!(refetched >= 10, "L1 did not shrink: only {refetched} of 15 older entries were dropped");
    assert!(refetched < 15, "room was left over but no older entry kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_freshness_keeps_l1_and_confirms_each_entry_against_redis() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let text = |ttl: &str| config(&origin.url(), None).redis(&redis.url()).pool("default_ttl", ttl).to_toml();
    let file = ConfigFile::new(&text("10m"));
    let bulwark = Bulwark::start_with_file(&file.0).await;
    bulwark.wait_for_subscription().await;
    for i in 0..5 {
        assert_eq!(bulwark.get(&format!("/products/{i}")).await.cache_status(), "bulwark; fwd=miss; stored");
    }
    support::eventually("five entries in Redis", Duration::from_secs(5), async || redis.entries("bulwark:pdp:").len() == 5).await;
    file.write(&text("20m"));
    assert_eq!(bulwark.admin_send(Method::POST, "/admin/reload", "").await.status, 200);
    // Gone from Redis while the new pool's link was not yet up (a purge it could have
    // missed): the L1 copy is not served.
    let mut conn = redis.conn();
    for key in redis.entries("bulwark:pdp:") {
        let value: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut conn).expect("GET");
        if value.windows(11).any(|w| w == b"/products/3") {
            let _: i64 = redis::cmd("DEL").arg(&key).query(&mut conn).expect("DEL");
        }
    }
    for i in [0, 1, 2, 4] {
        assert_eq!(bulwark.get(&format!("/products/{i}")).await.cache_status(), "bulwark; hit; detail=l1", "/products/{i}");
        assert_eq!(origin.count(&format!("/products/{i}")), 1);
    }
    assert_eq!(bulwark.get("/products/3").await.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(origin.count("/products/3"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_still_being_written_is_not_applied_until_it_settles() {
    let origin = Origin::start().await;
    let file = ConfigFile::new(&config(&origin.url(), None).to_toml());
    let bulwark = Bulwark::start_with_file(&file.0).await;
    // A slow writer: the file changes every 100 ms for 2.5 s, each version valid on its
    // own (a file cut short often is), then its final version.
    let partial = config(&origin.url(), None).with_route("name = \"partial\"\npath_prefix = \"/partial\"\npool = \"pdp\"\norigin = \"catalog\"");
    for n in 0..25 {
        file.write(&format!("{}\n# written so far: {n}\n", partial.to_toml()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = config(&origin.url(), None).with_route("name = \"cart\"\npath_prefix = \"/cart\"\npool = \"pdp\"\norigin = \"catalog\"");
    file.write(&done.to_toml());
    support::eventually("the final version applied", Duration::from_secs(5), async || bulwark.get("/cart").await.status == 200).await;
    assert_eq!(bulwark.metric("bulwark_config_reloads_total", &[("result", "ok")]).await, 1.0, "a version caught mid-write was applied");
}
