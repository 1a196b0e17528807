//! `/stats.json` and `/dashboard`: the last 15 minutes per route and pool, sampled once a
//! second inside the replica, drawn by a page that loads nothing but its own origin
//! (checked in a real headless Chromium).

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::{Bulwark, Origin, TestConfig};

const ROUTES: [&str; 3] = ["all", "products", "search"];

fn config(origin: &Origin) -> TestConfig {
    TestConfig::new(&origin.url())
        .with_route("name = \"products\"\npath_prefix = \"/products/\"\npool = \"pdp\"\norigin = \"catalog\"")
        .with_route("name = \"search\"\npath_prefix = \"/search\"\npool = \"pdp\"\norigin = \"catalog\"")
}

/// Requests to every route until `stop` is set: a few hot pages and some misses.
fn load(bulwark: Arc<Bulwark>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for path in ["/home", "/products/1", "/search?q=shoes"] {
                bulwark.get(path).await;
            }
            bulwark.get(&format!("/products/new-{i}")).await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

async fn stats(bulwark: &Bulwark, query: &str) -> (u16, Value) {
    let got = bulwark.admin(&format!("/stats.json{query}")).await;
    (got.status.as_u16(), serde_json::from_str(got.text()).unwrap_or(Value::Null))
}

/// The newest non-null value of a series.
fn newest(series: &Value) -> Option<f64> {
    series.as_array()?.iter().rev().find_map(Value::as_f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_json_holds_per_second_series_for_every_route_and_pool() {
    let origin = Origin::start().await;
    let bulwark = Arc::new(Bulwark::start(&config(&origin).to_toml()).await);
    let stop = Arc::new(AtomicBool::new(false));
    let task = load(bulwark.clone(), stop.clone());
    support::eventually("three points of history", Duration::from_secs(10), async || stats(&bulwark, "").await.1["points"].as_u64() >= Some(3)).await;
    stop.store(true, Ordering::Relaxed);
    task.await.expect("load");
    let (status, answer) = stats(&bulwark, "?window=60s").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["step_s"], 1);
    let points = answer["points"].as_u64().expect("points") as usize;
    for route in ROUTES {
        let series = &answer["routes"][route];
        for name in ["rps", "hit_ratio", "origin_rps", "origin_errors", "shed", "limited", "p99_ms"] {
            assert_eq!(series[name].as_array().map(Vec::len), Some(points), "{route}.{name} lines up with the others: {answer}");
        }
        assert!(newest(&series["rps"]).is_some_and(|v| v > 0.0), "{route}: {answer}");
        assert!(newest(&series["p99_ms"]).is_some_and(|v| v > 0.0), "{route}: {answer}");
    }
    // The hot pages are hits; the products route also misses every new id.
    assert!(newest(&answer["routes"]["search"]["hit_ratio"]).is_some_and(|r| r > 0.9), "{answer}");
    assert!(newest(&answer["routes"]["products"]["origin_rps"]).is_some_and(|r| r > 0.0), "{answer}");
    assert!(newest(&answer["pools"]["pdp"]["hit_ratio"]).is_some_and(|r| r > 0.0 && r < 1.0), "{answer}");
    assert_eq!(answer["modes"]["search"], "normal");
    assert_eq!(answer["breakers"]["origins"]["catalog"], false);
    let (_, short) = stats(&bulwark, "?window=2s").await;
    assert_eq!(short["routes"]["all"]["rps"].as_array().map(Vec::len), Some(2), "{short}");
    for bad in ["?window=901s", "?window=0s", "?window=soon", "?span=60s"] {
        let (status, answer) = stats(&bulwark, bad).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert!(answer["error"].is_string(), "{bad}: {answer}");
    }
}

#[tokio::test]
async fn the_dashboard_is_one_self_contained_page() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&config(&origin).to_toml()).await;
    let got = bulwark.admin("/dashboard").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(got.header("content-security-policy").is_some_and(|csp| csp.contains("default-src 'none'") && csp.contains("connect-src 'self'")));
    let page = got.text();
    for external in ["http://", "https://", "//cdn", "@import", "<link"] {
        let outside: Vec<&str> = page.lines().filter(|l| l.contains(external) && !l.contains("http://www.w3.org/2000/svg")).collect();
        assert!(outside.is_empty(), "the page refers outside itself ({external}): {outside:?}");
    }
    // Open like /metrics, even with an admin token set for /admin/*.
    assert_eq!(bulwark.admin("/stats.json").await.status, 200);
}

fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|path| path.is_file())))
        .expect("headless Chromium is needed for this test: apt-get install chromium (.ci/run installs it)")
}

/// Runs headless Chromium on `url` with `args`, its profile and net log in `dir`.
fn run_chromium(dir: &std::path::Path, url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions"])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs")
}

/// Every URL the net log says the page at `origin` asked for (the browser's own
/// requests, for updates and the like, have no page as their initiator).
fn requested_by_page(net_log: &Value, origin: &str) -> Vec<String> {
    let mut urls = Vec::new();
    for event in net_log["events"].as_array().into_iter().flatten() {
        let params = &event["params"];
        if let (Some(url), Some(initiator)) = (params["url"].as_str(), params["initiator"].as_str())
            && initiator == origin
        {
            urls.push(url.to_owned());
        }
    }
    urls
}

/// The `points` of the polylines in the chart of `owner`'s `metric`.
fn chart_points(dom: &str, owner: &str, metric: &str) -> Vec<usize> {
    dom.split("<svg ")
        .filter(|svg| {
            let head = svg.split('>').next().unwrap_or("");
            head.contains(&format!("data-owner=\"{owner}\"")) && head.contains(&format!("data-metric=\"{metric}\""))
        })
        .flat_map(|svg| {
            let body = svg.split("</svg>").next().unwrap_or("");
            body.split("points=\"").skip(1).map(|p| p.split('"').next().unwrap_or("").split_whitespace().count()).collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_draws_every_routes_charts_from_its_own_origin_only() {
    let origin = Origin::start().await;
    let bulwark = Arc::new(Bulwark::start(&config(&origin).to_toml()).await);
    let stop = Arc::new(AtomicBool::new(false));
    let task = load(bulwark.clone(), stop.clone());
    support::eventually("some history to draw", Duration::from_secs(10), async || stats(&bulwark, "").await.1["points"].as_u64() >= Some(3)).await;

    let dir = std::env::temp_dir().join(format!("bulwark-dashboard-{}-{}", std::process::id(), support::free_port()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let base = format!("http://{}", bulwark.admin_addr);
    let url = format!("{base}/dashboard");
    let net_log = dir.join("net-log.json");
    let (dir2, url2, net_log2) = (dir.clone(), url.clone(), net_log.clone());
    let dom = tokio::task::spawn_blocking(move || {
        run_chromium(&dir2, &url2, &["--virtual-time-budget=5000", &format!("--log-net-log={}", net_log2.display()), "--dump-dom"])
    })
    .await
    .expect("chromium");
    let screenshot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join("dashboard.png");
    let (dir3, url3, shot) = (dir.clone(), url.clone(), screenshot.clone());
    let shot_run = tokio::task::spawn_blocking(move || {
        run_chromium(&dir3, &url3, &["--virtual-time-budget=5000", "--window-size=1400,1000", &format!("--screenshot={}", shot.display())])
    })
    .await
    .expect("chromium");
    stop.store(true, Ordering::Relaxed);
    task.await.expect("load");

    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.status.success() && html.contains("data-route="), "no charts drawn: {}\n{html}", String::from_utf8_lossy(&dom.stderr));
    for route in ROUTES {
        for metric in ["rps", "hit_ratio", "p99_ms"] {
            let points = chart_points(&html, route, metric);
            assert!(!points.is_empty() && points.iter().all(|n| *n >= 2), "{route} {metric}: polylines with {points:?} points");
        }
    }
    assert!(!chart_points(&html, "pdp", "hit_ratio").is_empty(), "the pool's chart");

    let log: Value = serde_json::from_slice(&std::fs::read(&net_log).expect("net log written")).expect("net log is JSON");
    let urls = requested_by_page(&log, &base);
    assert!(urls.iter().any(|u| u.starts_with(&format!("{base}/stats.json"))), "the page read stats.json: {urls:?}");
    let elsewhere: Vec<&String> = urls.iter().filter(|u| !u.starts_with(&format!("{base}/"))).collect();
    assert!(elsewhere.is_empty(), "the page asked for something besides its own origin: {elsewhere:?}");
    assert!(shot_run.status.success() && screenshot.is_file(), "screenshot: {}", String::from_utf8_lossy(&shot_run.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_routes_each_get_their_charts_busiest_first() {
    let origin = Origin::start().await;
    let mut config = TestConfig::new(&origin.url());
    for i in 0..49 {
        config = config.with_route(&format!("name = \"r{i:02}\"\npath_prefix = \"/r{i:02}/\"\npool = \"pdp\"\norigin = \"catalog\""));
    }
    let bulwark = Arc::new(Bulwark::start(&config.to_toml()).await);
    let stop = Arc::new(AtomicBool::new(false));
    let task = {
        let (bulwark, stop) = (bulwark.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // r00 by far the busiest, then fewer and fewer down to one per round.
                for i in 0..49usize {
                    let n = if i == 0 { 20 } else { (49 - i).div_ceil(10) };
                    for _ in 0..n {
                        bulwark.get(&format!("/r{i:02}/page")).await;
                    }
                }
                bulwark.get("/other").await;
            }
        })
    };
    support::eventually("some history to draw", Duration::from_secs(10), async || stats(&bulwark, "").await.1["points"].as_u64() >= Some(3)).await;
    let dir = std::env::temp_dir().join(format!("bulwark-dashboard-{}-{}", std::process::id(), support::free_port()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let url = format!("http://{}/dashboard", bulwark.admin_addr);
    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join("dashboard-50-routes.png");
    let (dir2, url2, shot2) = (dir.clone(), url.clone(), shot.clone());
    let (dom, shot_run) = tokio::task::spawn_blocking(move || {
        (
            run_chromium(&dir2, &url2, &["--virtual-time-budget=5000", "--dump-dom"]),
            run_chromium(&dir2, &url2, &["--virtual-time-budget=5000", "--window-size=1400,1800", &format!("--screenshot={}", shot2.display())]),
        )
    })
    .await
    .expect("chromium");
    stop.store(true, Ordering::Relaxed);
    task.await.expect("load");
    let html = String::from_utf8_lossy(&dom.stdout);
    let cards: Vec<&str> = html.split("data-route=\"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
    assert_eq!(cards.len(), 50, "a card per route: {cards:?}");
    assert_eq!(cards.first(), Some(&"r00"), "the busiest route first: {cards:?}");
    for route in &cards {
        assert!(chart_points(&html, route, "rps").iter().any(|n| *n >= 2), "{route}: no requests/s drawn");
    }
    assert!(html.contains("50 of 50"), "the count of routes shown");
    assert!(shot_run.status.success() && shot.is_file());
    let _ = std::fs::remove_dir_all(&dir);
}
