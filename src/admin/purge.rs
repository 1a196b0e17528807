//! `POST /admin/purge` and, for purges run with `"async": true`, `GET /admin/purge/{id}`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use http::{Request, StatusCode};
use hyper::body::Incoming;

use super::{AdminResponse, json};
use crate::cache::PurgeTarget;
use crate::proxy::Proxy;
use crate::runtime::Runtime;

/// Largest purge request body accepted.
const MAX_PURGE_BODY: usize = 1 << 20;
/// Most URLs or tags in one purge request.
const MAX_PURGE_ITEMS: usize = 10_000;
/// Asynchronous purges remembered for `GET /admin/purge/{id}` (the oldest finished ones go first).
const JOBS_KEPT: usize = 256;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    #[serde(default)]
    urls: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    soft: bool,
    /// Answer 202 with an id at once; the purge runs on.
    #[serde(default, rename = "async")]
    run_async: bool,
}

/// The asynchronous purges of this replica, newest last.
#[derive(Default)]
pub struct PurgeJobs {
    jobs: Mutex<VecDeque<Arc<Job>>>,
}

impl PurgeJobs {
    /// Keeps `job`, forgetting the oldest finished one when full; `false` when every
    /// kept job is still running (the purge is then refused).
    fn add(&self, job: Arc<Job>) -> bool {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if jobs.len() >= JOBS_KEPT {
            let Some(oldest_done) = jobs.iter().position(|j| j.outcome.get().is_some()) else { return false };
            jobs.remove(oldest_done);
        }
        jobs.push_back(job);
        true
    }

    fn find(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|j| j.id == id).cloned()
    }
}

/// One purge: its progress while it runs, its answer once done.
struct Job {
    id: String,
    soft: bool,
    /// Redis entries purged so far, over every pool.
    l2: AtomicUsize,
    /// L1 slots purged so far (URL targets), over every pool.
    l1: AtomicUsize,
    /// The L1 part of `purged` so far: pools without Redis.
    purged_local: AtomicUsize,
    /// Pools whose part is done.
    pools_done: AtomicUsize,
    pools: usize,
    outcome: OnceLock<(StatusCode, serde_json::Value)>,
}

/// `POST /admin/purge`: `{"urls": [...]}` or `{"tags": [...]}`, optional `"soft": true`
/// and `"async": true`, applied to every pool and, through Redis, to every replica.
pub async fn purge(proxy: &Proxy, jobs: &PurgeJobs, req: Request<Incoming>) -> AdminResponse {
    use http_body_util::BodyExt;
    let body = match http_body_util::Limited::new(req.into_body(), MAX_PURGE_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return json(StatusCode::PAYLOAD_TOO_LARGE, serde_json::json!({ "error": "purge request body over 1 MiB" })),
    };
    let request: PurgeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": format!("invalid purge request: {e}") })),
    };
    let runtime = proxy.runtime();
    let targets: Result<Vec<PurgeTarget>, String> = match (request.urls.is_empty(), request.tags.is_empty()) {
        (false, true) => request.urls.iter().map(|u| routed_targets(&runtime, u)).collect::<Result<Vec<_>, _>>().map(|t| t.concat()),
        (true, false) => request.tags.iter().map(|t| PurgeTarget::tag(t)).collect(),
        _ => Err("give either \"urls\" or \"tags\", not both and not neither".to_owned()),
    };
    let targets = match targets {
        Ok(t) if t.len() <= MAX_PURGE_ITEMS => t,
        Ok(_) => return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": format!("at most {MAX_PURGE_ITEMS} urls or tags per request") })),
        Err(e) => return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": e })),
    };
    let job = Arc::new(Job {
        id: format!("{:016x}", fastrand::u64(..)),
        soft: request.soft,
        l2: AtomicUsize::new(0),
        l1: AtomicUsize::new(0),
        purged_local: AtomicUsize::new(0),
        pools_done: AtomicUsize::new(0),
        pools: runtime.pools.len(),
        outcome: OnceLock::new(),
    });
    if request.run_async && !jobs.add(job.clone()) {
        return json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "error": format!("{JOBS_KEPT} async purges are still running here; retry later") }));
    }
    // Its own task, awaited or not: a client that hangs up does not leave it half done.
    let task = {
        let job = job.clone();
        tokio::spawn(async move {
            let outcome = run(&runtime, &targets, &job).await;
            job.outcome.get_or_init(|| outcome).clone()
        })
    };
    if request.run_async {
        return json(StatusCode::ACCEPTED, serde_json::json!({ "id": job.id, "soft": job.soft, "complete": false, "running": true }));
    }
    match task.await {
        Ok((status, answer)) => json(status, answer),
        Err(_) => json(StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({ "error": "a purge task failed" })),
    }
}

/// The targets of purge URL `text`, its query normalised as its route normalises
/// requests' (`query_params`, `ignore_query_params`): for a URL, the route its host and
/// path take; for a bare path, every route whose prefix matches, on any host.
fn routed_targets(runtime: &Runtime, text: &str) -> Result<Vec<PurgeTarget>, String> {
    PurgeTarget::from_url_routed(text, |host, path| match host {
        Some(host) => runtime.router.route(host, path).map(|i| &runtime.routes[i].config.cache).into_iter().collect(),
        None => runtime.routes.iter().filter(|r| path.starts_with(r.config.path_prefix.as_str())).map(|r| &r.config.cache).collect(),
    })
}

/// `GET /admin/purge/{id}`: an asynchronous purge's answer once done (as the synchronous
/// one, with its id and `"running": false`), or its progress while it runs.
pub fn progress(jobs: &PurgeJobs, id: &str) -> AdminResponse {
    let Some(job) = jobs.find(id) else {
        return json(StatusCode::NOT_FOUND, serde_json::json!({ "error": format!("no purge with id {id:?} (kept: the last {JOBS_KEPT})") }));
    };
    if let Some((status, answer)) = job.outcome.get() {
        let mut answer = answer.clone();
        answer["id"] = job.id.clone().into();
        answer["running"] = false.into();
        return json(*status, answer);
    }
    json(
        StatusCode::OK,
        serde_json::json!({
            "id": job.id,
            "purged": job.l2.load(Ordering::Relaxed) + job.purged_local.load(Ordering::Relaxed),
            "l1": job.l1.load(Ordering::Relaxed),
            "l2": job.l2.load(Ordering::Relaxed),
            "soft": job.soft,
            "pools_done": job.pools_done.load(Ordering::Relaxed),
            "pools": job.pools,
            "replicas": "none yet: each pool's replicas are told once its Redis part is done",
            "complete": false,
            "running": true,
        }),
    )
}

/// Runs the purge on every pool (one task each); the answer and its status.
async fn run(runtime: &Arc<Runtime>, targets: &[PurgeTarget], job: &Arc<Job>) -> (StatusCode, serde_json::Value) {
    let tasks: Vec<_> = runtime
        .pools
        .iter()
        .map(|pool| {
            let (pool, targets, job) = (pool.clone(), targets.to_vec(), job.clone());
            tokio::spawn(async move {
                let mut total = crate::cache::PurgeCount { all_replicas: true, ..Default::default() };
                for target in &targets {
                    let count = pool.purge_counting(target, job.soft, &job.l2).await;
                    job.l1.fetch_add(count.l1, Ordering::Relaxed);
                    if pool.l2.is_none() {
                        job.purged_local.fetch_add(count.l1, Ordering::Relaxed);
                    }
                    total.l1 += count.l1;
                    total.l2 += count.l2;
                    total.all_replicas &= count.all_replicas;
                    if count.error.is_some() {
                        // Stop at the first failure: the answer says what was done.
                        total.error = count.error;
                        break;
                    }
                }
                job.pools_done.fetch_add(1, Ordering::Relaxed);
                (pool.config.name.clone(), pool.l2.is_some(), total)
            })
        })
        .collect();
    let (mut l1, mut l2, mut purged) = (0, 0, 0);
    let (mut local_only, mut errors, mut untold) = (Vec::new(), Vec::new(), Vec::new());
    for task in tasks {
        let Ok((name, shared, count)) = task.await else {
            return (StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({ "error": "a purge task failed", "complete": false }));
        };
        l1 += count.l1;
        l2 += count.l2;
        // An entry counts once: from Redis where the pool has it, else from this L1.
        purged += if shared { count.l2 } else { count.l1 };
        if let Some(error) = count.error {
            errors.push(format!("pool {name}: {error}"));
            untold.push(name);
        } else if !count.all_replicas {
            local_only.push(name);
        }
    }
    let replicas = if !untold.is_empty() {
        format!("none for pools whose purge did not complete: {}", untold.join(", "))
    } else if local_only.is_empty() {
        "all replicas".to_owned()
    } else {
        format!("this replica only for pools without a reachable Redis: {}", local_only.join(", "))
    };
    let mut answer = serde_json::json!({ "purged": purged, "l1": l1, "l2": l2, "soft": job.soft, "replicas": replicas, "complete": errors.is_empty() });
    if errors.is_empty() {
        return (StatusCode::OK, answer);
    }
    // Redis failed part way: what was done, and that the rest was not (no replica was
    // told to drop what Redis still holds).
    answer["error"] = serde_json::Value::from(errors.join("; "));
    (StatusCode::SERVICE_UNAVAILABLE, answer)
}
