//! Cache-aware admission: budgets charged only by requests that reach the origin.
//!
//! A route's `admission` gives a budget per client (`per_client`) and one for the route's
//! keys not stored (`new_keys`). Hits, stale serves and coalesced waiters are never
//! charged, so a client can only be refused for what it makes the origin do. Budgets are
//! counted in the pool's Redis, shared by every replica: each replica takes tokens in
//! small blocks (one Redis call per block, and while a bucket is empty at most one call
//! until its next block is due), so an attack costs Redis a few calls per second per
//! client, not one per request. No request waits for Redis: the next block is asked for
//! in the background as the last one runs out, and meanwhile this replica's share decides
//! on credit, paid back from the block. Without an answer from Redis (or without Redis)
//! each replica counts alone with budget / N, N the replicas it last saw; that share is
//! debited for every token spent, so a Redis that comes and goes gives no extra burst.

mod bucket;
pub mod client;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bucket::Gcra;
pub use client::ClientSource;

use crate::cache::shared::SharedTier;
use crate::config::{AdmissionConfig, Budget, Cidr};

/// Most buckets kept per route for the clients (and keys) seen recently; past it, the
/// refilled ones are forgotten, then the oldest, down to [`LOW_WATER`] (so a wide attack
/// pays for one sweep per quarter of the table, not one per new client).
const MAX_TRACKED: usize = 65_536;
const LOW_WATER: usize = MAX_TRACKED / 4 * 3;
/// The shortest a block of leased tokens is good for, however fast the budget refills.
const MIN_LEASE: Duration = Duration::from_millis(50);
/// How long a key not stored counts as the same new key.
const NEW_KEY_WINDOW: Duration = Duration::from_secs(1);

/// Which budget refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budgets {
    Client,
    NewKeys,
}

impl Budgets {
    /// Its `reason` label's index in [`crate::metrics::ADMISSION_REASONS`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A refused request: which budget, and how long until it has a token again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub budget: Budgets,
    pub retry_after: Duration,
}

impl Refusal {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// What a charge may do with the pool's Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The pool has no Redis: each replica counts alone, for good.
    Absent,
    /// The pool's Redis breaker is open: each replica counts alone, and what it spends is
    /// owed to the shared bucket when Redis answers again.
    Down,
    /// Redis may be asked.
    Up,
}

/// How one budget is counted on this replica.
#[derive(Debug, Clone, Copy)]
struct Rates {
    /// One token refills every `interval` in the fleet's bucket, which holds `burst`.
    interval: Duration,
    burst: u32,
    /// The replicas sharing the budget when each counts alone.
    share: u32,
    /// Tokens taken from Redis in one call.
    block: u32,
}

impl Rates {
    fn new(budget: Budget, share: u32, lease_block: u32) -> Rates {
        let interval = budget.rate.per.div_f64(budget.rate.count as f64).max(Duration::from_nanos(1));
        let per_second = u32::try_from(Duration::from_secs(1).as_nanos() / interval.as_nanos()).unwrap_or(u32::MAX);
        // Small enough that every replica gets a block from a full bucket, and no more
        // than refills in a second (a lease never holds a burst earned long ago).
        let block = (budget.burst / share.saturating_mul(2)).min(per_second).clamp(1, lease_block.max(1));
        Rates { interval, burst: budget.burst, share, block }
    }

    /// This replica's share: budget / N.
    fn take_local(&self, bucket: &mut Gcra, now: Instant) -> Result<(), Duration> {
        bucket.take(now, self.interval * self.share, self.local_burst())
    }

    fn charge_local(&self, bucket: &mut Gcra, now: Instant) -> bool {
        bucket.charge(now, self.interval * self.share, self.local_burst())
    }

    fn local_burst(&self) -> u32 {
        self.burst.div_ceil(self.share)
    }
}

/// Where a token came from, to give it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// From a block leased from Redis; `debited`: the local share had a token to debit.
    Leased { debited: bool },
    /// From this replica's share, on credit while Redis is asked for a block.
    Credit,
    /// From this replica's share while Redis is down, owed to the shared bucket.
    Owed,
    /// From this replica's share, counting alone (no Redis).
    Alone,
}

/// A refusal while a block is being asked for: this replica's share is spent, and the
/// block is due in about a round trip.
const ASKING_WAIT: Duration = Duration::from_secs(1);
/// How long a replica counts alone after Redis gave no answer for a bucket (an error
/// reply, a missed deadline) before asking it again.
const NO_ANSWER_BACKOFF: Duration = Duration::from_millis(500);

/// What one bucket holds on this replica.
#[derive(Debug, Clone, Copy)]
struct Tokens {
    /// This replica's share of the budget, debited for every token it spends, leased or
    /// not: it decides alone while Redis is out of reach and on credit while Redis is
    /// asked.
    local: Gcra,
    /// Tokens taken from Redis and not spent yet, good until `leased_until`.
    leased: u32,
    leased_until: Instant,
    /// Redis said the bucket is empty: no token here, and no call, until a block is free.
    refused_until: Option<Instant>,
    /// Redis gave no answer: counted alone, and not asked, until then.
    down_until: Option<Instant>,
    /// A call to Redis for this bucket is under way.
    asking: bool,
    /// Tokens spent without Redis (on credit, or while it was down), taken from the
    /// shared bucket with the next block: a Redis that comes and goes gives no fresh
    /// burst. At most this replica's share of the burst.
    owed: u32,
    /// Last charge (the oldest are forgotten first when the table is full).
    used: Instant,
}

impl Tokens {
    fn new(now: Instant) -> Tokens {
        Tokens { local: Gcra::FULL, leased: 0, leased_until: now, refused_until: None, down_until: None, asking: false, owed: 0, used: now }
    }

    /// Whether forgetting this bucket changes nothing.
    fn is_idle(&self, now: Instant) -> bool {
        self.local.is_full(now)
            && !self.asking
            && self.owed == 0
            && (self.leased == 0 || self.leased_until <= now)
            && self.refused_until.is_none_or(|at| at <= now)
    }

    /// Takes one token.
    fn take(&mut self, now: Instant, rates: &Rates, link: Link) -> Result<Taken, Duration> {
        let link = match link {
            Link::Up if self.down_until.is_some_and(|at| at > now) => Link::Down,
            link => link,
        };
        match link {
            Link::Absent => {
                rates.take_local(&mut self.local, now)?;
                Ok(Taken::Alone)
            }
            Link::Down => {
                rates.take_local(&mut self.local, now)?;
                self.owed = (self.owed + 1).min(rates.local_burst());
                Ok(Taken::Owed)
            }
            Link::Up => {
                if let Some(at) = self.refused_until.filter(|at| *at > now) {
                    return Err(at - now);
                }
                if self.leased > 0 && self.leased_until > now {
                    self.leased -= 1;
                    let debited = rates.charge_local(&mut self.local, now);
                    return Ok(Taken::Leased { debited });
                }
                // No block at hand: one is asked for (see `wants_block`), and meanwhile
                // this replica's share decides, paid back from the block (a client's
                // parallel misses are not refused for a Redis round trip). What is lent
                // stays owed until Redis grants it, at most the share's burst.
                if self.owed >= rates.local_burst() {
                    return Err(rates.interval.min(ASKING_WAIT));
                }
                rates.take_local(&mut self.local, now).map_err(|wait| wait.min(ASKING_WAIT))?;
                self.owed += 1;
                Ok(Taken::Credit)
            }
        }
    }

    /// Whether [`Tokens::take`] would give a token, taking none.
    fn peek(&self, now: Instant, rates: &Rates, link: Link) -> Result<(), Duration> {
        let mut copy = *self;
        copy.take(now, rates, link).map(drop)
    }

    fn give_back(&mut self, now: Instant, taken: Taken, rates: &Rates) {
        let refund = match taken {
            Taken::Leased { debited } => {
                self.leased += 1;
                debited
            }
            Taken::Credit | Taken::Owed => {
                self.owed = self.owed.saturating_sub(1);
                true
            }
            Taken::Alone => true,
        };
        if refund {
            self.local.give_back(now, rates.interval * rates.share);
        }
    }

    /// Whether to ask Redis for a block now: none is at hand, none is being asked for,
    /// and Redis neither said the bucket is empty nor failed to answer lately.
    fn wants_block(&mut self, now: Instant) -> bool {
        let held = self.leased > 0 && self.leased_until > now;
        let later = |at: Option<Instant>| at.is_some_and(|at| at > now);
        if self.asking || held || later(self.refused_until) || later(self.down_until) {
            return false;
        }
        self.asking = true;
        true
    }

    /// Redis's answer to [`Tokens::wants_block`]'s call.
    fn answered(&mut self, now: Instant, answer: Option<Result<u32, Duration>>, rates: &Rates) {
        self.asking = false;
        match answer {
            Some(Ok(granted)) => {
                let paid = granted.min(self.owed);
                self.owed -= paid;
                let until = now + (rates.interval * granted).max(MIN_LEASE);
                self.leased = if self.leased_until > now { self.leased + granted - paid } else { granted - paid };
                self.leased_until = self.leased_until.max(until);
                self.refused_until = None;
                self.down_until = None;
            }
            // Asked again only once a whole block is free: the refusal's `Retry-After` is
            // when this replica admits again.
            Some(Err(wait)) => {
                self.refused_until = Some(now + wait + rates.interval * (rates.block - 1));
                self.down_until = None;
            }
            // No answer: counted alone for a while, what was lent still owed.
            None => {
                self.down_until = Some(now + NO_ANSWER_BACKOFF);
                self.owed = self.owed.min(rates.local_burst());
            }
        }
    }
}

/// Buckets by name, bounded.
#[derive(Default)]
struct Table {
    buckets: Mutex<HashMap<String, Tokens>>,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Tokens>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on bucket `name` (made if new).
    fn with<T>(&self, name: &str, now: Instant, f: impl FnOnce(&mut Tokens) -> T) -> T {
        let mut buckets = self.lock();
        if !buckets.contains_key(name) && buckets.len() >= MAX_TRACKED {
            buckets.retain(|_, t| !t.is_idle(now));
            if buckets.len() > LOW_WATER {
                // Most buckets are busy (a wide attack): the least recently used go.
                let mut used: Vec<Instant> = buckets.values().map(|t| t.used).collect();
                let excess = used.len() - LOW_WATER;
                let (_, cut, _) = used.select_nth_unstable(excess);
                let cut = *cut;
                buckets.retain(|_, t| t.used >= cut);
            }
        }
        let tokens = buckets.entry(name.to_owned()).or_insert_with(|| Tokens::new(now));
        tokens.used = now;
        f(tokens)
    }

    /// Takes a token from bucket `name`, and says how many tokens to ask Redis for now
    /// (a block and what is owed), if any: asked even when this take is refused, so a
    /// replica whose share is spent still gets the fleet's blocks.
    fn take(&self, name: &str, now: Instant, rates: &Rates, link: Link) -> (Result<Taken, Duration>, Option<u32>) {
        self.with(name, now, |t| {
            let taken = t.take(now, rates, link);
            let ask = (link == Link::Up && t.wants_block(now)).then(|| rates.block.saturating_add(t.owed));
            (taken, ask)
        })
    }

    /// [`Tokens::peek`] on bucket `name` (a bucket not made yet is full).
    fn peek(&self, name: &str, now: Instant, rates: &Rates, link: Link) -> Result<(), Duration> {
        self.lock().get(name).map_or(Ok(()), |t| t.peek(now, rates, link))
    }
}

/// A route's admission state, kept through reloads that leave its `admission` alone.
pub struct Admission {
    pub config: AdmissionConfig,
    /// The route's name, in the Redis bucket names.
    route: String,
    clients: Table,
    new_keys: Table,
    /// Keys not stored charged in the last [`NEW_KEY_WINDOW`], by hash.
    recent_keys: Mutex<HashMap<u128, Instant>>,
    /// Replicas alive in the control Redis, this one included (0: not known).
    replicas: Arc<AtomicUsize>,
    /// `[server] trusted_proxies`, for finding the client.
    pub trusted_proxies: Vec<Cidr>,
}

impl Admission {
    pub fn new(route: &str, config: AdmissionConfig, replicas: Arc<AtomicUsize>, trusted_proxies: Vec<Cidr>) -> Admission {
        Admission {
            config,
            route: route.to_owned(),
            clients: Table::default(),
            new_keys: Table::default(),
            recent_keys: Mutex::default(),
            replicas,
            trusted_proxies,
        }
    }

    /// Whether requests of `method` are charged per client.
    pub fn charges(&self, method: &http::Method) -> bool {
        self.config.per_client.is_some() && self.config.methods.contains(method)
    }

    /// Charges one origin request: to its client when `client` is given (the caller
    /// checked [`Admission::charges`]), and to the route's new keys when `new_key` (the
    /// hash of a key not stored) is given and was not charged in the last second. A
    /// request refused per client takes no new-key token, and one refused for new keys
    /// gives its client's token back.
    ///
    /// Decided here without waiting for Redis: the blocks of tokens to ask Redis for are
    /// returned too (refused or not), for [`Admission::ask`] to take off the request's
    /// path.
    pub fn charge(&self, link: Link, client: Option<(&ClientSource, IpAddr)>, new_key: Option<u128>) -> (Result<(), Refusal>, Asks) {
        let now = Instant::now();
        let mut asks = Asks::default();
        let mut charged = None;
        if let (Some(budget), Some((source, peer))) = (self.config.per_client, client) {
            let who = source.identify(&self.config.client, peer, &self.trusted_proxies);
            let rates = self.rates(budget);
            let (taken, want) = self.clients.take(who, now, &rates, link);
            if let Some(want) = want {
                asks.0.push(Ask { budget: Budgets::Client, key: who.to_owned(), rates, want });
            }
            match taken {
                Ok(taken) => charged = Some((taken, rates, who)),
                Err(retry_after) => return (Err(Refusal { budget: Budgets::Client, retry_after }), asks),
            }
        }
        if let (Some(budget), Some(hash)) = (self.config.new_keys, new_key)
            && self.first_in_window(hash, true)
        {
            let rates = self.rates(budget);
            let (taken, want) = self.new_keys.take("", now, &rates, link);
            if let Some(want) = want {
                asks.0.push(Ask { budget: Budgets::NewKeys, key: String::new(), rates, want });
            }
            if let Err(retry_after) = taken {
                self.forget_key(hash);
                if let Some((taken, rates, who)) = charged {
                    self.clients.with(who, now, |t| t.give_back(now, taken, &rates));
                }
                return (Err(Refusal { budget: Budgets::NewKeys, retry_after }), asks);
            }
        }
        (Ok(()), asks)
    }

    /// Whether [`Admission::charge`] would refuse the request, spending nothing.
    pub fn check(&self, link: Link, client: Option<(&ClientSource, IpAddr)>, new_key: Option<u128>) -> Result<(), Refusal> {
        let now = Instant::now();
        if let (Some(budget), Some((source, peer))) = (self.config.per_client, client) {
            let who = source.identify(&self.config.client, peer, &self.trusted_proxies);
            self.clients.peek(who, now, &self.rates(budget), link).map_err(|retry_after| Refusal { budget: Budgets::Client, retry_after })?;
        }
        if let (Some(budget), Some(hash)) = (self.config.new_keys, new_key)
            && self.first_in_window(hash, false)
        {
            self.new_keys.peek("", now, &self.rates(budget), link).map_err(|retry_after| Refusal { budget: Budgets::NewKeys, retry_after })?;
        }
        Ok(())
    }

    /// Takes the blocks a charge asked for from the pool's Redis (one call each).
    pub async fn ask(&self, shared: &SharedTier, asks: Asks) {
        for ask in asks.0 {
            let (table, name) = match ask.budget {
                Budgets::Client => (&self.clients, format!("{}:c:{}", self.route, ask.key)),
                Budgets::NewKeys => (&self.new_keys, format!("{}:new", self.route)),
            };
            let answer = shared.take_tokens(&name, ask.rates.interval, ask.rates.burst, ask.want).await;
            let now = Instant::now();
            table.with(&ask.key, now, |t| t.answered(now, answer, &ask.rates));
        }
    }

    fn rates(&self, budget: Budget) -> Rates {
        Rates::new(budget, self.share(), self.config.lease_block)
    }

    /// Whether `hash` was not charged as a new key in the last second (and, with `mark`,
    /// marks it).
    fn first_in_window(&self, hash: u128, mark: bool) -> bool {
        let now = Instant::now();
        let mut recent = self.recent_keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = recent.get(&hash)
            && now.duration_since(*at) < NEW_KEY_WINDOW
        {
            return false;
        }
        if mark {
            if recent.len() >= MAX_TRACKED {
                recent.retain(|_, at| now.duration_since(*at) < NEW_KEY_WINDOW);
                if recent.len() >= MAX_TRACKED {
                    recent.clear();
                }
            }
            recent.insert(hash, now);
        }
        true
    }

    fn forget_key(&self, hash: u128) {
        self.recent_keys.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
    }

    /// The replicas sharing a budget when each counts alone.
    fn share(&self) -> u32 {
        u32::try_from(self.replicas.load(Ordering::Relaxed)).unwrap_or(u32::MAX).max(1)
    }
}

/// Blocks of tokens a charge left to ask the pool's Redis for.
#[derive(Debug, Default)]
pub struct Asks(Vec<Ask>);

impl Asks {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One block to ask for: of which budget, for which bucket, how many tokens.
#[derive(Debug)]
struct Ask {
    budget: Budgets,
    key: String,
    rates: Rates,
    want: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientBy, units::Rate};

    fn admission(per_client: Option<(u64, u32)>, new_keys: Option<(u64, u32)>) -> Admission {
        let budget = |(count, burst)| Budget { rate: Rate { count, per: Duration::from_secs(1) }, burst };
        let config = AdmissionConfig {
            per_client: per_client.map(budget),
            new_keys: new_keys.map(budget),
            client: ClientBy::Peer,
            methods: vec![http::Method::GET, http::Method::HEAD],
            lease_block: crate::config::DEFAULT_LEASE_BLOCK,
        };
        Admission::new("r", config, Arc::new(AtomicUsize::new(0)), Vec::new())
    }

    /// A charge without Redis.
    fn charge(admission: &Admission, client: Option<(&ClientSource, IpAddr)>, new_key: Option<u128>) -> Result<(), Refusal> {
        let (result, asks) = admission.charge(Link::Absent, client, new_key);
        assert!(asks.is_empty(), "Redis asked without Redis");
        result
    }

    fn peer(last: u8) -> IpAddr {
        IpAddr::from([203, 0, 113, last])
    }

    #[test]
    fn a_client_gets_its_burst_then_is_refused_while_others_are_not() {
        let admission = admission(Some((10, 5)), None);
        for _ in 0..5 {
            assert_eq!(charge(&admission, Some((&ClientSource::default(), peer(1))), None), Ok(()));
        }
        let refused = charge(&admission, Some((&ClientSource::default(), peer(1))), None).expect_err("over budget");
        assert_eq!((refused.budget, refused.retry_after_secs()), (Budgets::Client, 1));
        assert_eq!(charge(&admission, Some((&ClientSource::default(), peer(2))), None), Ok(()), "another client has its own budget");
    }

    #[test]
    fn a_request_refused_per_client_takes_no_new_key_token() {
        let admission = admission(Some((1, 1)), Some((1, 2)));
        assert_eq!(charge(&admission, Some((&ClientSource::default(), peer(1))), Some(1)), Ok(()));
        let refused = charge(&admission, Some((&ClientSource::default(), peer(1))), Some(2)).expect_err("client over budget");
        assert_eq!(refused.budget, Budgets::Client);
        // The refused request took none of the two new-key tokens: one is left for key 2
        // asked by another client, and none for a third key.
        assert_eq!(charge(&admission, Some((&ClientSource::default(), peer(2))), Some(2)), Ok(()), "a new-key token was spent by a refused request");
        let refused = charge(&admission, Some((&ClientSource::default(), peer(3))), Some(3)).expect_err("new keys over budget");
        assert_eq!(refused.budget, Budgets::NewKeys);
        // The same key again within a second is not a new key.
        assert_eq!(charge(&admission, None, Some(1)), Ok(()));
    }

    #[test]
    fn each_replica_counts_its_share_when_alone() {
        let admission = admission(Some((30, 30)), None);
        admission.replicas.store(3, Ordering::Relaxed);
        let mut admitted = 0;
        for _ in 0..30 {
            if charge(&admission, Some((&ClientSource::default(), peer(1))), None).is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10, "budget / 3 replicas");
    }

    #[test]
    fn a_request_refused_for_new_keys_gives_its_clients_token_back() {
        let admission = admission(Some((1, 1)), Some((1, 1)));
        assert_eq!(charge(&admission, Some((&ClientSource::default(), peer(1))), Some(1)), Ok(()), "the one new-key token");
        let refused = charge(&admission, Some((&ClientSource::default(), peer(2))), Some(2)).expect_err("new keys over budget");
        assert_eq!(refused.budget, Budgets::NewKeys);
        // Client 2 was refused for the route's budget, not its own: its token is still there.
        assert_eq!(charge(&admission, Some((&ClientSource::default(), peer(2))), None), Ok(()), "a refused request spent its client's token");
    }

    #[test]
    fn a_check_spends_nothing() {
        let admission = admission(Some((1, 1)), Some((1, 1)));
        for _ in 0..5 {
            assert_eq!(admission.check(Link::Absent, Some((&ClientSource::default(), peer(1))), Some(1)), Ok(()));
        }
        assert_eq!(charge(&admission, Some((&ClientSource::default(), peer(1))), Some(1)), Ok(()));
        assert_eq!(admission.check(Link::Absent, Some((&ClientSource::default(), peer(1))), Some(2)).map_err(|r| r.budget), Err(Budgets::Client));
        assert_eq!(admission.check(Link::Absent, Some((&ClientSource::default(), peer(2))), Some(2)).map_err(|r| r.budget), Err(Budgets::NewKeys));
        assert_eq!(admission.check(Link::Absent, Some((&ClientSource::default(), peer(2))), Some(1)), Ok(()), "a key charged this second is not new");
    }

    fn rates(count: u64, burst: u32, share: u32) -> Rates {
        Rates::new(Budget { rate: Rate { count, per: Duration::from_secs(1) }, burst }, share, crate::config::DEFAULT_LEASE_BLOCK)
    }

    #[test]
    fn tokens_spent_on_credit_are_paid_from_the_next_block() {
        let rates = rates(20, 20, 1);
        assert_eq!(rates.block, 10);
        let now = Instant::now();
        let mut tokens = Tokens::new(now);
        assert_eq!(tokens.take(now, &rates, Link::Up), Ok(Taken::Credit), "no block yet: the replica's share decides");
        assert!(tokens.wants_block(now));
        assert_eq!(tokens.take(now, &rates, Link::Up), Ok(Taken::Credit));
        assert!(!tokens.wants_block(now), "one call at a time");
        tokens.answered(now, Some(Ok(10)), &rates);
        for _ in 0..8 {
            assert!(matches!(tokens.take(now, &rates, Link::Up), Ok(Taken::Leased { .. })));
        }
        assert_eq!(tokens.take(now, &rates, Link::Up), Ok(Taken::Credit), "the block of 10 paid for two credits and eight requests");
        assert!(tokens.wants_block(now));
        tokens.answered(now, Some(Err(Duration::from_millis(50))), &rates);
        let wait = tokens.take(now, &rates, Link::Up).expect_err("Redis says the bucket is empty");
        assert_eq!(wait, Duration::from_millis(50) + rates.interval * 9, "refused until a whole block is free");
        assert!(!tokens.wants_block(now), "no call before then");
        assert_eq!(tokens.owed, 1, "the credit is still owed");
    }

    // Guards against a replica lending more than its share before Redis answers: the
    // debt is at most the share's burst, and is paid from the next block.
    #[test]
    fn credit_is_at_most_the_replicas_share_while_redis_is_asked() {
        let rates = rates(30, 30, 3);
        let now = Instant::now();
        let mut tokens = Tokens::new(now);
        let lent = (0..30).filter(|_| tokens.take(now, &rates, Link::Up).is_ok()).count();
        assert_eq!((lent, tokens.owed), (10, 10));
        tokens.answered(now, Some(Ok(rates.block + 10)), &rates);
        assert_eq!((tokens.owed, tokens.leased), (0, rates.block), "the debt paid first");
    }

    // Guards against a client held to one replica (sticky sessions, an L4 balancer)
    // getting only this replica's share although Redis has tokens: with the share spent,
    // the replica still asks for blocks.
    #[test]
    fn a_spent_share_still_asks_redis_for_blocks() {
        let rates = rates(30, 30, 3);
        assert_eq!((rates.block, rates.local_burst()), (5, 10));
        let now = Instant::now();
        let mut tokens = Tokens::new(now);
        // The share spent, and owed to the shared bucket.
        for _ in 0..10 {
            tokens.take(now, &rates, Link::Down).expect("the share");
        }
        tokens.answered(now, Some(Ok(10)), &rates);
        assert_eq!(tokens.owed, 0);
        let mut admitted = 0;
        for _ in 0..6 {
            // Each round: the share is empty, so this one is refused, and a block asked for.
            assert!(tokens.take(now, &rates, Link::Up).is_err());
            assert!(tokens.wants_block(now), "no block asked for with the share spent");
            tokens.answered(now, Some(Ok(rates.block)), &rates);
            admitted += (0..rates.block).filter(|_| tokens.take(now, &rates, Link::Up).is_ok()).count();
        }
        assert_eq!(admitted, 30, "the fleet's blocks, not this replica's share of 10");
    }

    // Guards against a Redis that comes and goes doubling the budget: while Redis
    // answers, the replica's share is debited too, so when it stops answering the
    // replica does not start again from a full bucket; and what it spends while Redis is
    // down is taken from the shared bucket when Redis is back.
    #[test]
    fn a_redis_that_comes_and_goes_gives_no_fresh_burst() {
        let rates = rates(30, 30, 3);
        let now = Instant::now();
        let mut tokens = Tokens::new(now);
        let _ = tokens.take(now, &rates, Link::Up);
        assert!(tokens.wants_block(now));
        tokens.answered(now, Some(Ok(rates.block)), &rates);
        for _ in 1..rates.block {
            assert!(matches!(tokens.take(now, &rates, Link::Up), Ok(Taken::Leased { debited: true })));
        }
        // Five spent of a share of ten (burst 30 / 3): five left when counting alone,
        // each owed to the shared bucket.
        let alone = (0..10).filter(|_| tokens.take(now, &rates, Link::Down) == Ok(Taken::Owed)).count();
        assert_eq!((alone, tokens.owed), (5, 5));
        // Back: the next call asks for a block and what is owed, and pays the debt first.
        assert!(tokens.take(now, &rates, Link::Up).is_err(), "the share is spent: no credit");
        assert!(tokens.wants_block(now));
        tokens.answered(now, Some(Ok(rates.block + 5)), &rates);
        assert_eq!((tokens.owed, tokens.leased), (0, rates.block));
    }

    // Guards against a Redis that answers with errors (not a sick server: a script
    // error, NOPERM) getting one call per charge for good.
    #[test]
    fn no_answer_from_redis_means_counting_alone_for_a_while() {
        let rates = rates(20, 20, 1);
        let now = Instant::now();
        let mut tokens = Tokens::new(now);
        let _ = tokens.take(now, &rates, Link::Up);
        assert!(tokens.wants_block(now));
        tokens.answered(now, None, &rates);
        assert_eq!(tokens.take(now, &rates, Link::Up), Ok(Taken::Owed), "counted alone");
        assert!(!tokens.wants_block(now), "not asked again at once");
        let later = now + NO_ANSWER_BACKOFF;
        assert!(tokens.wants_block(later), "asked again after the back-off");
    }

    #[test]
    fn a_leased_token_given_back_refunds_only_what_it_debited() {
        let rates = rates(30, 30, 3);
        let now = Instant::now();
        let mut tokens = Tokens::new(now);
        // The share spent (10), then a lease whose tokens find nothing to debit.
        for _ in 0..10 {
            tokens.take(now, &rates, Link::Down).expect("the share");
        }
        tokens.answered(now, Some(Ok(20)), &rates);
        let taken = tokens.take(now, &rates, Link::Up).expect("leased");
        assert_eq!(taken, Taken::Leased { debited: false });
        tokens.give_back(now, taken, &rates);
        assert!(tokens.take(now, &rates, Link::Down).is_err(), "a refund of a token the share never gave");
    }

    // Guards against a bucket left "asking" for good when the charge that asked was
    // refused for another budget: the asks come back with the refusal.
    #[test]
    fn a_charge_refused_for_new_keys_still_hands_back_its_asks() {
        let admission = admission(Some((10, 10)), Some((1, 1)));
        let (first, _) = admission.charge(Link::Up, Some((&ClientSource::default(), peer(1))), Some(1));
        assert_eq!(first, Ok(()));
        admission.clients.with(ClientSource::default().identify(&admission.config.client, peer(2), &[]), Instant::now(), |t| assert!(!t.asking));
        let (refused, asks) = admission.charge(Link::Up, Some((&ClientSource::default(), peer(2))), Some(2));
        assert_eq!(refused.map_err(|r| r.budget), Err(Budgets::NewKeys));
        assert!(asks.0.iter().any(|ask| ask.budget == Budgets::Client), "the client's bucket asked, and its ask is dropped: {asks:?}");
    }
}
