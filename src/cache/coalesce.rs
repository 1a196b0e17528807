//! In-process request coalescing: one fetch per key at a time, however many requests
//! miss on it together.
//!
//! The first request for a key becomes the leader of a *flight*; later ones wait on the
//! flight's watch channel. A flight ends with a [`Fill`]. A waiter that waits too long
//! may [`Coalescer::take_over`] the flight: exactly one of them becomes the new leader,
//! the others wait on the new flight, so the herd never reaches the origin all at once.
//! Keys whose answer was not storable are remembered for a while (hit-for-miss) so
//! later requests skip the wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::StatusCode;
use tokio::sync::watch;

pub use super::hit_for_miss::HIT_FOR_MISS;
use super::hit_for_miss::HitForMiss;
pub use super::hit_for_miss::Remembered;
use super::purge::PurgeLog;
use crate::error::ProxyError;
use crate::origin::{Holder, Interest};
use crate::outcome::Outcome;

/// Takeovers allowed per key while flights keep timing out; after that waiters stay with
/// the current flight (bounded by the origin's timeouts), so a tiny `lock_timeout` cannot
/// turn into a stream of origin requests.
pub const MAX_TAKEOVERS: u32 = 3;

/// An origin answer shared with waiters as it is (a failure status with a small body).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
}

/// What a failed flight's waiters are answered with.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The origin's failure answer, small enough to share.
    Answer(Arc<Answer>),
    /// The origin answered with this failure status, too large to share.
    Status(StatusCode),
    /// No answer: the leader's error, cause and all.
    Error(Arc<ProxyError>),
}

impl Failure {
    /// Whether a stored copy may stand in for it (stale-if-error): origin answers and
    /// upstream errors, never an error of the client's or of bulwark's.
    pub fn allows_stale(&self) -> bool {
        match self {
            Failure::Answer(_) | Failure::Status(_) => true,
            Failure::Error(err) => err.allows_stale(),
        }
    }
}

/// A response whose body is still arriving: its readers share one copy.
pub struct Streaming {
    /// The entry as it will be stored, without its body.
    pub head: super::Stored,
    pub shared: Arc<crate::body::shared::Shared>,
    /// Why it is not stored, when its head said so (over `max_object_bytes`): its
    /// readers are `miss` with that reason, not `collapsed`.
    pub not_stored: Option<crate::outcome::NotStored>,
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming").field("key", &self.head.key.text).finish_non_exhaustive()
    }
}

/// How a flight ended (or, while its body streams, stands), as seen by its waiters.
#[derive(Debug, Clone)]
pub enum Fill {
    /// The response was stored: serve it (to waiters for the same variant).
    Stored(super::Stored),
    /// The response's head arrived: read its body as it arrives (the flight stays open
    /// until it is stored, or while a reader can still join a fill that is not stored).
    Streaming(Arc<Streaming>),
    /// The response may not be stored, for a reason in the response itself: each waiter
    /// asks the origin itself (and the key is remembered as hit-for-miss).
    Uncacheable,
    /// The answer was the leader's own (a 4xx, or one its `Cookie` or `Authorization`
    /// made unstorable): it goes to the leader only, and the waiters join a new fetch
    /// led by one of them. Nothing is remembered against the key.
    Personal,
    /// The origin could not give a storable answer: waiters get what the leader got
    /// (or a stale copy), with the leader's outcome, never `collapsed`.
    Failed { outcome: Outcome, failure: Failure },
    /// The leader went away without an answer: join again.
    Abandoned,
    /// The leader was refused by its admission budgets (its own client's, or the
    /// route's new keys): join again, and one waiter leads, charged to its own client.
    Refused,
}

impl Fill {
    /// The entry a stored or streaming fill serves (its body, for a streaming one, still
    /// arriving): what a waiter checks before taking it.
    pub fn head(&self) -> Option<&super::Stored> {
        match self {
            Fill::Stored(stored) => Some(stored),
            Fill::Streaming(streaming) => Some(&streaming.head),
            Fill::Uncacheable | Fill::Personal | Fill::Failed { .. } | Fill::Abandoned | Fill::Refused => None,
        }
    }
}

struct Flight {
    id: u64,
    /// Takeovers that led to this flight.
    generation: u32,
    tx: watch::Sender<Option<Fill>>,
    /// Held by the leader's request and each waiter: a fetch nobody wants leaves the
    /// origin's queue.
    interest: Interest,
    /// The pool's purge epoch when it started.
    epoch: u64,
}

/// Which part a request plays in a key's flight.
pub enum Join {
    Leader(FlightGuard),
    Waiter(Waiting),
}

/// A waiter's handle on a flight.
pub struct Waiting {
    pub flight_id: u64,
    rx: watch::Receiver<Option<Fill>>,
    _wants: Holder,
}

impl Waiting {
    /// The fill, if the flight has ended.
    pub fn ended(&self) -> Option<Fill> {
        self.rx.borrow().clone()
    }

    /// Waits up to `limit` for the flight to end.
    pub async fn wait(&mut self, limit: Duration) -> Option<Fill> {
        match tokio::time::timeout(limit, self.rx.wait_for(Option::is_some)).await {
            Ok(Ok(fill)) => fill.clone(),
            // The sender went away without a fill (cannot happen: the guard always
            // sends); join again.
            Ok(Err(_)) => Some(Fill::Abandoned),
            Err(_) => None,
        }
    }
}

/// The leader's obligation: end the flight with a fill (or `Abandoned` when dropped).
pub struct FlightGuard {
    coalescer: Arc<Coalescer>,
    key: u128,
    flight: Arc<Flight>,
    done: bool,
}

impl FlightGuard {
    /// Who wants this flight's answer; the leader's request holds it while it waits.
    pub fn interest(&self) -> &Interest {
        &self.flight.interest
    }

    pub fn complete(mut self, fill: Fill) {
        self.finish(fill);
    }

    /// Tells the waiters (and anyone who joins until the flight ends) how it stands,
    /// without ending it.
    pub fn publish(&self, fill: Fill) {
        self.flight.tx.send_replace(Some(fill));
    }

    fn finish(&mut self, fill: Fill) {
        self.done = true;
        {
            let mut flights = self.coalescer.lock();
            match flights.get(&self.key) {
                Some(current) if current.id == self.flight.id => {
                    flights.remove(&self.key);
                }
                // A takeover replaced this flight and its waiters moved there: a stored
                // answer serves them too, without waiting for the second fetch.
                Some(current) if matches!(fill, Fill::Stored(_)) => {
                    current.tx.send_replace(Some(fill.clone()));
                }
                _ => {}
            }
        }
        self.flight.tx.send_replace(Some(fill));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Fill::Abandoned);
        }
    }
}

pub struct Coalescer {
    /// Flights in progress by key hash. A std mutex: held for a map operation only,
    /// never across an await.
    flights: Mutex<HashMap<u128, Arc<Flight>>>,
    next_id: AtomicU64,
    /// Keys recently answered with something not storable.
    hit_for_miss: HitForMiss,
    /// The pool's purges: flights that started before one covering them are not joined.
    purges: Arc<PurgeLog>,
}

impl Coalescer {
    pub fn new(purges: Arc<PurgeLog>) -> Arc<Coalescer> {
        Arc::new(Coalescer { purges, flights: Mutex::new(HashMap::new()), next_id: AtomicU64::new(1), hit_for_miss: HitForMiss::default() })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u128, Arc<Flight>>> {
        self.flights.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lead(self: &Arc<Self>, flights: &mut HashMap<u128, Arc<Flight>>, key: u128, generation: u32) -> Join {
        let (tx, _) = watch::channel(None);
        let epoch = self.purges.epoch();
        let flight = Arc::new(Flight { id: self.next_id.fetch_add(1, Ordering::Relaxed), generation, tx, interest: Interest::default(), epoch });
        flights.insert(key, flight.clone());
        Join::Leader(FlightGuard { coalescer: self.clone(), key, flight, done: false })
    }

    fn wait_on(flight: &Flight) -> Join {
        Join::Waiter(Waiting { flight_id: flight.id, rx: flight.tx.subscribe(), _wants: flight.interest.hold() })
    }

    /// Leads a new flight for `key` (whose text is `text`), or waits on the one in
    /// progress, unless that one started before a purge that may cover it: then a new
    /// flight takes its place (its own answer will not be stored, see
    /// [`PurgeLog::covering_since`]).
    pub fn join(self: &Arc<Self>, key: u128, text: &str) -> Join {
        let mut flights = self.lock();
        match flights.get(&key) {
            Some(flight) if self.purges.covering_since(flight.epoch, text, None).is_none() => Self::wait_on(flight),
            _ => self.lead(&mut flights, key, 0),
        }
    }

    /// Leads a new flight only if none is in progress (a background refresh).
    pub fn try_lead(self: &Arc<Self>, key: u128) -> Option<FlightGuard> {
        let mut flights = self.lock();
        if flights.contains_key(&key) {
            return None;
        }
        match self.lead(&mut flights, key, 0) {
            Join::Leader(guard) => Some(guard),
            Join::Waiter(_) => None,
        }
    }

    /// After waiting too long on flight `stale_id`: the first caller replaces it and
    /// leads (at most [`MAX_TAKEOVERS`] times in a row); everyone else waits on whatever
    /// flight is current.
    pub fn take_over(self: &Arc<Self>, key: u128, stale_id: u64) -> Join {
        let mut flights = self.lock();
        match flights.get(&key) {
            Some(flight) if flight.id != stale_id || flight.generation >= MAX_TAKEOVERS => Self::wait_on(flight),
            Some(flight) => {
                let generation = flight.generation + 1;
                self.lead(&mut flights, key, generation)
            }
            None => self.lead(&mut flights, key, 0),
        }
    }

    /// What is remembered of `key`'s last answer not stored, if anything.
    pub fn remembered(&self, key: u128) -> Option<Remembered> {
        self.hit_for_miss.get(key)
    }

    pub fn remember(&self, key: u128, what: Remembered) {
        self.hit_for_miss.insert(key, what);
    }

    pub fn forget(&self, key: u128) {
        self.hit_for_miss.remove(key);
    }

    /// Whether a fill of `key` is in progress here (for inspection).
    pub fn is_filling(&self, key: u128) -> bool {
        self.lock().contains_key(&key)
    }

    /// Flights in progress (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_many_waiters_and_single_takeover() {
        let c = Coalescer::new(Arc::default());
        let Join::Leader(guard) = c.join(1, "k") else { panic!("first is leader") };
        let mut waiters: Vec<Waiting> = (0..10)
            .map(|_| match c.join(1, "k") {
                Join::Waiter(w) => w,
                Join::Leader(_) => panic!("only one leader"),
            })
            .collect();
        assert!(waiters[0].wait(Duration::from_millis(5)).await.is_none(), "times out while the leader works");
        // Every waiter tries to take over; exactly one leads.
        let stale_id = waiters[0].flight_id;
        let joins: Vec<Join> = (0..10).map(|_| c.take_over(1, stale_id)).collect();
        let leaders = joins.iter().filter(|j| matches!(j, Join::Leader(_))).count();
        assert_eq!(leaders, 1);
        guard.complete(Fill::Uncacheable);
        assert!(matches!(waiters[3].wait(Duration::from_millis(5)).await, Some(Fill::Uncacheable)));
        assert_eq!(c.in_flight(), 1, "the new leader's flight is still current");
        drop(joins);
        assert_eq!(c.in_flight(), 0, "a dropped guard ends its flight");
        waiters.clear();
    }

    #[tokio::test]
    async fn takeovers_are_bounded_and_a_late_fill_reaches_the_new_flight() {
        let c = Coalescer::new(Arc::default());
        let Join::Leader(first) = c.join(9, "k") else { panic!("leader") };
        let mut id = match c.join(9, "k") {
            Join::Waiter(w) => w.flight_id,
            Join::Leader(_) => panic!("waiter"),
        };
        let mut leaders = Vec::new();
        for _ in 0..10 {
            match c.take_over(9, id) {
                Join::Leader(guard) => {
                    id = guard.flight.id;
                    leaders.push(guard);
                }
                Join::Waiter(w) => id = w.flight_id,
            }
        }
        assert_eq!(leaders.len() as u32, MAX_TAKEOVERS);
        let Join::Waiter(mut late) = c.join(9, "k") else { panic!("waiter") };
        let entry = Arc::new(crate::cache::entry::tests::sample());
        let key = crate::cache::CacheKey::new("http", "h", "/", None, crate::cache::Encodings::IDENTITY);
        first.complete(Fill::Stored(crate::cache::Stored { key, entry, marker: None }));
        assert!(matches!(late.wait(Duration::from_millis(5)).await, Some(Fill::Stored(_))), "the first leader's fill serves the current flight");
    }

    #[tokio::test]
    async fn dropped_leader_abandons_and_try_lead_respects_flights() {
        let c = Coalescer::new(Arc::default());
        let guard = c.try_lead(7).expect("no flight yet");
        assert!(c.try_lead(7).is_none());
        let Join::Waiter(mut w) = c.join(7, "k") else { panic!("waiter") };
        drop(guard);
        assert!(matches!(w.wait(Duration::from_millis(5)).await, Some(Fill::Abandoned)));
        assert!(c.try_lead(7).is_some());
    }
}
