//! The request path, one phase per function: route, mode, key, lookup, fetch, store,
//! respond, record (see the phases in DESIGN.md).
//!
//! [`Proxy`] is the service every connection shares: it takes one [`Runtime`] snapshot
//! per request from its [`Live`] configuration (see [`crate::runtime`]), so a reload
//! never changes a request half-way.

mod admit;
mod cache_aside;
mod context;
mod decision;
mod fetch;
mod fill;
mod flight;
mod forward;
mod inspect;
mod record;
pub mod respond;
mod target;
mod trust;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use http::header::{CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, request};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::outcome::{BypassReason, Outcome};
use decision::{Decision, Serve};

use crate::clock::Clock;
use crate::config::{Config, RouteMode};
use crate::error::{ProxyError, error_response, plain_response};
use crate::runtime::{BuildError, Live, ReloadError, Runtime};
use context::RequestContext;
use forward::ClientInfo;

pub use inspect::InspectError;
pub use respond::CACHE_STATUS;

/// The proxy service shared by every connection of one server instance.
pub struct Proxy {
    /// The running configuration (shared with the control channel, which switches
    /// route modes in it).
    pub live: Arc<Live>,
    /// Set once on SIGTERM; read by every response (to add `Connection: close`) and by
    /// `/readyz`. An atomic flag because it only ever goes from false to true.
    draining: AtomicBool,
    /// The access log, when on (its format and sampling are read at start).
    /// Shared with the record of every sampled request, which logs when its body ends.
    access_log: Option<Arc<crate::access_log::AccessLog>>,
    /// The control channel, when `control_redis_url` is set (set once at start).
    pub control: std::sync::OnceLock<Arc<crate::control::Control>>,
    /// Request traces, when `[tracing] otlp_endpoint` is set (read at start).
    tracing: Option<Arc<crate::trace::Tracing>>,
}

impl Proxy {
    pub fn new(config: Config) -> Result<Proxy, BuildError> {
        Proxy::with_file(config, None)
    }

    /// A proxy whose configuration came from `path` (which reloads read again).
    pub fn with_file(config: Config, config_path: Option<std::path::PathBuf>) -> Result<Proxy, BuildError> {
        Proxy::with_clock(config, config_path, Clock::system())
    }

    /// Like [`Proxy::with_file`], deciding by `clock` (tests move it forward).
    pub fn with_clock(config: Config, config_path: Option<std::path::PathBuf>, clock: Clock) -> Result<Proxy, BuildError> {
        let live = Live::new(config, config_path, clock)?;
        let server = &live.runtime().config.server;
        let access_log = crate::access_log::AccessLog::start(server.access_log, server.access_log_sample, live.registry.access_log_dropped()).map(Arc::new);
        // A tracing exporter that cannot be built costs the traces, never the service.
        let tracing = live.runtime().config.tracing.as_ref().and_then(|config| match crate::trace::Tracing::new(config) {
            Ok(tracing) => Some(tracing),
            Err(err) => {
                tracing::error!(error = %err, "request traces are off");
                None
            }
        });
        Ok(Proxy { live: Arc::new(live), draining: AtomicBool::new(false), access_log, control: std::sync::OnceLock::new(), tracing })
    }

    /// Exports the traces still batched (at shutdown). The exporter's shutdown blocks
    /// while its last export runs on this runtime, so it waits off the runtime's threads.
    pub async fn flush_traces(&self) {
        if let Some(tracing) = self.tracing.clone() {
            let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
        }
    }

    /// Writes out buffered access log lines (at shutdown).
    pub fn flush_access_log(&self) {
        if let Some(log) = &self.access_log {
            log.flush();
        }
    }

    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.live.config_path()
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.live.runtime()
    }

    /// What this replica and the pool's Redis hold for `url` (absolute) as requested
    /// with `headers`, and the outcome a request would get now, changing nothing: the
    /// JSON answer of `GET /admin/cache`.
    pub async fn inspect(&self, url: &str, headers: http::HeaderMap) -> Result<serde_json::Value, InspectError> {
        inspect::inspect(&self.live.runtime(), url, headers).await
    }

    /// Reloads the config file (see [`Live::reload`]).
    /// Reloads the config file; the changed settings that take effect on restart only.
    pub async fn reload(&self) -> Result<Vec<&'static str>, ReloadError> {
        self.live.reload().await
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Handles one client request, start to finish; `closer` closes its connection at once
    /// (a response cut for falling behind a shared fill).
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr, closer: Option<crate::client_timers::Closer>) -> Response<ProxyBody> {
        let start = Instant::now();
        let runtime = self.live.runtime();
        let version = req.version();
        let (mut parts, body) = req.into_parts();
        // Routing, the key and the origin all see the normalised path (no dot segments,
        // no needless percent-encoding), so a path cannot mean one thing to the router or
        // the key and another to the origin.
        if let Err(err) = target::normalise(&mut parts) {
            return self.finish(error_response(&err), version, false);
        }
        // RFC 9112 section 3.2: a request with more than one Host field is a 400.
        if parts.headers.get_all(HOST).iter().nth(1).is_some() {
            return self.finish(error_response(&ProxyError::BadRequest("more than one Host field")), version, false);
        }
        let mut client = match ClientInfo::read(&parts, peer, &runtime.config.server.trusted_proxies) {
            Ok(client) => client,
            Err(err) => return self.finish(error_response(&err), version, false),
        };
        let log = self.access_log.as_ref().filter(|log| log.sampled());
        let timings: Option<Arc<crate::origin::Timings>> = log.map(|_| Arc::default());
        // Cheap clones: a standard method is inline, a path and query shares its bytes.
        let logged = log.map(|log| record::Logged {
            log: log.clone(),
            method: parts.method.clone(),
            host: client.host.clone(),
            target: parts.uri.path_and_query().cloned(),
            timings: timings.clone(),
        });
        let Some(index) = runtime.router.route(client.host_without_port(), parts.uri.path()) else {
            runtime.unrouted.increment(1);
            let text = format!("no route matches {}{}\n", client.host, parts.uri.path());
            return self.finish(plain_response(StatusCode::NOT_FOUND, text), version, false);
        };
        let route = &runtime.routes[index];
        if let Some(admission) = route.admission.as_ref().filter(|a| a.config.per_client.is_some()) {
            client.source = Some(crate::admission::ClientSource::capture(&admission.config.client, &parts.headers, client.trusted));
        }
        let trace = self.tracing.as_ref().map(|t| Arc::new(t.begin(&parts.headers, client.trusted, format!("{} {}", parts.method, route.config.name))));
        // The origin phases need their durations for a trace as for a log line.
        let timings = timings.or_else(|| trace.as_ref().filter(|t| t.sampled()).map(|_| Arc::default()));
        let ctx = RequestContext {
            route: route.clone(),
            mode: route.mode(),
            client,
            timings,
            trace: trace.clone(),
            head: parts.method == Method::HEAD,
            send_timeout: runtime.config.server.send_timeout,
            closer,
        };
        let conditional = crate::cache::revalidate::Conditional::from_request(&parts.method, &parts.headers);
        let range = crate::cache::range::RangeRequest::from_request(&parts.method, &parts.headers);
        // A GET or HEAD body has no meaning (RFC 9110 section 9.3.1): never sent on, so the
        // origin connection cannot get out of step; read and dropped so the client's can
        // stay in step too, or the connection is closed after the response.
        let (body, in_step) = if parts.method == Method::GET || parts.method == Method::HEAD {
            for name in [CONTENT_LENGTH, TRANSFER_ENCODING, EXPECT] {
                parts.headers.remove(name);
            }
            (None, discard_body(body).await)
        } else {
            (Some(body), true)
        };
        // A GET or HEAD only: an unsafe request that failed must not look done.
        let safe = body.is_none();
        let decision = serve(&ctx, parts, body).await;
        let decision = if safe { decision.or_fallback_on(&ctx.route) } else { decision };
        let outcome = decision.outcome;
        let res = respond::render(&ctx, decision, conditional.as_ref(), range.as_ref(), ctx.now());
        let record = record::Record { route: ctx.route, outcome, status: res.status().as_u16(), start, logged, trace };
        let res = res.map(|body| record.when_done(body));
        self.finish(res, version, !in_step)
    }

    /// Last touch on every response: HTTP/1 clients are told to close while draining, or
    /// when `close` (their connection is out of step).
    fn finish(&self, mut res: Response<ProxyBody>, version: Version, close: bool) -> Response<ProxyBody> {
        if (close || self.is_draining()) && version <= Version::HTTP_11 {
            res.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        res
    }
}

/// The most of a GET or HEAD body read (and dropped) to keep the client connection usable.
const DISCARDED_BODY_BYTES: usize = 64 * 1024;

/// Reads and drops a GET or HEAD body; false when it was larger than
/// [`DISCARDED_BODY_BYTES`], slower than a second, or broken: the connection is then
/// closed after the response.
async fn discard_body(body: Incoming) -> bool {
    if http_body::Body::is_end_stream(&body) {
        return true;
    }
    let limited = http_body_util::Limited::new(body, DISCARDED_BODY_BYTES);
    matches!(tokio::time::timeout(std::time::Duration::from_secs(1), http_body_util::BodyExt::collect(limited)).await, Ok(Ok(_)))
}

/// Mode, then bypass or cache-aside. `body` is `None` for GET and HEAD.
async fn serve(ctx: &RequestContext, parts: request::Parts, body: Option<Incoming>) -> Decision {
    let (route, client, mode) = (&ctx.route, &ctx.client, ctx.mode);
    match mode {
        RouteMode::Off => return Decision::new(Serve::Off, Outcome::Off),
        RouteMode::Fallback => return Decision::fallback_or_off(route),
        RouteMode::Normal | RouteMode::CacheOnly => {}
    }
    let reason = match (&route.pool, bypass_reason(&parts, route.config.cache.ignore_request_cache_control)) {
        (Some(pool), None) if route.config.cacheable => return cache_aside::cache_aside(ctx, pool, parts).await,
        (Some(pool), Some(BypassReason::RequestNoStore)) if route.config.cacheable && mode == RouteMode::Normal => {
            return cache_aside::unstored(ctx, pool, parts).await;
        }
        (_, Some(reason)) => reason,
        // A pass-through route (`cache = false`): never looked up, stored or coalesced.
        (_, None) => BypassReason::Route,
    };
    if mode == RouteMode::CacheOnly {
        return Decision::cache_only_miss(route);
    }
    // RFC 9111 section 4.4: unsafe methods, and those whose safety is unknown, invalidate
    // their target; not the methods registered as safe (GET, HEAD, OPTIONS, TRACE, and
    // WebDAV's PROPFIND, REPORT and SEARCH, which calendar and file clients poll with),
    // nor CONNECT, whose target is no stored URL.
    let unsafe_method = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::CONNECT)
        && !matches!(parts.method.as_str(), "PROPFIND" | "REPORT" | "SEARCH");
    let target = unsafe_method.then(|| {
        // The URL as the key has it: only the route's kept parameters.
        let rules = &route.config.cache;
        let query = parts.uri.query().map(|q| crate::cache::key::normalise_query_for(q, rules).map_or_else(|_| q.to_owned(), |n| n.into_owned()));
        crate::cache::PurgeTarget::for_request(client.scheme, &client.host, parts.uri.path(), query.as_deref())
    });
    if let Some(refused) = admit::admit_bypass(route, client, &parts.method) {
        return refused;
    }
    match fetch::pass_through(ctx, parts, body).await {
        Ok((parts, body)) => {
            // RFC 9111 section 4.4: a successful unsafe request invalidates the target,
            // here, in Redis and on every replica, before the response goes out (so
            // the client's next GET cannot find the old copy). It runs in its own
            // task: a client that hangs up does not leave it half done. Its cost is
            // bounded by the Redis deadlines, and nil while the Redis breaker is open.
            if let (Some(target), Some(pool)) = (target.filter(|_| parts.status.as_u16() < 400), route.pool.clone()) {
                let _ = tokio::spawn(async move { pool.purge(&target, false).await }).await;
            }
            Decision::new(Serve::Streamed(parts, body), Outcome::Bypass(reason))
        }
        Err(err) => Decision::failed(err),
    }
}

/// Why a request skips the cache, if it does. A route that ignores the request's
/// `Cache-Control` ignores its `no-store` too: such requests use the cache like any.
fn bypass_reason(parts: &request::Parts, ignore_request_cache_control: bool) -> Option<BypassReason> {
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return Some(BypassReason::Method);
    }
    if ignore_request_cache_control {
        return None;
    }
    let no_store =
        parts.headers.get_all(CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()).any(|v| v.split(',').any(|d| d.trim().eq_ignore_ascii_case("no-store")));
    no_store.then_some(BypassReason::RequestNoStore)
}
