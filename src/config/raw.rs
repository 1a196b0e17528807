//! The file format: what serde reads from TOML, before any validation.
//!
//! Every struct denies unknown keys, so a typo is reported with its line instead of being
//! silently ignored. Values that a later check may reject carry their span.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::units::{ByteSize, ConfigDuration, Rate};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub origins: Vec<RawOrigin>,
    #[serde(default)]
    pub pools: Vec<RawPool>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub tracing: Option<RawTracing>,
}

/// `[tracing]`: off unless `otlp_endpoint` is set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub otlp_endpoint: Option<Spanned<String>>,
    pub sample: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<String>>,
    pub admin_listen: Option<Spanned<String>>,
    pub admin_open: Option<bool>,
    pub keepalive_idle: Option<Spanned<ConfigDuration>>,
    pub listen_backlog: Option<Spanned<i64>>,
    pub header_read_timeout: Option<Spanned<ConfigDuration>>,
    pub send_timeout: Option<Spanned<ConfigDuration>>,
    pub drain_delay: Option<ConfigDuration>,
    pub shutdown_timeout: Option<ConfigDuration>,
    pub max_header_bytes: Option<ByteSize>,
    pub max_inflight_body_bytes: Option<Spanned<ByteSize>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    pub access_log: Option<AccessLog>,
    pub access_log_sample: Option<Spanned<f64>>,
    pub control_redis_url: Option<Spanned<String>>,
    pub control_redis_ca_file: Option<Spanned<String>>,
    pub replica_id: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOrigin {
    pub name: Spanned<String>,
    pub url: Option<Spanned<String>>,
    pub endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    pub discovery: Option<Spanned<String>>,
    pub resolve_interval: Option<Spanned<ConfigDuration>>,
    pub health_check: Option<Spanned<RawHealthCheck>>,
    pub eject_after_failures: Option<Spanned<i64>>,
    pub eject_for: Option<Spanned<ConfigDuration>>,
    pub max_ejected_percent: Option<Spanned<i64>>,
    pub slow_start: Option<ConfigDuration>,
    pub tls_server_name: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    pub client_cert: Option<Spanned<String>>,
    pub client_key: Option<Spanned<String>>,
    pub timeout: Option<Spanned<ConfigDuration>>,
    pub connect_timeout: Option<Spanned<ConfigDuration>>,
    pub pool_idle_timeout: Option<ConfigDuration>,
    pub connection_max_age: Option<Spanned<ConfigDuration>>,
    pub retries: Option<Spanned<i64>>,
    pub max_concurrency: Option<Spanned<i64>>,
    pub fleet_max_concurrency: Option<Spanned<i64>>,
    pub max_queue: Option<Spanned<i64>>,
    pub queue_timeout: Option<Spanned<ConfigDuration>>,
    pub host_header: Option<Spanned<String>>,
    pub content_codings: Option<Vec<Spanned<String>>>,
    pub breaker_consecutive_failures: Option<Spanned<i64>>,
    pub breaker_failure_rate: Option<Spanned<f64>>,
    pub breaker_min_requests: Option<Spanned<i64>>,
    pub breaker_window: Option<ConfigDuration>,
    pub breaker_open_for: Option<Spanned<ConfigDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: Spanned<String>,
    pub interval: Option<Spanned<ConfigDuration>>,
    pub timeout: Option<Spanned<ConfigDuration>>,
    pub unhealthy_after: Option<Spanned<i64>>,
    pub healthy_after: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: Spanned<String>,
    pub l1_max_bytes: Option<Spanned<ByteSize>>,
    pub redis_url: Option<Spanned<String>>,
    pub redis_ca_file: Option<Spanned<String>>,
    pub redis_cluster_nodes: Option<Spanned<Vec<String>>>,
    pub redis_timeout: Option<Spanned<ConfigDuration>>,
    pub key_prefix: Option<Spanned<String>>,
    pub max_object_bytes: Option<Spanned<ByteSize>>,
    pub stream_window: Option<Spanned<ByteSize>>,
    pub redis_write_queue_bytes: Option<Spanned<ByteSize>>,
    pub default_ttl: Option<ConfigDuration>,
    pub stale_while_revalidate: Option<ConfigDuration>,
    pub stale_if_error: Option<ConfigDuration>,
    pub lock_timeout: Option<Spanned<ConfigDuration>>,
    pub redis_breaker_failures: Option<Spanned<i64>>,
    pub tag_header: Option<Spanned<String>>,
    pub redis_breaker_probe_interval: Option<Spanned<ConfigDuration>>,
    pub max_variants: Option<Spanned<i64>>,
    pub keep_for_revalidation: Option<ConfigDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Spanned<String>,
    pub path_prefix: Spanned<String>,
    pub host: Option<Spanned<String>>,
    pub pool: Option<Spanned<String>>,
    pub origin: Spanned<String>,
    pub cache: Option<bool>,
    pub priority: Option<Priority>,
    pub mode: Option<Spanned<RouteMode>>,
    pub fallback: Option<Spanned<RawFallback>>,
    pub fallback_on: Option<Spanned<Vec<FallbackOn>>>,
    pub negative_ttl: Option<ConfigDuration>,
    pub stale_on_error: Option<StaleOnError>,
    pub force_ttl: Option<Spanned<ConfigDuration>>,
    pub ignore_no_cache: Option<bool>,
    pub ignore_request_cache_control: Option<bool>,
    #[serde(default)]
    pub ignore_query_params: Vec<Spanned<String>>,
    pub query_params: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub key_headers: Vec<Spanned<String>>,
    pub strip_cookies: Option<bool>,
    #[serde(default)]
    pub ignore_cookies: Vec<Spanned<String>>,
    pub targeted_cache_control: Option<Vec<Spanned<String>>>,
    pub admission: Option<Spanned<RawAdmission>>,
}

/// A route's `admission` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmission {
    pub per_client: Option<Spanned<Rate>>,
    pub per_client_burst: Option<Spanned<i64>>,
    pub new_keys: Option<Spanned<Rate>>,
    pub new_keys_burst: Option<Spanned<i64>>,
    pub client: Option<Spanned<String>>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub lease_block: Option<Spanned<i64>>,
}

/// Whether `must-revalidate`, `proxy-revalidate` and `s-maxage` forbid serving a stored
/// copy when the origin fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StaleOnError {
    /// As RFC 9111 says: those directives forbid it.
    #[default]
    Rfc,
    /// Serve stale copies on origin errors regardless: a deliberate deviation for origins
    /// known to fail daily.
    Always,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    pub status: Option<Spanned<i64>>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
}

/// Access log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    #[default]
    Off,
    Json,
    Text,
}

/// Which routes are shed first when their origin is saturated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    Critical,
}

/// Why the origin could not answer, for `fallback_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FallbackOn {
    /// The origin's concurrency limit and queue refused the request.
    Shed,
    /// No answer within the origin's `timeout`.
    Timeout,
    /// The origin's breaker is open.
    Breaker,
    /// No answer (connect error, reset, no endpoints) or a 500/502/503/504.
    Error,
}

/// What a route does with a request, switchable at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteMode {
    #[default]
    Normal,
    CacheOnly,
    Fallback,
    Off,
}

impl RouteMode {
    pub const ALL: [RouteMode; 4] = [RouteMode::Normal, RouteMode::CacheOnly, RouteMode::Fallback, RouteMode::Off];

    pub fn parse(text: &str) -> Option<RouteMode> {
        RouteMode::ALL.into_iter().find(|m| m.as_str() == text)
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(n: u8) -> RouteMode {
        RouteMode::ALL.get(usize::from(n)).copied().unwrap_or_default()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RouteMode::Normal => "normal",
            RouteMode::CacheOnly => "cache-only",
            RouteMode::Fallback => "fallback",
            RouteMode::Off => "off",
        }
    }
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::Critical => "critical",
        }
    }
}
