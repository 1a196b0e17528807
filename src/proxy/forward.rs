//! Reading the client's request (host, scheme, peer) and preparing the request that
//! goes to the origin: hop-by-hop headers removed, `X-Forwarded-*` and `Via` set.

use std::net::{IpAddr, SocketAddr};

use http::header::{COOKIE, HOST, HeaderName, VIA};
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
    /// What names the client for the route's per-client budget (captured only on a route
    /// that has one, before its rules strip headers).
    pub source: Option<crate::admission::ClientSource>,
}

impl ClientInfo {
    pub fn read(parts: &request::Parts, peer: SocketAddr, trusted_proxies: &[Cidr]) -> Result<ClientInfo, ProxyError> {
        let peer_ip = peer.ip();
        let trusted = trusted_proxies.iter().any(|c| c.contains(peer_ip));
        let scheme = match parts.headers.get(&X_FORWARDED_PROTO).map(HeaderValue::as_bytes) {
            Some(proto) if trusted && proto.eq_ignore_ascii_case(b"https") => "https",
            _ => "http",
        };
        let header = match parts.headers.get(HOST) {
            Some(h) => Some(h.to_str().map_err(|_| ProxyError::BadRequest("Host header is not valid text"))?),
            None => None,
        };
        // The target's authority (absolute form, or h2's `:authority`) is the host, for
        // routing, the key and the origin alike (RFC 9112 section 3.2.2); an h2 request
        // whose `host` says otherwise is malformed (RFC 9113 section 8.3.1).
        let host = match (parts.uri.authority(), header) {
            (Some(authority), Some(header)) if parts.version == Version::HTTP_2 => {
                let host = normalise_host(authority.as_str(), scheme)?;
                if normalise_host(header, scheme)? != host {
                    return Err(ProxyError::BadRequest("host differs from :authority"));
                }
                host
            }
            (Some(authority), _) => normalise_host(authority.as_str(), scheme)?,
            (None, Some(header)) => normalise_host(header, scheme)?,
            (None, None) => return Err(ProxyError::BadRequest("request has no Host")),
        };
        Ok(ClientInfo { host, scheme, peer: peer_ip, trusted, source: None })
    }

    /// The host without its port, for matching route `host` keys.
    pub fn host_without_port(&self) -> &str {
        without_port(&self.host)
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

/// A normalised host without its port (an IPv6 literal keeps its brackets).
pub(super) fn without_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => name,
        _ => host,
    }
}

/// Lowercases a host, removes a trailing dot (`shop.example.` is `shop.example`) and the
/// scheme's default port, and writes the port as a number (`:080` is `:80`), so every
/// spelling of one host has one key.
pub(super) fn normalise_host(raw: &str, scheme: &str) -> Result<String, ProxyError> {
    let raw = raw.trim();
    let (host, port) = match raw.rsplit_once(':') {
        // An IPv6 literal without a port has colons but ends with ']'.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (raw, None),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':'));
    if !valid {
        return Err(ProxyError::BadRequest("invalid Host"));
    }
    let mut out = host.to_ascii_lowercase();
    match port {
        None => {}
        Some(p) => {
            let number = p.bytes().all(|b| b.is_ascii_digit()).then(|| p.parse::<u16>().ok()).flatten();
            match number {
                None => return Err(ProxyError::BadRequest("invalid Host port")),
                Some(80) if scheme == "http" => {}
                Some(443) if scheme == "https" => {}
                Some(n) => {
                    out.push(':');
                    out.push_str(&n.to_string());
                }
            }
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
        // The host as the key has it (the target's authority if there is one, lowercase,
        // no trailing dot, no default port): an answer rendered for one spelling is
        // stored under the key every spelling shares, so the origin sees that one.
        None => {
            if let Ok(host) = HeaderValue::from_str(&client.host) {
                headers.insert(HOST, host);
            }
        }
    }
    // h2 clients may split `cookie` into several fields; an HTTP/1.1 origin gets one
    // (RFC 9113 section 8.2.3).
    if headers.get_all(COOKIE).iter().nth(1).is_some() {
        let joined = headers.get_all(COOKIE).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join("; ");
        if let Ok(joined) = HeaderValue::from_str(&joined) {
            headers.insert(COOKIE, joined);
        }
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
        // One host, one key, however it is spelled.
        assert_eq!(normalise_host("shop.example.", "http").ok(), Some("shop.example".into()));
        assert_eq!(normalise_host("Shop.Example.:080", "http").ok(), Some("shop.example".into()));
        assert_eq!(normalise_host("shop.example:08080", "http").ok(), Some("shop.example:8080".into()));
        assert!(normalise_host("shop.example:99999", "http").is_err());
        assert!(normalise_host(".", "http").is_err());
    }
}
