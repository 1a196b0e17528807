//! Route modes shared by every replica (with `control_redis_url`).
//!
//! Modes live in a Redis hash (`bulwark:control:modes`, route name to mode), so a
//! restarted or new replica starts in the current modes; a change is published on
//! `bulwark:control:events` and applied by every replica at once. A replica whose
//! subscription drops reads the hash again when it is back.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::RouteMode;
use crate::runtime::Live;

const MODES_KEY: &str = "bulwark:control:modes";
const CHANNEL: &str = "bulwark:control:events";
const TIMEOUT: Duration = Duration::from_secs(2);

pub struct Control {
    client: redis::Client,
    conn: ConnectionManager,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control Redis did not answer in time")]
    Timeout,
    #[error("the control Redis failed")]
    Redis(#[from] redis::RedisError),
}

impl Control {
    /// Connects lazily to `url`; the returned handle publishes mode changes.
    pub fn new(url: &str) -> Result<Arc<Control>, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new().set_response_timeout(Some(TIMEOUT)).set_connection_timeout(Some(TIMEOUT));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Arc::new(Control { client, conn }))
    }

    /// Stores a route's mode and tells every replica.
    pub async fn set_mode(&self, route: &str, mode: RouteMode) -> Result<(), ControlError> {
        let mut conn = self.conn.clone();
        let work = async {
            conn.hset::<_, _, _, ()>(MODES_KEY, route, mode.as_str()).await?;
            conn.publish::<_, _, i64>(CHANNEL, format!("mode:{}:{route}", mode.as_str())).await?;
            Ok::<(), redis::RedisError>(())
        };
        tokio::time::timeout(TIMEOUT, work).await.map_err(|_| ControlError::Timeout)??;
        Ok(())
    }

    /// Applies every stored mode to the current routes.
    async fn apply_stored(&self, live: &Live) {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(TIMEOUT, conn.hgetall::<_, Vec<(String, String)>>(MODES_KEY)).await {
            Ok(Ok(modes)) => {
                for (route, mode) in modes {
                    apply(live, &route, &mode);
                }
            }
            _ => tracing::warn!("cannot read route modes from the control Redis"),
        }
    }

    /// Applies the stored modes now, then follows changes until the process ends.
    pub async fn start(self: Arc<Self>, live: Arc<Live>) {
        self.apply_stored(&live).await;
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let session = async {
                    let mut pubsub = self.client.get_async_pubsub().await?;
                    pubsub.subscribe(CHANNEL).await?;
                    // Changes made while unsubscribed were missed: read them all again.
                    self.apply_stored(&live).await;
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        if let Ok(payload) = msg.get_payload::<String>()
                            && let Some(("mode", rest)) = payload.split_once(':')
                            && let Some((mode, route)) = rest.split_once(':')
                        {
                            apply(&live, route, mode);
                        }
                    }
                    Ok::<(), redis::RedisError>(())
                };
                if let Err(err) = session.await {
                    tracing::warn!(error = %err, "control channel failed; retrying");
                } else {
                    backoff = Duration::from_millis(100);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }
}

fn apply(live: &Live, route: &str, mode: &str) {
    let Some(mode) = RouteMode::parse(mode) else { return };
    if let Some(r) = live.runtime().routes.iter().find(|r| r.config.name == route) {
        match r.set_mode(mode) {
            Ok(()) => tracing::info!(route, mode = mode.as_str(), "route mode applied from the control channel"),
            Err(err) => tracing::warn!(route, error = %err, "route mode from the control channel not applied"),
        }
    }
}
