//! An origin's endpoints: which are in rotation, and which one a request goes to.
//!
//! A request goes to the cheaper of two endpoints drawn at random from those in rotation
//! ("power of two choices"), the cost being the endpoint's requests in flight, plus one,
//! times a peak-EWMA of its latency; while an endpoint ramps up after joining or returning
//! (`slow_start`), it takes the picks it wins only as often as its weight (rising from 5%
//! to 1 over `slow_start`) says. The EWMA jumps to any latency above it and decays towards
//! newer, lower ones and, while nothing is measured, towards zero, so that an endpoint
//! that was slow is tried again now and then instead of being shunned for good.
//!
//! An endpoint leaves the rotation when it is ejected (`eject_after_failures` gateway
//! failures in a row, for `eject_for`, doubled while it keeps failing), when its active
//! health check fails, or when it is gone from the origin's endpoints (it then drains:
//! nothing new is sent, what is in flight finishes). At most `max_ejected_percent` of the
//! endpoints is ejected at once, and never the last one in rotation. Should nothing be
//! in rotation (every endpoint failing its health check), every endpoint not draining is
//! used rather than none: the origin's answers, stale copies or the breaker decide then.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use tokio::time::Instant;

use crate::config::{Ejection, MAX_EJECTION};

/// How fast the latency estimate forgets (Finagle's and linkerd's decay time).
const DECAY: Duration = Duration::from_secs(10);

/// The weight an endpoint starts its ramp at: a share, never nothing.
const RAMP_FLOOR: f64 = 0.05;

/// What an endpoint is doing, as `GET /admin/origins` and `bulwark_origin_endpoints` say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Healthy,
    Ejected,
    Unhealthy,
    SlowStart,
    Draining,
}

impl State {
    pub const ALL: [State; 5] = [State::Healthy, State::Ejected, State::Unhealthy, State::SlowStart, State::Draining];

    /// Its name in `GET /admin/origins` and the `state` label.
    pub fn label(self) -> &'static str {
        crate::metrics::ENDPOINT_STATES[self as usize]
    }
}

/// How one attempt on an endpoint went, for its ejection count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An answer that says the endpoint works (any status but 502, 503 and 504; a 500
    /// or a 4xx can be provoked by one URL or one client).
    Answered,
    /// A connect error, a reset, a timeout, or a 502/503/504.
    Failed,
    /// Says nothing about the endpoint (the client's body failed).
    Neither,
}

/// One address requests can go to.
pub struct Endpoint {
    pub authority: Authority,
    inflight: AtomicUsize,
    /// The latency estimate, in microseconds (an `f64`'s bits), and when it was last
    /// updated, in microseconds since the set's epoch.
    latency: AtomicU64,
    latency_at: AtomicU64,
    /// When its ramp began, in microseconds since the epoch, plus one; 0: not ramping.
    ramp_since: AtomicU64,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    draining: bool,
    failures_in_a_row: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row, and how long the last one was and when it ended (the count
    /// starts again once the endpoint has stayed in rotation for that long).
    ejections: u32,
    last_ejection: Duration,
    returned_at: Option<Instant>,
    /// The active check: `None` before its first answer (not in rotation yet).
    passing: Option<bool>,
    /// Known from the start: its first pass does not ramp it (every endpoint would).
    from_start: bool,
    checks_in_a_row: u32,
    /// Attempts and failures, in six buckets of ten seconds.
    recent: [(u32, u32); 6],
    recent_slot: u64,
}

impl Health {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    fn in_rotation(&self, now: Instant, checked: bool) -> bool {
        !self.draining && !self.ejected(now) && (!checked || self.passing == Some(true))
    }

    fn count(&mut self, now_secs: u64, failed: bool) {
        let slot = now_secs / 10;
        if slot != self.recent_slot {
            let gap = slot.saturating_sub(self.recent_slot).min(6);
            for step in 1..=gap {
                self.recent[((self.recent_slot + step) % 6) as usize] = (0, 0);
            }
            self.recent_slot = slot;
        }
        let bucket = &mut self.recent[(slot % 6) as usize];
        bucket.0 = bucket.0.saturating_add(1);
        bucket.1 = bucket.1.saturating_add(u32::from(failed));
    }

    fn failure_rate(&self, now_secs: u64) -> f64 {
        let slot = now_secs / 10;
        let (mut attempts, mut failures) = (0u64, 0u64);
        for age in 0..6 {
            if let Some(s) = slot.checked_sub(age)
                && s + 6 > self.recent_slot
                && s <= self.recent_slot
            {
                let (a, f) = self.recent[(s % 6) as usize];
                attempts += u64::from(a);
                failures += u64::from(f);
            }
        }
        if attempts == 0 { 0.0 } else { failures as f64 / attempts as f64 }
    }
}

impl Endpoint {
    /// Unmeasured: tried at once if in rotation from the start; [`Endpoints::ramp`] gives
    /// one joining later the rotation's mean.
    fn new(authority: Authority, passing: Option<bool>, from_start: bool) -> Endpoint {
        Endpoint {
            authority,
            inflight: AtomicUsize::new(0),
            latency: AtomicU64::new(0f64.to_bits()),
            latency_at: AtomicU64::new(0),
            ramp_since: AtomicU64::new(0),
            health: Mutex::new(Health { passing, from_start, ..Health::default() }),
        }
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// The latency estimate now, in microseconds, decayed since it was last updated.
    fn latency_now(&self, now_us: u64) -> f64 {
        let estimate = f64::from_bits(self.latency.load(Ordering::Relaxed));
        let elapsed = now_us.saturating_sub(self.latency_at.load(Ordering::Relaxed));
        estimate * (-(elapsed as f64) / DECAY.as_micros() as f64).exp()
    }

    fn observe(&self, latency: Duration, now_us: u64) {
        let sample = latency.as_micros() as f64;
        let current = self.latency_now(now_us);
        let elapsed = now_us.saturating_sub(self.latency_at.load(Ordering::Relaxed));
        let kept = (-(elapsed as f64) / DECAY.as_micros() as f64).exp();
        // Peak: a latency above the estimate is taken at once; lower ones pull it down.
        let next = if sample > current { sample } else { current * kept + sample * (1.0 - kept) };
        self.latency.store(next.to_bits(), Ordering::Relaxed);
        self.latency_at.store(now_us, Ordering::Relaxed);
    }

    /// Its share while it ramps up: from [`RAMP_FLOOR`] to 1 over `slow_start`.
    fn weight(&self, now_us: u64, slow_start: Duration) -> f64 {
        let since = self.ramp_since.load(Ordering::Relaxed);
        if since == 0 || slow_start.is_zero() {
            return 1.0;
        }
        let ramped = now_us.saturating_sub(since - 1) as f64 / slow_start.as_micros() as f64;
        if ramped >= 1.0 {
            self.ramp_since.store(0, Ordering::Relaxed);
            return 1.0;
        }
        ramped.max(RAMP_FLOOR)
    }

    fn cost(&self, now_us: u64) -> f64 {
        let load = (self.inflight() + 1) as f64;
        self.latency_now(now_us).max(1.0) * load
    }
}

/// A request's hold on an endpoint: counted in its in-flight requests until dropped.
pub struct Load(Arc<Endpoint>);

impl Load {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One endpoint's state for `GET /admin/origins`.
pub struct Report {
    pub address: String,
    pub state: State,
    pub inflight: usize,
    pub failure_rate_1m: f64,
    pub weight: f64,
}

/// The endpoints of one origin.
pub struct Endpoints {
    origin: String,
    ejection: Ejection,
    /// The latency a failure counts as once an endpoint has failed `eject_after_failures`
    /// times in a row and is still in rotation (ejection refused: too many are ejected, or
    /// it is the last): failing fast must not make it look cheapest.
    penalty: Duration,
    slow_start: Duration,
    /// Whether an active health check decides when endpoints enter the rotation.
    checked: bool,
    epoch: Instant,
    /// Every endpoint known, draining ones included.
    all: Mutex<Vec<Arc<Endpoint>>>,
    /// Those in rotation (or, when none is, every one not draining).
    rotation: ArcSwap<Vec<Arc<Endpoint>>>,
    ejections: metrics::Counter,
}

impl Endpoints {
    pub fn new(origin: &str, ejection: Ejection, slow_start: Duration, checked: bool, penalty: Duration, ejections: metrics::Counter) -> Endpoints {
        Endpoints {
            origin: origin.to_owned(),
            ejection,
            penalty,
            slow_start,
            checked,
            epoch: Instant::now(),
            all: Mutex::new(Vec::new()),
            rotation: ArcSwap::from_pointee(Vec::new()),
            ejections,
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn all(&self) -> MutexGuard<'_, Vec<Arc<Endpoint>>> {
        self.all.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether any endpoint is known (draining ones aside).
    pub fn is_empty(&self) -> bool {
        self.rotation.load().is_empty()
    }

    /// The endpoint for the next attempt, one not in `tried` while there is one, and its
    /// load (held until the response is done).
    pub fn pick(&self, tried: &[Arc<Endpoint>]) -> Option<Load> {
        let rotation = self.rotation.load();
        let untried: Vec<Arc<Endpoint>>;
        // Retries only (rare): the endpoints not tried yet, or all when every one was.
        let candidates: &[Arc<Endpoint>] = if tried.is_empty() {
            &rotation
        } else {
            untried = rotation.iter().filter(|e| !tried.iter().any(|t| Arc::ptr_eq(t, e))).cloned().collect();
            if untried.is_empty() { &rotation } else { &untried }
        };
        let chosen = match candidates.len() {
            0 => return None,
            1 => &candidates[0],
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (&candidates[a], &candidates[b]);
                let now = self.now_us();
                let (cheaper, other) = if b.cost(now) < a.cost(now) { (b, a) } else { (a, b) };
                // One ramping up takes its pick only as often as its weight says.
                let weight = cheaper.weight(now, self.slow_start);
                if weight < 1.0 && fastrand::f64() >= weight { other } else { cheaper }
            }
        };
        chosen.inflight.fetch_add(1, Ordering::Relaxed);
        Some(Load(chosen.clone()))
    }

    /// Records how an attempt on `endpoint` went, `latency` after it began.
    pub fn report(&self, endpoint: &Endpoint, verdict: Verdict, latency: Duration) {
        if verdict == Verdict::Neither {
            return;
        }
        let failed = verdict == Verdict::Failed;
        let (wants_ejection, failing) = {
            let mut health = endpoint.health();
            health.count(self.epoch.elapsed().as_secs(), failed);
            if failed {
                health.failures_in_a_row = health.failures_in_a_row.saturating_add(1);
            } else {
                health.failures_in_a_row = 0;
            }
            let failing = failed && health.failures_in_a_row >= self.ejection.after_failures;
            (failing && !health.ejected(Instant::now()) && !health.draining, failing)
        };
        // A fast failure is taken as it is (a dead endpoint wins the picks that get it
        // ejected soon, each failure retried elsewhere); one still in rotation after it
        // should have been ejected counts as slow, so the balancer keeps off it.
        endpoint.observe(if failing { latency.max(self.penalty) } else { latency }, self.now_us());
        if wants_ejection {
            self.try_eject(endpoint);
        }
    }

    /// Ejects `endpoint` unless that would eject more than `max_ejected_percent` or leave
    /// nothing in rotation.
    fn try_eject(&self, endpoint: &Endpoint) {
        let all = self.all();
        let now = Instant::now();
        // Failures reported at once may each ask: the first ejects, the others find it done.
        if endpoint.health().ejected(now) {
            return;
        }
        let serving: Vec<&Arc<Endpoint>> = all.iter().filter(|e| !e.health().draining).collect();
        let ejected = serving.iter().filter(|e| e.health().ejected(now)).count();
        let allowed = serving.len() * self.ejection.max_percent as usize / 100;
        let others_in_rotation = serving.iter().filter(|e| !std::ptr::eq(Arc::as_ptr(e), endpoint) && e.health().in_rotation(now, self.checked)).count();
        if ejected + 1 > allowed || others_in_rotation == 0 {
            return;
        }
        let length = {
            let mut health = endpoint.health();
            // Back long enough after the last one: this ejection counts as the first again.
            if health.returned_at.is_some_and(|at| now.duration_since(at) > health.last_ejection) {
                health.ejections = 0;
            }
            let length = self.ejection.duration.saturating_mul(1 << health.ejections.min(16)).min(MAX_EJECTION);
            health.ejections = health.ejections.saturating_add(1);
            health.last_ejection = length;
            health.ejected_until = Some(now + length);
            health.failures_in_a_row = 0;
            length
        };
        self.ejections.increment(1);
        tracing::warn!(origin = self.origin, endpoint = %endpoint.authority, for_secs = length.as_secs_f64(), "origin endpoint ejected after failures in a row");
        self.rebuild(&all);
    }

    /// Records an active health check's answer; `healthy_after` passes (or, before any,
    /// one) put an endpoint in rotation, `unhealthy_after` failures take it out.
    pub fn checked(&self, endpoint: &Endpoint, passed: bool, unhealthy_after: u32, healthy_after: u32) {
        let (changed, ramps) = {
            let mut health = endpoint.health();
            let before = health.passing;
            let ramps = !(before.is_none() && health.from_start);
            if before == Some(passed) {
                health.checks_in_a_row = 0;
                (false, ramps)
            } else {
                health.checks_in_a_row += 1;
                let needed = match (before, passed) {
                    (None, true) => 1,
                    (_, true) => healthy_after,
                    (_, false) => unhealthy_after,
                };
                let flips = health.checks_in_a_row >= needed;
                if flips {
                    health.passing = Some(passed);
                    health.checks_in_a_row = 0;
                }
                (flips, ramps)
            }
        };
        if changed {
            if passed {
                tracing::info!(origin = self.origin, endpoint = %endpoint.authority, "origin endpoint passes its health check: in rotation");
                if ramps {
                    self.ramp(endpoint);
                }
            } else {
                tracing::warn!(origin = self.origin, endpoint = %endpoint.authority, "origin endpoint fails its health check: out of rotation");
            }
            let all = self.all();
            self.rebuild(&all);
        }
    }

    /// An endpoint (back) in rotation: what it cost before it left says nothing now (a
    /// failure's penalty would keep it starved for minutes), so it starts as fast as the
    /// rotation is on average, and ramps up over `slow_start`.
    fn ramp(&self, endpoint: &Endpoint) {
        let now = self.now_us();
        endpoint.latency.store(self.usual_latency(now).to_bits(), Ordering::Relaxed);
        endpoint.latency_at.store(now, Ordering::Relaxed);
        endpoint.health().failures_in_a_row = 0;
        if !self.slow_start.is_zero() {
            endpoint.ramp_since.store(now + 1, Ordering::Relaxed);
        }
    }

    /// The mean latency estimate of the rotation (0 when it is empty).
    fn usual_latency(&self, now_us: u64) -> f64 {
        let rotation = self.rotation.load();
        let sum: f64 = rotation.iter().map(|e| e.latency_now(now_us)).sum();
        if rotation.is_empty() { 0.0 } else { sum / rotation.len() as f64 }
    }

    /// Makes `found` the endpoints: new ones join (ramping up), missing ones drain, ones
    /// that were draining and are back rejoin. The first call's endpoints start at full
    /// weight. Whether any endpoint was new.
    pub fn set(&self, found: &[Authority]) -> bool {
        let mut all = self.all();
        let first = all.is_empty();
        for endpoint in all.iter() {
            let present = found.contains(&endpoint.authority);
            let mut health = endpoint.health();
            if health.draining && present {
                health.draining = false;
                drop(health);
                tracing::info!(origin = self.origin, endpoint = %endpoint.authority, "origin endpoint is back");
                self.ramp(endpoint);
            } else if !health.draining && !present {
                health.draining = true;
                tracing::info!(origin = self.origin, endpoint = %endpoint.authority, "origin endpoint is gone: draining");
            }
        }
        let mut joined = false;
        for authority in found {
            if all.iter().any(|e| e.authority == *authority) {
                continue;
            }
            joined = true;
            let endpoint = Arc::new(Endpoint::new(authority.clone(), (!self.checked).then_some(true), first));
            if !first && !self.checked {
                self.ramp(&endpoint);
            }
            if !first {
                tracing::info!(origin = self.origin, endpoint = %authority, "origin endpoint joins");
            }
            all.push(endpoint);
        }
        self.rebuild(&all);
        joined
    }

    /// Once a tick: ends ejections that are over, forgets drained endpoints, and
    /// rebuilds the rotation when it changed.
    pub fn tick(&self) {
        let mut all = self.all();
        let now = Instant::now();
        let mut changed = false;
        for endpoint in all.iter() {
            let mut health = endpoint.health();
            if health.ejected_until.is_some_and(|until| now >= until) {
                health.ejected_until = None;
                health.returned_at = Some(now);
                drop(health);
                tracing::info!(origin = self.origin, endpoint = %endpoint.authority, "origin endpoint ejection over: back in rotation");
                self.ramp(endpoint);
                changed = true;
            }
        }
        let before = all.len();
        // Drained: nothing in flight (the set's own reference and the rotation's aside).
        all.retain(|e| !e.health().draining || e.inflight() > 0);
        if changed || all.len() != before {
            self.rebuild(&all);
        }
    }

    fn rebuild(&self, all: &[Arc<Endpoint>]) {
        let now = Instant::now();
        let mut rotation: Vec<Arc<Endpoint>> = all.iter().filter(|e| e.health().in_rotation(now, self.checked)).cloned().collect();
        if rotation.is_empty() {
            rotation = all.iter().filter(|e| !e.health().draining).cloned().collect();
        }
        self.rotation.store(Arc::new(rotation));
    }

    /// Every endpoint not draining (for health checks).
    pub fn serving(&self) -> Vec<Arc<Endpoint>> {
        self.all().iter().filter(|e| !e.health().draining).cloned().collect()
    }

    pub fn state_of(&self, endpoint: &Endpoint) -> State {
        let health = endpoint.health();
        if health.draining {
            State::Draining
        } else if health.ejected(Instant::now()) {
            State::Ejected
        } else if self.checked && health.passing != Some(true) {
            State::Unhealthy
        } else if endpoint.weight(self.now_us(), self.slow_start) < 1.0 {
            State::SlowStart
        } else {
            State::Healthy
        }
    }

    pub fn report_all(&self) -> Vec<Report> {
        let all = self.all().clone();
        let now_secs = self.epoch.elapsed().as_secs();
        all.iter()
            .map(|e| Report {
                address: e.authority.to_string(),
                state: self.state_of(e),
                inflight: e.inflight(),
                failure_rate_1m: e.health().failure_rate(now_secs),
                weight: e.weight(self.now_us(), self.slow_start),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize, max_percent: u32) -> Endpoints {
        let ejection = Ejection { after_failures: 2, duration: Duration::from_secs(10), max_percent };
        let endpoints = Endpoints::new("o", ejection, Duration::ZERO, false, Duration::from_secs(1), metrics::Counter::noop());
        let found: Vec<Authority> = (0..n).map(|i| format!("10.0.0.{i}:80").parse().expect("authority")).collect();
        endpoints.set(&found);
        endpoints
    }

    fn fail(endpoints: &Endpoints, endpoint: &Endpoint, times: usize) {
        for _ in 0..times {
            endpoints.report(endpoint, Verdict::Failed, Duration::from_millis(1));
        }
    }

    #[test]
    fn the_last_endpoint_in_rotation_is_never_ejected() {
        let endpoints = set(2, 100);
        let all = endpoints.serving();
        fail(&endpoints, &all[0], 2);
        fail(&endpoints, &all[1], 2);
        let states: Vec<State> = all.iter().map(|e| endpoints.state_of(e)).collect();
        assert_eq!(states, [State::Ejected, State::Healthy]);
        assert_eq!(endpoints.rotation.load().len(), 1);
    }

    #[test]
    fn no_more_than_max_ejected_percent_rounded_down_is_ejected() {
        let endpoints = set(3, 50);
        let all = endpoints.serving();
        for e in &all {
            fail(&endpoints, e, 2);
        }
        let ejected = all.iter().filter(|e| endpoints.state_of(e) == State::Ejected).count();
        assert_eq!(ejected, 1, "50% of 3 endpoints is one");
    }

    #[test]
    fn an_answer_between_failures_starts_the_count_again() {
        let endpoints = set(3, 50);
        let all = endpoints.serving();
        for _ in 0..5 {
            fail(&endpoints, &all[0], 1);
            endpoints.report(&all[0], Verdict::Answered, Duration::from_millis(1));
        }
        assert_eq!(endpoints.state_of(&all[0]), State::Healthy);
    }

    #[test]
    fn a_slow_endpoint_is_picked_far_less_than_fast_ones() {
        let endpoints = set(3, 50);
        let all = endpoints.serving();
        for _ in 0..10 {
            endpoints.report(&all[0], Verdict::Answered, Duration::from_millis(300));
            endpoints.report(&all[1], Verdict::Answered, Duration::from_millis(5));
            endpoints.report(&all[2], Verdict::Answered, Duration::from_millis(5));
        }
        let slow = (0..1000).filter(|_| endpoints.pick(&[]).is_some_and(|load| Arc::ptr_eq(load.endpoint(), &all[0]))).count();
        assert!(slow < 100, "the slow endpoint got {slow} of 1000");
    }

    #[test]
    fn a_retry_avoids_every_endpoint_already_tried_while_another_is_left() {
        let endpoints = set(3, 50);
        let all = endpoints.serving();
        for _ in 0..200 {
            let load = endpoints.pick(&all[1..2]).expect("an endpoint");
            assert!(!Arc::ptr_eq(load.endpoint(), &all[1]));
            let load = endpoints.pick(&all[..2]).expect("an endpoint");
            assert!(Arc::ptr_eq(load.endpoint(), &all[2]), "the only one not tried");
        }
        assert!(endpoints.pick(&all).is_some(), "every one tried: any");
    }

    #[test]
    fn failures_reported_at_once_eject_an_endpoint_once() {
        let endpoints = set(4, 50);
        let all = endpoints.serving();
        fail(&endpoints, &all[0], 2);
        let until = all[0].health().ejected_until;
        endpoints.try_eject(&all[0]);
        endpoints.try_eject(&all[0]);
        assert_eq!(all[0].health().ejected_until, until, "ejected again, for longer");
        assert_eq!(all[0].health().ejections, 1);
    }

    #[test]
    fn a_failing_endpoint_that_cannot_be_ejected_is_kept_off_by_the_balancer() {
        // Two of three fail fast; only one may be ejected (50% of 3, rounded down).
        let endpoints = set(3, 50);
        let all = endpoints.serving();
        for _ in 0..10 {
            endpoints.report(&all[2], Verdict::Answered, Duration::from_millis(5));
        }
        fail(&endpoints, &all[0], 4);
        fail(&endpoints, &all[1], 4);
        let states: Vec<State> = all.iter().map(|e| endpoints.state_of(e)).collect();
        assert_eq!(states.iter().filter(|s| **s == State::Ejected).count(), 1, "{states:?}");
        let to_failing = (0..1000).filter(|_| endpoints.pick(&[]).is_some_and(|load| !Arc::ptr_eq(load.endpoint(), &all[2]))).count();
        assert!(to_failing < 50, "{to_failing} of 1000 picks went to the failing endpoint");
    }

    #[test]
    fn gone_endpoints_drain_and_are_forgotten_once_idle() {
        let endpoints = set(2, 50);
        let held = endpoints.pick(&[]).expect("an endpoint");
        let kept = endpoints.serving().into_iter().find(|e| !Arc::ptr_eq(e, held.endpoint())).expect("the other");
        endpoints.set(std::slice::from_ref(&kept.authority));
        assert_eq!(endpoints.state_of(held.endpoint()), State::Draining);
        for _ in 0..50 {
            assert!(Arc::ptr_eq(endpoints.pick(&[]).expect("kept").endpoint(), &kept));
        }
        endpoints.tick();
        assert_eq!(endpoints.report_all().len(), 2, "kept while a request is in flight");
        drop(held);
        endpoints.tick();
        assert_eq!(endpoints.report_all().len(), 1);
    }
}
