//! Building responses: from a stored entry (with `Age`), from an origin response
//! (streamed), and the static ones (fallback, off).

use std::time::SystemTime;

use http::header::{AGE, CONTENT_LENGTH, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode, response};

use crate::cache::Entry;
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
