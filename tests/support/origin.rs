//! An in-process origin on a free port that counts what it receives and answers as a
//! test tells it to.
//!
//! Its answers carry no `Date` unless a test gives one: bulwark dates them on arrival by
//! its own clock (RFC 9110 section 6.6.1), so a test that moves that clock forward sees
//! ages by that clock alone, and a one-second `Date` cannot make a new answer look old.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the origin answers.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Duration,
    /// Send the body in this many chunks with this pause before each after the first.
    pub chunks: Option<(usize, Duration)>,
}

impl Reply {
    pub fn ok(body: impl Into<Bytes>) -> Reply {
        Reply { status: 200, headers: vec![("cache-control".into(), "max-age=60".into())], body: body.into(), delay: Duration::ZERO, chunks: None }
    }

    /// Streams the body (chunked, no Content-Length) in `n` chunks, `pause` apart.
    pub fn chunked(mut self, n: usize, pause: Duration) -> Reply {
        self.chunks = Some((n.max(1), pause));
        self
    }

    pub fn status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn without_header(mut self, name: &str) -> Reply {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Behaviour = Arc<dyn Fn(&http::request::Parts) -> Reply + Send + Sync>;

/// What the origin saw.
#[derive(Default)]
pub struct OriginLog {
    pub total: AtomicUsize,
    pub inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    /// Connections open now (accepted and not yet closed).
    pub open_connections: AtomicUsize,
    pub per_path: Mutex<HashMap<String, usize>>,
    pub last_request: Mutex<Option<(http::request::Parts, Bytes)>>,
}

/// An in-process origin on a free port. By default it answers 200 with
/// `Cache-Control: max-age=60` and the body `body of <path and query>`.
pub struct Origin {
    pub addr: SocketAddr,
    pub log: Arc<OriginLog>,
    behaviour: Arc<Mutex<Behaviour>>,
    task: tokio::task::JoinHandle<()>,
    /// Open connections, so that stopping the origin closes them too.
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Origin {
    pub async fn start() -> Origin {
        Origin::start_on(TcpListener::bind("127.0.0.1:0").await.expect("bind origin")).await
    }

    pub async fn start_on(listener: TcpListener) -> Origin {
        let addr = listener.local_addr().expect("origin addr");
        let log = Arc::new(OriginLog::default());
        let behaviour: Arc<Mutex<Behaviour>> = Arc::new(Mutex::new(Arc::new(|parts: &http::request::Parts| {
            let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            Reply::ok(format!("body of {target}"))
        })));
        let (log2, behaviour2) = (log.clone(), behaviour.clone());
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let conns2 = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (log, behaviour) = (log2.clone(), behaviour2.clone());
                let conn = tokio::spawn(async move {
                    log.open_connections.fetch_add(1, Ordering::SeqCst);
                    let open = log.clone();
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (log, behaviour) = (log.clone(), behaviour.clone());
                        async move { Ok::<_, Infallible>(answer(req, &log, &behaviour).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().auto_date_header(false).serve_connection(TokioIo::new(stream), service).await;
                    open.open_connections.fetch_sub(1, Ordering::SeqCst);
                });
                conns2.lock().expect("connections lock").push(conn.abort_handle());
            }
        });
        Origin { addr, log, behaviour, task, connections }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, behaviour: impl Fn(&http::request::Parts) -> Reply + Send + Sync + 'static) {
        *self.behaviour.lock().expect("behaviour lock") = Arc::new(behaviour);
    }

    /// Connections accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.connections.lock().expect("connections lock").len()
    }

    pub fn total(&self) -> usize {
        self.log.total.load(Ordering::SeqCst)
    }

    pub fn count(&self, path_and_query: &str) -> usize {
        self.log.per_path.lock().expect("log lock").get(path_and_query).copied().unwrap_or(0)
    }

    pub fn last_request(&self) -> (http::request::Parts, Bytes) {
        self.log.last_request.lock().expect("log lock").clone().expect("origin saw a request")
    }

    /// Shuts the origin down: no listener, every open connection closed.
    pub fn stop(&self) {
        self.task.abort();
        for conn in self.connections.lock().expect("connections lock").drain(..) {
            conn.abort();
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A body sent in chunks with pauses between them.
struct SlowBody {
    chunks: std::collections::VecDeque<Bytes>,
    pause: Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for SlowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        use std::future::Future;
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            self.sleep = None;
        }
        let pause = self.pause;
        match self.chunks.pop_front() {
            Some(chunk) => {
                if !self.chunks.is_empty() {
                    self.sleep = Some(Box::pin(tokio::time::sleep(pause)));
                }
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
            }
            None => std::task::Poll::Ready(None),
        }
    }
}

type OriginResponseBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(req: Request<Incoming>, log: &OriginLog, behaviour: &Mutex<Behaviour>) -> Response<OriginResponseBody> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    log.total.fetch_add(1, Ordering::SeqCst);
    *log.per_path.lock().expect("log lock").entry(target).or_default() += 1;
    let now = log.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    log.max_inflight.fetch_max(now, Ordering::SeqCst);
    let behaviour = behaviour.lock().expect("behaviour lock").clone();
    let reply = behaviour(&parts);
    *log.last_request.lock().expect("log lock") = Some((parts, body));
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    log.inflight.fetch_sub(1, Ordering::SeqCst);
    let body = match reply.chunks {
        None => Full::new(reply.body).boxed(),
        Some((n, pause)) => {
            let size = reply.body.len().div_ceil(n).max(1);
            let chunks = reply.body.chunks(size).map(Bytes::copy_from_slice).collect();
            SlowBody { chunks, pause, sleep: None }.boxed()
        }
    };
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::from_u16(reply.status).expect("status");
    for (name, value) in reply.headers {
        res.headers_mut().append(http::HeaderName::from_bytes(name.as_bytes()).expect("name"), value.parse().expect("value"));
    }
    res
}
