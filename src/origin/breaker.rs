//! Circuit breaker per origin.
//!
//! Closed: requests flow; it opens after `consecutive_failures` failures in a row, or
//! when at least `min_requests` requests in the current `window` failed at a rate of
//! `failure_rate` or more. Open: requests are refused without touching the origin for
//! `open_for`. Then half-open: one probe at a time goes through; a success closes the
//! breaker, a failure opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub open_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    consecutive: u32,
    window_start: Instant,
    window_requests: u32,
    window_failures: u32,
}

/// Permission to send one request; report its result with [`Breaker::record`].
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The half-open probe: its result decides the breaker's state.
    Probe,
    No,
}

pub struct Breaker {
    config: BreakerConfig,
    /// One small mutex: every origin request touches it twice, for a few instructions.
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        let state = State { phase: Phase::Closed, consecutive: 0, window_start: Instant::now(), window_requests: 0, window_failures: 0 };
        Breaker { config, state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn admit(&self) -> Admit {
        let mut state = self.lock();
        match state.phase {
            Phase::Closed => Admit::Yes,
            Phase::Open { until } if Instant::now() < until => Admit::No,
            Phase::Open { .. } | Phase::HalfOpen { probing: false } => {
                state.phase = Phase::HalfOpen { probing: true };
                Admit::Probe
            }
            Phase::HalfOpen { probing: true } => Admit::No,
        }
    }

    /// Records the result of an admitted request; returns whether the breaker is open now.
    pub fn record(&self, admitted: &Admit, success: bool) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        if *admitted == Admit::Probe {
            state.phase = if success { Phase::Closed } else { Phase::Open { until: now + self.config.open_for } };
            state.consecutive = 0;
            state.window_start = now;
            state.window_requests = 0;
            state.window_failures = 0;
            return !success;
        }
        if now.duration_since(state.window_start) >= self.config.window {
            state.window_start = now;
            state.window_requests = 0;
            state.window_failures = 0;
        }
        state.window_requests += 1;
        if success {
            state.consecutive = 0;
        } else {
            state.consecutive += 1;
            state.window_failures += 1;
        }
        let rate_tripped = state.window_requests >= self.config.min_requests
            && f64::from(state.window_failures) >= self.config.failure_rate * f64::from(state.window_requests);
        if state.phase == Phase::Closed && (state.consecutive >= self.config.consecutive_failures || rate_tripped) {
            state.phase = Phase::Open { until: now + self.config.open_for };
        }
        matches!(state.phase, Phase::Open { .. })
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.lock().phase, Phase::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(open_for: Duration) -> Breaker {
        Breaker::new(BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(60),
            open_for,
        })
    }

    #[test]
    fn opens_on_consecutive_failures_and_probes_to_close() {
        let b = breaker(Duration::from_millis(30));
        for _ in 0..2 {
            let admit = b.admit();
            assert!(!b.record(&admit, false));
        }
        let admit = b.admit();
        assert!(b.record(&admit, false), "third failure in a row opens");
        assert_eq!(b.admit(), Admit::No);
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.admit();
        assert_eq!(probe, Admit::Probe);
        assert_eq!(b.admit(), Admit::No, "one probe at a time");
        assert!(b.record(&probe, false), "failed probe reopens");
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.admit();
        assert!(!b.record(&probe, true), "successful probe closes");
        assert_eq!(b.admit(), Admit::Yes);
    }

    #[test]
    fn opens_on_failure_rate() {
        let b = breaker(Duration::from_secs(5));
        for i in 0..10 {
            let admit = b.admit();
            b.record(&admit, i % 2 == 0);
        }
        assert!(b.is_open(), "5 of 10 failed, never 3 in a row");
    }
}
