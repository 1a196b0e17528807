//! Client connections of a listener, each served in its own task and closed gracefully
//! (GOAWAY on HTTP/2, `Connection: close` semantics on HTTP/1.1) at shutdown, or, for an
//! HTTP/2 connection, once it has had no open stream for `keepalive_idle`: hyper's h2
//! server keeps a connection whose client answers pings open forever.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::rt::{Read, Write};
use hyper::service::Service;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::sync::watch;

use crate::client_timers::Requests;

/// The connections of one listener.
pub struct Connections {
    stop: watch::Sender<bool>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections { stop: watch::channel(false).0 }
    }
}

impl Connections {
    /// Serves `conn` in its own task until it ends, shutdown begins, or (HTTP/2) it is
    /// idle for `idle`. `requests` is what its service tells its timers.
    pub fn serve<I, S, B>(&self, conn: auto::Connection<'static, I, S, TokioExecutor>, requests: Arc<Requests>, idle: Duration)
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn StdError + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
        I: Read + Write + Unpin + Send + 'static,
    {
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => Some(ended),
                _ = stop.wait_for(|stop| *stop) => None,
                () = requests.h2_idle(idle) => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = ended {
                tracing::debug!(error = %err, "client connection ended with an error");
            }
            // `stop` is held until here: shutdown waits for this connection.
            drop(stop);
        });
    }

    /// Tells every connection to close gracefully and waits until all have.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        self.stop.closed().await;
    }
}
