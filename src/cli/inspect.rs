//! `bulwark inspect URL --admin URL...`: what each replica's L1 and the pool's Redis
//! hold for one URL (`GET /admin/cache` of each), side by side.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// One replica's answer: its JSON, or why there is none.
struct Answer {
    admin: String,
    result: Result<Value, String>,
}

pub fn run(url: String, admins: Vec<String>, headers: Vec<String>, json: bool, token: Option<String>) -> ExitCode {
    if !url.contains("://") {
        eprintln!("bulwark inspect: {url} is not an absolute URL (http://shop.example/products/1)");
        return ExitCode::FAILURE;
    }
    let token = token.or_else(|| std::env::var(crate::admin::ADMIN_TOKEN_ENV).ok()).map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
    super::block_on(async move {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let mut answers = Vec::with_capacity(admins.len());
        for admin in &admins {
            let result = ask(&client, admin, &url, &headers, token.as_deref()).await;
            answers.push(Answer { admin: admin.trim_end_matches('/').to_owned(), result });
        }
        if json {
            let replicas: Vec<Value> = answers
                .iter()
                .map(|a| match &a.result {
                    Ok(answer) => json!({"admin": a.admin, "answer": answer}),
                    Err(err) => json!({"admin": a.admin, "error": err}),
                })
                .collect();
            println!("{}", json!({"url": url, "replicas": replicas}));
        } else {
            print!("{}", render(&url, &answers));
        }
        if answers.iter().all(|a| a.result.is_ok()) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    })
}

/// `GET /admin/cache` of one replica; an answer other than 200 is an error naming it.
async fn ask(client: &HttpClient, admin: &str, url: &str, headers: &[String], token: Option<&str>) -> Result<Value, String> {
    let mut target = format!("{}/admin/cache?url={}", admin.trim_end_matches('/'), encode(url));
    for header in headers {
        let _ = write!(target, "&header={}", encode(header));
    }
    let mut request = http::Request::get(&target);
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Empty::new()).map_err(|e| format!("{admin}: {e}"))?;
    let res = tokio::time::timeout(Duration::from_secs(3), client.request(request))
        .await
        .map_err(|_| format!("{admin}: no answer within 3s"))?
        .map_err(|e| format!("{admin}: {e}"))?;
    let status = res.status();
    let body = res.into_body().collect().await.map_err(|e| format!("{admin}: {e}"))?.to_bytes();
    let answer: Option<Value> = serde_json::from_slice(&body).ok();
    match answer {
        Some(answer) if status.is_success() => Ok(answer),
        Some(answer) if answer["error"].is_string() => Err(format!("{admin}: HTTP {status}: {}", answer["error"].as_str().unwrap_or_default())),
        _ => Err(format!("{admin}: HTTP {status}: {}", String::from_utf8_lossy(&body).trim())),
    }
}

/// Percent-encodes a query parameter's value.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The replicas side by side: one column each, a row per encoding group and tier.
fn render(url: &str, answers: &[Answer]) -> String {
    let mut out = String::new();
    let first = answers.iter().find_map(|a| a.result.as_ref().ok());
    let _ = writeln!(out, "{url}");
    if let Some(first) = first {
        let _ = writeln!(out, "route {}, pool {}, mode {}", text(&first["route"]), text(&first["pool"]), text(&first["mode"]));
    }
    let mut rows: Vec<(String, Vec<String>)> = vec![("".into(), answers.iter().map(|a| a.admin.clone()).collect())];
    rows.push(("would be".into(), answers.iter().map(|a| a.result.as_ref().map_or_else(|e| format!("error: {e}"), |v| text(&v["would_be"]))).collect()));
    let groups: Vec<String> = first.and_then(|f| f["groups"].as_array()).map_or_else(Vec::new, |g| g.iter().map(|g| text(&g["accept_encoding"])).collect());
    for group in &groups {
        let of =
            |answer: &Value| answer["groups"].as_array().and_then(|g| g.iter().find(|g| text(&g["accept_encoding"]) == *group)).cloned().unwrap_or(Value::Null);
        if let Some(variant) = first.map(of).filter(|g| !g["variant"].is_null()) {
            rows.push((format!("{group} variant"), answers.iter().map(|_| text(&variant["variant"]["key"]).replace('\n', " ")).collect()));
        }
        for tier in ["l1", "l2"] {
            let cells = answers.iter().map(|a| a.result.as_ref().map_or_else(|_| "-".into(), |v| cell(&of(v)[tier]))).collect();
            rows.push((format!("{group} {}", tier.to_uppercase()), cells));
        }
    }
    let label_width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..answers.len()).map(|i| rows.iter().map(|(_, c)| c.get(i).map_or(0, |c| c.chars().count())).max().unwrap_or(0)).collect();
    for (label, cells) in rows {
        let mut line = format!("{label:<label_width$}");
        for (cell, width) in cells.iter().zip(&widths) {
            let _ = write!(line, "  {cell:<width$}");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// One tier's copy in a few words: `fresh 52s, age 8s, 2048 B`, `stale, swr 20s, sie 9m`.
fn cell(tier: &Value) -> String {
    let filling = if tier["filling"] == true { ", filling" } else { "" };
    match tier["present"] {
        Value::Bool(true) => {}
        Value::Bool(false) => return format!("absent{filling}"),
        _ => return format!("error: {}", text(&tier["error"])),
    }
    let secs = |name: &str| tier[name].as_u64().unwrap_or(0);
    let mut out = if secs("fresh_for_s") > 0 {
        format!("fresh {}s", secs("fresh_for_s"))
    } else {
        format!("stale, swr {}s, sie {}s", secs("swr_left_s"), secs("sie_left_s"))
    };
    let _ = write!(out, ", age {}s, {} B", secs("age_s"), secs("size_bytes"));
    if tier["soft_purged"] == true {
        out.push_str(", soft-purged");
    }
    if tier["confirmed"] == false {
        out.push_str(", unconfirmed");
    }
    if let Some(tags) = tier["tags"].as_array().filter(|t| !t.is_empty()) {
        let _ = write!(out, ", tags {}", tags.iter().map(text).collect::<Vec<_>>().join(" "));
    }
    out.push_str(filling);
    out
}
