//! What of a client's request may reach the origin, and what may select a stored
//! variant: hop-by-hop headers (and those `Connection` names) never; headers that change
//! what an origin serves without being in the key (host, path and method overrides)
//! only when the route keys on them; routing headers only from trusted proxies.

use http::header::{CONNECTION, COOKIE, HOST, HeaderName};
use http::{HeaderMap, HeaderValue};

use crate::config::ParamPattern;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that change what an origin serves but are not in the cache key: believed
/// only from trusted proxies, so a client cannot poison an entry for everyone.
pub(super) static UNTRUSTED_ROUTING: [HeaderName; 3] =
    [HeaderName::from_static("forwarded"), HeaderName::from_static("x-forwarded-host"), HeaderName::from_static("x-forwarded-port")];
/// Path overrides some frameworks honour; never forwarded.
static PATH_OVERRIDES: [HeaderName; 2] = [HeaderName::from_static("x-original-url"), HeaderName::from_static("x-rewrite-url")];

/// Hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded in either direction.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == http::header::TE
        || name == http::header::TRAILER
        || name == http::header::TRANSFER_ENCODING
        || name == http::header::UPGRADE
        || name == http::header::PROXY_AUTHENTICATE
        || name == http::header::PROXY_AUTHORIZATION
}

/// Removes hop-by-hop headers, including those that `Connection` names (but never
/// `Host`: a client naming it would have the origin answer for another host under this
/// host's key).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| name != HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
    let hop: Vec<HeaderName> = headers.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for name in hop {
        headers.remove(name);
    }
}

/// Request headers that make origins answer differently but are not part of the key
/// (host, path and method overrides): a client could store its own page under
/// everyone's key with them, so they never reach the origin on a cacheable request
/// unless the route puts them into the key (`key_headers`).
static UNKEYED: [HeaderName; 19] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-host"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("front-end-https"),
    HeaderName::from_static("x-url-scheme"),
    HeaderName::from_static("x-original-host"),
    HeaderName::from_static("x-forwarded-uri"),
    HeaderName::from_static("x-forwarded-path"),
    HeaderName::from_static("x-http-host-override"),
];

/// Removes the cookies the route ignores (analytics cookies such as `_ga*`) from the
/// request: what is left goes on as one `Cookie` field, or none when nothing is left. The
/// key, the cookie rule and the origin then see the request as if the browser had not
/// sent them. A field that is not text is left as it is.
pub fn remove_ignored_cookies(headers: &mut HeaderMap, ignored: &[ParamPattern]) {
    if ignored.is_empty() || !headers.contains_key(COOKIE) {
        return;
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut removed = false;
    for value in headers.get_all(COOKIE) {
        let Ok(text) = value.to_str() else { return };
        for pair in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let name = pair.split_once('=').map_or(pair, |(name, _)| name).trim();
            if ignored.iter().any(|p| p.matches(name)) {
                removed = true;
            } else {
                kept.push(pair);
            }
        }
    }
    if !removed {
        return;
    }
    let joined = (!kept.is_empty()).then(|| HeaderValue::from_str(&kept.join("; ")));
    headers.remove(COOKIE);
    if let Some(Ok(joined)) = joined {
        headers.insert(COOKIE, joined);
    }
}

/// Removes the headers a cacheable request may not carry to the origin unless the route
/// keys on them (`key_headers`); keyed ones stay, except routing headers from a peer
/// that is not a trusted proxy: those never reach the origin, so they must not select a
/// variant either.
pub fn strip_unkeyed(headers: &mut HeaderMap, key_headers: &[HeaderName], trusted: bool) {
    // One pass over the request's few headers; all listed names but two start "x-".
    let listed = |name: &HeaderName| {
        let text = name.as_str();
        (text.starts_with("x-") || text == "forwarded" || text == "front-end-https") && UNKEYED.contains(name)
    };
    let keep = |name: &HeaderName| key_headers.contains(name) && (trusted || !UNTRUSTED_ROUTING.contains(name));
    let unkeyed: Vec<HeaderName> = headers.keys().filter(|name| listed(name) && !keep(name)).cloned().collect();
    for name in unkeyed {
        headers.remove(name);
    }
}

/// Removes what never goes to the origin on any request: hop-by-hop headers, path
/// overrides, and routing headers from a peer that is not a trusted proxy.
pub fn strip_for_origin(headers: &mut HeaderMap, trusted: bool) {
    strip_hop_by_hop(headers);
    for name in &PATH_OVERRIDES {
        headers.remove(name);
    }
    if !trusted {
        for name in &UNTRUSTED_ROUTING {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }
}
