//! Streamed fills: a storable answer is handed to its readers (the flight's leader, its
//! waiters) as soon as its head arrives, and its body is read into one shared copy
//! that they all read at their own pace (see [`crate::body::shared`]). The entry is
//! stored, and its flight closed, before any reader gets the last byte. An answer
//! that turns out too large, or finds the body budget spent, is streamed on to the
//! readers it has and not stored; one whose body fails fails them all.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http::header::CONTENT_LENGTH;
use http_body_util::BodyExt;

use crate::body::shared::{Reader, Shared};
use crate::cache::{Entry, Stored};
use crate::error::ProxyError;
use crate::origin::{OriginBody, OriginError};
use crate::outcome::NotStored;
use crate::runtime::RouteRuntime;

/// A storable answer whose body is still arriving.
pub struct Filling {
    /// The entry as it will be stored, without its body (`Content-Length` as declared,
    /// or none): what the readers' heads are built from.
    pub head: Stored,
    pub shared: Arc<Shared>,
    body: OriginBody,
    /// `max_object_bytes`: beyond it the answer is not stored.
    limit: usize,
    /// `stream_window`, for an answer that turns out not to be stored.
    window: usize,
    /// Bytes read so far, and drawn from the body budget (all of a declared length at once).
    total: usize,
    reserved: usize,
    /// The origin's `timeout`: the whole of a stored body must arrive by then.
    timeout: Duration,
    deadline: tokio::time::Instant,
    /// Why it will not be stored, once that is known: the rest streams.
    unstored: Option<NotStored>,
}

/// How reading a storable answer's body ended.
pub enum FillRead {
    /// Every byte arrived: the entry to store. Its readers' last chunk is held back until
    /// [`Shared::finish`], called once it is stored.
    Complete(Stored),
    /// Over `max_object_bytes` or the body budget: not stored; the rest still streams to
    /// the readers there are ([`WindowFill::run`]).
    Unstored(NotStored, WindowFill),
    /// The body failed or took longer than the origin's `timeout`: every reader's
    /// response is aborted.
    Failed(ProxyError),
}

/// One read of the body.
pub enum Step {
    More,
    End,
    /// It will not be stored, and why: the rest streams.
    Unstored(NotStored),
    Failed(ProxyError),
}

/// The rest of an answer that is not stored, streamed to its readers at the pace of
/// the fastest.
pub struct WindowFill {
    shared: Arc<Shared>,
    body: OriginBody,
}

impl Filling {
    /// `head` with the declared length of `body` (or none: the readers' responses are
    /// chunked); `reserved` bytes of `shared`'s budget drawn already.
    pub fn new(route: &RouteRuntime, mut head: Stored, body: OriginBody, declared: Option<u64>, shared: Arc<Shared>, reserved: usize) -> Filling {
        let entry = Arc::make_mut(&mut head.entry);
        match declared {
            Some(len) => entry.headers.insert(CONTENT_LENGTH, HeaderValue::from(len)),
            None => entry.headers.remove(CONTENT_LENGTH),
        };
        let pool = route.pool.as_ref().map(|p| &p.config);
        let timeout = route.origin.config.timeout;
        Filling {
            head,
            shared,
            body,
            limit: pool.map_or(0, |p| p.max_object_bytes),
            window: pool.map_or(0, |p| p.stream_window),
            total: 0,
            reserved,
            timeout,
            deadline: tokio::time::Instant::now() + timeout,
            unstored: None,
        }
    }

    /// This answer, known from its head to be over `max_object_bytes`: streamed within
    /// `stream_window` (reserved already) and not stored.
    pub fn too_large(mut self) -> Filling {
        self.shared.to_window(self.window);
        self.unstored = Some(NotStored::TooLarge);
        self
    }

    /// Why it will not be stored, if that is known yet.
    pub fn not_stored(&self) -> Option<NotStored> {
        self.unstored
    }

    /// A reader from the first byte (a kept fill takes one until it fails).
    pub fn attach(&self) -> Option<Reader> {
        self.shared.attach()
    }

    /// Reads one frame into the shared copy, drawing each byte beyond what was reserved
    /// from the body budget.
    pub async fn step(&mut self, route: &RouteRuntime) -> Step {
        if let Some(reason) = self.unstored {
            return Step::Unstored(reason);
        }
        let frame = match tokio::time::timeout_at(self.deadline, self.body.frame()).await {
            Err(_) => return failed(&self.shared, route, OriginError::Timeout(self.timeout)),
            Ok(None) => return Step::End,
            Ok(Some(Err(err))) => return failed(&self.shared, route, OriginError::Body(err)),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { return Step::More };
        self.total += data.len();
        let reason = if self.total > self.limit {
            Some(NotStored::TooLarge)
        } else if self.total > self.reserved && !self.shared.grow(self.total - self.reserved) {
            Some(NotStored::Memory)
        } else {
            self.reserved = self.reserved.max(self.total);
            None
        };
        self.shared.push(data);
        let Some(reason) = reason else { return Step::More };
        // What it holds already stays (its readers, and those yet to join from the
        // first byte, need it); a window's worth if the budget has it.
        let window = if self.window <= self.reserved || self.shared.grow(self.window - self.reserved) { self.window } else { self.reserved };
        let window = window.max(self.total);
        self.shared.to_window(window);
        self.unstored = Some(reason);
        Step::Unstored(reason)
    }

    /// Reads the rest of the body into the shared copy.
    pub async fn read(mut self, route: &RouteRuntime) -> FillRead {
        loop {
            match self.step(route).await {
                Step::More => {}
                Step::End => return FillRead::Complete(self.into_stored()),
                Step::Failed(err) => return FillRead::Failed(err),
                Step::Unstored(reason) => return FillRead::Unstored(reason, WindowFill { shared: self.shared, body: self.body }),
            }
        }
    }

    /// The rest to stream, of an answer known not to be stored ([`Filling::too_large`]).
    pub fn into_window(self) -> WindowFill {
        WindowFill { shared: self.shared, body: self.body }
    }

    /// The entry with the whole body (read to its end by [`Filling::step`]).
    pub fn into_stored(self) -> Stored {
        // A stored entry owns exactly its bytes (one copy, not hyper's read buffers).
        let body: Bytes = self.shared.whole();
        let mut entry = Entry { body, ..(*self.head.entry).clone() };
        entry.headers.insert(CONTENT_LENGTH, HeaderValue::from(self.total));
        Stored { key: self.head.key, entry: Arc::new(entry), marker: self.head.marker }
    }
}

fn failed(shared: &Shared, route: &RouteRuntime, source: OriginError) -> Step {
    shared.fail();
    Step::Failed(ProxyError::Origin { origin: route.origin.config.name.clone(), source })
}

impl WindowFill {
    /// Streams the body to the readers while a new one can still join from the first
    /// byte; false when the body has ended (or no reader is left) before that.
    pub async fn run_while_joinable(&mut self) -> bool {
        while self.shared.joinable() {
            if !self.next().await {
                return false;
            }
        }
        true
    }

    /// Streams the rest of the body to the readers, reading the origin no faster than
    /// the fastest of them takes it. Stops (releasing the origin) when none is left.
    pub async fn run(mut self) {
        while self.next().await {}
    }

    /// One read, once a reader has taken everything there is; false at the end.
    async fn next(&mut self) -> bool {
        if !self.shared.wait_for_reader().await {
            tracing::debug!("every reader of a streamed fill went away: origin body dropped");
            // Nobody may join what will never be read on: a late one fetches anew.
            self.shared.fail();
            return false;
        }
        match self.body.frame().await {
            None => {
                self.shared.finish();
                false
            }
            Some(Err(err)) => {
                tracing::debug!(error = %err, "origin body failed while streamed");
                self.shared.fail();
                false
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    self.shared.push(data);
                }
                true
            }
        }
    }
}
