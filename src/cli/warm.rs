//! `bulwark warm --target URL --urls FILE`: pre-fills pools before an event by
//! requesting each URL through a running bulwark, with bounded concurrency and rate, a
//! progress line, and a summary.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

/// What a warmed URL turned out to be.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Result {
    Stored,
    AlreadyFresh,
    NotStored,
    Failed(String),
}

/// Reads URLs (one per line; blank lines and `#` comments skipped) from a file or `-`.
fn read_urls(source: &Path) -> std::io::Result<Vec<String>> {
    let reader: Box<dyn BufRead> = if source == Path::new("-") {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(source)?))
    };
    let mut urls = Vec::new();
    for line in reader.lines() {
        let line = line?;
        let line = line.trim();
        if !line.is_empty() && !line.starts_with('#') {
            urls.push(line.to_owned());
        }
    }
    Ok(urls)
}

/// The request for `url` sent to `target`: the URL's path and query, its host as `Host`.
fn request_for(target: &http::Uri, url: &str) -> std::result::Result<http::Request<Empty<Bytes>>, String> {
    let parsed: http::Uri = url.parse().map_err(|_| format!("not a URL: {url:?}"))?;
    let path = parsed.path_and_query().map_or("/", |p| p.as_str());
    let uri = format!("{}://{}{}", target.scheme_str().unwrap_or("http"), target.authority().map_or("", |a| a.as_str()), path);
    let mut req = http::Request::get(uri);
    if let Some(host) = parsed.authority() {
        req = req.header(http::header::HOST, host.as_str());
    }
    req.body(Empty::new()).map_err(|e| format!("{url}: {e}"))
}

pub fn run(target: String, urls: &Path, concurrency: usize, rate: f64) -> ExitCode {
    let target: http::Uri = match target.parse() {
        Ok(t) => t,
        Err(err) => {
            eprintln!("bulwark warm: invalid --target {target:?}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let urls = match read_urls(urls) {
        Ok(urls) => urls,
        Err(err) => {
            eprintln!("bulwark warm: cannot read {}: {err}", urls.display());
            return ExitCode::FAILURE;
        }
    };
    super::block_on(async move { summarise(&warm(target, urls, concurrency.max(1), rate).await) })
}

async fn warm(target: http::Uri, urls: Vec<String>, concurrency: usize, rate: f64) -> Vec<Result> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let slots = Arc::new(Semaphore::new(concurrency));
    let done = Arc::new(AtomicUsize::new(0));
    let total = urls.len();
    let start = Instant::now();
    // Paces request starts at `rate` per second (0: no limit).
    let spacing = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                let n = done.load(Ordering::Relaxed);
                let width = 40;
                let filled = (n * width).checked_div(total).unwrap_or(width).min(width);
                eprint!("\r[{}{}] {n}/{total} {:.0}/s ", "#".repeat(filled), " ".repeat(width - filled), n as f64 / start.elapsed().as_secs_f64().max(0.001));
                let _ = std::io::stderr().flush();
                if n >= total {
                    eprintln!();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut tasks = Vec::with_capacity(total);
    for (i, url) in urls.into_iter().enumerate() {
        if let Some(spacing) = spacing {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + spacing * u32::try_from(i).unwrap_or(u32::MAX))).await;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        let (client, target, done) = (client.clone(), target.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let result = fetch(&client, &target, &url).await;
            done.fetch_add(1, Ordering::Relaxed);
            result
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.unwrap_or_else(|e| Result::Failed(format!("task failed: {e}"))));
    }
    let _ = progress.await;
    results
}

async fn fetch(client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>, target: &http::Uri, url: &str) -> Result {
    let req = match request_for(target, url) {
        Ok(req) => req,
        Err(err) => return Result::Failed(err),
    };
    let res = match tokio::time::timeout(Duration::from_secs(30), client.request(req)).await {
        Ok(Ok(res)) => res,
        Ok(Err(err)) => return Result::Failed(format!("request failed: {err}")),
        Err(_) => return Result::Failed("no answer within 30s".into()),
    };
    let status = res.status();
    let cache_status = res.headers().get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    // Read the body, so the connection is reused and the fill completes.
    let _ = res.into_body().collect().await;
    if !status.is_success() {
        return Result::Failed(format!("HTTP {}", status.as_u16()));
    }
    // `; stored`: a miss that was stored, or a stale copy revalidated (and stored) anew.
    if cache_status.contains("; stored") || cache_status.contains("collapsed") {
        Result::Stored
    } else if cache_status.contains("; hit") {
        Result::AlreadyFresh
    } else {
        Result::NotStored
    }
}

fn summarise(results: &[Result]) -> ExitCode {
    let mut counts: BTreeMap<&Result, usize> = BTreeMap::new();
    for r in results {
        *counts.entry(r).or_default() += 1;
    }
    let count = |r: &Result| counts.get(r).copied().unwrap_or(0);
    let failed: usize = results.iter().filter(|r| matches!(r, Result::Failed(_))).count();
    println!(
        "{} URLs: {} stored, {} already fresh, {} answered but not stored, {} failed",
        results.len(),
        count(&Result::Stored),
        count(&Result::AlreadyFresh),
        count(&Result::NotStored),
        failed
    );
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for r in results {
        if let Result::Failed(reason) = r {
            *reasons.entry(reason.as_str()).or_default() += 1;
        }
    }
    for (reason, n) in reasons {
        println!("  failed ({n}): {reason}");
    }
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
