//! Reading the client's request (host, scheme, peer) and preparing the request that
//! goes to the origin: hop-by-hop headers removed, `X-Forwarded-*` and `Via` set.

use std::net::{IpAddr, SocketAddr};

use http::header::{HOST, HeaderName, VIA};
use http::{HeaderMap, HeaderValue, Uri, Version, request};

use super::trust;
use crate::config::{Cidr, OriginConfig};
use crate::error::ProxyError;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// What bulwark knows about the client of a request.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Lowercase host, default port removed: the host part of the cache key.
    pub host: String,
    /// `http`, or the client's `X-Forwarded-Proto` when the peer is a trusted proxy.
    pub scheme: &'static str,
    pub peer: IpAddr,
    /// Whether the peer is one of `trusted_proxies`.
    pub trusted: bool,
}

impl ClientInfo {
    pub fn read(parts: &request::Parts, peer: SocketAddr, trusted_proxies: &[Cidr]) -> Result<ClientInfo, ProxyError> {
        let peer_ip = peer.ip();
        let trusted = trusted_proxies.iter().any(|c| c.contains(peer_ip));
        let scheme = match parts.headers.get(&X_FORWARDED_PROTO).map(HeaderValue::as_bytes) {
            Some(proto) if trusted && proto.eq_ignore_ascii_case(b"https") => "https",
            _ => "http",
        };
        let raw_host = match parts.headers.get(HOST) {
            Some(h) => h.to_str().map_err(|_| ProxyError::BadRequest("Host header is not valid text"))?,
            None => parts.uri.authority().map(|a| a.as_str()).ok_or(ProxyError::BadRequest("request has no Host"))?,
        };
        Ok(ClientInfo { host: normalise_host(raw_host, scheme)?, scheme, peer: peer_ip, trusted })
    }

    /// The host without its port, for matching route `host` keys.
    pub fn host_without_port(&self) -> &str {
        match self.host.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => host,
            _ => &self.host,
        }
    }
}

/// All field lines of `name` joined with ", " (RFC 9110 section 5.3), if any.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
    let first = values.next()?.to_owned();
    Some(values.fold(first, |mut acc, v| {
        acc.push_str(", ");
        acc.push_str(v);
        acc
    }))
}

/// Lowercases a host and removes the scheme's default port.
fn normalise_host(raw: &str, scheme: &str) -> Result<String, ProxyError> {
    let raw = raw.trim();
    let (host, port) = match raw.rsplit_once(':') {
        // An IPv6 literal without a port has colons but ends with ']'.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (raw, None),
    };
    let valid = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':'));
    if !valid {
        return Err(ProxyError::BadRequest("invalid Host"));
    }
    let mut out = host.to_ascii_lowercase();
    match port {
        None => {}
        Some(p) if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) => return Err(ProxyError::BadRequest("invalid Host port")),
        Some(p) if (scheme == "http" && p == "80") || (scheme == "https" && p == "443") => {}
        Some(p) => {
            out.push(':');
            out.push_str(p);
        }
    }
    Ok(out)
}

/// The URI of `uri`'s path and query on `origin`.
pub fn origin_uri(origin: &OriginConfig, uri: &Uri) -> Result<Uri, ProxyError> {
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut builder = Uri::builder().path_and_query(format!("{}{}", origin.base_path, path_and_query));
    if let Some(scheme) = origin.url.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = origin.url.authority() {
        builder = builder.authority(authority.clone());
    }
    builder.build().map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))
}

/// Turns the client's headers into the origin's: hop-by-hop removed, `Host` kept (or the
/// origin's `host_header`), `X-Forwarded-For` appended to, `X-Forwarded-Proto` and `Via` set.
pub fn forward_headers(parts: &request::Parts, client: &ClientInfo, origin: &OriginConfig) -> HeaderMap {
    let mut headers = parts.headers.clone();
    trust::strip_for_origin(&mut headers, client.trusted);
    match &origin.host_header {
        Some(host) => {
            headers.insert(HOST, host.clone());
        }
        None if !headers.contains_key(HOST) => {
            if let Some(authority) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                headers.insert(HOST, authority);
            }
        }
        None => {}
    }
    let peer = client.peer.to_string();
    let xff = match joined(&headers, &X_FORWARDED_FOR) {
        Some(previous) => format!("{previous}, {peer}"),
        None => peer,
    };
    if let Ok(xff) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), xff);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(client.scheme));
    let hop = match parts.version {
        Version::HTTP_2 => "2 bulwark",
        Version::HTTP_10 => "1.0 bulwark",
        _ => "1.1 bulwark",
    };
    let via = match joined(&headers, &VIA) {
        Some(previous) => format!("{previous}, {hop}"),
        None => hop.to_owned(),
    };
    if let Ok(via) = HeaderValue::from_str(&via) {
        headers.insert(VIA, via);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_normalisation() {
        assert_eq!(normalise_host("Shop.Example:80", "http").ok(), Some("shop.example".into()));
        assert_eq!(normalise_host("shop.example:8080", "http").ok(), Some("shop.example:8080".into()));
        assert_eq!(normalise_host("shop.example:443", "https").ok(), Some("shop.example".into()));
        assert_eq!(normalise_host("[::1]", "http").ok(), Some("[::1]".into()));
        assert_eq!(normalise_host("[::1]:80", "http").ok(), Some("[::1]".into()));
        assert!(normalise_host("evil/host", "http").is_err());
        assert!(normalise_host("host:x", "http").is_err());
        assert!(normalise_host("", "http").is_err());
    }
}
