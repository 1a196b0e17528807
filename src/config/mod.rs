//! Configuration: the TOML file format ([`raw`]), units ([`units`]) and the validated,
//! typed values ([`Config`]) that the rest of the crate uses.
//!
//! Loading happens in two stages: serde reads the file into raw structs that keep the
//! spans of their values, then [`validate`] turns them into typed values (socket
//! addresses, durations, parsed URIs, pool and origin indices). Nothing past this module
//! sees a string that still has to be parsed, and every error names the file, the line
//! and the column of the value at fault.

mod env;
mod raw;
pub mod units;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, Uri};

pub use raw::{AccessLog, FallbackOn, Priority, RouteMode, StaleOnError};
pub use validate::Cidr;

/// An origin's circuit breaker (see `origin::breaker`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub open_for: Duration,
}

/// A validated configuration, ready to build a server from.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub origins: Vec<OriginConfig>,
    pub pools: Vec<PoolConfig>,
    pub routes: Vec<RouteConfig>,
    /// Request traces exported over OTLP, when `[tracing] otlp_endpoint` is set.
    pub tracing: Option<TracingConfig>,
}

/// `[tracing]`: where spans go and what share of requests is traced.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces URL (`http://otel-collector:4318/v1/traces`; a
    /// base URL without a path gets `/v1/traces`).
    pub otlp_endpoint: http::Uri,
    /// The share of traces sampled, by trace id (0.0 to 1.0).
    pub sample: f64,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Serve `/admin/*` on a non-loopback `admin_listen` without a token (deliberately).
    pub admin_open: bool,
    /// How long an idle client connection is kept open; longer than the load balancer's.
    /// For HTTP/1.1 this is also the longest time to receive a request's headers: hyper
    /// runs one timer from the moment it waits for the next request head.
    pub keepalive_idle: Duration,
    /// HTTP/1.1: a request head must be complete this long after its first byte.
    pub header_read_timeout: Duration,
    /// An origin body the client has not taken for this long is abandoned (its origin slot
    /// released, the client's response aborted); a client connection whose writes make no
    /// progress for this long is closed.
    pub send_timeout: Duration,
    /// Accept queue of both listeners (the kernel caps it at `net.core.somaxconn`): a
    /// burst of new connections beyond it loses SYNs, which clients retry after 1 s.
    pub listen_backlog: u32,
    /// After SIGTERM: how long to keep serving (with `/readyz` at 503) before closing the listener.
    pub drain_delay: Duration,
    /// After the drain: how long in-flight requests get to finish before the process exits.
    pub shutdown_timeout: Duration,
    pub max_header_bytes: usize,
    /// Storable bodies being read from origins, in bytes, per process; beyond it a
    /// response is streamed through unstored (reason `memory`).
    pub max_inflight_body_bytes: usize,
    pub trusted_proxies: Vec<Cidr>,
    pub access_log: AccessLog,
    pub access_log_sample: f64,
    pub control_redis_url: Option<String>,
    /// `control_redis_ca_file`: the roots trusted for a `rediss://` control Redis,
    /// instead of the public ones.
    pub control_redis_ca: Option<PemFile>,
    /// How this replica names itself to the others (mode acknowledgements): the
    /// config's `replica_id`, else `HOSTNAME`, else a random id.
    pub replica_id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OriginConfig {
    pub name: String,
    /// Scheme and authority of the origin, plus an optional base path (with `endpoints`,
    /// the first of them).
    pub url: Uri,
    pub base_path: String,
    /// Where requests go: `url` itself, a static list, or every address its host resolves to.
    pub endpoints: EndpointSource,
    /// The name TLS sends and checks, instead of the host requests are addressed to.
    pub tls_server_name: Option<String>,
    /// Extra trusted roots (`ca_file`) and a client certificate (`client_cert`, `client_key`).
    pub tls: OriginTls,
    pub health_check: Option<HealthCheck>,
    pub ejection: Ejection,
    /// How long a new or returning endpoint's share takes to ramp up (zero: at once).
    pub slow_start: Duration,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// Pooled connections are retired once this old (less up to 10% at random), so
    /// that a changed DNS answer or a new pod behind a Service gets traffic.
    pub connection_max_age: Duration,
    /// Further attempts of a GET or HEAD that got no answer at all (within the budget).
    pub retries: u32,
    pub max_concurrency: usize,
    /// The origin's budget across every replica: each takes its share of it.
    pub fleet_max_concurrency: Option<usize>,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    /// Sent as `Host` instead of the client's.
    pub host_header: Option<HeaderValue>,
    /// The content codings the origin can produce: clients' `Accept-Encoding` is reduced
    /// to these in the key and in the request to the origin.
    pub content_codings: crate::encodings::Encodings,
    pub breaker: BreakerConfig,
}

/// The endpoints of an origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSource {
    /// `url` alone: one endpoint, its host resolved for each new connection.
    Url,
    /// `endpoints`: these authorities, in rotation together.
    Static(Vec<http::uri::Authority>),
    /// `discovery = "dns"`: every address `host` resolves to (A records, else AAAA), on `port`.
    Dns { host: String, port: u16, interval: Duration },
}

/// TLS material of an origin, as read from its files: a reload that finds them changed
/// builds the origin anew (with the new roots or certificate).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginTls {
    pub ca: Option<PemFile>,
    /// The certificate chain and its private key.
    pub client: Option<(PemFile, PemFile)>,
}

/// A PEM file and what it held when the configuration was read.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

impl fmt::Debug for PemFile {
    // Never the contents: one of them is a private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemFile").field("path", &self.path).field("bytes", &self.pem.len()).finish()
    }
}

/// An origin's active health check (`health_check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

/// Passive ejection of failing endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Failures in a row (connect errors, resets, timeouts, 502/503/504) that eject.
    pub after_failures: u32,
    /// The first ejection's length; doubled on each ejection in a row, at most five minutes.
    pub duration: Duration,
    /// At most this share of the endpoints (rounded down) is ejected at once.
    pub max_percent: u32,
}

/// No ejection lasts longer, however often it is doubled.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub l1_max_bytes: u64,
    pub shared: Option<SharedTierConfig>,
    pub key_prefix: String,
    pub max_object_bytes: usize,
    /// How far behind the fastest reader a streamed fill that is not stored keeps its
    /// bytes; a reader further behind is cut.
    pub stream_window: usize,
    /// Pending Redis writes, in bytes; beyond it a write is dropped and counted.
    pub redis_write_queue_bytes: usize,
    pub default_ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub lock_timeout: Duration,
    /// Response header whose space-separated values tag an entry for purges.
    pub tag_header: http::HeaderName,
    /// Variants (by `Vary` or a route's `key_headers`) kept per URL and encoding.
    pub max_variants: usize,
    /// How long an entry with a validator is kept past its stale windows, only to be
    /// revalidated with a conditional request.
    pub keep_for_revalidation: Duration,
}

/// Where a pool's Redis lives: one server (`redis_url`) or a cluster
/// (`redis_cluster_nodes`, any of its nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisEndpoint {
    Single(String),
    Cluster(Vec<String>),
}

impl RedisEndpoint {
    /// Every URL it names: the server's, or each listed node's.
    pub fn urls(&self) -> &[String] {
        match self {
            RedisEndpoint::Single(url) => std::slice::from_ref(url),
            RedisEndpoint::Cluster(nodes) => nodes,
        }
    }
}

/// The Redis endpoint of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedTierConfig {
    pub endpoint: RedisEndpoint,
    /// `redis_ca_file`: the roots trusted for `rediss://`, instead of the public ones.
    pub ca: Option<PemFile>,
    /// Deadline of one Redis call.
    pub timeout: Duration,
    /// Failed calls in a row that open the pool's Redis breaker.
    pub breaker_failures: u32,
    /// How often an open breaker probes Redis.
    pub breaker_probe_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    pub host: Option<HostMatch>,
    /// Index into [`Config::pools`]; none for a pass-through route without one.
    pub pool: Option<usize>,
    /// Index into [`Config::origins`].
    pub origin: usize,
    /// `cache = false`: a pass-through route (`/account`, `/checkout`), never looked up,
    /// stored or coalesced; its requests are `bypass`.
    pub cacheable: bool,
    pub priority: Priority,
    pub mode: RouteMode,
    /// Whether the file set `mode` (a reload then applies it; otherwise the route keeps
    /// the mode it was switched to at runtime).
    pub mode_from_file: bool,
    pub fallback: Option<Fallback>,
    /// `fallback_on`: when the origin cannot answer for these reasons and nothing stored
    /// may be served, a GET or HEAD gets the fallback in any mode.
    pub fallback_on: Vec<FallbackOn>,
    pub negative_ttl: Option<Duration>,
    pub stale_on_error: StaleOnError,
    /// The route's overrides of the cache policy.
    pub cache: CacheRules,
    /// Budgets of requests sent to the origin (`admission`), if any.
    pub admission: Option<AdmissionConfig>,
}

/// A route's `admission`: budgets charged only by requests that reach the origin.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    /// Origin requests per client (`per_client`, `per_client_burst`).
    pub per_client: Option<Budget>,
    /// Distinct keys not stored sent to the origin for the route (`new_keys`).
    pub new_keys: Option<Budget>,
    /// Who the client is.
    pub client: ClientBy,
    /// The methods charged per client (GET and HEAD unless `methods` says otherwise).
    pub methods: Vec<http::Method>,
    /// Most tokens a replica takes from Redis in one call (`lease_block`, default 10):
    /// fewer calls under attack, at the price of tokens held by one replica.
    pub lease_block: u32,
}

/// Tokens a replica takes from Redis in one call unless `lease_block` says otherwise.
pub const DEFAULT_LEASE_BLOCK: u32 = 10;

/// A token bucket: `rate`, and at most `burst` tokens saved up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub rate: units::Rate,
    pub burst: u32,
}

/// How a request's client is found (`admission.client`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientBy {
    /// The first address not in `trusted_proxies`, walking the peer and then
    /// `X-Forwarded-For` from the right (IPv6 per /64).
    Address,
    /// The peer address, whatever the headers say.
    Peer,
    /// A header a trusted proxy sets (from any other peer: the address rule).
    Header(http::HeaderName),
}

/// A route's explicit overrides of the cache policy (all off by default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheRules {
    /// Freshness lifetime of every storable response below 400, whatever the origin says.
    pub force_ttl: Option<Duration>,
    /// Response `no-cache` is treated as absent (stored copies are reused while fresh).
    pub ignore_no_cache: bool,
    /// Request `Cache-Control` (`no-cache`, `max-age`, `max-stale`, `min-fresh`,
    /// `only-if-cached`) is ignored; `no-store` still bypasses.
    pub ignore_request_cache_control: bool,
    /// Query parameters left out of the key and of the origin request.
    pub ignore_query_params: Vec<ParamPattern>,
    /// `query_params`: the only parameters that enter the key and the origin request of
    /// a GET or HEAD (an allow-list; `None`: every parameter not ignored).
    pub query_params: Option<Vec<ParamPattern>>,
    /// Request headers added to the key (the route varies on them, whatever `Vary` says).
    pub key_headers: Vec<http::HeaderName>,
    /// `Cookie` removed from cacheable requests and `Set-Cookie` from their responses.
    pub strip_cookies: bool,
    /// Cookies (analytics and the like: `_ga*`) removed from cacheable requests before
    /// the key, the cookie rule and the origin see them.
    pub ignore_cookies: Vec<ParamPattern>,
    /// Targeted cache-control fields (RFC 9213), first present and valid one wins over
    /// `Cache-Control` and `Expires`; all are removed before the response goes out.
    pub targeted_cache_control: Vec<http::HeaderName>,
}

/// A query parameter or cookie name, or a prefix of names (`utm_*`, `_ga*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamPattern {
    Exact(String),
    Prefix(String),
}

impl CacheRules {
    /// Whether query parameter `name` enters the key (and the origin request).
    pub fn keeps_query_param(&self, name: &str) -> bool {
        match &self.query_params {
            Some(allowed) => allowed.iter().any(|pattern| pattern.matches(name)),
            None => !self.ignore_query_params.iter().any(|pattern| pattern.matches(name)),
        }
    }
}

impl ParamPattern {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            ParamPattern::Exact(exact) => name == exact,
            ParamPattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
        }
    }
}

/// A route's `host` key: an exact host or a `*.suffix` wildcard, lowercase, no port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    Exact(String),
    /// `*.shop.example`, stored as `.shop.example`.
    Suffix(String),
}

impl HostMatch {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(exact) => host == exact,
            HostMatch::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

/// A static response configured on a route.
#[derive(Debug, Clone)]
pub struct Fallback {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line and column; `None` when the error is not about a place in the file.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{}:{}: {}", self.path.display(), line, col, self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Settings that are valid but probably not what the operator meant, one sentence
    /// each (`bulwark check` prints them; the config still loads).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for route in &self.routes {
            let rules = &route.cache;
            if rules.force_ttl.is_some() && !rules.strip_cookies && !rules.key_headers.contains(&http::header::COOKIE) {
                out.push(format!(
                    "route {:?}: force_ttl stores answers to requests with Cookie, so a page rendered for one session would be served to others; set strip_cookies or add Cookie to key_headers",
                    route.name
                ));
            }
        }
        for pool in &self.pools {
            if pool.max_object_bytes > self.server.max_inflight_body_bytes {
                out.push(format!(
                    "pool {:?}: max_object_bytes ({} bytes) is over [server] max_inflight_body_bytes ({} bytes): responses between the two are never stored",
                    pool.name, pool.max_object_bytes, self.server.max_inflight_body_bytes
                ));
            }
            // Fills that are not stored take at most half the body budget.
            if pool.stream_window > self.server.max_inflight_body_bytes / 2 {
                out.push(format!(
                    "pool {:?}: stream_window ({} bytes) is over half of [server] max_inflight_body_bytes ({} bytes): responses over max_object_bytes are never coalesced",
                    pool.name, pool.stream_window, self.server.max_inflight_body_bytes
                ));
            }
            // A write holds the encoded entry twice (the command and its buffer).
            if pool.shared.is_some() && pool.redis_write_queue_bytes < pool.max_object_bytes.saturating_mul(2) {
                out.push(format!(
                    "pool {:?}: redis_write_queue_bytes ({} bytes) is under twice max_object_bytes ({} bytes): the largest entries are never written to Redis",
                    pool.name, pool.redis_write_queue_bytes, pool.max_object_bytes
                ));
            }
        }
        out
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            path: path.to_owned(),
            position: None,
            message: format!("cannot read config file: {err}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` is used in error messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, path, |name| std::env::var(name).ok())
    }

    /// [`Config::parse`] with `${NAME}` looked up by `env`.
    pub fn parse_with_env(text: &str, path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let at = |offset: usize, message: String| ConfigError { path: path.to_owned(), position: Some(line_col(text, offset)), message };
        // `${NAME}` references first; errors after it are placed in the file as written.
        let expanded = env::expand(text, env).map_err(|err| at(err.span.start, err.message))?;
        let locate = |span: Option<std::ops::Range<usize>>, message: String| ConfigError {
            path: path.to_owned(),
            position: span.map(|span| line_col(text, expanded.original(span.start))),
            message,
        };
        let raw: raw::RawConfig = toml::from_str(&expanded.text).map_err(|err| locate(err.span(), err.message().trim().to_owned()))?;
        validate::validate(raw).map_err(|err| locate(Some(err.span), err.message))
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests;
