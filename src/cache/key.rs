//! The cache key: scheme, host, path, normalised query and the normalised
//! `Accept-Encoding` (the *primary* key), plus its 128-bit hash used for map and Redis
//! keys. A response that varies (its `Vary`, or a route's `key_headers`) is stored under a
//! *variant* key: the primary key plus the normalised request headers it varies on.
//!
//! Paths and queries are normalised the same way for the key, for routing and for the
//! request sent to the origin (percent-encodings of unreserved characters decoded, other
//! hex digits uppercased, dot segments removed, parameters ordered by name), so that what
//! the key says and what the origin was asked never disagree.

use std::borrow::Cow;
use std::fmt::Write as _;

use http::{HeaderMap, HeaderName};
use xxhash_rust::xxh3::xxh3_128;

use crate::config::ParamPattern;
use crate::encodings::Encodings;

/// Why a request target cannot be normalised: answered with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed percent-encoding in the request target")]
pub struct BadTarget;

/// RFC 3986 section 2.3 unreserved characters: their percent-encoding means the same
/// as the character itself.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes percent-encoded unreserved characters and uppercases the hex digits of the
/// others (RFC 3986 section 6.2.2). A `%` not followed by two hex digits is an error.
fn normalise_percent(text: &str) -> Result<Cow<'_, str>, BadTarget> {
    let bytes = text.as_bytes();
    let Some(first) = bytes.iter().position(|&b| b == b'%') else { return Ok(Cow::Borrowed(text)) };
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..first]);
    let mut i = first;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            // Copy up to the next '%' in one go (keeps multi-byte characters whole).
            let next = bytes[i..].iter().position(|&c| c == b'%').map_or(bytes.len(), |n| i + n);
            out.push_str(&text[i..next]);
            i = next;
            continue;
        }
        let (hi, lo) = match (bytes.get(i + 1).copied().and_then(hex_value), bytes.get(i + 2).copied().and_then(hex_value)) {
            (Some(hi), Some(lo)) => (hi, lo),
            _ => return Err(BadTarget),
        };
        let decoded = hi * 16 + lo;
        if is_unreserved(decoded) {
            out.push(char::from(decoded));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
        }
        i += 3;
    }
    Ok(Cow::Owned(out))
}

/// Normalises a request path: percent-encoding as in [`normalise_percent`], then dot
/// segments removed (RFC 3986 section 5.2.4), so `/a/./b/../c` and `/a/%63` are `/a/c`.
/// Empty segments (`//`) are kept: some origins give them meaning.
pub fn normalise_path(path: &str) -> Result<Cow<'_, str>, BadTarget> {
    let decoded = normalise_percent(path)?;
    let has_dots = decoded.split('/').any(|seg| seg == "." || seg == "..");
    if !has_dots {
        return Ok(decoded);
    }
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = decoded.split('/').peekable();
    // A path from a request target starts with '/', so the first part is empty.
    if decoded.starts_with('/') {
        parts.next();
    }
    let mut trailing_slash = false;
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match seg {
            "." => trailing_slash = last,
            ".." => {
                segments.pop();
                trailing_slash = last;
            }
            other => {
                segments.push(other);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// Normalises a query: empty parameters dropped, percent-encoding as in
/// [`normalise_percent`], parameters matching `ignored` left out, the rest ordered by
/// name (parameters with the same name keep their relative order, which can matter to
/// the origin). Returns the query without `?`; empty when nothing is left.
pub fn normalise_query<'a>(query: &'a str, ignored: &[ParamPattern]) -> Result<Cow<'a, str>, BadTarget> {
    normalise_query_by(query, |name| !ignored.iter().any(|pattern| pattern.matches(name)))
}

/// `query` (without `?`) as the key has it under a route's `rules`.
pub fn normalise_query_for<'a>(query: &'a str, rules: &crate::config::CacheRules) -> Result<Cow<'a, str>, BadTarget> {
    normalise_query_by(query, |name| rules.keeps_query_param(name))
}

/// [`normalise_query`] keeping the parameters whose (normalised) name `keep` accepts.
pub fn normalise_query_by(query: &str, keep: impl Fn(&str) -> bool) -> Result<Cow<'_, str>, BadTarget> {
    let normalised = normalise_percent(query)?;
    let mut params: Vec<&str> = normalised.split('&').filter(|p| !p.is_empty()).filter(|p| keep(param_name(p))).collect();
    params.sort_by(|a, b| param_name(a).cmp(param_name(b)));
    let mut out = String::with_capacity(normalised.len());
    for (i, param) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(param);
    }
    if out == query {
        return Ok(Cow::Borrowed(query));
    }
    Ok(Cow::Owned(out))
}

/// A cache key: its full text (kept in the entry to rule out hash collisions) and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub text: String,
    pub hash: u128,
}

/// Marks the variant part of a key text.
const VARIANT_MARK: &str = "\nv:";

impl CacheKey {
    /// Builds the key of a request, normalising path and query. `host` must already be
    /// lowercase without default port.
    pub fn new(scheme: &str, host: &str, path: &str, query: Option<&str>, encodings: Encodings) -> CacheKey {
        let path = normalise_path(path).unwrap_or(Cow::Borrowed(path));
        let query = query.map(|q| normalise_query(q, &[]).unwrap_or(Cow::Borrowed(q)));
        CacheKey::from_normalised(scheme, host, &path, query.as_deref().unwrap_or(""), encodings)
    }

    /// Builds a key from a path and query already normalised ([`normalise_path`],
    /// [`normalise_query`]), as the request path does.
    pub fn from_normalised(scheme: &str, host: &str, path: &str, query: &str, encodings: Encodings) -> CacheKey {
        let mut text = String::with_capacity(scheme.len() + host.len() + path.len() + query.len() + 24);
        text.push_str(scheme);
        text.push_str("://");
        text.push_str(host);
        text.push_str(path);
        if !query.is_empty() {
            text.push('?');
            text.push_str(query);
        }
        // A newline cannot occur in a request target, so the parts cannot run together.
        let _ = write!(text, "\nae={}", encodings.as_str());
        let hash = xxh3_128(text.as_bytes());
        CacheKey { text, hash }
    }

    /// The key of the variant that `headers` select among responses varying on `names`
    /// (sorted, lowercase, without `Accept-Encoding`, as [`Vary::parse`] gives them). A
    /// header absent from the request is keyed apart from one present but empty
    /// (RFC 9111 section 4.1).
    pub fn variant(&self, names: &[HeaderName], headers: &HeaderMap) -> CacheKey {
        let mut text = String::with_capacity(self.text.len() + names.len() * 24);
        text.push_str(self.primary_text());
        for name in names {
            text.push_str(VARIANT_MARK);
            text.push_str(name.as_str());
            if let Some(value) = normalised_field(headers, name) {
                text.push('=');
                text.push_str(&value);
            }
        }
        let hash = xxh3_128(text.as_bytes());
        CacheKey { text, hash }
    }

    /// The key of the flight that coalesces requests `no-store` for this key: apart from
    /// the flight of requests that may store what they fetch.
    pub fn unstored_flight(&self) -> CacheKey {
        let text = format!("{}\nno-store", self.text);
        let hash = xxh3_128(text.as_bytes());
        CacheKey { text, hash }
    }

    /// The primary key text (without any variant part).
    pub fn primary_text(&self) -> &str {
        self.text.find(VARIANT_MARK).map_or(self.text.as_str(), |i| &self.text[..i])
    }

    /// The primary key of this key (itself when it is not a variant).
    pub fn primary(&self) -> CacheKey {
        let text = self.primary_text().to_owned();
        CacheKey { hash: xxh3_128(text.as_bytes()), text }
    }

    pub fn is_variant(&self) -> bool {
        self.text.contains(VARIANT_MARK)
    }

    /// The Redis key of this entry: `<key_prefix>v<format version>:<hash>`.
    pub fn redis_key(&self, prefix: &str) -> String {
        format!("{prefix}v{}:{:032x}", super::entry::FORMAT_VERSION, self.hash)
    }
}

/// Appends `?` and the normalised query (see [`normalise_query`]); an empty query adds
/// nothing.
pub(super) fn push_normalised_query(out: &mut String, query: &str, keep: impl Fn(&str) -> bool) {
    let query = normalise_query_by(query, keep).unwrap_or(Cow::Borrowed(query));
    if !query.is_empty() {
        out.push('?');
        out.push_str(&query);
    }
}

fn param_name(param: &str) -> &str {
    param.split_once('=').map_or(param, |(name, _)| name)
}

/// Request fields whose values are case-insensitive (media types, language tags and
/// charsets), lowercased in variant keys.
const CASE_INSENSITIVE_FIELDS: [&str; 3] = ["accept", "accept-language", "accept-charset"];

/// All field lines of `name`, as one value: list elements trimmed, inner runs of
/// whitespace made one space, empty elements dropped, joined with `,` (RFC 9111
/// section 4.1 allows such normalisation). `None` when the request has no such field.
fn normalised_field(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let lowercase = CASE_INSENSITIVE_FIELDS.contains(&name.as_str());
    let mut out = String::new();
    for value in values {
        // A value that is not text is keyed by its exact bytes, in hex after a control
        // character no header value can hold: two different ones never meet in one
        // replacement character, nor a text value that looks like their hex.
        let Ok(text) = value.to_str() else {
            if !out.is_empty() {
                out.push(',');
            }
            out.push('\u{1}');
            for b in value.as_bytes() {
                let _ = write!(out, "{b:02x}");
            }
            continue;
        };
        for element in text.split(',') {
            let mut words = element.split_ascii_whitespace().peekable();
            if words.peek().is_none() {
                continue;
            }
            if !out.is_empty() {
                out.push(',');
            }
            for (i, word) in words.enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                if lowercase {
                    out.extend(word.chars().map(|c| c.to_ascii_lowercase()));
                } else {
                    out.push_str(word);
                }
            }
        }
    }
    Some(out)
}

/// What a response's `Vary` says about the requests it may serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vary {
    /// No `Vary`, or only `Accept-Encoding` (always part of the primary key).
    None,
    /// The request headers it varies on: lowercase, sorted, no duplicates, no
    /// `Accept-Encoding`.
    Names(Vec<HeaderName>),
    /// `Vary: *`: it never matches another request (RFC 9111 section 4.1).
    Star,
    /// Not a list of field names, or more than [`MAX_VARY_NAMES`] of them.
    Invalid,
}

/// Field names one response may vary on; more make the response not storable.
pub const MAX_VARY_NAMES: usize = 16;

impl Vary {
    /// Parses every `Vary` field line of `headers`.
    pub fn parse(headers: &HeaderMap) -> Vary {
        let mut names: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(http::header::VARY) {
            let Ok(text) = value.to_str() else { return Vary::Invalid };
            for element in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                if element == "*" {
                    return Vary::Star;
                }
                let Ok(name) = HeaderName::from_bytes(element.as_bytes()) else { return Vary::Invalid };
                if name == http::header::ACCEPT_ENCODING || names.contains(&name) {
                    continue;
                }
                if names.len() == MAX_VARY_NAMES {
                    return Vary::Invalid;
                }
                names.push(name);
            }
        }
        if names.is_empty() {
            return Vary::None;
        }
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Vary::Names(names)
    }
}

/// `names` and `extra` together, sorted, without duplicates (a route's `key_headers`
/// added to what a response varies on).
pub fn merge_names(names: &[HeaderName], extra: &[HeaderName]) -> Vec<HeaderName> {
    let mut all: Vec<HeaderName> = names.iter().chain(extra).cloned().collect();
    all.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    all.dedup();
    all
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

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn query_order_does_not_split_the_cache() {
        let a = CacheKey::new("http", "shop.example", "/p/1", Some("b=2&a=1"), Encodings::GZIP);
        let b = CacheKey::new("http", "shop.example", "/p/1", Some("a=1&b=2&"), Encodings::GZIP);
        assert_eq!(a, b);
        assert!(a.text.starts_with("http://shop.example/p/1?a=1&b=2\n"));
        let repeated = CacheKey::new("http", "h", "/", Some("a=2&b=1&a=1"), Encodings::IDENTITY);
        assert!(repeated.text.starts_with("http://h/?a=2&a=1&b=1\n"));
    }

    #[test]
    fn paths_and_queries_are_normalised() {
        assert_eq!(normalise_path("/a/./b/../c").as_deref(), Ok("/a/c"));
        assert_eq!(normalise_path("/products/%2e%2e/admin").as_deref(), Ok("/admin"));
        assert_eq!(normalise_path("/../../x").as_deref(), Ok("/x"));
        assert_eq!(normalise_path("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(normalise_path("/%7euser/%2f%41").as_deref(), Ok("/~user/%2FA"));
        assert_eq!(normalise_path("/a//b").as_deref(), Ok("/a//b"));
        assert_eq!(normalise_path("/caf\u{e9}").as_deref(), Ok("/caf\u{e9}"));
        assert_eq!(normalise_path("/bad%zz"), Err(BadTarget));
        assert_eq!(normalise_path("/bad%4"), Err(BadTarget));
        let ignored = [ParamPattern::Prefix("utm_".into()), ParamPattern::Exact("fbclid".into())];
        assert_eq!(normalise_query("utm_source=x&b=2&fbclid=1&a=%7e", &ignored).as_deref(), Ok("a=~&b=2"));
        assert_eq!(normalise_query("fbclidx=1", &ignored).as_deref(), Ok("fbclidx=1"));
    }

    #[test]
    fn variants_key_on_normalised_request_headers() {
        let primary = CacheKey::new("http", "h", "/p", None, Encodings::GZIP);
        let names = [HeaderName::from_static("accept-language"), HeaderName::from_static("x-country")];
        let headers = |pairs: &[(&'static str, &'static str)]| -> HeaderMap {
            pairs.iter().map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v))).collect()
        };
        let a = primary.variant(&names, &headers(&[("accept-language", "en-US,  de ;q=0.5"), ("x-country", "DE")]));
        let b = primary.variant(&names, &headers(&[("accept-language", "EN-us, de ;q=0.5"), ("x-country", "DE")]));
        assert_eq!(a, b, "case-insensitive field, whitespace");
        assert_ne!(a, primary.variant(&names, &headers(&[("accept-language", "en-US, de ;q=0.5"), ("x-country", "de")])));
        let absent = primary.variant(&names, &headers(&[]));
        let empty = primary.variant(&names, &headers(&[("accept-language", ""), ("x-country", "")]));
        assert_ne!(absent, empty, "absent is not empty");
        assert!(a.is_variant() && !primary.is_variant());
        assert_eq!(a.primary(), primary);
        assert_eq!(url_part(&a.text), url_part(&primary.text));
    }

    #[test]
    fn vary_parsing() {
        let vary = |v: &'static str| Vary::parse(&[(http::header::VARY, HeaderValue::from_static(v))].into_iter().collect());
        assert_eq!(vary("Accept-Encoding"), Vary::None);
        assert_eq!(vary("*"), Vary::Star);
        assert_eq!(vary("accept-encoding, *"), Vary::Star);
        assert_eq!(vary("X-B, x-a, X-A"), Vary::Names(vec![HeaderName::from_static("x-a"), HeaderName::from_static("x-b")]));
        assert_eq!(vary("bad name"), Vary::Invalid);
        let many = (0..17).map(|i| format!("x-{i}")).collect::<Vec<_>>().join(",");
        let many: HeaderMap = [(http::header::VARY, HeaderValue::from_str(&many).expect("hv"))].into_iter().collect();
        assert_eq!(Vary::parse(&many), Vary::Invalid);
    }

    #[test]
    fn every_part_is_in_the_key() {
        let base = CacheKey::new("http", "h", "/p", Some("x=1"), Encodings::IDENTITY);
        assert_ne!(base, CacheKey::new("https", "h", "/p", Some("x=1"), Encodings::IDENTITY));
        assert_ne!(base, CacheKey::new("http", "g", "/p", Some("x=1"), Encodings::IDENTITY));
        assert_ne!(base, CacheKey::new("http", "h", "/q", Some("x=1"), Encodings::IDENTITY));
        assert_ne!(base, CacheKey::new("http", "h", "/p", Some("x=2"), Encodings::IDENTITY));
        assert_ne!(base, CacheKey::new("http", "h", "/p", Some("x=1"), Encodings::GZIP));
        assert_eq!(CacheKey::new("http", "h", "/p", Some(""), Encodings::IDENTITY), CacheKey::new("http", "h", "/p", None, Encodings::IDENTITY));
        assert!(base.redis_key("bulwark:pdp:").starts_with("bulwark:pdp:v2:"));
    }
}
