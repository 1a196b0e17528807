//! Origin connections that retire (`connection_max_age`).
//!
//! A keep-alive connection under steady load never goes idle, so it stays on the address
//! it was opened to for good: a changed DNS answer, a blue/green switch or a new pod behind
//! a Service would never get its traffic. Each connection is given a time to retire when
//! it is made (its `connection_max_age`, less up to 10% at random, so a pool's
//! connections do not all go at once); a response that arrives on a connection past it
//! (one in four is looked at) poisons the connection, so the pool closes it once that
//! response is done instead of reusing it. hyper-util's pool has no maximum age of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{CaptureConnection, Connected, Connection};
use tokio::time::Instant;

/// Wraps a connector: every connection it makes carries its time to retire.
#[derive(Clone)]
pub struct AgedConnector<C> {
    inner: C,
    max_age: Duration,
    open: Arc<AtomicUsize>,
}

impl<C> AgedConnector<C> {
    /// `open` counts the connections it made that are still open.
    pub fn new(inner: C, max_age: Duration, open: Arc<AtomicUsize>) -> AgedConnector<C> {
        AgedConnector { inner, max_age, open }
    }
}

/// Counts one open connection until dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// When a connection is to be retired (in its [`Connected`] extras).
#[derive(Clone, Copy, Debug)]
struct RetireAt(Instant);

/// A connection and its time to retire.
pub struct Aged<T> {
    inner: T,
    retire_at: Instant,
    _open: Open,
}

impl<C> tower_service::Service<http::Uri> for AgedConnector<C>
where
    C: tower_service::Service<http::Uri>,
    C::Future: Send + 'static,
{
    type Response = Aged<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let lifetime = self.max_age.mul_f64(1.0 - fastrand::f64() * 0.1);
        let open = self.open.clone();
        Box::pin(async move {
            let inner = connecting.await?;
            open.fetch_add(1, Ordering::Relaxed);
            Ok(Aged { inner, retire_at: Instant::now() + lifetime, _open: Open(open) })
        })
    }
}

impl<T: Connection> Connection for Aged<T> {
    fn connected(&self) -> Connected {
        self.inner.connected().extra(RetireAt(self.retire_at))
    }
}

impl<T: Read + Unpin> Read for Aged<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Aged<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

/// After a response: the connection it came on is not reused if it is past its time, or
/// if `surplus` (the origin has more connections open than it may use at once, idle ones
/// on endpoints that had traffic before).
pub fn retire_if_old(captured: &CaptureConnection, surplus: bool) {
    let metadata = captured.connection_metadata();
    let Some(connected) = metadata.as_ref() else { return };
    if surplus {
        connected.poison();
        return;
    }
    let mut extras = http::Extensions::new();
    connected.get_extras(&mut extras);
    if extras.get::<RetireAt>().is_some_and(|at| Instant::now() >= at.0) {
        connected.poison();
    }
}
