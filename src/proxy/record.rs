//! The record phase: one metrics record and (when sampled) one access log line per
//! request, taken when its response body ends, so durations cover the body and a
//! client that hangs up is counted.

use std::sync::Arc;
use std::time::Instant;

use http::Method;
use http::uri::PathAndQuery;

use crate::access_log::{AccessLog, Line};
use crate::body::{BodyEnd, ProxyBody};
use crate::origin::Timings;
use crate::outcome::Outcome;
use crate::runtime::RouteRuntime;

/// What the access log line of a sampled request says besides its outcome.
pub(super) struct Logged {
    pub log: Arc<AccessLog>,
    pub method: Method,
    pub host: String,
    pub target: Option<PathAndQuery>,
    pub timings: Option<Arc<Timings>>,
}

/// A request's record, taken once its response ends.
pub(super) struct Record {
    pub route: Arc<RouteRuntime>,
    pub outcome: Outcome,
    pub status: u16,
    pub start: Instant,
    pub logged: Option<Logged>,
    pub trace: Option<Arc<crate::trace::RequestTrace>>,
}

impl Record {
    /// `body`, recording the request when it ends.
    pub fn when_done(self, body: ProxyBody) -> ProxyBody {
        body.on_end(Box::new(move |end| self.finish(end)))
    }

    fn finish(self, end: BodyEnd) {
        let total = self.start.elapsed();
        // An origin body that failed part way gave the client an aborted response: not
        // the outcome decided when its head went out.
        let outcome = if end == BodyEnd::Failed { Outcome::Error } else { self.outcome };
        let metrics = &self.route.metrics;
        metrics.record(outcome, total.as_secs_f64());
        if end == BodyEnd::Aborted {
            metrics.client_abort();
        }
        if let Some(trace) = &self.trace {
            use opentelemetry::KeyValue;
            trace.finish(
                vec![
                    KeyValue::new("bulwark.route", self.route.config.name.clone()),
                    KeyValue::new("bulwark.pool", self.route.pool.as_ref().map_or(String::new(), |p| p.config.name.clone())),
                    KeyValue::new("bulwark.cache", outcome.as_str()),
                ],
                self.status,
            );
        }
        if let Some(logged) = &self.logged {
            logged.log.log(&Line {
                method: logged.method.as_str(),
                host: &logged.host,
                target: logged.target.as_ref().map_or("/", |p| p.as_str()),
                status: self.status,
                route: &self.route.config.name,
                pool: self.route.pool.as_ref().map_or("", |p| p.config.name.as_str()),
                cache: outcome.as_str(),
                total,
                timings: logged.timings.as_deref(),
            });
        }
    }
}
