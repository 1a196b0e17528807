//! Wall time for the cache's decisions: `Date` given to responses without one, `Age`,
//! freshness, stale windows, how long tiers keep an entry. One [`Clock`] is handed to
//! every pool when the runtime is built, so tests move time forward instead of sleeping.
//!
//! Deadlines (timeouts, `lock_timeout`, breaker and lease timers) are monotonic and stay
//! on tokio's clock, which tests can pause; access log timestamps are the system's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// The system clock, or (for tests) the system clock moved forward by an offset.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// Milliseconds added to the system time; `None` for the system clock itself.
    offset_ms: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that runs with the system's and that [`Clock::advance`] moves forward:
    /// every holder of a clone sees the same time.
    pub fn adjustable() -> Clock {
        Clock { offset_ms: Some(Arc::new(AtomicU64::new(0))) }
    }

    pub fn now(&self) -> SystemTime {
        let now = SystemTime::now();
        match &self.offset_ms {
            None => now,
            Some(offset) => now + Duration::from_millis(offset.load(Ordering::Relaxed)),
        }
    }

    /// Moves an adjustable clock forward by `by`.
    ///
    /// # Panics
    /// On the system clock, which cannot be moved: a test that calls this on it would
    /// otherwise pass without time having moved.
    pub fn advance(&self, by: Duration) {
        let offset = self.offset_ms.as_ref().expect("only an adjustable clock can be advanced");
        offset.fetch_add(u64::try_from(by.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advanced_clock_is_ahead_for_every_clone_and_the_system_clock_is_not() {
        let clock = Clock::adjustable();
        let clone = clock.clone();
        clock.advance(Duration::from_secs(90));
        let ahead = clone.now().duration_since(SystemTime::now()).unwrap_or_default();
        assert!(ahead >= Duration::from_secs(89), "{ahead:?}");
        let system = Clock::system().now().duration_since(SystemTime::now()).unwrap_or_default();
        assert!(system < Duration::from_secs(1), "{system:?}");
    }
}
