//! Origin connections that retire (`connection_max_age`).
//!
//! A keep-alive connection under steady load never goes idle, so it stays on the address
//! it was opened to for good: a changed DNS answer, a blue/green switch or a new pod behind
//! a Service would never get its traffic. Each connection is given a time to retire when
//! it is made (its `connection_max_age`, less up to 10% at random, so a pool's
//! connections do not all go at once); a response that arrives on a connection past it
//! (one in four is looked at) poisons the connection, so the pool closes it once that
//! response is done instead of reusing it. hyper-util's pool has no maximum age of its own.
//!
//! The connections of an origin are also counted and known by their last use, over all its
//! endpoints (hyper-util's pool bounds idle connections per host only): once more are open
//! than the origin may use at once, plus as many idle, those idle longest are closed (the
//! next read ends each, so the pool drops it), wherever they are; only connections silent
//! longer than any request on them could be, so none in use is ever closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    open: Arc<OpenConnections>,
}

impl<C> AgedConnector<C> {
    /// `open` keeps track of the connections it made that are still open.
    pub fn new(inner: C, max_age: Duration, open: Arc<OpenConnections>) -> AgedConnector<C> {
        AgedConnector { inner, max_age, open }
    }
}

/// How often, at most, the connections are walked for idle ones while over the bound.
const CHECK_EVERY_MS: u64 = 250;

/// The open connections of one origin, over all its endpoints.
pub struct OpenConnections {
    count: AtomicUsize,
    all: std::sync::Mutex<Vec<std::sync::Weak<Tracked>>>,
    epoch: Instant,
    /// A connection with no read or write for longer than this is idle for sure: one
    /// carrying a request is never silent that long (the origin's `timeout` bounds the
    /// wait for a head and each silence in a body; `send_timeout`, a client's pause).
    idle_after_ms: u64,
    /// Not walked again before this (ms since the epoch).
    next_check_ms: AtomicU64,
}

impl OpenConnections {
    pub fn new(idle_after: Duration) -> OpenConnections {
        OpenConnections {
            count: AtomicUsize::new(0),
            all: std::sync::Mutex::default(),
            epoch: Instant::now(),
            idle_after_ms: u64::try_from(idle_after.as_millis()).unwrap_or(u64::MAX),
            next_check_ms: AtomicU64::new(0),
        }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn register(&self, tracked: &Arc<Tracked>) {
        let mut all = self.all.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Closed ones are forgotten here too, so the list stays near the open count.
        if all.len() > 2 * self.count() + 16 {
            all.retain(|weak| weak.strong_count() > 0);
        }
        all.push(Arc::downgrade(tracked));
    }

    /// Closes connections idle for sure, those idle longest first, until at most `bound`
    /// are open or being closed; at most every [`CHECK_EVERY_MS`].
    pub fn close_idle(&self, bound: usize) {
        let now = self.now_ms();
        let next = self.next_check_ms.load(Ordering::Relaxed);
        if now < next || self.next_check_ms.compare_exchange(next, now + CHECK_EVERY_MS, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return;
        }
        let mut all = self.all.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|weak| weak.strong_count() > 0);
        let open: Vec<Arc<Tracked>> = all.iter().filter_map(std::sync::Weak::upgrade).collect();
        drop(all);
        let closing = open.iter().filter(|c| c.closing.load(Ordering::Relaxed)).count();
        let excess = open.len().saturating_sub(closing).saturating_sub(bound);
        let idle_since = now.saturating_sub(self.idle_after_ms);
        let mut idle: Vec<&Arc<Tracked>> =
            open.iter().filter(|c| !c.closing.load(Ordering::Relaxed) && c.last_used.load(Ordering::Relaxed) <= idle_since).collect();
        idle.sort_by_key(|c| c.last_used.load(Ordering::Relaxed));
        for connection in idle.into_iter().take(excess) {
            connection.closing.store(true, Ordering::Release);
            connection.reader.wake();
        }
    }
}

/// What the origin knows of one open connection.
struct Tracked {
    /// When it was last read from or written to, in ms since the origin's epoch.
    last_used: AtomicU64,
    /// Set to close it: its next read ends the connection.
    closing: AtomicBool,
    /// The task reading it (an idle pooled connection is read by hyper to see it close).
    reader: futures_util::task::AtomicWaker,
    open: Arc<OpenConnections>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.open.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// When a connection is to be retired (in its [`Connected`] extras).
#[derive(Clone, Copy, Debug)]
struct RetireAt(Instant);

/// A connection and its time to retire.
pub struct Aged<T> {
    inner: T,
    retire_at: Instant,
    tracked: Arc<Tracked>,
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
            open.count.fetch_add(1, Ordering::Relaxed);
            let tracked = Arc::new(Tracked {
                last_used: AtomicU64::new(open.now_ms()),
                closing: AtomicBool::new(false),
                reader: futures_util::task::AtomicWaker::new(),
                open: open.clone(),
            });
            open.register(&tracked);
            Ok(Aged { inner, retire_at: Instant::now() + lifetime, tracked })
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
        // Closed to bring the origin within its bound: reads as the peer closing.
        if self.tracked.closing.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_pending() {
            self.tracked.reader.register(cx.waker());
            if self.tracked.closing.load(Ordering::Acquire) {
                return Poll::Ready(Ok(()));
            }
        } else {
            let now = self.tracked.open.now_ms();
            self.tracked.last_used.store(now, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: Write + Unpin> Write for Aged<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let now = self.tracked.open.now_ms();
        self.tracked.last_used.store(now, Ordering::Relaxed);
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
        let now = self.tracked.open.now_ms();
        self.tracked.last_used.store(now, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

/// After a response: the connection it came on is not reused if it is past its time.
pub fn retire_if_old(captured: &CaptureConnection) {
    let metadata = captured.connection_metadata();
    let Some(connected) = metadata.as_ref() else { return };
    let mut extras = http::Extensions::new();
    connected.get_extras(&mut extras);
    if extras.get::<RetireAt>().is_some_and(|at| Instant::now() >= at.0) {
        connected.poison();
    }
}
