//! Private Redis for tests: a `redis-server` (or a six-node cluster) per test on free
//! ports, a relay that can blackhole connections, and entries to plant directly.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::net::TcpListener;

use super::free_port;

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
        last_used: Default::default(),
    }
}

/// A private redis-server, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// More `redis-server` arguments (a TLS port, say).
    args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(Vec::new())
    }

    /// [`RedisServer::start`] with more `redis-server` arguments; the plain port stays
    /// open for the test's own checks.
    pub fn start_with(args: Vec<String>) -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer { port, child: None, args: args.clone() };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server (is it installed?)");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
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
                // Exited (its port was taken meanwhile): reaped, nothing left to signal.
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
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

    fn signal(&self, signal: &str) -> bool {
        match &self.child {
            Some(child) => Command::new("kill").args([signal, &child.id().to_string()]).status().is_ok_and(|s| s.success()),
            None => true,
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn stall(&self) {
        assert!(self.signal("-STOP"), "could not stop redis-server on port {}", self.port);
    }

    pub fn resume(&self) {
        assert!(self.signal("-CONT"), "could not resume redis-server on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A stalled server must be resumed before it can die; failing here must not
        // panic a test that is already unwinding, nor one whose server already exited.
        self.signal("-CONT");
        self.kill();
    }
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
        let nodes = (0..6).map(|_| RedisClusterNode::spawn(&dir)).collect();
        let cluster = RedisCluster { nodes, dir };
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
    /// A cluster node on a free port, answering PING. Free ports are picked and released,
    /// so a parallel test can take one (or the cluster bus port, 10000 above it) before
    /// the node binds it: a node that exits is started again on another port.
    fn spawn(dir: &std::path::Path) -> RedisClusterNode {
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .arg("--dir")
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let mut node = RedisClusterNode { port, child: Some(child) };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if node.ping() {
                    return node;
                }
                let exited = node.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))));
                if exited || Instant::now() > deadline {
                    if let Some(mut child) = node.child.take() {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start a redis-server cluster node in 5 tries");
    }

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
