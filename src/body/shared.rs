//! One origin body read once and sent to every request that shares its fill: the
//! flight's leader and each coalesced waiter read the same chunks (`Bytes` handles, no
//! copy per reader), each at its own pace.
//!
//! A fill that will be stored keeps every chunk ([`Mode::Keep`]): a reader that joins
//! late starts from the first byte, and the whole body is there to store. The newest
//! chunk is held back until [`Shared::finish`], so the entry is stored (and its flight
//! closed) before any reader gets its last byte. A fill that is not stored
//! ([`Mode::Window`]) keeps only the last window's worth of chunks: the writer reads the
//! origin no faster than the fastest reader takes it ([`Shared::wait_for_reader`]), a
//! reader that falls more than the window behind the newest chunk is cut (after
//! [`LAGGARD_GRACE`] to catch up, so a reader that is only late for a moment, served
//! after the others, is not), and a reader can join from the first byte as long as the
//! first chunk is still kept.
//!
//! A body that fails part way fails every reader ([`Shared::fail`]): their responses are
//! aborted, never cut short looking complete.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::SizeHint;
use tokio::sync::Notify;

use crate::memory::Reservation;
use crate::origin::OriginBodyError;

/// Every chunk kept (to be stored), or only those within `limit` bytes of the newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Keep,
    Window(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Failed,
}

/// How long a windowed fill's writer waits for a reader at the window's edge before it
/// reads on and cuts it: enough for a reader that is merely served later than the others
/// (on a busy machine) to catch up, too short for one that cannot keep up to hold the
/// others back. Once the slowest reader is back within half the window, it starts again.
pub const LAGGARD_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Called when a reader is cut (to close its client's connection at once).
pub type OnCut = Box<dyn FnOnce() + Send>;

/// A reader's place: the absolute index of the next chunk it takes.
struct Slot {
    pos: u64,
    waker: Option<Waker>,
    /// Fell more than the window behind: its next read fails.
    cut: bool,
    on_cut: Option<OnCut>,
}

struct State {
    chunks: VecDeque<Bytes>,
    /// Absolute index of `chunks[0]` (chunks before it were dropped).
    base: u64,
    /// Chunks below this absolute index may be read.
    visible: u64,
    /// Bytes in `chunks`.
    held: usize,
    /// Bytes pushed in all.
    pushed: u64,
    mode: Mode,
    end: Option<End>,
    readers: Vec<Option<Slot>>,
    /// Readers attached and not cut.
    live: usize,
    /// The body budget the held chunks are drawn from.
    reservation: Reservation,
    /// Since when the writer has waited for a reader at the window's edge.
    laggard_since: Option<tokio::time::Instant>,
}

/// The shared copy of one origin body.
pub struct Shared {
    state: Mutex<State>,
    /// The body's declared length, if it has one.
    declared: Option<u64>,
    /// Wakes the writer of a windowed fill when a reader took a chunk or went away.
    writer: Notify,
}

impl Shared {
    /// A fill that keeps every chunk until [`Shared::finish`] (to be stored), its bytes
    /// drawn from `reservation` ([`Shared::grow`]).
    pub fn new(declared: Option<u64>, reservation: Reservation) -> Arc<Shared> {
        let state = State {
            chunks: VecDeque::new(),
            base: 0,
            visible: 0,
            held: 0,
            pushed: 0,
            mode: Mode::Keep,
            end: None,
            readers: Vec::new(),
            live: 0,
            reservation,
            laggard_since: None,
        };
        Arc::new(Shared { state: Mutex::new(state), declared, writer: Notify::new() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A reader from the first byte; `None` once a windowed fill has moved on (see
    /// [`Shared::joinable`]) or the body failed.
    pub fn attach(self: &Arc<Self>) -> Option<Reader> {
        let mut state = self.lock();
        if !state.joinable() {
            return None;
        }
        let slot = Slot { pos: 0, waker: None, cut: false, on_cut: None };
        let id = match state.readers.iter().position(Option::is_none) {
            Some(free) => {
                state.readers[free] = Some(slot);
                free
            }
            None => {
                state.readers.push(Some(slot));
                state.readers.len() - 1
            }
        };
        state.live += 1;
        Some(Reader { shared: self.clone(), id, skip: 0, left: self.declared })
    }

    /// The body's declared length, if it has one.
    pub fn declared(&self) -> Option<u64> {
        self.declared
    }

    /// Readers attached and not cut.
    pub fn readers(&self) -> usize {
        self.lock().live
    }

    /// Whether a reader can still join from the first byte.
    pub fn joinable(&self) -> bool {
        self.lock().joinable()
    }

    /// Draws `more` bytes from the body budget for chunks about to be kept.
    pub fn grow(&self, more: usize) -> bool {
        self.lock().reservation.grow(more)
    }

    /// Appends a chunk read from the origin. Keeping, the newest chunk stays hidden until
    /// [`Shared::finish`]; windowed, readers more than the window behind are cut.
    pub fn push(&self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        let (wakers, cut) = {
            let mut state = self.lock();
            state.held += chunk.len();
            state.pushed += chunk.len() as u64;
            state.chunks.push_back(chunk);
            let newest = state.base + state.chunks.len() as u64;
            let cut = match state.mode {
                // Only the chunk that may be the last is held back: with a declared
                // length, the one that reaches it; without, the newest.
                Mode::Keep => {
                    let more_to_come = self.declared.is_some_and(|len| state.pushed < len);
                    state.visible = if more_to_come { newest } else { newest - 1 };
                    Vec::new()
                }
                Mode::Window(limit) => {
                    state.visible = newest;
                    state.cut_behind(limit)
                }
            };
            (state.take_wakers(), cut)
        };
        wakers.into_iter().for_each(Waker::wake);
        cut.into_iter().for_each(|on_cut| on_cut());
    }

    /// Stops keeping chunks for storing: from now on only `limit` bytes behind the newest
    /// chunk are kept (and every chunk already read is visible).
    pub fn to_window(&self, limit: usize) {
        let (wakers, cut) = {
            let mut state = self.lock();
            state.mode = Mode::Window(limit.max(1));
            state.visible = state.base + state.chunks.len() as u64;
            let cut = state.cut_behind(limit);
            (state.take_wakers(), cut)
        };
        wakers.into_iter().for_each(Waker::wake);
        cut.into_iter().for_each(|on_cut| on_cut());
        self.writer.notify_one();
    }

    /// The whole body, one copy of every chunk (a kept fill, before [`Shared::finish`]).
    pub fn whole(&self) -> Bytes {
        let state = self.lock();
        match state.chunks.len() {
            0 => Bytes::new(),
            1 => Bytes::copy_from_slice(&state.chunks[0]),
            _ => {
                let mut whole = Vec::with_capacity(state.held);
                state.chunks.iter().for_each(|c| whole.extend_from_slice(c));
                Bytes::from(whole)
            }
        }
    }

    /// The body is complete: every chunk visible, readers end after the last.
    pub fn finish(&self) {
        self.end(End::Complete);
    }

    /// The origin body failed: every reader's next read past what it has fails.
    pub fn fail(&self) {
        self.end(End::Failed);
    }

    /// Fails the fill when the returned guard is dropped before the body ended (its
    /// writer's task panicked or was cancelled): its readers must not wait forever.
    pub fn writer_guard(self: &Arc<Self>) -> WriterGuard {
        WriterGuard(self.clone())
    }

    fn end(&self, end: End) {
        let wakers = {
            let mut state = self.lock();
            state.end = Some(end);
            if end == End::Complete {
                state.visible = state.base + state.chunks.len() as u64;
            }
            state.take_wakers()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// A windowed fill's writer waits here before each read: until the fastest reader has
    /// taken every chunk there is, and, for up to [`LAGGARD_GRACE`], until the next chunk
    /// would leave no reader beyond the window. False when no reader is left.
    pub async fn wait_for_reader(&self) -> bool {
        loop {
            let notified = self.writer.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let mut state = self.lock();
                if state.live == 0 {
                    return false;
                }
                let Mode::Window(limit) = state.mode else { return true };
                let caught_up = state.readers.iter().flatten().any(|slot| !slot.cut && slot.pos >= state.visible);
                if caught_up {
                    let behind = state.slowest_behind();
                    if behind <= limit / 2 {
                        state.laggard_since = None;
                    }
                    // The next chunk (about the size of the last) cuts the slowest
                    // reader only if what it has not taken and that chunk overflow the
                    // window; a reader with nothing left to take is never cut.
                    let next = state.chunks.back().map_or(0, Bytes::len);
                    if behind == 0 || behind + next <= limit {
                        return true;
                    }
                    let since = *state.laggard_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= LAGGARD_GRACE {
                        return true;
                    }
                    Some(since + LAGGARD_GRACE)
                } else {
                    None
                }
            };
            match deadline {
                None => notified.await,
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        }
    }
}

/// See [`Shared::writer_guard`].
pub struct WriterGuard(Arc<Shared>);

impl Drop for WriterGuard {
    fn drop(&mut self) {
        if self.0.lock().end.is_none() {
            self.0.fail();
        }
    }
}

impl State {
    /// A reader can still join from the first byte: any time while chunks are kept (to be
    /// stored); a windowed fill, while its first chunk is kept and it has pushed no more
    /// than half its window (a reader that joins later would soon be cut).
    fn joinable(&self) -> bool {
        match self.mode {
            _ if self.end == Some(End::Failed) => false,
            Mode::Keep => true,
            Mode::Window(limit) => self.base == 0 && self.pushed <= (limit / 2) as u64,
        }
    }

    /// Bytes between the slowest reader not cut and the newest chunk.
    fn slowest_behind(&self) -> usize {
        let Some(slowest) = self.readers.iter().flatten().filter(|slot| !slot.cut).map(|slot| slot.pos).min() else { return 0 };
        let from = usize::try_from(slowest.saturating_sub(self.base)).unwrap_or(usize::MAX);
        self.chunks.iter().skip(from).map(Bytes::len).sum()
    }

    fn take_wakers(&mut self) -> Vec<Waker> {
        self.readers.iter_mut().flatten().filter_map(|slot| slot.waker.take()).collect()
    }

    /// Cuts every reader further than `limit` bytes behind the newest chunk (never the
    /// newest chunk's own readers) and drops the chunks before the window; returns what
    /// to call for the readers cut.
    fn cut_behind(&mut self, limit: usize) -> Vec<OnCut> {
        // The lowest index such that the chunks from it to the newest fit in `limit`.
        let newest = self.base + self.chunks.len() as u64;
        let mut keep_from = newest.saturating_sub(1);
        let mut bytes = self.chunks.back().map_or(0, Bytes::len);
        for chunk in self.chunks.iter().rev().skip(1) {
            if bytes + chunk.len() > limit {
                break;
            }
            bytes += chunk.len();
            keep_from -= 1;
        }
        let mut cut = Vec::new();
        for slot in self.readers.iter_mut().flatten() {
            if !slot.cut && slot.pos < keep_from {
                slot.cut = true;
                self.live -= 1;
                cut.extend(slot.on_cut.take());
            }
        }
        while self.base < keep_from {
            let Some(chunk) = self.chunks.pop_front() else { break };
            self.held -= chunk.len();
            self.base += 1;
        }
        cut
    }
}

/// One request's read of a [`Shared`] body.
pub struct Reader {
    shared: Arc<Shared>,
    id: usize,
    /// Bytes still to skip before the part this reader sends (a range's start).
    skip: u64,
    /// Bytes still to send, when known (the declared length, or a range's).
    left: Option<u64>,
}

impl Reader {
    /// Calls `on_cut` if this reader is cut for falling behind.
    pub fn on_cut(self, on_cut: OnCut) -> Reader {
        if let Some(slot) = self.shared.lock().readers[self.id].as_mut() {
            slot.on_cut = Some(on_cut);
        }
        self
    }

    /// Sends only bytes `start..=end` of the body.
    pub fn range(mut self, start: u64, end: u64) -> Reader {
        self.skip = start;
        self.left = Some(end - start + 1);
        self
    }

    /// The body's declared length, if it has one.
    pub fn declared(&self) -> Option<u64> {
        self.shared.declared
    }

    /// What is left to send, when known.
    pub fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }

    pub fn is_end_stream(&self) -> bool {
        if self.left == Some(0) {
            return true;
        }
        let state = self.shared.lock();
        state.end == Some(End::Complete) && state.readers[self.id].as_ref().is_some_and(|slot| slot.pos >= state.visible)
    }

    /// The next chunk: `None` at the end, an error if the body failed or this reader was
    /// cut, `Pending` (woken by the writer) when it has taken everything there is.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, OriginBodyError>>> {
        loop {
            if self.left == Some(0) {
                return Poll::Ready(None);
            }
            let (polled, windowed) = {
                let mut guard = self.shared.lock();
                let state = &mut *guard;
                let windowed = state.mode != Mode::Keep;
                let (visible, base, end, mode) = (state.visible, state.base, state.end, state.mode);
                let Some(slot) = state.readers[self.id].as_mut() else { return Poll::Ready(Some(Err(OriginBodyError::Interrupted))) };
                let polled = if slot.cut {
                    let limit = if let Mode::Window(limit) = mode { limit } else { 0 };
                    Some(Err(OriginBodyError::Behind(limit)))
                } else if slot.pos < visible {
                    let at = usize::try_from(slot.pos - base).unwrap_or(usize::MAX);
                    slot.pos += 1;
                    state.chunks.get(at).cloned().map(Ok)
                } else {
                    match end {
                        Some(End::Complete) => return Poll::Ready(None),
                        Some(End::Failed) => Some(Err(OriginBodyError::Interrupted)),
                        None => {
                            slot.waker = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                    }
                };
                (polled, windowed)
            };
            if windowed {
                self.shared.writer.notify_one();
            }
            let chunk = match polled {
                Some(Ok(chunk)) => chunk,
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => return Poll::Ready(Some(Err(OriginBodyError::Interrupted))),
            };
            let len = chunk.len() as u64;
            if len <= self.skip {
                self.skip -= len;
                continue;
            }
            let from = usize::try_from(self.skip).unwrap_or(usize::MAX);
            self.skip = 0;
            let mut part = chunk.slice(from..);
            if let Some(left) = self.left.as_mut() {
                if (part.len() as u64) > *left {
                    part.truncate(usize::try_from(*left).unwrap_or(usize::MAX));
                }
                *left -= part.len() as u64;
            }
            return Poll::Ready(Some(Ok(part)));
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            if let Some(slot) = state.readers[self.id].take()
                && !slot.cut
            {
                state.live -= 1;
            }
        }
        self.shared.writer.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;
    use crate::memory::ByteBudget;

    fn shared(declared: Option<u64>) -> Arc<Shared> {
        Shared::new(declared, ByteBudget::new(1 << 20).reservation())
    }

    fn now(reader: &mut Reader) -> Poll<Option<Result<Bytes, OriginBodyError>>> {
        reader.poll_chunk(&mut Context::from_waker(Waker::noop()))
    }

    async fn read_all(mut reader: Reader) -> Result<Vec<u8>, OriginBodyError> {
        let mut out = Vec::new();
        while let Some(chunk) = poll_fn(|cx| reader.poll_chunk(cx)).await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_kept_fill_holds_back_its_newest_chunk_until_finished() {
        let fill = shared(None);
        let mut reader = fill.attach().expect("attach");
        fill.push(Bytes::from_static(b"abc"));
        assert!(now(&mut reader).is_pending(), "the only chunk is the newest: held back");
        fill.push(Bytes::from_static(b"def"));
        assert!(matches!(now(&mut reader), Poll::Ready(Some(Ok(c))) if c == "abc"));
        assert!(now(&mut reader).is_pending());
        let late = fill.attach().expect("a kept fill takes late readers from the first byte");
        assert_eq!(&fill.whole()[..], b"abcdef");
        fill.finish();
        assert!(matches!(now(&mut reader), Poll::Ready(Some(Ok(c))) if c == "def"));
        assert!(matches!(now(&mut reader), Poll::Ready(None)));
        assert_eq!(read_all(late).await.expect("whole"), b"abcdef");
    }

    #[tokio::test]
    async fn a_kept_fill_of_declared_length_holds_back_only_the_chunk_that_ends_it() {
        let fill = shared(Some(6));
        let mut reader = fill.attach().expect("attach");
        fill.push(Bytes::from_static(b"abc"));
        assert!(matches!(now(&mut reader), Poll::Ready(Some(Ok(c))) if c == "abc"), "more is to come: sent at once");
        fill.push(Bytes::from_static(b"def"));
        assert!(now(&mut reader).is_pending(), "the last chunk waits for the entry to be stored");
        fill.finish();
        assert!(matches!(now(&mut reader), Poll::Ready(Some(Ok(c))) if c == "def"));
        assert!(matches!(now(&mut reader), Poll::Ready(None)));
    }

    #[tokio::test]
    async fn a_failed_fill_fails_every_reader_past_what_it_has() {
        let fill = shared(None);
        let mut reader = fill.attach().expect("attach");
        fill.push(Bytes::from_static(b"abc"));
        fill.push(Bytes::from_static(b"def"));
        fill.fail();
        assert!(matches!(now(&mut reader), Poll::Ready(Some(Ok(c))) if c == "abc"));
        assert!(matches!(now(&mut reader), Poll::Ready(Some(Err(OriginBodyError::Interrupted)))), "never an end that looks complete");
        assert!(fill.attach().is_none());
    }

    #[tokio::test]
    async fn a_writer_gone_without_an_end_fails_its_readers() {
        let fill = shared(Some(6));
        let mut reader = fill.attach().expect("attach");
        let guard = fill.writer_guard();
        fill.push(Bytes::from_static(b"abc"));
        drop(guard);
        assert!(matches!(now(&mut reader), Poll::Ready(Some(Ok(_)))));
        assert!(matches!(now(&mut reader), Poll::Ready(Some(Err(OriginBodyError::Interrupted)))), "never left waiting");
        let finished = shared(None);
        let mut reader = finished.attach().expect("attach");
        let guard = finished.writer_guard();
        finished.finish();
        drop(guard);
        assert!(matches!(now(&mut reader), Poll::Ready(None)), "an ended fill stays ended");
    }

    #[tokio::test]
    async fn a_range_reader_sends_only_its_part() {
        let fill = shared(Some(9));
        let reader = fill.attach().expect("attach").range(2, 6);
        assert_eq!(reader.size_hint().exact(), Some(5));
        for chunk in ["abc", "def", "ghi"] {
            fill.push(Bytes::from_static(chunk.as_bytes()));
        }
        fill.finish();
        assert_eq!(read_all(reader).await.expect("part"), b"cdefg");
    }

    #[tokio::test]
    async fn a_windowed_fill_cuts_a_reader_too_far_behind_and_keeps_only_the_window() {
        let fill = shared(None);
        let mut fast = fill.attach().expect("attach");
        let told = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = told.clone();
        let mut slow = fill.attach().expect("attach").on_cut(Box::new(move || flag.store(true, std::sync::atomic::Ordering::SeqCst)));
        fill.to_window(8);
        for round in 0..2 {
            assert!(fill.wait_for_reader().await, "nobody has anything to take");
            fill.push(Bytes::from_static(b"abcd"));
            assert!(matches!(now(&mut fast), Poll::Ready(Some(Ok(_)))));
            // Within half the window a reader may still join from the first byte; past it,
            // one would soon be cut.
            assert_eq!(fill.attach().is_some(), round == 0, "round {round}");
        }
        // The slow reader is 8 bytes behind: within the window.
        assert_eq!(fill.readers(), 2);
        assert!(fill.wait_for_reader().await);
        fill.push(Bytes::from_static(b"efgh"));
        assert_eq!(fill.readers(), 1, "12 bytes behind a window of 8: cut");
        assert!(told.load(std::sync::atomic::Ordering::SeqCst), "its connection is closed at once");
        assert!(matches!(now(&mut slow), Poll::Ready(Some(Err(OriginBodyError::Behind(8))))));
        assert!(fill.attach().is_none(), "the first chunk is gone: a late reader cannot start");
        assert!(matches!(now(&mut fast), Poll::Ready(Some(Ok(c))) if c == "efgh"));
        assert_eq!(fill.lock().held, 8, "only the window is kept");
        drop(fast);
        assert!(!fill.wait_for_reader().await, "no reader left: the writer stops");
    }

    #[tokio::test]
    async fn the_windowed_writer_waits_for_its_fastest_reader() {
        let fill = shared(None);
        let mut reader = fill.attach().expect("attach");
        fill.to_window(1 << 10);
        fill.push(Bytes::from_static(b"abcd"));
        let wait = tokio::time::timeout(std::time::Duration::from_millis(20), fill.wait_for_reader()).await;
        assert!(wait.is_err(), "the reader has not taken the chunk: the origin is not read further");
        assert!(matches!(now(&mut reader), Poll::Ready(Some(Ok(_)))));
        assert!(fill.wait_for_reader().await);
    }

    // Guards against cutting readers that are only served later than the others: on a
    // busy machine twenty readers "at full speed" are not at the same place, and a fill
    // that cut at the window's edge at once cut most of them.
    #[tokio::test]
    async fn a_reader_late_for_a_moment_at_the_windows_edge_is_waited_for_not_cut() {
        let fill = shared(None);
        let mut fast = fill.attach().expect("attach");
        let mut late = fill.attach().expect("attach");
        fill.to_window(8);
        for _ in 0..2 {
            assert!(fill.wait_for_reader().await);
            fill.push(Bytes::from_static(b"abcd"));
            assert!(matches!(now(&mut fast), Poll::Ready(Some(Ok(_)))));
        }
        // The late reader is 8 bytes behind: the next chunk would cut it. The writer waits;
        // the reader catches up well within the grace; nobody is cut.
        let started = std::time::Instant::now();
        let catch_up = async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert!(matches!(now(&mut late), Poll::Ready(Some(Ok(_)))));
            assert!(matches!(now(&mut late), Poll::Ready(Some(Ok(_)))));
        };
        let (ready, ()) = tokio::join!(fill.wait_for_reader(), catch_up);
        assert!(ready);
        assert!(started.elapsed() < LAGGARD_GRACE, "it waited for the reader, not for the grace");
        fill.push(Bytes::from_static(b"efgh"));
        assert_eq!(fill.readers(), 2, "the late reader caught up: not cut");
    }
}
