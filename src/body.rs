//! The body of every response bulwark sends: a stored body, an empty one, or an origin
//! body streamed through (possibly after a prefix already read while deciding whether to
//! store it). A body may carry a callback told once how it ended (sent whole, abandoned
//! by the client, or failed), so a request is recorded when its response is done.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::origin::{OriginBody, OriginBodyError};

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
}

enum Kind {
    Full(Option<Bytes>),
    Stream { prefix: VecDeque<Bytes>, rest: Box<OriginBody> },
}

impl ProxyBody {
    pub fn empty() -> ProxyBody {
        ProxyBody { kind: Kind::Full(None), on_end: None }
    }

    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        let bytes = bytes.into();
        ProxyBody { kind: Kind::Full(if bytes.is_empty() { None } else { Some(bytes) }), on_end: None }
    }

    pub fn stream(prefix: VecDeque<Bytes>, rest: OriginBody) -> ProxyBody {
        ProxyBody { kind: Kind::Stream { prefix, rest: Box::new(rest) }, on_end: None }
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
            Kind::Stream { prefix, rest } => match prefix.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => Pin::new(rest.as_mut()).poll_frame(cx),
            },
        };
        match &polled {
            Poll::Ready(None) => this.end(BodyEnd::Complete),
            Poll::Ready(Some(Err(_))) => this.end(BodyEnd::Failed),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Stream { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream { prefix, rest } => {
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
