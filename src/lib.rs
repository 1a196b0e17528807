//! bulwark: a cache-aside HTTP edge service.
//!
//! # Layout
//!
//! - [`config`]: the TOML file format, validation into typed values, `PATH:LINE:COL` errors.
//! - [`server`]: listeners, the accept loop (HTTP/1.1 and h2c), graceful shutdown; [`run`].
//! - [`access_log`]: one sampled line per request, written off the request path.
//! - [`client_timers`]: the first-byte and request-head timers of client connections
//!   that hyper does not keep.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/admin/*` on the admin listener.
//! - [`control`]: route modes shared by every replica through `control_redis_url`.
//! - [`router`]: request to route (longest `path_prefix`, optional host).
//! - [`runtime`]: what a configuration builds (routes, pools, origins, metric handles,
//!   route modes), and reload: the live runtime swapped whole.
//! - [`proxy`]: the request path, one phase per module, each calling down only: route,
//!   mode, bypass, the cache-aside phases of GET/HEAD (prepare, key, lookup, choose),
//!   coalescing, fetch and store, all deciding one `Decision` (what to serve and its
//!   outcome, stale-on-error applied once), rendered by one function (HEAD, 304, `Age`,
//!   `Cache-Status`), and the record taken when the response body ends; `trust` says
//!   which request headers may reach the origin.
//! - [`body`]: the body of every response (stored, empty, or streamed from an origin),
//!   telling the record phase how it ended.
//! - [`outcome`]: the [`outcome::Outcome`] of a request, behind both `Cache-Status` and
//!   the `cache` metric label (a leaf: the cache, metrics and proxy all speak it).
//! - [`encodings`]: content-coding sets, the `Accept-Encoding` part of a key (a leaf).
//! - [`admission`]: budgets of origin requests per client and per route's new keys,
//!   counted in the pool's Redis across replicas (alone with a share when it is down).
//! - [`cache`]: keys (normalisation, variants by `Vary`), the versioned entry format and
//!   building entries from responses, the RFC 9111 policy (with RFC 9213 targeted fields)
//!   and reuse decisions, revalidation and conditionals, the moka tier (L1), the Redis
//!   tier (L2), coalescing in-process and across replicas (the Redis lease), and the
//!   [`cache::Pool`] joining them.
//! - [`origin`]: pooled clients per origin, the concurrency limit and queue, the breaker,
//!   the timings of one origin call.
//! - [`metrics`]: metric names, the per-instance recorder, pre-registered handles.
//! - [`scrape`]: Prometheus text as bulwark writes it, read back (`top`, `demo`).
//! - [`error`]: request-path errors with their source, and the one error-to-status map.
//! - [`log_every`]: warnings written at most once per period, with how many were left out.
//! - [`clock`]: the wall time every pool decides by (a leaf; tests move it forward).
//!
//! No two top-level modules import each other, directly or through others
//! (`tests/layering.rs`): the leaves (`outcome`, `encodings`, `clock`) import nothing; `config`,
//! `cache`, `origin`, `metrics` and `error` never import the request path above them.
//!
//! # Why it is built this way
//!
//! Each pool owns its L1, its Redis connection and its metrics, so the failure of one
//! pool's Redis touches no other pool. Redis is always optional on the request path: every
//! call has a hard deadline and any failure is a miss. The configuration is validated
//! whole before anything is built, and the built [`runtime::Runtime`] sits behind an
//! `ArcSwap`, so each request runs on one consistent snapshot. Metrics belong to a server
//! instance, not the process, so tests can run many instances side by side.

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod body;
pub mod cache;
pub mod cli;
pub mod client_timers;
pub mod clock;
pub mod config;
pub mod connections;
pub mod control;
pub mod encodings;
pub mod error;
pub mod log_every;
pub mod memory;
pub mod metrics;
pub mod origin;
pub mod outcome;
pub mod proxy;
pub mod router;
pub mod runtime;
pub mod scrape;
pub mod server;
pub mod trace;

pub use config::Config;
pub use server::{Listeners, RunError, run, run_with, run_with_file};
