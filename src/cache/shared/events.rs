//! The pool's event channel (Redis pub/sub) and per-key leases for coalescing misses
//! across replicas.
//!
//! A lease is `SET <prefix>v2:lease:<hash> <token> NX PX <ttl>`: its holder fetches,
//! writes the entry, then releases the lease (only if it still holds its token) and
//! publishes `fill:<hash>` or `nofill:<hash>`. Other replicas register for the key's
//! announcement before asking for the lease, so they are notified rather than polling.
//! Leases are used only while the subscription is up; otherwise a waiter could not hear
//! of the fill, and coalescing falls back to in-process only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::oneshot;

use crate::cache::purge::PurgeTarget;
use crate::metrics::{PoolMetrics, RedisOp};

/// Messages for the pool's L1 from other replicas. Each carries its sender's instance
/// id: a replica has already applied its own notices and skips them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Purge what `target` covers (stored before the notice arrives, by the receiver's
    /// clock: the sender's may differ).
    Purge { target: PurgeTarget, soft: bool },
    /// A replica stored a newer copy of what is held under this (primary) key, or of
    /// one of its variants: drop older ones.
    Replaced { hash: u128, variant: Option<u128>, response_time: std::time::SystemTime },
    /// The subscription is up (also the first time: notices sent before it were
    /// missed), with the pool's data epoch if Redis told it.
    Resubscribed { data_epoch: Option<String> },
}

impl Notice {
    /// The message `sender` publishes for this notice.
    pub fn message(&self, sender: u64) -> Option<String> {
        match self {
            Notice::Purge { target, soft } => {
                let target = match target {
                    PurgeTarget::Url(u) => format!("url:{u}"),
                    PurgeTarget::Path(h) => format!("path:{h:032x}"),
                    PurgeTarget::Tag(t) => format!("tag:{t}"),
                };
                Some(format!("purge:{sender:016x}:{}:{target}", u8::from(*soft)))
            }
            Notice::Replaced { hash, variant, response_time } => {
                let ms = response_time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
                Some(match variant {
                    Some(variant) => format!("inv:{sender:016x}:{hash:032x}:{ms}:{variant:032x}"),
                    None => format!("inv:{sender:016x}:{hash:032x}:{ms}"),
                })
            }
            Notice::Resubscribed { .. } => None,
        }
    }

    /// A notice and its sender, if `payload` is one.
    fn parse(payload: &str) -> Option<(u64, Notice)> {
        let hash = |h: &str| u128::from_str_radix(h, 16).ok();
        let mut parts = payload.splitn(5, ':');
        let kind = parts.next()?;
        if kind != "purge" && kind != "inv" {
            return None;
        }
        let sender = u64::from_str_radix(parts.next()?, 16).ok()?;
        let notice = if kind == "purge" {
            let soft = parts.next()? == "1";
            let target = match (parts.next()?, parts.next()?) {
                ("url", u) => PurgeTarget::Url(u.to_owned()),
                ("path", h) => PurgeTarget::Path(hash(h)?),
                ("tag", t) => PurgeTarget::Tag(t.to_owned()),
                _ => return None,
            };
            Notice::Purge { target, soft }
        } else {
            let primary = hash(parts.next()?)?;
            let ms = parts.next()?.parse::<u64>().ok()?;
            let variant = match parts.next() {
                Some(v) => Some(hash(v)?),
                None => None,
            };
            Notice::Replaced { hash: primary, variant, response_time: std::time::UNIX_EPOCH + Duration::from_millis(ms) }
        };
        Some((sender, notice))
    }
}

/// How often the subscription is checked with a PING (and how long the PING may take).
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Connecting and subscribing must be done within this.
const CONNECT_DEADLINE: Duration = Duration::from_secs(2);

/// Receives the notices of a pool's event channel.
/// Reads the pool's data epoch (KEYS[1]), setting it to ARGV[1] if there is none.
const DATA_EPOCH: &str = "local v = redis.call('get', KEYS[1]) if v then return v end redis.call('set', KEYS[1], ARGV[1]) return ARGV[1]";

/// The pool's data epoch: a random value kept under `key`, set when it is missing. It
/// changes only when Redis lost its data (a restart without persistence), not on a
/// failover to a replica or a restart that reloads its data, which a changed `run_id`
/// would not tell apart. Asked on a connection of its own (a subscribed one cannot);
/// none when it does not answer within a heartbeat (or, in a cluster, when the key is
/// on another node: then no copy is ever kept on the strength of a restart).
async fn data_epoch(client: &redis::Client, key: &str) -> Option<String> {
    let ask = async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let script = redis::Script::new(DATA_EPOCH);
        let mut invocation = script.key(key);
        invocation.arg(format!("{:016x}", fastrand::u64(..)));
        invocation.invoke_async::<String>(&mut conn).await.ok()
    };
    tokio::time::timeout(HEARTBEAT, ask).await.ok().flatten()
}

pub type NoticeHandler = std::sync::Arc<dyn Fn(Notice) + Send + Sync>;

/// What a lease holder announces when its fetch is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// The entry is in Redis now.
    Filled,
    /// The answer may not be stored: each replica fetches for itself.
    Uncacheable,
    /// The origin failed (or the entry could not be written): compete for the lease
    /// again, so one replica, not all, tries next.
    Failed,
}

impl Announcement {
    pub fn message(self, hash: u128) -> String {
        let kind = match self {
            Announcement::Filled => "fill",
            Announcement::Uncacheable => "nofill",
            Announcement::Failed => "failed",
        };
        format!("{kind}:{hash:032x}")
    }
}

/// A registration for one key's announcement; pass it back to unwatch.
pub struct Watch {
    pub hash: u128,
    id: u64,
    pub rx: oneshot::Receiver<Announcement>,
}

impl Watch {
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The outcome of asking for a key's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// This replica holds it, with this token.
    Acquired(String),
    /// Another replica holds it.
    Held,
    /// The request timed out: the lease may or may not be ours. Fetch, then release it
    /// with this token (a no-op if it is not ours), so peers are not left waiting.
    Uncertain(String),
    /// Redis or its event channel is unavailable: coalesce in-process only.
    Unavailable,
}

/// A lease's value is `<token>:<ms>`: the holder's token (`bwl:<16 hex digits>`) and when,
/// by Redis's own clock, it last renewed the lease. Deletes the lease (KEYS[1]) only if it
/// still holds our token (ARGV[1]).
pub const RELEASE_LEASE: &str = "local cur = redis.call('get', KEYS[1]) \
if cur and string.sub(cur, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ':' then return redis.call('del', KEYS[1]) end return 0";

/// Takes the lease KEYS[1] for token ARGV[1] for ARGV[2] ms, unless a holder of this fleet
/// renewed it less than ARGV[3] ms ago: a value that is not a token of ours, or a holder
/// that stopped renewing (it died mid-fetch), is taken over. 1 when taken.
pub const ACQUIRE_LEASE: &str = "local t = redis.call('time') \
local now = t[1] * 1000 + math.floor(t[2] / 1000) \
local cur = redis.call('get', KEYS[1]) \
if cur then \
  local at = tonumber(string.match(cur, '^bwl:%x+:(%d+)$')) \
  if at and now - at < tonumber(ARGV[3]) then return 0 end \
end \
redis.call('set', KEYS[1], ARGV[1] .. ':' .. string.format('%d', now), 'PX', ARGV[2]) return 1";

/// Renews the lease KEYS[1] for ARGV[2] ms if it still holds our token ARGV[1].
pub const RENEW_LEASE: &str = "local cur = redis.call('get', KEYS[1]) \
if cur and string.sub(cur, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ':' then \
  local t = redis.call('time') \
  redis.call('set', KEYS[1], ARGV[1] .. ':' .. string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000)), 'PX', ARGV[2]) return 1 \
end return 0";

type Waiters = HashMap<u128, Vec<(u64, oneshot::Sender<Announcement>)>>;

/// Local side of the event channel.
pub struct Events {
    /// This pool tier's id in the notices it sends (random per process and pool).
    pub instance: u64,
    /// Who waits for which key's announcement (a key can have more than one flight in
    /// this process after a takeover). A std mutex held for one map operation; entries
    /// leave on announcement, on unwatch, and all at once when the subscription drops.
    waiters: Mutex<Waiters>,
    next_id: std::sync::atomic::AtomicU64,
    /// Whether the subscription is up. Written by the subscriber task only.
    subscribed: AtomicBool,
}

impl Events {
    pub fn new() -> Events {
        Events { instance: fastrand::u64(..), waiters: Mutex::default(), next_id: Default::default(), subscribed: AtomicBool::new(false) }
    }

    pub fn is_up(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    pub fn watch(&self, hash: u128) -> Watch {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().entry(hash).or_default().push((id, tx));
        Watch { hash, id, rx }
    }

    pub fn unwatch(&self, hash: u128, id: u64) {
        let mut waiters = self.lock();
        if let Some(list) = waiters.get_mut(&hash) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                waiters.remove(&hash);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dispatch(&self, payload: &str, handler: &NoticeHandler) {
        if let Some((sender, notice)) = Notice::parse(payload) {
            if sender != self.instance {
                handler(notice);
            }
            return;
        }
        let Some((kind, hash)) = payload.split_once(':') else { return };
        let Ok(hash) = u128::from_str_radix(hash, 16) else { return };
        let announcement = match kind {
            "fill" => Announcement::Filled,
            "nofill" => Announcement::Uncacheable,
            "failed" => Announcement::Failed,
            _ => return,
        };
        let waiters = self.lock().remove(&hash);
        for (_, tx) in waiters.into_iter().flatten() {
            let _ = tx.send(announcement);
        }
    }

    /// The subscription dropped: announcements sent meanwhile are lost, so every waiter
    /// is woken (its channel closes) to check for itself.
    fn wake_all(&self) {
        self.lock().clear();
    }

    /// Subscribes to `channel` and dispatches its messages until `stop` fires,
    /// reconnecting with backoff whenever the subscription drops.
    pub async fn run(
        self: std::sync::Arc<Self>,
        clients: Vec<redis::Client>,
        channel: String,
        epoch_key: String,
        metrics: std::sync::Arc<PoolMetrics>,
        handler: NoticeHandler,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut backoff = Duration::from_millis(50);
        if clients.is_empty() {
            return;
        }
        let mut attempt = 0usize;
        loop {
            // In a cluster, try the next node after each failure.
            let client = &clients[attempt % clients.len()];
            attempt += 1;
            let session = async {
                let connect = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                // A Redis that accepts the connection and then says nothing must not hold the
                // subscriber (and every entry waiting on it) forever.
                let pubsub = tokio::time::timeout(CONNECT_DEADLINE, connect)
                    .await
                    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "subscribing took too long")))??;
                let data_epoch = data_epoch(client, &epoch_key).await;
                self.subscribed.store(true, Ordering::Release);
                metrics.events_subscribed.set(1.0);
                // Also on the first subscription: notices sent before it were missed.
                handler(Notice::Resubscribed { data_epoch });
                let (mut sink, mut messages) = pubsub.split();
                // A subscription on a half-open socket hears nothing and reports no
                // error: PING it, and start over when a PING goes unanswered.
                let mut heartbeat = tokio::time::interval(HEARTBEAT);
                heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(msg) => {
                                if let Ok(payload) = msg.get_payload::<String>() {
                                    self.dispatch(&payload, &handler);
                                }
                            }
                            None => break,
                        },
                        _ = heartbeat.tick() => {
                            if !matches!(tokio::time::timeout(HEARTBEAT, sink.ping::<redis::Value>()).await, Ok(Ok(_))) {
                                tracing::warn!(channel, "event subscription stopped answering; reconnecting");
                                break;
                            }
                        }
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                result = session => match result {
                    Err(err) => {
                        tracing::debug!(error = %err, channel, "event subscription failed");
                        metrics.redis_error(RedisOp::Connect);
                    }
                    Ok(()) => backoff = Duration::from_millis(50),
                },
                _ = &mut stop => return,
            }
            self.subscribed.store(false, Ordering::Release);
            metrics.events_subscribed.set(0.0);
            self.wake_all();
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = &mut stop => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_a_replica_skips_its_own() {
        let url = Notice::Purge { target: PurgeTarget::Url("http://shop.example/a?b=1".into()), soft: true };
        let tag = Notice::Purge { target: PurgeTarget::Tag("cat:7".into()), soft: false };
        let inv = Notice::Replaced { hash: 42, variant: None, response_time: std::time::UNIX_EPOCH + Duration::from_millis(1234) };
        let inv_variant = Notice::Replaced { hash: 42, variant: Some(u128::MAX - 3), response_time: std::time::UNIX_EPOCH + Duration::from_millis(1234) };
        for notice in [url, tag, inv, inv_variant] {
            let message = notice.message(7).expect("a message");
            assert_eq!(Notice::parse(&message), Some((7, notice)));
        }
        assert_eq!(Notice::parse("fill:00000000000000000000000000000001"), None);

        let events = Events::new();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        let handler: NoticeHandler = std::sync::Arc::new(move |n| sink.lock().expect("lock").push(n));
        let own = Notice::Purge { target: PurgeTarget::Tag("t".into()), soft: false };
        events.dispatch(&own.message(events.instance).expect("message"), &handler);
        events.dispatch(&own.message(events.instance.wrapping_add(1)).expect("message"), &handler);
        assert_eq!(*seen.lock().expect("lock"), vec![own]);
    }
}
