//! Request traces over OTLP/HTTP: spans arrive at a collector with the right parents and
//! phases; a `traceparent` is continued only from a trusted proxy and never decides the
//! sampling; a coalesced origin request belongs to the leader's trace alone.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::{Bulwark, Origin, Reply, TestConfig};

/// An OTLP/HTTP collector on a free port keeping every span it is sent.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind collector");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let paths: Arc<Mutex<Vec<String>>> = Arc::default();
        let (kept, seen) = (spans.clone(), paths.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (kept, seen) = (kept.clone(), seen.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (kept, seen) = (kept.clone(), seen.clone());
                        async move {
                            seen.lock().expect("paths").push(req.uri().path().to_owned());
                            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            if let Ok(export) = ExportTraceServiceRequest::decode(body) {
                                let mut kept = kept.lock().expect("spans");
                                for resource in export.resource_spans {
                                    for scope in resource.scope_spans {
                                        kept.extend(scope.spans);
                                    }
                                }
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Collector { url, spans, paths }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("spans").clone()
    }
}

fn config(origin: &Origin, collector: &Collector, sample: f64, trusted: bool) -> String {
    let mut config = TestConfig::new(&origin.url());
    if trusted {
        config = config.server("trusted_proxies", vec!["127.0.0.1/32"]);
    }
    format!("{}\n[tracing]\notlp_endpoint = \"{}\"\nsample = {sample}\n", config.to_toml(), collector.url)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_miss_exports_its_span_under_the_trusted_parent_with_its_phases() {
    let (origin, collector) = (Origin::start().await, Collector::start().await);
    let bulwark = Bulwark::start(&config(&origin, &collector, 1.0, true)).await;
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let got = bulwark.get_with("/products/1", &[("traceparent", &traceparent)]).await;
    assert_eq!(got.cache_status(), "bulwark; fwd=miss; stored");
    let sent = origin.last_request().0.headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned).expect("a traceparent to the origin");
    bulwark.stop().await.expect("stop");

    let spans = collector.spans();
    assert!(collector.paths.lock().expect("paths").iter().all(|p| p == "/v1/traces"), "the base URL gets the traces path");
    let server = spans.iter().find(|s| s.name == "GET all").unwrap_or_else(|| panic!("no server span in {spans:?}"));
    assert_eq!(hex(&server.trace_id), CLIENT_TRACE, "the trusted proxy's trace is continued");
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    let attribute = |span: &Span, key: &str| span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.clone()).and_then(|v| v.value);
    assert!(format!("{:?}", attribute(server, "bulwark.cache")).contains("miss"), "{server:?}");
    for phase in ["l1", "queue_wait", "origin", "store"] {
        let child =
            spans.iter().find(|s| s.name == phase).unwrap_or_else(|| panic!("no {phase} span in {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>()));
        assert_eq!(child.trace_id, server.trace_id, "{phase}");
        assert_eq!(child.parent_span_id, server.span_id, "{phase} is a child of the request's span");
        assert!(
            child.start_time_unix_nano >= server.start_time_unix_nano && child.end_time_unix_nano <= server.end_time_unix_nano,
            "{phase} within the request"
        );
    }
    // The origin continues the origin span, not the client's.
    let origin_span = spans.iter().find(|s| s.name == "origin").expect("origin span");
    assert_eq!(sent, format!("00-{CLIENT_TRACE}-{}-01", hex(&origin_span.span_id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_clients_sampled_traceparent_is_neither_continued_nor_obeyed() {
    let (origin, collector) = (Origin::start().await, Collector::start().await);
    // Nothing sampled by ratio: a client's sampled flag must not change that.
    let bulwark = Bulwark::start(&config(&origin, &collector, 0.0, false)).await;
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    for i in 0..20 {
        bulwark.get_with(&format!("/p/{i}"), &[("traceparent", &traceparent)]).await;
    }
    let sent = origin.last_request().0.headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned).expect("a traceparent to the origin");
    assert!(!sent.contains(CLIENT_TRACE), "an untrusted client's trace was continued: {sent}");
    assert!(sent.ends_with("-00"), "the origin is told the request is not sampled: {sent}");
    bulwark.stop().await.expect("stop");
    assert!(collector.spans().is_empty(), "a client's flag forced sampling: {:?}", collector.spans());

    // Everything sampled, still not the client's trace.
    let (origin, collector) = (Origin::start().await, Collector::start().await);
    let bulwark = Bulwark::start(&config(&origin, &collector, 1.0, false)).await;
    bulwark.get_with("/p/1", &[("traceparent", &traceparent)]).await;
    bulwark.stop().await.expect("stop");
    let spans = collector.spans();
    let server = spans.iter().find(|s| s.name == "GET all").expect("server span");
    assert_ne!(hex(&server.trace_id), CLIENT_TRACE);
    assert!(server.parent_span_id.is_empty(), "a new trace starts here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_origin_request_is_in_the_leaders_trace_only() {
    let (origin, collector) = (Origin::start().await, Collector::start().await);
    origin.set(|_| Reply::ok("slow").header("cache-control", "max-age=60").delay(Duration::from_millis(400)));
    let bulwark = Arc::new(Bulwark::start(&config(&origin, &collector, 1.0, true)).await);
    let requests: Vec<_> = (0..4)
        .map(|_| {
            let bulwark = bulwark.clone();
            tokio::spawn(async move { bulwark.get("/shared").await })
        })
        .collect();
    for request in requests {
        request.await.expect("request");
    }
    assert_eq!(origin.count("/shared"), 1);
    let bulwark = Arc::into_inner(bulwark).expect("the only handle");
    bulwark.stop().await.expect("stop");
    let spans = collector.spans();
    let servers: Vec<&Span> = spans.iter().filter(|s| s.name == "GET all").collect();
    assert_eq!(servers.len(), 4, "one trace per request");
    let origins: Vec<&Span> = spans.iter().filter(|s| s.name == "origin").collect();
    assert_eq!(origins.len(), 1, "one origin request, one origin span");
    let leader = servers.iter().find(|s| s.span_id == origins[0].parent_span_id).expect("the origin span's parent is a request's span");
    assert!(format!("{:?}", leader.attributes).contains("miss"));
}
