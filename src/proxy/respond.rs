//! Building responses: from a stored entry (with `Age`), from an origin response
//! (streamed), and the static ones (fallback, off).

use std::time::SystemTime;

use http::header::{AGE, CONTENT_LENGTH, ETAG, LAST_MODIFIED, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode, response};
use http_body::Body;

use crate::cache::Entry;
use crate::cache::revalidate::{Conditional, NOT_MODIFIED_FIELDS};
use crate::config::Fallback;
use crate::error::plain_response;
use crate::proxy::ProxyBody;

/// A response built from a stored entry; `Age` is set when `with_age`.
pub fn from_entry(entry: &Entry, head: bool, with_age: bool, now: SystemTime) -> Response<ProxyBody> {
    let body = if head { ProxyBody::empty() } else { ProxyBody::full(entry.body.clone()) };
    let mut res = Response::new(body);
    *res.status_mut() = entry.status;
    *res.headers_mut() = entry.headers.clone();
    if with_age {
        res.headers_mut().insert(AGE, HeaderValue::from(entry.age(now).as_secs()));
    }
    res
}

/// An origin answer shared between a flight's leader and waiters.
pub fn from_answer(answer: &crate::cache::coalesce::Answer, head: bool) -> Response<ProxyBody> {
    let mut res = Response::new(if head { ProxyBody::empty() } else { ProxyBody::full(answer.body.clone()) });
    *res.status_mut() = answer.status;
    *res.headers_mut() = answer.headers.clone();
    res.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(answer.body.len()));
    res
}

/// An origin response passed through; a HEAD request gets the headers only.
pub fn streamed(parts: response::Parts, body: ProxyBody, head: bool) -> Response<ProxyBody> {
    Response::from_parts(parts, if head { ProxyBody::empty() } else { body })
}

/// The response as a HEAD request gets it: the same header fields and no body. A body
/// built for an error or a mode's answer is dropped here, its length kept in
/// `Content-Length`, so the body that goes out is at its end and is recorded as sent
/// whole (the server never polls a HEAD response's body).
pub fn headers_only(res: Response<ProxyBody>) -> Response<ProxyBody> {
    let (mut parts, body) = res.into_parts();
    if body.is_end_stream() {
        return Response::from_parts(parts, body);
    }
    if !parts.headers.contains_key(CONTENT_LENGTH)
        && let Some(len) = body.size_hint().exact()
    {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    Response::from_parts(parts, ProxyBody::empty())
}

/// Route mode `off`.
pub fn off() -> Response<ProxyBody> {
    let mut res = plain_response(StatusCode::SERVICE_UNAVAILABLE, "this route is switched off\n");
    res.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("5"));
    res
}

/// A route's configured static response.
pub fn fallback(fallback: &Fallback, head: bool) -> Response<ProxyBody> {
    let mut res = Response::new(if head { ProxyBody::empty() } else { ProxyBody::full(fallback.body.clone()) });
    *res.status_mut() = fallback.status;
    *res.headers_mut() = fallback.headers.clone();
    res.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(fallback.body.len()));
    res
}

/// A 304 in place of `res` when the client's conditional says it already has this
/// representation (RFC 9110 section 13.1): the fields a 304 carries (section 15.4.5),
/// `Last-Modified` when there is no `ETag`, and `Age`.
pub fn not_modified_if(res: Response<ProxyBody>, conditional: &Conditional) -> Response<ProxyBody> {
    if !conditional.not_modified(res.status(), res.headers()) {
        return res;
    }
    let (parts, _) = res.into_parts();
    let mut out = Response::new(ProxyBody::empty());
    *out.status_mut() = StatusCode::NOT_MODIFIED;
    let headers = out.headers_mut();
    let last_modified = (!parts.headers.contains_key(ETAG)).then_some(&LAST_MODIFIED);
    for name in NOT_MODIFIED_FIELDS.iter().chain([&AGE]).chain(last_modified) {
        for value in parts.headers.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    out
}
