//! Rate-limited log lines: a warning that would otherwise repeat many times a second
//! (every request to an unreachable origin, every probe of a Redis that is down, a
//! flapping breaker) is written at most once per period, with how many were left out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One kind of log line's allowance.
#[derive(Debug)]
pub struct Every {
    period_ms: u64,
    /// Milliseconds since `start` when the next line may be written.
    next_ms: AtomicU64,
    left_out: AtomicU64,
    start: Instant,
}

impl Every {
    pub fn new(period: Duration) -> Every {
        let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
        Every { period_ms, next_ms: AtomicU64::new(0), left_out: AtomicU64::new(0), start: Instant::now() }
    }

    /// `Some(lines left out since the last one)` when a line is due now, else `None`
    /// (and this one is counted as left out).
    pub fn due(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        if now < next || self.next_ms.compare_exchange(next, now.saturating_add(self.period_ms), Ordering::Relaxed, Ordering::Relaxed).is_err() {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.left_out.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_saying_how_many_were_left_out() {
        let every = Every::new(Duration::from_millis(50));
        assert_eq!(every.due(), Some(0), "the first is written");
        assert_eq!((every.due(), every.due()), (None, None), "then none until the period is over");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(every.due(), Some(2), "the next says two were left out");
        assert_eq!(every.due(), None);
    }
}
