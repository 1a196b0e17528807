//! The access log: one line per request (JSON or text), sampled, written by a dedicated
//! thread so the request path only formats a line and hands it over.
//!
//! The hand-over is a bounded channel: when the writer falls behind (a slow stdout),
//! lines are dropped and counted rather than making requests wait.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::AccessLog as Format;

/// Lines waiting for the writer, at most.
const QUEUE: usize = 16 * 1024;

/// Time spent waiting for an origin slot and in the origin, for one request's log line.
/// Atomics because the fetch may run in another task (a coalesced flight).
#[derive(Debug, Default)]
pub struct Timings {
    pub queue_us: AtomicU64,
    pub origin_us: AtomicU64,
}

impl Timings {
    pub fn record(&self, queue: Duration, origin: Duration) {
        self.queue_us.store(u64::try_from(queue.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.origin_us.store(u64::try_from(origin.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// One request, as logged.
pub struct Line<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub target: &'a str,
    pub status: u16,
    pub route: &'a str,
    pub pool: &'a str,
    pub cache: &'a str,
    pub total: Duration,
    pub timings: Option<&'a Timings>,
}

pub struct AccessLog {
    format: Format,
    sample: f64,
    tx: SyncSender<String>,
    dropped: metrics::Counter,
}

impl AccessLog {
    /// Starts the writer thread; `None` when the log is off.
    pub fn start(format: Format, sample: f64, dropped: metrics::Counter) -> Option<AccessLog> {
        if format == Format::Off || sample <= 0.0 {
            return None;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(QUEUE);
        let spawned = std::thread::Builder::new().name("bulwark-access-log".into()).spawn(move || {
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
            while let Ok(line) = rx.recv() {
                let _ = out.write_all(line.as_bytes());
                // Drain what is queued before flushing: one write for a burst.
                while let Ok(line) = rx.try_recv() {
                    let _ = out.write_all(line.as_bytes());
                }
                let _ = out.flush();
            }
        });
        if spawned.is_err() {
            tracing::error!("cannot start the access log writer; access log off");
            return None;
        }
        Some(AccessLog { format, sample, tx, dropped })
    }

    /// Whether to log this request (sampling); decided before the request runs so that
    /// only sampled requests pay for timings.
    pub fn sampled(&self) -> bool {
        self.sample >= 1.0 || fastrand::f64() < self.sample
    }

    pub fn log(&self, line: &Line<'_>) {
        let text = match self.format {
            Format::Json => json(line),
            Format::Text => text(line),
            Format::Off => return,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(text) {
            self.dropped.increment(1);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn timing_ms(t: Option<&Timings>, pick: fn(&Timings) -> &AtomicU64) -> f64 {
    t.map_or(0.0, |t| pick(t).load(Ordering::Relaxed) as f64 / 1000.0)
}

fn json(l: &Line<'_>) -> String {
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let value = serde_json::json!({
        "ts_ms": ts,
        "method": l.method,
        "host": l.host,
        "target": l.target,
        "status": l.status,
        "route": l.route,
        "pool": l.pool,
        "cache": l.cache,
        "total_ms": ms(l.total),
        "queue_ms": timing_ms(l.timings, |t| &t.queue_us),
        "origin_ms": timing_ms(l.timings, |t| &t.origin_us),
    });
    let mut s = value.to_string();
    s.push('\n');
    s
}

fn text(l: &Line<'_>) -> String {
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    format!(
        "{ts} {} {}{} {} route={} pool={} cache={} total_ms={:.3} queue_ms={:.3} origin_ms={:.3}\n",
        l.method,
        l.host,
        l.target,
        l.status,
        l.route,
        l.pool,
        l.cache,
        ms(l.total),
        timing_ms(l.timings, |t| &t.queue_us),
        timing_ms(l.timings, |t| &t.origin_us),
    )
}
