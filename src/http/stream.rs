//! `GET /sse/environments/{key}/stream`: the Server-Sent Events stream.
//!
//! Each stream writes the newest known update first (or, with none known, a `: ping` comment,
//! so that every browser's EventSource opens at once), then one event per newer update, a
//! `: ping` comment after `keepalive_interval` without a write, and ends cleanly after its
//! lifetime (`max_stream_age` minus jitter) or during the drain after SIGTERM, each preceded by
//! a short `retry:` so browsers come back quickly.
//!
//! A stream counts what it writes into the metrics (shared atomics, no lock) and, when it
//! closes, logs one debug line with its duration and why it ended.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use http::header::HeaderValue;
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::Either;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::WatchStream;
use warp::Filter;
use warp::path::FullPath;

use super::{ApiError, State, WarpBody, with_state};
use crate::domain::{EnvironmentKey, UpdatedAt};
use crate::hub::{Event, Latest};

const KEEPALIVE_FRAME: &[u8] = b": ping\n\n";
/// Sent before a planned end: EventSource waits the last `retry:` before reconnecting.
const ENDING_FRAME: &[u8] = b"retry: 1000\n\n";

/// Timing of every stream, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// `None`: endless.
    pub max_age: Option<Duration>,
    pub max_age_jitter: f64,
    pub keepalive: Duration,
    pub retention: Duration,
    pub drain_period: Duration,
}

/// Counts open streams against the configured cap.
#[derive(Debug, Clone)]
pub struct Admission {
    open: Arc<AtomicUsize>,
    max: usize,
}

impl Admission {
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::default(),
            max,
        }
    }

    fn try_acquire(&self) -> Option<StreamPermit> {
        let previous = self.open.fetch_add(1, Ordering::AcqRel);
        let permit = StreamPermit(self.open.clone());
        (previous < self.max).then_some(permit)
    }

    pub fn open_streams(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One admitted stream; releases its place when dropped.
#[derive(Debug)]
struct StreamPermit(Arc<AtomicUsize>);

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the route hands to [`attach_body`] through the response's extensions (which require
/// `Clone`; only one copy is ever taken out).
#[derive(Clone)]
pub struct Subscription {
    key: EnvironmentKey,
    updates: Latest,
    /// The newest update when the stream was admitted, if any.
    current: Option<Event>,
    permit: Arc<StreamPermit>,
    state: Arc<State>,
}

/// Every header of a stream's response but its framing and `Date`, in the order each writer
/// sends them: `h1` and `h2` write them themselves, [`route`] inserts them for hyper.
pub(super) const RESPONSE_HEADERS: [(&str, &str); 5] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    // nginx would otherwise hold events back in its buffer.
    ("x-accel-buffering", "no"),
    // Lets a page see the stream's protocol and timings in Resource Timing.
    ("timing-allow-origin", "*"),
    // `routes` adds it to every response of warp's; `h1` and `h2` write theirs without warp.
    ("access-control-allow-origin", "*"),
];

pub fn route(
    state: Arc<State>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    // Matched by `key_segment`, as `h1` and `h2` match it, not by `warp::path!`: the stream
    // requests they hand over (HTTP/1.0, heads too large for `h1`, streams beyond the cap)
    // come here, and whether a target names a stream must not depend on who reads it.
    warp::path::full()
        .and_then(|path: FullPath| {
            std::future::ready(
                key_segment(path.as_str())
                    .map(str::to_owned)
                    .ok_or_else(warp::reject::not_found),
            )
        })
        .and(warp::get())
        .and(with_state(state))
        .map(subscribe)
}

/// The raw key segment of a stream's request target, with any query ignored. Doubled slashes
/// are accepted (the Flagsmith API joins URLs by concatenation), and so is a trailing one, as
/// warp's `path!` took it.
pub(super) fn key_segment(target: &str) -> Option<&str> {
    // The absolute form, which a server must accept too (RFC 9112 §3.2.2): the path is what
    // follows the authority, which ends at the first `/`, `?` or `#` (RFC 3986 §3.2).
    // `http://sse?x//sse/environments/k/stream` has an empty path, as hyper reads it (found by
    // `fuzz/`'s `h1_request`).
    let target = match target.split_once("://") {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            &rest[rest.find(['/', '?', '#'])?..]
        }
        _ => target,
    };
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if !path.starts_with('/') {
        return None;
    }
    let mut segments = path.split('/').filter(|segment| !segment.is_empty());
    match (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) {
        (Some("sse"), Some("environments"), Some(key), Some("stream"), None) => Some(key),
        _ => None,
    }
}

fn subscribe(key: String, state: Arc<State>) -> warp::reply::Response {
    let key = match EnvironmentKey::from_path_segment(&key) {
        Ok(key) => key,
        Err(err) => return ApiError::BadRequest(err.to_string()).into_response(),
    };
    let Some(subscription) = Subscription::admit(key, state.clone()) else {
        state.metrics.streams.closed.rejected.inc();
        return ApiError::TooManyStreams.into_response();
    };
    let mut response = Response::new(warp::reply::Response::default().into_body());
    let headers = response.headers_mut();
    for (name, value) in RESPONSE_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response.extensions_mut().insert(subscription);
    *response.status_mut() = StatusCode::OK;
    response
}

impl Subscription {
    /// A stream of `key`, or `None` when the cap on open streams is reached.
    pub(super) fn admit(key: EnvironmentKey, state: Arc<State>) -> Option<Self> {
        let permit = state.admission.try_acquire()?;
        let mut updates = state.hub.subscribe(&key);
        // An update that landed since the line above counted this stream as waiting for it.
        let landed = updates.has_changed().unwrap_or(false);
        // Taken at once: every later update is a change this stream has to write.
        let current = updates.borrow_and_update().clone();
        if landed && let Some(event) = &current {
            event.fanout.written();
        }
        Some(Self {
            key,
            updates,
            current,
            permit: Arc::new(permit),
            state,
        })
    }
}

/// Gives a stream response its event body; every other response keeps warp's body.
pub fn attach_body(mut response: warp::reply::Response) -> Response<Either<WarpBody, SseBody>> {
    match response.extensions_mut().remove::<Subscription>() {
        Some(subscription) => response.map(|_| Either::Right(SseBody::new(subscription))),
        None => response.map(Either::Left),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// The ending `retry:` was written; the next poll ends the body.
    Ending(Planned),
}

/// Why a stream ends on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Planned {
    MaxAge,
    Shutdown,
}

/// The frames a stream writes, as the metrics name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Message {
    Data,
    Keepalive,
}

/// The body of one stream. Polled by the connection's task, it holds no task or queue of its
/// own: a subscriber that reads slowly is simply polled less often and sees the newest event.
pub struct SseBody {
    key: EnvironmentKey,
    /// Written first, right after the response head: the newest update when the stream
    /// opened, if still within retention, or else a keep-alive comment. Firefox fires
    /// EventSource's `open` only once body bytes arrive, which would otherwise be the first
    /// keep-alive, `keepalive_interval` on; every SDK already reads that comment, every 15 s.
    /// It is a write like any other: the next keep-alive comes `keepalive_interval` after it,
    /// when it came that long after the head before (idle timers of proxies count from the
    /// last bytes too).
    first: Option<Bytes>,
    /// Changes after the stream opened.
    updates: WatchStream<Option<Event>>,
    last_sent: Option<UpdatedAt>,
    /// The sequence of the newest update this stream has taken, written or not.
    sequence: u64,
    /// Fires at the end or at the keep-alive deadline as it was when last armed; writes in
    /// between do not re-arm it, so an event costs no timer operation.
    timer: Pin<Box<Sleep>>,
    last_write: Instant,
    ends_at: Option<Instant>,
    /// Why the stream ends at `ends_at`.
    planned: Planned,
    /// Whether the end during the drain after SIGTERM is planned.
    drain_planned: bool,
    phase: Phase,
    opened_at: Instant,
    /// The last frame handed to the connection: the one counted as failed if it breaks.
    last_message: Option<Message>,
    events_written: u64,
    state: Arc<State>,
    _permit: Arc<StreamPermit>,
}

impl SseBody {
    pub(super) fn new(subscription: Subscription) -> Self {
        let Subscription {
            key,
            updates,
            current,
            permit,
            state,
        } = subscription;
        let settings = state.streams;
        let now = Instant::now();
        let ends_at = settings.max_age.map(|age| {
            let jitter = settings.max_age_jitter * rand::random::<f64>();
            now + age.mul_f64(1.0 - jitter)
        });
        let sequence = current.as_ref().map_or(0, |event| event.sequence);
        let first = current.filter(|event| {
            SystemTime::now()
                .duration_since(event.stored_at)
                .map_or(true, |age| age <= settings.retention)
        });
        state.metrics.streams.opened.inc();
        let mut body = Self {
            key,
            last_sent: first.as_ref().map(|event| event.updated_at),
            first: Some(first.map_or(Bytes::from_static(KEEPALIVE_FRAME), |event| event.frame)),
            updates: WatchStream::from_changes(updates),
            sequence,
            timer: Box::pin(tokio::time::sleep_until(now)),
            last_write: now,
            ends_at,
            planned: Planned::MaxAge,
            drain_planned: false,
            phase: Phase::Open,
            opened_at: now,
            last_message: None,
            events_written: 0,
            state,
            _permit: permit,
        };
        body.arm();
        body
    }

    /// Sets the timer to the end or the next keep-alive, whichever comes first.
    fn arm(&mut self) {
        let keepalive = self.last_write + self.state.streams.keepalive;
        let wake = self.ends_at.map_or(keepalive, |end| end.min(keepalive));
        self.timer.as_mut().reset(wake);
    }

    fn write(
        &mut self,
        message: Message,
        frame: Bytes,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.last_write = Instant::now();
        self.last_message = Some(message);
        let writes = &self.state.metrics.writes;
        match message {
            Message::Data => {
                self.events_written += 1;
                writes.data.inc();
            }
            Message::Keepalive => writes.keepalive.inc(),
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn end(&mut self, planned: Planned) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.phase = Phase::Ending(planned);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(ENDING_FRAME)))))
    }

    /// Takes an update from the watch: the stream now owes its fan-out nothing for it, and
    /// skipped the ones between the last it took and this one.
    fn take(&mut self, event: &Event) {
        event.fanout.written();
        let skipped = event.sequence.saturating_sub(self.sequence + 1);
        if skipped > 0 {
            self.state.metrics.streams.coalesced.inc_by(skipped);
        }
        self.sequence = self.sequence.max(event.sequence);
    }
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Phase::Ending(_) = this.phase {
            return Poll::Ready(None);
        }
        if let Some(first) = this.first.take() {
            // Nothing was taken from the watch yet: `last_sent` is the first frame's update,
            // if it is an event. (Keeping the message beside `first` would cost each stream
            // 8 bytes.)
            let message = match this.last_sent {
                Some(_) => Message::Data,
                None => Message::Keepalive,
            };
            return this.write(message, first);
        }
        loop {
            match Pin::new(&mut this.updates).poll_next(cx) {
                Poll::Ready(Some(Some(event))) => {
                    // Not newer than what this stream has: the hub woke every stream to
                    // tell it about the drain.
                    if event.sequence <= this.sequence {
                        continue;
                    }
                    this.take(&event);
                    // The hub only ever replaces a value with a newer one; the check guards
                    // the first change against the value already written at connect.
                    if this.last_sent.is_none_or(|sent| event.updated_at > sent) {
                        this.last_sent = Some(event.updated_at);
                        return this.write(Message::Data, event.frame);
                    }
                }
                Poll::Ready(Some(None)) => continue,
                // The hub is gone: the service is stopping.
                Poll::Ready(None) => return this.end(Planned::Shutdown),
                Poll::Pending => break,
            }
        }
        // Checked after the watch above is registered: a drain that starts from now on
        // wakes this stream through it.
        if !this.drain_planned && this.state.hub.is_draining() {
            // Spread the ends over the drain period so clients reconnect elsewhere gradually.
            this.drain_planned = true;
            let end = Instant::now()
                + this
                    .state
                    .streams
                    .drain_period
                    .mul_f64(rand::random::<f64>());
            if this.ends_at.is_none_or(|at| end < at) {
                this.ends_at = Some(end);
                this.planned = Planned::Shutdown;
            }
            this.arm();
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if this.ends_at.is_some_and(|end| now >= end) {
                return this.end(this.planned);
            }
            if now >= this.last_write + this.state.streams.keepalive {
                let keepalive = this.write(Message::Keepalive, Bytes::from_static(KEEPALIVE_FRAME));
                this.arm();
                return keepalive;
            }
            // Written to since the timer was armed: wait for the keep-alive deadline.
            this.arm();
        }
        Poll::Pending
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        let metrics = &self.state.metrics;
        let reason = match self.phase {
            Phase::Ending(Planned::MaxAge) => {
                metrics.streams.closed.max_age.inc();
                "max_age"
            }
            Phase::Ending(Planned::Shutdown) => {
                metrics.streams.closed.shutdown.inc();
                "shutdown"
            }
            Phase::Open => {
                metrics.streams.closed.client_gone.inc();
                match self.last_message {
                    Some(Message::Data) => metrics.errors.data.inc(),
                    Some(Message::Keepalive) => metrics.errors.keepalive.inc(),
                    None => {}
                }
                "client_gone"
            }
        };
        // An update that arrived after the last one this stream took was counted as waiting
        // for it; leaving settles that, or its fan-out would never complete.
        if let Some(fanout) = self.state.hub.unwritten(&self.key, self.sequence) {
            fanout.written();
        }
        slog::debug!(self.state.log, "stream ended";
            "env" => %self.key,
            "reason" => reason,
            "duration_s" => self.opened_at.elapsed().as_secs_f64(),
            "events" => self.events_written);
    }
}
