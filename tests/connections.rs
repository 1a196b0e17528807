//! Connections under load and abuse: the listeners' accept queues.

mod support;

use std::process::{Command, Stdio};

use support::{Origin, ServeProcess, TestConfig};

/// The accept queue of the socket listening on `port`, as `ss` reports it (Send-Q of a
/// listening socket is its backlog).
fn backlog_of(port: u16) -> u32 {
    let out = Command::new("ss").args(["-ltnH", &format!("sport = :{port}")]).output().expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or_else(|| panic!("nothing listens on {port}: {text:?}"));
    line.split_whitespace().nth(2).and_then(|q| q.parse().ok()).unwrap_or_else(|| panic!("no Send-Q in {line:?}"))
}

fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|t| t.trim().parse().ok()).unwrap_or(4096)
}

#[tokio::test]
async fn both_listeners_get_the_configured_accept_queue_not_128() {
    let origin = Origin::start().await;
    let default = ServeProcess::start(&TestConfig::new(&origin.url()).to_toml(), Stdio::null(), Stdio::null()).await;
    let expected = 4096.min(somaxconn());
    assert!(expected > 128, "this kernel caps accept queues at {expected}");
    assert_eq!((backlog_of(default.port), backlog_of(default.admin_port)), (expected, expected));
    let set = ServeProcess::start(&TestConfig::new(&origin.url()).server("listen_backlog", 1000).to_toml(), Stdio::null(), Stdio::null()).await;
    let expected = 1000.min(somaxconn());
    assert_eq!((backlog_of(set.port), backlog_of(set.admin_port)), (expected, expected));
}

/// Dribbles a request head one byte every 500 ms to `addr`; returns how long after the
/// first byte the server closed the connection (or `None` if it was still open at `give_up`).
async fn dribble(addr: std::net::SocketAddr, give_up: std::time::Duration) -> Option<std::time::Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = b"GET /slow HTTP/1.1\r\nHost: shop.example\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let start = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    for byte in head.iter().cycle() {
        if stream.write_all(&[*byte]).await.is_err() {
            return Some(start.elapsed());
        }
        // Closed (EOF, or an error such as a reset) while we wait for the next byte.
        if let Ok(read) = tokio::time::timeout(std::time::Duration::from_millis(500), stream.read(&mut buf)).await
            && matches!(read, Ok(0) | Err(_))
        {
            return Some(start.elapsed());
        }
        if start.elapsed() > give_up {
            return None;
        }
    }
    None
}

/// Whether a connection that sent nothing is closed by `addr` within `within`.
async fn silent_closed_within(addr: std::net::SocketAddr, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 16];
    matches!(tokio::time::timeout(within, stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dribbled_head_is_cut_while_an_idle_keep_alive_connection_stays() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start().await;
    let config = TestConfig::new(&origin.url()).server("header_read_timeout", "2s").server("keepalive_idle", "8s").to_toml();
    let bulwark = support::Bulwark::start(&config).await;
    // An idle keep-alive connection, after one request.
    let mut idle = tokio::net::TcpStream::connect(bulwark.addr).await.expect("connect");
    idle.write_all(b"GET /first HTTP/1.1\r\nHost: shop.example\r\n\r\n").await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let (proxy, admin) = tokio::join!(dribble(bulwark.addr, Duration::from_secs(10)), dribble(bulwark.admin_addr, Duration::from_secs(10)));
    for (listener, cut) in [("proxy", proxy), ("admin", admin)] {
        let cut = cut.unwrap_or_else(|| panic!("{listener}: a dribbled head held its connection for 10 s"));
        assert!(cut >= Duration::from_millis(1500) && cut < Duration::from_secs(3), "{listener}: cut after {cut:?}, header_read_timeout 2s (+1 s)");
    }
    // Idle for over 2 s (the head timer) but under keepalive_idle: still usable.
    idle.write_all(b"GET /second HTTP/1.1\r\nHost: shop.example\r\n\r\n").await.expect("the idle connection is still open");
    let n = idle.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_are_closed_after_keepalive_idle() {
    use std::time::Duration;
    let origin = Origin::start().await;
    let config = TestConfig::new(&origin.url()).server("keepalive_idle", "2s").to_toml();
    let bulwark = std::sync::Arc::new(support::Bulwark::start(&config).await);
    let silent: Vec<_> = (0..2000)
        .map(|i| {
            let addr = if i % 2 == 0 { bulwark.addr } else { bulwark.admin_addr };
            tokio::spawn(async move { silent_closed_within(addr, Duration::from_secs(4)).await })
        })
        .collect();
    let mut closed = 0;
    for task in silent {
        closed += usize::from(task.await.expect("task"));
    }
    assert_eq!(closed, 2000, "of 2,000 silent connections (half on each listener), closed within keepalive_idle + 2 s");
}

#[tokio::test]
async fn serve_raises_the_open_file_soft_limit_to_the_hard_limit() {
    let origin = Origin::start().await;
    let (port, admin_port) = (support::free_port(), support::free_port());
    let config =
        TestConfig::new(&origin.url()).server("listen", format!("127.0.0.1:{port}")).server("admin_listen", format!("127.0.0.1:{admin_port}")).to_toml();
    let path = std::env::temp_dir().join(format!("bulwark-nofile-{}-{port}.toml", std::process::id()));
    std::fs::write(&path, config).expect("write config");
    // Started with a soft limit of 512, as many hosts set it.
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -S -n 512 && exec \"$0\" serve --config \"$1\"", env!("CARGO_BIN_EXE_bulwark")])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn bulwark serve");
    let health = format!("http://127.0.0.1:{admin_port}/healthz");
    support::eventually("bulwark serve is up", std::time::Duration::from_secs(10), async || support::client().get(health.parse().expect("uri")).await.is_ok())
        .await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("limits of the child");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("a Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_ne!(soft, "512", "{line}");
    assert_eq!(soft, hard, "{line}");
}
