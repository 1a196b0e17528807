//! Who the client of a request is, for its per-client budget.
//!
//! The address rule walks the peer and then `X-Forwarded-For` from the right, skipping
//! the trusted proxies: the first address no trusted proxy is, is the one the last
//! trusted proxy saw. Everything left of it was written by the client and is ignored,
//! so a spoofed header changes nothing. IPv6 clients are counted per /64 (one
//! subscriber's prefix), or one host could be any of 2^64 clients.

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};
use xxhash_rust::xxh3::xxh3_64;

use crate::config::{Cidr, ClientBy};

/// What a request carries that names its client, captured before the route's rules
/// strip headers (cheap: header values share the request's bytes).
#[derive(Debug, Clone, Default)]
pub struct ClientSource {
    /// `X-Forwarded-For` (its field lines joined), from a trusted peer only.
    forwarded: Option<HeaderValue>,
    /// The `client = "header:NAME"` header, from a trusted peer only.
    header: Option<HeaderValue>,
    /// The identity, once worked out (a leader is checked, then charged).
    identity: std::sync::OnceLock<String>,
}

static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

impl ClientSource {
    /// Captures what `by` needs from `headers`; from an untrusted peer, nothing (its
    /// headers say nothing true: the peer is the client).
    pub fn capture(by: &ClientBy, headers: &HeaderMap, trusted: bool) -> ClientSource {
        if !trusted {
            return ClientSource::default();
        }
        let header = match by {
            ClientBy::Header(name) => headers.get(name).filter(|v| !v.is_empty()).cloned(),
            ClientBy::Address | ClientBy::Peer => None,
        };
        let forwarded = match by {
            ClientBy::Peer => None,
            ClientBy::Address | ClientBy::Header(_) => {
                let mut lines = headers.get_all(&X_FORWARDED_FOR).iter();
                match (lines.next(), lines.next()) {
                    (Some(one), None) => Some(one.clone()),
                    (None, _) => None,
                    (Some(_), Some(_)) => {
                        let joined = headers.get_all(&X_FORWARDED_FOR).iter().map(|v| v.as_bytes()).collect::<Vec<_>>().join(&b", "[..]);
                        HeaderValue::from_bytes(&joined).ok()
                    }
                }
            }
        };
        ClientSource { forwarded, header, identity: std::sync::OnceLock::new() }
    }

    /// The client's identity: an address (`203.0.113.7`, `2001:db8:1:2::/64`) or a
    /// header's hash (`h:...`). Worked out once per request: `by`, `peer` and
    /// `trusted_proxies` are the request's route's and its peer, the same each time.
    pub fn identify(&self, by: &ClientBy, peer: IpAddr, trusted_proxies: &[Cidr]) -> &str {
        self.identity.get_or_init(|| Self::work_out(&self.header, &self.forwarded, by, peer, trusted_proxies))
    }

    fn work_out(header: &Option<HeaderValue>, forwarded: &Option<HeaderValue>, by: &ClientBy, peer: IpAddr, trusted_proxies: &[Cidr]) -> String {
        if let (ClientBy::Header(_), Some(value)) = (by, header) {
            return format!("h:{:016x}", xxh3_64(value.as_bytes()));
        }
        let address = match (by, forwarded) {
            (ClientBy::Peer, _) | (_, None) => peer,
            (_, Some(forwarded)) => first_untrusted(peer, forwarded, trusted_proxies),
        };
        display(address)
    }
}

/// The first address, walking `peer` and then `forwarded` from the right, that is not a
/// trusted proxy; when every one is (or an entry is not an address, which no trusted
/// proxy writes), the last trusted one seen.
fn first_untrusted(peer: IpAddr, forwarded: &HeaderValue, trusted_proxies: &[Cidr]) -> IpAddr {
    let trusted = |ip: IpAddr| trusted_proxies.iter().any(|c| c.contains(ip));
    if !trusted(peer) {
        return peer;
    }
    let mut last = peer;
    // Entry by entry from the right, each decoded alone: bytes the client wrote on the
    // left (not even text) must not hide what the trusted proxies wrote on the right.
    for entry in forwarded.as_bytes().rsplit(|b| *b == b',') {
        let Some(ip) = std::str::from_utf8(entry).ok().and_then(|e| parse_entry(e.trim())) else { return last };
        if !trusted(ip) {
            return ip;
        }
        last = ip;
    }
    last
}

/// An `X-Forwarded-For` entry: an address, with a port or in brackets as some proxies
/// write them.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = entry.parse::<std::net::SocketAddr>() {
        return Some(addr.ip());
    }
    entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')).and_then(|e| e.parse().ok())
}

/// An address as a client identity: IPv4 (or IPv4-mapped IPv6) as is, IPv6 as its /64.
fn display(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let prefix = u128::from(v6) & (u128::MAX << 64);
                format!("{}/64", std::net::Ipv6Addr::from(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies() -> Vec<Cidr> {
        vec![Cidr::parse("10.0.0.0/8").expect("cidr")]
    }

    fn who(by: &ClientBy, peer: &str, headers: &[(&str, &str)]) -> String {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).expect("name"), HeaderValue::from_str(value).expect("value"));
        }
        let peer: IpAddr = peer.parse().expect("peer");
        let trusted = proxies().iter().any(|c| c.contains(peer));
        ClientSource::capture(by, &map, trusted).identify(by, peer, &proxies()).to_owned()
    }

    #[test]
    fn a_spoofed_left_part_of_x_forwarded_for_changes_nothing() {
        let by = ClientBy::Address;
        assert_eq!(who(&by, "10.0.0.5", &[("x-forwarded-for", "203.0.113.7")]), "203.0.113.7");
        assert_eq!(who(&by, "10.0.0.5", &[("x-forwarded-for", "1.2.3.4, 203.0.113.7")]), "203.0.113.7");
        assert_eq!(who(&by, "10.0.0.5", &[("x-forwarded-for", "9.9.9.9, 203.0.113.7, 10.1.1.1")]), "203.0.113.7", "two trusted hops");
        assert_eq!(who(&by, "10.0.0.5", &[("x-forwarded-for", "9.9.9.9"), ("x-forwarded-for", "203.0.113.7")]), "203.0.113.7", "field lines joined");
        assert_eq!(who(&by, "10.0.0.5", &[("x-forwarded-for", "garbage, 203.0.113.7:4711")]), "203.0.113.7", "with a port");
        assert_eq!(who(&by, "10.0.0.5", &[("x-forwarded-for", "203.0.113.7, garbage")]), "10.0.0.5", "not written by a trusted proxy: stop");
        assert_eq!(who(&by, "10.0.0.5", &[]), "10.0.0.5");
    }

    #[test]
    fn bytes_that_are_not_text_on_the_left_do_not_make_the_proxy_the_client() {
        let mut map = HeaderMap::new();
        map.insert(X_FORWARDED_FOR.clone(), HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.7").expect("value"));
        let peer: IpAddr = "10.0.0.5".parse().expect("peer");
        let source = ClientSource::capture(&ClientBy::Address, &map, true);
        assert_eq!(source.identify(&ClientBy::Address, peer, &proxies()), "203.0.113.7");
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        assert_eq!(who(&ClientBy::Address, "198.51.100.1", &[("x-forwarded-for", "203.0.113.7")]), "198.51.100.1");
        let header = ClientBy::Header(http::HeaderName::from_static("x-client-id"));
        assert_eq!(who(&header, "198.51.100.1", &[("x-client-id", "alice")]), "198.51.100.1");
        assert!(who(&header, "10.0.0.5", &[("x-client-id", "alice")]).starts_with("h:"));
        assert_eq!(who(&header, "10.0.0.5", &[("x-forwarded-for", "203.0.113.7")]), "203.0.113.7", "no header: the address rule");
        assert_eq!(who(&ClientBy::Peer, "10.0.0.5", &[("x-forwarded-for", "203.0.113.7")]), "10.0.0.5");
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let by = ClientBy::Address;
        let a = who(&by, "10.0.0.5", &[("x-forwarded-for", "2001:db8:1:2::1")]);
        let b = who(&by, "10.0.0.5", &[("x-forwarded-for", "[2001:db8:1:2:ffff::9]")]);
        assert_eq!((a.as_str(), b.as_str()), ("2001:db8:1:2::/64", "2001:db8:1:2::/64"));
        assert_eq!(who(&by, "::ffff:203.0.113.7", &[]), "203.0.113.7");
    }
}
