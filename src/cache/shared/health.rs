//! The per-pool Redis breaker.
//!
//! After `failures` calls in a row fail (deadline missed, connection refused, error
//! reply from a sick server), the breaker opens: the pool skips its shared tier
//! entirely, so no request pays a Redis deadline, and `bulwark_redis_breaker_open{pool}`
//! is 1. While open, one background probe (a PING under the same deadline) runs every
//! `probe_interval`; the first answer closes the breaker. A stalled Redis thus costs one
//! deadline per probe, not one per request.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use metrics::Gauge;

use super::link::Link;

pub struct Health {
    /// Read by every shared-tier call, written on transitions only.
    open: AtomicBool,
    /// Failures in a row while closed; reset by any success.
    consecutive: AtomicU32,
    threshold: u32,
    probe_interval: Duration,
    timeout: Duration,
    /// Probed with `EXISTS <key>`: a keyed command goes to one node (in a cluster, a
    /// PING would need every primary to answer).
    probe_key: String,
    gauge: Gauge,
    pool: String,
    /// Open and close lines, rate-limited (a flapping breaker says how many it left out).
    log: crate::log_every::Every,
}

impl Health {
    pub fn new(pool: &str, threshold: u32, probe_interval: Duration, timeout: Duration, probe_key: String, gauge: Gauge) -> Arc<Health> {
        gauge.set(0.0);
        Arc::new(Health {
            open: AtomicBool::new(false),
            consecutive: AtomicU32::new(0),
            threshold: threshold.max(1),
            probe_interval,
            timeout,
            probe_key,
            gauge,
            pool: pool.to_owned(),
            log: crate::log_every::Every::new(Duration::from_secs(10)),
        })
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    pub fn succeeded(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
    }

    /// Records a failure; opens the breaker (and starts the probe) at the threshold.
    pub fn failed(self: &Arc<Self>, link: &Arc<Link>) {
        if self.consecutive.fetch_add(1, Ordering::AcqRel) + 1 < self.threshold {
            return;
        }
        // Only the caller that flips it starts the probe.
        if self.open.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.gauge.set(1.0);
            if let Some(left_out) = self.log.due() {
                tracing::warn!(pool = self.pool, left_out, "Redis breaker open: skipping the shared tier until Redis answers again");
            }
            tokio::spawn(probe(Arc::downgrade(self), Arc::downgrade(link)));
        }
    }

    fn close(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.open.store(false, Ordering::Release);
        self.gauge.set(0.0);
        if let Some(left_out) = self.log.due() {
            tracing::info!(pool = self.pool, left_out, "Redis breaker closed: shared tier back in use");
        }
    }
}

/// Probes every `probe_interval` until Redis answers, then closes the breaker; a failed
/// probe makes the next one use a fresh connection. Ends early when the pool is dropped.
async fn probe(health: Weak<Health>, link: Weak<Link>) {
    loop {
        let Some(interval) = health.upgrade().map(|h| h.probe_interval) else { return };
        tokio::time::sleep(interval).await;
        let (Some(health), Some(link)) = (health.upgrade(), link.upgrade()) else { return };
        let mut conn = link.conn();
        let probe = redis::cmd("EXISTS").arg(&health.probe_key).clone();
        match link.call(health.timeout, probe.query_async::<i64>(&mut conn)).await {
            Some(Ok(_)) => {
                health.close();
                return;
            }
            Some(Err(e)) if super::link::is_not_ready(&e) => {}
            _ => link.reset(),
        }
    }
}
