//! A bulwark instance in this process on free ports, a client, metrics as tests read
//! them, and the configs most tests start from.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::TestConfig;
use super::eventually;

/// A bulwark instance running in this process on free ports.
pub struct Bulwark {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The clock the instance decides freshness by: [`Bulwark::advance`] moves it.
    pub clock: bulwark::clock::Clock,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), bulwark::RunError>>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A response as the tests look at it.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn cache_status(&self) -> &str {
        self.headers.get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<binary>")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build_http()
}

impl Bulwark {
    /// Starts an instance with `config` (TOML; `listen` and `admin_listen` are ignored).
    pub async fn start(config: &str) -> Bulwark {
        let config = bulwark::Config::parse(config, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"));
        Bulwark::launch(config, None).await
    }

    /// Starts an instance from a config file, with reloads (file watch, admin API).
    pub async fn start_with_file(path: &Path) -> Bulwark {
        let config = bulwark::Config::load(path).unwrap_or_else(|e| panic!("{e}"));
        Bulwark::launch(config, Some(path.to_owned())).await
    }

    async fn launch(mut config: bulwark::Config, path: Option<std::path::PathBuf>) -> Bulwark {
        // Free ports, bound as `bulwark serve` binds them (with the configured backlog).
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
        (config.server.listen, config.server.admin_listen) = (any, any);
        let listeners = bulwark::Listeners::bind(&config.server).await.expect("bind listeners");
        let addr = listeners.proxy.local_addr().expect("addr");
        let admin_addr = listeners.admin.local_addr().expect("admin addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async {
            let _ = rx.await;
        };
        let clock = bulwark::clock::Clock::adjustable();
        let task = tokio::spawn(bulwark::run_with(listeners, config, path, clock.clone(), shutdown));
        Bulwark { addr, admin_addr, clock, shutdown: Some(tx), task: Some(task), client: client() }
    }

    /// Moves the instance's wall time forward: what was stored is `by` older, as if the
    /// test had slept (deadlines and timeouts are not moved).
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Sends an admin request with a JSON body.
    pub async fn admin_send(&self, method: http::Method, path: &str, body: &str) -> Got {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.admin_addr, path))
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request");
        self.request(req).await
    }

    pub async fn request(&self, req: Request<Full<Bytes>>) -> Got {
        let res = self.client.request(req).await.expect("request to bulwark");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Got { status: parts.status, headers: parts.headers, body }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn get(&self, path: &str) -> Got {
        self.request(Request::get(self.url(path)).body(Full::default()).expect("request")).await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Got {
        let mut req = Request::get(self.url(path));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        self.request(req.body(Full::default()).expect("request")).await
    }

    pub async fn admin(&self, path: &str) -> Got {
        let req = Request::get(format!("http://{}{}", self.admin_addr, path)).body(Full::default()).expect("request");
        let res = self.client.request(req).await.expect("request to admin");
        let (parts, body) = res.into_parts();
        Got { status: parts.status, headers: parts.headers, body: body.collect().await.expect("body").to_bytes() }
    }

    pub async fn metrics(&self) -> String {
        self.admin("/metrics").await.text().to_owned()
    }

    /// The value of one sample in `/metrics`, 0 when absent. `labels` must all match.
    /// Waits until the pool `pdp`'s Redis event subscription is up (before that the
    /// instance misses purges and fill announcements).
    pub async fn wait_for_subscription(&self) {
        eventually("the event subscription comes up", Duration::from_secs(5), async || {
            self.metric("bulwark_redis_events_subscribed", &[("pool", "pdp")]).await == 1.0
        })
        .await;
    }

    /// Waits until the pool `pdp`'s event subscription has gone down and come back up
    /// (a gap), then until its read connection has noticed too: a few lookups of other
    /// keys (a timeout or an I/O error replaces a dead connection) and the Redis breaker
    /// closed, so that checks of L1's copies are answered rather than served as with an
    /// unreachable Redis.
    pub async fn until_resubscribed(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.metric("bulwark_redis_events_subscribed", &[("pool", "pdp")]).await == 1.0 {
            assert!(std::time::Instant::now() < deadline, "the subscription never noticed the gap");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.wait_for_subscription().await;
        for i in 0..4 {
            self.get_with(&format!("/warm-up/{i}"), &[("host", "shop.example")]).await;
        }
        eventually("the Redis breaker is closed", Duration::from_secs(5), async || self.metric("bulwark_redis_breaker_open", &[("pool", "pdp")]).await == 0.0)
            .await;
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), bulwark::RunError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("task").await.expect("bulwark task panicked")
    }

    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn wait(mut self) -> Result<(), bulwark::RunError> {
        self.task.take().expect("task").await.expect("bulwark task panicked")
    }
}

impl Drop for Bulwark {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Sums the samples of `name` whose labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A config with one origin, one pool (optionally with Redis) and one catch-all route;
/// `pool_extra` holds TOML `key = value` lines for the pool (see [`TestConfig`]).
pub fn simple_config(origin: &str, redis: Option<&str>, pool_extra: &str) -> String {
    let config = TestConfig::new(origin);
    let config = match redis {
        Some(url) => config.redis(url),
        None => config,
    };
    config.pool_toml(pool_extra).to_toml()
}

/// A config with one origin, one pool on a Redis Cluster and one catch-all route.
pub fn cluster_config(origin: &str, nodes: &[String], pool_extra: &str) -> String {
    TestConfig::new(origin).cluster(nodes).pool_toml(pool_extra).to_toml()
}
