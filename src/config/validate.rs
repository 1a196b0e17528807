//! Stage two of loading: raw values into typed, cross-checked ones.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use toml::Spanned;

use super::raw::{self, RawConfig};
use super::units::{self, ConfigDuration};
use super::{
    AdmissionConfig, BreakerConfig, Budget, CacheRules, ClientBy, Config, Ejection, EndpointSource, Fallback, HealthCheck, HostMatch, MAX_EJECTION,
    OriginConfig, OriginTls, ParamPattern, PemFile, PoolConfig, RedisEndpoint, RouteConfig, RouteMode, ServerConfig, SharedTierConfig, TracingConfig,
};
use crate::encodings::Encodings;

/// A validation error with the span of the value at fault.
pub struct SpannedError {
    pub span: Range<usize>,
    pub message: String,
}

type Result<T> = std::result::Result<T, SpannedError>;

fn err<T>(span: Range<usize>, message: impl Into<String>) -> Result<T> {
    Err(SpannedError { span, message: message.into() })
}

fn dur(value: Option<ConfigDuration>, default: Duration) -> Duration {
    value.map_or(default, |d| d.0)
}

/// A duration that must be greater than zero (a zero timeout would fail every request).
fn nonzero_dur(value: Option<Spanned<ConfigDuration>>, default: Duration, key: &str) -> Result<Duration> {
    match value {
        None => Ok(default),
        Some(d) if d.get_ref().0.is_zero() => err(d.span(), format!("{key} must be greater than zero")),
        Some(d) => Ok(d.get_ref().0),
    }
}

/// A byte count of at least 1 KiB, `default` when not set.
fn at_least_1kib(value: Option<Spanned<super::units::ByteSize>>, default: usize, key: &str) -> Result<usize> {
    match value {
        None => Ok(default),
        Some(s) if s.get_ref().0 >= 1024 => Ok(usize::try_from(s.get_ref().0).unwrap_or(usize::MAX)),
        Some(s) => err(s.span(), format!("{key} must be at least 1KiB")),
    }
}

/// An IP network such as `10.0.0.0/8` or `::1/128`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> std::result::Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr.trim().parse().map_err(|_| format!("invalid IP address {addr:?}"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("invalid prefix length {p:?} (0..={max})"))?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

pub fn validate(raw: RawConfig) -> Result<Config> {
    let server = server(raw.server)?;
    let origins = unique_names(raw.origins, |o| &o.name, "origin")?.into_iter().map(origin).collect::<Result<Vec<_>>>()?;
    let pools = unique_names(raw.pools, |p| &p.name, "pool")?.into_iter().map(pool).collect::<Result<Vec<_>>>()?;
    let routes = unique_names(raw.routes, |r| &r.name, "route")?;
    let mut seen_matches = HashSet::new();
    let mut typed_routes = Vec::with_capacity(routes.len());
    for route in routes {
        let span = route.path_prefix.span();
        let typed = self::route(route, &origins, &pools, &server.trusted_proxies)?;
        if !seen_matches.insert((typed.host.clone(), typed.path_prefix.clone())) {
            return err(span, format!("another route already matches path_prefix {:?} on the same host", typed.path_prefix));
        }
        typed_routes.push(typed);
    }
    let tracing = match raw.tracing {
        None => None,
        Some(t) => tracing(t)?,
    };
    Ok(Config { server, origins, pools, routes: typed_routes, tracing })
}

/// `[tracing]`: an http(s) collector URL, and the sampled share from 0.0 to 1.0.
fn tracing(raw: raw::RawTracing) -> Result<Option<TracingConfig>> {
    let sample = match raw.sample {
        None => 0.01,
        Some(s) if (0.0..=1.0).contains(s.get_ref()) => *s.get_ref(),
        Some(s) => return err(s.span(), "tracing.sample must be between 0.0 and 1.0"),
    };
    let Some(endpoint) = raw.otlp_endpoint else { return Ok(None) };
    let uri: http::Uri = match endpoint.get_ref().parse() {
        Ok(uri) => uri,
        Err(_) => return err(endpoint.span(), format!("tracing.otlp_endpoint {:?} is not a URL", endpoint.get_ref())),
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return err(endpoint.span(), format!("tracing.otlp_endpoint {:?} must be an http:// or https:// URL", endpoint.get_ref()));
    }
    // A collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is written, gets the traces path.
    let uri = if uri.path() == "/" { format!("{}/v1/traces", endpoint.get_ref().trim_end_matches('/')).parse().unwrap_or(uri) } else { uri };
    Ok(Some(TracingConfig { otlp_endpoint: uri, sample }))
}

fn unique_names<T>(items: Vec<T>, name: impl Fn(&T) -> &Spanned<String>, what: &str) -> Result<Vec<T>> {
    let mut seen = HashSet::new();
    for item in &items {
        let name = name(item);
        if name.get_ref().trim().is_empty() {
            return err(name.span(), format!("{what} name must not be empty"));
        }
        if !seen.insert(name.get_ref().clone()) {
            return err(name.span(), format!("duplicate {what} name {:?}", name.get_ref()));
        }
    }
    Ok(items)
}

fn socket_addr(value: Option<Spanned<String>>, default: &str) -> Result<SocketAddr> {
    match value {
        None => Ok(default.parse().expect("default socket address is valid")),
        Some(v) => {
            v.get_ref().parse().or_else(|_| err(v.span(), format!("invalid listen address {:?}: expected IP:PORT such as \"0.0.0.0:8080\"", v.get_ref())))
        }
    }
}

fn server(raw: raw::RawServer) -> Result<ServerConfig> {
    let trusted_proxies = raw
        .trusted_proxies
        .iter()
        .map(|cidr| Cidr::parse(cidr.get_ref()).or_else(|msg| err(cidr.span(), format!("trusted_proxies: {msg}"))))
        .collect::<Result<Vec<_>>>()?;
    let access_log_sample = match raw.access_log_sample {
        None => 1.0,
        Some(s) if (0.0..=1.0).contains(s.get_ref()) => *s.get_ref(),
        Some(s) => return err(s.span(), "access_log_sample must be between 0.0 and 1.0"),
    };
    let control_redis_url = match raw.control_redis_url {
        None => None,
        Some(url) => Some(redis_url(&url)?),
    };
    let control_redis_ca = redis_ca(raw.control_redis_ca_file.as_ref(), control_redis_url.as_slice(), "control_redis_ca_file")?;
    let replica_id = match raw.replica_id {
        Some(id) if id.get_ref().is_empty() || id.get_ref().len() > 253 || id.get_ref().chars().any(|c| c.is_whitespace() || c.is_control()) => {
            return err(id.span(), "replica_id must be 1 to 253 characters with no spaces");
        }
        Some(id) => id.into_inner(),
        None => std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| format!("bulwark-{:08x}", fastrand::u32(..))),
    };
    let max_header_bytes = raw.max_header_bytes.map_or(64 * 1024, |s| s.0);
    let listen_backlog = match raw.listen_backlog {
        None => 4096,
        Some(b) => u32::try_from(*b.get_ref()).ok().filter(|b| *b > 0).map_or_else(|| err(b.span(), "listen_backlog must be a positive number"), Ok)?,
    };
    Ok(ServerConfig {
        listen: socket_addr(raw.listen, "0.0.0.0:8080")?,
        admin_listen: socket_addr(raw.admin_listen, "127.0.0.1:9901")?,
        admin_open: raw.admin_open.unwrap_or(false),
        keepalive_idle: nonzero_dur(raw.keepalive_idle, Duration::from_secs(75), "keepalive_idle")?,
        listen_backlog,
        header_read_timeout: nonzero_dur(raw.header_read_timeout, Duration::from_secs(10), "header_read_timeout")?,
        send_timeout: nonzero_dur(raw.send_timeout, Duration::from_secs(30), "send_timeout")?,
        drain_delay: dur(raw.drain_delay, Duration::from_secs(5)),
        shutdown_timeout: dur(raw.shutdown_timeout, Duration::from_secs(30)),
        max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX).max(8192),
        max_inflight_body_bytes: at_least_1kib(raw.max_inflight_body_bytes, 256 << 20, "max_inflight_body_bytes")?,
        trusted_proxies,
        access_log: raw.access_log.unwrap_or_default(),
        access_log_sample,
        control_redis_url,
        control_redis_ca,
        replica_id,
    })
}

/// `redis_ca_file` (or `control_redis_ca_file`, as `key`): read, and only beside
/// `rediss://` URLs (with `redis://` it would silently protect nothing).
fn redis_ca(file: Option<&Spanned<String>>, urls: &[String], key: &str) -> Result<Option<PemFile>> {
    let Some(file) = file else { return Ok(None) };
    if !urls.iter().all(|url| url.starts_with("rediss://")) {
        return err(file.span(), format!("{key} needs rediss:// Redis URLs (TLS)"));
    }
    pem_file(file, key, certificates).map(Some)
}

fn redis_url(url: &Spanned<String>) -> Result<String> {
    use redis::IntoConnectionInfo;
    match url.get_ref().as_str().into_connection_info() {
        Ok(_) => Ok(url.get_ref().clone()),
        Err(e) => err(url.span(), format!("invalid Redis URL {:?}: {e}", redacted(url.get_ref()))),
    }
}

/// A URL with the password of its userinfo (from `${NAME}`, say) replaced by `***`, fit
/// for an error message or a log.
pub fn redacted(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let authority_end = url[scheme_end..].find('/').map_or(url.len(), |i| scheme_end + i);
    match url[scheme_end..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &url[scheme_end..scheme_end + at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme_end], &userinfo[..colon], &url[scheme_end + at..]),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

fn positive(value: Option<Spanned<i64>>, default: usize, key: &str) -> Result<usize> {
    match value {
        None => Ok(default),
        Some(v) => match usize::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => Ok(n),
            _ => err(v.span(), format!("{key} must be a positive integer")),
        },
    }
}

/// A whole number within `range` (`message` otherwise), `default` when not set.
fn number_in(value: Option<&Spanned<i64>>, default: u32, range: std::ops::RangeInclusive<u32>, message: &str) -> Result<u32> {
    match value {
        None => Ok(default),
        Some(v) => u32::try_from(*v.get_ref()).ok().filter(|n| range.contains(n)).map_or_else(|| err(v.span(), message), Ok),
    }
}

/// An origin's `url` or one of its `endpoints`: http or https, a host, no query.
fn origin_url(text: &Spanned<String>, key: &str) -> Result<Uri> {
    let span = text.span();
    let uri: Uri = text.get_ref().parse().or_else(|e| err(span.clone(), format!("invalid origin {key}: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return err(span, format!("origin {key} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return err(span, format!("origin {key} must name a host"));
    }
    if uri.query().is_some() {
        return err(span, format!("origin {key} must not have a query string"));
    }
    Ok(uri)
}

/// `url`, `endpoints` and `discovery`: the origin's base URL and where its requests go.
fn origin_endpoints(raw: &raw::RawOrigin) -> Result<(Uri, EndpointSource)> {
    let interval = nonzero_dur(raw.resolve_interval.clone(), Duration::from_secs(5), "resolve_interval")?;
    match (&raw.url, &raw.endpoints) {
        (Some(_), Some(list)) => err(list.span(), "an origin has url or endpoints, not both"),
        (None, None) => err(raw.name.span(), "an origin needs url or endpoints"),
        (None, Some(list)) => {
            if let Some(discovery) = &raw.discovery {
                return err(discovery.span(), "discovery = \"dns\" resolves url's host: give url instead of endpoints");
            }
            let Some(first) = list.get_ref().first() else { return err(list.span(), "endpoints must not be empty") };
            let first = origin_url(first, "endpoint")?;
            let mut authorities = Vec::new();
            for text in list.get_ref() {
                let uri = origin_url(text, "endpoint")?;
                if uri.scheme() != first.scheme() {
                    return err(text.span(), "every endpoint of an origin has the same scheme");
                }
                if !matches!(uri.path(), "" | "/") {
                    return err(text.span(), "an endpoint has no path (put a base path in url instead)");
                }
                let Some(authority) = uri.authority().cloned() else { return err(text.span(), "origin endpoint must name a host") };
                if authorities.contains(&authority) {
                    return err(text.span(), format!("endpoint {authority} is listed twice"));
                }
                authorities.push(authority);
            }
            Ok((first, EndpointSource::Static(authorities)))
        }
        (Some(url), None) => {
            let uri = origin_url(url, "url")?;
            let source = match &raw.discovery {
                None => EndpointSource::Url,
                Some(d) if d.get_ref() == "dns" => {
                    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
                    if host.parse::<IpAddr>().is_ok() {
                        return err(url.span(), "discovery = \"dns\" needs a host name in url, not an address");
                    }
                    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
                    EndpointSource::Dns { host, port, interval }
                }
                Some(d) => return err(d.span(), format!("unknown discovery {:?} (only \"dns\")", d.get_ref())),
            };
            Ok((uri, source))
        }
    }
}

fn health_check(raw: Option<&Spanned<raw::RawHealthCheck>>) -> Result<Option<HealthCheck>> {
    let Some(raw) = raw else { return Ok(None) };
    let raw = raw.get_ref();
    let path = raw.path.get_ref();
    let path = match path.parse::<http::uri::PathAndQuery>() {
        Ok(p) if path.starts_with('/') => p,
        _ => return err(raw.path.span(), "health_check.path must be a path starting with /"),
    };
    let count = |value: &Option<Spanned<i64>>, default: u32, key: &str| {
        number_in(value.as_ref(), default, 1..=u32::MAX, &format!("health_check.{key} must be a positive integer"))
    };
    let interval = nonzero_dur(raw.interval.clone(), Duration::from_secs(2), "health_check.interval")?;
    let timeout = nonzero_dur(raw.timeout.clone(), Duration::from_secs(1), "health_check.timeout")?;
    if timeout > interval {
        let span = raw.timeout.as_ref().map_or_else(|| raw.interval.as_ref().map_or(raw.path.span(), |i| i.span()), |t| t.span());
        return err(span, format!("health_check.timeout ({timeout:?}) must not be longer than its interval ({interval:?})"));
    }
    Ok(Some(HealthCheck {
        path,
        interval,
        timeout,
        unhealthy_after: count(&raw.unhealthy_after, 3, "unhealthy_after")?,
        healthy_after: count(&raw.healthy_after, 2, "healthy_after")?,
    }))
}

fn ejection(raw: &raw::RawOrigin) -> Result<Ejection> {
    let after_failures = number_in(raw.eject_after_failures.as_ref(), 5, 1..=u32::MAX, "eject_after_failures must be a positive integer")?;
    let max_percent = number_in(raw.max_ejected_percent.as_ref(), 50, 0..=100, "max_ejected_percent must be between 0 and 100")?;
    let duration = nonzero_dur(raw.eject_for.clone(), Duration::from_secs(10), "eject_for")?;
    if duration > MAX_EJECTION
        && let Some(d) = &raw.eject_for
    {
        return err(d.span(), "eject_for must be at most 5m");
    }
    Ok(Ejection { after_failures, duration, max_percent })
}

/// Reads the PEM file a key names, and checks it holds what it must.
fn pem_file(value: &Spanned<String>, key: &str, check: impl Fn(&[u8]) -> std::result::Result<(), String>) -> Result<PemFile> {
    let path = std::path::PathBuf::from(value.get_ref());
    let pem = std::fs::read(&path).or_else(|e| err(value.span(), format!("{key}: cannot read {}: {e}", path.display())))?;
    check(&pem).or_else(|why| err(value.span(), format!("{key}: {}: {why}", path.display())))?;
    Ok(PemFile { path, pem })
}

fn certificates(pem: &[u8]) -> std::result::Result<(), String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let certs: std::result::Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(()),
        Ok(_) => Err("holds no PEM certificate".into()),
        Err(e) => Err(format!("not a PEM certificate: {e}")),
    }
}

fn private_key(pem: &[u8]) -> std::result::Result<(), String> {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    PrivateKeyDer::from_pem_slice(pem).map(drop).map_err(|e| format!("holds no PEM private key: {e}"))
}

fn origin_tls(raw: &raw::RawOrigin) -> Result<OriginTls> {
    let ca = raw.ca_file.as_ref().map(|f| pem_file(f, "ca_file", certificates)).transpose()?;
    let client = match (&raw.client_cert, &raw.client_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((pem_file(cert, "client_cert", certificates)?, pem_file(key, "client_key", private_key)?)),
        (Some(v), None) | (None, Some(v)) => return err(v.span(), "client_cert and client_key go together"),
    };
    Ok(OriginTls { ca, client })
}

fn origin(raw: raw::RawOrigin) -> Result<OriginConfig> {
    let (uri, endpoints) = origin_endpoints(&raw)?;
    let base_path = uri.path().trim_end_matches('/').to_owned();
    let (health_check, ejection) = (health_check(raw.health_check.as_ref())?, ejection(&raw)?);
    let tls = origin_tls(&raw)?;
    let tls_server_name = match &raw.tls_server_name {
        None => None,
        Some(name) => match rustls::pki_types::ServerName::try_from(name.get_ref().as_str()) {
            Ok(_) => Some(name.get_ref().clone()),
            Err(_) => return err(name.span(), format!("tls_server_name {:?} is not a DNS name or an address", name.get_ref())),
        },
    };
    let host_header = match raw.host_header {
        None => None,
        Some(h) => Some(HeaderValue::from_str(h.get_ref()).or_else(|_| err(h.span(), "host_header is not a valid header value"))?),
    };
    Ok(OriginConfig {
        name: raw.name.into_inner(),
        url: uri,
        base_path,
        endpoints,
        tls_server_name,
        tls,
        health_check,
        ejection,
        slow_start: dur(raw.slow_start, Duration::from_secs(30)),
        timeout: nonzero_dur(raw.timeout, Duration::from_secs(10), "timeout")?,
        connect_timeout: nonzero_dur(raw.connect_timeout, Duration::from_secs(2), "connect_timeout")?,
        pool_idle_timeout: dur(raw.pool_idle_timeout, Duration::from_secs(4)),
        connection_max_age: nonzero_dur(raw.connection_max_age, Duration::from_secs(60), "connection_max_age")?,
        retries: number_in(raw.retries.as_ref(), 1, 0..=5, "retries must be between 0 and 5")?,
        max_concurrency: positive(raw.max_concurrency, 256, "max_concurrency")?,
        fleet_max_concurrency: raw.fleet_max_concurrency.map(|v| positive(Some(v), 0, "fleet_max_concurrency")).transpose()?,
        max_queue: match raw.max_queue {
            None => 1024,
            Some(q) => usize::try_from(*q.get_ref()).or_else(|_| err(q.span(), "max_queue must not be negative"))?,
        },
        queue_timeout: nonzero_dur(raw.queue_timeout, Duration::from_secs(1), "queue_timeout")?,
        host_header,
        content_codings: match &raw.content_codings {
            None => Encodings::ORIGIN_DEFAULT,
            Some(names) => names.iter().try_fold(Encodings::IDENTITY, |set, name| match Encodings::named(name.get_ref().trim()) {
                Some(coding) => Ok(set.union(coding)),
                None => err(name.span(), format!("content_codings: unknown coding {:?} (gzip, br, zstd, or identity alone)", name.get_ref())),
            })?,
        },
        breaker: BreakerConfig {
            consecutive_failures: u32::try_from(positive(raw.breaker_consecutive_failures, 5, "breaker_consecutive_failures")?).unwrap_or(u32::MAX),
            failure_rate: match raw.breaker_failure_rate {
                None => 0.5,
                Some(r) if *r.get_ref() > 0.0 && *r.get_ref() <= 1.0 => *r.get_ref(),
                Some(r) => return err(r.span(), "breaker_failure_rate must be in (0.0, 1.0]"),
            },
            min_requests: u32::try_from(positive(raw.breaker_min_requests, 20, "breaker_min_requests")?).unwrap_or(u32::MAX),
            window: dur(raw.breaker_window, Duration::from_secs(10)),
            open_for: nonzero_dur(raw.breaker_open_for, Duration::from_secs(5), "breaker_open_for")?,
        },
    })
}

fn pool(raw: raw::RawPool) -> Result<PoolConfig> {
    let name = raw.name.get_ref().clone();
    let endpoint = match (&raw.redis_url, &raw.redis_cluster_nodes) {
        (Some(_), Some(nodes)) => return err(nodes.span(), "give redis_url or redis_cluster_nodes, not both"),
        (Some(url), None) => Some(RedisEndpoint::Single(redis_url(url)?)),
        (None, Some(nodes)) => {
            if nodes.get_ref().is_empty() {
                return err(nodes.span(), "redis_cluster_nodes must name at least one node");
            }
            let checked = nodes.get_ref().iter().map(|n| redis_url(&Spanned::new(nodes.span(), n.clone()))).collect::<Result<Vec<_>>>()?;
            Some(RedisEndpoint::Cluster(checked))
        }
        (None, None) => None,
    };
    let ca = redis_ca(raw.redis_ca_file.as_ref(), endpoint.as_ref().map_or(&[], RedisEndpoint::urls), "redis_ca_file")?;
    let shared = match endpoint {
        Some(endpoint) => Some(SharedTierConfig {
            endpoint,
            ca,
            timeout: raw.redis_timeout.as_ref().map_or(Duration::from_millis(50), |t| t.get_ref().0),
            breaker_failures: u32::try_from(positive(raw.redis_breaker_failures.clone(), 5, "redis_breaker_failures")?).unwrap_or(u32::MAX),
            breaker_probe_interval: nonzero_dur(raw.redis_breaker_probe_interval.clone(), Duration::from_millis(500), "redis_breaker_probe_interval")?,
        }),
        None => {
            let redis_only = [
                raw.redis_timeout.as_ref().map(|t| ("redis_timeout", t.span())),
                raw.redis_ca_file.as_ref().map(|t| ("redis_ca_file", t.span())),
                raw.redis_breaker_failures.as_ref().map(|t| ("redis_breaker_failures", t.span())),
                raw.redis_breaker_probe_interval.as_ref().map(|t| ("redis_breaker_probe_interval", t.span())),
            ];
            if let Some((key, span)) = redis_only.into_iter().flatten().next() {
                return err(span, format!("{key} is only allowed with redis_url or redis_cluster_nodes"));
            }
            None
        }
    };
    if let Some(shared) = &shared
        && shared.timeout.is_zero()
    {
        let span = raw.redis_timeout.as_ref().map_or_else(|| raw.name.span(), |t| t.span());
        return err(span, "redis_timeout must be greater than zero");
    }
    let l1_max_bytes = match raw.l1_max_bytes {
        None => 256 << 20,
        Some(s) if s.get_ref().0 >= 1024 => s.get_ref().0,
        Some(s) => return err(s.span(), "l1_max_bytes must be at least 1KiB"),
    };
    let max_object_bytes = match raw.max_object_bytes {
        None => 8 << 20,
        Some(s) => match usize::try_from(s.get_ref().0) {
            Ok(n) if n > 0 && (n as u64) <= u64::from(u32::MAX) => n,
            _ => return err(s.span(), "max_object_bytes must be between 1 byte and 4GiB"),
        },
    };
    let stream_window = match raw.stream_window {
        None => 16 << 20,
        Some(s) => match usize::try_from(s.get_ref().0) {
            Ok(n) if n >= 1024 && (n as u64) <= u64::from(u32::MAX) => n,
            _ => return err(s.span(), "stream_window must be between 1KiB and 4GiB"),
        },
    };
    let key_prefix = match raw.key_prefix {
        None => format!("bulwark:{name}:"),
        Some(p) if !p.get_ref().is_empty() => p.into_inner(),
        Some(p) => return err(p.span(), "key_prefix must not be empty"),
    };
    Ok(PoolConfig {
        name,
        l1_max_bytes,
        shared,
        key_prefix,
        max_object_bytes,
        stream_window,
        redis_write_queue_bytes: at_least_1kib(raw.redis_write_queue_bytes, 64 << 20, "redis_write_queue_bytes")?,
        default_ttl: dur(raw.default_ttl, Duration::from_secs(60)),
        stale_while_revalidate: dur(raw.stale_while_revalidate, Duration::from_secs(30)),
        stale_if_error: dur(raw.stale_if_error, Duration::from_secs(600)),
        lock_timeout: match raw.lock_timeout {
            None => Duration::from_secs(5),
            Some(t) if t.get_ref().0 >= Duration::from_millis(50) => t.get_ref().0,
            Some(t) => return err(t.span(), "lock_timeout must be at least 50ms (waiters would take over faster than an origin answers)"),
        },
        max_variants: match raw.max_variants {
            None => 32,
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(n) if (1..=1024).contains(&n) => n,
                _ => return err(n.span(), "max_variants must be between 1 and 1024"),
            },
        },
        keep_for_revalidation: dur(raw.keep_for_revalidation, Duration::from_secs(600)),
        tag_header: match raw.tag_header {
            None => http::HeaderName::from_static("surrogate-key"),
            Some(h) => HeaderName::from_bytes(h.get_ref().as_bytes()).or_else(|_| err(h.span(), "tag_header is not a valid header name"))?,
        },
    })
}

fn find(name: &Spanned<String>, names: impl Iterator<Item = String>, what: &str) -> Result<usize> {
    let known: Vec<String> = names.collect();
    match known.iter().position(|n| n == name.get_ref()) {
        Some(i) => Ok(i),
        None => err(name.span(), format!("unknown {what} {:?} (defined: {})", name.get_ref(), if known.is_empty() { "none".into() } else { known.join(", ") })),
    }
}

fn route(raw: raw::RawRoute, origins: &[OriginConfig], pools: &[PoolConfig], trusted_proxies: &[Cidr]) -> Result<RouteConfig> {
    let admission = match raw.admission {
        None => None,
        Some(a) => Some(admission(a, trusted_proxies)?),
    };
    let cache = raw.cache.unwrap_or(true);
    let pool = match &raw.pool {
        Some(pool) => Some(find(pool, pools.iter().map(|p| p.name.clone()), "pool")?),
        None if !cache => None,
        None => return err(raw.name.span(), format!("route {:?} needs a `pool` (only a route with `cache = false` has none)", raw.name.get_ref())),
    };
    let origin = find(&raw.origin, origins.iter().map(|o| o.name.clone()), "origin")?;
    let prefix = raw.path_prefix.get_ref();
    if !prefix.starts_with('/') {
        return err(raw.path_prefix.span(), format!("path_prefix {prefix:?} must start with '/'"));
    }
    let host = match &raw.host {
        None => None,
        Some(h) => Some(host_match(h)?),
    };
    let fallback = match raw.fallback {
        None => None,
        Some(f) => Some(fallback(f)?),
    };
    let fallback_on = match raw.fallback_on {
        Some(list) if !list.get_ref().is_empty() && fallback.is_none() => {
            return err(list.span(), "fallback_on needs a `fallback` response on this route");
        }
        Some(list) => list.into_inner(),
        None => Vec::new(),
    };
    let mode_from_file = raw.mode.is_some();
    let mode = match raw.mode {
        None => RouteMode::Normal,
        Some(m) if *m.get_ref() == RouteMode::Fallback && fallback.is_none() => {
            return err(m.span(), "mode \"fallback\" needs a `fallback` response on this route");
        }
        Some(m) => m.into_inner(),
    };
    Ok(RouteConfig {
        name: raw.name.into_inner(),
        path_prefix: raw.path_prefix.into_inner(),
        host,
        pool,
        origin,
        cacheable: cache,
        priority: raw.priority.unwrap_or_default(),
        mode,
        mode_from_file,
        fallback,
        fallback_on,
        negative_ttl: raw.negative_ttl.map(|d| d.0),
        stale_on_error: raw.stale_on_error.unwrap_or_default(),
        cache: CacheRules {
            force_ttl: match raw.force_ttl {
                None => None,
                Some(t) if t.get_ref().0.is_zero() => return err(t.span(), "force_ttl must be greater than zero"),
                Some(t) => Some(t.get_ref().0),
            },
            ignore_no_cache: raw.ignore_no_cache.unwrap_or(false),
            ignore_request_cache_control: raw.ignore_request_cache_control.unwrap_or(false),
            ignore_query_params: raw.ignore_query_params.iter().map(|p| name_pattern(p, "ignore_query_params", "parameter")).collect::<Result<Vec<_>>>()?,
            query_params: match &raw.query_params {
                None => None,
                Some(list) if !raw.ignore_query_params.is_empty() => {
                    return err(list.span(), "a route has query_params (an allow-list) or ignore_query_params, not both");
                }
                Some(list) => Some(list.get_ref().iter().map(|p| name_pattern(p, "query_params", "parameter")).collect::<Result<Vec<_>>>()?),
            },
            key_headers: header_names(&raw.key_headers, "key_headers")?,
            strip_cookies: raw.strip_cookies.unwrap_or(false),
            ignore_cookies: raw.ignore_cookies.iter().map(|p| name_pattern(p, "ignore_cookies", "cookie")).collect::<Result<Vec<_>>>()?,
            targeted_cache_control: match &raw.targeted_cache_control {
                None => vec![HeaderName::from_static("cdn-cache-control")],
                Some(names) => header_names(names, "targeted_cache_control")?,
            },
        },
        admission,
    })
}

/// A route's `admission` table. `per_client` needs `trusted_proxies` unless the client is
/// the peer: behind a load balancer every peer is one of its nodes, and a budget per
/// peer would throttle the whole site.
fn admission(raw: Spanned<raw::RawAdmission>, trusted_proxies: &[Cidr]) -> Result<AdmissionConfig> {
    let span = raw.span();
    let raw = raw.into_inner();
    let budget = |rate: Option<Spanned<units::Rate>>, burst: Option<Spanned<i64>>, key: &str| -> Result<Option<Budget>> {
        let Some(rate) = rate else {
            return match burst {
                Some(b) => err(b.span(), format!("admission: {key}_burst without {key}")),
                None => Ok(None),
            };
        };
        let rate = rate.into_inner();
        let burst = match burst {
            // One second's worth by default, at least one request.
            None => rate.per_second().ceil().clamp(1.0, 1_000_000.0) as u32,
            Some(b) => match u32::try_from(*b.get_ref()) {
                Ok(n) if (1..=1_000_000).contains(&n) => n,
                _ => return err(b.span(), format!("admission: {key}_burst must be between 1 and 1000000")),
            },
        };
        Ok(Some(Budget { rate, burst }))
    };
    let per_client_span = raw.per_client.as_ref().map(|r| r.span());
    let per_client = budget(raw.per_client, raw.per_client_burst, "per_client")?;
    let new_keys = budget(raw.new_keys, raw.new_keys_burst, "new_keys")?;
    if per_client.is_none() && new_keys.is_none() {
        return err(span, "admission needs per_client or new_keys (or both)");
    }
    let client = match &raw.client {
        None => ClientBy::Address,
        Some(c) => match c.get_ref().as_str() {
            "address" => ClientBy::Address,
            "peer" => ClientBy::Peer,
            text => match text.strip_prefix("header:").map(|name| HeaderName::from_bytes(name.trim().as_bytes())) {
                // The client writes these (a proxy appends to them): keyed on the whole
                // value, each spoofed variant would be a new client.
                Some(Ok(name)) if name == "x-forwarded-for" || name == http::header::FORWARDED => {
                    return err(
                        c.span(),
                        format!(
                            "admission: client {text:?} is written by the client itself; client = \"address\" walks X-Forwarded-For from the trusted proxies"
                        ),
                    );
                }
                Some(Ok(name)) => ClientBy::Header(name),
                _ => return err(c.span(), format!("admission: client {text:?} must be \"address\", \"peer\" or \"header:NAME\"")),
            },
        },
    };
    if let Some(at) = per_client_span
        && trusted_proxies.is_empty()
        && client != ClientBy::Peer
    {
        return err(
            at,
            "admission: per_client needs [server] trusted_proxies (the load balancers in front, whose X-Forwarded-For is believed), or client = \"peer\"; behind a load balancer every peer is one of its nodes",
        );
    }
    let methods = match &raw.methods {
        None => vec![http::Method::GET, http::Method::HEAD],
        Some(list) if list.is_empty() => return err(span, "admission: methods is empty (leave it out to charge GET and HEAD)"),
        Some(list) => {
            let mut methods = Vec::with_capacity(list.len());
            for m in list {
                match http::Method::from_bytes(m.get_ref().trim().as_bytes()) {
                    Ok(method) if m.get_ref().trim().bytes().all(|b| b.is_ascii_uppercase()) => methods.push(method),
                    _ => return err(m.span(), format!("admission: {:?} is not a method name (uppercase, such as \"GET\")", m.get_ref())),
                }
            }
            methods
        }
    };
    let lease_block = match raw.lease_block {
        None => crate::config::DEFAULT_LEASE_BLOCK,
        Some(b) => match u32::try_from(*b.get_ref()) {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => return err(b.span(), "admission: lease_block must be between 1 and 100"),
        },
    };
    Ok(AdmissionConfig { per_client, new_keys, client, methods, lease_block })
}

/// `name` or `prefix*`: a query parameter or cookie left out of the key (`what` names
/// which, in the error).
fn name_pattern(raw: &Spanned<String>, key: &str, what: &str) -> Result<ParamPattern> {
    let text = raw.get_ref();
    let separator = |c: char| if what == "cookie" { matches!(c, '=' | ';' | ',') } else { matches!(c, '&' | '=' | '#' | '?') };
    let invalid = |c: char| separator(c) || c.is_whitespace() || c.is_control();
    let (name, prefix) = match text.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (text.as_str(), false),
    };
    if name.is_empty() || name.contains(invalid) || name.contains('*') {
        return err(raw.span(), format!("{key}: {text:?} is not a {what} name or a prefix ending in '*'"));
    }
    Ok(if prefix { ParamPattern::Prefix(name.to_owned()) } else { ParamPattern::Exact(name.to_owned()) })
}

/// Header names, lowercased and without duplicates; hop-by-hop and key-managed headers
/// are refused where they could never work.
fn header_names(raw: &[Spanned<String>], key: &str) -> Result<Vec<HeaderName>> {
    let mut out: Vec<HeaderName> = Vec::with_capacity(raw.len());
    for name in raw {
        let parsed = HeaderName::from_bytes(name.get_ref().trim().as_bytes())
            .or_else(|_| err(name.span(), format!("{key}: {:?} is not a valid header name", name.get_ref())))?;
        let reserved = ["host", "accept-encoding", "connection", "te", "upgrade", "transfer-encoding", "keep-alive"];
        if key == "key_headers" && reserved.contains(&parsed.as_str()) {
            return err(
                name.span(),
                format!("{key}: {parsed} cannot be added to the key (host and Accept-Encoding are always in it; hop-by-hop headers never reach the origin)"),
            );
        }
        if !out.contains(&parsed) {
            out.push(parsed);
        }
    }
    if out.len() > 16 {
        return err(raw[16].span(), format!("{key}: at most 16 header names"));
    }
    Ok(out)
}

fn host_match(h: &Spanned<String>) -> Result<HostMatch> {
    let text = h.get_ref().trim().to_ascii_lowercase();
    let (wildcard, name) = match text.strip_prefix("*.") {
        Some(rest) => (true, rest.to_owned()),
        None => (false, text.clone()),
    };
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') && !name.starts_with('.') && !name.ends_with('.');
    if !valid {
        return err(h.span(), format!("invalid host {:?}: expected \"shop.example\" or \"*.shop.example\" (no port)", h.get_ref()));
    }
    Ok(if wildcard { HostMatch::Suffix(format!(".{name}")) } else { HostMatch::Exact(name) })
}

fn fallback(raw: Spanned<raw::RawFallback>) -> Result<Fallback> {
    let span = raw.span();
    let raw = raw.into_inner();
    let status = match raw.status {
        None => StatusCode::OK,
        Some(s) => u16::try_from(*s.get_ref())
            .ok()
            .and_then(|code| StatusCode::from_u16(code).ok())
            .filter(|code| code.as_u16() >= 200)
            .ok_or_else(|| SpannedError { span: s.span(), message: "fallback status must be an HTTP status 200..=999".into() })?,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &raw.headers {
        let parsed = HeaderName::from_bytes(name.as_bytes()).ok().zip(HeaderValue::from_str(value).ok());
        match parsed {
            Some((name, value)) => {
                headers.append(name, value);
            }
            None => return err(span, format!("fallback header {name:?} is not a valid header")),
        }
    }
    Ok(Fallback { status, headers, body: Bytes::from(raw.body) })
}
