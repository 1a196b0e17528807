//! Test support, by role: a private `redis-server` per test on a free port ([`redis_server`]),
//! an in-process origin that counts what it receives ([`origin`]), a bulwark instance on
//! free ports ([`bulwark`]) or as a `bulwark serve` process ([`process`]), the configs
//! they start from ([`config`]; the shipped shop, pointed here: [`shop`]), and waiting
//! for a condition without falling through silently ([`eventually`]).
#![allow(dead_code)]

use std::time::{Duration, Instant};

pub mod bulwark;
pub mod config;
pub mod origin;
pub mod process;
pub mod redis_server;
pub mod shop;

// Each test binary uses its own part of these.
#[allow(unused_imports)]
pub use bulwark::*;
#[allow(unused_imports)]
pub use config::TestConfig;
#[allow(unused_imports)]
pub use origin::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use redis_server::*;

/// Waits until `condition` holds, checking every 20 ms; panics naming `what` when it
/// does not within `limit` (never falls through silently).
pub async fn eventually(what: &str, limit: Duration, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for a child process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}
