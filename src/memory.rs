//! Memory bounded in bytes, not items: a budget that reservations draw from and give
//! back when dropped. Storable bodies being read from origins draw from the process's
//! `max_inflight_body_bytes`, pending Redis writes from their pool's
//! `redis_write_queue_bytes`; what finds the budget spent is streamed unstored, or not
//! written, rather than held.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A number of bytes that reservations share.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget { limit, used: AtomicUsize::new(0) })
    }

    /// An empty reservation, to grow as bytes arrive.
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation { budget: self.clone(), bytes: 0 }
    }

    /// A reservation of `bytes`, if the budget has them.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let mut reservation = self.reservation();
        reservation.grow(bytes).then_some(reservation)
    }

    /// A reservation of `bytes`, if it leaves at least half the budget for others: what
    /// a fill that is not stored may take, so stored fills always have the rest.
    pub fn reserve_from_half(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let half = self.limit / 2;
        let taken = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(bytes).filter(|total| *total <= half)).is_ok();
        taken.then(|| Reservation { budget: self.clone(), bytes })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn take(&self, bytes: usize) -> bool {
        self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(bytes).filter(|total| *total <= self.limit)).is_ok()
    }
}

/// Bytes drawn from a [`ByteBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl Reservation {
    /// Draws `more` bytes; false (and nothing drawn) when the budget does not have them.
    pub fn grow(&mut self, more: usize) -> bool {
        if !self.budget.take(more) {
            return false;
        }
        self.bytes += more;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_draw_up_to_the_limit_and_give_back_when_dropped() {
        let budget = ByteBudget::new(100);
        let mut first = budget.reserve(60).expect("60 of 100");
        assert!(budget.reserve(50).is_none(), "110 would exceed 100");
        assert!(!first.grow(41), "101 would exceed 100");
        assert!(first.grow(40));
        assert_eq!(budget.used(), 100);
        drop(first);
        assert_eq!(budget.used(), 0);
        let half = budget.reserve_from_half(50).expect("half of 100");
        assert!(budget.reserve_from_half(1).is_none(), "past half: refused");
        assert!(budget.reserve(50).is_some(), "the other half is for the rest");
        drop(half);
        assert!(budget.reserve(100).is_some());
        assert!(budget.reserve(usize::MAX).is_none(), "no overflow");
    }
}
