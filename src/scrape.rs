//! Reading Prometheus text from a running replica's `/metrics`, over HTTP only.

use std::collections::BTreeMap;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (the subset bulwark writes: no escaped quotes or
/// commas inside label values, which bulwark's names never contain).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse::<f64>().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned())).collect();
            Some(Sample { name: name.to_owned(), labels, value })
        })
        .collect()
}

/// Sum of the samples of `name` whose labels include every pair in `labels`.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples.iter().filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))).map(|s| s.value).sum()
}

/// Cache outcomes that count as served from the cache in a hit ratio.
pub const HIT_OUTCOMES: [&str; 8] =
    ["hit_l1", "hit_l2", "collapsed", "revalidated", "stale_while_revalidate", "stale_if_error", "stale_cache_only", "stale_limited"];
/// Outcomes that served a stored copy past its freshness.
pub const STALE_OUTCOMES: [&str; 4] = ["stale_while_revalidate", "stale_if_error", "stale_cache_only", "stale_limited"];
/// Outcomes left out of a hit ratio's denominator.
pub const NOT_CACHE_OUTCOMES: [&str; 4] = ["bypass", "fallback", "off", "limited"];

/// Hit ratio of the requests matching `labels` (see DESIGN.md), `None` with no requests.
pub fn hit_ratio(samples: &[Sample], labels: &[(&str, &str)]) -> Option<f64> {
    let with = |cache: &str| {
        let mut all = labels.to_vec();
        all.push(("cache", cache));
        sum(samples, crate::metrics::REQUESTS_TOTAL, &all)
    };
    hit_ratio_of(sum(samples, crate::metrics::REQUESTS_TOTAL, labels), with)
}

/// Hit ratio of `total` requests whose count per `cache` outcome `count` gives:
/// hits over all but the outcomes left out, `None` when none are left.
pub fn hit_ratio_of(total: f64, count: impl Fn(&str) -> f64) -> Option<f64> {
    let served = total - NOT_CACHE_OUTCOMES.iter().map(|c| count(c)).sum::<f64>();
    (served > 0.0).then(|| HIT_OUTCOMES.iter().map(|c| count(c)).sum::<f64>() / served)
}

/// Whether an origin request's `status` label is a failure of the origin (5xx, timeout,
/// no connection, no answer).
pub fn is_origin_error(status: &str) -> bool {
    matches!(status, "5xx" | "timeout" | "connect_error" | "error")
}

/// A quantile from cumulative histogram buckets (linear within a bucket).
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(previous.0);
            }
            let within = if count > previous.1 { (rank - previous.1) / (count - previous.1) } else { 1.0 };
            return Some(previous.0 + (le - previous.0) * within);
        }
        previous = (le, count);
    }
    Some(previous.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_sums() {
        let text = "# TYPE bulwark_requests_total counter\n\
            bulwark_requests_total{route=\"a\",pool=\"p\",cache=\"hit_l1\"} 8\n\
            bulwark_requests_total{route=\"a\",pool=\"p\",cache=\"miss\"} 1\n\
            bulwark_requests_total{route=\"b\",pool=\"p\",cache=\"bypass\"} 5\n\
            bulwark_requests_total{route=\"b\",pool=\"p\",cache=\"stale_if_error\"} 1\n\
            bulwark_unrouted_requests_total 2\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 5);
        assert_eq!(sum(&samples, "bulwark_requests_total", &[("pool", "p")]), 15.0);
        assert_eq!(sum(&samples, "bulwark_unrouted_requests_total", &[]), 2.0);
        assert_eq!(hit_ratio(&samples, &[("pool", "p")]), Some(0.9));
        assert_eq!(hit_ratio(&samples, &[("pool", "none")]), None);
    }

    #[test]
    fn quantiles_from_buckets() {
        let buckets = [(0.001, 50.0), (0.01, 90.0), (0.1, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(&buckets, 0.5).expect("p50") - 0.001).abs() < 1e-9);
        let p99 = quantile(&buckets, 0.99).expect("p99");
        assert!(p99 > 0.01 && p99 <= 0.1, "{p99}");
        assert_eq!(quantile(&[(0.1, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
    }
}
