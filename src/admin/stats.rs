//! The last 15 minutes at 1 s resolution, per route and pool, for `GET /stats.json` and
//! the dashboard page. Sampled once a second from this instance's own metrics (rendered
//! and read back, as a scrape would), so the request path does nothing more than update
//! the metrics it already updates; breaker, endpoint and mode states are read as they are.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::metrics::{NOT_STORED_TOTAL, ORIGIN_BREAKER_OPEN, ORIGIN_ENDPOINTS, ORIGIN_REQUESTS_TOTAL, REDIS_BREAKER_OPEN, REQUEST_DURATION, REQUESTS_TOTAL};
use crate::proxy::Proxy;
use crate::scrape::{self, Sample};

/// One point a second.
pub const STEP: Duration = Duration::from_secs(1);
/// Points kept: 15 minutes.
pub const KEPT: usize = 900;

/// The series of one route, newest last; `None` where there is no value (no requests
/// for a ratio or a quantile, or before the route existed).
#[derive(Debug, Default)]
struct RouteSeries {
    rps: VecDeque<Option<f64>>,
    hit_ratio: VecDeque<Option<f64>>,
    origin_rps: VecDeque<Option<f64>>,
    origin_errors: VecDeque<Option<f64>>,
    shed: VecDeque<Option<f64>>,
    limited: VecDeque<Option<f64>>,
    not_stored: VecDeque<Option<f64>>,
    p99_ms: VecDeque<Option<f64>>,
}

#[derive(Debug, Default)]
struct PoolSeries {
    rps: VecDeque<Option<f64>>,
    hit_ratio: VecDeque<Option<f64>>,
}

/// Counters as read at one sample, to take the next one's differences from.
#[derive(Debug, Default)]
struct Counters {
    /// Requests by route, then by `cache` outcome.
    routes: BTreeMap<String, BTreeMap<String, f64>>,
    pools: BTreeMap<String, BTreeMap<String, f64>>,
    origin: BTreeMap<String, (f64, f64)>,
    not_stored: BTreeMap<String, f64>,
    /// Cumulative duration buckets per route: upper bound (seconds), count.
    buckets: BTreeMap<String, Vec<(f64, f64)>>,
}

impl Counters {
    fn read(samples: &[Sample]) -> Counters {
        let mut c = Counters::default();
        let label = |s: &Sample, k: &str| s.labels.get(k).cloned().unwrap_or_default();
        for s in samples {
            match s.name.as_str() {
                REQUESTS_TOTAL => {
                    *c.routes.entry(label(s, "route")).or_default().entry(label(s, "cache")).or_default() += s.value;
                    let pool = label(s, "pool");
                    if !pool.is_empty() {
                        *c.pools.entry(pool).or_default().entry(label(s, "cache")).or_default() += s.value;
                    }
                }
                ORIGIN_REQUESTS_TOTAL => {
                    let entry = c.origin.entry(label(s, "route")).or_default();
                    entry.0 += s.value;
                    if scrape::is_origin_error(&label(s, "status")) {
                        entry.1 += s.value;
                    }
                }
                NOT_STORED_TOTAL => *c.not_stored.entry(label(s, "route")).or_default() += s.value,
                name if name.strip_suffix("_bucket") == Some(REQUEST_DURATION) => {
                    let le = label(s, "le").parse::<f64>().unwrap_or(f64::INFINITY);
                    let buckets = c.buckets.entry(label(s, "route")).or_default();
                    match buckets.iter_mut().find(|(b, _)| *b == le) {
                        Some((_, count)) => *count += s.value,
                        None => buckets.push((le, s.value)),
                    }
                }
                _ => {}
            }
        }
        for buckets in c.buckets.values_mut() {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        c
    }
}

/// Per second: requests by outcome between two readings (never negative).
fn outcome_rates(now: &BTreeMap<String, f64>, before: Option<&BTreeMap<String, f64>>, secs: f64) -> BTreeMap<String, f64> {
    now.iter().map(|(k, v)| (k.clone(), (v - before.and_then(|b| b.get(k)).copied().unwrap_or(0.0)).max(0.0) / secs)).collect()
}

/// Hit ratio of requests by outcome (as in DESIGN.md), `None` without any.
fn hit_ratio(rates: &BTreeMap<String, f64>) -> Option<f64> {
    scrape::hit_ratio_of(rates.values().sum(), |o| rates.get(o).copied().unwrap_or(0.0))
}

fn push(series: &mut VecDeque<Option<f64>>, value: Option<f64>, len: usize) {
    // A series that began later is padded, so every series of one answer lines up.
    while series.len() + 1 < len {
        series.push_front(None);
    }
    series.push_back(value.map(|v| (v * 1000.0).round() / 1000.0));
    while series.len() > KEPT {
        series.pop_front();
    }
}

#[derive(Debug, Default)]
struct Inner {
    previous: Option<(Counters, Instant)>,
    /// Points taken so far (at most [`KEPT`]).
    len: usize,
    /// Unix time of the newest point, in seconds.
    newest_unix_s: u64,
    routes: BTreeMap<String, RouteSeries>,
    pools: BTreeMap<String, PoolSeries>,
    origin_breakers: BTreeMap<String, bool>,
    redis_breakers: BTreeMap<String, bool>,
    endpoints: BTreeMap<String, BTreeMap<String, f64>>,
    modes: BTreeMap<String, String>,
    route_pools: BTreeMap<String, String>,
}

/// The ring buffer of one instance.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<Inner>,
}

impl Stats {
    /// Takes one point from the instance's metrics now.
    pub async fn sample(&self, proxy: &Proxy) {
        let runtime = proxy.runtime();
        for pool in &runtime.pools {
            pool.update_gauges().await;
        }
        let samples = scrape::parse(&proxy.live.registry.render());
        let counters = Counters::read(&samples);
        let modes = runtime.routes.iter().map(|r| (r.config.name.clone(), r.mode().as_str().to_owned())).collect();
        let route_pools = runtime.routes.iter().map(|r| (r.config.name.clone(), r.pool.as_ref().map_or(String::new(), |p| p.config.name.clone()))).collect();
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some((before, at)) = inner.previous.take() else {
            inner.previous = Some((counters, now));
            return;
        };
        let secs = now.duration_since(at).as_secs_f64().max(0.001);
        let len = (inner.len + 1).min(KEPT);
        inner.len = len;
        inner.newest_unix_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let rate = |now: f64, was: f64| Some((now - was).max(0.0) / secs);
        for (name, outcomes) in &counters.routes {
            let rates = outcome_rates(outcomes, before.routes.get(name), secs);
            let (origin, errors) = counters.origin.get(name).copied().unwrap_or_default();
            let (origin_was, errors_was) = before.origin.get(name).copied().unwrap_or_default();
            let buckets: Vec<(f64, f64)> = counters.buckets.get(name).map_or_else(Vec::new, |now| {
                let was = before.buckets.get(name);
                now.iter().map(|(le, c)| (*le, c - was.and_then(|w| w.iter().find(|(l, _)| l == le)).map_or(0.0, |(_, c)| *c))).collect()
            });
            let series = inner.routes.entry(name.clone()).or_default();
            push(&mut series.rps, Some(rates.values().sum()), len);
            push(&mut series.hit_ratio, hit_ratio(&rates), len);
            push(&mut series.origin_rps, rate(origin, origin_was), len);
            push(&mut series.origin_errors, rate(errors, errors_was), len);
            push(&mut series.shed, Some(rates.get("shed").copied().unwrap_or(0.0)), len);
            push(&mut series.limited, Some(rates.get("limited").copied().unwrap_or(0.0) + rates.get("stale_limited").copied().unwrap_or(0.0)), len);
            let not_stored = counters.not_stored.get(name).copied().unwrap_or(0.0);
            push(&mut series.not_stored, rate(not_stored, before.not_stored.get(name).copied().unwrap_or(0.0)), len);
            push(&mut series.p99_ms, scrape::quantile(&buckets, 0.99).map(|s| s * 1000.0), len);
        }
        for (name, outcomes) in &counters.pools {
            let rates = outcome_rates(outcomes, before.pools.get(name), secs);
            let series = inner.pools.entry(name.clone()).or_default();
            push(&mut series.rps, Some(rates.values().sum()), len);
            push(&mut series.hit_ratio, hit_ratio(&rates), len);
        }
        let gauge = |name: &str, key: &str| -> BTreeMap<String, bool> {
            samples.iter().filter(|s| s.name == name).map(|s| (s.labels.get(key).cloned().unwrap_or_default(), s.value > 0.0)).collect()
        };
        inner.origin_breakers = gauge(ORIGIN_BREAKER_OPEN, "origin");
        inner.redis_breakers = gauge(REDIS_BREAKER_OPEN, "pool");
        let mut endpoints: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == ORIGIN_ENDPOINTS) {
            let origin = s.labels.get("origin").cloned().unwrap_or_default();
            endpoints.entry(origin).or_default().insert(s.labels.get("state").cloned().unwrap_or_default(), s.value);
        }
        inner.endpoints = endpoints;
        inner.modes = modes;
        inner.route_pools = route_pools;
        inner.previous = Some((counters, now));
    }

    /// The `/stats.json` answer for the last `window` (at most [`KEPT`] points).
    pub fn json(&self, window: Duration) -> Value {
        let points = usize::try_from(window.as_secs()).unwrap_or(KEPT).clamp(1, KEPT);
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let tail = |series: &VecDeque<Option<f64>>| -> Value {
            let skip = series.len().saturating_sub(points);
            let mut values: Vec<Option<f64>> = series.iter().skip(skip).copied().collect();
            // Every series as long as the longest in the window.
            let want = inner.len.min(points);
            while values.len() < want {
                values.insert(0, None);
            }
            json!(values)
        };
        let routes: serde_json::Map<String, Value> = inner
            .routes
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    json!({
                        "rps": tail(&s.rps), "hit_ratio": tail(&s.hit_ratio), "origin_rps": tail(&s.origin_rps),
                        "origin_errors": tail(&s.origin_errors), "shed": tail(&s.shed), "limited": tail(&s.limited),
                        "not_stored": tail(&s.not_stored), "p99_ms": tail(&s.p99_ms),
                    }),
                )
            })
            .collect();
        let pools: serde_json::Map<String, Value> =
            inner.pools.iter().map(|(name, s)| (name.clone(), json!({"rps": tail(&s.rps), "hit_ratio": tail(&s.hit_ratio)}))).collect();
        json!({
            "step_s": STEP.as_secs(),
            "end_unix_s": inner.newest_unix_s,
            "points": inner.len.min(points),
            "routes": routes,
            "pools": pools,
            "breakers": {"origins": inner.origin_breakers, "redis": inner.redis_breakers},
            "endpoints": inner.endpoints,
            "modes": inner.modes,
            "route_pools": inner.route_pools,
        })
    }
}

/// Samples `stats` from `proxy` once a second until the task is dropped.
pub async fn sample_every_second(stats: std::sync::Arc<Stats>, proxy: std::sync::Arc<Proxy>) {
    let mut tick = tokio::time::interval(STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        stats.sample(&proxy).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_padded_to_line_up_and_kept_to_fifteen_minutes() {
        let mut s = VecDeque::new();
        push(&mut s, Some(1.0), 3);
        assert_eq!(s, [None, None, Some(1.0)]);
        for _ in 0..KEPT + 10 {
            push(&mut s, Some(2.0), KEPT);
        }
        assert_eq!(s.len(), KEPT);
    }

    #[test]
    fn the_hit_ratio_leaves_out_what_the_cache_did_not_decide() {
        let rates: BTreeMap<String, f64> = [("hit_l1", 6.0), ("miss", 2.0), ("limited", 10.0), ("bypass", 5.0)].map(|(k, v)| (k.to_owned(), v)).into();
        assert_eq!(hit_ratio(&rates), Some(0.75));
        assert_eq!(hit_ratio(&BTreeMap::new()), None);
    }
}
