//! The client and origin of `benches/admission-attack.sh`.
//!
//!   attack origin PORT DELAY_MS CAPACITY
//!   attack load ADDR ORIGIN_PORT RATE RUN_SECONDS
//!
//! `origin` answers every GET with a 2 KiB body, public for 2 s, after DELAY_MS, at most
//! CAPACITY at a time (the rest wait: an origin of bounded capacity); it counts the
//! requests that carry the attacker's `x=` parameter and the others, and
//! `GET /_counts` answers `attacker others` and resets them.
//!
//! `load` runs two clients against bulwark at ADDR for RUN_SECONDS: the attacker, open
//! loop at RATE requests/s, asking `/products/1?x=<random>` with a random address on the
//! left of its `X-Forwarded-For`; and buyers (one of 512 addresses per request: many
//! people), four requests at a time over 200 hot pages (warmed first). A buyer's answer
//! counts as a hit when `Cache-Status` says so, stale copies included, which are also
//! counted apart. It prints one line of `key=value` figures: what the attacker got
//! (sent, 200s, 429s, other), what reached the origin from each, and the buyer's hit
//! ratio and latency percentiles.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[path = "support/percentile.rs"]
mod percentile;
use percentile::percentile;

const ATTACKER: &str = "203.0.113.66";
const HOT_PAGES: u32 = 200;

#[derive(Default)]
struct Counts {
    attacker: AtomicU64,
    others: AtomicU64,
}

async fn origin(port: u16, delay: Duration, capacity: usize) {
    let counts = Arc::new(Counts::default());
    let slots = Arc::new(tokio::sync::Semaphore::new(capacity));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the origin");
    let body = Bytes::from(vec![b'x'; 2048]);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (counts, slots, body) = (counts.clone(), slots.clone(), body.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let (counts, slots, body) = (counts.clone(), slots.clone(), body.clone());
                async move {
                    if req.uri().path() == "/_counts" {
                        let text = format!("{} {}", counts.attacker.swap(0, Ordering::Relaxed), counts.others.swap(0, Ordering::Relaxed));
                        return Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text))));
                    }
                    let attacker = req.uri().query().is_some_and(|q| q.contains("x="));
                    let count = if attacker { &counts.attacker } else { &counts.others };
                    count.fetch_add(1, Ordering::Relaxed);
                    let _slot = slots.acquire().await;
                    tokio::time::sleep(delay).await;
                    let mut response = http::Response::new(Full::new(body));
                    response.headers_mut().insert("cache-control", http::HeaderValue::from_static("public, max-age=2"));
                    Ok(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cached {
    No,
    Fresh,
    Stale,
}

/// One GET; its status and what `Cache-Status` says. Errors count as status 0.
async fn get(client: &HttpClient, addr: SocketAddr, path: &str, forwarded: &str) -> (u16, Cached) {
    let request = http::Request::get(format!("http://{addr}{path}"))
        .header("host", "shop.example")
        .header("x-forwarded-for", forwarded)
        .body(Empty::new())
        .expect("request");
    match tokio::time::timeout(Duration::from_secs(10), client.request(request)).await {
        Ok(Ok(response)) => {
            let cache_status = response.headers().get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or("");
            let cached = match (cache_status.contains("; hit"), cache_status.contains("fwd=stale")) {
                (false, _) => Cached::No,
                (true, false) => Cached::Fresh,
                (true, true) => Cached::Stale,
            };
            let status = response.status().as_u16();
            let complete = response.into_body().collect().await.is_ok();
            (if complete { status } else { 0 }, cached)
        }
        _ => (0, Cached::No),
    }
}

/// One of the buyers' addresses.
fn buyer_address() -> String {
    format!("198.51.{}.{}", 100 + fastrand::u8(..2), fastrand::u8(1..=255))
}

fn random_address() -> String {
    format!("{}.{}.{}.{}", fastrand::u8(1..224), fastrand::u8(..), fastrand::u8(..), fastrand::u8(1..255))
}

async fn counts(client: &HttpClient, origin: u16) -> String {
    let request = http::Request::get(format!("http://127.0.0.1:{origin}/_counts")).body(Empty::new()).expect("request");
    let response = client.request(request).await.expect("origin counts");
    String::from_utf8_lossy(&response.into_body().collect().await.expect("counts").to_bytes()).into_owned()
}

async fn load(addr: SocketAddr, origin: u16, rate: u64, run: Duration) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build_http();
    for page in 0..HOT_PAGES {
        get(&client, addr, &format!("/products/{page}"), &buyer_address()).await;
    }
    counts(&client, origin).await;
    let start = Instant::now();
    let statuses: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let attacker = {
        let (client, statuses) = (client.clone(), statuses.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1).div_f64(rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut sent = 0u64;
            let mut tasks = tokio::task::JoinSet::new();
            while start.elapsed() < run {
                tick.tick().await;
                sent += 1;
                let (client, statuses) = (client.clone(), statuses.clone());
                tasks.spawn(async move {
                    let path = format!("/products/1?x={:016x}", fastrand::u64(..));
                    let (status, _) = get(&client, addr, &path, &format!("{}, {ATTACKER}", random_address())).await;
                    let slot = match status {
                        200 => 0,
                        429 => 1,
                        _ => 2,
                    };
                    statuses[slot].fetch_add(1, Ordering::Relaxed);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
            sent
        })
    };
    let buyers: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let (mut latencies, mut hits, mut stale, mut failed) = (Vec::new(), 0usize, 0usize, 0usize);
                while start.elapsed() < run {
                    let began = Instant::now();
                    let (status, cache) = get(&client, addr, &format!("/products/{}", fastrand::u32(..HOT_PAGES)), &buyer_address()).await;
                    latencies.push(began.elapsed());
                    hits += usize::from(cache != Cached::No);
                    stale += usize::from(cache == Cached::Stale);
                    failed += usize::from(status != 200);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (latencies, hits, stale, failed)
            })
        })
        .collect();
    let (mut latencies, mut hits, mut stale, mut failed) = (Vec::new(), 0, 0, 0);
    for buyer in buyers {
        let (l, h, s, f) = buyer.await.expect("buyer");
        latencies.extend(l);
        hits += h;
        stale += s;
        failed += f;
    }
    let sent = attacker.await.expect("attacker");
    let elapsed = start.elapsed().as_secs_f64();
    let reached = counts(&client, origin).await;
    let (to_origin_attacker, to_origin_buyer) = reached.split_once(' ').unwrap_or(("?", "?"));
    latencies.sort();
    let [ok, limited, other] = [0, 1, 2].map(|i| statuses[i].load(Ordering::Relaxed));
    println!(
        "seconds={elapsed:.1} attacker_sent={sent} attacker_200={ok} attacker_429={limited} attacker_other={other} origin_from_attacker={to_origin_attacker} origin_from_attacker_per_s={:.1} origin_from_buyer={to_origin_buyer} buyer_requests={} buyer_failed={failed} buyer_hit_ratio={:.3} buyer_stale_ratio={:.3} buyer_p50_ms={:.2} buyer_p99_ms={:.2}",
        to_origin_attacker.parse::<f64>().unwrap_or(f64::NAN) / elapsed,
        latencies.len(),
        hits as f64 / latencies.len().max(1) as f64,
        stale as f64 / latencies.len().max(1) as f64,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let usage = "usage: attack origin PORT DELAY_MS CAPACITY | attack load ADDR ORIGIN_PORT RATE RUN_SECONDS";
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let number = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok()).expect(usage);
    match args.first().map(String::as_str) {
        Some("origin") => runtime.block_on(origin(number(1) as u16, Duration::from_millis(number(2)), number(3) as usize)),
        Some("load") => {
            let addr: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).expect(usage);
            runtime.block_on(load(addr, number(2) as u16, number(3), Duration::from_secs(number(4))));
        }
        _ => panic!("{usage}"),
    }
}
