//! An admin listener other hosts can reach, without a token, leaves purge, mode switches
//! and reload open to every pod: bulwark refuses to start that way unless told
//! `admin_open = true`. (Its own test binary: the token is read from the environment.)

mod support;

use std::path::Path;
use std::time::Duration;

use support::{Origin, TestConfig};
use tokio::net::TcpListener;

/// Runs an instance whose admin listener is on every address; `Err` if it refused.
async fn run(config: &str) -> Result<u16, String> {
    let config = bulwark::Config::parse(config, Path::new("test.toml")).map_err(|e| e.to_string())?;
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("0.0.0.0:0").await.expect("bind admin on every address");
    let admin_port = admin.local_addr().expect("addr").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(bulwark::server::run(bulwark::server::Listeners { proxy, admin }, config, async {
        let _ = stopped.await;
    }));
    // Serving: the health endpoint answers. Refused: the run ends at once with its error.
    let client = support::client();
    for _ in 0..100 {
        if task.is_finished() {
            return Err(task.await.expect("join").err().map(|e| e.to_string()).unwrap_or_default());
        }
        if client.get(format!("http://127.0.0.1:{admin_port}/healthz").parse().expect("uri")).await.is_ok_and(|r| r.status() == 200) {
            let _ = stop.send(());
            task.await.expect("join").map_err(|e| e.to_string())?;
            return Ok(admin_port);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("neither served nor refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reachable_admin_listener_needs_a_token_or_admin_open() {
    // SAFETY: this test binary has this one test, so no other thread reads the
    // environment while it is written.
    unsafe { std::env::remove_var(bulwark::admin::ADMIN_TOKEN_ENV) };
    let origin = Origin::start().await;
    let refused = run(&TestConfig::new(&origin.url()).to_toml()).await.expect_err("no token, reachable admin: refused");
    assert!(refused.contains("BULWARK_ADMIN_TOKEN") && refused.contains("admin_open"), "{refused}");
    // An empty or blank token is no token.
    unsafe { std::env::set_var(bulwark::admin::ADMIN_TOKEN_ENV, "  ") };
    assert!(run(&TestConfig::new(&origin.url()).to_toml()).await.is_err(), "a blank token protects nothing");
    // Deliberately open.
    unsafe { std::env::remove_var(bulwark::admin::ADMIN_TOKEN_ENV) };
    run(&TestConfig::new(&origin.url()).server("admin_open", true).to_toml()).await.expect("admin_open = true serves");
    // With a token, it serves.
    unsafe { std::env::set_var(bulwark::admin::ADMIN_TOKEN_ENV, "s3cret-token") };
    run(&TestConfig::new(&origin.url()).to_toml()).await.expect("a token protects /admin/*");
}
