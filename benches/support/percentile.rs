//! Latency percentiles for the bench clients (`burst`, `stream`).

use std::time::Duration;

/// The `p`th percentile (nearest rank) of `sorted`, in milliseconds; NaN when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}
