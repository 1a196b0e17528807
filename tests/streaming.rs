//! Streamed fills: a storable answer reaches its leader and every coalesced waiter as it
//! arrives from the origin, from one shared copy, each reader at its own pace; a body
//! that fails part way aborts every reader's response and stores nothing.
//!
//! The origin here is a raw TCP server that sends its head at once and then its body at
//! a set rate (or breaks off), and the clients are raw sockets that note when their first
//! body byte came, so nothing between them buffers what is measured.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{Bulwark, TestConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The byte at `at` of every test body: a body that arrives shifted, short or mixed
/// with another one does not match.
fn byte_at(at: usize) -> u8 {
    (at % 251) as u8
}

fn intact(body: &[u8], from: usize) -> bool {
    body.iter().enumerate().all(|(i, b)| *b == byte_at(from + i))
}

/// How the origin sends its one object.
#[derive(Clone, Copy)]
struct Send {
    len: usize,
    /// Bytes a second after the head.
    rate: usize,
    /// Close the connection after this many body bytes.
    break_at: Option<usize>,
    /// Chunked framing instead of `Content-Length`.
    chunked: bool,
    /// Wait this long before sending the head.
    head_delay: Duration,
}

/// A raw HTTP/1.1 origin: one response per connection, then it closes.
struct SlowOrigin {
    port: u16,
    requests: Arc<AtomicUsize>,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowOrigin {
    async fn start(send: Send) -> SlowOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let heads: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let (seen, kept) = (requests.clone(), heads.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (seen, kept) = (seen.clone(), kept.clone());
                tokio::spawn(async move {
                    let _ = answer(stream, send, &seen, &kept).await;
                });
            }
        });
        SlowOrigin { port, requests, heads, task }
    }

    /// The request heads received, lower-cased.
    fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("heads").clone()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for SlowOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut stream: TcpStream, send: Send, seen: &AtomicUsize, heads: &std::sync::Mutex<Vec<String>>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    heads.lock().expect("heads").push(String::from_utf8_lossy(&head).to_ascii_lowercase());
    seen.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(send.head_delay).await;
    let framing = if send.chunked { "transfer-encoding: chunked".to_owned() } else { format!("content-length: {}", send.len) };
    let response_head = format!("HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\netag: \"v1\"\r\n{framing}\r\nconnection: close\r\n\r\n");
    stream.write_all(response_head.as_bytes()).await?;
    // Paced in pieces of 64 KiB (or less: at least 20 a second).
    let piece = (send.rate / 20).clamp(1, 64 << 10);
    let pause = Duration::from_secs_f64(piece as f64 / send.rate as f64);
    let end = send.break_at.unwrap_or(send.len).min(send.len);
    let mut at = 0;
    while at < end {
        let n = piece.min(end - at);
        let bytes: Vec<u8> = (at..at + n).map(byte_at).collect();
        if send.chunked {
            stream.write_all(format!("{n:x}\r\n").as_bytes()).await?;
            stream.write_all(&bytes).await?;
            stream.write_all(b"\r\n").await?;
        } else {
            stream.write_all(&bytes).await?;
        }
        at += n;
        tokio::time::sleep(pause).await;
    }
    if send.break_at.is_none() && send.chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    // A break: the connection closes with the body short.
    Ok(())
}

/// What a raw client got.
#[derive(Debug)]
struct Got {
    status: u16,
    head: String,
    body: Vec<u8>,
    /// From the request's first byte to the first body byte.
    first_body_byte: Option<Duration>,
    /// The body arrived whole by its framing (its length, or the last chunk).
    complete: bool,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| line.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
    }
}

/// A GET on a fresh connection, read to its end; with `rcvbuf`, on a socket with that
/// receive buffer that stops reading after the head (`stop_after_head`).
async fn raw_get(port: u16, path: &str, headers: &[(&str, &str)], rcvbuf: Option<u32>, stop_after_head: bool) -> (Got, TcpStream) {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).expect("rcvbuf");
    }
    let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.expect("connect");
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: shop.example\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let start = Instant::now();
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut first_body_byte = None;
    let mut head_len = None;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        data.extend_from_slice(&buf[..n]);
        if head_len.is_none()
            && let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n")
        {
            head_len = Some(at + 4);
            if stop_after_head {
                break;
            }
        }
        if let Some(len) = head_len {
            if first_body_byte.is_none() && data.len() > len {
                first_body_byte = Some(start.elapsed());
            }
            if framed_end(&data[..len], &data[len..]) {
                break;
            }
        }
    }
    let head_len = head_len.unwrap_or(data.len());
    let head = String::from_utf8_lossy(&data[..head_len]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let raw = &data[head_len..];
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let (body, complete) = if chunked { dechunk(raw) } else { (raw.to_vec(), framed_end(&data[..head_len], raw)) };
    (Got { status, head, body, first_body_byte, complete }, stream)
}

/// Whether `body` is whole by the framing `head` declares.
fn framed_end(head: &[u8], body: &[u8]) -> bool {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        return dechunk(body).1;
    }
    let len = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
    len.is_some_and(|len| body.len() >= len)
}

/// The data of a chunked body, and whether its last chunk came.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") else { return (out, false) };
        let Ok(size) = usize::from_str_radix(String::from_utf8_lossy(&raw[..line_end]).trim(), 16) else { return (out, false) };
        if size == 0 {
            return (out, raw.len() >= line_end + 4);
        }
        let start = line_end + 2;
        if raw.len() < start + size + 2 {
            out.extend_from_slice(&raw[start..raw.len().min(start + size)]);
            return (out, false);
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

async fn concurrent_gets(port: u16, path: &str, n: usize) -> Vec<Got> {
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(raw_get_owned(port, path.to_owned()))).collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("client"));
    }
    out
}

async fn raw_get_owned(port: u16, path: String) -> Got {
    raw_get(port, &path, &[], None, false).await.0
}

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_waiters_get_body_bytes_while_the_origin_still_sends() {
    // 4 MiB at 2 MB/s: about 2 s from the first byte to the last.
    let origin = SlowOrigin::start(Send { len: 4 * MIB, rate: 2_000_000, break_at: None, chunked: false, head_delay: Duration::ZERO }).await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).origin("timeout", "30s").to_toml()).await;
    let got = concurrent_gets(bulwark.addr.port(), "/video", 100).await;
    assert_eq!(origin.requests(), 1, "one origin request for 100 clients");
    for g in &got {
        assert_eq!((g.status, g.body.len(), g.complete), (200, 4 * MIB, true), "{}", g.head);
        assert!(intact(&g.body, 0), "every body intact");
    }
    let statuses: Vec<&str> = got.iter().filter_map(|g| g.header("cache-status")).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "bulwark; fwd=miss; stored").count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == "bulwark; fwd=miss; collapsed").count(), 99, "{statuses:?}");
    // Streamed, not read whole first: the first body bytes come long before the ~2 s the
    // whole body takes (100 ms is the target; 5x that is the bound here).
    let first = median(got.iter().map(|g| g.first_body_byte.expect("a body byte")).collect());
    assert!(first < Duration::from_millis(500), "median time to the first body byte {first:?}");
    // Stored before the last byte went out: the next request is a hit.
    let (again, _) = raw_get(bulwark.addr.port(), "/video", &[], None, false).await;
    assert_eq!((again.header("cache-status"), again.body.len()), (Some("bulwark; hit; detail=l1"), 4 * MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entry_is_stored_before_the_leaders_last_byte() {
    let origin = SlowOrigin::start(Send { len: 512 << 10, rate: 4_000_000, break_at: None, chunked: true, head_delay: Duration::ZERO }).await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let (first, _) = raw_get(bulwark.addr.port(), "/doc", &[], None, false).await;
    assert_eq!((first.status, first.body.len(), first.complete), (200, 512 << 10, true));
    assert_eq!(first.header("cache-status"), Some("bulwark; fwd=miss; stored"));
    // The same client's next request, the moment its body ended.
    let (next, _) = raw_get(bulwark.addr.port(), "/doc", &[], None, false).await;
    assert_eq!(next.header("cache-status"), Some("bulwark; hit; detail=l1"));
    assert_eq!(next.header("content-length"), Some("524288"), "stored with the length it turned out to have");
    assert!(intact(&next.body, 0));
    assert_eq!(origin.requests(), 1);
}

async fn a_body_broken_off_aborts_every_reader(chunked: bool) {
    let origin = SlowOrigin::start(Send { len: 4 * MIB, rate: 8_000_000, break_at: Some(2 * MIB), chunked, head_delay: Duration::ZERO }).await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let got = concurrent_gets(bulwark.addr.port(), "/broken", 100).await;
    assert_eq!(origin.requests(), 1);
    for g in &got {
        // Either the head came and the body was cut (never a complete-looking end), or
        // a late joiner got the error itself.
        match g.status {
            200 => {
                assert!(!g.complete, "an aborted response, not a short one that looks complete: {} bytes", g.body.len());
                assert!(g.body.len() <= 2 * MIB && intact(&g.body, 0));
            }
            502 => {}
            other => panic!("status {other}: {}", g.head),
        }
    }
    assert!(got.iter().filter(|g| g.status == 200).count() >= 90, "the waiters had their heads");
    support::eventually("every request recorded as error", Duration::from_secs(5), async || {
        bulwark.metric("bulwark_requests_total", &[("cache", "error")]).await == 100.0
    })
    .await;
    // Nothing stored: the next request asks the origin again.
    let (next, _) = raw_get(bulwark.addr.port(), "/broken", &[], None, false).await;
    assert_eq!(next.header("cache-status"), Some("bulwark; fwd=miss; stored"), "{}", next.head);
    assert_eq!(origin.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_breaks_off_a_declared_body_aborts_every_reader_and_stores_nothing() {
    a_body_broken_off_aborts_every_reader(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_breaks_off_a_chunked_body_leaves_every_reader_without_the_last_chunk() {
    a_body_broken_off_aborts_every_reader(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_holds_up_no_other_and_is_cut_after_send_timeout() {
    let origin = SlowOrigin::start(Send { len: 4 * MIB, rate: 4_000_000, break_at: None, chunked: false, head_delay: Duration::ZERO }).await;
    let config = TestConfig::new(&origin.url()).server("send_timeout", "2s").to_toml();
    let bulwark = Bulwark::start(&config).await;
    let port = bulwark.addr.port();
    // The stuck one leads: its head comes, then it reads nothing more through a 4 KiB
    // receive buffer.
    let (stuck, stuck_stream) = raw_get(port, "/big", &[], Some(4096), true).await;
    assert_eq!(stuck.status, 200);
    let start = Instant::now();
    let others = concurrent_gets(port, "/big", 99).await;
    let took = start.elapsed();
    for g in &others {
        assert_eq!((g.body.len(), g.complete), (4 * MIB, true));
        assert!(intact(&g.body, 0));
    }
    // About 1 s of origin time left; 5x that is the bound.
    assert!(took < Duration::from_secs(5), "the others took {took:?}");
    assert_eq!(origin.requests(), 1);
    // The stuck reader is cut after send_timeout and counted as its client's abort.
    support::eventually("the stuck reader cut", Duration::from_secs(10), async || bulwark.metric("bulwark_client_aborts_total", &[]).await >= 1.0).await;
    drop(stuck_stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_client_goes_away_is_detached_without_touching_the_others() {
    let origin = SlowOrigin::start(Send { len: 2 * MIB, rate: 4_000_000, break_at: None, chunked: false, head_delay: Duration::ZERO }).await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let port = bulwark.addr.port();
    let leaving: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn(async move {
                let (got, stream) = raw_get(port, "/clip", &[], None, true).await;
                drop(stream);
                got.status
            })
        })
        .collect();
    let staying = concurrent_gets(port, "/clip", 10).await;
    for task in leaving {
        assert_eq!(task.await.expect("client"), 200);
    }
    for g in &staying {
        assert_eq!((g.body.len(), g.complete), (2 * MIB, true));
        assert!(intact(&g.body, 0));
    }
    assert_eq!(origin.requests(), 1);
    let (next, _) = raw_get(port, "/clip", &[], None, false).await;
    assert_eq!(next.header("cache-status"), Some("bulwark; hit; detail=l1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_and_a_plain_request_for_a_cold_key_share_the_fill_and_each_get_theirs() {
    let origin = SlowOrigin::start(Send { len: MIB, rate: 4_000_000, break_at: None, chunked: false, head_delay: Duration::ZERO }).await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let port = bulwark.addr.port();
    let plain = tokio::spawn(raw_get_owned(port, "/file".to_owned()));
    let ranged: Vec<_> = ["bytes=100-199", "bytes=1000000-", "bytes=-10"]
        .into_iter()
        .map(|range| tokio::spawn(async move { (range, raw_get(port, "/file", &[("range", range)], None, false).await.0) }))
        .collect();
    let plain = plain.await.expect("plain");
    assert_eq!((plain.status, plain.body.len()), (200, MIB));
    assert!(intact(&plain.body, 0));
    for task in ranged {
        let (range, got) = task.await.expect("ranged");
        let (from, len) = match range {
            "bytes=100-199" => (100, 100),
            "bytes=1000000-" => (1_000_000, MIB - 1_000_000),
            _ => (MIB - 10, 10),
        };
        assert_eq!(got.status, 206, "{range}: {}", got.head);
        assert_eq!(got.header("content-range"), Some(format!("bytes {from}-{}/{MIB}", from + len - 1).as_str()), "{range}");
        assert_eq!(got.body.len(), len, "{range}");
        assert!(intact(&got.body, from), "{range}");
    }
    assert_eq!(origin.requests(), 1, "the ranges came from the shared fill");
}

/// An object over `max_object_bytes` (8 MiB by default), sent fast.
const LARGE: Send = Send { len: 40 * MIB, rate: 400_000_000, break_at: None, chunked: false, head_delay: Duration::ZERO };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_over_max_object_bytes_is_streamed_to_every_waiter_from_one_origin_request() {
    let origin = SlowOrigin::start(LARGE).await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).origin("timeout", "30s").to_toml()).await;
    let got = concurrent_gets(bulwark.addr.port(), "/video", 20).await;
    assert_eq!(origin.requests(), 1, "one origin request for 20 clients");
    for g in &got {
        assert_eq!((g.status, g.body.len(), g.complete), (200, 40 * MIB, true));
        assert!(intact(&g.body, 0));
        assert_eq!(g.header("cache-status"), Some("bulwark; fwd=miss; detail=too-large"), "shared, but not a collapsed hit");
    }
    assert_eq!(bulwark.metric("bulwark_not_stored_total", &[("reason", "too-large")]).await, 1.0, "the fill is counted once");
    // "Stream, don't store": later concurrent requests share one fetch again.
    let again = concurrent_gets(bulwark.addr.port(), "/video", 5).await;
    assert!(again.iter().all(|g| g.body.len() == 40 * MIB && g.complete));
    assert_eq!(origin.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_more_than_stream_window_behind_a_large_fill_is_cut_at_once() {
    let origin = SlowOrigin::start(LARGE).await;
    // A send_timeout far beyond the test: what cuts the stuck reader is the window.
    let config = TestConfig::new(&origin.url()).origin("timeout", "30s").server("send_timeout", "120s").pool("stream_window", "4MiB").to_toml();
    let bulwark = Bulwark::start(&config).await;
    let port = bulwark.addr.port();
    let (stuck, mut stuck_stream) = raw_get(port, "/video", &[], Some(4096), true).await;
    assert_eq!(stuck.status, 200);
    let start = Instant::now();
    // Twenty clients in all, as the large-object case has them.
    let others = concurrent_gets(port, "/video", 19).await;
    for g in &others {
        assert_eq!((g.body.len(), g.complete), (40 * MIB, true), "the others are not held back");
        assert!(intact(&g.body, 0));
    }
    assert_eq!(origin.requests(), 1);
    support::eventually("the stuck reader's abort counted", Duration::from_secs(10), async || bulwark.metric("bulwark_client_aborts_total", &[]).await >= 1.0)
        .await;
    assert!(start.elapsed() < Duration::from_secs(60), "cut by the window, not by send_timeout");
    // Its connection was closed: reading on, it gets what was in flight, then the end.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stuck_stream.read_to_end(&mut rest)).await.expect("the connection was closed");
    // Cut at the window: what it got is the window's worth, plus what the kernel's send
    // buffer held (tcp_wmem allows up to 4 MiB here), never the 40 MiB object.
    let received = stuck.body.len() + rest.len();
    assert!(received <= 4 * MIB + 4 * MIB + MIB, "the stuck reader got {received} bytes: not cut at stream_window (4 MiB)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_a_key_known_too_large_goes_to_the_origin_unchanged_and_alone() {
    let origin = SlowOrigin::start(Send { len: 12 * MIB, rate: 400_000_000, break_at: None, chunked: false, head_delay: Duration::ZERO }).await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let port = bulwark.addr.port();
    let (first, _) = raw_get(port, "/big", &[], None, false).await;
    assert_eq!((first.body.len(), first.header("cache-status")), (12 * MIB, Some("bulwark; fwd=miss; detail=too-large")));
    // Known too large now: the client's Range goes to the origin as it came. This origin
    // ignores it and sends all of it, from which the part is cut as it streams.
    let (ranged, _) = raw_get(port, "/big", &[("range", "bytes=0-99")], None, false).await;
    assert_eq!(origin.requests(), 2);
    assert!(origin.heads()[1].contains("range: bytes=0-99"), "{}", origin.heads()[1]);
    assert_eq!((ranged.status, ranged.header("content-range"), ranged.body.len()), (206, Some("bytes 0-99/12582912"), 100));
    assert!(intact(&ranged.body, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_beyond_max_object_bytes_of_a_cold_large_key_is_asked_again_with_its_range() {
    // The head comes late enough that all three requests meet on one flight.
    let origin = SlowOrigin::start(Send { len: 12 * MIB, rate: 12_000_000, break_at: None, chunked: false, head_delay: Duration::from_millis(500) }).await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).origin("timeout", "30s").to_toml()).await;
    let port = bulwark.addr.port();
    let plain = tokio::spawn(raw_get_owned(port, "/big".to_owned()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let near = tokio::spawn(async move { raw_get(port, "/big", &[("range", "bytes=1000-1099")], None, false).await.0 });
    let far = tokio::spawn(async move { raw_get(port, "/big", &[("range", "bytes=10000000-10000099")], None, false).await.0 });
    let (plain, near, far) = (plain.await.expect("plain"), near.await.expect("near"), far.await.expect("far"));
    assert_eq!((plain.status, plain.body.len()), (200, 12 * MIB));
    // Within what could be stored: cut from the shared fill as it streams.
    assert_eq!((near.status, near.header("content-range")), (206, Some("bytes 1000-1099/12582912")), "{}", near.head);
    assert!(intact(&near.body, 1000) && near.body.len() == 100);
    // Beyond it: asked of the origin again, with its own Range (this origin sends it all,
    // and the part is cut from that).
    assert_eq!(origin.requests(), 2, "{:?}", origin.heads());
    assert!(!origin.heads()[0].contains("range:"), "the shared fetch asks for the whole object");
    assert!(origin.heads()[1].contains("range: bytes=10000000-10000099"));
    assert_eq!((far.status, far.header("content-range")), (206, Some("bytes 10000000-10000099/12582912")));
    assert!(intact(&far.body, 10_000_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_fill_that_finds_the_body_budget_spent_is_passed_through_to_each_alone() {
    let origin = SlowOrigin::start(Send { len: 12 * MIB, rate: 400_000_000, break_at: None, chunked: false, head_delay: Duration::ZERO }).await;
    let config =
        TestConfig::new(&origin.url()).server("max_inflight_body_bytes", "2MiB").pool("max_object_bytes", "1MiB").pool("stream_window", "4MiB").to_toml();
    let bulwark = Bulwark::start(&config).await;
    let got = concurrent_gets(bulwark.addr.port(), "/big", 3).await;
    for g in &got {
        assert_eq!((g.body.len(), g.complete), (12 * MIB, true));
        assert!(intact(&g.body, 0));
    }
    assert_eq!(origin.requests(), 3, "a window does not fit in the budget: not coalesced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_answer_over_max_object_bytes_in_its_first_read_still_reaches_its_leader() {
    // The first 64 KiB may arrive with the head, already over max_object_bytes.
    let origin = SlowOrigin::start(Send { len: MIB, rate: 4_000_000, break_at: None, chunked: true, head_delay: Duration::ZERO }).await;
    let config = TestConfig::new(&origin.url()).pool("max_object_bytes", "16KiB").pool("stream_window", "4KiB").to_toml();
    let bulwark = Bulwark::start(&config).await;
    // One client: with a window this small, a second reader a little slower than the
    // first would rightly be cut.
    let (got, _) = raw_get(bulwark.addr.port(), "/feed", &[], None, false).await;
    assert_eq!((got.status, got.body.len(), got.complete), (200, MIB, true), "{}", got.head);
    assert!(intact(&got.body, 0));
    // Known too large at head time (the first read came with the head) or once it grew
    // past the limit: counted once either way.
    assert_eq!(bulwark.metric("bulwark_not_stored_total", &[("reason", "too-large")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_while_the_body_streams_keeps_it_out_of_the_cache() {
    let origin = SlowOrigin::start(Send { len: 2 * MIB, rate: 2_000_000, break_at: None, chunked: false, head_delay: Duration::ZERO }).await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let port = bulwark.addr.port();
    let reading = tokio::spawn(raw_get_owned(port, "/page".to_owned()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let purged = bulwark.admin_send(http::Method::POST, "/admin/purge", r#"{"urls": ["/page"]}"#).await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    let first = reading.await.expect("reader");
    assert_eq!((first.body.len(), first.complete), (2 * MIB, true), "the reader that asked before the purge gets its page");
    let (next, _) = raw_get(port, "/page", &[], None, false).await;
    assert_eq!(next.header("cache-status"), Some("bulwark; fwd=miss; stored"), "what was purged while it streamed was not stored");
    assert_eq!(origin.requests(), 2);
    assert_eq!(bulwark.metric("bulwark_not_stored_total", &[("reason", "purged")]).await, 1.0);
}

async fn two_replicas(origin: &SlowOrigin, redis: &support::RedisServer) -> (Bulwark, Bulwark) {
    let config = TestConfig::new(&origin.url()).redis(&redis.url()).pool("redis_timeout", "500ms").origin("timeout", "30s").to_toml();
    let (a, b) = (Bulwark::start(&config).await, Bulwark::start(&config).await);
    a.wait_for_subscription().await;
    b.wait_for_subscription().await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holder_of_a_large_object_tells_the_other_replicas_at_its_head_to_fetch_for_themselves() {
    let redis = support::RedisServer::start();
    // 12 MiB at 6 MB/s: 2 s of body after a 300 ms wait for the head.
    let origin = SlowOrigin::start(Send { len: 12 * MIB, rate: 6_000_000, break_at: None, chunked: false, head_delay: Duration::from_millis(300) }).await;
    let (a, b) = two_replicas(&origin, &redis).await;
    let first = tokio::spawn(raw_get_owned(a.addr.port(), "/film".to_owned()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // B finds A's lease and waits for its word; the word comes with A's head, not after
    // A's body, so B streams its own fetch.
    let (second, _) = raw_get(b.addr.port(), "/film", &[], None, false).await;
    let first = first.await.expect("first");
    for g in [&first, &second] {
        assert_eq!((g.body.len(), g.complete), (12 * MIB, true));
        assert!(intact(&g.body, 0));
    }
    assert_eq!(origin.requests(), 2, "one fetch per replica");
    let waited = second.first_body_byte.expect("a body byte");
    assert!(waited < Duration::from_millis(1500), "the other replica's first body byte after {waited:?}: it waited for the whole body");
    // Known too large on both now: no lease is taken, each replica fetches at once.
    let (a_again, b_again) = tokio::join!(raw_get_owned(a.addr.port(), "/film".to_owned()), raw_get_owned(b.addr.port(), "/film".to_owned()));
    assert!(a_again.complete && b_again.complete);
    assert_eq!(origin.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_range_starts_past_max_object_bytes_asks_again_with_its_range() {
    let origin = SlowOrigin::start(Send { len: 12 * MIB, rate: 12_000_000, break_at: None, chunked: false, head_delay: Duration::ZERO }).await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).origin("timeout", "30s").to_toml()).await;
    let (got, _) = raw_get(bulwark.addr.port(), "/seek", &[("range", "bytes=11000000-11000099")], None, false).await;
    assert_eq!((got.status, got.header("content-range")), (206, Some("bytes 11000000-11000099/12582912")), "{}", got.head);
    assert!(intact(&got.body, 11_000_000) && got.body.len() == 100);
    let heads = origin.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(!heads[0].contains("range:") && heads[1].contains("range: bytes=11000000-11000099"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_on_one_connection_share_a_streamed_fill() {
    use http_body_util::BodyExt;
    let origin = SlowOrigin::start(Send { len: 2 * MIB, rate: 4_000_000, break_at: None, chunked: false, head_delay: Duration::ZERO }).await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http::<http_body_util::Full<bytes::Bytes>>();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (client, url) = (client.clone(), bulwark.url("/h2-clip"));
            tokio::spawn(async move {
                let req = http::Request::get(url).body(http_body_util::Full::default()).expect("request");
                let res = client.request(req).await.expect("h2 request");
                assert_eq!(res.version(), http::Version::HTTP_2);
                let status = res.headers()["cache-status"].to_str().expect("ascii").to_owned();
                (status, res.into_body().collect().await.expect("whole body").to_bytes())
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        let (status, body) = task.await.expect("stream");
        assert_eq!(body.len(), 2 * MIB);
        assert!(intact(&body, 0));
        statuses.push(status);
    }
    assert_eq!(origin.requests(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| *s == "bulwark; fwd=miss; collapsed").count(), 9, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_more_than_stream_window_behind_a_large_fill_is_reset_and_its_connection_lives() {
    use http_body_util::BodyExt;
    let origin = SlowOrigin::start(LARGE).await;
    let config = TestConfig::new(&origin.url()).origin("timeout", "30s").server("send_timeout", "120s").pool("stream_window", "4MiB").to_toml();
    let bulwark = Bulwark::start(&config).await;
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http::<http_body_util::Full<bytes::Bytes>>();
    let get = |path: &str| http::Request::get(bulwark.url(path)).body(http_body_util::Full::default()).expect("request");
    // A stream whose body is never read: flow control stops bulwark sending it.
    let stuck = client.request(get("/video")).await.expect("h2 request");
    assert_eq!((stuck.version(), stuck.status().as_u16()), (http::Version::HTTP_2, 200));
    // The others on a connection of their own (the same authority, so the same key).
    let readers =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http::<http_body_util::Full<bytes::Bytes>>();
    let others: Vec<_> = (0..5)
        .map(|_| {
            let (readers, req) = (readers.clone(), get("/video"));
            tokio::spawn(async move { readers.request(req).await.expect("h2 request").into_body().collect().await.expect("whole body").to_bytes() })
        })
        .collect();
    for other in others {
        let body = other.await.expect("reader");
        assert_eq!(body.len(), 40 * MIB, "the others are not held back");
        assert!(intact(&body, 0));
    }
    assert_eq!(origin.requests(), 1, "the stuck stream held neither the fill nor the origin back");
    // Cut: when the stream moves again (hyper polls a body only once flow control lets it
    // send), it gets RST_STREAM, never the rest of the 40 MiB as if complete.
    let body = tokio::time::timeout(Duration::from_secs(10), stuck.into_body().collect()).await.expect("the stream ended");
    assert!(body.is_err(), "the stuck stream ended as if complete ({} bytes)", body.map(|b| b.to_bytes().len()).unwrap_or(0));
    support::eventually("the stuck stream's abort counted", Duration::from_secs(10), async || bulwark.metric("bulwark_client_aborts_total", &[]).await >= 1.0)
        .await;
    // Only the stream: the connection serves the next one.
    let next = client.request(get("/video")).await.expect("the connection still serves streams");
    assert_eq!(next.status(), 200);
}
