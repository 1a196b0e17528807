//! The access log: one line per request (JSON or text), sampled, written by a dedicated
//! thread so the request path only formats a line into a shared buffer.
//!
//! The buffer is bounded: when the writer falls behind (a slow stdout), lines are
//! dropped and counted rather than making requests wait.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::AccessLog as Format;
use crate::origin::Timings;

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

/// Bytes of log lines buffered at most; beyond it lines are dropped (and counted).
const MAX_BUFFERED: usize = 8 << 20;
/// How often the writer thread writes the buffer out.
const FLUSH_EVERY: Duration = Duration::from_millis(20);

pub struct AccessLog {
    format: Format,
    sample: f64,
    /// Lines formatted by requests, taken whole by the writer thread. A mutex because
    /// appending a line is a few hundred nanoseconds and the writer swaps the buffer
    /// out in one step: no per-line allocation, channel or wakeup.
    buffer: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    dropped: metrics::Counter,
}

/// Swaps the buffer for `spare` (emptied, capacity kept), returning the lines.
fn swap(buffer: &std::sync::Mutex<Vec<u8>>, spare: Vec<u8>) -> Vec<u8> {
    std::mem::replace(&mut *buffer.lock().unwrap_or_else(|p| p.into_inner()), spare)
}

impl AccessLog {
    /// Starts the writer thread; `None` when the log is off.
    pub fn start(format: Format, sample: f64, dropped: metrics::Counter) -> Option<AccessLog> {
        if format == Format::Off || sample <= 0.0 {
            return None;
        }
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(1 << 20)));
        let shared = std::sync::Arc::downgrade(&buffer);
        let spawned = std::thread::Builder::new().name("bulwark-access-log".into()).spawn(move || {
            let mut spare = Vec::with_capacity(1 << 20);
            loop {
                std::thread::sleep(FLUSH_EVERY);
                let Some(buffer) = shared.upgrade() else { return };
                let mut lines = swap(&buffer, spare);
                drop(buffer);
                if !lines.is_empty() {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&lines);
                    let _ = out.flush();
                }
                lines.clear();
                spare = lines;
            }
        });
        if spawned.is_err() {
            tracing::error!("cannot start the access log writer; access log off");
            return None;
        }
        Some(AccessLog { format, sample, buffer, dropped })
    }

    /// Whether to log this request (sampling); decided before the request runs so that
    /// only sampled requests pay for timings.
    pub fn sampled(&self) -> bool {
        self.sample >= 1.0 || fastrand::f64() < self.sample
    }

    pub fn log(&self, line: &Line<'_>) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        if buffer.len() >= MAX_BUFFERED {
            drop(buffer);
            self.dropped.increment(1);
            return;
        }
        match self.format {
            Format::Json => json(&mut buffer, line),
            Format::Text => text(&mut buffer, line),
            Format::Off => {}
        }
    }

    /// Writes out what is buffered (at shutdown).
    pub fn flush(&self) {
        let lines = swap(&self.buffer, Vec::new());
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&lines);
        let _ = out.flush();
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn timing_us(t: Option<&Timings>, pick: fn(&Timings) -> &AtomicU64) -> u64 {
    t.map_or(0, |t| pick(t).load(Ordering::Relaxed))
}

/// Appends `text` as a JSON string (quotes, backslashes and control characters escaped).
fn json_str(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for c in text.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let mut utf8 = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    out.push(b'"');
}

fn json(out: &mut Vec<u8>, l: &Line<'_>) {
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let _ = write!(out, "{{\"ts_ms\":{ts},\"method\":");
    json_str(out, l.method);
    out.extend_from_slice(b",\"host\":");
    json_str(out, l.host);
    out.extend_from_slice(b",\"target\":");
    json_str(out, l.target);
    let _ = write!(out, ",\"status\":{},\"route\":", l.status);
    json_str(out, l.route);
    out.extend_from_slice(b",\"pool\":");
    json_str(out, l.pool);
    let _ = writeln!(
        out,
        ",\"cache\":\"{}\",\"total_us\":{},\"queue_us\":{},\"origin_us\":{}}}",
        l.cache,
        us(l.total),
        timing_us(l.timings, |t| &t.queue_us),
        timing_us(l.timings, |t| &t.origin_us)
    );
}

fn text(out: &mut Vec<u8>, l: &Line<'_>) {
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let _ = writeln!(
        out,
        "{ts} {} {}{} {} route={} pool={} cache={} total_us={} queue_us={} origin_us={}",
        l.method,
        l.host,
        l.target.escape_debug(),
        l.status,
        l.route,
        l.pool,
        l.cache,
        us(l.total),
        timing_us(l.timings, |t| &t.queue_us),
        timing_us(l.timings, |t| &t.origin_us),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_valid_json_whatever_the_target() {
        let line = Line {
            method: "GET",
            host: "shop.example",
            target: "/p?q=\"quoted\"&b=\\x\u{1}",
            status: 200,
            route: "r",
            pool: "p",
            cache: "hit_l1",
            total: Duration::from_micros(1500),
            timings: None,
        };
        let mut out = Vec::new();
        json(&mut out, &line);
        let value: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(value["target"], "/p?q=\"quoted\"&b=\\x\u{1}");
        assert_eq!(value["total_us"], 1500);
    }
}
