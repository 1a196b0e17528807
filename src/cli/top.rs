//! `bulwark top --admin URL [--admin URL ...] [--once] [--json]`: a live per-route and
//! per-pool view of one or more replicas, summed, read from their `/metrics` over HTTP.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::metrics::{
    ENDPOINT_STATES, ORIGIN_CONCURRENCY_LIMIT, ORIGIN_ENDPOINTS, ORIGIN_INFLIGHT, ORIGIN_REQUESTS_TOTAL, REDIS_BREAKER_OPEN, REQUEST_DURATION, REQUESTS_TOTAL,
};
use crate::scrape::{self, Sample, quantile};

/// Totals of one route (counters since each replica started, summed).
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct RouteTotals {
    pub pool: String,
    pub requests: f64,
    /// Requests by `cache` outcome.
    pub outcomes: BTreeMap<String, f64>,
    pub origin_requests: f64,
    /// Origin answers 5xx, timeouts, connection errors.
    pub origin_errors: f64,
    /// Requests refused by an admission budget, by `reason` (`client`, `new_keys`).
    pub admission_rejected: BTreeMap<String, f64>,
    /// Fills whose answer was not stored, by `reason`.
    pub not_stored: BTreeMap<String, f64>,
    /// Cumulative latency histogram: upper bound (seconds) to count.
    #[serde(skip)]
    pub buckets: Vec<(f64, f64)>,
}

/// Totals of one pool.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct PoolTotals {
    pub requests: f64,
    pub hit_l1: f64,
    pub hit_l2: f64,
    pub stale: f64,
    pub collapsed: f64,
    /// Requests served from the cache, and those the ratio counts (all but bypass,
    /// fallback, off and limited): what a ratio over an interval is taken from.
    pub hits: f64,
    pub served: f64,
    pub hit_ratio: Option<f64>,
    /// Replicas whose Redis breaker for this pool is open.
    pub redis_breakers_open: f64,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    pub replicas: usize,
    pub routes: BTreeMap<String, RouteTotals>,
    pub pools: BTreeMap<String, PoolTotals>,
    /// Origins whose breaker is open, and on how many replicas.
    pub origin_breakers_open: BTreeMap<String, f64>,
    pub origins: BTreeMap<String, OriginView>,
}

/// One origin as the replicas see it.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct OriginView {
    /// Requests in flight, and the limits in force, summed over the replicas.
    pub inflight: f64,
    pub limit: f64,
    /// Endpoints per state: the fewest and the most any replica counts (replicas see
    /// the same endpoints, but may judge them apart).
    pub endpoints: BTreeMap<String, (f64, f64)>,
}

impl Snapshot {
    /// Builds a snapshot from the samples of every replica.
    pub fn from_samples(per_replica: &[Vec<Sample>]) -> Snapshot {
        let samples: Vec<&Sample> = per_replica.iter().flatten().collect();
        let mut snap = Snapshot { replicas: per_replica.len(), ..Snapshot::default() };
        let label = |s: &Sample, k: &str| s.labels.get(k).cloned().unwrap_or_default();
        for s in &samples {
            match s.name.as_str() {
                REQUESTS_TOTAL => {
                    let route = snap.routes.entry(label(s, "route")).or_default();
                    route.pool = label(s, "pool");
                    route.requests += s.value;
                    *route.outcomes.entry(label(s, "cache")).or_default() += s.value;
                }
                ORIGIN_REQUESTS_TOTAL => {
                    let route = snap.routes.entry(label(s, "route")).or_default();
                    route.origin_requests += s.value;
                    if scrape::is_origin_error(&label(s, "status")) {
                        route.origin_errors += s.value;
                    }
                }
                name if name == format!("{REQUEST_DURATION}_bucket") => {
                    let route = snap.routes.entry(label(s, "route")).or_default();
                    let le = match label(s, "le").as_str() {
                        "+Inf" => f64::INFINITY,
                        v => v.parse().unwrap_or(f64::INFINITY),
                    };
                    match route.buckets.iter_mut().find(|(b, _)| *b == le) {
                        Some((_, count)) => *count += s.value,
                        None => route.buckets.push((le, s.value)),
                    }
                }
                crate::metrics::ADMISSION_REJECTED_TOTAL => {
                    *snap.routes.entry(label(s, "route")).or_default().admission_rejected.entry(label(s, "reason")).or_default() += s.value;
                }
                crate::metrics::NOT_STORED_TOTAL => {
                    *snap.routes.entry(label(s, "route")).or_default().not_stored.entry(label(s, "reason")).or_default() += s.value;
                }
                REDIS_BREAKER_OPEN => snap.pools.entry(label(s, "pool")).or_default().redis_breakers_open += s.value,
                crate::metrics::ORIGIN_BREAKER_OPEN => *snap.origin_breakers_open.entry(label(s, "origin")).or_default() += s.value,
                _ => {}
            }
        }
        for route in snap.routes.values_mut() {
            route.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        for s in per_replica.iter().flatten() {
            if !matches!(s.name.as_str(), ORIGIN_INFLIGHT | ORIGIN_CONCURRENCY_LIMIT | ORIGIN_ENDPOINTS) {
                continue;
            }
            let view = snap.origins.entry(label(s, "origin")).or_default();
            match s.name.as_str() {
                ORIGIN_INFLIGHT => view.inflight += s.value,
                ORIGIN_CONCURRENCY_LIMIT => view.limit += s.value,
                _ => {
                    let range = view.endpoints.entry(label(s, "state")).or_insert((s.value, s.value));
                    *range = (range.0.min(s.value), range.1.max(s.value));
                }
            }
        }
        let owned: Vec<Sample> = samples.into_iter().cloned().collect();
        // Pass-through routes (`cache = false`, pool label "") have no pool to show.
        for route in snap.routes.values().filter(|r| !r.pool.is_empty()) {
            let pool = snap.pools.entry(route.pool.clone()).or_default();
            let get = |o: &str| route.outcomes.get(o).copied().unwrap_or(0.0);
            pool.requests += route.requests;
            pool.hit_l1 += get("hit_l1");
            pool.hit_l2 += get("hit_l2");
            pool.stale += scrape::STALE_OUTCOMES.iter().map(|o| get(o)).sum::<f64>();
            pool.collapsed += get("collapsed");
            pool.hits += scrape::HIT_OUTCOMES.iter().map(|o| get(o)).sum::<f64>();
            pool.served += route.requests - scrape::NOT_CACHE_OUTCOMES.iter().map(|o| get(o)).sum::<f64>();
        }
        for (name, pool) in snap.pools.iter_mut() {
            pool.hit_ratio = scrape::hit_ratio(&owned, &[("pool", name.as_str())]);
        }
        snap
    }
}

async fn scrape_all(client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>, admins: &[String]) -> Result<Vec<Vec<Sample>>, String> {
    let mut out = Vec::with_capacity(admins.len());
    for admin in admins {
        let url = format!("{}/metrics", admin.trim_end_matches('/'));
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let res = tokio::time::timeout(Duration::from_secs(3), client.get(uri))
            .await
            .map_err(|_| format!("{url}: no answer within 3s"))?
            .map_err(|e| format!("{url}: {e}"))?;
        if !res.status().is_success() {
            return Err(format!("{url}: HTTP {}", res.status()));
        }
        let body = res.into_body().collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
        out.push(scrape::parse(&String::from_utf8_lossy(&body)));
    }
    Ok(out)
}

pub fn run(admins: Vec<String>, once: bool, json: bool, interval: Duration) -> ExitCode {
    super::block_on(async move {
        let client = Client::builder(TokioExecutor::new()).build_http();
        let mut previous: Option<(Snapshot, Instant)> = None;
        loop {
            let snapshot = match scrape_all(&client, &admins).await {
                Ok(samples) => Snapshot::from_samples(&samples),
                Err(err) => {
                    eprintln!("bulwark top: {err}");
                    if once {
                        return ExitCode::FAILURE;
                    }
                    tokio::time::sleep(interval).await;
                    continue;
                }
            };
            let now = Instant::now();
            // One text frame is still over an interval: scrape, wait, scrape again.
            if once && !json && previous.is_none() {
                previous = Some((snapshot, now));
                tokio::time::sleep(interval).await;
                continue;
            }
            if once {
                if json {
                    match serde_json::to_string_pretty(&snapshot) {
                        Ok(text) => println!("{text}"),
                        Err(err) => {
                            eprintln!("bulwark top: {err}");
                            return ExitCode::FAILURE;
                        }
                    }
                } else {
                    let rates = previous.as_ref().map(|(before, at)| (before, now.duration_since(*at).as_secs_f64()));
                    print!("{}", render(&snapshot, rates));
                }
                return ExitCode::SUCCESS;
            }
            let rates = previous.as_ref().map(|(before, at)| (before, now.duration_since(*at).as_secs_f64()));
            print!("\x1b[2J\x1b[H{}", render(&snapshot, rates));
            previous = Some((snapshot, now));
            tokio::time::sleep(interval).await;
        }
    })
}

/// The terminal table: rates between two snapshots when `rates` is given, else totals.
pub fn render(now: &Snapshot, rates: Option<(&Snapshot, f64)>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let per = |value: f64, before: f64| match rates {
        Some((_, secs)) if secs > 0.0 => format!("{:.1}/s", (value - before) / secs),
        _ => format!("{value:.0}"),
    };
    let _ = writeln!(out, "bulwark top: {} replica(s){}", now.replicas, if rates.is_some() { ", rates over the last interval" } else { ", totals" });
    let _ = writeln!(
        out,
        "\n{:<20} {:<10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>12} {:>10} {:>8} {:>8}",
        "route", "pool", "requests", "hit", "l1", "l2", "stale", "origin req", "origin err", "p50 ms", "p99 ms"
    );
    for (name, route) in &now.routes {
        let before = rates.and_then(|(b, _)| b.routes.get(name));
        let delta = |f: fn(&RouteTotals) -> f64| f(route) - before.map_or(0.0, f);
        let outcome = |o: &str| route.outcomes.get(o).copied().unwrap_or(0.0) - before.and_then(|b| b.outcomes.get(o).copied()).unwrap_or(0.0);
        let served = delta(|r| r.requests) - scrape::NOT_CACHE_OUTCOMES.iter().map(|o| outcome(o)).sum::<f64>();
        let hits: f64 = scrape::HIT_OUTCOMES.iter().map(|o| outcome(o)).sum();
        let stale: f64 = scrape::STALE_OUTCOMES.iter().map(|o| outcome(o)).sum();
        let pct = |n: f64| if served > 0.0 { format!("{:.1}%", 100.0 * n / served) } else { "-".into() };
        let buckets: Vec<(f64, f64)> = route
            .buckets
            .iter()
            .map(|(le, c)| (*le, c - before.and_then(|b| b.buckets.iter().find(|(l, _)| l == le).map(|(_, c)| *c)).unwrap_or(0.0)))
            .collect();
        let ms = |q| quantile(&buckets, q).map_or("-".into(), |s| format!("{:.1}", s * 1000.0));
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>12} {:>10} {:>8} {:>8}",
            name,
            route.pool,
            per(route.requests, before.map_or(0.0, |b| b.requests)),
            pct(hits),
            pct(outcome("hit_l1")),
            pct(outcome("hit_l2")),
            pct(stale),
            per(route.origin_requests, before.map_or(0.0, |b| b.origin_requests)),
            per(route.origin_errors, before.map_or(0.0, |b| b.origin_errors)),
            ms(0.5),
            ms(0.99),
        );
        let total = |o: &str| (route.outcomes.get(o).copied().unwrap_or(0.0), before.and_then(|b| b.outcomes.get(o).copied()).unwrap_or(0.0));
        if outcome("shed") > 0.0 {
            let (value, before) = total("shed");
            let _ = writeln!(out, "{:<20} shed: {}", "", per(value, before));
        }
        // Why fills were not stored: the three commonest reasons of the interval.
        let mut reasons: Vec<(&String, f64, f64)> = route
            .not_stored
            .iter()
            .map(|(reason, value)| {
                let was = before.and_then(|b| b.not_stored.get(reason).copied()).unwrap_or(0.0);
                (reason, value - was, was)
            })
            .filter(|(_, delta, _)| *delta > 0.0)
            .collect();
        if !reasons.is_empty() {
            reasons.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            let shown: Vec<String> = reasons.iter().take(3).map(|(reason, delta, was)| format!("{reason} {}", per(was + delta, *was))).collect();
            let more = if reasons.len() > 3 { format!(" (+{} more)", reasons.len() - 3) } else { String::new() };
            let _ = writeln!(out, "{:<20} not stored: {}{more}", "", shown.join(", "));
        }
        // Over an admission budget: refused (429) and served stale instead, and which
        // budget refused them.
        if outcome("limited") + outcome("stale_limited") > 0.0 {
            let rejected = |reason: &str| {
                let value = route.admission_rejected.get(reason).copied().unwrap_or(0.0);
                per(value, before.and_then(|b| b.admission_rejected.get(reason).copied()).unwrap_or(0.0))
            };
            let ((limited, limited_before), (stale, stale_before)) = (total("limited"), total("stale_limited"));
            let _ = writeln!(
                out,
                "{:<20} limited: {} (429), {} served stale; over the client budget {}, the new-key budget {}",
                "",
                per(limited, limited_before),
                per(stale, stale_before),
                rejected("client"),
                rejected("new_keys"),
            );
        }
    }
    let _ = writeln!(out, "\n{:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>14}", "pool", "requests", "hit ratio", "l1", "l2", "collapsed", "redis breaker");
    for (name, pool) in &now.pools {
        // Live, every figure is over the last interval, the ratio too: a pool whose
        // requests all missed just now shows 0%, whatever it did since the start.
        let before = rates.and_then(|(b, _)| b.pools.get(name));
        let was = |f: fn(&PoolTotals) -> f64| before.map_or(0.0, f);
        let ratio = match rates {
            Some(_) => {
                let served = pool.served - was(|p| p.served);
                (served > 0.0).then(|| (pool.hits - was(|p| p.hits)) / served)
            }
            None => pool.hit_ratio,
        };
        let _ = writeln!(
            out,
            "{:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>14}",
            name,
            per(pool.requests, was(|p| p.requests)),
            ratio.map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
            per(pool.hit_l1, was(|p| p.hit_l1)),
            per(pool.hit_l2, was(|p| p.hit_l2)),
            per(pool.collapsed, was(|p| p.collapsed)),
            if pool.redis_breakers_open > 0.0 { format!("OPEN on {}", pool.redis_breakers_open) } else { "closed".into() }
        );
    }
    let _ = write!(out, "\n{:<20} {:>16}", "origin", "in flight/limit");
    for state in ENDPOINT_STATES {
        let _ = write!(out, " {state:>10}");
    }
    let _ = writeln!(out);
    for (name, origin) in &now.origins {
        let _ = write!(out, "{:<20} {:>16}", name, format!("{:.0}/{:.0}", origin.inflight, origin.limit));
        for state in ENDPOINT_STATES {
            let cell = match origin.endpoints.get(state) {
                None => "-".to_owned(),
                Some((low, high)) if low == high => format!("{low:.0}"),
                Some((low, high)) => format!("{low:.0}-{high:.0}"),
            };
            let _ = write!(out, " {cell:>10}");
        }
        let _ = writeln!(out);
    }
    let open: Vec<String> = now.origin_breakers_open.iter().filter(|(_, n)| **n > 0.0).map(|(o, n)| format!("{o} (on {n})")).collect();
    let _ = writeln!(out, "\norigin breakers open: {}", if open.is_empty() { "none".into() } else { open.join(", ") });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample { name: name.into(), labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(), value }
    }

    #[test]
    fn endpoints_per_state_show_where_replicas_disagree() {
        let replica = |ejected: f64| {
            vec![
                sample(ORIGIN_INFLIGHT, &[("origin", "catalog")], 3.0),
                sample(ORIGIN_CONCURRENCY_LIMIT, &[("origin", "catalog")], 4.0),
                sample(ORIGIN_ENDPOINTS, &[("origin", "catalog"), ("state", "healthy")], 3.0 - ejected),
                sample(ORIGIN_ENDPOINTS, &[("origin", "catalog"), ("state", "ejected")], ejected),
            ]
        };
        let snap = Snapshot::from_samples(&[replica(0.0), replica(1.0), replica(0.0)]);
        let catalog = &snap.origins["catalog"];
        assert_eq!((catalog.inflight, catalog.limit), (9.0, 12.0));
        assert_eq!(catalog.endpoints["ejected"], (0.0, 1.0));
        let text = render(&snap, None);
        let row = text.lines().find(|l| l.starts_with("catalog")).expect("origin row");
        assert!(row.contains("9/12") && row.contains("2-3") && row.contains("0-1"), "{row}");
    }

    #[test]
    fn limited_requests_are_shown_per_route_with_the_budget_that_refused_them() {
        let route = |cache: &str, value: f64| sample(REQUESTS_TOTAL, &[("route", "pdp"), ("pool", "p"), ("cache", cache)], value);
        let rejected = |reason: &str, value: f64| sample(crate::metrics::ADMISSION_REJECTED_TOTAL, &[("route", "pdp"), ("reason", reason)], value);
        let before = Snapshot::from_samples(&[vec![route("hit_l1", 100.0), route("limited", 0.0), rejected("client", 0.0)]]);
        let now = Snapshot::from_samples(&[vec![
            route("hit_l1", 200.0),
            route("limited", 40.0),
            route("stale_limited", 10.0),
            rejected("client", 45.0),
            rejected("new_keys", 5.0),
        ]]);
        let text = render(&now, Some((&before, 10.0)));
        let line = text.lines().find(|l| l.contains("limited:")).expect("a limited line");
        assert!(
            line.contains("4.0/s (429)")
                && line.contains("1.0/s served stale")
                && line.contains("client budget 4.5/s")
                && line.contains("new-key budget 0.5/s"),
            "{line}"
        );
        // The hit ratio leaves the refused requests out.
        let row = text.lines().find(|l| l.starts_with("pdp")).expect("route row");
        assert!(row.contains("100.0%"), "110 of 110 served from the cache once the 40 refused are left out: {row}");
        assert!(!render(&before, None).contains("limited:"), "no line while nothing is limited");
    }

    #[test]
    fn a_pools_live_hit_ratio_is_over_the_last_interval_not_since_the_start() {
        let route = |cache: &str, value: f64| sample(REQUESTS_TOTAL, &[("route", "pdp"), ("pool", "p"), ("cache", cache)], value);
        // 76% since the start; in the last interval every request missed.
        let before = Snapshot::from_samples(&[vec![route("hit_l1", 760.0), route("miss", 240.0)]]);
        let now = Snapshot::from_samples(&[vec![route("hit_l1", 760.0), route("miss", 340.0)]]);
        let text = render(&now, Some((&before, 10.0)));
        let row = text.lines().find(|l| l.starts_with("p ")).expect("pool row");
        assert!(row.contains(" 0.0%") && row.contains("10.0/s"), "{row}");
        let totals = render(&now, None);
        let row = totals.lines().find(|l| l.starts_with("p ")).expect("pool row");
        assert!(row.contains("69.1%") && row.contains("1100"), "totals with --once: {row}");
    }

    #[test]
    fn the_commonest_not_stored_reasons_are_shown_per_route() {
        let reason = |reason: &str, value: f64| sample(crate::metrics::NOT_STORED_TOTAL, &[("route", "pdp"), ("reason", reason)], value);
        let served = sample(REQUESTS_TOTAL, &[("route", "pdp"), ("pool", "p"), ("cache", "miss")], 100.0);
        let before = Snapshot::from_samples(&[vec![served.clone(), reason("private", 10.0), reason("no-store", 0.0), reason("status", 50.0)]]);
        let now = Snapshot::from_samples(&[vec![
            served,
            reason("private", 30.0),
            reason("no-store", 40.0),
            reason("status", 50.0),
            reason("set-cookie", 5.0),
            reason("too-large", 1.0),
        ]]);
        let text = render(&now, Some((&before, 10.0)));
        let line = text.lines().find(|l| l.contains("not stored:")).expect("a not-stored line");
        // Commonest first, over the interval: status did not grow and is left out.
        assert!(line.ends_with("not stored: no-store 4.0/s, private 2.0/s, set-cookie 0.5/s (+1 more)"), "{line}");
        assert!(render(&before, Some((&before, 10.0))).lines().all(|l| !l.contains("not stored:")), "no line while every fill is stored");
    }
}
