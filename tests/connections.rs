//! Connections under load and abuse: the listeners' accept queues.

mod support;

use std::process::{Command, Stdio};

use support::{Origin, ServeProcess, TestConfig};

/// The accept queue of the socket listening on `port`, as `ss` reports it (Send-Q of a
/// listening socket is its backlog).
fn backlog_of(port: u16) -> u32 {
    let out = Command::new("ss").args(["-ltnH", &format!("sport = :{port}")]).output().expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or_else(|| panic!("nothing listens on {port}: {text:?}"));
    line.split_whitespace().nth(2).and_then(|q| q.parse().ok()).unwrap_or_else(|| panic!("no Send-Q in {line:?}"))
}

fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|t| t.trim().parse().ok()).unwrap_or(4096)
}

#[tokio::test]
async fn both_listeners_get_the_configured_accept_queue_not_128() {
    let origin = Origin::start().await;
    let default = ServeProcess::start(&TestConfig::new(&origin.url()).to_toml(), Stdio::null(), Stdio::null()).await;
    let expected = 4096.min(somaxconn());
    assert!(expected > 128, "this kernel caps accept queues at {expected}");
    assert_eq!((backlog_of(default.port), backlog_of(default.admin_port)), (expected, expected));
    let set = ServeProcess::start(&TestConfig::new(&origin.url()).server("listen_backlog", 1000).to_toml(), Stdio::null(), Stdio::null()).await;
    let expected = 1000.min(somaxconn());
    assert_eq!((backlog_of(set.port), backlog_of(set.admin_port)), (expected, expected));
}
