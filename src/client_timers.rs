//! Timers on client connections that hyper does not keep. hyper's HTTP/1.1 header timer
//! also runs while a keep-alive connection is idle, so it stays at `keepalive_idle` (an
//! ALB reuses idle connections for 60 s and sees a 502 if we close first); these add:
//!
//! - a first-byte timer: a new connection that sends nothing is closed after
//!   `keepalive_idle` (hyper-util's `auto` reads the preface with no timer at all);
//! - a head timer: once the first byte of an HTTP/1.1 request head has arrived, the head
//!   must be complete within `header_read_timeout`, however slowly it is dribbled.
//!
//! - a send timer: a connection whose writes make no progress for `send_timeout` is
//!   closed (armed only when a write would wait);
//! - an idle timer for HTTP/2 ([`Requests::h2_idle`]): no open stream for
//!   `keepalive_idle`, and [`crate::connections`] sends GOAWAY.
//!
//! The timers live in the connection's IO ([`TimedIo`]); the service tells them when a
//! request head is complete and when its response has ended ([`Requests`]). An h2c
//! connection (its preface is the first thing read) gets the first-byte timer only.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The two limits, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub keepalive_idle: Duration,
    pub header_read_timeout: Duration,
    pub send_timeout: Duration,
}

impl Limits {
    pub fn of(server: &crate::config::ServerConfig) -> Limits {
        Limits { keepalive_idle: server.keepalive_idle, header_read_timeout: server.header_read_timeout, send_timeout: server.send_timeout }
    }
}

/// What the service tells a connection's timers: requests in progress (head received,
/// response not yet ended), and how many have started.
#[derive(Debug)]
pub struct Requests {
    active: AtomicUsize,
    started: AtomicU64,
    /// The connection speaks HTTP/2 (its preface was read).
    h2: AtomicBool,
    opened: Instant,
    /// HTTP/2: when the last open stream ended, in milliseconds since `opened`.
    idle_since_ms: AtomicU64,
    /// Set by [`Closer::close`]: the connection's next write fails, so hyper closes it.
    closing: AtomicBool,
    /// Woken by [`Closer::close`]: a write waiting on a client that reads nothing.
    closing_waker: futures_util::task::AtomicWaker,
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            active: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            opened: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            closing_waker: futures_util::task::AtomicWaker::new(),
        }
    }
}

/// Closes an HTTP/1.1 connection at once, whatever its writes are waiting for (a
/// response cut for falling behind a shared fill). An HTTP/2 connection is left alone:
/// its other streams are not the cut one's doing.
#[derive(Debug, Clone)]
pub struct Closer(Arc<Requests>);

impl Closer {
    pub fn close(&self) {
        if self.0.h2.load(Ordering::Acquire) {
            return;
        }
        self.0.closing.store(true, Ordering::Release);
        self.0.closing_waker.wake();
    }
}

impl Requests {
    /// What closes this connection at once (see [`Closer`]).
    pub fn closer(self: &Arc<Self>) -> Closer {
        Closer(self.clone())
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Resolves once the connection is HTTP/2 and has had no open stream for `limit`
    /// (from when it opened, if it never had one); never for HTTP/1.1, whose idle time
    /// hyper bounds. Wakes once per `limit` at most.
    pub async fn h2_idle(&self, limit: Duration) {
        let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
        loop {
            let mut wait = limit_ms;
            if self.h2.load(Ordering::Acquire) && self.active.load(Ordering::Acquire) == 0 {
                let idle = self.elapsed_ms().saturating_sub(self.idle_since_ms.load(Ordering::Acquire));
                if idle >= limit_ms {
                    return;
                }
                wait = limit_ms - idle;
            }
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }

    /// A request head is complete: its head timer stops. The guard ends the request
    /// when dropped (with the response body, see [`Tracked`]).
    pub fn start(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        Active(self.clone())
    }
}

/// One request in progress on a connection.
#[derive(Debug)]
pub struct Active(Arc<Requests>);

impl Drop for Active {
    fn drop(&mut self) {
        let requests = &self.0;
        // Stored before the count drops, so an idle check that sees no open stream
        // sees when the last one ended.
        if requests.h2.load(Ordering::Relaxed) {
            requests.idle_since_ms.store(requests.elapsed_ms(), Ordering::Release);
        }
        requests.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The instant `limit` from now (far in the future for a limit beyond any clock).
fn after(limit: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(limit).unwrap_or_else(|| now + Duration::from_secs(1 << 30))
}

/// Which timer runs.
enum Timer {
    /// Nothing read yet: the first byte must come within `keepalive_idle`.
    FirstByte,
    /// What was read so far is the start of the HTTP/2 preface (`matched` bytes of it):
    /// still the first-byte deadline, until the preface is whole or turns out not to be.
    Preface { matched: usize },
    /// An HTTP/1.1 head has begun (`started` requests had started then): it must be
    /// complete by the deadline.
    Head { started: u64 },
    /// Between requests, or inside one: hyper's own timers apply.
    Idle,
    /// HTTP/2: hyper's keep-alive pings apply.
    H2,
}

/// A connection's IO with the timers of this module.
pub struct TimedIo<T> {
    inner: T,
    limits: Limits,
    requests: Arc<Requests>,
    timer: Timer,
    deadline: Pin<Box<Sleep>>,
    /// Armed when a write would wait (made once, on the first such write): a client that
    /// takes nothing for `send_timeout` loses its connection.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: bool,
}

/// The client preface of HTTP/2 (RFC 9113 section 3.4), as far as it tells.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl<T> TimedIo<T> {
    pub fn new(inner: T, limits: Limits, requests: Arc<Requests>) -> TimedIo<T> {
        let deadline = Box::pin(tokio::time::sleep(limits.keepalive_idle));
        TimedIo { inner, limits, requests, timer: Timer::FirstByte, deadline, stall: None, stalled: false }
    }

    /// Passes a write's result on, timing how long writes have been waiting; fails it
    /// once the connection is being closed ([`Closer`]).
    fn on_write<R>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if self.requests.closing.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "response cut: the client fell behind")));
        }
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        self.requests.closing_waker.register(cx.waker());
        if self.requests.closing.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "response cut: the client fell behind")));
        }
        let limit = self.limits.send_timeout;
        let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if !self.stalled {
            self.stalled = true;
            stall.as_mut().reset(after(limit));
        }
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client took nothing within send_timeout"))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Updates the timer after bytes arrived (`read`: what this read returned).
    fn on_read(&mut self, read: &[u8]) {
        let started = self.requests.started.load(Ordering::Acquire);
        match self.timer {
            Timer::FirstByte | Timer::Preface { .. } => {
                let matched = if let Timer::Preface { matched } = self.timer { matched } else { 0 };
                let rest = &H2_PREFACE[matched..];
                let n = read.len().min(rest.len());
                if read[..n] != rest[..n] {
                    self.arm_head(started);
                } else if matched + n == H2_PREFACE.len() {
                    self.timer = Timer::H2;
                    self.requests.h2.store(true, Ordering::Release);
                } else {
                    self.timer = Timer::Preface { matched: matched + n };
                }
            }
            Timer::Idle if self.requests.active.load(Ordering::Acquire) == 0 => self.arm_head(started),
            Timer::Head { .. } | Timer::Idle | Timer::H2 => {}
        }
    }

    fn arm_head(&mut self, started: u64) {
        self.timer = Timer::Head { started };
        self.deadline.as_mut().reset(after(self.limits.header_read_timeout));
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A head whose request has started is complete: its timer stops.
        if let Timer::Head { started } = this.timer
            && this.requests.started.load(Ordering::Acquire) != started
        {
            this.timer = Timer::Idle;
        }
        if matches!(this.timer, Timer::FirstByte | Timer::Preface { .. } | Timer::Head { .. }) && this.deadline.as_mut().poll(cx).is_ready() {
            let what = if matches!(this.timer, Timer::FirstByte | Timer::Preface { .. }) {
                "no request within keepalive_idle"
            } else {
                "request head not complete within header_read_timeout"
            };
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
        {
            this.on_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        this.on_write(cx, polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.on_write(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.on_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that ends its request (for the timers) when it ends or is dropped.
pub struct Tracked<B> {
    inner: B,
    _active: Active,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, active: Active) -> Tracked<B> {
        Tracked { inner, _active: active }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> TimedIo<()> {
        TimedIo::new(
            (),
            Limits { keepalive_idle: Duration::from_secs(75), header_read_timeout: Duration::from_secs(10), send_timeout: Duration::from_secs(30) },
            Arc::default(),
        )
    }

    #[tokio::test]
    async fn an_h2_preface_read_in_pieces_is_still_h2_and_a_post_is_not() {
        let mut pieces = io();
        for piece in [&b"PR"[..], b"I * HTTP", b"/2.0\r\n\r\nSM\r\n\r\n"] {
            pieces.on_read(piece);
        }
        assert!(matches!(pieces.timer, Timer::H2), "a preface in three reads");
        let mut post = io();
        post.on_read(b"P");
        assert!(matches!(post.timer, Timer::Preface { matched: 1 }));
        post.on_read(b"OST /upload HTTP/1.1\r\n");
        assert!(matches!(post.timer, Timer::Head { .. }), "a request line starting with P gets the head timer");
        let mut get = io();
        get.on_read(b"GET / HTTP/1.1\r\n");
        assert!(matches!(get.timer, Timer::Head { .. }));
    }

    #[tokio::test]
    async fn a_started_request_stops_the_head_timer_and_the_next_head_rearms_it() {
        let mut conn = io();
        conn.on_read(b"GET / HTTP/1.1\r\n\r\n");
        let active = conn.requests.start();
        // As poll_read sees it next: the request has started.
        let Timer::Head { started } = conn.timer else { panic!("head timer armed") };
        assert_ne!(conn.requests.started.load(Ordering::Acquire), started);
        conn.timer = Timer::Idle;
        conn.on_read(b"body bytes while the request runs");
        assert!(matches!(conn.timer, Timer::Idle), "no head timer inside a request");
        drop(active);
        conn.on_read(b"GET /next HTTP/1.1\r\n");
        assert!(matches!(conn.timer, Timer::Head { .. }), "the next head is timed");
    }
}
