//! The cache key: scheme, host, path, normalised query and the normalised
//! `Accept-Encoding`, plus its 128-bit hash used for map and Redis keys.

use std::fmt::Write as _;

use http::HeaderValue;
use xxhash_rust::xxh3::xxh3_128;

/// The content codings a client accepts, reduced to the few the cache keeps apart, so
/// that the many spellings of `Accept-Encoding` do not multiply the stored variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encodings {
    Identity,
    Gzip,
    Br,
    BrGzip,
}

impl Encodings {
    /// Reduces the `Accept-Encoding` field lines; codings with `q=0` are not accepted.
    pub fn from_headers<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Encodings {
        let (mut gzip, mut br) = (false, false);
        let items = values.into_iter().filter_map(|v| v.to_str().ok()).flat_map(|text| text.split(','));
        for item in items {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            if refused {
                continue;
            }
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                gzip = true;
            } else if coding.eq_ignore_ascii_case("br") {
                br = true;
            } else if coding == "*" {
                gzip = true;
                br = true;
            }
        }
        match (br, gzip) {
            (true, true) => Encodings::BrGzip,
            (true, false) => Encodings::Br,
            (false, true) => Encodings::Gzip,
            (false, false) => Encodings::Identity,
        }
    }

    /// The `Accept-Encoding` sent to the origin, so its answer fits every client in the
    /// group (`identity` explicitly: with no header the origin may pick any coding).
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Encodings::Identity => "identity",
            Encodings::Gzip => "gzip",
            Encodings::Br => "br",
            Encodings::BrGzip => "br, gzip",
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Encodings::Identity => "identity",
            Encodings::Gzip => "gzip",
            Encodings::Br => "br",
            Encodings::BrGzip => "br,gzip",
        }
    }

}

/// A cache key: its full text (kept in the entry to rule out hash collisions) and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub text: String,
    pub hash: u128,
}

impl CacheKey {
    /// Builds the key of a request. `host` must already be lowercase without default port.
    pub fn new(scheme: &str, host: &str, path: &str, query: Option<&str>, encodings: Encodings) -> CacheKey {
        let mut text = String::with_capacity(scheme.len() + host.len() + path.len() + query.map_or(0, str::len) + 24);
        text.push_str(scheme);
        text.push_str("://");
        text.push_str(host);
        text.push_str(path);
        if let Some(query) = query {
            push_normalised_query(&mut text, query);
        }
        // A newline cannot occur in a request target, so the parts cannot run together.
        let _ = write!(text, "\nae={}", encodings.as_str());
        let hash = xxh3_128(text.as_bytes());
        CacheKey { text, hash }
    }

    /// The Redis key of this entry: `<key_prefix>v<format version>:<hash>`.
    pub fn redis_key(&self, prefix: &str) -> String {
        format!("{prefix}v{}:{:032x}", super::entry::FORMAT_VERSION, self.hash)
    }
}

/// Appends `?` and the query's parameters ordered by name (parameters with the same name
/// keep their relative order, which can matter to the origin); empty parameters are
/// dropped, and an empty query adds nothing.
fn push_normalised_query(out: &mut String, query: &str) {
    let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    if params.is_empty() {
        return;
    }
    params.sort_by(|a, b| param_name(a).cmp(param_name(b)));
    out.push('?');
    for (i, param) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(param);
    }
}

fn param_name(param: &str) -> &str {
    param.split_once('=').map_or(param, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ae(v: &str) -> Encodings {
        Encodings::from_headers([&HeaderValue::from_str(v).expect("header")])
    }

    #[test]
    fn accept_encoding_groups() {
        assert_eq!(Encodings::from_headers([]), Encodings::Identity);
        let two_lines = [HeaderValue::from_static("gzip"), HeaderValue::from_static("br")];
        assert_eq!(Encodings::from_headers(&two_lines), Encodings::BrGzip);
        assert_eq!(ae("gzip, deflate, br"), Encodings::BrGzip);
        assert_eq!(ae("gzip;q=1.0, br;q=0"), Encodings::Gzip);
        assert_eq!(ae("BR"), Encodings::Br);
        assert_eq!(ae("deflate"), Encodings::Identity);
        assert_eq!(ae("*"), Encodings::BrGzip);
    }

    #[test]
    fn query_order_does_not_split_the_cache() {
        let a = CacheKey::new("http", "shop.example", "/p/1", Some("b=2&a=1"), Encodings::Gzip);
        let b = CacheKey::new("http", "shop.example", "/p/1", Some("a=1&b=2&"), Encodings::Gzip);
        assert_eq!(a, b);
        assert!(a.text.starts_with("http://shop.example/p/1?a=1&b=2\n"));
        let repeated = CacheKey::new("http", "h", "/", Some("a=2&b=1&a=1"), Encodings::Identity);
        assert!(repeated.text.starts_with("http://h/?a=2&a=1&b=1\n"));
    }

    #[test]
    fn every_part_is_in_the_key() {
        let base = CacheKey::new("http", "h", "/p", Some("x=1"), Encodings::Identity);
        assert_ne!(base, CacheKey::new("https", "h", "/p", Some("x=1"), Encodings::Identity));
        assert_ne!(base, CacheKey::new("http", "g", "/p", Some("x=1"), Encodings::Identity));
        assert_ne!(base, CacheKey::new("http", "h", "/q", Some("x=1"), Encodings::Identity));
        assert_ne!(base, CacheKey::new("http", "h", "/p", Some("x=2"), Encodings::Identity));
        assert_ne!(base, CacheKey::new("http", "h", "/p", Some("x=1"), Encodings::Gzip));
        assert_eq!(CacheKey::new("http", "h", "/p", Some(""), Encodings::Identity), CacheKey::new("http", "h", "/p", None, Encodings::Identity));
        assert!(base.redis_key("bulwark:pdp:").starts_with("bulwark:pdp:v1:"));
    }
}

/// The URL part of a key text (scheme, host, path, normalised query; no variant).
pub fn url_part(key_text: &str) -> &str {
    key_text.split_once('\n').map_or(key_text, |(url, _)| url)
}

/// The path and normalised query of a key text (no scheme, no host).
pub fn path_part(key_text: &str) -> &str {
    let url = url_part(key_text);
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    after_scheme.find('/').map_or("/", |i| &after_scheme[i..])
}

/// What a purge removes: every variant of one URL, every host's copy of one path, or
/// every entry carrying a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeTarget {
    /// `scheme://host/path?query`, normalised like a key's [`url_part`].
    Url(String),
    /// Hash of `/path?query` (see [`path_part`]).
    Path(u128),
    Tag(String),
}

impl PurgeTarget {
    /// Parses an absolute URL (`http://shop.example/products/1?color=red`: every variant
    /// of it) or a bare path (`/products/1`: every host's), normalising like the key.
    pub fn from_url(text: &str) -> Result<PurgeTarget, String> {
        let text = text.trim();
        if text.starts_with('/') {
            let (path, query) = text.split_once('?').map_or((text, None), |(p, q)| (p, Some(q)));
            let mut out = String::from(path);
            if let Some(query) = query {
                push_normalised_query(&mut out, query);
            }
            return Ok(PurgeTarget::Path(xxh3_128(out.as_bytes())));
        }
        let uri: http::Uri = text.parse().map_err(|_| format!("not a URL or a path: {text:?}"))?;
        let scheme = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => s.to_ascii_lowercase(),
            _ => return Err(format!("URL must be http:// or https://, or a path starting with '/': {text:?}")),
        };
        let host = uri.host().ok_or_else(|| format!("URL has no host: {text:?}"))?.to_ascii_lowercase();
        let default_port = if scheme == "https" { 443 } else { 80 };
        let mut out = format!("{scheme}://{host}");
        if let Some(port) = uri.port_u16().filter(|p| *p != default_port) {
            out.push_str(&format!(":{port}"));
        }
        out.push_str(uri.path());
        if let Some(query) = uri.query() {
            push_normalised_query(&mut out, query);
        }
        if text.contains(['#', ' ', '\t', '\n']) {
            return Err(format!("URL must not contain a fragment or whitespace: {text:?}"));
        }
        Ok(PurgeTarget::Url(out))
    }

    /// A tag target; tags are single words of at most 128 bytes (as stored).
    pub fn tag(tag: &str) -> Result<PurgeTarget, String> {
        let tag = tag.trim();
        if tag.is_empty() || tag.len() > 128 || tag.contains(char::is_whitespace) {
            return Err(format!("a tag is one word of 1 to 128 bytes: {tag:?}"));
        }
        Ok(PurgeTarget::Tag(tag.to_owned()))
    }

    /// The URL target of a request: every variant stored for it.
    pub fn for_request(scheme: &str, host: &str, path: &str, query: Option<&str>) -> PurgeTarget {
        let key = CacheKey::new(scheme, host, path, query, Encodings::Identity);
        PurgeTarget::Url(url_part(&key.text).to_owned())
    }

    /// For a URL target, the hashes of all its variants' keys (a URL has at most one
    /// entry per `Accept-Encoding` group).
    pub fn variant_hashes(&self) -> Option<[u128; 4]> {
        let PurgeTarget::Url(url) = self else { return None };
        Some([Encodings::Identity, Encodings::Gzip, Encodings::Br, Encodings::BrGzip].map(|e| xxh3_128(format!("{url}\nae={}", e.as_str()).as_bytes())))
    }

    pub fn matches(&self, key_text: &str, tags: &[String]) -> bool {
        match self {
            PurgeTarget::Url(url) => url_part(key_text) == url,
            PurgeTarget::Path(hash) => xxh3_128(path_part(key_text).as_bytes()) == *hash,
            PurgeTarget::Tag(tag) => tags.iter().any(|t| t == tag),
        }
    }

    /// The name of the Redis index set listing the entries this target covers.
    pub fn index_name(&self) -> String {
        match self {
            PurgeTarget::Url(url) => format!("url:{:032x}", xxh3_128(url.as_bytes())),
            PurgeTarget::Path(hash) => format!("path:{hash:032x}"),
            PurgeTarget::Tag(tag) => format!("tag:{tag}"),
        }
    }

    /// The targets an entry is indexed under: its URL, its path, its tags.
    pub fn of_entry(key_text: &str, tags: &[String]) -> Vec<PurgeTarget> {
        let mut out = vec![
            PurgeTarget::Url(url_part(key_text).to_owned()),
            PurgeTarget::Path(xxh3_128(path_part(key_text).as_bytes())),
        ];
        out.extend(tags.iter().cloned().map(PurgeTarget::Tag));
        out
    }
}

#[cfg(test)]
mod purge_tests {
    use super::*;

    #[test]
    fn purge_targets_match_every_variant_and_every_host() {
        let gzip = CacheKey::new("http", "shop.example", "/products/1", Some("size=m&color=red"), Encodings::Gzip);
        let plain = CacheKey::new("http", "shop.example", "/products/1", Some("color=red&size=m"), Encodings::Identity);
        let other_host = CacheKey::new("https", "eu.shop.example", "/products/1", Some("color=red&size=m"), Encodings::Br);
        let url = PurgeTarget::from_url("http://Shop.Example:80/products/1?size=m&color=red").expect("url");
        assert!(url.matches(&gzip.text, &[]) && url.matches(&plain.text, &[]));
        assert!(!url.matches(&other_host.text, &[]));
        let path = PurgeTarget::from_url("/products/1?color=red&size=m").expect("path");
        assert!(path.matches(&gzip.text, &[]) && path.matches(&other_host.text, &[]));
        assert!(!PurgeTarget::from_url("/products/1").expect("path").matches(&gzip.text, &[]));
        assert!(PurgeTarget::Tag("p1".into()).matches(&gzip.text, &["x".into(), "p1".into()]));
        assert!(PurgeTarget::from_url("ftp://x/").is_err());
        assert!(PurgeTarget::from_url("http://x/a#frag").is_err());
        assert!(PurgeTarget::tag("two words").is_err() && PurgeTarget::tag("").is_err() && PurgeTarget::tag("ok:tag-1").is_ok());
        let variants = url.variant_hashes().expect("url target");
        assert!(variants.contains(&gzip.hash) && variants.contains(&plain.hash));
        assert!(PurgeTarget::from_url("products/1").is_err());
        let indexed = PurgeTarget::of_entry(&gzip.text, &["t".into()]);
        assert!(indexed.contains(&url) && indexed.contains(&path) && indexed.contains(&PurgeTarget::Tag("t".into())));
    }
}
