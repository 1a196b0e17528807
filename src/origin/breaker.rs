//! Circuit breaker per origin.
//!
//! Closed: requests flow; it opens after `consecutive_failures` failures in a row, or
//! when at least `min_requests` requests in the current `window` failed at a rate of
//! `failure_rate` or more. Open: requests are refused without touching the origin for
//! `open_for`. Then half-open: one probe at a time goes through; a success closes the
//! breaker, a failure opens it again.

use std::sync::Mutex;
use std::time::Instant;

use crate::config::BreakerConfig;

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

/// Permission to send one request; report its result with [`Permit::record`]. A probe
/// dropped without a result (its request was cancelled) lets the next request probe.
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Permit<'_> {
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Records the request's result; returns whether the breaker is open now.
    pub fn record(mut self, success: bool) -> bool {
        self.recorded = true;
        self.breaker.record(self.probe, success)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut state = self.breaker.lock();
            if state.phase == (Phase::HalfOpen { probing: true }) {
                state.phase = Phase::HalfOpen { probing: false };
            }
        }
    }
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

    /// Lets a request through, or not (`None`: open, or a probe is already out).
    pub fn admit(&self) -> Option<Permit<'_>> {
        let mut state = self.lock();
        let probe = match state.phase {
            Phase::Closed => false,
            Phase::Open { until } if Instant::now() < until => return None,
            Phase::Open { .. } | Phase::HalfOpen { probing: false } => {
                state.phase = Phase::HalfOpen { probing: true };
                true
            }
            Phase::HalfOpen { probing: true } => return None,
        };
        Some(Permit { breaker: self, probe, recorded: false })
    }

    fn record(&self, probe: bool, success: bool) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        if probe {
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

    /// Whether requests are being refused right now (open and not yet due for a probe,
    /// or a probe is out).
    pub fn is_open_now(&self) -> bool {
        match self.lock().phase {
            Phase::Closed | Phase::HalfOpen { probing: false } => false,
            Phase::Open { until } => Instant::now() < until,
            Phase::HalfOpen { probing: true } => true,
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.lock().phase, Phase::Closed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn breaker(open_for: Duration) -> Breaker {
        Breaker::new(BreakerConfig { consecutive_failures: 3, failure_rate: 0.5, min_requests: 10, window: Duration::from_secs(60), open_for })
    }

    fn send(b: &Breaker, success: bool) -> bool {
        b.admit().expect("admitted").record(success)
    }

    #[test]
    fn opens_on_consecutive_failures_and_probes_to_close() {
        let b = breaker(Duration::from_millis(30));
        assert!(!send(&b, false));
        assert!(!send(&b, false));
        assert!(send(&b, false), "third failure in a row opens");
        assert!(b.admit().is_none());
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.admit().expect("probe");
        assert!(probe.is_probe());
        assert!(b.admit().is_none(), "one probe at a time");
        assert!(probe.record(false), "failed probe reopens");
        std::thread::sleep(Duration::from_millis(40));
        assert!(!send(&b, true), "successful probe closes");
        assert!(b.admit().is_some_and(|p| !p.is_probe()));
    }

    #[test]
    fn a_cancelled_probe_lets_the_next_request_probe() {
        let b = breaker(Duration::from_millis(10));
        for _ in 0..3 {
            send(&b, false);
        }
        std::thread::sleep(Duration::from_millis(20));
        drop(b.admit().expect("probe"));
        assert!(b.admit().is_some_and(|p| p.is_probe()), "not stuck half-open");
    }

    #[test]
    fn opens_on_failure_rate() {
        let b = breaker(Duration::from_secs(5));
        for i in 0..10 {
            send(&b, i % 2 == 0);
        }
        assert!(b.is_open(), "5 of 10 failed, never 3 in a row");
    }
}
