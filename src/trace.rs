//! Request traces, off unless `[tracing] otlp_endpoint` is set: one server span per
//! request with child spans for its phases (L1, L2, queue wait, origin, store), sampled
//! by trace id and exported in batches over OTLP/HTTP by the opentelemetry SDK, through a
//! hyper client like the origins' (no second HTTP stack).
//!
//! A `traceparent` is continued only from `trusted_proxies`: anyone else's starts a new
//! trace, so a client cannot attach itself to another trace; its sampled flag never
//! decides (the sampler looks at the trace id alone). The origin request carries the
//! context of its own span, so the origin's spans nest under it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider};

use crate::config::TracingConfig;

/// How long one export may take before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a collector's answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The exporter and tracer of one server instance.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("tracing needs a Tokio runtime to export from")]
    NoRuntime,
    #[error("cannot set up TLS for the OTLP exporter: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

impl Tracing {
    /// Sets up export to `config.otlp_endpoint`; must be called within a Tokio runtime,
    /// on which exports then run.
    pub fn new(config: &TracingConfig) -> Result<Arc<Tracing>, TracingError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| TracingError::NoRuntime)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::origin::tls_config(&crate::config::OriginTls::default())?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(OtlpClient { client, runtime })
            .with_endpoint(config.otlp_endpoint.to_string())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TracingError::Exporter(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            // The trace id alone decides, never a caller's sampled flag.
            .with_sampler(Sampler::TraceIdRatioBased(config.sample))
            .with_resource(opentelemetry_sdk::Resource::builder().with_service_name("bulwark").build())
            .build();
        let tracer = provider.tracer("bulwark");
        Ok(Arc::new(Tracing { provider, tracer, propagator: TraceContextPropagator::new() }))
    }

    /// The trace of one request: its server span, started now, under the caller's
    /// `traceparent` only when the caller is `trusted`.
    pub fn begin(self: &Arc<Self>, headers: &HeaderMap, trusted: bool, name: String) -> RequestTrace {
        let parent = if trusted { self.propagator.extract(&HeaderExtractor(headers)) } else { Context::new() };
        let span = self.tracer.span_builder(name).with_kind(SpanKind::Server).start_with_context(&self.tracer, &parent);
        RequestTrace { cx: parent.with_span(span), tracing: self.clone() }
    }

    /// Sends what is batched and stops the exporter (at shutdown).
    pub fn shutdown(&self) {
        if let Err(err) = self.provider.shutdown_with_timeout(Duration::from_secs(2)) {
            tracing::debug!(error = %err, "trace exporter shutdown");
        }
    }
}

/// Runs `work`, as a phase of `trace` when there is one.
pub async fn timed<T>(trace: Option<&RequestTrace>, name: &'static str, work: impl Future<Output = T>) -> T {
    match trace {
        Some(trace) => trace.time(name, work).await,
        None => work.await,
    }
}

/// One request's trace: its server span and the tracer its phases are recorded with.
pub struct RequestTrace {
    cx: Context,
    tracing: Arc<Tracing>,
}

impl std::fmt::Debug for RequestTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTrace").field("span", self.cx.span().span_context()).finish()
    }
}

impl RequestTrace {
    /// Whether this request's spans are exported.
    pub fn sampled(&self) -> bool {
        self.cx.span().span_context().is_sampled()
    }

    /// Records a phase that ran from `start` to `end` as a child span.
    pub fn phase(&self, name: &'static str, start: SystemTime, end: SystemTime, attributes: Vec<KeyValue>) {
        if !self.sampled() {
            return;
        }
        let tracer = &self.tracing.tracer;
        let mut span = tracer.span_builder(name).with_start_time(start).with_attributes(attributes).start_with_context(tracer, &self.cx);
        span.end_with_timestamp(end);
    }

    /// Times `work` as a child span named `name`.
    pub async fn time<T>(&self, name: &'static str, work: impl Future<Output = T>) -> T {
        let start = SystemTime::now();
        let out = work.await;
        self.phase(name, start, SystemTime::now(), Vec::new());
        out
    }

    /// Starts the span of an origin request (a client span) and writes its
    /// `traceparent` into `headers`, replacing any the client sent; end it with
    /// [`OriginSpan::end`].
    pub fn origin(&self, headers: &mut HeaderMap, origin: &str) -> OriginSpan {
        let tracer = &self.tracing.tracer;
        let span = tracer
            .span_builder("origin")
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("bulwark.origin", origin.to_owned())])
            .start_with_context(tracer, &self.cx);
        let cx = self.cx.with_span(span);
        headers.remove("traceparent");
        headers.remove("tracestate");
        self.tracing.propagator.inject_context(&cx, &mut HeaderInjector(headers));
        OriginSpan { cx }
    }

    /// Ends the server span with what the request got.
    pub fn finish(&self, attributes: Vec<KeyValue>, status: u16) {
        let span = self.cx.span();
        span.set_attributes(attributes);
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        if status >= 500 {
            span.set_status(Status::error(format!("HTTP {status}")));
        }
        span.end();
    }
}

/// The span of one origin request.
pub struct OriginSpan {
    cx: Context,
}

impl OriginSpan {
    /// Ends it with the origin's status (or `None` when it did not answer) and the time
    /// the request waited for a slot.
    pub fn end(self, status: Option<u16>, queue_wait: Duration) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("bulwark.queue_wait_ms", queue_wait.as_secs_f64() * 1000.0));
        match status {
            Some(status) => span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status))),
            None => span.set_status(Status::error("no answer from the origin")),
        }
        span.end();
    }
}

/// The exporter's HTTP client: requests run on the server's runtime (the SDK's batch
/// processor exports from its own thread), each bounded by [`EXPORT_TIMEOUT`].
#[derive(Clone)]
struct OtlpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for OtlpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpClient").finish_non_exhaustive()
    }
}

impl HttpClient for OtlpClient {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let answer = tokio::time::timeout(EXPORT_TIMEOUT, async {
                let res = client.request(request.map(Full::new)).await?;
                let (parts, body) = res.into_parts();
                let body = Limited::new(body, MAX_ANSWER_BYTES).collect().await?.to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            })
            .await;
            answer.unwrap_or_else(|_| Err("the collector did not answer in time".into()))
        });
        Box::pin(async move { task.await.map_err(|e| -> HttpError { Box::new(e) })? })
    }
}
