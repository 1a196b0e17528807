//! `bulwark warm --target URL --urls FILE`: pre-fills pools before an event by
//! requesting each URL through a running bulwark as browsers will ask for it (the URL's
//! scheme as `X-Forwarded-Proto`, its host as `Host`, once per `Accept-Encoding` group),
//! with bounded concurrency and rate, a progress line, and a summary per group.

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

/// What browsers send, then the same with zstd, only gzip, and nothing: bulwark keys on
/// the group these reduce to among what the origin produces, so each group the origin
/// makes is filled once (a value that reduces to a group already filled is a hit).
pub const DEFAULT_ACCEPT_ENCODINGS: [&str; 4] = ["gzip, deflate, br", "gzip, deflate, br, zstd", "gzip", ""];

pub struct Options {
    pub target: String,
    pub urls: std::path::PathBuf,
    pub concurrency: usize,
    pub rate: f64,
    pub accept_encodings: Vec<String>,
    pub headers: Vec<String>,
}

/// One request to send: a URL, as asked with one `Accept-Encoding` (empty: none).
#[derive(Clone)]
struct Ask {
    url: String,
    accept_encoding: Arc<str>,
    headers: Arc<http::HeaderMap>,
}

/// The request for `ask` sent to `target`: the URL's path and query, its host as `Host`,
/// its scheme as `X-Forwarded-Proto` (bulwark keys on it, as it does when an ALB in front
/// forwards a browser's request).
fn request_for(target: &http::Uri, ask: &Ask) -> std::result::Result<http::Request<Empty<Bytes>>, String> {
    let url = &ask.url;
    let parsed: http::Uri = url.parse().map_err(|_| format!("not a URL: {url:?}"))?;
    let path = parsed.path_and_query().map_or("/", |p| p.as_str());
    let uri = format!("{}://{}{}", target.scheme_str().unwrap_or("http"), target.authority().map_or("", |a| a.as_str()), path);
    let mut req = http::Request::get(uri);
    for (name, value) in ask.headers.iter() {
        req = req.header(name, value);
    }
    if let Some(host) = parsed.authority() {
        req = req.header(http::header::HOST, host.as_str());
    }
    if let Some(scheme) = parsed.scheme_str() {
        req = req.header("x-forwarded-proto", scheme);
    }
    if !ask.accept_encoding.is_empty() {
        req = req.header(http::header::ACCEPT_ENCODING, &*ask.accept_encoding);
    }
    req.body(Empty::new()).map_err(|e| format!("{url}: {e}"))
}

/// `Name: Value` lines as headers.
fn parse_headers(lines: &[String]) -> std::result::Result<http::HeaderMap, String> {
    let mut headers = http::HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(|| format!("--header {line:?} is not Name: Value"))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| format!("--header {line:?}: bad name"))?;
        let value = http::HeaderValue::from_str(value.trim()).map_err(|_| format!("--header {line:?}: bad value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

pub fn run(options: Options) -> ExitCode {
    let fail = |message: String| {
        eprintln!("bulwark warm: {message}");
        ExitCode::FAILURE
    };
    let target: http::Uri = match options.target.parse() {
        Ok(t) => t,
        Err(err) => return fail(format!("invalid --target {:?}: {err}", options.target)),
    };
    let urls = match read_urls(&options.urls) {
        Ok(urls) => urls,
        Err(err) => return fail(format!("cannot read {}: {err}", options.urls.display())),
    };
    let headers = match parse_headers(&options.headers) {
        Ok(headers) => Arc::new(headers),
        Err(err) => return fail(err),
    };
    let encodings: Vec<Arc<str>> = if options.accept_encodings.is_empty() {
        DEFAULT_ACCEPT_ENCODINGS.iter().map(|e| Arc::from(*e)).collect()
    } else {
        options.accept_encodings.iter().map(|e| Arc::from(e.trim())).collect()
    };
    let asks: Vec<Ask> =
        urls.iter().flat_map(|url| encodings.iter().map(|e| Ask { url: url.clone(), accept_encoding: e.clone(), headers: headers.clone() })).collect();
    let (concurrency, rate) = (options.concurrency.max(1), options.rate);
    super::block_on(async move {
        let results = warm(target, asks.clone(), encodings.len(), concurrency, rate).await;
        summarise(urls.len(), &encodings, &asks, &results)
    })
}

/// Sends every ask, `per_url` at a time for one URL (in order), at most `concurrency`
/// URLs at once and `rate` request starts per second (0: no limit).
async fn warm(target: http::Uri, urls: Vec<Ask>, per_url: usize, concurrency: usize, rate: f64) -> Vec<Result> {
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
    // The next request's start, shared by the tasks so that starts keep to `rate`.
    let next_start = Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::from_std(start)));
    let mut tasks = Vec::with_capacity(total);
    // One URL's requests one after another, so a later `Accept-Encoding` that reduces to
    // a group already filled finds it stored rather than sharing its fill.
    for chunk in urls.chunks(per_url.max(1)) {
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        let (client, target, done, next_start, chunk) = (client.clone(), target.clone(), done.clone(), next_start.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let mut results = Vec::with_capacity(chunk.len());
            for ask in &chunk {
                if let Some(spacing) = spacing {
                    let at = {
                        let mut next = next_start.lock().await;
                        let at = *next;
                        *next = at.max(tokio::time::Instant::now()) + spacing;
                        at
                    };
                    tokio::time::sleep_until(at).await;
                }
                results.push(fetch(&client, &target, ask).await);
                done.fetch_add(1, Ordering::Relaxed);
            }
            results
        }));
    }
    let mut results = Vec::with_capacity(total);
    for task in tasks {
        match task.await {
            Ok(done) => results.extend(done),
            Err(e) => results.push(Result::Failed(format!("task failed: {e}"))),
        }
    }
    let _ = progress.await;
    results
}

async fn fetch(client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>, target: &http::Uri, ask: &Ask) -> Result {
    let req = match request_for(target, ask) {
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

/// The totals, then a line per `Accept-Encoding` sent: which variants were filled.
fn summarise(urls: usize, encodings: &[Arc<str>], asks: &[Ask], results: &[Result]) -> ExitCode {
    let line = |of: &mut dyn Iterator<Item = &Result>| {
        let mut counts: BTreeMap<&Result, usize> = BTreeMap::new();
        let mut failed = 0;
        for r in of {
            match r {
                Result::Failed(_) => failed += 1,
                r => *counts.entry(r).or_default() += 1,
            }
        }
        let count = |r: &Result| counts.get(r).copied().unwrap_or(0);
        format!(
            "{} stored, {} already fresh, {} answered but not stored, {failed} failed",
            count(&Result::Stored),
            count(&Result::AlreadyFresh),
            count(&Result::NotStored)
        )
    };
    let failed: usize = results.iter().filter(|r| matches!(r, Result::Failed(_))).count();
    println!("{urls} URLs, {} requests: {}", results.len(), line(&mut results.iter()));
    for encoding in encodings {
        let mut of = asks.iter().zip(results).filter(|(a, _)| a.accept_encoding == *encoding).map(|(_, r)| r);
        let name = if encoding.is_empty() { "no Accept-Encoding".to_owned() } else { format!("Accept-Encoding: {encoding}") };
        println!("  {name}: {}", line(&mut of));
    }
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
