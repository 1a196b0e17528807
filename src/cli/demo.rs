//! `bulwark demo`: a sample origin with realistic latency, the proxy in front of it
//! (two in-process pools, no Redis, no config file, free ports), a short spike of
//! requests with a skewed key distribution, and the per-pool table at the end.

use std::convert::Infallible;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use xxhash_rust::xxh3::xxh3_64;

use crate::config::Config;
use crate::scrape;
use crate::server::{Listeners, run as run_server};

const PRODUCTS: u64 = 200;
const PAGES: u64 = 40;

pub fn run(requests: usize, concurrency: usize, keep: bool) -> ExitCode {
    super::block_on(async move {
        match demo(requests, concurrency.max(1), keep).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("demo failed: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn demo(requests: usize, concurrency: usize, keep: bool) -> Result<(), Box<dyn std::error::Error>> {
    let origin_listener = TcpListener::bind("127.0.0.1:0").await?;
    let origin_addr = origin_listener.local_addr()?;
    let origin_hits = Arc::new(AtomicUsize::new(0));
    tokio::spawn(sample_origin(origin_listener, origin_hits.clone()));

    let config = Config::parse(&demo_config(&format!("http://{origin_addr}")), Path::new("<demo>"))?;
    let listeners = Listeners { proxy: TcpListener::bind("127.0.0.1:0").await?, admin: TcpListener::bind("127.0.0.1:0").await? };
    let (proxy_addr, admin_addr) = (listeners.proxy.local_addr()?, listeners.admin.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run_server(listeners, config, async {
        let _ = stopped.await;
    }));

    println!("sample origin on {origin_addr} (20-60 ms per response), bulwark on {proxy_addr}, admin on {admin_addr}");
    println!("dashboard: http://{admin_addr}/dashboard");
    println!("spike: {requests} requests from {concurrency} concurrent clients; 70% product pages ({PRODUCTS}, skewed), 30% other pages ({PAGES})");
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next, failures) = (client.clone(), next.clone(), failures.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        break;
                    }
                    let uri = format!("http://{proxy_addr}{}", demo_path(i as u64));
                    let ok = match client.get(uri.parse().expect("demo URIs are valid")).await {
                        Ok(res) => res.status().is_success() && res.into_body().collect().await.is_ok(),
                        Err(_) => false,
                    };
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let elapsed = start.elapsed();

    let metrics = client.get(format!("http://{admin_addr}/metrics").parse()?).await?.into_body().collect().await?.to_bytes();
    let samples = scrape::parse(std::str::from_utf8(&metrics)?);
    println!(
        "\n{requests} requests in {:.2}s ({:.0} req/s), {} failed\n",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64(),
        failures.load(Ordering::Relaxed)
    );
    println!("{:<10} {:>9} {:>9} {:>10} {:>9} {:>10} {:>16}", "pool", "requests", "hit_l1", "collapsed", "miss", "hit ratio", "origin requests");
    for pool in ["pdp", "general"] {
        let labels = [("pool", pool)];
        let count = |cache: &str| scrape::sum(&samples, crate::metrics::REQUESTS_TOTAL, &[("pool", pool), ("cache", cache)]);
        let route = if pool == "pdp" { "product-detail" } else { "general" };
        let origin_requests = scrape::sum(&samples, crate::metrics::ORIGIN_REQUESTS_TOTAL, &[("route", route)]);
        let ratio = scrape::hit_ratio(&samples, &labels).map_or("-".to_owned(), |r| format!("{:.1}%", r * 100.0));
        println!(
            "{:<10} {:>9} {:>9} {:>10} {:>9} {:>10} {:>16}",
            pool,
            scrape::sum(&samples, crate::metrics::REQUESTS_TOTAL, &labels),
            count("hit_l1"),
            count("collapsed"),
            count("miss"),
            ratio,
            origin_requests
        );
    }
    let distinct: std::collections::HashSet<String> = (0..requests as u64).map(demo_path).collect();
    println!("\nthe origin saw {} requests for {} distinct pages", origin_hits.load(Ordering::Relaxed), distinct.len());

    if keep {
        println!("\nstaying up with light traffic (about 50 requests/s) until Ctrl-C; dashboard: http://{admin_addr}/dashboard");
        let light = tokio::spawn(async move {
            let mut i = requests as u64;
            loop {
                let uri = format!("http://{proxy_addr}{}", demo_path(i));
                if let Ok(uri) = uri.parse()
                    && let Ok(res) = client.get(uri).await
                {
                    let _ = res.into_body().collect().await;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        super::serve::shutdown_signal().await;
        light.abort();
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}

/// The i-th request's path: 70% product pages with a skew towards popular products.
fn demo_path(i: u64) -> String {
    let r = xxh3_64(&i.to_le_bytes());
    if r % 10 < 7 {
        // Squaring a uniform number skews towards low ids: a few hot products.
        let u = ((r >> 8) % 10_000) as f64 / 10_000.0;
        format!("/products/{}", (u * u * PRODUCTS as f64) as u64)
    } else {
        format!("/pages/{}", (r >> 8) % PAGES)
    }
}

fn demo_config(origin: &str) -> String {
    format!(
        r#"
[server]
drain_delay = "0s"
shutdown_timeout = "5s"

[[origins]]
name = "catalog"
url = "{origin}"
max_concurrency = 64

[[pools]]
name = "pdp"
l1_max_bytes = "16MiB"

[[pools]]
name = "general"
l1_max_bytes = "16MiB"

[[routes]]
name = "product-detail"
path_prefix = "/products/"
pool = "pdp"
origin = "catalog"

[[routes]]
name = "general"
path_prefix = "/"
pool = "general"
origin = "catalog"
"#
    )
}

/// A sample origin: 20-60 ms per response, a few KiB of JSON, cacheable for a minute.
async fn sample_origin(listener: TcpListener, hits: Arc<AtomicUsize>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let hits = hits.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let hits = hits.clone();
                async move {
                    hits.fetch_add(1, Ordering::Relaxed);
                    let path = req.uri().path().to_owned();
                    let latency = 20 + xxh3_64(path.as_bytes()) % 41;
                    tokio::time::sleep(Duration::from_millis(latency)).await;
                    let body = format!("{{\"path\":\"{path}\",\"description\":\"{}\"}}", "lorem ipsum ".repeat(160));
                    let mut res = Response::new(Full::new(Bytes::from(body)));
                    res.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
                    res.headers_mut().insert("cache-control", http::HeaderValue::from_static("max-age=60"));
                    Ok::<_, Infallible>(res)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
