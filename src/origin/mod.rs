//! Origins: a pooled keep-alive client per origin (http and https), the concurrency
//! limit and queue in front of it ([`bulkhead`]), timeouts, and error classification.

mod aged;
pub mod breaker;
pub mod bulkhead;
pub mod discovery;
pub mod endpoints;
mod retry;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub use bulkhead::{Holder, Interest, Shed};
use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{EndpointSource, HealthCheck, OriginConfig, Priority};
use crate::metrics::{OriginMetrics, OriginStatus};
use breaker::Breaker;
use bulkhead::Slot;

/// Body of a request sent to an origin.
pub type OutgoingBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// No body (a GET, HEAD or conditional request sent on).
pub fn empty_body() -> OutgoingBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

/// The client's request body failed while it was being sent on (a bad chunk, a hang-up
/// mid-upload): the client's fault, never the origin's.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// A client's request body on its way to the origin: its errors become
/// [`ClientBodyError`], and the request's extensions carry [`UploadDone`] so that a
/// timeout while the client is still sending is told apart from a slow origin.
pub struct Upload {
    inner: hyper::body::Incoming,
    done: UploadDone,
}

/// Whether an upload has been sent whole (a request extension).
#[derive(Clone, Debug, Default)]
pub struct UploadDone(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl UploadDone {
    fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Upload {
    /// The body to send, and the flag to put into the request's extensions.
    pub fn new(inner: hyper::body::Incoming) -> (Upload, UploadDone) {
        let done = UploadDone::default();
        (Upload { inner, done: done.clone() }, done)
    }
}

impl http_body::Body for Upload {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.done.0.store(true, std::sync::atomic::Ordering::Release);
        }
        polled.map(|frame| frame.map(|f| f.map_err(|err| -> Self::Error { Box::new(ClientBodyError(err)) })))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `err` (an origin request's failure) was caused by the client's body.
fn caused_by_client_body(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = cause {
        if err.is::<ClientBodyError>() {
            return true;
        }
        cause = err.source();
    }
    false
}

/// Time spent waiting for an origin slot and in the origin, for one request's log line.
/// Atomics because the fetch may run in another task (a coalesced flight).
#[derive(Debug, Default)]
pub struct Timings {
    pub queue_us: AtomicU64,
    pub origin_us: AtomicU64,
}

impl Timings {
    pub fn record(&self, queue: Duration, origin: Duration) {
        self.queue_us.store(u64::try_from(queue.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.origin_us.store(u64::try_from(origin.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Why an origin gave no response.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("shed before reaching the origin: {0}")]
    Shed(#[from] Shed),
    #[error("origin circuit breaker is open")]
    BreakerOpen,
    #[error("origin did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("cannot connect to origin")]
    Connect(#[source] hyper_util::client::legacy::Error),
    #[error("origin request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("origin response body failed")]
    Body(#[source] OriginBodyError),
    /// The client's request body failed while it was sent on: the origin request was
    /// abandoned; nothing is counted against the origin.
    #[error("the client's request body failed")]
    ClientBody(#[source] hyper_util::client::legacy::Error),
    /// The client was still sending its body when the origin's `timeout` ran out: the
    /// client's slowness, not the origin's.
    #[error("the request body did not arrive within {0:?}")]
    UploadTimeout(std::time::Duration),
    /// Everyone who wanted the answer went away while the request waited for a slot:
    /// it was never sent.
    #[error("nobody wanted the answer any more")]
    Unwanted,
    /// The origin has no endpoints (its host resolves to nothing).
    #[error("origin has no endpoints")]
    NoEndpoints,
}

impl OriginError {
    /// The `status` label of `bulwark_origin_requests_total`, when the origin was tried.
    pub fn metric_status(&self) -> Option<OriginStatus> {
        match self {
            OriginError::Shed(_)
            | OriginError::BreakerOpen
            | OriginError::ClientBody(_)
            | OriginError::UploadTimeout(_)
            | OriginError::Unwanted
            | OriginError::NoEndpoints => None,
            OriginError::Timeout(_) => Some(OriginStatus::Timeout),
            OriginError::Connect(_) => Some(OriginStatus::ConnectError),
            OriginError::Request(_) | OriginError::Body(_) => Some(OriginStatus::Error),
        }
    }
}

pub struct Origin {
    pub config: OriginConfig,
    client: Client<aged::AgedConnector<HttpsConnector<HttpConnector>>, OutgoingBody>,
    bulkhead: bulkhead::Bulkhead,
    breaker: Breaker,
    retries: retry::RetryBudget,
    pub endpoints: endpoints::Endpoints,
    /// Whether requests can be sent: the endpoints have been looked up once and, with a
    /// health check, checked once (until then requests wait rather than fail).
    ready: tokio::sync::watch::Sender<bool>,
    /// Asks for a round of health checks now (new endpoints were found).
    check_now: Arc<tokio::sync::Notify>,
    /// Connections open to the origin, over all its endpoints.
    open_connections: Arc<aged::OpenConnections>,
    /// This replica's share of `fleet_max_concurrency` (0: none).
    fleet_share: AtomicUsize,
    pub metrics: OriginMetrics,
    /// The breaker's state as last logged (lines on changes only).
    breaker_logged: std::sync::atomic::AtomicBool,
    /// Warnings about attempts that got no answer, and about the breaker, rate-limited.
    unreachable_log: crate::log_every::Every,
    breaker_log: crate::log_every::Every,
}

/// Lines about one origin failing repeat at most this often.
const ORIGIN_LOG_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// Origin statuses that count as failures (for the breaker) and allow stale-if-error.
pub fn is_failure_status(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// Statuses that say an endpoint, not a URL, is failing (for ejection).
fn is_gateway_failure(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// Why an attempt got no response.
enum AttemptError {
    Client(hyper_util::client::legacy::Error),
    NoEndpoints,
}

/// The endpoint an attempt in progress went to, and when (read when the deadline ends it).
type Current = std::sync::Mutex<Option<(Arc<endpoints::Endpoint>, Instant)>>;

impl Origin {
    /// `send_timeout` is the server's: the longest a client's pause can leave a connection
    /// streaming to it silent.
    pub fn new(config: OriginConfig, send_timeout: Duration, metrics: OriginMetrics) -> Result<Arc<Origin>, rustls::Error> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_keepalive(Some(std::time::Duration::from_secs(30)));
        let tls = tls_config(&config.tls)?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
        // Requests are addressed to an endpoint's address: TLS names the host the
        // certificate is for (`tls_server_name`, else the url's host with DNS discovery).
        let server_name = match (&config.tls_server_name, &config.endpoints) {
            (Some(name), _) => Some(name.clone()),
            (None, EndpointSource::Dns { host, .. }) => Some(host.clone()),
            (None, _) => None,
        };
        let builder = match server_name.map(rustls::pki_types::ServerName::try_from) {
            Some(Ok(name)) => builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name.to_owned())),
            _ => builder,
        };
        let connector = builder.enable_http1().wrap_connector(http);
        let open_connections = Arc::new(aged::OpenConnections::new(config.timeout.max(send_timeout) + Duration::from_secs(1)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(config.max_concurrency)
            .set_host(false)
            .build(aged::AgedConnector::new(connector, config.connection_max_age, open_connections.clone()));
        let bulkhead = bulkhead::Bulkhead::new(config.max_concurrency, config.max_queue, config.queue_timeout);
        let breaker = Breaker::new(config.breaker);
        metrics.concurrency_limit.set(config.max_concurrency as f64);
        let endpoints = endpoints::Endpoints::new(
            &config.name,
            config.ejection,
            config.slow_start,
            config.health_check.is_some(),
            config.timeout,
            metrics.ejections.clone(),
        );
        let (ready, _) = tokio::sync::watch::channel(false);
        match &config.endpoints {
            EndpointSource::Url => endpoints.set(config.url.authority().map(std::slice::from_ref).unwrap_or_default()),
            EndpointSource::Static(list) => endpoints.set(list),
            EndpointSource::Dns { .. } => false,
        };
        if !matches!(config.endpoints, EndpointSource::Dns { .. }) && config.health_check.is_none() {
            ready.send_replace(true);
        }
        let origin = Arc::new(Origin {
            config,
            client,
            bulkhead,
            breaker,
            retries: retry::RetryBudget::default(),
            endpoints,
            ready,
            check_now: Arc::new(tokio::sync::Notify::new()),
            open_connections,
            fleet_share: AtomicUsize::new(0),
            metrics,
            breaker_logged: std::sync::atomic::AtomicBool::new(false),
            unreachable_log: crate::log_every::Every::new(ORIGIN_LOG_PERIOD),
            breaker_log: crate::log_every::Every::new(ORIGIN_LOG_PERIOD),
        });
        discovery::start(&origin);
        Ok(origin)
    }

    /// Takes this replica's share of `fleet_max_concurrency` now that `replicas` are alive
    /// (this one included; 0 when unknown): the budget divided by them, at least 1 and at
    /// most `max_concurrency`.
    pub fn set_fleet(&self, replicas: usize) {
        let Some(fleet) = self.config.fleet_max_concurrency else { return };
        // Not known (no control Redis, or it never answered): max_concurrency alone.
        if replicas == 0 {
            return;
        }
        let share = (fleet / replicas).clamp(1, self.config.max_concurrency);
        if self.fleet_share.swap(share, Ordering::Relaxed) != share {
            self.bulkhead.set_limit(share);
            self.metrics.concurrency_limit.set(share as f64);
            tracing::info!(origin = self.config.name, share, replicas, fleet, "origin concurrency share of the fleet budget");
        }
    }

    /// This replica's share of the fleet budget, if the origin has one and it is known.
    pub fn fleet_share(&self) -> Option<usize> {
        Some(self.fleet_share.load(Ordering::Relaxed)).filter(|share| *share > 0)
    }

    /// Requests may be sent from now on.
    fn ready(&self) {
        self.ready.send_if_modified(|done| !std::mem::replace(done, true));
    }

    /// Sends `req` (whose URI must already point at this origin) once a slot is free and
    /// the breaker lets it through. The slot is held until the response body is finished
    /// or dropped.
    pub async fn send(&self, req: Request<OutgoingBody>, priority: Priority, timings: Option<&Timings>) -> Result<Response<OriginBody>, OriginError> {
        // An open breaker answers at once, without queueing for a slot first.
        if self.breaker.is_open_now() {
            return Err(OriginError::BreakerOpen);
        }
        if !*self.ready.borrow() {
            // The first DNS answer and health checks, before any slot or breaker permit is
            // taken (waiting for them says nothing about the origin), within its timeout.
            let mut ready = self.ready.subscribe();
            if !matches!(tokio::time::timeout(self.config.timeout, ready.wait_for(|done| *done)).await, Ok(Ok(_))) {
                return Err(OriginError::NoEndpoints);
            }
        }
        let queued_at = Instant::now();
        let Some(acquired) = self.bulkhead.acquire_while_wanted(priority, req.extensions().get::<Interest>()).await else {
            return Err(OriginError::Unwanted);
        };
        let waited = queued_at.elapsed();
        self.metrics.queue_wait.record(waited.as_secs_f64());
        let (slot, _) = acquired?;
        let Some(permit) = self.breaker.admit() else {
            return Err(OriginError::BreakerOpen);
        };
        let start = Instant::now();
        let upload = req.extensions().get::<UploadDone>().cloned();
        let current = Current::default();
        let result = tokio::time::timeout(self.config.timeout, self.attempts(req, &current)).await;
        self.metrics.duration.record(start.elapsed().as_secs_f64());
        if let Some(timings) = timings {
            timings.record(waited, start.elapsed());
        }
        let result = match result {
            // Says nothing about the origin: the breaker is not told (a probe is handed back).
            Ok(Err(AttemptError::Client(err))) if caused_by_client_body(&err) => {
                drop(permit);
                return Err(OriginError::ClientBody(err));
            }
            Err(_) if upload.is_some_and(|done| !done.get()) => {
                drop(permit);
                return Err(OriginError::UploadTimeout(self.config.timeout));
            }
            Ok(Err(AttemptError::NoEndpoints)) => {
                drop(permit);
                return Err(OriginError::NoEndpoints);
            }
            Err(elapsed) => {
                // The deadline ended an attempt: a timeout of the endpoint it was on.
                if let Some((endpoint, began)) = current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
                    self.endpoints.report(&endpoint, endpoints::Verdict::Failed, began.elapsed());
                    if let Some(left_out) = self.unreachable_log.due() {
                        tracing::warn!(origin = self.config.name, endpoint = %endpoint.authority, timeout = ?self.config.timeout, left_out, "origin request timed out");
                    }
                }
                Err(elapsed)
            }
            Ok(other) => Ok(other),
        };
        let success = matches!(&result, Ok(Ok((res, _))) if !is_failure_status(res.status()));
        let open = permit.record(success);
        self.metrics.breaker_open.set(if open { 1.0 } else { 0.0 });
        if self.breaker_logged.swap(open, std::sync::atomic::Ordering::Relaxed) != open {
            self.log_breaker(open);
        }
        match result {
            Err(_) => Err(OriginError::Timeout(self.config.timeout)),
            Ok(Err(AttemptError::Client(err))) if err.is_connect() => Err(OriginError::Connect(err)),
            Ok(Err(AttemptError::Client(err))) => Err(OriginError::Request(err)),
            Ok(Err(AttemptError::NoEndpoints)) => Err(OriginError::NoEndpoints),
            Ok(Ok((res, load))) => {
                let inflight = Inflight::new(&self.metrics, slot, load);
                Ok(res.map(|body| OriginBody::new(body, inflight, self.config.timeout)))
            }
        }
    }

    /// A change of the breaker's state, at most once per [`ORIGIN_LOG_PERIOD`] (a flapping
    /// breaker says how many changes it left out).
    fn log_breaker(&self, open: bool) {
        let Some(left_out) = self.breaker_log.due() else { return };
        if open {
            tracing::warn!(origin = self.config.name, left_out, "origin breaker open: its requests fail at once (stale copies or fallbacks serve)");
        } else {
            tracing::info!(origin = self.config.name, left_out, "origin breaker closed");
        }
    }

    /// Sends `req` to an endpoint, and for a GET or HEAD whose attempt never got an answer
    /// (see [`retry::never_answered`]) tries again on another endpoint, up to `retries`
    /// times while the origin's retry budget allows; the caller's deadline covers every
    /// attempt. `current` names the endpoint of the attempt in progress.
    async fn attempts(&self, mut req: Request<OutgoingBody>, current: &Current) -> Result<(Response<Incoming>, endpoints::Load), AttemptError> {
        let again = (self.config.retries > 0 && matches!(*req.method(), http::Method::GET | http::Method::HEAD))
            .then(|| (req.method().clone(), req.uri().clone(), req.version(), req.headers().clone()));
        self.retries.request();
        let mut left = self.config.retries;
        let mut tried: Vec<Arc<endpoints::Endpoint>> = Vec::new();
        loop {
            let Some(load) = self.endpoints.pick(&tried) else { return Err(AttemptError::NoEndpoints) };
            let endpoint = load.endpoint().clone();
            if !matches!(self.config.endpoints, EndpointSource::Url) {
                *req.uri_mut() = addressed(req.uri(), &endpoint.authority);
            }
            // One response in four looks at its connection's age (a channel and an
            // allocation each): an old busy connection is retired a few responses late.
            let connection = (fastrand::u8(..) < 64).then(|| hyper_util::client::legacy::connect::capture_connection(&mut req));
            let began = Instant::now();
            *current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((endpoint.clone(), began));
            let result = self.client.request(req).await;
            current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            if let Some(connection) = &connection {
                aged::retire_if_old(connection);
            }
            // More open than the origin may use at once plus as many idle, over all its
            // endpoints: those idle longest go (idle connections are bounded per origin,
            // not per endpoint).
            let bound = 2 * self.config.max_concurrency;
            if self.open_connections.count() > bound {
                self.open_connections.close_idle(bound);
            }
            let verdict = match &result {
                Ok(res) if is_gateway_failure(res.status()) => endpoints::Verdict::Failed,
                Ok(_) => endpoints::Verdict::Answered,
                Err(err) if caused_by_client_body(err) => endpoints::Verdict::Neither,
                Err(_) => endpoints::Verdict::Failed,
            };
            // A fast failure looks cheap to the balancer, so a dead endpoint gets the
            // attempts that eject it soon (and each one that fails is retried elsewhere).
            self.endpoints.report(&endpoint, verdict, began.elapsed());
            if let Err(err) = &result
                && verdict == endpoints::Verdict::Failed
                && let Some(left_out) = self.unreachable_log.due()
            {
                let cause = std::iter::successors(std::error::Error::source(err), |e| e.source()).map(ToString::to_string).collect::<Vec<_>>().join(": ");
                tracing::warn!(origin = self.config.name, endpoint = %endpoint.authority, error = %err, cause, left_out, "origin request got no answer");
            }
            let Some((method, uri, version, headers)) = &again else { return result.map(|res| (res, load)).map_err(AttemptError::Client) };
            match result {
                Err(err) if left > 0 && retry::never_answered(&err) && self.retries.try_retry() => {
                    tracing::debug!(origin = self.config.name, endpoint = %endpoint.authority, error = %err, "origin attempt got no answer; retrying");
                    self.metrics.retries.increment(1);
                    left -= 1;
                    drop(load);
                    tried.push(endpoint);
                    // A GET or HEAD sent on carries no body.
                    req = Request::new(empty_body());
                    *req.method_mut() = method.clone();
                    *req.uri_mut() = uri.clone();
                    *req.version_mut() = *version;
                    *req.headers_mut() = headers.clone();
                }
                other => return other.map(|res| (res, load)).map_err(AttemptError::Client),
            }
        }
    }

    /// One active health check of `endpoint`: GET `path` with the origin's `Host`; a
    /// 2xx or 3xx within `timeout` passes.
    async fn health_check(&self, endpoint: &Authority, config: &HealthCheck) -> bool {
        let Some(scheme) = self.config.url.scheme() else { return false };
        let Ok(uri) = Uri::builder().scheme(scheme.clone()).authority(endpoint.clone()).path_and_query(config.path.clone()).build() else { return false };
        let host = match &self.config.host_header {
            Some(host) => host.clone(),
            None => match self.config.url.authority().map(|a| http::HeaderValue::from_str(a.as_str())) {
                Some(Ok(host)) => host,
                _ => return false,
            },
        };
        let mut req = Request::new(empty_body());
        *req.uri_mut() = uri;
        req.headers_mut().insert(http::header::HOST, host);
        req.headers_mut().insert(http::header::USER_AGENT, http::HeaderValue::from_static("bulwark-health-check"));
        let check = async {
            let res = self.client.request(req).await.ok()?;
            let passed = res.status().is_success() || res.status().is_redirection();
            // Read to its end, so the connection can be used again.
            use http_body_util::BodyExt;
            let _ = http_body_util::Limited::new(res.into_body(), 64 << 10).collect().await;
            Some(passed)
        };
        tokio::time::timeout(config.timeout, check).await.ok().flatten().unwrap_or(false)
    }
}

/// The TLS settings of an origin: WebPKI roots plus `ca_file`'s, and the client
/// certificate if it has one (the files were checked when the configuration was read).
pub(crate) fn tls_config(files: &crate::config::OriginTls) -> Result<rustls::ClientConfig, rustls::Error> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let bad = |what: &str, err: &dyn std::fmt::Display| rustls::Error::General(format!("{what}: {err}"));
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(ca) = &files.ca {
        for cert in CertificateDer::pem_slice_iter(&ca.pem) {
            let cert = cert.map_err(|e| bad(&ca.path.display().to_string(), &e))?;
            roots.add(cert)?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    match &files.client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(&cert.pem).collect::<Result<Vec<_>, _>>().map_err(|e| bad(&cert.path.display().to_string(), &e))?;
            let key = PrivateKeyDer::from_pem_slice(&key.pem).map_err(|e| bad(&key.path.display().to_string(), &e))?;
            builder.with_client_auth_cert(chain, key)
        }
    }
}

/// `uri` sent to `authority` instead of the host it names.
fn addressed(uri: &Uri, authority: &Authority) -> Uri {
    let mut parts = uri.clone().into_parts();
    parts.authority = Some(authority.clone());
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// Marks a request in flight: holds its bulkhead slot, the in-flight gauge and its
/// endpoint's load.
struct Inflight {
    gauge: metrics::Gauge,
    _slot: Slot,
    _load: endpoints::Load,
}

impl Inflight {
    fn new(metrics: &OriginMetrics, slot: Slot, load: endpoints::Load) -> Inflight {
        metrics.inflight.increment(1.0);
        Inflight { gauge: metrics.inflight.clone(), _slot: slot, _load: load }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// An origin response body that keeps its request's slot until it ends, and fails when
/// the origin sends nothing for `idle_timeout` (so a stalled origin cannot hold a client
/// and a slot forever).
pub struct OriginBody {
    inner: Incoming,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    _inflight: Inflight,
}

impl OriginBody {
    fn new(inner: Incoming, inflight: Inflight, idle_timeout: Duration) -> OriginBody {
        OriginBody { inner, idle_timeout, idle: Box::pin(tokio::time::sleep(idle_timeout)), _inflight: inflight }
    }
}

/// The origin stopped sending in the middle of a body.
#[derive(Debug, thiserror::Error)]
pub enum OriginBodyError {
    #[error("origin body stalled for {0:?}")]
    Idle(Duration),
    #[error("origin body failed")]
    Hyper(#[from] hyper::Error),
    /// The client took nothing of it for `send_timeout`: abandoned.
    #[error("the client took nothing for {0:?}: response abandoned")]
    NotTaken(Duration),
    /// The task reading it ended without reaching its end.
    #[error("origin body interrupted")]
    Interrupted,
    /// The client fell more than `stream_window` bytes behind the fastest reader of a
    /// shared fill: cut.
    #[error("the client fell more than {0} bytes behind the others: response cut")]
    Behind(usize),
}

impl OriginBodyError {
    /// Whether the client's own slowness ended the body, not the origin.
    pub fn is_clients(&self) -> bool {
        matches!(self, OriginBodyError::NotTaken(_) | OriginBodyError::Behind(_))
    }
}

impl Body for OriginBody {
    type Data = Bytes;
    type Error = OriginBodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, OriginBodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle_timeout;
                this.idle.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(OriginBodyError::from)))
            }
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(OriginBodyError::Idle(this.idle_timeout)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
