//! Admission on the request path: a request about to reach the origin is charged to its
//! route's budgets (see [`crate::admission`]); hits, stale serves, coalesced waiters and
//! background refreshes never come here. A refused request gets a stored copy within its
//! stale-if-error window (`stale_limited`), else 429 (`limited`).

use std::sync::Arc;

use http::Method;

use super::decision::{Decision, Serve};
use super::fetch::FetchJob;
use super::forward::ClientInfo;
use crate::admission::{Link, Refusal};
use crate::cache::{Entry, Pool};
use crate::error::ProxyError;
use crate::outcome::{Outcome, StaleReason};
use crate::runtime::RouteRuntime;

/// Charges the fetch of `job` to its client and, when nothing is stored for its key, to
/// the route's new keys; the decision for a refused one.
pub(super) fn admit(job: &FetchJob) -> Option<Decision> {
    admit_as(job, Charge::Take)
}

/// Whether [`admit`] would refuse `job`, spending nothing: a flight's leader, before it
/// holds back for the other replicas (a refused request costs Redis no lease). It is
/// charged only once it knows it will fetch: a key another replica filled costs nothing.
pub(super) fn precheck(job: &FetchJob) -> Option<Decision> {
    admit_as(job, Charge::Check)
}

/// Spend a token, or only see whether there is one.
#[derive(Clone, Copy)]
enum Charge {
    Take,
    Check,
}

fn admit_as(job: &FetchJob, how: Charge) -> Option<Decision> {
    job.route.admission.as_ref()?;
    if job.background {
        return None;
    }
    let new_key = job.stored.is_none().then_some(job.key.hash);
    let refusal = charge(&job.route, Some(&job.pool), Some(&job.client), &job.parts.method, new_key, how)?;
    Some(refused(&job.route, refusal, job.stored.as_ref(), job.pool.clock.now()))
}

/// Charges a request that skips the cache (its key is no key: no new-key token).
pub(super) fn admit_bypass(route: &RouteRuntime, client: &ClientInfo, method: &Method) -> Option<Decision> {
    route.admission.as_ref()?;
    let refusal = charge(route, route.pool.as_ref(), Some(client), method, None, Charge::Take)?;
    Some(refused(route, refusal, None, route.clock.now()))
}

fn charge(route: &RouteRuntime, pool: Option<&Arc<Pool>>, client: Option<&ClientInfo>, method: &Method, new_key: Option<u128>, how: Charge) -> Option<Refusal> {
    let admission = route.admission.as_ref()?;
    let default = crate::admission::ClientSource::default();
    let who = client.filter(|_| admission.charges(method)).map(|client| (client.source.as_ref().unwrap_or(&default), client.peer));
    if who.is_none() && (new_key.is_none() || admission.config.new_keys.is_none()) {
        return None;
    }
    let link = match pool.and_then(|p| p.l2.as_ref()) {
        None => Link::Absent,
        Some(shared) if shared.is_down() => Link::Down,
        Some(_) => Link::Up,
    };
    let result = match how {
        Charge::Check => admission.check(link, who, new_key),
        Charge::Take => {
            let (result, asks) = admission.charge(link, who, new_key);
            // The next blocks of tokens, asked for off the request's path.
            if let Some(pool) = pool.filter(|_| !asks.is_empty()) {
                let (admission, pool) = (admission.clone(), pool.clone());
                tokio::spawn(async move {
                    if let Some(shared) = &pool.l2 {
                        admission.ask(shared, asks).await;
                    }
                });
            }
            result
        }
    };
    let refusal = result.err()?;
    route.metrics.admission_rejected(refusal.budget.index());
    Some(refusal)
}

/// A refused request's decision: the stored copy while its stale-if-error window allows,
/// else 429 with `Retry-After`.
fn refused(route: &RouteRuntime, refusal: Refusal, stored: Option<&Arc<Entry>>, now: std::time::SystemTime) -> Decision {
    tracing::debug!(route = route.config.name, budget = ?refusal.budget, "over the admission budget");
    match stored.filter(|entry| entry.within_stale_if_error(now)) {
        Some(entry) => Decision::entry(entry.clone(), Outcome::Stale(StaleReason::Limited)),
        None => Decision::new(Serve::Error(Arc::new(ProxyError::Limited { retry_after: refusal.retry_after_secs() })), Outcome::Limited),
    }
}
