//! Route modes shared by every replica (with `control_redis_url`).
//!
//! The control Redis holds, under `bulwark:control:`:
//! - `modes`: route name to mode, so a restarted or new replica starts in the current modes;
//! - `changes`: route name to the id of its latest change;
//! - `replicas`: replica id to when it was last seen (Redis' clock, in ms), written every second;
//!   those seen in the last 3 s share each origin's `fleet_max_concurrency`;
//! - `ack:<change id>`: the replicas that applied that change (kept for 10 minutes).
//!
//! A change is published on `bulwark:control:events` twice: as `mode:<mode>:<route>` (what
//! earlier versions read) and as `change:<id>:<mode>:<route>`, which a replica acknowledges
//! once applied. The subscription is PINGed every second; one that drops or stops answering
//! is made anew, and every mode is then read back (and acknowledged), so a change made during
//! the gap is applied within [`HEARTBEAT`] x 2 plus a reconnect.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use crate::cache::shared::link::{Endpoint, Link};
use crate::config::RouteMode;
use crate::runtime::Live;

const MODES_KEY: &str = "bulwark:control:modes";
const CHANGES_KEY: &str = "bulwark:control:changes";
const REPLICAS_KEY: &str = "bulwark:control:replicas";
const ACK_PREFIX: &str = "bulwark:control:ack:";
const CHANNEL: &str = "bulwark:control:events";
/// How long an acknowledgement set is kept.
const ACK_TTL_S: u32 = 600;
/// How often a replica says it is alive, and how often (and how long) its subscription is PINGed.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Connecting and subscribing must each be done within this.
const CONNECT_DEADLINE: Duration = Duration::from_secs(2);
/// Deadline of one command.
const TIMEOUT: Duration = Duration::from_secs(2);
/// A mode change is answered within this (the acknowledgements are awaited for most of it).
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
const ACKS_AWAITED_FOR: Duration = Duration::from_millis(800);

/// Stores a route's mode (KEYS[1]) and change id (KEYS[2]), acknowledges it for the
/// replica making it (KEYS[3]), and publishes it in both message forms.
/// ARGV: route, mode, change id, replica id, channel, ack TTL.
const SET_MODE: &str = r"
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('hset', KEYS[2], ARGV[1], ARGV[3])
redis.call('sadd', KEYS[3], ARGV[4])
redis.call('expire', KEYS[3], ARGV[6])
redis.call('publish', ARGV[5], 'mode:' .. ARGV[2] .. ':' .. ARGV[1])
redis.call('publish', ARGV[5], 'change:' .. ARGV[3] .. ':' .. ARGV[2] .. ':' .. ARGV[1])
return 1";

/// Marks replica ARGV[1] seen now in KEYS[1], forgetting replicas not seen for an hour;
/// answers how many were seen in the last ARGV[2] ms (the ones alive, this one included).
const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('time')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('zadd', KEYS[1], ms, ARGV[1])
redis.call('zremrangebyscore', KEYS[1], '-inf', ms - 3600000)
return redis.call('zcount', KEYS[1], ms - tonumber(ARGV[2]), '+inf')";

/// A replica not seen for this long no longer counts as alive for fleet budgets (three
/// heartbeats missed; one shutting down leaves at once).
const ALIVE_FOR: Duration = Duration::from_secs(3);

/// The replicas seen in the last 10 s (KEYS[1]) and those that acknowledged (KEYS[2]).
const STATUS: &str = r"
local t = redis.call('time')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {redis.call('zrangebyscore', KEYS[1], ms - 10000, '+inf'), redis.call('smembers', KEYS[2])}";

pub struct Control {
    client: redis::Client,
    /// Commands (not the subscription); replaced when it stops answering.
    link: Link,
    replica: String,
    /// The heartbeat and the subscription, stopped by [`Control::leave`].
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control Redis did not answer in time")]
    Timeout,
    #[error("the control Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Who has applied a mode change, as far as the control Redis knows.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Acks {
    pub confirmed: Vec<String>,
    /// Seen in the last 10 s, not confirmed.
    pub missing: Vec<String>,
    /// Why the acknowledgements could not be read (the change was stored and published).
    pub unknown: Option<String>,
}

impl Control {
    /// Connects lazily to `url`, as replica `replica`.
    pub fn new(url: &str, ca: Option<&crate::config::PemFile>, replica: &str) -> Result<Arc<Control>, redis::RedisError> {
        let client = crate::cache::shared::link::client(url, ca)?;
        let link = Link::new("control", &Endpoint::Single(url.to_owned()), ca, TIMEOUT)?;
        Ok(Arc::new(Control { client, link, replica: replica.to_owned(), tasks: std::sync::Mutex::default() }))
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Stores a route's mode (already applied here), tells every replica, and waits up to
    /// [`ACKS_AWAITED_FOR`] for every replica seen lately to acknowledge it.
    pub async fn set_mode(&self, route: &str, mode: RouteMode) -> Result<Acks, ControlError> {
        let start = Instant::now();
        let change = format!("{:016x}", fastrand::u64(..));
        let ack_key = format!("{ACK_PREFIX}{change}");
        let script = redis::Script::new(SET_MODE);
        let mut invocation = script.key(MODES_KEY);
        invocation.key(CHANGES_KEY).key(&ack_key);
        invocation.arg(route).arg(mode.as_str()).arg(&change).arg(&self.replica).arg(CHANNEL).arg(ACK_TTL_S);
        let mut conn = self.link.conn();
        match self.link.call(ANSWER_WITHIN, invocation.invoke_async::<i64>(&mut conn)).await {
            None => return Err(ControlError::Timeout),
            Some(result) => result?,
        };
        let mut acks = Acks { unknown: Some("the control Redis did not answer in time".to_owned()), ..Acks::default() };
        loop {
            let left = (start + ANSWER_WITHIN).saturating_duration_since(Instant::now());
            match self.status(&ack_key, left).await {
                Ok(Some(now)) => acks = now,
                Ok(None) => {}
                // Stored and published: only who applied it is not known.
                Err(err) if acks.unknown.is_some() => acks.unknown = Some(err.to_string()),
                Err(_) => {}
            }
            if (acks.unknown.is_none() && acks.missing.is_empty()) || start.elapsed() >= ACKS_AWAITED_FOR {
                return Ok(acks);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Who acknowledged the change whose set is `ack_key`; `None` when the answer did not come within `left`.
    async fn status(&self, ack_key: &str, left: Duration) -> Result<Option<Acks>, ControlError> {
        let script = redis::Script::new(STATUS);
        let mut invocation = script.key(REPLICAS_KEY);
        invocation.key(ack_key);
        let mut conn = self.link.conn();
        let Some(result) = self.link.call(left, invocation.invoke_async::<(Vec<String>, Vec<String>)>(&mut conn)).await else {
            return Ok(None);
        };
        let (seen, acked) = result?;
        let confirmed: BTreeSet<String> = acked.into_iter().collect();
        let missing = seen.into_iter().filter(|id| !confirmed.contains(id)).collect::<BTreeSet<_>>().into_iter().collect();
        Ok(Some(Acks { confirmed: confirmed.into_iter().collect(), missing, unknown: None }))
    }

    /// Acknowledges changes `ids` for this replica.
    async fn ack(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for id in ids {
            let key = format!("{ACK_PREFIX}{id}");
            pipe.sadd(&key, &self.replica).ignore().expire(&key, i64::from(ACK_TTL_S)).ignore();
        }
        let mut conn = self.link.conn();
        if !matches!(self.link.call(TIMEOUT, pipe.query_async::<()>(&mut conn)).await, Some(Ok(()))) {
            tracing::warn!("cannot acknowledge route modes in the control Redis");
        }
    }

    /// Says this replica is alive, and has every origin with a fleet budget take its
    /// share of it among the replicas alive (kept as it was while the Redis fails).
    async fn heartbeat(&self, live: &Live) {
        let script = redis::Script::new(HEARTBEAT_SCRIPT);
        let mut invocation = script.key(REPLICAS_KEY);
        invocation.arg(&self.replica).arg(ALIVE_FOR.as_millis() as u64);
        let mut conn = self.link.conn();
        match self.link.call(HEARTBEAT, invocation.invoke_async::<i64>(&mut conn)).await {
            Some(Ok(alive)) => live.set_replicas(usize::try_from(alive).unwrap_or(1).max(1)),
            _ => tracing::debug!("control Redis heartbeat failed"),
        }
    }

    /// Stops following changes and takes this replica off the list of those expected to
    /// acknowledge them (at shutdown).
    pub async fn leave(&self) {
        let tasks: Vec<_> = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for task in tasks {
            // Stopped before the removal, so no heartbeat adds this replica back.
            task.abort();
            let _ = task.await;
        }
        let mut conn = self.link.conn();
        let _ = self.link.call(Duration::from_millis(500), redis::cmd("ZREM").arg(REPLICAS_KEY).arg(&self.replica).query_async::<i64>(&mut conn)).await;
    }

    /// Applies every stored mode to the current routes and acknowledges those applied.
    async fn apply_stored(&self, live: &Live) {
        let mut pipe = redis::pipe();
        pipe.hgetall(MODES_KEY).hgetall(CHANGES_KEY);
        let mut conn = self.link.conn();
        type Stored = (std::collections::HashMap<String, String>, std::collections::HashMap<String, String>);
        match self.link.call(TIMEOUT, pipe.query_async::<Stored>(&mut conn)).await {
            Some(Ok((modes, changes))) => {
                let applied: Vec<String> =
                    modes.iter().filter(|(route, mode)| apply(live, route, mode)).filter_map(|(route, _)| changes.get(route).cloned()).collect();
                self.ack(&applied).await;
            }
            _ => tracing::warn!("cannot read route modes from the control Redis"),
        }
    }

    /// Applies the stored modes now, then follows changes until the process ends.
    pub async fn start(self: Arc<Self>, live: Arc<Live>) {
        self.heartbeat(&live).await;
        self.apply_stored(&live).await;
        let (me, alive) = (self.clone(), live.clone());
        let heartbeat = tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.heartbeat(&alive).await;
            }
        });
        let me = self.clone();
        let follow = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            let mut sessions = 0u64;
            loop {
                sessions += 1;
                match me.follow(&live, sessions > 1).await {
                    Err(err) => tracing::warn!(error = %err, "control channel failed; subscribing again"),
                    Ok(()) => backoff = Duration::from_millis(100),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).extend([heartbeat, follow]);
    }

    /// One subscription: made within [`CONNECT_DEADLINE`], followed until it drops or a
    /// PING goes unanswered for a [`HEARTBEAT`].
    async fn follow(&self, live: &Live, again: bool) -> Result<(), ControlError> {
        let connect = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(CONNECT_DEADLINE, connect).await.map_err(|_| ControlError::Timeout)??;
        if again {
            // Whatever broke the subscription may have broken the command connection too.
            self.link.reset();
        }
        // Changes made while unsubscribed were missed: read them all again.
        self.apply_stored(live).await;
        let (mut sink, mut messages) = pubsub.split();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { return Ok(()) };
                    let Ok(payload) = msg.get_payload::<String>() else { continue };
                    match Message::parse(&payload) {
                        Some(Message::Mode { mode, route }) => {
                            apply(live, route, mode);
                        }
                        Some(Message::Change { id, mode, route }) if apply(live, route, mode) => self.ack(&[id.to_owned()]).await,
                        Some(Message::Change { .. }) | None => {}
                    }
                }
                _ = heartbeat.tick() => {
                    if !matches!(tokio::time::timeout(HEARTBEAT, sink.ping::<redis::Value>()).await, Ok(Ok(_))) {
                        tracing::warn!("control channel stopped answering; subscribing again");
                        return Err(ControlError::Timeout);
                    }
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Message<'a> {
    /// `mode:<mode>:<route>`, as every version publishes it.
    Mode { mode: &'a str, route: &'a str },
    /// `change:<id>:<mode>:<route>`: the same, to be acknowledged.
    Change { id: &'a str, mode: &'a str, route: &'a str },
}

impl<'a> Message<'a> {
    fn parse(payload: &'a str) -> Option<Message<'a>> {
        let (kind, rest) = payload.split_once(':')?;
        match kind {
            "mode" => {
                let (mode, route) = rest.split_once(':')?;
                Some(Message::Mode { mode, route })
            }
            "change" => {
                let (id, rest) = rest.split_once(':')?;
                let (mode, route) = rest.split_once(':')?;
                Some(Message::Change { id, mode, route })
            }
            _ => None,
        }
    }
}

/// Applies `mode` to `route`; whether the route is now in that mode.
fn apply(live: &Live, route: &str, mode: &str) -> bool {
    let Some(mode) = RouteMode::parse(mode) else { return false };
    let Some(r) = live.runtime().routes.iter().find(|r| r.config.name == route).cloned() else { return false };
    if r.mode() == mode {
        return true;
    }
    match r.set_mode(mode) {
        Ok(()) => {
            tracing::info!(route, mode = mode.as_str(), "route mode applied from the control channel");
            true
        }
        Err(err) => {
            tracing::warn!(route, error = %err, "route mode from the control channel not applied");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_message_forms_parse_and_routes_may_hold_colons() {
        assert_eq!(Message::parse("mode:off:search"), Some(Message::Mode { mode: "off", route: "search" }));
        assert_eq!(Message::parse("change:00ff:cache-only:a:b"), Some(Message::Change { id: "00ff", mode: "cache-only", route: "a:b" }));
        assert_eq!(Message::parse("change:00ff"), None);
        assert_eq!(Message::parse("other:x:y"), None);
    }
}
