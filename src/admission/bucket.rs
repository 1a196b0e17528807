//! One token bucket as a generic cell rate algorithm: a single "theoretical arrival time"
//! per bucket, so a bucket that has refilled is the same as no bucket at all (and can be
//! forgotten).

use std::time::{Duration, Instant};

/// A token bucket refilling one token every `interval`, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    /// When the bucket is full again; `None`: full now.
    full_at: Option<Instant>,
}

impl Gcra {
    pub const FULL: Gcra = Gcra { full_at: None };

    /// Takes one token at `now`, or says how long until one is free.
    pub fn take(&mut self, now: Instant, interval: Duration, burst: u32) -> Result<(), Duration> {
        let full_at = self.full_at.filter(|at| *at > now).unwrap_or(now);
        // The bucket is short of (full_at - now) / interval tokens; one more must fit.
        let after = full_at + interval;
        let limit = now + interval * burst;
        if after > limit {
            return Err(after - limit);
        }
        self.full_at = Some(after);
        Ok(())
    }

    /// Records a token spent elsewhere (leased from Redis) at `now`: taken if there is
    /// one (true), else the bucket stays empty (a debt is never carried past one empty
    /// bucket).
    pub fn charge(&mut self, now: Instant, interval: Duration, burst: u32) -> bool {
        let full_at = self.full_at.filter(|at| *at > now).unwrap_or(now);
        let limit = now + interval * burst;
        self.full_at = Some((full_at + interval).min(limit));
        full_at + interval <= limit
    }

    /// Gives back a token [`Gcra::take`] gave at `now`.
    pub fn give_back(&mut self, now: Instant, interval: Duration) {
        self.full_at = self.full_at.and_then(|at| at.checked_sub(interval)).filter(|at| *at > now);
    }

    /// Whether the bucket is full at `now` (forgetting it changes nothing).
    pub fn is_full(&self, now: Instant) -> bool {
        self.full_at.is_none_or(|at| at <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_one_token_per_interval() {
        let start = Instant::now();
        let interval = Duration::from_millis(100);
        let mut bucket = Gcra::FULL;
        for _ in 0..5 {
            assert!(bucket.take(start, interval, 5).is_ok());
        }
        let wait = bucket.take(start, interval, 5).expect_err("burst spent");
        assert_eq!(wait, interval);
        assert!(bucket.take(start + Duration::from_millis(99), interval, 5).is_err());
        assert!(bucket.take(start + interval, interval, 5).is_ok());
        assert!(bucket.take(start + interval, interval, 5).is_err());
        assert!(!bucket.is_full(start + interval));
        assert!(bucket.is_full(start + interval * 6), "refilled: as good as forgotten");
    }

    #[test]
    fn tokens_spent_elsewhere_empty_the_bucket_but_leave_no_debt_beyond_it() {
        let start = Instant::now();
        let interval = Duration::from_millis(100);
        let mut bucket = Gcra::FULL;
        for spent in 0..50 {
            assert_eq!(bucket.charge(start, interval, 5), spent < 5, "a token debited while there is one");
        }
        assert_eq!(bucket.clone().take(start, interval, 5), Err(interval), "empty after its burst was spent elsewhere");
        bucket.take(start + interval, interval, 5).expect("one interval refills a token, whatever was spent beyond the burst");
        bucket.give_back(start + interval, interval);
        bucket.take(start + interval, interval, 5).expect("a token given back can be taken again");
    }
}
