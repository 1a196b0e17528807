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
