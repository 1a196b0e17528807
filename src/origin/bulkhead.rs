//! Per-origin concurrency limit with a bounded, time-limited queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shed {
    #[error("origin queue is full")]
    QueueFull,
    #[error("no origin slot within the queue timeout")]
    QueueTimeout,
}

pub struct Bulkhead {
    /// One permit per request in flight to the origin.
    slots: Arc<Semaphore>,
    /// Requests waiting for a slot. An atomic because it is only a bound check: a few
    /// requests racing past `max_queue` by one is harmless, a lock on this path is not.
    waiting: AtomicUsize,
    max_queue: usize,
    queue_timeout: Duration,
}

impl Bulkhead {
    pub fn new(max_concurrency: usize, max_queue: usize, queue_timeout: Duration) -> Bulkhead {
        Bulkhead { slots: Arc::new(Semaphore::new(max_concurrency)), waiting: AtomicUsize::new(0), max_queue, queue_timeout }
    }

    /// Waits for a slot; returns it with the time spent waiting.
    pub async fn acquire(&self) -> Result<(OwnedSemaphorePermit, Duration), Shed> {
        let start = Instant::now();
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok((permit, Duration::ZERO));
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Shed::QueueFull);
        }
        let result = tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match result {
            Ok(Ok(permit)) => Ok((permit, start.elapsed())),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => Err(Shed::QueueTimeout),
        }
    }
}
