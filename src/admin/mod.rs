//! The admin listener: `/metrics`, `/healthz`, `/readyz` and `/admin/*`.
//!
//! Health endpoints never touch Redis or origins: a Redis outage must not pull replicas
//! out of the load balancer. When `BULWARK_ADMIN_TOKEN` is set, `/admin/*` needs it as a
//! bearer token; metrics and health stay open for probes and scrapers.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::connections::Connections;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::client_timers::{Limits, Requests, TimedIo, Tracked};
use crate::config::RouteMode;
use crate::proxy::Proxy;

pub const ADMIN_TOKEN_ENV: &str = "BULWARK_ADMIN_TOKEN";

type AdminResponse = Response<Full<Bytes>>;

mod purge;
mod stats;
use purge::PurgeJobs;
use stats::Stats;

/// The admin token from the environment, if set and not blank.
pub fn token() -> Option<Arc<str>> {
    std::env::var(ADMIN_TOKEN_ENV).ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).map(Into::into)
}

/// Serves the admin endpoints until `stop` completes.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, stop: impl Future<Output = ()>) {
    let token = token();
    let server = proxy.runtime().config.server.clone();
    let limits = Limits::of(&server);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own HTTP/1.1 timer bounds idle keep-alive, as on the proxy listener.
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(server.keepalive_idle);
    let connections = Connections::default();
    // Purges run with `"async": true`, for `GET /admin/purge/{id}`.
    let jobs = Arc::new(PurgeJobs::default());
    // The dashboard's 15 minutes, sampled while the admin listener serves.
    let stats = Arc::new(Stats::default());
    let sampler = tokio::spawn(stats::sample_every_second(stats.clone(), proxy.clone()));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                };
                let (proxy, token, jobs, stats) = (proxy.clone(), token.clone(), jobs.clone(), stats.clone());
                let requests = Arc::new(Requests::default());
                let requests_of_conn = requests.clone();
                let io = TimedIo::new(stream, limits, requests.clone());
                let service = service_fn(move |req| {
                    let (proxy, token, jobs, stats, active) = (proxy.clone(), token.clone(), jobs.clone(), stats.clone(), requests.start());
                    async move { Ok::<_, Infallible>(handle(&proxy, &jobs, &stats, token.as_deref(), req).await.map(|body| Tracked::new(body, active))) }
                });
                connections.serve(builder.serve_connection(TokioIo::new(io), service).into_owned(), requests_of_conn, limits.keepalive_idle);
            }
            () = &mut stop => break,
        }
    }
    drop(listener);
    sampler.abort();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), connections.shutdown()).await;
}

async fn handle(proxy: &Proxy, jobs: &PurgeJobs, stats: &Stats, token: Option<&str>, req: Request<Incoming>) -> AdminResponse {
    let path = req.uri().path();
    if path.starts_with("/admin/")
        && let Some(token) = token
        && !bearer_matches(req.headers().get(AUTHORIZATION), token)
    {
        return text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
    }
    if let Some(route) = path.strip_prefix("/admin/routes/").and_then(|rest| rest.strip_suffix("/mode")) {
        let route = route.to_owned();
        return match req.method() {
            &Method::PUT => set_mode(proxy, &route, req).await,
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        };
    }
    match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/admin/reload") => reload(proxy).await,
        (&Method::GET, "/readyz") if proxy.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        (&Method::GET, "/readyz") => text(StatusCode::OK, "ready\n"),
        (&Method::GET, "/metrics") => metrics(proxy).await,
        (&Method::GET, "/stats.json") => stats_json(stats, req.uri().query().unwrap_or("")),
        (&Method::GET, "/dashboard") => dashboard(),
        (&Method::GET, "/admin/routes") => routes(proxy),
        (&Method::GET, "/admin/origins") => origins(proxy),
        (&Method::GET, "/admin/cache") => cache(proxy, req.uri().query().unwrap_or("")).await,
        (&Method::POST, "/admin/purge") => purge::purge(proxy, jobs, req).await,
        (&Method::GET, _) if path.starts_with("/admin/purge/") => purge::progress(jobs, &path["/admin/purge/".len()..]),
        (
            _,
            "/healthz" | "/readyz" | "/metrics" | "/stats.json" | "/dashboard" | "/admin/routes" | "/admin/origins" | "/admin/cache" | "/admin/purge"
            | "/admin/reload",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn metrics(proxy: &Proxy) -> AdminResponse {
    for pool in &proxy.runtime().pools {
        pool.update_gauges().await;
    }
    let mut res = Response::new(Full::new(Bytes::from(proxy.live.registry.render())));
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    res
}

fn routes(proxy: &Proxy) -> AdminResponse {
    let runtime = proxy.runtime();
    let routes: Vec<serde_json::Value> = runtime
        .routes
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.config.name,
                "path_prefix": r.config.path_prefix,
                "pool": r.pool.as_ref().map_or("", |p| p.config.name.as_str()),
                "origin": r.origin.config.name,
                "priority": r.config.priority.as_str(),
                "mode": r.mode().as_str(),
                "has_fallback": r.config.fallback.is_some(),
            })
        })
        .collect();
    let mut res = Response::new(Full::new(Bytes::from(serde_json::json!({ "routes": routes }).to_string())));
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// `GET /stats.json[?window=900s]`: the last `window` of the dashboard's series.
fn stats_json(stats: &Stats, query: &str) -> AdminResponse {
    let mut window = Duration::from_secs(stats::KEPT as u64);
    for (name, value) in query_pairs(query) {
        if name != "window" {
            return json_error(StatusCode::BAD_REQUEST, format!("unknown parameter {name:?}: window is known"));
        }
        window = match crate::config::units::parse_duration(value) {
            Ok(w) if w >= stats::STEP && w.as_secs() <= stats::KEPT as u64 => w,
            Ok(_) => return json_error(StatusCode::BAD_REQUEST, format!("window={value}: from 1s to {}s", stats::KEPT)),
            Err(err) => return json_error(StatusCode::BAD_REQUEST, format!("window={value}: {err}")),
        };
    }
    json(StatusCode::OK, stats.json(window))
}

/// `GET /dashboard`: one self-contained page (no external script, style, font or image:
/// pods often have no internet) drawing `/stats.json`.
fn dashboard() -> AdminResponse {
    let mut res = Response::new(Full::new(Bytes::from_static(include_bytes!("dashboard.html"))));
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    // Nothing but this admin listener may be loaded, whatever the page is made to say.
    res.headers_mut().insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:"),
    );
    res
}

/// `GET /admin/cache?url=ABSOLUTE_URL[&header=Name:Value...]`: what this replica and
/// the pool's Redis hold for the URL, changing nothing.
async fn cache(proxy: &Proxy, query: &str) -> AdminResponse {
    let (mut url, mut headers) = (None, http::HeaderMap::new());
    for (name, value) in query_pairs(query) {
        let (Some(name), Some(value)) = (percent_decode(name), percent_decode(value)) else {
            return json_error(StatusCode::BAD_REQUEST, "malformed percent-encoding in the query".into());
        };
        match name.as_str() {
            "url" => url = Some(value),
            "header" => {
                let parsed = value
                    .split_once(':')
                    .and_then(|(n, v)| Some((http::HeaderName::from_bytes(n.trim().as_bytes()).ok()?, HeaderValue::from_str(v.trim()).ok()?)));
                let Some((name, value)) = parsed else {
                    return json_error(StatusCode::BAD_REQUEST, format!("header={value:?} is not Name:Value"));
                };
                headers.append(name, value);
            }
            _ => return json_error(StatusCode::BAD_REQUEST, format!("unknown parameter {name:?}: url and header are known")),
        }
    }
    let Some(url) = url else {
        return json_error(StatusCode::BAD_REQUEST, "url=ABSOLUTE_URL is missing".into());
    };
    match proxy.inspect(&url, headers).await {
        Ok(answer) => json(StatusCode::OK, answer),
        Err(err) => json(err.status, serde_json::json!({"url": url, "error": err.message})),
    }
}

/// The `name=value` pairs of a query, as written (a bare `name` has an empty value).
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// Decodes a `application/x-www-form-urlencoded` name or value (`+` is a space); `None`
/// for a malformed escape or text that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let (bytes, mut out) = (text.as_bytes(), Vec::with_capacity(text.len()));
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `GET /admin/origins`: every origin's endpoints and their states.
fn origins(proxy: &Proxy) -> AdminResponse {
    let runtime = proxy.runtime();
    let origins: Vec<serde_json::Value> = runtime
        .origins
        .iter()
        .map(|o| {
            let endpoints: Vec<serde_json::Value> = o
                .endpoints
                .report_all()
                .into_iter()
                .map(|e| {
                    serde_json::json!({
                        "address": e.address,
                        "state": e.state.label(),
                        "inflight": e.inflight,
                        "failure_rate_1m": e.failure_rate_1m,
                        "weight": e.weight,
                    })
                })
                .collect();
            serde_json::json!({
                "name": o.config.name,
                "max_concurrency": o.config.max_concurrency,
                "fleet_share": o.fleet_share(),
                "endpoints": endpoints,
            })
        })
        .collect();
    let mut res = Response::new(Full::new(Bytes::from(serde_json::json!({ "origins": origins }).to_string())));
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeRequest {
    mode: String,
}

/// `PUT /admin/routes/{name}/mode` with `{"mode": "normal" | "cache-only" | "fallback" | "off"}`.
async fn set_mode(proxy: &Proxy, route: &str, req: Request<Incoming>) -> AdminResponse {
    use http_body_util::BodyExt;
    let body = match http_body_util::Limited::new(req.into_body(), 4096).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return json(StatusCode::PAYLOAD_TOO_LARGE, serde_json::json!({ "error": "request body over 4 KiB" })),
    };
    let mode = match serde_json::from_slice::<ModeRequest>(&body).ok().and_then(|r| RouteMode::parse(&r.mode)) {
        Some(mode) => mode,
        None => {
            return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "expected {\"mode\": \"normal\" | \"cache-only\" | \"fallback\" | \"off\"}" }));
        }
    };
    let runtime = proxy.runtime();
    let Some(target) = runtime.routes.iter().find(|r| r.config.name == route) else {
        return json(StatusCode::NOT_FOUND, serde_json::json!({ "error": format!("no route named {route:?}") }));
    };
    if let Err(err) = target.set_mode(mode) {
        return json(StatusCode::CONFLICT, serde_json::json!({ "error": err.to_string(), "route": route }));
    }
    tracing::info!(route, mode = mode.as_str(), "route mode switched through the admin API");
    let Some(control) = proxy.control.get() else {
        return json(StatusCode::OK, serde_json::json!({ "route": route, "mode": mode.as_str(), "scope": "this replica" }));
    };
    match control.set_mode(route, mode).await {
        Ok(acks) => {
            let status = if acks.missing.is_empty() && acks.unknown.is_none() { StatusCode::OK } else { StatusCode::ACCEPTED };
            let mut answer = serde_json::json!({ "route": route, "mode": mode.as_str(), "confirmed": acks.confirmed, "missing": acks.missing });
            if let Some(why) = acks.unknown {
                // Stored and published to every replica; who applied it is not known.
                answer["error"] = format!("acknowledgements could not be read: {why}").into();
            }
            json(status, answer)
        }
        // Applied here; whether any other replica has it is unknown.
        Err(err) => json(
            StatusCode::ACCEPTED,
            serde_json::json!({ "route": route, "mode": mode.as_str(), "scope": "this replica", "confirmed": [control.replica()], "error": err.to_string() }),
        ),
    }
}

/// `POST /admin/reload`: the same as SIGHUP.
async fn reload(proxy: &Proxy) -> AdminResponse {
    match proxy.reload().await {
        Ok(restart) => json(StatusCode::OK, serde_json::json!({ "reloaded": true, "restart_required": restart })),
        Err(crate::runtime::ReloadError::NoFile) => {
            json(StatusCode::CONFLICT, serde_json::json!({ "reloaded": false, "error": "this server was not started from a config file" }))
        }
        Err(err) => json(StatusCode::BAD_REQUEST, serde_json::json!({ "reloaded": false, "error": err.to_string() })),
    }
}

pub(crate) fn json(status: StatusCode, value: serde_json::Value) -> AdminResponse {
    let mut res = Response::new(Full::new(Bytes::from(value.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// Compares the bearer token in constant time (for tokens of the same length).
fn bearer_matches(header: Option<&HeaderValue>, token: &str) -> bool {
    let Some(value) = header.map(HeaderValue::as_bytes) else { return false };
    let Some(given) = value.get(..7).filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer ")).map(|_| value[7..].trim_ascii()) else {
        return false;
    };
    let expected = token.as_bytes();
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn json_error(status: StatusCode, message: String) -> AdminResponse {
    json(status, serde_json::json!({ "error": message }))
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}
