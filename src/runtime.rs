//! What a configuration builds, and swapping it on reload.
//!
//! A [`Runtime`] is everything built from one configuration: the routing table, the
//! pools, the origins and each route's metric handles and current mode. [`Live`] holds
//! the current one behind an `ArcSwap`: each request takes one snapshot and finishes on
//! it, so a reload never changes a request half-way. A reload builds a new runtime that
//! keeps every pool and origin whose settings did not change (their L1, Redis
//! connections, bulkheads and breakers) and each route's runtime mode; a pool whose
//! other settings changed gets a new L1 of its new size holding the old one's entries.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;

use crate::cache::Pool;
use crate::cache::shared::SharedTierError;
use crate::clock::Clock;
use crate::config::{Config, RouteConfig, RouteMode};
use crate::memory::ByteBudget;
use crate::metrics::{Registry, RouteMetrics};
use crate::origin::Origin;
use crate::router::Router;

/// Errors building a runtime from a configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    SharedTier(#[from] SharedTierError),
    #[error("cannot set up TLS for origins")]
    Tls(#[from] rustls::Error),
}

/// One route with everything it needs on the request path.
pub struct RouteRuntime {
    pub config: RouteConfig,
    /// The route's pool; none for a pass-through route (`cache = false`) without one.
    pub pool: Option<Arc<Pool>>,
    pub origin: Arc<Origin>,
    pub metrics: RouteMetrics,
    /// The wall time the route's requests go by (its pool's, when it has one).
    pub clock: Clock,
    /// The process's budget for storable bodies being read (`max_inflight_body_bytes`).
    pub body_budget: Arc<ByteBudget>,
    /// The route's admission budgets, if it has any.
    pub admission: Option<Arc<crate::admission::Admission>>,
    /// The route's current mode: read by every request, written by the admin API and
    /// the control channel. An atomic because it is one small value that changes rarely.
    mode: std::sync::atomic::AtomicU8,
}

impl RouteRuntime {
    pub fn mode(&self) -> RouteMode {
        RouteMode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    /// Switches the mode; `fallback` needs a configured fallback response.
    pub fn set_mode(&self, mode: RouteMode) -> Result<(), ModeError> {
        if mode == RouteMode::Fallback && self.config.fallback.is_none() {
            return Err(ModeError::NoFallback);
        }
        self.mode.store(mode.as_u8(), Ordering::Relaxed);
        self.metrics.show_mode(mode);
        Ok(())
    }
}

/// Why a route mode could not be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    #[error("the route has no fallback response configured")]
    NoFallback,
}

/// Everything built from one configuration.
pub struct Runtime {
    pub config: Config,
    pub(crate) router: Router,
    pub routes: Vec<Arc<RouteRuntime>>,
    pub pools: Vec<Arc<Pool>>,
    pub origins: Vec<Arc<Origin>>,
    pub(crate) unrouted: metrics::Counter,
    body_budget: Arc<ByteBudget>,
    /// Replicas alive in the control Redis, this one included (0: not known); shared with
    /// [`Live`] and every runtime a reload builds from this one.
    replicas: Arc<std::sync::atomic::AtomicUsize>,
}

impl Runtime {
    /// Builds pools, origins and routes, registering every metric handle now. Every
    /// pool decides by `clock`.
    pub fn build(config: Config, registry: &Registry, clock: &Clock) -> Result<Runtime, BuildError> {
        Runtime::build_from(config, registry, None, clock)
    }

    /// Builds a runtime for `config`, reusing from `previous` every pool and origin whose
    /// settings did not change (so they keep their L1 contents, Redis connections,
    /// bulkheads and breakers), and keeping each route's runtime mode unless the file
    /// sets one.
    pub fn build_from(config: Config, registry: &Registry, previous: Option<&Runtime>, clock: &Clock) -> Result<Runtime, BuildError> {
        let pools = config
            .pools
            .iter()
            .map(|p| match previous.and_then(|old| old.pools.iter().find(|op| op.config == *p)) {
                Some(same) => Ok(same.clone()),
                None => match previous.and_then(|old| old.pools.iter().find(|op| op.same_store(p))) {
                    // Its L1 contents are moved in by the reload (see `Live::reload`).
                    Some(before) => Pool::succeeding(before, p.clone(), registry.pool(&p.name), clock.clone()).map(Arc::new),
                    None => Pool::new(p.clone(), registry.pool(&p.name), clock.clone()).map(Arc::new),
                },
            })
            .collect::<Result<Vec<_>, _>>()?;
        let origins = config
            .origins
            .iter()
            .map(|o| match previous.and_then(|old| old.origins.iter().find(|oo| oo.config == *o)) {
                Some(same) => Ok(same.clone()),
                None => Origin::new(o.clone(), config.server.send_timeout, registry.origin(&o.name)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Per process: kept through reloads (its size is read at start).
        let body_budget = previous.map_or_else(|| ByteBudget::new(config.server.max_inflight_body_bytes), |old| old.body_budget.clone());
        let replicas = previous.map_or_else(Arc::default, |old| old.replicas.clone());
        let config_trusted = config.server.trusted_proxies.clone();
        // Budgets keep their counts through a reload that leaves them alone.
        let admission = |r: &RouteConfig| {
            let config = r.admission.clone()?;
            let old = previous.and_then(|old| old.routes.iter().find(|or| or.config.name == r.name)).and_then(|or| or.admission.clone());
            let trusted = &config_trusted;
            Some(
                old.filter(|a| a.config == config && a.trusted_proxies == *trusted)
                    .unwrap_or_else(|| Arc::new(crate::admission::Admission::new(&r.name, config, replicas.clone(), trusted.clone()))),
            )
        };
        // A mode switched at runtime holds until the file's value for the route changes:
        // an unrelated edit (even to a file that says mode = "normal") must not undo what an
        // operator chose during an incident, on every replica at once.
        let kept_mode = |r: &RouteConfig| {
            let old = previous.and_then(|old| old.routes.iter().find(|or| or.config.name == r.name))?;
            let file_unchanged = (old.config.mode_from_file, old.config.mode) == (r.mode_from_file, r.mode);
            (file_unchanged && (old.mode() != RouteMode::Fallback || r.fallback.is_some())).then(|| old.mode())
        };
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let mode = kept_mode(r).unwrap_or(r.mode);
                let metrics = registry.route(&r.name, r.pool.map_or("", |p| config.pools[p].name.as_str()), &config.origins[r.origin].name);
                metrics.show_mode(mode);
                Arc::new(RouteRuntime {
                    config: r.clone(),
                    pool: r.pool.map(|p| pools[p].clone()),
                    origin: origins[r.origin].clone(),
                    metrics,
                    clock: clock.clone(),
                    body_budget: body_budget.clone(),
                    admission: admission(r),
                    mode: std::sync::atomic::AtomicU8::new(mode.as_u8()),
                })
            })
            .collect();
        Ok(Runtime { router: Router::new(&config.routes), routes, pools, origins, unrouted: registry.unrouted(), body_budget, replicas, config })
    }
}

/// The settings `new` changes from `old` that are read once, at start: listeners and
/// their connection settings, shutdown timings, the access log, the control Redis, the
/// body budget and tracing. (`replica_id` too, but without one in the file each read
/// makes up another, so it is not compared.)
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&old.server, &new.server);
    let checks: [(&'static str, bool); 14] = [
        ("server.listen", a.listen != b.listen),
        ("server.admin_listen", a.admin_listen != b.admin_listen),
        ("server.admin_open", a.admin_open != b.admin_open),
        ("server.listen_backlog", a.listen_backlog != b.listen_backlog),
        ("server.keepalive_idle", a.keepalive_idle != b.keepalive_idle),
        ("server.header_read_timeout", a.header_read_timeout != b.header_read_timeout),
        ("server.max_header_bytes", a.max_header_bytes != b.max_header_bytes),
        ("server.drain_delay", a.drain_delay != b.drain_delay),
        ("server.shutdown_timeout", a.shutdown_timeout != b.shutdown_timeout),
        ("server.access_log", a.access_log != b.access_log || a.access_log_sample != b.access_log_sample),
        ("server.control_redis_url", a.control_redis_url != b.control_redis_url),
        ("server.control_redis_ca_file", a.control_redis_ca != b.control_redis_ca),
        ("tracing", old.tracing != new.tracing),
        ("server.max_inflight_body_bytes", a.max_inflight_body_bytes != b.max_inflight_body_bytes),
    ];
    checks.into_iter().filter(|(_, changed)| *changed).map(|(name, _)| name).collect()
}

/// Why a reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this server was not started from a config file")]
    NoFile,
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// The running configuration: the current [`Runtime`], and what a reload needs.
pub struct Live {
    runtime: ArcSwap<Runtime>,
    pub registry: Arc<Registry>,
    /// The file reloads read, when the configuration came from one.
    config_path: Option<PathBuf>,
    /// One reload at a time (SIGHUP, the admin API and the file watcher may race).
    reload_lock: tokio::sync::Mutex<()>,
    reloads: [metrics::Counter; 2],
    /// The clock every pool built here decides by, reloads included.
    clock: Clock,
    /// Replicas alive in the control Redis, this one included (0: not known): the
    /// runtimes' (admission budgets read it when counting alone).
    replicas: Arc<std::sync::atomic::AtomicUsize>,
}

impl Live {
    /// Builds the runtime of `config`, which came from `config_path` if given, on
    /// `clock` (the system's, but for tests).
    pub fn new(config: Config, config_path: Option<PathBuf>, clock: Clock) -> Result<Live, BuildError> {
        let registry = Arc::new(Registry::new());
        let runtime = Runtime::build(config, &registry, &clock)?;
        let reloads = registry.reloads();
        let replicas = runtime.replicas.clone();
        Ok(Live { runtime: ArcSwap::from_pointee(runtime), registry, config_path, reload_lock: tokio::sync::Mutex::new(()), reloads, clock, replicas })
    }

    /// `replicas` are alive in the control Redis: every origin with a fleet budget takes
    /// its share of it.
    pub fn set_replicas(&self, replicas: usize) {
        self.replicas.store(replicas, Ordering::Relaxed);
        for origin in &self.runtime().origins {
            origin.set_fleet(replicas);
        }
    }

    /// The current runtime: a snapshot that stays whole whatever reloads happen.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// Reads the config file again, validates it and swaps it in. A bad file changes
    /// nothing. Requests in flight finish on the configuration they started with.
    /// Reloads the file; the settings it changed that take effect only on restart.
    pub async fn reload(&self) -> Result<Vec<&'static str>, ReloadError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let result = self.reload_locked().await;
        match &result {
            Ok(restart) if restart.is_empty() => {
                self.reloads[0].increment(1);
                tracing::info!(path = ?self.config_path, "configuration reloaded");
            }
            Ok(restart) => {
                self.reloads[0].increment(1);
                tracing::warn!(path = ?self.config_path, restart_required = ?restart, "configuration reloaded; changed settings that take effect on restart only");
            }
            Err(err) => {
                self.reloads[1].increment(1);
                tracing::error!(error = %err, "configuration reload rejected; the running configuration stays");
            }
        }
        result
    }

    async fn reload_locked(&self) -> Result<Vec<&'static str>, ReloadError> {
        let path = self.config_path.as_deref().ok_or(ReloadError::NoFile)?;
        let config = Config::load(path)?;
        let old = self.runtime.load_full();
        let restart = restart_only_changes(&old.config, &config);
        let runtime = Runtime::build_from(config, &self.registry, Some(&old), &self.clock)?;
        // Pools whose sizes, freshness or deadlines changed keep their L1 contents;
        // purges that reach the old pool while they move are applied again after the swap.
        let mut moved = Vec::new();
        for pool in &runtime.pools {
            if old.pools.iter().any(|p| Arc::ptr_eq(p, pool)) {
                continue;
            }
            if let Some(before) = old.pools.iter().find(|p| p.same_store(&pool.config)) {
                let epoch = before.purges.epoch();
                let kept = pool.take_over(before).await;
                tracing::info!(pool = pool.config.name, kept, "pool settings changed: L1 contents kept");
                moved.push((pool.clone(), epoch));
            }
            pool.start();
        }
        // Origins built anew take their fleet share before their first request.
        for origin in &runtime.origins {
            origin.set_fleet(self.replicas.load(Ordering::Relaxed));
        }
        self.runtime.store(Arc::new(runtime));
        for (pool, epoch) in moved {
            pool.apply_purges_since(epoch).await;
        }
        Ok(restart)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::cache::{CacheKey, Entry, PurgeTarget};
    use crate::encodings::Encodings;

    fn config(l1: &str) -> Config {
        let text = format!(
            "[[origins]]\nname = \"o\"\nurl = \"http://127.0.0.1:9\"\n[[pools]]\nname = \"p\"\nl1_max_bytes = \"{l1}\"\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\npool = \"p\"\norigin = \"o\"\n"
        );
        Config::parse(&text, Path::new("bulwark.toml")).expect("valid")
    }

    #[tokio::test]
    async fn a_purge_through_a_pool_a_reload_replaced_reaches_the_l1_that_took_over() {
        let (registry, clock) = (Registry::new(), Clock::system());
        let old = Runtime::build(config("1MiB"), &registry, &clock).expect("build");
        let key = CacheKey::new("http", "shop.example", "/products/1", None, Encodings::IDENTITY);
        old.pools[0].l1.insert(&key, Arc::new(Entry { key: key.text.clone(), response_time: clock.now(), ..crate::cache::entry::tests::sample() })).await;
        let new = Runtime::build_from(config("2MiB"), &registry, Some(&old), &clock).expect("build");
        assert!(!Arc::ptr_eq(&old.pools[0], &new.pools[0]), "a new size makes a new pool");
        assert_eq!(new.pools[0].take_over(&old.pools[0]).await, 1);
        assert!(new.pools[0].l1.get(&key).await.is_some(), "moved");
        // A purge that began on the old runtime (an admin purge in progress at the reload).
        old.pools[0].purge(&PurgeTarget::from_url("http://shop.example/products/1").expect("url"), false).await;
        assert!(new.pools[0].l1.get(&key).await.is_none(), "the purge missed the L1 that took over");
    }
}
