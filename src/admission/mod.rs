//! Cache-aware admission: budgets charged only by requests that reach the origin.
//!
//! A route's `admission` gives a budget per client (`per_client`) and one for the route's
//! keys not stored (`new_keys`). Hits, stale serves and coalesced waiters are never
//! charged, so a client can only be refused for what it makes the origin do. Budgets are
//! counted in the pool's Redis, shared by every replica: each replica takes tokens in
//! small blocks (one Redis call per block, and while a bucket is empty at most one call
//! until its next block is due), so an attack costs Redis a few calls per second per
//! client, not one per request. Without an answer from Redis (or without Redis) each
//! replica counts alone with budget / N, N the replicas it last saw.

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

/// What one bucket holds on this replica.
#[derive(Debug, Clone, Copy)]
struct Tokens {
    /// Counting alone (Redis unreachable, or no Redis): this replica's share.
    local: Gcra,
    /// Tokens taken from Redis and not spent yet, good until `leased_until`.
    leased: u32,
    leased_until: Instant,
    /// Redis said the bucket is empty until then: no call before.
    refused_until: Option<Instant>,
    /// Last charge (the oldest are forgotten first when the table is full).
    used: Instant,
}

impl Tokens {
    fn new(now: Instant) -> Tokens {
        Tokens { local: Gcra::FULL, leased: 0, leased_until: now, refused_until: None, used: now }
    }

    /// Whether forgetting this bucket changes nothing.
    fn is_idle(&self, now: Instant) -> bool {
        self.local.is_full(now) && (self.leased == 0 || self.leased_until <= now) && self.refused_until.is_none_or(|at| at <= now)
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
    /// request refused per client takes no new-key token.
    pub async fn charge(&self, shared: Option<&SharedTier>, client: Option<(&ClientSource, IpAddr)>, new_key: Option<u128>) -> Result<(), Refusal> {
        if let (Some(budget), Some((source, peer))) = (self.config.per_client, client) {
            let who = source.identify(&self.config.client, peer, &self.trusted_proxies);
            let name = || format!("{}:c:{who}", self.route);
            self.take(&self.clients, &who, name, budget, shared).await.map_err(|retry_after| Refusal { budget: Budgets::Client, retry_after })?;
        }
        if let (Some(budget), Some(hash)) = (self.config.new_keys, new_key)
            && self.first_in_window(hash)
        {
            let name = || format!("{}:new", self.route);
            if let Err(retry_after) = self.take(&self.new_keys, "", name, budget, shared).await {
                self.forget_key(hash);
                return Err(Refusal { budget: Budgets::NewKeys, retry_after });
            }
        }
        Ok(())
    }

    /// Whether `hash` was not charged as a new key in the last second (and marks it).
    fn first_in_window(&self, hash: u128) -> bool {
        let now = Instant::now();
        let mut recent = self.recent_keys.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= MAX_TRACKED {
            recent.retain(|_, at| now.duration_since(*at) < NEW_KEY_WINDOW);
            if recent.len() >= MAX_TRACKED {
                recent.clear();
            }
        }
        match recent.get(&hash) {
            Some(at) if now.duration_since(*at) < NEW_KEY_WINDOW => false,
            _ => {
                recent.insert(hash, now);
                true
            }
        }
    }

    fn forget_key(&self, hash: u128) {
        self.recent_keys.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
    }

    /// The replicas sharing a budget when each counts alone.
    fn share(&self) -> u32 {
        u32::try_from(self.replicas.load(Ordering::Relaxed)).unwrap_or(u32::MAX).max(1)
    }

    /// Takes one token of `budget` from bucket `key` of `table` (`name()` in Redis, made
    /// only when Redis is asked).
    ///
    /// From Redis a replica takes a block of tokens and spends it locally. A block is
    /// small enough that every replica sharing the budget gets one from a full bucket,
    /// and no more than refills in a second: a lease is good for as long as its tokens
    /// took to refill, so a replica never holds a burst earned long ago. When Redis says
    /// the bucket is empty, this replica asks again only once a block could be free.
    async fn take(&self, table: &Table, key: &str, name: impl FnOnce() -> String, budget: Budget, shared: Option<&SharedTier>) -> Result<(), Duration> {
        let interval = budget.rate.per.div_f64(budget.rate.count as f64).max(Duration::from_nanos(1));
        let share = self.share();
        let now = Instant::now();
        if let Some(shared) = shared {
            let leased = table.with(key, now, |t| {
                if t.leased > 0 && t.leased_until > now {
                    t.leased -= 1;
                    return Some(Ok(()));
                }
                t.refused_until.filter(|at| *at > now).map(|at| Err(at - now))
            });
            if let Some(answer) = leased {
                return answer;
            }
            let per_second = u32::try_from(Duration::from_secs(1).as_nanos() / interval.as_nanos()).unwrap_or(u32::MAX);
            let block = (budget.burst / share.saturating_mul(2)).min(per_second).clamp(1, self.config.lease_block);
            match shared.take_tokens(&name(), interval, budget.burst, block).await {
                Some(Ok(granted)) => {
                    let now = Instant::now();
                    let until = now + (interval * granted).max(MIN_LEASE);
                    table.with(key, now, |t| {
                        // Another request's grant may have landed meanwhile: add to it.
                        if t.leased_until > now {
                            t.leased += granted - 1;
                        } else {
                            t.leased = granted - 1;
                        }
                        t.leased_until = t.leased_until.max(until);
                        t.refused_until = None;
                    });
                    return Ok(());
                }
                Some(Err(wait)) => {
                    let now = Instant::now();
                    let retry = now + wait + interval * (block - 1);
                    table.with(key, now, |t| t.refused_until = Some(retry));
                    return Err(wait);
                }
                // Redis did not answer: this replica's share, counted here.
                None => {}
            }
        }
        let burst = budget.burst.div_ceil(share);
        table.with(key, Instant::now(), |t| t.local.take(Instant::now(), interval * share, burst))
    }
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

    fn peer(last: u8) -> IpAddr {
        IpAddr::from([203, 0, 113, last])
    }

    #[tokio::test]
    async fn a_client_gets_its_burst_then_is_refused_while_others_are_not() {
        let admission = admission(Some((10, 5)), None);
        let source = ClientSource::default();
        for _ in 0..5 {
            assert_eq!(admission.charge(None, Some((&source, peer(1))), None).await, Ok(()));
        }
        let refused = admission.charge(None, Some((&source, peer(1))), None).await.expect_err("over budget");
        assert_eq!((refused.budget, refused.retry_after_secs()), (Budgets::Client, 1));
        assert_eq!(admission.charge(None, Some((&source, peer(2))), None).await, Ok(()), "another client has its own budget");
    }

    #[tokio::test]
    async fn a_request_refused_per_client_takes_no_new_key_token() {
        let admission = admission(Some((1, 1)), Some((1, 2)));
        let source = ClientSource::default();
        assert_eq!(admission.charge(None, Some((&source, peer(1))), Some(1)).await, Ok(()));
        let refused = admission.charge(None, Some((&source, peer(1))), Some(2)).await.expect_err("client over budget");
        assert_eq!(refused.budget, Budgets::Client);
        // The refused request took none of the two new-key tokens: one is left for key 2
        // asked by another client, and none for a third key.
        assert_eq!(admission.charge(None, Some((&source, peer(2))), Some(2)).await, Ok(()), "a new-key token was spent by a refused request");
        let refused = admission.charge(None, Some((&source, peer(3))), Some(3)).await.expect_err("new keys over budget");
        assert_eq!(refused.budget, Budgets::NewKeys);
        // The same key again within a second is not a new key.
        assert_eq!(admission.charge(None, None, Some(1)).await, Ok(()));
    }

    #[tokio::test]
    async fn each_replica_counts_its_share_when_alone() {
        let admission = admission(Some((30, 30)), None);
        admission.replicas.store(3, Ordering::Relaxed);
        let source = ClientSource::default();
        let mut admitted = 0;
        for _ in 0..30 {
            if admission.charge(None, Some((&source, peer(1))), None).await.is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10, "budget / 3 replicas");
    }
}
