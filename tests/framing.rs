//! Request framing as a raw client sends it: nothing that could get the origin
//! connection out of step is passed on, and a malformed head is the client's error.

mod support;

use std::time::Duration;

use support::{Bulwark, Origin, TestConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one response (head and a `Content-Length` body) from `stream`, within 5 s.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, String, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
            let len = head
                .lines()
                .find_map(|l| {
                    l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.trim().parse::<usize>().expect("length"))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                buf.drain(..end + 4 + len);
                return (status, head, body);
            }
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await.expect("a response in time").expect("read");
        assert!(n > 0, "connection closed before a whole response; got {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_get_with_a_body_sends_the_origin_no_framing_and_keeps_the_connection_in_step() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let mut stream = TcpStream::connect(bulwark.addr).await.expect("connect");
    let started = std::time::Instant::now();
    stream.write_all(b"GET /cl HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 5\r\n\r\nhello").await.expect("write");
    let mut buf = Vec::new();
    let (status, _, body) = read_response(&mut stream, &mut buf).await;
    assert_eq!((status, String::from_utf8_lossy(&body).as_ref()), (200, "body of /cl"));
    // Within a second (5x margin on a local origin): the origin did not wait for a body.
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    let (parts, received) = origin.last_request();
    for name in ["content-length", "transfer-encoding", "expect"] {
        assert!(!parts.headers.contains_key(name), "{name} reached the origin");
    }
    assert!(received.is_empty(), "no body reached the origin");
    // The next request on the same connection is read as a request, not as the body.
    stream.write_all(b"GET /next HTTP/1.1\r\nHost: shop.example\r\n\r\n").await.expect("write");
    let (status, _, body) = read_response(&mut stream, &mut buf).await;
    assert_eq!((status, String::from_utf8_lossy(&body).as_ref()), (200, "body of /next"));
    assert_eq!(origin.total(), 2);
}

#[tokio::test]
async fn two_host_fields_are_a_400_and_reach_no_origin() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let mut stream = TcpStream::connect(bulwark.addr).await.expect("connect");
    stream.write_all(b"GET /x HTTP/1.1\r\nHost: shop.example\r\nHost: evil.example\r\n\r\n").await.expect("write");
    let (status, _, _) = read_response(&mut stream, &mut Vec::new()).await;
    assert_eq!(status, 400);
    assert_eq!(origin.total(), 0);
}

#[tokio::test]
async fn an_absolute_form_target_names_the_host_for_routing_key_and_origin() {
    let origin = Origin::start().await;
    let config = TestConfig::new(&origin.url()).route("host", "shop.example").to_toml();
    let bulwark = Bulwark::start(&config).await;
    let mut stream = TcpStream::connect(bulwark.addr).await.expect("connect");
    stream.write_all(b"GET http://shop.example/abs HTTP/1.1\r\nHost: evil.example\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    let (status, head, _) = read_response(&mut stream, &mut buf).await;
    assert_eq!(status, 200, "routed by the target's authority, not the Host field: {head}");
    assert_eq!(origin.last_request().0.headers.get("host").and_then(|v| v.to_str().ok()), Some("shop.example"));
    // Same key as the origin-form request for that host.
    stream.write_all(b"GET /abs HTTP/1.1\r\nHost: shop.example\r\n\r\n").await.expect("write");
    let (_, head, _) = read_response(&mut stream, &mut buf).await;
    assert!(head.contains("bulwark; hit; detail=l1"), "{head}");
}

#[tokio::test]
async fn spellings_of_one_host_share_a_key() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    assert_eq!(bulwark.get_with("/h", &[("host", "Shop.Example.:080")]).await.cache_status(), "bulwark; fwd=miss; stored");
    assert_eq!(origin.last_request().0.headers.get("host").and_then(|v| v.to_str().ok()), Some("shop.example"), "the origin gets the key's spelling");
    for host in ["shop.example", "shop.example.", "SHOP.example:80"] {
        assert_eq!(bulwark.get_with("/h", &[("host", host)]).await.cache_status(), "bulwark; hit; detail=l1", "{host}");
    }
    assert_eq!(origin.total(), 1);
}

#[tokio::test]
async fn host_and_path_overrides_never_reach_the_origin_on_a_cacheable_request() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    let overrides =
        [("x-original-host", "evil.example"), ("x-forwarded-uri", "/admin"), ("x-forwarded-path", "/admin"), ("x-http-host-override", "evil.example")];
    bulwark.get_with("/o", &overrides).await;
    let (parts, _) = origin.last_request();
    for (name, _) in overrides {
        assert!(!parts.headers.contains_key(name), "{name} reached the origin");
    }
}

#[tokio::test]
async fn h2_split_cookie_fields_reach_an_http1_origin_as_one() {
    use http_body_util::Full;
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).route("cache", false).to_toml()).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http::<Full<bytes::Bytes>>();
    let req = http::Request::get(bulwark.url("/c")).header("cookie", "a=1").header("cookie", "b=2").body(Full::default()).expect("request");
    let res = h2.request(req).await.expect("h2c request");
    assert_eq!(res.status(), 200);
    let (parts, _) = origin.last_request();
    let cookies: Vec<_> = parts.headers.get_all("cookie").iter().map(|v| v.to_str().unwrap_or("").to_owned()).collect();
    assert_eq!(cookies, ["a=1; b=2"]);
}

#[tokio::test]
async fn a_broken_chunked_upload_is_the_clients_error_not_the_origins() {
    let origin = Origin::start().await;
    // A breaker that would open on the first origin failure.
    let config = TestConfig::new(&origin.url()).origin("breaker_consecutive_failures", 1).origin("breaker_min_requests", 1).to_toml();
    let bulwark = Bulwark::start(&config).await;
    let mut stream = TcpStream::connect(bulwark.addr).await.expect("connect");
    stream.write_all(b"POST /upload HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(b"ZZZ-not-a-chunk-size\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // A 400, or the connection closed: never a 502.
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(!answer.contains("catalog"), "the error names no internal origin: {answer}");
    for status in ["error", "5xx", "timeout", "connect_error"] {
        assert_eq!(bulwark.metric("bulwark_origin_requests_total", &[("status", status)]).await, 0.0, "{status}");
    }
    assert_eq!(bulwark.metric("bulwark_origin_breaker_open", &[("origin", "catalog")]).await, 0.0);
    assert_eq!(bulwark.get("/after").await.status, 200, "the origin is still used");
}

#[tokio::test]
async fn a_slow_upload_is_the_clients_timeout_not_a_breaker_failure() {
    let origin = Origin::start().await;
    let config =
        TestConfig::new(&origin.url()).origin("timeout", "500ms").origin("breaker_consecutive_failures", 1).origin("breaker_min_requests", 1).to_toml();
    let bulwark = Bulwark::start(&config).await;
    let mut stream = TcpStream::connect(bulwark.addr).await.expect("connect");
    stream.write_all(b"POST /upload HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 100\r\n\r\nfirst bytes").await.expect("write");
    // The rest never comes.
    let (status, _, _) = read_response(&mut stream, &mut Vec::new()).await;
    assert_eq!(status, 408);
    assert_eq!(bulwark.metric("bulwark_origin_requests_total", &[("status", "timeout")]).await, 0.0);
    assert_eq!(bulwark.metric("bulwark_origin_breaker_open", &[("origin", "catalog")]).await, 0.0);
    assert_eq!(bulwark.get("/after").await.status, 200, "the origin is still used");
}
