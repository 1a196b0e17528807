//! The burst client of `benches/burst.sh`: `CLIENTS` clients connect at once (released
//! together by a barrier), each sends one GET for one of `KEYS` keys on a new connection
//! and reads the whole answer. Prints the latency percentiles, measured from the release
//! to the last byte (so a SYN dropped by a full accept queue, retried after 1 s, shows),
//! and the number of failures (errors, non-200 answers, short bodies, 30 s timeouts).
//! A failed request counts in the percentiles with the time it took to fail, so a server
//! that fails requests does not look faster.
//!
//!   cargo bench --bench burst -- ADDR CLIENTS KEYS RUN

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "support/percentile.rs"]
mod percentile;
use percentile::percentile;

/// One client: connect, ask, read to the end (the request says `Connection: close`).
async fn one(addr: SocketAddr, path: String) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::with_capacity(4096);
    stream.read_to_end(&mut answer).await.map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(text.lines().next().unwrap_or("no answer").to_owned());
    }
    let body = text.split_once("\r\n\r\n").map_or(0, |(_, body)| body.len());
    if body < 2048 {
        return Err(format!("short body: {body} bytes"));
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let [addr, clients, keys, run] = &args[..] else {
        eprintln!("usage: burst ADDR CLIENTS KEYS RUN");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is host:port");
    let clients: usize = clients.parse().expect("CLIENTS is a number");
    let keys: usize = keys.parse().expect("KEYS is a number");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let (mut latencies, failures) = runtime.block_on(async {
        let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let (barrier, path) = (barrier.clone(), format!("/spike/{run}/{}", i % keys));
                tokio::spawn(async move {
                    barrier.wait().await;
                    let start = Instant::now();
                    let result = tokio::time::timeout(Duration::from_secs(30), one(addr, path)).await.unwrap_or_else(|_| Err("timed out".into()));
                    (start.elapsed(), result)
                })
            })
            .collect();
        barrier.wait().await;
        let (mut latencies, mut failures) = (Vec::with_capacity(clients), Vec::new());
        for task in tasks {
            match task.await {
                Ok((took, Ok(()))) => latencies.push(took),
                Ok((took, Err(err))) => {
                    latencies.push(took);
                    failures.push(err);
                }
                Err(err) => failures.push(err.to_string()),
            }
        }
        (latencies, failures)
    });
    latencies.sort();
    if let Some(first) = failures.first() {
        eprintln!("{} failures, the first: {first}", failures.len());
    }
    println!("{:.0} {:.0} {:.0} {}", percentile(&latencies, 50.0), percentile(&latencies, 99.0), percentile(&latencies, 100.0), failures.len());
}
