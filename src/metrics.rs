//! Metric names in one place, the per-instance recorder, and the handles the request path
//! uses.
//!
//! Each server instance owns its own Prometheus recorder (never the process-global one),
//! so tests can run many instances in one process. Every handle is registered once, when
//! the configuration is loaded; the request path only increments pre-built handles and
//! never formats a label.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, Label, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::config::RouteMode;
use crate::outcome::{NotStored, Outcome};

pub const REQUESTS_TOTAL: &str = "bulwark_requests_total";
pub const REQUEST_DURATION: &str = "bulwark_request_duration_seconds";
pub const CLIENT_ABORTS_TOTAL: &str = "bulwark_client_aborts_total";
pub const NOT_STORED_TOTAL: &str = "bulwark_not_stored_total";
pub const ROUTE_MODE: &str = "bulwark_route_mode";
pub const ADMISSION_REJECTED_TOTAL: &str = "bulwark_admission_rejected_total";
/// The `reason` labels of [`ADMISSION_REJECTED_TOTAL`]: the budget that refused.
pub const ADMISSION_REASONS: [&str; 2] = ["client", "new_keys"];
pub const UNROUTED_TOTAL: &str = "bulwark_unrouted_requests_total";
pub const ORIGIN_REQUESTS_TOTAL: &str = "bulwark_origin_requests_total";
pub const ORIGIN_DURATION: &str = "bulwark_origin_duration_seconds";
pub const ORIGIN_QUEUE_WAIT: &str = "bulwark_origin_queue_wait_seconds";
pub const ORIGIN_INFLIGHT: &str = "bulwark_origin_inflight";
pub const ORIGIN_BREAKER_OPEN: &str = "bulwark_origin_breaker_open";
pub const ORIGIN_RETRIES_TOTAL: &str = "bulwark_origin_retries_total";
pub const ORIGIN_CONCURRENCY_LIMIT: &str = "bulwark_origin_concurrency_limit";
pub const ORIGIN_EJECTIONS_TOTAL: &str = "bulwark_origin_ejections_total";
pub const ORIGIN_ENDPOINTS: &str = "bulwark_origin_endpoints";
/// The `state` label of `bulwark_origin_endpoints`.
pub const ENDPOINT_STATES: [&str; 5] = ["healthy", "ejected", "unhealthy", "slow_start", "draining"];
pub const REDIS_ERRORS_TOTAL: &str = "bulwark_redis_errors_total";
pub const REDIS_BREAKER_OPEN: &str = "bulwark_redis_breaker_open";
pub const L1_BYTES: &str = "bulwark_l1_bytes";
pub const L1_ENTRIES: &str = "bulwark_l1_entries";
pub const L2_CORRUPT_TOTAL: &str = "bulwark_l2_corrupt_entries_total";
pub const REDIS_WRITES_DROPPED_TOTAL: &str = "bulwark_redis_writes_dropped_total";
pub const POST_GAP_REFRESHES_TOTAL: &str = "bulwark_post_gap_refreshes_total";
pub const L1_UNCONFIRMED: &str = "bulwark_l1_unconfirmed";
pub const REDIS_EVENTS_SUBSCRIBED: &str = "bulwark_redis_events_subscribed";
pub const CONFIG_RELOADS_TOTAL: &str = "bulwark_config_reloads_total";
pub const ACCESS_LOG_DROPPED_TOTAL: &str = "bulwark_access_log_dropped_total";

/// Latency buckets, in seconds: from a fast L1 hit to a slow origin.
const BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// `status` label values of `bulwark_origin_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginStatus {
    Class(u16),
    Timeout,
    ConnectError,
    /// The connection failed after it was made, with no response (reset, protocol error).
    Error,
}

impl OriginStatus {
    const LABELS: [&'static str; 8] = ["1xx", "2xx", "3xx", "4xx", "5xx", "timeout", "connect_error", "error"];

    fn index(self) -> usize {
        match self {
            OriginStatus::Class(status) => usize::from((status / 100).clamp(1, 5)) - 1,
            OriginStatus::Timeout => 5,
            OriginStatus::ConnectError => 6,
            OriginStatus::Error => 7,
        }
    }
}

/// Redis operations, the `op` label of `bulwark_redis_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOp {
    Connect,
    Get,
    Set,
    Del,
}

impl RedisOp {
    const LABELS: [&'static str; 4] = ["connect", "get", "set", "del"];

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a Redis write was dropped, the `reason` label of `bulwark_redis_writes_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteDropped {
    /// `redis_write_queue_bytes` was full.
    Queue,
    /// The write did not finish within its deadline.
    Deadline,
}

impl WriteDropped {
    const LABELS: [&'static str; 2] = ["queue", "deadline"];
}

/// The recorder of one server instance.
pub struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Registry {
    pub fn new() -> Registry {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        Registry { recorder, handle }
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder.register_counter(&key(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder.register_histogram(&key(name, labels), &METADATA)
    }

    /// Handles for one route: requests and durations per outcome, origin statuses.
    pub fn route(&self, route: &str, pool: &str, origin: &str) -> RouteMetrics {
        let labels = |cache| [("route", route), ("pool", pool), ("cache", cache)];
        RouteMetrics {
            requests: Outcome::LABELS.map(|cache| self.counter(REQUESTS_TOTAL, &labels(cache))),
            durations: Outcome::LABELS.map(|cache| self.histogram(REQUEST_DURATION, &labels(cache))),
            origin_status: OriginStatus::LABELS.map(|status| self.counter(ORIGIN_REQUESTS_TOTAL, &[("origin", origin), ("route", route), ("status", status)])),
            client_aborts: self.counter(CLIENT_ABORTS_TOTAL, &[("route", route)]),
            not_stored: NotStored::LABELS.map(|reason| self.counter(NOT_STORED_TOTAL, &[("route", route), ("reason", reason)])),
            admission_rejected: ADMISSION_REASONS.map(|reason| self.counter(ADMISSION_REJECTED_TOTAL, &[("route", route), ("reason", reason)])),
            modes: RouteMode::ALL.map(|mode| self.gauge(ROUTE_MODE, &[("route", route), ("mode", mode.as_str())])),
        }
    }

    pub fn origin(&self, origin: &str) -> OriginMetrics {
        let labels = [("origin", origin)];
        OriginMetrics {
            duration: self.histogram(ORIGIN_DURATION, &labels),
            queue_wait: self.histogram(ORIGIN_QUEUE_WAIT, &labels),
            inflight: self.gauge(ORIGIN_INFLIGHT, &labels),
            breaker_open: self.gauge(ORIGIN_BREAKER_OPEN, &labels),
            retries: self.counter(ORIGIN_RETRIES_TOTAL, &labels),
            concurrency_limit: self.gauge(ORIGIN_CONCURRENCY_LIMIT, &labels),
            ejections: self.counter(ORIGIN_EJECTIONS_TOTAL, &labels),
            endpoints: ENDPOINT_STATES.map(|state| self.gauge(ORIGIN_ENDPOINTS, &[("origin", origin), ("state", state)])),
        }
    }

    pub fn pool(&self, pool: &str) -> PoolMetrics {
        let labels = [("pool", pool)];
        PoolMetrics {
            redis_errors: RedisOp::LABELS.map(|op| self.counter(REDIS_ERRORS_TOTAL, &[("pool", pool), ("op", op)])),
            redis_breaker_open: self.gauge(REDIS_BREAKER_OPEN, &labels),
            l1_bytes: self.gauge(L1_BYTES, &labels),
            l1_entries: self.gauge(L1_ENTRIES, &labels),
            l2_corrupt: self.counter(L2_CORRUPT_TOTAL, &labels),
            post_gap_refreshes: self.counter(POST_GAP_REFRESHES_TOTAL, &labels),
            l1_unconfirmed: self.gauge(L1_UNCONFIRMED, &labels),
            writes_dropped: WriteDropped::LABELS.map(|reason| self.counter(REDIS_WRITES_DROPPED_TOTAL, &[("pool", pool), ("reason", reason)])),
            events_subscribed: self.gauge(REDIS_EVENTS_SUBSCRIBED, &labels),
        }
    }

    /// `bulwark_config_reloads_total{result="ok"}` and `{result="error"}`.
    pub fn reloads(&self) -> [Counter; 2] {
        ["ok", "error"].map(|result| self.counter(CONFIG_RELOADS_TOTAL, &[("result", result)]))
    }

    pub fn access_log_dropped(&self) -> Counter {
        self.counter(ACCESS_LOG_DROPPED_TOTAL, &[])
    }

    pub fn unrouted(&self) -> Counter {
        self.counter(UNROUTED_TOTAL, &[])
    }

    /// Prometheus text exposition of every metric of this instance.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

static METADATA: metrics::Metadata<'static> = metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, (*v).to_owned())).collect();
    Key::from_parts(name, labels)
}

/// Pre-registered handles of one route.
pub struct RouteMetrics {
    requests: [Counter; Outcome::LABELS.len()],
    durations: [Histogram; Outcome::LABELS.len()],
    origin_status: [Counter; OriginStatus::LABELS.len()],
    client_aborts: Counter,
    not_stored: [Counter; NotStored::LABELS.len()],
    admission_rejected: [Counter; ADMISSION_REASONS.len()],
    /// 1 for the route's current mode, 0 for the others.
    modes: [Gauge; RouteMode::ALL.len()],
}

impl RouteMetrics {
    /// Shows `mode` as the route's current one.
    pub fn show_mode(&self, mode: RouteMode) {
        for (gauge, m) in self.modes.iter().zip(RouteMode::ALL) {
            gauge.set(if m == mode { 1.0 } else { 0.0 });
        }
    }

    /// One record per request: its outcome and total duration.
    pub fn record(&self, outcome: Outcome, seconds: f64) {
        let i = outcome.index();
        self.requests[i].increment(1);
        self.durations[i].record(seconds);
    }

    /// A client that went away before its response ended (recorded as well).
    pub fn client_abort(&self) {
        self.client_aborts.increment(1);
    }

    /// A fill whose answer was not stored, once per fill.
    /// A request refused by the admission budget at `reason` of [`ADMISSION_REASONS`].
    pub fn admission_rejected(&self, reason: usize) {
        if let Some(counter) = self.admission_rejected.get(reason) {
            counter.increment(1);
        }
    }

    pub fn not_stored(&self, reason: NotStored) {
        self.not_stored[reason.index()].increment(1);
    }

    pub fn origin_response(&self, status: OriginStatus) {
        self.origin_status[status.index()].increment(1);
    }
}

/// Pre-registered handles of one origin.
pub struct OriginMetrics {
    pub duration: Histogram,
    pub queue_wait: Histogram,
    pub inflight: Gauge,
    pub breaker_open: Gauge,
    /// Attempts made again after one got no answer.
    pub retries: Counter,
    /// The concurrency limit in force (this replica's).
    pub concurrency_limit: Gauge,
    pub ejections: Counter,
    /// Endpoints per state, in the order of [`ENDPOINT_STATES`].
    pub endpoints: [Gauge; 5],
}

/// Pre-registered handles of one pool.
pub struct PoolMetrics {
    redis_errors: [Counter; RedisOp::LABELS.len()],
    pub redis_breaker_open: Gauge,
    pub l1_bytes: Gauge,
    pub l1_entries: Gauge,
    pub l2_corrupt: Counter,
    writes_dropped: [Counter; WriteDropped::LABELS.len()],
    /// Copies kept through a Redis that came back empty, served stale while refreshed.
    pub post_gap_refreshes: Counter,
    /// Copies kept through a link gap, not yet checked against Redis.
    pub l1_unconfirmed: Gauge,
    /// 1 while the pool's Redis event subscription (fills, leases) is up.
    pub events_subscribed: Gauge,
}

impl PoolMetrics {
    pub fn redis_error(&self, op: RedisOp) {
        self.redis_errors[op.index()].increment(1);
    }

    pub fn write_dropped(&self, why: WriteDropped) {
        self.writes_dropped[why as usize].increment(1);
    }
}

/// Shared so that pools, origins and routes can hold handles from one registry.
pub type SharedRegistry = Arc<Registry>;
