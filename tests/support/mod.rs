//! Test support: a private `redis-server` per test on a free port, an in-process origin
//! that counts what it receives, and a bulwark instance on free ports.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A free TCP port on 127.0.0.1 (bound and released; good enough for a child process).
/// An entry stored just now under `key`, fresh for 10 minutes, with no stale windows:
/// for tests that plant entries in Redis directly.
pub fn fresh_entry(key: &str, headers: HeaderMap, body: &'static [u8]) -> bulwark::cache::Entry {
    let now = std::time::SystemTime::now();
    bulwark::cache::Entry {
        key: key.to_owned(),
        status: StatusCode::OK,
        headers,
        body: Bytes::from_static(body),
        request_time: now,
        response_time: now,
        initial_age: Duration::ZERO,
        freshness_lifetime: Duration::from_secs(600),
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        no_stale: false,
        stale_on_error_always: false,
        tags: Vec::new(),
        invalidated: false,
        keep_for_revalidation: Duration::ZERO,
        variants: false,
    }
}

/// Waits until `condition` holds, checking every 20 ms; panics naming `what` when it
/// does not within `limit` (never falls through silently).
pub async fn eventually(what: &str, limit: Duration, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A private redis-server, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer { port, child: None };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server (is it installed?)");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.ping() {
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn ping(&self) -> bool {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    /// A synchronous connection for planting and inspecting keys.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url()).and_then(|c| c.get_connection()).expect("redis connection")
    }

    pub fn keys(&self, pattern: &str) -> Vec<String> {
        redis::cmd("KEYS").arg(pattern).query(&mut self.conn()).expect("KEYS")
    }

    /// Stored entries of a pool (not its purge indexes or leases).
    pub fn entries(&self, prefix: &str) -> Vec<String> {
        self.keys(&format!("{prefix}v2:*")).into_iter().filter(|k| !k.contains(":idx:") && !k.contains(":lease:")).collect()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "redis-server did not restart on port {}", self.port);
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill").args([signal, &child.id().to_string()]).status().expect("kill");
            assert!(status.success());
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn stall(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// What the origin answers.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Duration,
    /// Send the body in this many chunks with this pause before each after the first.
    pub chunks: Option<(usize, Duration)>,
}

impl Reply {
    pub fn ok(body: impl Into<Bytes>) -> Reply {
        Reply { status: 200, headers: vec![("cache-control".into(), "max-age=60".into())], body: body.into(), delay: Duration::ZERO, chunks: None }
    }

    /// Streams the body (chunked, no Content-Length) in `n` chunks, `pause` apart.
    pub fn chunked(mut self, n: usize, pause: Duration) -> Reply {
        self.chunks = Some((n.max(1), pause));
        self
    }

    pub fn status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn without_header(mut self, name: &str) -> Reply {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Behaviour = Arc<dyn Fn(&http::request::Parts) -> Reply + Send + Sync>;

/// What the origin saw.
#[derive(Default)]
pub struct OriginLog {
    pub total: AtomicUsize,
    pub inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    pub per_path: Mutex<HashMap<String, usize>>,
    pub last_request: Mutex<Option<(http::request::Parts, Bytes)>>,
}

/// An in-process origin on a free port. By default it answers 200 with
/// `Cache-Control: max-age=60` and the body `body of <path and query>`.
pub struct Origin {
    pub addr: SocketAddr,
    pub log: Arc<OriginLog>,
    behaviour: Arc<Mutex<Behaviour>>,
    task: tokio::task::JoinHandle<()>,
    /// Open connections, so that stopping the origin closes them too.
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Origin {
    pub async fn start() -> Origin {
        Origin::start_on(TcpListener::bind("127.0.0.1:0").await.expect("bind origin")).await
    }

    pub async fn start_on(listener: TcpListener) -> Origin {
        let addr = listener.local_addr().expect("origin addr");
        let log = Arc::new(OriginLog::default());
        let behaviour: Arc<Mutex<Behaviour>> = Arc::new(Mutex::new(Arc::new(|parts: &http::request::Parts| {
            let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            Reply::ok(format!("body of {target}"))
        })));
        let (log2, behaviour2) = (log.clone(), behaviour.clone());
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let conns2 = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (log, behaviour) = (log2.clone(), behaviour2.clone());
                let conn = tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (log, behaviour) = (log.clone(), behaviour.clone());
                        async move { Ok::<_, Infallible>(answer(req, &log, &behaviour).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
                conns2.lock().expect("connections lock").push(conn.abort_handle());
            }
        });
        Origin { addr, log, behaviour, task, connections }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, behaviour: impl Fn(&http::request::Parts) -> Reply + Send + Sync + 'static) {
        *self.behaviour.lock().expect("behaviour lock") = Arc::new(behaviour);
    }

    pub fn total(&self) -> usize {
        self.log.total.load(Ordering::SeqCst)
    }

    pub fn count(&self, path_and_query: &str) -> usize {
        self.log.per_path.lock().expect("log lock").get(path_and_query).copied().unwrap_or(0)
    }

    pub fn last_request(&self) -> (http::request::Parts, Bytes) {
        self.log.last_request.lock().expect("log lock").clone().expect("origin saw a request")
    }

    /// Shuts the origin down: no listener, every open connection closed.
    pub fn stop(&self) {
        self.task.abort();
        for conn in self.connections.lock().expect("connections lock").drain(..) {
            conn.abort();
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A body sent in chunks with pauses between them.
struct SlowBody {
    chunks: std::collections::VecDeque<Bytes>,
    pause: Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for SlowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        use std::future::Future;
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            self.sleep = None;
        }
        let pause = self.pause;
        match self.chunks.pop_front() {
            Some(chunk) => {
                if !self.chunks.is_empty() {
                    self.sleep = Some(Box::pin(tokio::time::sleep(pause)));
                }
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
            }
            None => std::task::Poll::Ready(None),
        }
    }
}

type OriginResponseBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(req: Request<Incoming>, log: &OriginLog, behaviour: &Mutex<Behaviour>) -> Response<OriginResponseBody> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    log.total.fetch_add(1, Ordering::SeqCst);
    *log.per_path.lock().expect("log lock").entry(target).or_default() += 1;
    let now = log.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    log.max_inflight.fetch_max(now, Ordering::SeqCst);
    let behaviour = behaviour.lock().expect("behaviour lock").clone();
    let reply = behaviour(&parts);
    *log.last_request.lock().expect("log lock") = Some((parts, body));
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    log.inflight.fetch_sub(1, Ordering::SeqCst);
    let body = match reply.chunks {
        None => Full::new(reply.body).boxed(),
        Some((n, pause)) => {
            let size = reply.body.len().div_ceil(n).max(1);
            let chunks = reply.body.chunks(size).map(Bytes::copy_from_slice).collect();
            SlowBody { chunks, pause, sleep: None }.boxed()
        }
    };
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::from_u16(reply.status).expect("status");
    for (name, value) in reply.headers {
        res.headers_mut().append(http::HeaderName::from_bytes(name.as_bytes()).expect("name"), value.parse().expect("value"));
    }
    res
}

/// A bulwark instance running in this process on free ports.
pub struct Bulwark {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
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

    async fn launch(config: bulwark::Config, path: Option<std::path::PathBuf>) -> Bulwark {
        let listeners = bulwark::Listeners {
            proxy: TcpListener::bind("127.0.0.1:0").await.expect("bind proxy"),
            admin: TcpListener::bind("127.0.0.1:0").await.expect("bind admin"),
        };
        let addr = listeners.proxy.local_addr().expect("addr");
        let admin_addr = listeners.admin.local_addr().expect("admin addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async {
            let _ = rx.await;
        };
        let task = match path {
            Some(path) => tokio::spawn(bulwark::run_with_file(listeners, config, path, shutdown)),
            None => tokio::spawn(bulwark::run(listeners, config, shutdown)),
        };
        Bulwark { addr, admin_addr, shutdown: Some(tx), task: Some(task), client: client() }
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

/// A config with one origin, one pool (optionally with Redis) and one catch-all route.
pub fn simple_config(origin: &str, redis: Option<&str>, pool_extra: &str) -> String {
    let redis = redis.map(|url| format!("redis_url = \"{url}\"\nredis_timeout = \"50ms\"\n")).unwrap_or_default();
    format!(
        r#"
[server]
drain_delay = "0s"

[[origins]]
name = "catalog"
url = "{origin}"
timeout = "5s"

[[pools]]
name = "pdp"
{redis}{pool_extra}

[[routes]]
name = "all"
path_prefix = "/"
pool = "pdp"
origin = "catalog"
"#
    )
}

/// A TCP relay to `target` that can silently drop everything on the connections it has
/// open so far (as a failover or a lost NAT entry does), while new connections work.
pub struct BlackholeRelay {
    pub port: u16,
    generation: Arc<AtomicUsize>,
    dead_below: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackholeRelay {
    pub async fn start(target: u16) -> BlackholeRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("addr").port();
        let generation = Arc::new(AtomicUsize::new(0));
        let dead_below = Arc::new(AtomicUsize::new(0));
        let (g, d) = (generation.clone(), dead_below.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { continue };
                let id = g.fetch_add(1, Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, id, d.clone()));
                tokio::spawn(pump(sr, cw, id, d.clone()));
            }
        });
        BlackholeRelay { port, generation, dead_below, task }
    }

    /// Every connection open now goes silent for good; new ones work.
    pub fn blackhole_existing(&self) {
        self.dead_below.store(self.generation.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for BlackholeRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, id: usize, dead_below: Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if id < dead_below.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A six-node Redis Cluster (three primaries, three replicas) on free ports, in its own
/// temporary directory; every node killed on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisClusterNode>,
    dir: std::path::PathBuf,
}

pub struct RedisClusterNode {
    pub port: u16,
    child: Option<Child>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(format!("bulwark-cluster-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            nodes.push(RedisClusterNode { port, child: Some(child) });
        }
        let cluster = RedisCluster { nodes, dir };
        for node in &cluster.nodes {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !node.ping() {
                assert!(Instant::now() < deadline, "cluster node {} did not start", node.port);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addrs: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        cluster.wait_until_ok();
        // Replicas can take over only once their replication link is up.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let linked = cluster
                .nodes
                .iter()
                .map(|n| n.replication())
                .filter(|info| info.contains("role:slave"))
                .filter(|info| info.contains("master_link_status:up"))
                .count();
            if linked == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "replicas did not attach in 30s");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect()
    }

    /// Waits until every live node reports `cluster_state:ok` and all of them agree.
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let live: Vec<&RedisClusterNode> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
            if live.iter().all(|n| n.info().contains("cluster_state:ok")) {
                return;
            }
            if Instant::now() > deadline {
                let nodes: String = live.first().map(|n| redis::cmd("CLUSTER").arg("NODES").query(&mut n.conn()).unwrap_or_default()).unwrap_or_default();
                panic!("cluster not ok in 30s:\n{nodes}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ports of the current primaries, from a live node's view.
    pub fn primaries(&self) -> Vec<u16> {
        let node = self.nodes.iter().find(|n| n.child.is_some()).expect("a live node");
        let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut node.conn()).expect("CLUSTER NODES");
        text.lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| l.split_whitespace().nth(1)?.split('@').next()?.rsplit(':').next()?.parse().ok())
            .collect()
    }

    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port)
            && let Some(mut child) = node.child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl RedisClusterNode {
    fn conn(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
            .expect("node connection")
    }

    fn ping(&self) -> bool {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    fn replication(&self) -> String {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("INFO").arg("replication").query::<String>(&mut c))
            .unwrap_or_default()
    }

    fn info(&self) -> String {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
            .unwrap_or_default()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A config with one origin, one pool on a Redis Cluster and one catch-all route.
pub fn cluster_config(origin: &str, nodes: &[String], pool_extra: &str) -> String {
    let list = nodes.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ");
    simple_config(origin, None, &format!("redis_cluster_nodes = [{list}]\nredis_timeout = \"100ms\"\n{pool_extra}"))
}

/// A `bulwark serve` process on free ports, from a config written to a temporary file;
/// killed (and its file removed) on drop.
pub struct ServeProcess {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub config: std::path::PathBuf,
}

impl ServeProcess {
    /// Starts `bulwark serve` on `config` (its `[server]` section gets the listen
    /// addresses) and waits until `/healthz` answers.
    pub async fn start(config: &str, stdout: Stdio, stderr: Stdio) -> ServeProcess {
        let (port, admin_port) = (free_port(), free_port());
        let text = config.replace("[server]\n", &format!("[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n"));
        let path = std::env::temp_dir().join(format!("bulwark-serve-{}-{port}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write config");
        let child = Command::new(env!("CARGO_BIN_EXE_bulwark"))
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn bulwark serve");
        let process = ServeProcess { child, port, admin_port, config: path };
        let client = client();
        let health = format!("http://127.0.0.1:{admin_port}/healthz");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client.get(health.parse().expect("uri")).await.is_ok_and(|r| r.status() == 200) {
            assert!(Instant::now() < deadline, "bulwark serve did not come up");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        process
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `/metrics` of the process, or `None` if it does not answer.
    pub async fn metrics(&self) -> Option<String> {
        let res = client().get(format!("http://127.0.0.1:{}/metrics", self.admin_port).parse().ok()?).await.ok()?;
        let body = res.into_body().collect().await.ok()?.to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill {signal}");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}
