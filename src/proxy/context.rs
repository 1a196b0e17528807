//! The request context: what one request carries through its phases, built once when
//! it has been routed, so every phase reads the same route snapshot and the same mode.

use std::sync::Arc;

use super::forward::ClientInfo;
use crate::config::RouteMode;
use crate::origin::Timings;
use crate::runtime::RouteRuntime;

pub(super) struct RequestContext {
    /// The route, from the runtime snapshot the request started on.
    pub route: Arc<RouteRuntime>,
    /// The route's mode, read once: a switch while the request runs does not make it
    /// half one mode and half the other.
    pub mode: RouteMode,
    /// Who asked: host, scheme, peer, whether the peer is a trusted proxy.
    pub client: ClientInfo,
    /// Origin timings for the access log or a trace, when this request is logged or traced.
    pub timings: Option<Arc<Timings>>,
    /// The request's trace, when tracing is on.
    pub trace: Option<Arc<crate::trace::RequestTrace>>,
    /// A HEAD request: the response carries headers only.
    pub head: bool,
    /// `[server] send_timeout`: how long a streamed response may wait for the client.
    pub send_timeout: std::time::Duration,
    /// Closes the client's connection at once (HTTP/1.1), for a response cut because its
    /// client fell behind a shared fill.
    pub closer: Option<crate::client_timers::Closer>,
}

impl RequestContext {
    /// The wall time, by the clock the route's pool decides by.
    pub fn now(&self) -> std::time::SystemTime {
        self.route.clock.now()
    }
}
