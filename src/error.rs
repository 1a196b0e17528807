//! Errors of the request path, each with its cause and where it came from, and the one
//! function that maps them to HTTP responses.

use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::origin::OriginError;

/// Where an error came from. Only upstream errors may be answered with a stale copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The downstream client sent something wrong or went away.
    Client,
    /// The origin failed, timed out, or could not be reached.
    Upstream,
    /// A fault of bulwark itself.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("origin {origin}: {source}")]
    Origin {
        origin: String,
        #[source]
        source: OriginError,
    },
    #[error("origin {origin} answered {status}")]
    OriginStatus { origin: String, status: StatusCode },
    #[error("not in cache and the route is cache-only")]
    NotCached,
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// Over the route's admission budget; a token is free again in `retry_after` seconds.
    #[error("too many requests for pages not in the cache; retry in {retry_after} s")]
    Limited { retry_after: u64 },
}

impl ProxyError {
    pub fn source_kind(&self) -> ErrorSource {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::Limited { .. }
            | ProxyError::Origin { source: OriginError::ClientBody(_) | OriginError::UploadTimeout(_) | OriginError::Unwanted, .. } => ErrorSource::Client,
            ProxyError::Origin { .. } | ProxyError::OriginStatus { .. } => ErrorSource::Upstream,
            ProxyError::NotCached | ProxyError::Internal(_) => ErrorSource::Internal,
        }
    }

    /// Whether a stored copy may stand in for the response (stale-if-error).
    pub fn allows_stale(&self) -> bool {
        self.source_kind() == ErrorSource::Upstream
    }

    pub fn is_shed(&self) -> bool {
        matches!(self, ProxyError::Origin { source: OriginError::Shed(_) | OriginError::BreakerOpen, .. })
    }

    /// Whether everyone who wanted the answer went away before the request was sent.
    pub fn is_unwanted(&self) -> bool {
        matches!(self, ProxyError::Origin { source: OriginError::Unwanted, .. })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Origin { source, .. } => match source {
                OriginError::Shed(_) | OriginError::BreakerOpen | OriginError::Unwanted | OriginError::NoEndpoints => StatusCode::SERVICE_UNAVAILABLE,
                OriginError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                OriginError::Connect(_) | OriginError::Request(_) | OriginError::Body(_) => StatusCode::BAD_GATEWAY,
                OriginError::ClientBody(_) => StatusCode::BAD_REQUEST,
                OriginError::UploadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            },
            ProxyError::OriginStatus { status, .. } => *status,
            ProxyError::NotCached => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Limited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// The response for an error: its status, a short plain-text reason, and `Retry-After`
/// when trying again later can help. The reason does not name the origin (internal
/// names are for the log, which gets the whole error).
pub fn error_response(err: &ProxyError) -> Response<ProxyBody> {
    let status = err.status();
    let text = match err {
        ProxyError::Origin { source, .. } => format!("{source}\n"),
        ProxyError::OriginStatus { status, .. } => format!("origin answered {status}\n"),
        other => format!("{other}\n"),
    };
    let mut res = plain_response(status, text);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut().insert(RETRY_AFTER, HeaderValue::from(1));
    }
    if let ProxyError::Limited { retry_after } = err {
        res.headers_mut().insert(RETRY_AFTER, HeaderValue::from((*retry_after).max(1)));
        // A CDN in front must not keep a refusal meant for one client.
        res.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

pub fn plain_response(status: StatusCode, text: impl Into<bytes::Bytes>) -> Response<ProxyBody> {
    let mut res = Response::new(ProxyBody::full(text));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}
