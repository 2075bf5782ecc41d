//! `GET /sse/environments/{key}/stream`: the Server-Sent Events stream.
//!
//! Each stream writes the newest known update first, then one event per newer update, a
//! `: ping` comment after `keepalive_interval` without a write, and ends cleanly after its
//! lifetime (`max_stream_age` minus jitter) or during the drain after SIGTERM, each preceded by
//! a short `retry:` so browsers come back quickly.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{FutureExt, Stream};
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::Either;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use warp::Filter;

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
    updates: Latest,
    permit: Arc<StreamPermit>,
    settings: StreamSettings,
    draining: CancellationToken,
}

pub fn route(
    state: Arc<State>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    warp::path!("sse" / "environments" / String / "stream")
        .and(warp::get())
        .and(with_state(state))
        .map(subscribe)
}

fn subscribe(key: String, state: Arc<State>) -> warp::reply::Response {
    let key = match EnvironmentKey::from_path_segment(&key) {
        Ok(key) => key,
        Err(err) => return ApiError::BadRequest(err.to_string()).into_response(),
    };
    let Some(permit) = state.admission.try_acquire() else {
        return ApiError::TooManyStreams.into_response();
    };
    let subscription = Subscription {
        updates: state.hub.subscribe(&key),
        permit: Arc::new(permit),
        settings: state.streams,
        draining: state.draining.clone(),
    };
    let mut response = Response::new(warp::reply::Response::default().into_body());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response.extensions_mut().insert(subscription);
    *response.status_mut() = StatusCode::OK;
    response
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
    Ending,
}

/// The body of one stream. Polled by the connection's task, it holds no task or queue of its
/// own: a subscriber that reads slowly is simply polled less often and sees the newest event.
pub struct SseBody {
    /// The newest update when the stream opened, if still within retention: written first.
    first: Option<Bytes>,
    /// Changes after the stream opened.
    updates: WatchStream<Option<Event>>,
    last_sent: Option<UpdatedAt>,
    /// Fires at the end or at the keep-alive deadline as it was when last armed; writes in
    /// between do not re-arm it, so an event costs no timer operation.
    timer: Pin<Box<Sleep>>,
    last_write: Instant,
    ends_at: Option<Instant>,
    draining: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    settings: StreamSettings,
    phase: Phase,
    _permit: Arc<StreamPermit>,
}

impl SseBody {
    fn new(subscription: Subscription) -> Self {
        let Subscription {
            mut updates,
            permit,
            settings,
            draining,
        } = subscription;
        let now = Instant::now();
        let ends_at = settings.max_age.map(|age| {
            let jitter = settings.max_age_jitter * rand::random::<f64>();
            now + age.mul_f64(1.0 - jitter)
        });
        let current = updates.borrow_and_update().clone();
        let first = current.filter(|event| {
            SystemTime::now()
                .duration_since(event.stored_at)
                .map_or(true, |age| age <= settings.retention)
        });
        let mut body = Self {
            last_sent: first.as_ref().map(|event| event.updated_at),
            first: first.map(|event| event.frame),
            updates: WatchStream::from_changes(updates),
            timer: Box::pin(tokio::time::sleep_until(now)),
            last_write: now,
            ends_at,
            draining: Some(Box::pin(draining.cancelled_owned())),
            settings,
            phase: Phase::Open,
            _permit: permit,
        };
        body.arm();
        body
    }

    /// Sets the timer to the end or the next keep-alive, whichever comes first.
    fn arm(&mut self) {
        let keepalive = self.last_write + self.settings.keepalive;
        let wake = self.ends_at.map_or(keepalive, |end| end.min(keepalive));
        self.timer.as_mut().reset(wake);
    }

    fn write(&mut self, frame: Bytes) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.last_write = Instant::now();
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn end(&mut self) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.phase = Phase::Ending;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(ENDING_FRAME)))))
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
        if this.phase == Phase::Ending {
            return Poll::Ready(None);
        }
        if let Some(first) = this.first.take() {
            return this.write(first);
        }
        if let Some(draining) = this.draining.as_mut()
            && draining.poll_unpin(cx).is_ready()
        {
            // Spread the ends over the drain period so clients reconnect elsewhere gradually.
            this.draining = None;
            let end = Instant::now() + this.settings.drain_period.mul_f64(rand::random::<f64>());
            this.ends_at = Some(this.ends_at.map_or(end, |at| at.min(end)));
            this.arm();
        }
        loop {
            match Pin::new(&mut this.updates).poll_next(cx) {
                // The hub only ever replaces a value with a newer one; the check guards the
                // first change against the value already written at connect.
                Poll::Ready(Some(Some(event)))
                    if this.last_sent.is_none_or(|sent| event.updated_at > sent) =>
                {
                    this.last_sent = Some(event.updated_at);
                    return this.write(event.frame);
                }
                Poll::Ready(Some(_)) => continue,
                // The hub is gone: the service is stopping.
                Poll::Ready(None) => return this.end(),
                Poll::Pending => break,
            }
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if this.ends_at.is_some_and(|end| now >= end) {
                return this.end();
            }
            if now >= this.last_write + this.settings.keepalive {
                this.last_write = now;
                this.arm();
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(KEEPALIVE_FRAME)))));
            }
            // Written to since the timer was armed: wait for the keep-alive deadline.
            this.arm();
        }
        Poll::Pending
    }
}
