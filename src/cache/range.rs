//! A client's `Range` answered from a stored body (RFC 9110 section 14): one byte range
//! of a stored 200 is served 206 with `Content-Range`, a range past the end 416. Several
//! ranges, a syntax error or a method other than GET get the whole body (the server may
//! ignore `Range`, section 14.2); so does a request whose `If-Range` does not match the
//! stored response (section 13.1.5).

use std::time::{Duration, SystemTime};

use http::header::{DATE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use http::{HeaderMap, Method};

use super::policy::http_date;

/// One requested range, as written: `first-last`, `first-` or `-suffix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    From { first: u64, last: Option<u64> },
    Suffix(u64),
}

/// `If-Range`: the response the client has part of.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IfRange {
    ETag(Vec<u8>),
    Date(SystemTime),
    /// Neither an entity tag nor a date: matches nothing.
    Invalid,
}

/// A request for one range of the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRequest {
    spec: Spec,
    if_range: Option<IfRange>,
}

/// What a stored response gives a range request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The whole body, 200.
    Whole,
    /// Bytes `start..=end` of the body, 206.
    Part { start: u64, end: u64 },
    /// No byte of the range is in the body, 416.
    Unsatisfiable,
}

impl RangeRequest {
    /// The request's `Range`, when it asks for one range a stored body can answer: GET
    /// only, `bytes` only, a single range; anything else is answered whole.
    pub fn from_request(method: &Method, headers: &HeaderMap) -> Option<RangeRequest> {
        if method != Method::GET {
            return None;
        }
        let mut values = headers.get_all(RANGE).iter();
        let value = values.next()?.to_str().ok()?;
        if values.next().is_some() {
            return None;
        }
        let spec = parse_spec(value)?;
        let if_range = headers.get(IF_RANGE).map(|v| parse_if_range(v.as_bytes()));
        Some(RangeRequest { spec, if_range })
    }

    /// The part of a stored 200 with `headers` and a body of `len` bytes to send.
    pub fn resolve(&self, headers: &HeaderMap, len: u64) -> Resolved {
        if let Some(if_range) = &self.if_range
            && !if_range_matches(if_range, headers)
        {
            return Resolved::Whole;
        }
        match self.spec {
            Spec::From { first, .. } if first >= len => Resolved::Unsatisfiable,
            Spec::From { first, last } => Resolved::Part { start: first, end: last.map_or(len - 1, |last| last.min(len - 1)) },
            Spec::Suffix(0) => Resolved::Unsatisfiable,
            // Satisfiable, but no 206 can carry zero bytes: the (empty) whole.
            Spec::Suffix(_) if len == 0 => Resolved::Whole,
            Spec::Suffix(n) => Resolved::Part { start: len.saturating_sub(n), end: len - 1 },
        }
    }
}

/// `bytes=first-last`, `bytes=first-` or `bytes=-suffix` (the unit case-insensitive);
/// `None` for anything else, several ranges included.
fn parse_spec(value: &str) -> Option<Spec> {
    let (unit, set) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let set = set.trim();
    if set.contains(',') {
        return None;
    }
    let (first, last) = set.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        return Some(Spec::Suffix(number(last)?));
    }
    let first = number(first)?;
    let last = if last.is_empty() { None } else { Some(number(last)?) };
    // `last` before `first` is invalid (section 14.1.1): the header is ignored.
    if last.is_some_and(|last| last < first) {
        return None;
    }
    Some(Spec::From { first, last })
}

/// Digits only; a number past u64 is as good as u64::MAX (past any body's end).
fn number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse().unwrap_or(u64::MAX))
}

fn parse_if_range(value: &[u8]) -> IfRange {
    let trimmed = value.trim_ascii();
    if trimmed.starts_with(b"\"") || trimmed.starts_with(b"W/") {
        return IfRange::ETag(trimmed.to_vec());
    }
    match std::str::from_utf8(trimmed).ok().and_then(super::date::parse) {
        Some(date) => IfRange::Date(date),
        None => IfRange::Invalid,
    }
}

/// Section 13.1.5: an entity tag matches by the strong comparison (weak tags never
/// match); a date matches a `Last-Modified` equal to it that is strong, which for a
/// cache means at least 60 seconds before the stored `Date` (section 8.8.2.2).
fn if_range_matches(if_range: &IfRange, headers: &HeaderMap) -> bool {
    match if_range {
        IfRange::ETag(tag) => {
            let Some(etag) = headers.get(ETAG) else { return false };
            let etag = etag.as_bytes().trim_ascii();
            !tag.starts_with(b"W/") && !etag.starts_with(b"W/") && etag == tag.as_slice()
        }
        IfRange::Date(date) => {
            let (Some(modified), Some(sent)) = (http_date(headers, LAST_MODIFIED), http_date(headers, DATE)) else { return false };
            modified == *date && modified + Duration::from_secs(60) <= sent
        }
        IfRange::Invalid => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(range: &str, if_range: Option<&str>) -> Option<RangeRequest> {
        let mut headers = HeaderMap::new();
        headers.insert(RANGE, range.parse().unwrap());
        if let Some(value) = if_range {
            headers.insert(IF_RANGE, value.parse().unwrap());
        }
        RangeRequest::from_request(&Method::GET, &headers)
    }

    fn resolve(range: &str, len: u64) -> Option<Resolved> {
        request(range, None).map(|r| r.resolve(&HeaderMap::new(), len))
    }

    fn stored(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs.iter().map(|(n, v)| (http::HeaderName::from_static(n), v.parse().unwrap())).collect()
    }

    #[test]
    fn the_three_forms_of_a_range() {
        assert_eq!(resolve("bytes=0-99", 1000), Some(Resolved::Part { start: 0, end: 99 }));
        assert_eq!(resolve("bytes=100-", 1000), Some(Resolved::Part { start: 100, end: 999 }));
        assert_eq!(resolve("bytes=-10", 1000), Some(Resolved::Part { start: 990, end: 999 }));
        assert_eq!(resolve("Bytes = 5-5", 1000), Some(Resolved::Part { start: 5, end: 5 }), "unit is case-insensitive");
    }

    #[test]
    fn ranges_past_the_end_are_cut_or_unsatisfiable() {
        assert_eq!(resolve("bytes=900-5000", 1000), Some(Resolved::Part { start: 900, end: 999 }));
        assert_eq!(resolve("bytes=-5000", 1000), Some(Resolved::Part { start: 0, end: 999 }), "a suffix longer than the body is all of it");
        assert_eq!(resolve("bytes=1000-", 1000), Some(Resolved::Unsatisfiable));
        assert_eq!(resolve("bytes=99999999999999999999999-", 1000), Some(Resolved::Unsatisfiable));
        assert_eq!(resolve("bytes=-0", 1000), Some(Resolved::Unsatisfiable));
        assert_eq!(resolve("bytes=0-", 0), Some(Resolved::Unsatisfiable));
        assert_eq!(resolve("bytes=-5", 0), Some(Resolved::Whole), "a suffix of an empty body is the empty body");
    }

    #[test]
    fn what_is_not_one_byte_range_is_answered_whole() {
        for ignored in ["bytes=0-1,5-6", "items=0-5", "bytes=5-1", "bytes=a-b", "bytes=-", "bytes 0-5", "bytes=+1-5"] {
            assert_eq!(request(ignored, None), None, "{ignored}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(RANGE, "bytes=0-5".parse().unwrap());
        assert_eq!(RangeRequest::from_request(&Method::HEAD, &headers), None, "range handling is defined for GET only");
        headers.append(RANGE, "bytes=7-9".parse().unwrap());
        assert_eq!(RangeRequest::from_request(&Method::GET, &headers), None, "two Range lines are two ranges");
    }

    #[test]
    fn if_range_with_an_entity_tag_needs_the_strong_comparison() {
        let headers = stored(&[("etag", "\"v1\"")]);
        let part = Resolved::Part { start: 0, end: 9 };
        assert_eq!(request("bytes=0-9", Some("\"v1\"")).unwrap().resolve(&headers, 100), part);
        assert_eq!(request("bytes=0-9", Some("\"v2\"")).unwrap().resolve(&headers, 100), Resolved::Whole);
        assert_eq!(request("bytes=0-9", Some("W/\"v1\"")).unwrap().resolve(&headers, 100), Resolved::Whole);
        let weak = stored(&[("etag", "W/\"v1\"")]);
        assert_eq!(request("bytes=0-9", Some("W/\"v1\"")).unwrap().resolve(&weak, 100), Resolved::Whole);
        assert_eq!(request("bytes=0-9", Some("\"v1\"")).unwrap().resolve(&HeaderMap::new(), 100), Resolved::Whole, "no ETag, no match");
    }

    #[test]
    fn if_range_with_a_date_needs_a_strong_last_modified() {
        let modified = "Tue, 01 Dec 2026 10:00:00 GMT";
        let headers = stored(&[("last-modified", modified), ("date", "Tue, 01 Dec 2026 10:01:00 GMT")]);
        let part = Resolved::Part { start: 0, end: 9 };
        assert_eq!(request("bytes=0-9", Some(modified)).unwrap().resolve(&headers, 100), part);
        assert_eq!(request("bytes=0-9", Some("Tue, 01 Dec 2026 09:00:00 GMT")).unwrap().resolve(&headers, 100), Resolved::Whole);
        let within_a_minute = stored(&[("last-modified", modified), ("date", "Tue, 01 Dec 2026 10:00:59 GMT")]);
        assert_eq!(request("bytes=0-9", Some(modified)).unwrap().resolve(&within_a_minute, 100), Resolved::Whole, "a weak date validator");
        assert_eq!(request("bytes=0-9", Some("yesterday")).unwrap().resolve(&headers, 100), Resolved::Whole);
    }
}
