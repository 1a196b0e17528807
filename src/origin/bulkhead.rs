//! Per-origin concurrency limit with a bounded, time-limited, priority-ordered queue.
//!
//! At most `max_concurrency` requests are in flight; up to `max_queue` more wait for a
//! slot, and a freed slot goes to the oldest waiter of the highest priority. When the
//! queue is full, a newcomer takes the place of the newest waiter of a lower priority
//! (which is shed) or is shed itself; `low` requests may fill at most half the queue.
//! So when an origin is saturated, `low` routes are shed first and `critical` last.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

use crate::config::Priority;

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shed {
    #[error("origin queue is full")]
    QueueFull,
    #[error("no origin slot within the queue timeout")]
    QueueTimeout,
    #[error("displaced from the origin queue by a higher-priority request")]
    Displaced,
}

const PRIORITIES: usize = 3;

/// Who still wants the answer of a request (a request extension): a coalesced fetch
/// runs in its own task, so its leader's client and its waiters hold it, and when the
/// last of them is gone while the request waits for a slot, the request leaves the queue
/// unsent ([`crate::origin::OriginError::Unwanted`]). A request without one (a
/// background refresh) is always wanted.
#[derive(Clone, Default)]
pub struct Interest(Arc<InterestState>);

#[derive(Default)]
struct InterestState {
    holders: AtomicUsize,
    /// Wanted for good: no longer tied to any holder.
    kept: AtomicBool,
    gone: Notify,
}

/// One holder of an [`Interest`]; lets go when dropped.
pub struct Holder(Interest);

impl Interest {
    pub fn hold(&self) -> Holder {
        self.0.holders.fetch_add(1, Ordering::AcqRel);
        Holder(self.clone())
    }

    /// Resolves once nobody holds it, unless it is kept.
    pub async fn gone(&self) {
        loop {
            // Created before the check, so a release between the two is not missed.
            let released = self.0.gone.notified();
            // Holders first: `keep` marks before its holder lets go, so once the count is
            // seen at 0 a keep before it is seen too.
            if self.0.holders.load(Ordering::Acquire) == 0 {
                if self.0.kept.load(Ordering::Acquire) {
                    return std::future::pending().await;
                }
                return;
            }
            released.await;
        }
    }
}

impl Holder {
    /// Keeps the request wanted whoever lets go (a leader served a stale copy: its
    /// fetch goes on as a refresh).
    pub fn keep(self) {
        self.0.0.kept.store(true, Ordering::Release);
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.0.0.holders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.0.gone.notify_waiters();
        }
    }
}

fn rank(priority: Priority) -> usize {
    match priority {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::Critical => 2,
    }
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Slot>,
}

struct State {
    /// Free slots.
    available: usize,
    /// The limit in force (`max_concurrency`, or the fleet share).
    limit: usize,
    /// Slots to take back as they are freed (the limit was lowered below those in use).
    owed: usize,
    /// Waiters per priority rank, oldest first.
    queues: [VecDeque<Waiter>; PRIORITIES],
    waiting: usize,
    next_id: u64,
}

struct Shared {
    /// Behind one mutex because a release must atomically pick the best waiter across
    /// queues; critical sections are a few pointer moves, never held across an await.
    state: Mutex<State>,
    max_queue: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a way
        // that matters more than losing slots would; keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands a freed slot to the best waiter still waiting, or returns it to the pool.
    fn release(self: &Arc<Self>) {
        let mut state = self.lock();
        if state.owed > 0 {
            state.owed -= 1;
            return;
        }
        loop {
            let Some(waiter) = (0..PRIORITIES).rev().find_map(|p| state.queues[p].pop_front()) else {
                state.available += 1;
                return;
            };
            state.waiting -= 1;
            let slot = Slot { shared: Some(self.clone()) };
            match waiter.tx.send(slot) {
                Ok(()) => return,
                // The waiter gave up; its slot came back to us: forget it without
                // releasing (we are already inside release) and try the next one.
                Err(mut slot) => slot.shared = None,
            }
        }
    }
}

/// One request in flight; frees its slot when dropped.
pub struct Slot {
    shared: Option<Arc<Shared>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.release();
        }
    }
}

/// A waiter's place in the queue; removes it on drop if it is still there.
struct Queued<'a> {
    shared: &'a Shared,
    priority: usize,
    id: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let queue = &mut state.queues[self.priority];
        if let Some(pos) = queue.iter().position(|w| w.id == self.id) {
            queue.remove(pos);
            state.waiting -= 1;
        }
    }
}

pub struct Bulkhead {
    shared: Arc<Shared>,
    queue_timeout: Duration,
}

impl Bulkhead {
    pub fn new(max_concurrency: usize, max_queue: usize, queue_timeout: Duration) -> Bulkhead {
        let state = State { available: max_concurrency, limit: max_concurrency, owed: 0, queues: Default::default(), waiting: 0, next_id: 0 };
        Bulkhead { shared: Arc::new(Shared { state: Mutex::new(state), max_queue }), queue_timeout }
    }

    /// Waits for a slot; returns it with the time spent waiting.
    pub async fn acquire(&self, priority: Priority) -> Result<(Slot, Duration), Shed> {
        let start = Instant::now();
        let p = rank(priority);
        let (id, rx) = {
            let mut state = self.shared.lock();
            if state.available > 0 {
                state.available -= 1;
                return Ok((Slot { shared: Some(self.shared.clone()) }, Duration::ZERO));
            }
            let low_limit = (self.shared.max_queue / 2).max(1);
            if p == 0 && state.queues[0].len() >= low_limit {
                return Err(Shed::QueueFull);
            }
            if state.waiting >= self.shared.max_queue {
                // Displace the newest waiter of a lower priority, if any; dropping its
                // sender tells it it was shed.
                let victim = (0..p).find(|&lower| !state.queues[lower].is_empty());
                match victim {
                    Some(lower) => {
                        state.queues[lower].pop_back();
                        state.waiting -= 1;
                    }
                    None => return Err(Shed::QueueFull),
                }
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_id;
            state.next_id += 1;
            state.queues[p].push_back(Waiter { id, tx });
            state.waiting += 1;
            (id, rx)
        };
        // Leaves the queue however this wait ends: timeout, or the request being dropped
        // (client gone) while it waits, so dead waiters never count against `max_queue`.
        let _queued = Queued { shared: &self.shared, priority: p, id };
        match tokio::time::timeout(self.queue_timeout, rx).await {
            Ok(Ok(slot)) => Ok((slot, start.elapsed())),
            Ok(Err(_)) => Err(Shed::Displaced),
            // If a slot was sent just as the timer fired, it was dropped with the
            // receiver, and its drop handed it on.
            Err(_) => Err(Shed::QueueTimeout),
        }
    }

    /// Waits for a slot like [`Bulkhead::acquire`], giving up (`None`) when `interest`
    /// is gone first: nobody wants the answer any more.
    pub async fn acquire_while_wanted(&self, priority: Priority, interest: Option<&Interest>) -> Option<Result<(Slot, Duration), Shed>> {
        let Some(interest) = interest else { return Some(self.acquire(priority).await) };
        tokio::select! {
            biased;
            acquired = self.acquire(priority) => Some(acquired),
            () = interest.gone() => None,
        }
    }

    /// Changes the number of slots: a raised limit hands the new slots to waiters at
    /// once; a lowered one takes free slots back now and busy ones as they are freed.
    pub fn set_limit(&self, limit: usize) {
        let mut state = self.shared.lock();
        if limit >= state.limit {
            let mut grown = limit - state.limit;
            state.limit = limit;
            let paid = grown.min(state.owed);
            state.owed -= paid;
            grown -= paid;
            drop(state);
            for _ in 0..grown {
                self.shared.release();
            }
        } else {
            let shrunk = state.limit - limit;
            state.limit = limit;
            let taken = shrunk.min(state.available);
            state.available -= taken;
            state.owed += shrunk - taken;
        }
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.shared.lock().waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lowered_limit_takes_busy_slots_back_as_they_are_freed_and_a_raised_one_serves_waiters() {
        let bulkhead = Bulkhead::new(4, 8, Duration::from_secs(5));
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(bulkhead.acquire(Priority::Normal).await.expect("free slot").0);
        }
        bulkhead.set_limit(2);
        let refused = tokio::time::timeout(Duration::from_millis(50), bulkhead.acquire(Priority::Normal)).await;
        assert!(refused.is_err(), "a fourth request got a slot under a limit of 2");
        held.pop();
        held.pop();
        // One of the two freed slots was owed: one request may go now, not two.
        let (one, _) = bulkhead.acquire(Priority::Normal).await.expect("a slot");
        assert!(tokio::time::timeout(Duration::from_millis(50), bulkhead.acquire(Priority::Normal)).await.is_err());
        let waiter = tokio::spawn({
            let shared = bulkhead.shared.clone();
            async move {
                let bulkhead = Bulkhead { shared, queue_timeout: Duration::from_secs(5) };
                bulkhead.acquire(Priority::Normal).await.map(|(slot, _)| drop(slot))
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        bulkhead.set_limit(3);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("the waiter got the new slot").expect("task").expect("slot");
        drop(one);
    }

    #[tokio::test]
    async fn max_queue_zero_means_no_queue_at_all() {
        let bulkhead = Bulkhead::new(1, 0, Duration::from_secs(5));
        let (_held, _) = bulkhead.acquire(Priority::Normal).await.expect("free slot");
        for priority in [Priority::Low, Priority::Normal, Priority::Critical] {
            let refused = tokio::time::timeout(Duration::from_millis(100), bulkhead.acquire(priority)).await.expect("refused at once, not queued");
            assert_eq!(refused.err(), Some(Shed::QueueFull), "{priority:?}");
        }
        assert_eq!(bulkhead.waiting(), 0);
    }

    #[tokio::test]
    async fn slots_go_to_the_highest_priority_and_low_is_displaced() {
        let bulkhead = Arc::new(Bulkhead::new(1, 2, Duration::from_secs(5)));
        let (held, _) = bulkhead.acquire(Priority::Normal).await.expect("free slot");
        let spawn = |p| {
            let b = bulkhead.clone();
            tokio::spawn(async move { b.acquire(p).await.map(|(slot, _)| slot) })
        };
        let low = spawn(Priority::Low);
        tokio::task::yield_now().await;
        let normal = spawn(Priority::Normal);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(bulkhead.waiting(), 2);
        // Queue full: a critical request displaces the low one.
        let critical = spawn(Priority::Critical);
        assert_eq!(low.await.expect("task").err(), Some(Shed::Displaced));
        // And a further low one is refused at once.
        assert_eq!(bulkhead.acquire(Priority::Low).await.err(), Some(Shed::QueueFull));
        drop(held);
        let critical_slot = critical.await.expect("task").expect("critical gets the slot first");
        assert_eq!(bulkhead.waiting(), 1);
        drop(critical_slot);
        let normal_slot = normal.await.expect("task").expect("normal next");
        drop(normal_slot);
        assert_eq!(bulkhead.shared.lock().available, 1);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let bulkhead = Arc::new(Bulkhead::new(1, 1, Duration::from_secs(5)));
        let (held, _) = bulkhead.acquire(Priority::Normal).await.expect("free slot");
        let b = bulkhead.clone();
        let waiter = tokio::spawn(async move { b.acquire(Priority::Normal).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(bulkhead.waiting(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(bulkhead.waiting(), 0, "the aborted request must not keep its place");
        let b = bulkhead.clone();
        let next = tokio::spawn(async move { b.acquire(Priority::Normal).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(next.await.expect("task").is_ok(), "the queue still admits a waiter");
    }

    #[tokio::test]
    async fn a_queued_request_nobody_wants_leaves_the_queue_and_a_kept_one_stays() {
        let bulkhead = Arc::new(Bulkhead::new(1, 4, Duration::from_secs(5)));
        let (held, _) = bulkhead.acquire(Priority::Normal).await.expect("free slot");
        let queue = |interest: Interest| {
            let b = bulkhead.clone();
            tokio::spawn(async move { b.acquire_while_wanted(Priority::Normal, Some(&interest)).await.map(|acquired| acquired.is_ok()) })
        };
        let (abandoned, kept) = (Interest::default(), Interest::default());
        let (leader, waiter) = (abandoned.hold(), abandoned.hold());
        let first = queue(abandoned.clone());
        let keeper = kept.hold();
        let second = queue(kept.clone());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(bulkhead.waiting(), 2);
        drop(leader);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(bulkhead.waiting(), 2, "a waiter still wants it");
        drop(waiter);
        assert_eq!(first.await.expect("task"), None, "nobody wants it: it left the queue");
        assert_eq!(bulkhead.waiting(), 1);
        keeper.keep();
        drop(held);
        assert_eq!(second.await.expect("task"), Some(true), "kept: it got the slot");
    }

    #[tokio::test]
    async fn queue_timeout_sheds_and_returns_nothing_to_the_pool() {
        let bulkhead = Bulkhead::new(1, 4, Duration::from_millis(30));
        let (held, _) = bulkhead.acquire(Priority::Critical).await.expect("free slot");
        assert_eq!(bulkhead.acquire(Priority::Critical).await.err(), Some(Shed::QueueTimeout));
        assert_eq!(bulkhead.waiting(), 0);
        drop(held);
        assert_eq!(bulkhead.shared.lock().available, 1);
    }
}
