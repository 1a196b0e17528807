//! The body of every response bulwark sends: a stored body, an empty one, or an origin
//! body streamed through (possibly after a prefix already read while deciding whether to
//! store it), or a reader of a fill shared with other requests ([`shared`]). A body may carry a callback told once how it ended (sent whole, abandoned
//! by the client, or failed), so a request is recorded when its response is done.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::memory::Reservation;
use crate::origin::{OriginBody, OriginBodyError};

pub mod shared;

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Sent to its end.
    Complete,
    /// Dropped before its end: the client went away (or the connection was closed).
    Aborted,
    /// The origin body failed part way: the client got an aborted response.
    Failed,
}

/// Called once, when the body ends (see [`BodyEnd`]).
pub type OnEnd = Box<dyn FnOnce(BodyEnd) + Send>;

pub struct ProxyBody {
    kind: Kind,
    on_end: Option<OnEnd>,
    /// The body budget a whole body read from an origin was drawn from, kept until the
    /// client has it.
    held: Option<Reservation>,
}

enum Kind {
    Full(Option<Bytes>),
    Stream {
        prefix: VecDeque<Bytes>,
        rest: Box<OriginBody>,
        /// The memory budget the prefix was read under, given back with the body.
        held: Option<Reservation>,
    },
    /// A reader of a fill shared with other requests.
    Shared(shared::Reader),
    /// A stream read by a pump task ([`ProxyBody::with_send_timeout`]).
    Pumped(Pumped),
}

/// The client's end of a pumped stream.
struct Pumped {
    rx: mpsc::Receiver<Result<Frame<Bytes>, OriginBodyError>>,
    /// How the pump ended ([`PUMPING`] while it runs): only [`FINISHED`] is a whole body.
    state: Arc<AtomicU8>,
    limit: Duration,
    /// What the stream said of its size when the pump took it, less what was sent since.
    hint: SizeHint,
    done: bool,
}

/// A pump's state: running (or gone without a word, say by a panic), the origin body read
/// to its end, or given up on a client that took nothing for `send_timeout`.
const PUMPING: u8 = 0;
const FINISHED: u8 = 1;
const NOT_TAKEN: u8 = 2;

/// Frames a pump reads ahead of the client.
const PUMP_FRAMES: usize = 2;

impl ProxyBody {
    pub fn empty() -> ProxyBody {
        ProxyBody { kind: Kind::Full(None), on_end: None, held: None }
    }

    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        let bytes = bytes.into();
        ProxyBody { kind: Kind::Full(if bytes.is_empty() { None } else { Some(bytes) }), on_end: None, held: None }
    }

    pub fn stream(prefix: VecDeque<Bytes>, rest: OriginBody) -> ProxyBody {
        ProxyBody { kind: Kind::Stream { prefix, rest: Box::new(rest), held: None }, on_end: None, held: None }
    }

    /// A reader of a shared fill.
    pub fn shared(reader: shared::Reader) -> ProxyBody {
        ProxyBody { kind: Kind::Shared(reader), on_end: None, held: None }
    }

    /// [`ProxyBody::full`] read from an origin under `held`, which it keeps until the
    /// body is done with (a slow client can hold it that long).
    pub fn full_holding(bytes: Bytes, held: Reservation) -> ProxyBody {
        let mut body = ProxyBody::full(bytes);
        body.held = Some(held);
        body
    }

    /// [`ProxyBody::stream`] whose `prefix` was read under `held`, which it keeps until
    /// the body is done with (the prefix can wait on a slow client that long).
    pub fn stream_holding(prefix: VecDeque<Bytes>, rest: OriginBody, held: Reservation) -> ProxyBody {
        ProxyBody { kind: Kind::Stream { prefix, rest: Box::new(rest), held: Some(held) }, on_end: None, held: None }
    }

    /// This body with its sending bounded (for a body streamed from an origin or read
    /// from a shared fill; any other is returned as it is): a pump task reads it a few
    /// frames ahead of the client, and when the client has taken nothing for `limit`,
    /// drops it (an origin slot is released at once, a shared fill's reader detached) and
    /// the client's response is aborted, never cut short looking complete. hyper has no
    /// write timeout, and a stalled h2 stream never blocks the socket, so the bound lives
    /// here; a timer is armed only when a send would wait.
    pub fn with_send_timeout(mut self, limit: Duration) -> ProxyBody {
        let hint = match &self.kind {
            Kind::Stream { prefix, rest, .. } => Kind::stream_hint(prefix, rest),
            Kind::Shared(reader) => reader.size_hint(),
            Kind::Full(_) | Kind::Pumped(_) => return self,
        };
        let on_end = self.on_end.take();
        let kind = std::mem::replace(&mut self.kind, Kind::Full(None));
        let (tx, rx) = mpsc::channel(PUMP_FRAMES);
        let state = Arc::new(AtomicU8::new(PUMPING));
        tokio::spawn(pump(kind, tx, limit, state.clone()));
        ProxyBody { kind: Kind::Pumped(Pumped { rx, state, limit, hint, done: false }), on_end, held: self.held.take() }
    }

    /// This body, telling `on_end` how it ended.
    pub fn on_end(mut self, on_end: OnEnd) -> ProxyBody {
        self.on_end = Some(on_end);
        self
    }

    fn end(&mut self, end: BodyEnd) {
        if let Some(on_end) = self.on_end.take() {
            on_end(end);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = OriginBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, OriginBodyError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream { prefix, rest, held } => match prefix.pop_front() {
                Some(chunk) => {
                    if prefix.is_empty() {
                        // The prefix is on its way: its budget is free again.
                        held.take();
                    }
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                None => Pin::new(rest.as_mut()).poll_frame(cx),
            },
            Kind::Shared(reader) => reader.poll_chunk(cx).map(|chunk| chunk.map(|chunk| chunk.map(Frame::data))),
            Kind::Pumped(pumped) => match ready!(pumped.rx.poll_recv(cx)) {
                Some(frame) => {
                    if let Ok(data) = frame.as_ref().map(Frame::data_ref)
                        && let Some(data) = data
                    {
                        pumped.sent(data.len() as u64);
                    }
                    Poll::Ready(Some(frame))
                }
                None => {
                    pumped.done = true;
                    match pumped.state.load(Ordering::Acquire) {
                        FINISHED => Poll::Ready(None),
                        NOT_TAKEN => {
                            // The client's own doing: counted as its abort, not an origin failure.
                            let limit = pumped.limit;
                            this.end(BodyEnd::Aborted);
                            return Poll::Ready(Some(Err(OriginBodyError::NotTaken(limit))));
                        }
                        // Never a short body that looks complete.
                        _ => Poll::Ready(Some(Err(OriginBodyError::Interrupted))),
                    }
                }
            },
        };
        match &polled {
            Poll::Ready(None) => this.end(BodyEnd::Complete),
            // The client's slowness ended it: its abort, not an origin failure.
            Poll::Ready(Some(Err(err))) if err.is_clients() => this.end(BodyEnd::Aborted),
            Poll::Ready(Some(Err(_))) => this.end(BodyEnd::Failed),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Stream { prefix, rest, .. } => prefix.is_empty() && rest.is_end_stream(),
            Kind::Shared(reader) => reader.is_end_stream(),
            // hyper drops a body whose declared length is sent without polling it again.
            Kind::Pumped(pumped) => pumped.done || pumped.hint.exact() == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream { prefix, rest, .. } => Kind::stream_hint(prefix, rest),
            Kind::Shared(reader) => reader.size_hint(),
            Kind::Pumped(pumped) => pumped.hint,
        }
    }
}

impl Kind {
    fn stream_hint(prefix: &VecDeque<Bytes>, rest: &OriginBody) -> SizeHint {
        let buffered: u64 = prefix.iter().map(|b| b.len() as u64).sum();
        let inner = rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + buffered);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + buffered);
        }
        hint
    }
}

impl Pumped {
    fn sent(&mut self, n: u64) {
        let mut hint = SizeHint::new();
        hint.set_lower(self.hint.lower().saturating_sub(n));
        if let Some(upper) = self.hint.upper() {
            hint.set_upper(upper.saturating_sub(n));
        }
        self.hint = hint;
    }
}

/// Reads `stream` (a [`Kind::Stream`] or [`Kind::Shared`]) into `tx`, a slot reserved before each read so
/// at most [`PUMP_FRAMES`] are read ahead of the client. Ends when the stream does (or
/// fails: the error is passed on), when the client's body is dropped, or when the client
/// has taken nothing for `limit`: the stream is then dropped, releasing its origin slot.
async fn pump(stream: Kind, tx: mpsc::Sender<Result<Frame<Bytes>, OriginBodyError>>, limit: Duration, state: Arc<AtomicU8>) {
    let mut body = ProxyBody { kind: stream, on_end: None, held: None };
    loop {
        let permit = match tx.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Closed(())) => return,
            Err(mpsc::error::TrySendError::Full(())) => match tokio::time::timeout(limit, tx.reserve()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_closed)) => return,
                Err(_) => {
                    tracing::debug!(?limit, "client took nothing of its response for send_timeout: origin body abandoned");
                    state.store(NOT_TAKEN, Ordering::Release);
                    return;
                }
            },
        };
        // A client that goes away while the origin is slow to send releases the origin
        // at once, not at its next frame.
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = tx.closed() => return,
        };
        match frame {
            Some(Ok(frame)) => permit.send(Ok(frame)),
            Some(Err(err)) => return permit.send(Err(err)),
            None => return state.store(FINISHED, Ordering::Release),
        }
    }
}

impl Drop for ProxyBody {
    /// A server drops a body it has sent whole without polling it to `None` when it knows
    /// the end (a `Content-Length`, or `is_end_stream`): only a body not at its end was
    /// abandoned.
    fn drop(&mut self) {
        if self.on_end.is_some() {
            let end = if self.is_end_stream() { BodyEnd::Complete } else { BodyEnd::Aborted };
            self.end(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;

    use super::*;

    fn watched(body: ProxyBody) -> (ProxyBody, Arc<Mutex<Vec<BodyEnd>>>) {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = ends.clone();
        (body.on_end(Box::new(move |end| seen.lock().expect("lock").push(end))), ends)
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_ends_complete_once() {
        let (body, ends) = watched(ProxyBody::full("hello"));
        assert_eq!(&body.collect().await.expect("collect").to_bytes()[..], b"hello");
        assert_eq!(*ends.lock().expect("lock"), [BodyEnd::Complete]);
    }

    #[test]
    fn a_body_dropped_before_its_end_is_aborted_and_an_empty_one_complete() {
        let (body, ends) = watched(ProxyBody::full("unread"));
        drop(body);
        assert_eq!(*ends.lock().expect("lock"), [BodyEnd::Aborted]);
        let (empty, ends) = watched(ProxyBody::empty());
        drop(empty);
        assert_eq!(*ends.lock().expect("lock"), [BodyEnd::Complete], "nothing to send: sent whole");
    }
}
