//! Revalidation (RFC 9111 section 4.3): the conditional request made for a stored
//! response, choosing whether a 304 or a HEAD answer applies to it, and updating its
//! stored header fields (section 3.2); and the client's own conditionals answered from a
//! stored response (RFC 9110 section 13).

use std::time::SystemTime;

use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, DATE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode};

use super::Entry;
use super::policy::http_date;

/// Adds the stored response's validators to a request to the origin (section 4.3.1).
pub fn add_conditionals(headers: &mut HeaderMap, stored: &Entry) {
    if let Some(etag) = stored.headers.get(ETAG) {
        headers.insert(IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = stored.headers.get(LAST_MODIFIED) {
        headers.insert(IF_MODIFIED_SINCE, modified.clone());
    }
}

/// Whether a 304 (or a HEAD 200) with `new` headers describes the stored response
/// (section 4.3.4): a strong or weak `ETag` must be the stored one; without one,
/// `Last-Modified` must agree when both have it.
pub fn describes(new: &HeaderMap, stored: &Entry) -> bool {
    match (new.get(ETAG), stored.headers.get(ETAG)) {
        (Some(new), Some(old)) => new == old,
        (Some(_), None) => false,
        (None, _) => match (new.get(LAST_MODIFIED), stored.headers.get(LAST_MODIFIED)) {
            (Some(new), Some(old)) => new == old,
            _ => true,
        },
    }
}

/// Fields of an update that never replace stored ones: the stored body's framing and
/// coding stay what they are (section 3.2).
fn kept_from_stored(name: &http::HeaderName) -> bool {
    name == CONTENT_LENGTH || name == CONTENT_ENCODING || name == CONTENT_RANGE || name == TRANSFER_ENCODING
}

/// The stored header fields updated from a 304 or HEAD response: each field the update
/// carries replaces the stored one (section 3.2).
pub fn merge_headers(stored: &HeaderMap, update: &HeaderMap) -> HeaderMap {
    let mut merged = stored.clone();
    for name in update.keys() {
        if kept_from_stored(name) {
            continue;
        }
        merged.remove(name);
        for value in update.get_all(name) {
            merged.append(name.clone(), value.clone());
        }
    }
    merged
}

/// What a HEAD response (section 4.3.5) means for the stored GET response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadUpdate {
    /// Same representation: update the stored header fields and freshness.
    Update,
    /// Another representation: the stored one is invalid.
    Invalidate,
}

/// Compares a 200 answer to HEAD with the stored response: its validators must
/// describe the stored one, and its `Content-Length`, if any, equal the stored body's.
pub fn head_update(head: &HeaderMap, stored: &Entry) -> HeadUpdate {
    let length_differs =
        head.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<usize>().ok()).is_some_and(|len| len != stored.body.len());
    if length_differs || !describes(head, stored) {
        return HeadUpdate::Invalidate;
    }
    HeadUpdate::Update
}

/// The client's conditionals (RFC 9110 sections 13.1.2 and 13.1.3), evaluated on
/// responses built from a stored entry.
#[derive(Debug, Clone)]
pub struct Conditional {
    if_none_match: Option<Vec<u8>>,
    if_modified_since: Option<SystemTime>,
}

impl Conditional {
    /// The request's `If-None-Match` / `If-Modified-Since`, if it has any that apply
    /// (GET and HEAD only; `If-Modified-Since` is ignored beside `If-None-Match`).
    pub fn from_request(method: &Method, headers: &HeaderMap) -> Option<Conditional> {
        if method != Method::GET && method != Method::HEAD {
            return None;
        }
        let if_none_match = joined(headers, &IF_NONE_MATCH);
        let if_modified_since =
            if if_none_match.is_some() { None } else { headers.get(IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok()).and_then(super::date::parse) };
        (if_none_match.is_some() || if_modified_since.is_some()).then_some(Conditional { if_none_match, if_modified_since })
    }

    /// Whether a 2xx response with these headers is "not modified" for the client.
    pub fn not_modified(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        if !status.is_success() {
            return false;
        }
        if let Some(list) = &self.if_none_match {
            let Some(etag) = headers.get(ETAG) else { return false };
            return if_none_match_hits(list, etag.as_bytes());
        }
        let Some(since) = self.if_modified_since else { return false };
        // RFC 9111 section 4.3.2: a stored response without `Last-Modified` is judged by
        // its `Date` (every stored response has one: the time it arrived, if it came
        // without).
        let modified = http_date(headers, LAST_MODIFIED).or_else(|| http_date(headers, DATE));
        modified.is_some_and(|modified| modified <= since)
    }
}

fn joined(headers: &HeaderMap, name: &http::HeaderName) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::new();
    for value in headers.get_all(name) {
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(value.as_bytes());
    }
    (!out.is_empty()).then_some(out)
}

/// `If-None-Match` uses the weak comparison (RFC 9110 section 8.8.3.2): `W/"a"` and
/// `"a"` match; `*` matches any current representation.
fn if_none_match_hits(list: &[u8], etag: &[u8]) -> bool {
    let opaque = |tag: &[u8]| -> Vec<u8> { tag.strip_prefix(b"W/").unwrap_or(tag).to_vec() };
    let current = opaque(trim(etag));
    let mut rest = list;
    while !rest.is_empty() {
        let item = trim(rest);
        if item.starts_with(b"*") {
            return true;
        }
        // An entity-tag is W/"..." or "..."; the quoted part holds no '"'.
        let start = usize::from(item.starts_with(b"W/")) * 2;
        let Some(close) = item.get(start + 1..).and_then(|r| r.iter().position(|&b| b == b'"')).map(|p| start + 1 + p) else { return false };
        if item.get(start) != Some(&b'"') {
            return false;
        }
        if opaque(&item[..=close]) == current {
            return true;
        }
        let after = &item[close + 1..];
        rest = match after.iter().position(|&b| b == b',') {
            Some(comma) => &after[comma + 1..],
            None => &[],
        };
    }
    false
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &bytes[start..end.max(start)]
}

/// Header fields a 304 carries over from the 200 it stands for (RFC 9110 section
/// 15.4.5), besides `Age` and `Cache-Status`, which are added later.
pub const NOT_MODIFIED_FIELDS: [http::HeaderName; 6] =
    [http::header::CACHE_CONTROL, http::header::CONTENT_LOCATION, http::header::DATE, ETAG, http::header::EXPIRES, http::header::VARY];

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn entry_with(headers: &[(&'static str, &'static str)]) -> Entry {
        let mut entry = crate::cache::entry::tests::sample();
        for (n, v) in headers {
            entry.headers.insert(*n, HeaderValue::from_static(v));
        }
        entry
    }

    fn map(headers: &[(&'static str, &'static str)]) -> HeaderMap {
        headers.iter().map(|(n, v)| (http::HeaderName::from_static(n), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn a_304_applies_only_to_the_response_it_describes() {
        let stored = entry_with(&[("etag", "\"v1\""), ("last-modified", "Sun, 22 Nov 2026 08:00:00 GMT")]);
        assert!(describes(&map(&[("etag", "\"v1\"")]), &stored));
        assert!(!describes(&map(&[("etag", "\"v2\"")]), &stored));
        assert!(describes(&map(&[]), &stored), "no validator in the 304: the one stored response");
        assert!(!describes(&map(&[("last-modified", "Mon, 23 Nov 2026 08:00:00 GMT")]), &stored));
        assert!(!describes(&map(&[("etag", "\"v1\"")]), &entry_with(&[])));
    }

    #[test]
    fn merging_replaces_fields_but_not_the_body_framing() {
        let stored = map(&[("content-length", "8"), ("cache-control", "max-age=1"), ("x-kept", "1")]);
        let merged = merge_headers(&stored, &map(&[("content-length", "0"), ("cache-control", "max-age=60")]));
        assert_eq!(merged["content-length"], "8");
        assert_eq!(merged["cache-control"], "max-age=60");
        assert_eq!(merged["x-kept"], "1");
    }

    #[test]
    fn head_answers_update_or_invalidate() {
        let stored = entry_with(&[("etag", "\"v1\"")]);
        let len = stored.body.len().to_string();
        let mut head = map(&[("etag", "\"v1\"")]);
        head.insert("content-length", HeaderValue::from_str(&len).expect("len"));
        assert_eq!(head_update(&head, &stored), HeadUpdate::Update);
        head.insert("content-length", HeaderValue::from_static("99999"));
        assert_eq!(head_update(&head, &stored), HeadUpdate::Invalidate);
        assert_eq!(head_update(&map(&[("etag", "\"v2\"")]), &stored), HeadUpdate::Invalidate);
    }

    #[test]
    fn client_conditionals() {
        let cond = |h: &[(&'static str, &'static str)]| Conditional::from_request(&Method::GET, &map(h)).expect("conditional");
        let res = map(&[("etag", "\"a\""), ("last-modified", "Sun, 22 Nov 2026 08:00:00 GMT")]);
        assert!(cond(&[("if-none-match", "\"a\"")]).not_modified(StatusCode::OK, &res));
        assert!(cond(&[("if-none-match", "\"x\", W/\"a\"")]).not_modified(StatusCode::OK, &res));
        assert!(cond(&[("if-none-match", "*")]).not_modified(StatusCode::OK, &res));
        assert!(!cond(&[("if-none-match", "\"b\"")]).not_modified(StatusCode::OK, &res));
        assert!(!cond(&[("if-none-match", "garbage")]).not_modified(StatusCode::OK, &res));
        assert!(!cond(&[("if-none-match", "\"a\"")]).not_modified(StatusCode::NOT_FOUND, &res));
        assert!(cond(&[("if-modified-since", "Sun, 22 Nov 2026 08:00:00 GMT")]).not_modified(StatusCode::OK, &res));
        assert!(!cond(&[("if-modified-since", "Sat, 21 Nov 2026 08:00:00 GMT")]).not_modified(StatusCode::OK, &res));
        // If-None-Match wins over If-Modified-Since.
        assert!(!cond(&[("if-none-match", "\"b\""), ("if-modified-since", "Sun, 22 Nov 2026 08:00:00 GMT")]).not_modified(StatusCode::OK, &res));
        assert!(Conditional::from_request(&Method::POST, &map(&[("if-none-match", "*")])).is_none());
        assert!(Conditional::from_request(&Method::GET, &map(&[("if-modified-since", "not a date")])).is_none());
    }
}
