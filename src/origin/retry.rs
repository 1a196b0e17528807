//! Retries of origin requests that never reached the origin, and their budget.
//!
//! A GET or HEAD whose attempt failed before the request was sent or before any byte of
//! a response came back (a refused or timed-out connect: a deleted pod's address is often
//! black-holed; a reset; a connection closed before the status line) is tried again,
//! within the same deadline. Retries are at most 20% of the origin's requests over the
//! last 10 s (and at least [`FLOOR`] in that time, so a quiet origin still gets them):
//! an origin that fails everything is not sent more than 1.2 times its load.

use std::sync::Mutex;

use tokio::time::Instant;

/// Seconds the budget looks back over, one bucket each.
const WINDOW: usize = 10;
/// Retries allowed in any window however few the requests.
const FLOOR: u64 = 3;

/// One origin's budget.
pub struct RetryBudget {
    start: Instant,
    /// By second: (which second, requests, retries).
    buckets: Mutex<[(u64, u64, u64); WINDOW]>,
}

impl Default for RetryBudget {
    fn default() -> RetryBudget {
        RetryBudget { start: Instant::now(), buckets: Mutex::new([(u64::MAX, 0, 0); WINDOW]) }
    }
}

impl RetryBudget {
    fn second(&self) -> u64 {
        Instant::now().saturating_duration_since(self.start).as_secs()
    }

    fn with_bucket<T>(&self, now: u64, f: impl FnOnce(&mut [(u64, u64, u64); WINDOW], usize, u64) -> T) -> T {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let i = usize::try_from(now % WINDOW as u64).unwrap_or(0);
        if buckets[i].0 != now {
            buckets[i] = (now, 0, 0);
        }
        f(&mut buckets, i, now)
    }

    /// Counts a request sent to the origin (a first attempt).
    pub fn request(&self) {
        self.request_at(self.second());
    }

    fn request_at(&self, second: u64) {
        self.with_bucket(second, |buckets, i, _| buckets[i].1 += 1);
    }

    /// Takes a retry from the budget if there is room for one.
    pub fn try_retry(&self) -> bool {
        self.try_retry_at(self.second())
    }

    fn try_retry_at(&self, second: u64) -> bool {
        self.with_bucket(second, |buckets, i, now| {
            let recent = buckets.iter().filter(|(second, _, _)| *second != u64::MAX && now - second < WINDOW as u64);
            let (requests, retries) = recent.fold((0, 0), |(q, r), (_, bq, br)| (q + bq, r + br));
            if retries >= FLOOR.max(requests / 5) {
                return false;
            }
            buckets[i].2 += 1;
            true
        })
    }
}

/// Whether an attempt's error means nothing of a response came back: a connect error,
/// or the connection reset or closed before the status line.
pub fn never_answered(err: &hyper_util::client::legacy::Error) -> bool {
    if err.is_connect() {
        return true;
    }
    let mut cause = std::error::Error::source(err);
    while let Some(e) = cause {
        if let Some(hyper) = e.downcast_ref::<hyper::Error>()
            && hyper.is_incomplete_message()
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::BrokenPipe)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_stay_within_a_fifth_of_the_requests_of_the_last_ten_seconds() {
        let budget = RetryBudget::default();
        // A quiet origin still gets a few.
        assert!((0..FLOOR).all(|_| budget.try_retry_at(100)));
        assert!(!budget.try_retry_at(100), "over the floor with no requests");
        for second in 101..106 {
            for _ in 0..20 {
                budget.request_at(second);
            }
        }
        let granted = (0..100).filter(|_| budget.try_retry_at(106)).count();
        assert_eq!(granted, 20 - FLOOR as usize, "20% of 100 requests over the window, the floor's three included");
        // Ten seconds on, the old ones no longer count: only the floor again.
        assert_eq!((0..10).filter(|_| budget.try_retry_at(117)).count(), FLOOR as usize);
    }
}
