//! The decision of the request path: what one request is served and how it is counted.
//! The phases only decide; [`super::respond::render`] turns the decision into the
//! response once (HEAD, 304, `Age`, `Cache-Status`, the fields for this cache only).

use std::sync::Arc;
use std::time::SystemTime;

use http::response;

use crate::body::ProxyBody;
use crate::body::shared::Reader;
use crate::cache::Entry;
use crate::cache::coalesce::Answer;
use crate::config::{Fallback, FallbackOn};
use crate::error::ProxyError;
use crate::origin::{OriginError, is_failure_status};
use crate::outcome::{BypassReason, Outcome, StaleReason};
use crate::runtime::RouteRuntime;

/// What to serve.
pub(super) enum Serve {
    /// A stored entry, with `Age` when `age`.
    Entry { entry: Arc<Entry>, age: bool },
    /// An entry being stored, its body read from the fill its readers share as it
    /// arrives; with `Age` when `age`.
    Shared { entry: Arc<Entry>, reader: Reader, age: bool },
    /// An origin answer read whole, shared between a flight's leader and its waiters.
    Answer(Arc<Answer>),
    /// An origin response passed on as it streams in.
    Streamed(response::Parts, ProxyBody),
    /// The route's configured static response.
    Fallback(Fallback),
    /// Route mode `off`.
    Off,
    /// An error, answered with its status (see [`crate::error::error_response`]).
    Error(Arc<ProxyError>),
}

/// What to serve, and the outcome it is counted as.
pub(super) struct Decision {
    pub serve: Serve,
    pub outcome: Outcome,
}

impl Decision {
    pub fn new(serve: Serve, outcome: Outcome) -> Decision {
        Decision { serve, outcome }
    }

    /// A stored entry, with `Age`.
    pub fn entry(entry: Arc<Entry>, outcome: Outcome) -> Decision {
        Decision::new(Serve::Entry { entry, age: true }, outcome)
    }

    /// A request that ends with `err`: `shed` when the origin's capacity refused it,
    /// else `error`.
    pub fn failed(err: impl Into<Arc<ProxyError>>) -> Decision {
        let err = err.into();
        tracing::debug!(error = %err, cause = ?std::error::Error::source(&*err), "request failed");
        let outcome = failure_outcome(&err);
        Decision::new(Serve::Error(err), outcome)
    }

    /// Route mode `fallback`: the route's static response, or `off` without one.
    pub fn fallback_or_off(route: &RouteRuntime) -> Decision {
        match &route.config.fallback {
            Some(fallback) => Decision::new(Serve::Fallback(fallback.clone()), Outcome::Fallback),
            None => Decision::new(Serve::Off, Outcome::Off),
        }
    }

    /// `cache-only` with nothing stored: the fallback if there is one, else 504 (as
    /// `only-if-cached` answers).
    pub fn cache_only_miss(route: &RouteRuntime) -> Decision {
        match &route.config.fallback {
            Some(fallback) => Decision::new(Serve::Fallback(fallback.clone()), Outcome::Fallback),
            None => Decision::failed(ProxyError::NotCached),
        }
    }

    /// The decision of a request that skipped the cache (a request `no-store` coalesced
    /// with others): an origin answer, shared or not, is `bypass`; a request that got no
    /// answer keeps its failure outcome.
    pub fn counted_as_bypass(mut self, reason: BypassReason) -> Decision {
        if matches!(self.outcome, Outcome::Miss(_) | Outcome::Collapsed) {
            self.outcome = Outcome::Bypass(reason);
        }
        self
    }

    /// `fallback_on`: the route's fallback instead of an origin that could not answer
    /// for a reason the route lists. Applied last, so a stored copy that may be served
    /// (stale-if-error) was served already.
    pub fn or_fallback_on(self, route: &RouteRuntime) -> Decision {
        let Some(fallback) = route.config.fallback.as_ref().filter(|_| !route.config.fallback_on.is_empty()) else { return self };
        match self.origin_failure() {
            Some(reason) if route.config.fallback_on.contains(&reason) => Decision::new(Serve::Fallback(fallback.clone()), Outcome::Fallback),
            _ => self,
        }
    }

    /// Why the origin could not answer, if that is what this reports.
    fn origin_failure(&self) -> Option<FallbackOn> {
        match &self.serve {
            Serve::Answer(answer) if is_failure_status(answer.status) => Some(FallbackOn::Error),
            Serve::Streamed(parts, _) if is_failure_status(parts.status) => Some(FallbackOn::Error),
            Serve::Error(err) => match &**err {
                ProxyError::Origin { source, .. } => match source {
                    OriginError::Shed(_) => Some(FallbackOn::Shed),
                    OriginError::BreakerOpen => Some(FallbackOn::Breaker),
                    OriginError::Timeout(_) => Some(FallbackOn::Timeout),
                    OriginError::Connect(_) | OriginError::Request(_) | OriginError::Body(_) | OriginError::NoEndpoints => Some(FallbackOn::Error),
                    OriginError::ClientBody(_) | OriginError::UploadTimeout(_) | OriginError::Unwanted => None,
                },
                ProxyError::OriginStatus { status, .. } if is_failure_status(*status) => Some(FallbackOn::Error),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether this reports the origin failing (a failure status, or an upstream error):
    /// the only decisions a stale copy may stand in for.
    fn upstream_failed(&self) -> bool {
        match &self.serve {
            Serve::Answer(answer) => is_failure_status(answer.status),
            Serve::Streamed(parts, _) => is_failure_status(parts.status),
            Serve::Error(err) => err.allows_stale(),
            Serve::Entry { .. } | Serve::Shared { .. } | Serve::Fallback(_) | Serve::Off => false,
        }
    }
}

/// The outcome of a request that ends with `err`.
pub(super) fn failure_outcome(err: &ProxyError) -> Outcome {
    if err.is_shed() { Outcome::Shed } else { Outcome::Error }
}

/// The one stale-on-error rule (RFC 5861 section 4, and `stale_on_error = "always"`
/// through the entry's window): a decision that reports the origin failing is replaced
/// by the stored copy while its stale-if-error window allows, labelled `stale_if_error`;
/// anything else (an answer, the client's or bulwark's own error) stands.
pub(super) fn or_stale_if_error(decision: Decision, stale: Option<&Arc<Entry>>, now: SystemTime) -> Decision {
    match stale.filter(|entry| decision.upstream_failed() && entry.within_stale_if_error(now)) {
        Some(entry) => Decision::entry(entry.clone(), Outcome::Stale(StaleReason::IfError)),
        None => decision,
    }
}
