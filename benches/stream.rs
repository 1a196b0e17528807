//! The client of `benches/compare-stream.sh`: `CLIENTS` clients released together (by a
//! barrier) each send one GET for `PATH` on a new connection and read the answer to
//! its end. Prints, in milliseconds from the release, the median and p90 of the time to
//! the first body byte and to the last byte, and the number of failures (errors,
//! non-200 answers, bodies shorter than their `Content-Length`).
//!
//!   cargo bench --bench stream -- ADDR PATH CLIENTS

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "support/percentile.rs"]
mod percentile;
use percentile::percentile;

struct Timing {
    first_body_byte: Duration,
    last_byte: Duration,
}

async fn one(addr: SocketAddr, path: &str, start: Instant) -> Result<Timing, String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; 256 << 10];
    let mut head = Vec::new();
    let mut first_body_byte = None;
    let mut body = 0usize;
    let mut declared = None;
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        if declared.is_none() {
            head.extend_from_slice(&buf[..n]);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
            if !text.starts_with("http/1.1 200") {
                return Err(text.lines().next().unwrap_or("no answer").to_owned());
            }
            let len = text.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
            declared = Some(len.ok_or("no content-length")?);
            body = head.len() - end - 4;
        } else {
            body += n;
        }
        if body > 0 && first_body_byte.is_none() {
            first_body_byte = Some(start.elapsed());
        }
        if declared.is_some_and(|len| body >= len) {
            break;
        }
    }
    let last_byte = start.elapsed();
    match (declared, first_body_byte) {
        (Some(len), Some(first_body_byte)) if body >= len => Ok(Timing { first_body_byte, last_byte }),
        _ => Err(format!("short body: {body} of {declared:?}")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let [addr, path, clients] = &args[..] else {
        eprintln!("usage: stream ADDR PATH CLIENTS");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is host:port");
    let clients: usize = clients.parse().expect("CLIENTS is a number");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let results = runtime.block_on(async {
        let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
        let start = Arc::new(std::sync::OnceLock::new());
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (barrier, start, path) = (barrier.clone(), start.clone(), path.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let start = *start.get_or_init(Instant::now);
                    tokio::time::timeout(Duration::from_secs(60), one(addr, &path, start)).await.unwrap_or_else(|_| Err("timed out".to_owned()))
                })
            })
            .collect();
        barrier.wait().await;
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap_or_else(|e| Err(e.to_string())));
        }
        results
    });
    let failures = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(first)) = results.iter().find(|r| r.is_err()) {
        eprintln!("first failure: {first}");
    }
    let mut first: Vec<Duration> = results.iter().filter_map(|r| r.as_ref().ok()).map(|t| t.first_body_byte).collect();
    let mut last: Vec<Duration> = results.iter().filter_map(|r| r.as_ref().ok()).map(|t| t.last_byte).collect();
    first.sort();
    last.sort();
    println!(
        "first_body_byte_p50_ms {:.1} first_body_byte_p90_ms {:.1} last_byte_p50_ms {:.1} last_byte_p90_ms {:.1} failures {failures}",
        percentile(&first, 50.0),
        percentile(&first, 90.0),
        percentile(&last, 50.0),
        percentile(&last, 90.0)
    );
}
