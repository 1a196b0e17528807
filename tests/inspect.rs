//! `GET /admin/cache`: what a replica's L1 and the pool's Redis hold for one URL, and
//! the outcome a request would get now, answered without changing any of it.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::redis_server::RedisServer;
use support::{Bulwark, Origin, Reply, TestConfig};

/// Encodes a query parameter's value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Inspects `path` of `bulwark`'s own address, with `headers` as `header=Name:Value`.
async fn inspect(bulwark: &Bulwark, path: &str, headers: &[&str]) -> (u16, Value) {
    let mut query = format!("url={}", encode(&bulwark.url(path)));
    for header in headers {
        query.push_str(&format!("&header={}", encode(header)));
    }
    let got = bulwark.admin(&format!("/admin/cache?{query}")).await;
    let body = serde_json::from_str(got.text()).unwrap_or_else(|_| panic!("a JSON answer: {}", got.text()));
    (got.status.as_u16(), body)
}

/// The group of requests without `Accept-Encoding`.
fn identity(answer: &Value) -> &Value {
    answer["groups"].as_array().and_then(|g| g.iter().find(|g| g["accept_encoding"] == "identity")).unwrap_or_else(|| panic!("no identity group in {answer}"))
}

#[tokio::test]
async fn inspecting_on_a_second_replica_shows_the_redis_copy_and_changes_nothing() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let config = TestConfig::new(&origin.url()).redis(&redis.url()).to_toml();
    let (one, two) = (Bulwark::start(&config).await, Bulwark::start(&config).await);
    // A copy stored before the event link is up is checked against Redis on its next
    // use (unconfirmed): stored after it, it is confirmed.
    one.wait_for_subscription().await;
    // Both replicas are asked with the same Host, so both have the same key.
    let host = [("host", "shop.example")];
    assert_eq!(one.get_with("/products/1", &host).await.cache_status(), "bulwark; fwd=miss; stored");
    support::eventually("the copy reaches Redis", Duration::from_secs(5), async || !redis.entries("bulwark:pdp:").is_empty()).await;

    let url = "http://shop.example/products/1";
    let ask = async |b: &Bulwark| {
        let got = b.admin(&format!("/admin/cache?url={}", encode(url))).await;
        (got.status.as_u16(), serde_json::from_str::<Value>(got.text()).expect("JSON"))
    };
    let (status, on_one) = ask(&one).await;
    assert_eq!(status, 200, "{on_one}");
    assert_eq!((on_one["route"].as_str(), on_one["pool"].as_str()), (Some("all"), Some("pdp")));
    let group = identity(&on_one);
    assert_eq!(group["l1"]["present"], true, "{on_one}");
    assert_eq!(group["l1"]["confirmed"], true);
    assert_eq!(group["l1"]["size_bytes"], "body of /products/1".len());
    assert!(group["l1"]["fresh_for_s"].as_u64().is_some_and(|s| (58..=60).contains(&s)), "{group}");
    assert_eq!(group["l2"]["present"], true, "{on_one}");
    assert_eq!(on_one["would_be"], "hit_l1");
    // Groups the origin could produce but nobody asked for are listed, absent.
    let others: Vec<&Value> = on_one["groups"].as_array().expect("groups").iter().filter(|g| g["accept_encoding"] != "identity").collect();
    assert!(!others.is_empty() && others.iter().all(|g| g["l1"]["present"] == false && g["l2"]["present"] == false), "{on_one}");

    let keys_before = redis.keys("*");
    let l1_before = two.metric("bulwark_l1_entries", &[("pool", "pdp")]).await;
    for _ in 0..3 {
        let (status, on_two) = ask(&two).await;
        assert_eq!(status, 200, "{on_two}");
        let group = identity(&on_two);
        assert_eq!((group["l1"]["present"].clone(), group["l2"]["present"].clone()), (Value::Bool(false), Value::Bool(true)), "{on_two}");
        assert_eq!(on_two["would_be"], "hit_l2");
    }
    assert_eq!(two.metric("bulwark_l1_entries", &[("pool", "pdp")]).await, l1_before, "inspection promoted the copy to L1");
    assert_eq!(redis.keys("*"), keys_before, "inspection wrote to Redis (a lease, say)");
    assert_eq!(two.metric("bulwark_requests_total", &[("route", "all")]).await, 0.0);
    assert_eq!(two.get_with("/products/1", &host).await.cache_status(), "bulwark; hit; detail=l2");
    assert_eq!(origin.total(), 1);
}

#[tokio::test]
async fn a_stale_and_a_soft_purged_copy_show_their_windows_left() {
    let origin = Origin::start().await;
    origin.set(|parts| Reply::ok(format!("body of {}", parts.uri.path())).header("cache-control", "max-age=10, stale-while-revalidate=30, stale-if-error=600"));
    let redis = RedisServer::start();
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).redis(&redis.url()).to_toml()).await;
    bulwark.get("/stale").await;
    bulwark.get("/soft").await;
    support::eventually("both copies reach Redis", Duration::from_secs(5), async || redis.entries("bulwark:pdp:").len() == 2).await;
    bulwark.advance(Duration::from_secs(15));
    let (_, stale) = inspect(&bulwark, "/stale", &[]).await;
    let l1 = &identity(&stale)["l1"];
    assert_eq!((l1["age_s"].as_u64(), l1["fresh_for_s"].as_u64()), (Some(15), Some(0)), "{stale}");
    assert_eq!((l1["swr_left_s"].as_u64(), l1["sie_left_s"].as_u64()), (Some(25), Some(595)), "{stale}");
    assert_eq!(l1["soft_purged"], false);
    let l2 = &identity(&stale)["l2"];
    assert_eq!((l2["present"].clone(), l2["swr_left_s"].as_u64(), l2["sie_left_s"].as_u64()), (Value::Bool(true), Some(25), Some(595)), "{stale}");
    assert_eq!(stale["would_be"], "stale_while_revalidate");

    bulwark.advance(Duration::from_secs(30));
    let (_, past_swr) = inspect(&bulwark, "/stale", &[]).await;
    assert_eq!(past_swr["would_be"], "miss", "past its stale-while-revalidate window a request goes to the origin: {past_swr}");

    let purged = bulwark.admin_send(http::Method::POST, "/admin/purge", &format!(r#"{{"urls": ["{}"], "soft": true}}"#, bulwark.url("/soft"))).await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    let (_, soft) = inspect(&bulwark, "/soft", &[]).await;
    let l1 = &identity(&soft)["l1"];
    assert_eq!((l1["present"].clone(), l1["soft_purged"].clone(), l1["fresh_for_s"].as_u64()), (Value::Bool(true), Value::Bool(true), Some(0)), "{soft}");
    assert_eq!(identity(&soft)["l2"]["soft_purged"], true, "the soft purge reached Redis: {soft}");
    assert_eq!(origin.total(), 2, "inspection reached the origin");
}

#[tokio::test]
async fn a_varied_url_shows_the_variant_the_headers_select() {
    let origin = Origin::start().await;
    origin.set(|parts| {
        let lang = parts.headers.get("accept-language").and_then(|v| v.to_str().ok()).unwrap_or("none").to_owned();
        Reply::ok(format!("page in {lang}")).header("cache-control", "max-age=60").header("vary", "Accept-Language")
    });
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await;
    bulwark.get_with("/p", &[("accept-language", "en")]).await;
    bulwark.get_with("/p", &[("accept-language", "de")]).await;
    let (status, de) = inspect(&bulwark, "/p", &["Accept-Language: de"]).await;
    assert_eq!(status, 200, "{de}");
    let group = identity(&de);
    assert_eq!(group["variant"]["vary"], serde_json::json!(["accept-language"]), "{de}");
    assert!(group["variant"]["key"].as_str().is_some_and(|k| k.contains("de")), "{de}");
    assert_eq!(group["l1"]["present"], true);
    assert_eq!(group["l1"]["size_bytes"], "page in de".len());
    assert_eq!(de["variants"].as_array().map(Vec::len), Some(2), "both stored variants are listed: {de}");
    assert_eq!(de["would_be"], "hit_l1");
    let (_, fr) = inspect(&bulwark, "/p", &["Accept-Language: fr"]).await;
    assert_eq!(identity(&fr)["l1"]["present"], false, "{fr}");
    assert_eq!(fr["would_be"], "miss");
    // An `Accept-Encoding` names the one group asked about.
    let (_, gzip) = inspect(&bulwark, "/p", &["Accept-Language: de", "Accept-Encoding: gzip"]).await;
    let groups = gzip["groups"].as_array().expect("groups");
    assert_eq!((groups.len(), groups[0]["accept_encoding"].as_str()), (1, Some("gzip")), "{gzip}");
    assert_eq!(gzip["would_be"], "miss", "nothing is stored for gzip: {gzip}");
}

#[tokio::test]
async fn absent_unrouted_and_malformed_urls_get_their_answers() {
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).route("path_prefix", "/products/").to_toml()).await;
    let (status, absent) = inspect(&bulwark, "/products/9", &[]).await;
    assert_eq!(status, 200, "{absent}");
    assert_eq!(identity(&absent)["l2"]["error"], "the pool has no Redis");
    assert!(absent["groups"].as_array().expect("groups").iter().all(|g| g["l1"]["present"] == false && g["l1"]["filling"] == false), "{absent}");
    assert_eq!(absent["would_be"], "miss");
    let (status, unrouted) = inspect(&bulwark, "/search", &[]).await;
    assert_eq!(status, 404, "{unrouted}");
    assert!(unrouted["error"].as_str().is_some_and(|e| e.contains("no route")), "{unrouted}");
    for bad in ["/admin/cache?url=%2Fproducts%2F1", "/admin/cache?url=ftp%3A%2F%2Fshop.example%2Fproducts%2F1", "/admin/cache", "/admin/cache?url=%zz"] {
        let got = bulwark.admin(bad).await;
        assert_eq!(got.status, 400, "{bad}: {}", got.text());
        assert!(serde_json::from_str::<Value>(got.text()).is_ok_and(|v| v["error"].is_string()), "{bad}: {}", got.text());
    }
    let got = bulwark.admin(&format!("/admin/cache?url={}&header=no-colon", encode(&bulwark.url("/products/1")))).await;
    assert_eq!(got.status, 400, "{}", got.text());
    assert_eq!(origin.total(), 0);
}

#[tokio::test]
async fn with_redis_down_l1_is_still_shown_and_redis_says_why_not() {
    let mut redis = RedisServer::start();
    let origin = Origin::start().await;
    let bulwark = Bulwark::start(&TestConfig::new(&origin.url()).redis(&redis.url()).to_toml()).await;
    bulwark.get("/products/1").await;
    redis.kill();
    let errors_before = bulwark.metric("bulwark_redis_errors_total", &[("pool", "pdp"), ("op", "get")]).await;
    let breaker_before = bulwark.metric("bulwark_redis_breaker_open", &[("pool", "pdp")]).await;
    let (status, answer) = inspect(&bulwark, "/products/1", &[]).await;
    assert_eq!(status, 200, "{answer}");
    let group = identity(&answer);
    assert_eq!(group["l1"]["present"], true, "{answer}");
    assert!(group["l2"]["present"].is_null() && group["l2"]["error"].is_string(), "{answer}");
    assert_eq!(answer["would_be"], "hit_l1");
    assert_eq!(bulwark.metric("bulwark_redis_errors_total", &[("pool", "pdp"), ("op", "get")]).await, errors_before);
    assert_eq!(bulwark.metric("bulwark_redis_breaker_open", &[("pool", "pdp")]).await, breaker_before);
}

#[tokio::test]
async fn a_fill_in_progress_is_shown_and_a_request_now_would_wait_for_it() {
    let origin = Origin::start().await;
    origin.set(|_| Reply::ok("slow").delay(Duration::from_millis(1500)));
    let bulwark = std::sync::Arc::new(Bulwark::start(&TestConfig::new(&origin.url()).to_toml()).await);
    let leader = {
        let bulwark = bulwark.clone();
        tokio::spawn(async move { bulwark.get("/slow").await })
    };
    support::eventually("the fill starts", Duration::from_secs(5), async || origin.total() == 1).await;
    let (_, answer) = inspect(&bulwark, "/slow", &[]).await;
    assert_eq!(identity(&answer)["l1"]["filling"], true, "{answer}");
    assert_eq!(answer["would_be"], "collapsed");
    assert_eq!(leader.await.expect("leader").status, 200);
    let (_, after) = inspect(&bulwark, "/slow", &[]).await;
    assert_eq!((identity(&after)["l1"]["present"].clone(), identity(&after)["l1"]["filling"].clone()), (Value::Bool(true), Value::Bool(false)), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulwark_inspect_shows_the_replicas_side_by_side() {
    let redis = RedisServer::start();
    let origin = Origin::start().await;
    let config = TestConfig::new(&origin.url()).redis(&redis.url()).to_toml();
    let (one, two) = (Bulwark::start(&config).await, Bulwark::start(&config).await);
    one.get_with("/products/1", &[("host", "shop.example")]).await;
    support::eventually("the copy reaches Redis", Duration::from_secs(5), async || !redis.entries("bulwark:pdp:").is_empty()).await;
    let admins = format!("http://{},http://{}", one.admin_addr, two.admin_addr);
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || std::process::Command::new(env!("CARGO_BIN_EXE_bulwark")).args(args).output().expect("bulwark inspect runs"))
    };
    let url = "http://shop.example/products/1".to_owned();
    let out = run(vec!["inspect".into(), url.clone(), "--admin".into(), admins.clone(), "--json".into()]).await.expect("join");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let would_be: Vec<&str> = answer["replicas"].as_array().expect("replicas").iter().filter_map(|r| r["answer"]["would_be"].as_str()).collect();
    assert_eq!(would_be, ["hit_l1", "hit_l2"], "{answer}");

    let out = run(vec!["inspect".into(), url.clone(), "--admin".into(), admins, "--header".into(), "Accept-Encoding: gzip".into()]).await.expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("route all, pool pdp, mode normal"), "{text}");
    let would_be = text.lines().find(|l| l.starts_with("would be")).unwrap_or_default();
    assert!(would_be.contains("miss"), "nothing is stored for gzip:\n{text}");
    assert!(text.lines().any(|l| l.starts_with("gzip L1") && l.contains("absent")), "{text}");

    // A replica that does not answer is named, and the exit status says so.
    let out = run(vec!["inspect".into(), url, "--admin".into(), format!("http://{}", one.admin_addr), "--admin".into(), "http://127.0.0.1:1".into()])
        .await
        .expect("join");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.0.1:1"), "{}", String::from_utf8_lossy(&out.stdout));
}
