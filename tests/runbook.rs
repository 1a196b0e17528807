//! The runbook's commands, run as written: every `sh` block of `docs/runbook.md` against
//! two local replicas of the shipped shop config (with `ADMIN`, `ADMINS`, `TOKEN` and
//! `SHOP` set as its setup sets them), so a renamed flag or endpoint fails here before
//! it fails someone at 00:00. The `shell` blocks need a cluster: they are only parsed.
//! (Its own test binary: the admin token is read from the process environment.)

mod support;

use std::process::Command;
use std::time::Duration;

use support::{Bulwark, Origin, RedisServer, Reply};

const RUNBOOK: &str = include_str!("../docs/runbook.md");
const TOKEN: &str = "runbook-test-token";

/// The fenced blocks of `language` in the runbook.
fn blocks(language: &str) -> Vec<String> {
    let fence = format!("```{language}\n");
    let mut found = Vec::new();
    let mut rest = RUNBOOK;
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("```").expect("a closed block");
        // Blocks inside list items are indented.
        found.push(body[..end].lines().map(str::trim_start).collect::<Vec<_>>().join("\n"));
        rest = &body[end + 3..];
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runbooks_commands_work_as_written() {
    // SAFETY: this test binary has this one test, so no other thread reads the
    // environment while it is written.
    unsafe { std::env::set_var(bulwark::admin::ADMIN_TOKEN_ENV, TOKEN) };
    let (origin, redis) = (Origin::start().await, RedisServer::start());
    origin.set(|parts| match parts.uri.path() {
        "/api/search" => Reply::ok("{\"results\":[\"shoes\"]}").header("cache-control", "max-age=10"),
        _ => Reply::ok(format!("page {}", parts.uri.path())).header("cache-control", "max-age=60"),
    });
    let dir = std::env::temp_dir().join(format!("bulwark-runbook-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The first replica from a file, as in the pods: reloads read it.
    let file = dir.join("running.toml");
    std::fs::write(&file, support::shop::local_shop(&origin.url(), redis.port)).expect("write config");
    let first = Bulwark::start_with_file(&file).await;
    let second = Bulwark::start(&support::shop::local_shop(&origin.url(), redis.port)).await;
    // What the runbook has its reader fetch: the ConfigMap's file, yesterday's top URLs.
    std::fs::write(dir.join("bulwark.toml"), support::shop::SHOP).expect("write bulwark.toml");
    std::fs::write(dir.join("top-urls.txt"), "https://shop.example/products/1\nhttps://shop.example/category/shoes?page=2\n").expect("write urls");
    for replica in [&first, &second] {
        support::eventually("the replica sees the control channel", Duration::from_secs(5), async || {
            replica.metric("bulwark_origin_concurrency_limit", &[("origin", "catalog")]).await == 134.0
                && replica.metric("bulwark_redis_events_subscribed", &[("pool", "pdp")]).await == 1.0
        })
        .await;
    }
    let admins = format!("http://{},http://{}", first.admin_addr, second.admin_addr);
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_bulwark")).parent().expect("bin dir").to_owned();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());

    let runnable = blocks("sh");
    assert!(runnable.len() >= 6, "the runbook has {} runnable blocks", runnable.len());
    let mut ran = Vec::new();
    for block in &runnable {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", block])
            .current_dir(&dir)
            .env("PATH", &path)
            .env("ADMIN", format!("http://{}", first.admin_addr))
            .env("ADMINS", &admins)
            .env("TOKEN", TOKEN)
            .env("SHOP", format!("http://{}", first.addr))
            .env("REDIS_PASSWORD", "from-a-secret")
            .output()
            .expect("run bash");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "the runbook's block failed:\n{block}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
        ran.push(stdout.into_owned());
    }
    let output = ran.join("\n");
    // What the blocks did, seen from outside.
    assert!(output.contains("config/") || output.contains("bulwark.toml: ok"), "bulwark check's verdict: {output}");
    assert!(output.contains("product-detail"), "top and /admin/routes name the routes: {output}");
    assert!(output.contains("\"confirmed\""), "a mode switch answers which replicas confirmed it: {output}");
    assert!(origin.count("/products/1") >= 1, "warm fetched the top URLs");
    // The last mode block put search back to normal: a search reaches the origin again.
    let search = second.get("/api/search?q=shoes").await;
    assert_eq!((search.status.as_u16(), search.text()), (200, "{\"results\":[\"shoes\"]}"));

    // The cluster-only blocks are at least valid shell.
    for block in blocks("shell") {
        let out = Command::new("bash").args(["-n", "-c", &block]).output().expect("run bash -n");
        assert!(out.status.success(), "not valid shell:\n{block}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
