//! Keeping an origin's endpoints current: DNS discovery, active health checks, and the
//! tick that ends ejections, forgets drained endpoints and sets the endpoint gauges.
//!
//! Each runs in its own task holding only a weak reference to its origin, so that an
//! origin replaced by a reload stops being resolved and checked once the last request
//! on it is done.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use http::uri::Authority;

use super::Origin;
use super::endpoints::State;

/// How often ejections are ended and gauges set.
const TICK: Duration = Duration::from_millis(500);

/// An empty answer this many times in a row leaves the origin without endpoints (one
/// empty answer is often a Service between deployments).
const EMPTY_ANSWERS_TO_CLEAR: u32 = 3;

/// Longest wait for one DNS answer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers that stand in for the system resolver, by host name (`None`: the lookup fails).
static PINNED: Mutex<Option<HashMap<String, Option<Vec<IpAddr>>>>> = Mutex::new(None);

/// Makes DNS discovery of `host` answer `answer` (`None`: fail) in this process instead of
/// asking the system resolver: the hook tests drive discovery with. Not used otherwise.
#[doc(hidden)]
pub fn pin_answer(host: &str, answer: Option<Vec<IpAddr>>) {
    let mut pinned = PINNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    pinned.get_or_insert_with(HashMap::new).insert(host.to_ascii_lowercase(), answer);
}

/// The addresses `host` resolves to: A records, or AAAA when there are none.
async fn resolve(host: &str, port: u16) -> std::io::Result<Vec<Authority>> {
    let pinned = {
        let pinned = PINNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pinned.as_ref().and_then(|p| p.get(&host.to_ascii_lowercase()).cloned())
    };
    let addresses: Vec<SocketAddr> = match pinned {
        Some(Some(ips)) => ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect(),
        Some(None) => return Err(std::io::Error::other("lookup failed (pinned)")),
        None => match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
            Ok(found) => found?.collect(),
            Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no DNS answer in time")),
        },
    };
    let v4 = addresses.iter().any(SocketAddr::is_ipv4);
    let mut authorities: Vec<Authority> = addresses.iter().filter(|a| a.is_ipv4() == v4).filter_map(|a| a.to_string().parse().ok()).collect();
    authorities.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    authorities.dedup();
    Ok(authorities)
}

/// Starts the origin's background tasks (only inside a Tokio runtime).
pub fn start(origin: &std::sync::Arc<Origin>) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    tokio::spawn(tick(std::sync::Arc::downgrade(origin)));
    if let crate::config::EndpointSource::Dns { host, port, interval } = &origin.config.endpoints {
        tokio::spawn(discover(std::sync::Arc::downgrade(origin), host.clone(), *port, *interval));
    }
    if origin.config.health_check.is_some() {
        tokio::spawn(check(std::sync::Arc::downgrade(origin)));
    }
}

async fn tick(origin: Weak<Origin>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(origin) = origin.upgrade() else { return };
        origin.endpoints.tick();
        let reports = origin.endpoints.report_all();
        for (state, gauge) in State::ALL.iter().zip(&origin.metrics.endpoints) {
            gauge.set(reports.iter().filter(|r| r.state == *state).count() as f64);
        }
    }
}

async fn discover(origin: Weak<Origin>, host: String, port: u16, interval: Duration) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut empty_in_a_row, mut failing) = (0u32, false);
    loop {
        every.tick().await;
        let answer = resolve(&host, port).await;
        let Some(origin) = origin.upgrade() else { return };
        let name = &origin.config.name;
        match answer {
            Ok(found) if found.is_empty() => {
                empty_in_a_row += 1;
                if empty_in_a_row == EMPTY_ANSWERS_TO_CLEAR {
                    tracing::warn!(origin = name, host, "origin's host resolves to nothing: no endpoints left");
                    origin.endpoints.set(&[]);
                } else {
                    tracing::debug!(origin = name, host, "origin's host resolved to nothing; keeping the last endpoints");
                }
            }
            Ok(found) => {
                if failing {
                    tracing::info!(origin = name, host, "origin's host resolves again");
                }
                (empty_in_a_row, failing) = (0, false);
                if origin.endpoints.set(&found) {
                    origin.check_now.notify_one();
                }
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(origin = name, host, error = %err, "cannot resolve the origin's host; keeping the last endpoints");
                }
                failing = true;
            }
        }
        // Without a health check, requests can go once the first answer is in (with one,
        // once the endpoints found are checked; with nothing found, at once: they fail).
        if origin.config.health_check.is_none() || origin.endpoints.is_empty() {
            origin.ready();
        }
    }
}

async fn check(origin: Weak<Origin>) {
    // Only the notifier is held between rounds, so a replaced origin goes at once.
    let Some((interval, check_now)) = origin.upgrade().and_then(|o| o.config.health_check.as_ref().map(|c| (c.interval, o.check_now.clone()))) else { return };
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = check_now.notified() => {}
        }
        let Some(origin) = origin.upgrade() else { return };
        let Some(config) = &origin.config.health_check else { return };
        let serving = origin.endpoints.serving();
        if serving.is_empty() {
            continue;
        }
        // All at once, each within its timeout (at most the interval), so one black-holed
        // endpoint delays nobody's check.
        futures_util::future::join_all(serving.iter().map(|endpoint| async {
            let passed = origin.health_check(&endpoint.authority, config).await;
            origin.endpoints.checked(endpoint, passed, config.unhealthy_after, config.healthy_after);
        }))
        .await;
        origin.ready();
    }
}
