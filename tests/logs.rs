//! What an outage writes to the log: lines that name their pool and origin, an origin
//! that cannot be reached logged at warn, and warnings that would repeat with every
//! request or probe written once per period, saying how many were left out.

mod support;

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use support::{ServeProcess, TestConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_logs_each_failure_once_per_period_naming_its_origin_and_pool() {
    let dead_origin = format!("http://127.0.0.1:{}", support::free_port());
    let dead_redis = format!("redis://127.0.0.1:{}/0", support::free_port());
    let config = TestConfig::new(&dead_origin).redis(&dead_redis).pool("redis_breaker_probe_interval", "100ms").origin("retries", 0).to_toml();
    let mut serve = ServeProcess::start(&config, Stdio::null(), Stdio::piped()).await;
    let client = support::client();
    // Two seconds of requests to a dead origin through a dead Redis: every one fails to
    // connect, and the Redis breaker is probed twenty times.
    let start = std::time::Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(2) {
        let res = client.get(serve.url(&format!("/products/{sent}")).parse().expect("uri")).await.expect("bulwark answers");
        assert!(matches!(res.status().as_u16(), 502 | 503), "a dead origin is a 502, then 503 once its breaker is open: {}", res.status());
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    serve.kill();
    let mut log = String::new();
    serve.child.stderr.take().expect("stderr").read_to_string(&mut log).expect("read the log");
    let lines = |text: &str| log.lines().filter(|l| l.contains(text)).collect::<Vec<_>>();
    assert!(!log.contains('\u{1b}'), "terminal colours in a log that goes to a collector:\n{log}");

    let unreachable = lines("origin request got no answer");
    assert_eq!(unreachable.len(), 1, "{sent} failed requests, one line per 10 s:\n{log}");
    assert!(unreachable[0].contains("WARN") && unreachable[0].contains("catalog"), "at warn, naming the origin: {}", unreachable[0]);
    let breaker = lines("Redis breaker open");
    assert_eq!(breaker.len(), 1, "{log}");
    assert!(breaker[0].contains("pdp"), "naming the pool: {}", breaker[0]);
    let origin_breaker = lines("origin breaker open");
    assert!(origin_breaker.len() <= 1 && origin_breaker.iter().all(|l| l.contains("catalog")), "{log}");
    assert!(lines("replacing").len() <= 1, "a probe a tenth of a second must not log each time:\n{log}");
    assert!(log.lines().count() < 30, "{sent} requests in an outage wrote {} lines:\n{log}", log.lines().count());
}
