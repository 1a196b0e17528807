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

/// Connects to `addr` with a 4 KiB receive buffer, sends a GET for `path` and never reads.
async fn never_reading(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(addr).await.expect("connect");
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n").as_bytes()).await.expect("write");
    stream
}

/// A 64 MiB answer that may not be stored: streamed through as the client takes it.
fn huge_unstored(origin: &Origin) {
    let huge = bytes::Bytes::from(vec![b'x'; 64 << 20]);
    origin.set(
        move |parts| {
            if parts.uri.path() == "/huge" { support::Reply::ok(huge.clone()).header("cache-control", "no-store") } else { support::Reply::ok("small") }
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_hold_their_origin_slots_at_most_send_timeout() {
    use std::time::{Duration, Instant};
    let origin = Origin::start().await;
    huge_unstored(&origin);
    let config = TestConfig::new(&origin.url()).server("send_timeout", "1s").origin("max_concurrency", 2).origin("queue_timeout", "10s").to_toml();
    let bulwark = support::Bulwark::start(&config).await;
    // Both origin slots taken by clients that read nothing: one HTTP/1.1, with a tiny
    // receive buffer, and one h2c stream whose flow-control window is never opened.
    let _h1 = never_reading(bulwark.addr, "/huge").await;
    let tcp = tokio::net::TcpStream::connect(bulwark.addr).await.expect("connect");
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp)).await.expect("h2c handshake");
    tokio::spawn(conn);
    let req = http::Request::get("http://shop.example/huge").body(http_body_util::Full::<bytes::Bytes>::default()).expect("request");
    let stalled = h2.send_request(req).await.expect("h2c response head");
    assert_eq!(stalled.status(), 200);
    support::eventually("both slots are taken", Duration::from_secs(5), async || bulwark.metric("bulwark_origin_inflight", &[]).await == 2.0).await;
    assert_eq!(bulwark.metric("bulwark_origin_concurrency_limit", &[("origin", "catalog")]).await, 2.0, "the limit the in-flight count is held to");
    let start = Instant::now();
    let next = bulwark.get("/small").await;
    let waited = start.elapsed();
    assert_eq!((next.status.as_u16(), next.text()), (200, "small"), "the next request got a slot");
    assert!(waited < Duration::from_secs(5), "the slots came free after send_timeout (1 s), not after {waited:?}");
    support::eventually("no origin body is held for the silent clients", Duration::from_secs(5), async || {
        bulwark.metric("bulwark_origin_inflight", &[]).await == 0.0
    })
    .await;
    // The stalled h2 response is aborted, never ends looking complete.
    let body = tokio::time::timeout(Duration::from_secs(5), http_body_util::BodyExt::collect(stalled.into_body())).await.expect("the body ends");
    assert!(body.is_err(), "an abandoned response is an aborted one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_client_takes_nothing_is_closed_after_send_timeout() {
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    let origin = Origin::start().await;
    huge_unstored(&origin);
    let config = TestConfig::new(&origin.url()).server("send_timeout", "1s").to_toml();
    let bulwark = support::Bulwark::start(&config).await;
    let mut stream = never_reading(bulwark.addr, "/huge").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Reading now finds what was buffered, then the end: the server gave up on it.
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was closed");
    assert!(total < 64 << 20, "and the response cut short: {total} bytes");
}

/// Opens an h2c connection to `addr` and sends one GET for `path`; returns the response
/// status and the connection task, which ends when the server closes the connection (the
/// sender, returned too, keeps the client from closing it).
async fn h2c_once(
    addr: std::net::SocketAddr,
    path: &str,
) -> (u16, tokio::task::JoinHandle<()>, hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp)).await.expect("h2c handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(format!("http://shop.example{path}")).body(http_body_util::Full::<bytes::Bytes>::default()).expect("request");
    let res = sender.send_request(req).await.expect("h2c response");
    let status = res.status().as_u16();
    http_body_util::BodyExt::collect(res.into_body()).await.expect("body");
    (status, conn, sender)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_connection_with_no_open_stream_is_closed_after_keepalive_idle() {
    use std::time::{Duration, Instant};
    let origin = Origin::start().await;
    origin.set(|parts| {
        let reply = support::Reply::ok("page").header("cache-control", "no-store");
        if parts.uri.path() == "/slow" { reply.delay(Duration::from_millis(3500)) } else { reply }
    });
    let config = TestConfig::new(&origin.url()).server("keepalive_idle", "2s").to_toml();
    let bulwark = support::Bulwark::start(&config).await;
    let start = Instant::now();
    let ((proxy, idle_proxy, _p), (admin, idle_admin, _a), (slow, slow_conn, _s)) =
        tokio::join!(h2c_once(bulwark.addr, "/p"), h2c_once(bulwark.admin_addr, "/healthz"), h2c_once(bulwark.addr, "/slow"));
    assert_eq!((proxy, admin), (200, 200));
    assert_eq!(slow, 200, "a stream open for longer than keepalive_idle is not cut");
    let slow_ended = start.elapsed();
    assert!(slow_ended >= Duration::from_millis(3500));
    for (listener, conn) in [("proxy", idle_proxy), ("admin", idle_admin)] {
        assert!(conn.is_finished(), "{listener}: an idle h2c connection is closed after keepalive_idle (2 s), still open after {slow_ended:?}");
    }
    assert!(!slow_conn.is_finished(), "the connection whose stream just ended is not idle yet");
    tokio::time::timeout(Duration::from_secs(4), slow_conn).await.expect("idle since its slow stream ended, that connection is closed too").expect("task");
    let closed_after = start.elapsed() - slow_ended;
    assert!(closed_after >= Duration::from_millis(1500), "closed {closed_after:?} after its last stream, keepalive_idle 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_connections_are_retired_after_connection_max_age_even_when_never_idle() {
    // Keep-alive under steady load never idles: without a maximum age one connection
    // would carry everything for good, and a new address behind the name never gets any.
    let (aged, lasting) = (Origin::start().await, Origin::start().await);
    for origin in [&aged, &lasting] {
        origin.set(|_| support::Reply::ok("x").header("cache-control", "no-store"));
    }
    let short = support::Bulwark::start(&TestConfig::new(&aged.url()).origin("connection_max_age", "1s").to_toml()).await;
    let default = support::Bulwark::start(&TestConfig::new(&lasting.url()).to_toml()).await;
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(3_500) {
        assert_eq!(short.get("/p").await.status, 200);
        assert_eq!(default.get("/p").await.status, 200);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (retired, kept) = (aged.connections_accepted(), lasting.connections_accepted());
    assert!((3..=6).contains(&retired), "connection_max_age = 1s over 3.5 s of load: {retired} connections");
    assert_eq!(kept, 1, "the default (60 s) kept one connection");
}

/// A front for an origin that closes, unanswered, each connection `drop` picks (by its
/// number, from 0) once it has read the request head, and relays the others.
async fn dropping_front(origin: std::net::SocketAddr, drop: impl Fn(usize) -> bool + Send + Sync + 'static) -> String {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut client, _)) = listener.accept().await else { continue };
            if drop(n) {
                tokio::spawn(async move {
                    let mut head = [0u8; 1024];
                    let _ = client.read(&mut head).await;
                    // Closed before any status line.
                });
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(origin).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_that_got_no_answer_is_retried_once_and_a_post_never() {
    let origin = Origin::start().await;
    origin.set(|_| support::Reply::ok("fine").header("cache-control", "no-store"));
    // The first connection is closed unanswered (a pod going away): the GET is tried
    // again on a new one.
    let first_dropped = dropping_front(origin.addr, |n| n == 0).await;
    let bulwark = support::Bulwark::start(&TestConfig::new(&first_dropped).to_toml()).await;
    let got = bulwark.get("/p").await;
    assert_eq!((got.status.as_u16(), got.text()), (200, "fine"));
    assert_eq!(bulwark.metric("bulwark_origin_retries_total", &[("origin", "catalog")]).await, 1.0);
    assert_eq!(origin.count("/p"), 1);

    // Every connection closed unanswered: a POST is not retried (it may have been acted
    // on), a GET once, then it fails.
    let all_dropped = dropping_front(origin.addr, |_| true).await;
    let bulwark = support::Bulwark::start(&TestConfig::new(&all_dropped).to_toml()).await;
    let post =
        bulwark.request(http::Request::post(bulwark.url("/p")).body(http_body_util::Full::new(bytes::Bytes::from_static(b"order"))).expect("request")).await;
    assert_eq!(post.status.as_u16(), 502);
    assert_eq!(bulwark.metric("bulwark_origin_retries_total", &[("origin", "catalog")]).await, 0.0, "a POST was retried");
    assert_eq!(bulwark.get("/q").await.status.as_u16(), 502);
    assert_eq!(bulwark.metric("bulwark_origin_retries_total", &[("origin", "catalog")]).await, 1.0);
    // With retries = 0, none.
    let none = support::Bulwark::start(&TestConfig::new(&all_dropped).origin("retries", 0).to_toml()).await;
    assert_eq!(none.get("/q").await.status.as_u16(), 502);
    assert_eq!(none.metric("bulwark_origin_retries_total", &[("origin", "catalog")]).await, 0.0);
}
