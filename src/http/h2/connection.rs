//! One HTTP/2 connection's I/O loop: frames in through [`frame::parse`], each checked against
//! its stream's [`State`], header blocks through [`Request::decode`], and every stream's
//! response frames out through one buffer, within the client's flow-control windows.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{AbortHandle, Abortable, Aborted};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::Served;
use super::frame::{
    self, ACK, DATA, END_HEADERS, END_STREAM, ENHANCE_YOUR_CALM, Error, FLOW_CONTROL_ERROR, Frame,
    HEADERS, MAX_FRAME, MAX_WINDOW, NO_ERROR, PING, PROTOCOL_ERROR, Priority, REFUSED_STREAM,
    SETTINGS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE,
};
use super::hpack::{Decoder, encode_head};
use super::request::{MAX_HEADER_LIST, Request, decode_trailers, malformed};
use super::state::{Closed, Received, Recent, State, Transition};
use crate::config::Http2Config;
use crate::http::stream::{RESPONSE_HEADERS, SseBody, Subscription};
use crate::http::{Forward, PeerAddr, RoutedResponse, State as Shared, WarpBody};

/// The largest header block, HEADERS and CONTINUATION together: beyond it the client is
/// flooding (CONTINUATION floods), not sending a request.
const MAX_HEADER_BLOCK: usize = 16 * 1024;
/// The flow-control window every stream and connection starts with (RFC 9113 §6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;
/// Output this large stops the reading of frames that ask for an answer until it is sent.
const MAX_PENDING_OUTPUT: usize = 64 * 1024;
/// Streams reset per [`RESET_PERIOD`], by the client (CVE-2023-44487) or by the service for
/// the client's errors (CVE-2025-8671), before the client gets GOAWAY.
const RESET_BUDGET: u32 = 1000;
const RESET_PERIOD: Duration = Duration::from_secs(10);
/// Read from the socket at once.
const READ_CHUNK: usize = 4096;
/// What a client may send on a stream, advertised as SETTINGS_INITIAL_WINDOW_SIZE: a request
/// body forwarded to warp fits (publishes are at most 4 KiB). The window is never reopened,
/// and a body that fills it is answered as it is.
const MAX_BODY: usize = 16 * 1024;
/// A forwarded request's response body is read whole before it is sent: `/metricsz` is tens
/// of KiB.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;
/// Requests other than subscriptions one connection may have in progress; more are refused
/// with REFUSED_STREAM, which a client may retry. Each may hold a 16 KiB header list (which
/// HPACK lets a client send in a few bytes), its body and a response read whole, where a
/// subscription holds a few hundred bytes; `max_concurrent_streams` alone would let one
/// connection hold 1000 of them.
const MAX_FORWARDED: usize = 64;
const INTERNAL_ERROR: u32 = 0x2;

/// The streams whose bodies woke since the connection's task last polled them, and that task.
#[derive(Default)]
struct Woken {
    streams: Mutex<Vec<u32>>,
    task: AtomicWaker,
}

/// The waker a stream's body is polled with: it queues the stream in [`Woken`], once until the
/// body is polled again, and wakes the connection's task, which then polls only the bodies
/// that woke. A stream costs this one allocation, made when its body starts.
struct StreamWaker {
    stream: u32,
    queued: AtomicBool,
    woken: Arc<Woken>,
}

impl Wake for StreamWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.woken
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(self.stream);
            self.woken.task.wake();
        }
    }
}

/// What the service is doing for an open or half-closed stream.
enum Work {
    /// The request's body is arriving.
    Receiving(Box<(Request, Vec<u8>)>),
    /// warp is answering, or its response body is being read whole; aborted if the stream
    /// closes first.
    Forwarding(AbortHandle),
    /// A stream's body, polled for its frames.
    Body(Box<SseBody>, Arc<StreamWaker>),
    /// Only what `pending` holds is left to send, or nothing is: a request body that goes on
    /// after its response is whole is dropped as it comes.
    Sending,
}

/// An open or half-closed stream.
struct Stream {
    state: State,
    /// What the client still lets this stream send; it exists from the stream's first frame,
    /// so a WINDOW_UPDATE sent with the request counts.
    window: i64,
    /// What the client sent on the stream, padding included, against [`MAX_BODY`].
    received: u32,
    /// Data of the body's last frame not yet sent, from `sent` on; the body is polled again
    /// only once it is all out, so a slow reader skips to the newest update.
    pending: Option<(Bytes, usize)>,
    /// END_STREAM goes with the end of the pending data.
    ended: bool,
    /// The stream's request is forwarded to warp, not a subscription: counted against
    /// [`MAX_FORWARDED`].
    forwarded: bool,
    work: Work,
}

/// What became of a forwarded request: warp's response, or its body read whole.
enum Forwarded {
    Answered(Box<RoutedResponse>),
    Read(Option<Bytes>),
}

/// A forwarded request warp is answering, or a response body being read whole.
type Forwarding = Pin<Box<dyn Future<Output = Result<(u32, Forwarded), Aborted>> + Send>>;

/// A header block arriving in CONTINUATION frames: its stream, what its HEADERS frame said,
/// and what arrived so far.
struct Continuation {
    stream: u32,
    end_stream: bool,
    priority: Option<Priority>,
    block: Vec<u8>,
}

pub struct Connection<'a, I> {
    io: &'a mut I,
    state: Arc<Shared>,
    forward: Forward,
    peer: PeerAddr,
    config: Http2Config,
    forwarding: FuturesUnordered<Forwarding>,
    decoder: Decoder,
    /// Bytes read and not yet parsed: empty, and without an allocation, between frames.
    pub read: Vec<u8>,
    /// Frames for the socket, from `sent` on.
    out: Vec<u8>,
    sent: usize,
    /// Open and half-closed streams.
    streams: HashMap<u32, Stream>,
    /// Of them, those whose requests are forwarded to warp.
    forwarded: usize,
    /// How the last streams closed.
    recent: Recent,
    woken: Arc<Woken>,
    /// Streams whose bodies are to be polled: woken ones, new ones, and ones whose last frame
    /// has gone out.
    polling: Vec<u32>,
    /// Streams with data their windows held back.
    blocked: Vec<u32>,
    /// The client's initial window for streams, and the connection's send window.
    initial_window: i64,
    window: i64,
    /// What the client may still send on the connection.
    receive_window: i64,
    /// The largest DATA payload the client accepts.
    max_frame: usize,
    continuation: Option<Continuation>,
    /// The client's first frame, which must be SETTINGS (RFC 9113 §3.4), has come.
    greeted: bool,
    /// The highest stream the client opened.
    last_stream: u32,
    /// The last stream of the GOAWAY sent, once one is: no stream opens any more, and the
    /// connection ends with its last one.
    going_away: Option<u32>,
    resets: u32,
    resets_since: Instant,
    /// Pinged because the client was quiet; unanswered since then.
    ping_sent: Option<Instant>,
    last_heard: Instant,
    timer: Pin<Box<Sleep>>,
    draining: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<'a, I: AsyncRead + AsyncWrite + Unpin> Connection<'a, I> {
    pub fn new(io: &'a mut I, served: &Served<'_>) -> Self {
        let now = Instant::now();
        let (state, config) = (served.state, served.config);
        let mut connection = Self {
            io,
            state: state.clone(),
            forward: served.forward.clone(),
            peer: served.peer,
            config: config.clone(),
            forwarding: FuturesUnordered::new(),
            decoder: Decoder::default(),
            read: Vec::new(),
            out: Vec::new(),
            sent: 0,
            streams: HashMap::new(),
            forwarded: 0,
            recent: Recent::default(),
            woken: Arc::default(),
            polling: Vec::new(),
            blocked: Vec::new(),
            initial_window: DEFAULT_WINDOW,
            window: DEFAULT_WINDOW,
            receive_window: DEFAULT_WINDOW,
            max_frame: MAX_FRAME,
            continuation: None,
            greeted: false,
            last_stream: 0,
            going_away: None,
            resets: 0,
            resets_since: now,
            ping_sent: None,
            last_heard: now,
            timer: Box::pin(tokio::time::sleep_until(now)),
            draining: Box::pin(state.draining.clone().cancelled_owned()),
        };
        frame::put_settings(
            &mut connection.out,
            &[
                (
                    SETTINGS_MAX_CONCURRENT_STREAMS,
                    config.max_concurrent_streams,
                ),
                (SETTINGS_INITIAL_WINDOW_SIZE, MAX_BODY as u32),
                (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32),
            ],
        );
        connection.arm();
        connection
    }

    /// A stream's state, open or not.
    fn state_of(&self, stream: u32) -> State {
        match self.streams.get(&stream) {
            Some(entry) => entry.state,
            None => self.recent.state_of(stream, self.last_stream),
        }
    }

    /// Applies what receiving `frame` on `stream` does to its state: the state it was in,
    /// or `None` if the frame is to be ignored.
    fn receive(&mut self, stream: u32, received: Received) -> Result<Option<State>, Error> {
        let before = self.state_of(stream);
        match before.receive(stream, received) {
            Transition::To(State::Closed(closed)) => {
                self.close_stream(stream, closed);
                Ok(Some(before))
            }
            Transition::To(after) => {
                if let Some(entry) = self.streams.get_mut(&stream) {
                    entry.state = after;
                }
                Ok(Some(before))
            }
            Transition::Ignore => Ok(None),
            Transition::Error(error) => Err(error),
        }
    }

    /// Starts serving `stream`'s subscription: its response head, then its body's frames.
    fn open(&mut self, stream: u32, subscription: Subscription) {
        let headers = RESPONSE_HEADERS.map(|(name, value)| (name.as_bytes(), value.as_bytes()));
        // Made for each stream: its Date is the response's.
        let head = encode_head(http::StatusCode::OK, headers);
        frame::put(&mut self.out, HEADERS, END_HEADERS, stream, &head);
        self.serve_body(stream, Box::new(SseBody::new(subscription)));
    }

    /// Serves `body` as `stream`'s, polled first by this turn's [`Self::poll_bodies`].
    fn serve_body(&mut self, stream: u32, body: Box<SseBody>) {
        let Some(entry) = self.streams.get_mut(&stream) else {
            return;
        };
        let waker = Arc::new(StreamWaker {
            stream,
            queued: AtomicBool::new(true),
            woken: self.woken.clone(),
        });
        entry.work = Work::Body(body, waker);
        self.polling.push(stream);
    }

    /// Forgets an open or half-closed `stream`, now closed: its body, if any, is dropped
    /// with it, and what warp was doing for it stops.
    fn close_stream(&mut self, stream: u32, closed: Closed) {
        if let Some(entry) = self.streams.remove(&stream) {
            self.forwarded -= usize::from(entry.forwarded);
            match entry.work {
                Work::Forwarding(abort) => abort.abort(),
                // The body the connection's window held: given back now it is dropped.
                Work::Receiving(receiving) => self.give_back(receiving.1.len()),
                Work::Body(..) | Work::Sending => {}
            }
        }
        self.recent.remember(stream, closed);
    }

    /// Gives back `length` bytes of the connection's receive window.
    fn give_back(&mut self, length: usize) {
        if length > 0 {
            self.receive_window += length as i64;
            let length = u32::try_from(length).expect("bodies are at most 16 KiB");
            frame::put_window_update(&mut self.out, 0, length);
        }
    }

    /// Resets `stream` for the client's error, as a stream error does (RFC 9113 §5.4.2).
    fn reset(&mut self, stream: u32, code: u32) {
        frame::put_rst_stream(&mut self.out, stream, code);
        self.close_stream(stream, Closed::ResetHere);
    }

    /// Counts a stream reset against [`RESET_BUDGET`].
    fn count_reset(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        if now.duration_since(self.resets_since) > RESET_PERIOD {
            self.resets = 0;
            self.resets_since = now;
        }
        self.resets += 1;
        if self.resets > RESET_BUDGET {
            return Err(Error::Connection(ENHANCE_YOUR_CALM));
        }
        Ok(())
    }

    /// `stream`'s END_STREAM went out with the frame just queued.
    fn end_sent(&mut self, stream: u32) {
        let Some(entry) = self.streams.get_mut(&stream) else {
            return;
        };
        match entry.state.end_stream_sent() {
            State::Closed(closed) => self.close_stream(stream, closed),
            // The response is whole and does not need the rest of the request: the client is
            // asked to stop sending it (RFC 9113 §8.1).
            State::HalfClosedLocal => {
                frame::put_rst_stream(&mut self.out, stream, NO_ERROR);
                self.close_stream(stream, Closed::ResetHere);
            }
            state => entry.state = state,
        }
    }

    /// Passes a whole request to warp.
    fn dispatch(&mut self, stream: u32, request: Request, body: Vec<u8>) -> Result<(), Error> {
        let Some(request) = request.into_http(body, self.peer) else {
            return Err(malformed(stream));
        };
        let Some(entry) = self.streams.get_mut(&stream) else {
            return Ok(());
        };
        let (handle, registration) = AbortHandle::new_pair();
        entry.work = Work::Forwarding(handle);
        let answer = (self.forward)(request);
        self.forwarding.push(Box::pin(Abortable::new(
            async move { (stream, Forwarded::Answered(Box::new(answer.await))) },
            registration,
        )));
        Ok(())
    }

    /// Starts sending a forwarded request's response: its head, then its body, a stream's as
    /// the streams served here, warp's once read whole.
    fn respond(&mut self, stream: u32, response: RoutedResponse) {
        let Some(entry) = self.streams.get_mut(&stream) else {
            return;
        };
        let (parts, body) = response.into_parts();
        let headers = parts.headers.iter();
        let head = encode_head(
            parts.status,
            headers.map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
        );
        match body {
            http_body_util::Either::Right(body) => {
                frame::put(&mut self.out, HEADERS, END_HEADERS, stream, &head);
                self.serve_body(stream, Box::new(body));
            }
            http_body_util::Either::Left(body) if body.is_end_stream() => {
                entry.work = Work::Sending;
                let flags = END_HEADERS | END_STREAM;
                frame::put(&mut self.out, HEADERS, flags, stream, &head);
                self.end_sent(stream);
            }
            http_body_util::Either::Left(body) => {
                frame::put(&mut self.out, HEADERS, END_HEADERS, stream, &head);
                let (handle, registration) = AbortHandle::new_pair();
                entry.work = Work::Forwarding(handle);
                self.forwarding.push(Box::pin(Abortable::new(
                    async move { (stream, Forwarded::Read(read_whole(body).await)) },
                    registration,
                )));
            }
        }
    }

    /// Takes what warp answered and what was read of its bodies.
    fn poll_forwarded(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(forwarded)) = self.forwarding.poll_next_unpin(cx) {
            let Ok((stream, forwarded)) = forwarded else {
                continue;
            };
            match forwarded {
                Forwarded::Answered(response) => self.respond(stream, *response),
                Forwarded::Read(body) => {
                    let Some(entry) = self.streams.get_mut(&stream) else {
                        continue;
                    };
                    entry.work = Work::Sending;
                    match body {
                        Some(body) if !body.is_empty() => {
                            entry.pending = Some((body, 0));
                            entry.ended = true;
                            if !self.send(stream) {
                                self.blocked.push(stream);
                            }
                        }
                        Some(_) => {
                            frame::put(&mut self.out, DATA, END_STREAM, stream, &[]);
                            self.end_sent(stream);
                        }
                        None => {
                            frame::put_rst_stream(&mut self.out, stream, INTERNAL_ERROR);
                            self.close_stream(stream, Closed::ResetHere);
                        }
                    }
                }
            }
        }
    }

    /// Ends the connection with GOAWAY `code`; the error is what `poll` returns.
    fn fail(&mut self, code: u32) -> io::Error {
        self.go_away(code);
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("HTTP/2 error {code:#x}"),
        )
    }

    fn go_away(&mut self, code: u32) {
        if self.going_away.is_some() && code == NO_ERROR {
            return;
        }
        // A later GOAWAY never names a higher stream (RFC 9113 §6.8).
        let last = self.going_away.unwrap_or(self.last_stream);
        self.going_away = Some(last);
        frame::put_goaway(&mut self.out, last, code);
    }

    fn on_settings(&mut self, values: &[u8]) -> Result<(), Error> {
        for (id, value) in frame::settings(values) {
            match id {
                SETTINGS_INITIAL_WINDOW_SIZE => {
                    let change = i64::from(value) - self.initial_window;
                    self.initial_window = i64::from(value);
                    for entry in self.streams.values_mut() {
                        entry.window += change;
                        if entry.window > MAX_WINDOW {
                            return Err(Error::Connection(FLOW_CONTROL_ERROR));
                        }
                    }
                }
                SETTINGS_MAX_FRAME_SIZE => self.max_frame = value as usize,
                // Responses are encoded without the dynamic table, whatever its size, and the
                // service never pushes.
                _ => {}
            }
        }
        frame::put(&mut self.out, SETTINGS, ACK, 0, &[]);
        Ok(())
    }

    /// Handles the frames `read` holds, as long as output is not piling up.
    fn on_frames(&mut self) -> Result<(), u32> {
        let mut at = 0;
        let read = std::mem::take(&mut self.read);
        let result = loop {
            if self.out.len() - self.sent > MAX_PENDING_OUTPUT {
                break Ok(());
            }
            let Some((frame, length)) = frame::parse(&read[at..]) else {
                break Ok(());
            };
            at += length;
            let handled = frame.and_then(|frame| self.on_frame(frame));
            if let Err(code) = handled.or_else(|error| self.on_error(error)) {
                break Err(code);
            }
        };
        self.read = read;
        self.read.drain(..at);
        if self.read.is_empty() {
            self.read = Vec::new();
        }
        result
    }

    /// Resets the stream of a stream error; the code of a connection error.
    fn on_error(&mut self, error: Error) -> Result<(), u32> {
        match error {
            // No RST_STREAM for a stream that never opened (RFC 9113 §5.1): the error is the
            // connection's.
            Error::Stream(stream, code) if self.state_of(stream) == State::Idle => Err(code),
            // Whatever comes on a stream after the service reset it is ignored (RFC 9113
            // §5.4.2), malformed or not.
            Error::Stream(stream, _)
                if self.state_of(stream) == State::Closed(Closed::ResetHere) =>
            {
                Ok(())
            }
            Error::Stream(stream, code) => {
                self.reset(stream, code);
                self.count_reset().map_err(|_| ENHANCE_YOUR_CALM)
            }
            Error::Connection(code) => Err(code),
        }
    }

    fn on_frame(&mut self, frame: Frame<'_>) -> Result<(), Error> {
        if !self.greeted {
            if !matches!(frame, Frame::Settings { ack: false, .. }) {
                return Err(Error::Connection(PROTOCOL_ERROR));
            }
            self.greeted = true;
        }
        // A header block takes every frame until it ends (RFC 9113 §6.10).
        if let Some(mut continuation) = self.continuation.take() {
            let Frame::Continuation {
                stream,
                end_headers,
                fragment,
            } = frame
            else {
                return Err(Error::Connection(PROTOCOL_ERROR));
            };
            if stream != continuation.stream {
                return Err(Error::Connection(PROTOCOL_ERROR));
            }
            continuation.block.extend_from_slice(fragment);
            if continuation.block.len() > MAX_HEADER_BLOCK {
                return Err(Error::Connection(ENHANCE_YOUR_CALM));
            }
            if !end_headers {
                self.continuation = Some(continuation);
                return Ok(());
            }
            let Continuation {
                stream,
                end_stream,
                priority,
                block,
            } = continuation;
            return self.on_header_block(stream, end_stream, priority, &block);
        }
        match frame {
            Frame::Data {
                stream,
                end_stream,
                data,
                flow,
            } => self.on_data(stream, end_stream, data, flow),
            Frame::Headers {
                stream,
                end_stream,
                end_headers: false,
                priority,
                fragment,
            } => {
                if fragment.len() > MAX_HEADER_BLOCK {
                    return Err(Error::Connection(ENHANCE_YOUR_CALM));
                }
                self.continuation = Some(Continuation {
                    stream,
                    end_stream,
                    priority,
                    block: fragment.to_vec(),
                });
                Ok(())
            }
            Frame::Headers {
                stream,
                end_stream,
                priority,
                fragment,
                ..
            } => self.on_header_block(stream, end_stream, priority, fragment),
            // Streams are sent in the order their frames come; priorities change nothing.
            Frame::Priority { stream, .. } => self.receive(stream, Received::Priority).map(drop),
            Frame::RstStream { stream, .. } => {
                if self.receive(stream, Received::RstStream)?.is_some() {
                    self.count_reset()?;
                }
                Ok(())
            }
            Frame::Settings { ack: true, .. } => Ok(()),
            Frame::Settings { values, .. } => self.on_settings(values),
            Frame::Ping { ack: true, .. } => {
                self.ping_sent = None;
                Ok(())
            }
            Frame::Ping { payload, .. } => {
                frame::put(&mut self.out, PING, ACK, 0, &payload);
                Ok(())
            }
            // The client leaves: open streams may end, no new ones come.
            Frame::GoAway { .. } => {
                self.go_away(NO_ERROR);
                Ok(())
            }
            Frame::WindowUpdate {
                stream: 0,
                increment,
            } => {
                self.window += i64::from(increment);
                if self.window > MAX_WINDOW {
                    return Err(Error::Connection(FLOW_CONTROL_ERROR));
                }
                Ok(())
            }
            Frame::WindowUpdate { stream, increment } => {
                self.receive(stream, Received::WindowUpdate)?;
                if let Some(entry) = self.streams.get_mut(&stream) {
                    entry.window += i64::from(increment);
                    if entry.window > MAX_WINDOW {
                        return Err(Error::Stream(stream, FLOW_CONTROL_ERROR));
                    }
                }
                Ok(())
            }
            Frame::Continuation { .. } => Err(Error::Connection(PROTOCOL_ERROR)),
            Frame::Unknown { .. } => Ok(()),
        }
    }

    /// A request body's frame. The stream's window is never given back ([`MAX_BODY`]); the
    /// connection's is for what is not kept, at once, and for a body once it is passed on or
    /// dropped, so that what a connection's streams hold is bounded by its window (the
    /// default 65,535 bytes), all streams together.
    fn on_data(
        &mut self,
        stream: u32,
        end_stream: bool,
        data: &[u8],
        flow: u32,
    ) -> Result<(), Error> {
        // What the client may send on the connection (RFC 9113 §6.9.1).
        self.receive_window -= i64::from(flow);
        if self.receive_window < 0 {
            return Err(Error::Connection(FLOW_CONTROL_ERROR));
        }
        let kept = self.on_stream_data(stream, end_stream, data, flow);
        self.give_back(flow as usize - kept.as_ref().map_or(0, |kept| *kept));
        kept?;
        match end_stream {
            true => self.dispatch_received(stream),
            false => self.dispatch_full(stream),
        }
    }

    /// Takes a DATA frame's data into its stream's request body; how much was kept.
    fn on_stream_data(
        &mut self,
        stream: u32,
        end_stream: bool,
        data: &[u8],
        flow: u32,
    ) -> Result<usize, Error> {
        if self
            .receive(stream, Received::Data { end_stream })?
            .is_none()
        {
            return Ok(0);
        }
        let Some(entry) = self.streams.get_mut(&stream) else {
            return Ok(0);
        };
        entry.received += flow;
        if entry.received as usize > MAX_BODY {
            return Err(Error::Stream(stream, FLOW_CONTROL_ERROR));
        }
        let Work::Receiving(receiving) = &mut entry.work else {
            return Ok(0);
        };
        let (request, body) = &mut **receiving;
        let length = (body.len() + data.len()) as u64;
        match request.content_length {
            Some(expected) if length > expected || (end_stream && length != expected) => {
                Err(malformed(stream))
            }
            _ => {
                body.extend_from_slice(data);
                Ok(data.len())
            }
        }
    }

    /// A body that fills the stream's window is too large for any route: warp answers 413
    /// without the rest, which the client cannot send.
    fn dispatch_full(&mut self, stream: u32) -> Result<(), Error> {
        match self.streams.get(&stream) {
            Some(entry) if entry.received as usize == MAX_BODY => self.dispatch_received(stream),
            _ => Ok(()),
        }
    }

    /// Passes the request whose body has arrived to warp, and gives back the connection's
    /// window its body held.
    fn dispatch_received(&mut self, stream: u32) -> Result<(), Error> {
        let Some(entry) = self.streams.get_mut(&stream) else {
            return Ok(());
        };
        let Work::Receiving(receiving) = std::mem::replace(&mut entry.work, Work::Sending) else {
            return Ok(());
        };
        let (request, body) = *receiving;
        self.give_back(body.len());
        self.dispatch(stream, request, body)
    }

    fn on_header_block(
        &mut self,
        stream: u32,
        end_stream: bool,
        priority: Option<Priority>,
        block: &[u8],
    ) -> Result<(), Error> {
        if self.state_of(stream) != State::Idle {
            return self.on_trailers(stream, end_stream, priority, block);
        }
        // Decoded even when refused: the decoder's table must follow the client's encoder.
        let request = Request::decode(&mut self.decoder, block)?;
        if stream.is_multiple_of(2) {
            return Err(Error::Connection(PROTOCOL_ERROR));
        }
        self.last_stream = stream;
        if self.going_away.is_some() {
            // Above the GOAWAY's last stream: the client knows it is not served.
            self.recent.remember(stream, Closed::ResetHere);
            return Ok(());
        }
        let after = if end_stream {
            State::HalfClosedRemote
        } else {
            State::Open
        };
        self.streams.insert(
            stream,
            Stream {
                state: after,
                window: self.initial_window,
                received: 0,
                pending: None,
                ended: false,
                forwarded: false,
                work: Work::Sending,
            },
        );
        if priority.is_some_and(|priority| priority.depends_on == stream) {
            return Err(Error::Stream(stream, PROTOCOL_ERROR));
        }
        if self.streams.len() > self.config.max_concurrent_streams as usize {
            return Err(Error::Stream(stream, REFUSED_STREAM));
        }
        if request.malformed.is_some() || (end_stream && request.content_length.unwrap_or(0) != 0) {
            return Err(malformed(stream));
        }
        let subscription = match end_stream {
            true => request
                .stream_key()
                .and_then(|key| Subscription::admit(key, self.state.clone())),
            false => None,
        };
        if let Some(subscription) = subscription {
            self.open(stream, subscription);
            return Ok(());
        }
        // Any other request, and a stream's beyond max_streams, whose 503 warp writes.
        if self.forwarded == MAX_FORWARDED {
            return Err(Error::Stream(stream, REFUSED_STREAM));
        }
        self.forwarded += 1;
        let entry = self.streams.get_mut(&stream).expect("inserted above");
        entry.forwarded = true;
        if end_stream {
            return self.dispatch(stream, request, Vec::new());
        }
        entry.work = Work::Receiving(Box::new((request, Vec::new())));
        Ok(())
    }

    /// A header block on a stream that is not idle: a trailer section if the request is
    /// still open, an error otherwise.
    fn on_trailers(
        &mut self,
        stream: u32,
        end_stream: bool,
        priority: Option<Priority>,
        block: &[u8],
    ) -> Result<(), Error> {
        let malformed_trailers = decode_trailers(&mut self.decoder, block)?;
        if self
            .receive(stream, Received::Headers { end_stream })?
            .is_none()
        {
            return Ok(());
        }
        if priority.is_some_and(|priority| priority.depends_on == stream) {
            return Err(Error::Stream(stream, PROTOCOL_ERROR));
        }
        if malformed_trailers.is_some() {
            return Err(malformed(stream));
        }
        let Some(Stream {
            work: Work::Receiving(receiving),
            ..
        }) = self.streams.get(&stream)
        else {
            return Ok(());
        };
        let (request, body) = &**receiving;
        if request
            .content_length
            .is_some_and(|expected| expected != body.len() as u64)
        {
            return Err(malformed(stream));
        }
        self.dispatch_received(stream)
    }

    /// Moves what the windows allow of `stream`'s pending data into `out`; true once all of
    /// it is out, when the stream's body is polled again or the stream ends.
    fn send(&mut self, stream: u32) -> bool {
        let Some(entry) = self.streams.get_mut(&stream) else {
            return true;
        };
        if let Some((data, sent)) = &mut entry.pending {
            let allowed = entry.window.min(self.window).max(0) as usize;
            let length = (data.len() - *sent).min(allowed).min(self.max_frame);
            if length > 0 {
                let last = *sent + length == data.len();
                let flags = if last && entry.ended { END_STREAM } else { 0 };
                let payload = &data[*sent..*sent + length];
                frame::put(&mut self.out, DATA, flags, stream, payload);
                *sent += length;
                entry.window -= length as i64;
                self.window -= length as i64;
            }
            if *sent < data.len() {
                return false;
            }
            entry.pending = None;
        }
        if entry.ended {
            self.end_sent(stream);
        } else if matches!(entry.work, Work::Body(..)) {
            self.polling.push(stream);
        }
        true
    }

    /// Sends what the windows now allow of the data they held back.
    fn send_blocked(&mut self) {
        if self.window <= 0 {
            return;
        }
        let blocked = std::mem::take(&mut self.blocked);
        for stream in blocked {
            if !self.send(stream) {
                self.blocked.push(stream);
            }
        }
    }

    /// Takes the frames the streams' bodies have ready.
    fn poll_bodies(&mut self, cx: &mut Context<'_>) {
        // Before the queue is taken: a body that wakes after that wakes this task again.
        self.woken.task.register(cx.waker());
        self.polling.append(
            &mut self
                .woken
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        while let Some(stream) = self.polling.pop() {
            let Some(entry) = self.streams.get_mut(&stream) else {
                continue;
            };
            // Not polled while its last frame waits for the client's window: a slow reader
            // skips to the newest update.
            let (Work::Body(body, waker), None) = (&mut entry.work, &entry.pending) else {
                continue;
            };
            waker.queued.store(false, Ordering::Release);
            let waker = Waker::from(waker.clone());
            match Pin::new(&mut **body).poll_frame(&mut Context::from_waker(&waker)) {
                Poll::Pending => {}
                Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                    entry.pending = frame.into_data().ok().map(|data| (data, 0));
                    // Polled again once this frame is out.
                    if !self.send(stream) {
                        self.blocked.push(stream);
                    }
                }
                Poll::Ready(_) => {
                    entry.work = Work::Sending;
                    frame::put(&mut self.out, DATA, END_STREAM, stream, &[]);
                    self.end_sent(stream);
                }
            }
        }
    }

    /// Sets the timer to the next keep-alive PING or its deadline.
    fn arm(&mut self) {
        let wake = match self.ping_sent {
            Some(sent) => sent + self.config.keepalive_timeout.duration(),
            None => self.last_heard + self.config.keepalive_interval.duration(),
        };
        self.timer.as_mut().reset(wake);
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.ping_sent {
                Some(sent) if now >= sent + self.config.keepalive_timeout.duration() => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer to an HTTP/2 PING",
                    ));
                }
                None if now >= self.last_heard + self.config.keepalive_interval.duration() => {
                    frame::put(&mut self.out, PING, 0, 0, &[0; 8]);
                    self.ping_sent = Some(now);
                }
                _ => {}
            }
            self.arm();
        }
        Ok(())
    }

    /// Writes `out` until it is all sent or the socket is full.
    pub fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let written = ready!(Pin::new(&mut *self.io).poll_write(cx, &self.out[self.sent..]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += written;
        }
        self.out = Vec::new();
        self.sent = 0;
        ready!(Pin::new(&mut *self.io).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has; `Ok(false)` at its end.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut chunk = [MaybeUninit::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut *self.io).poll_read(cx, &mut buf))?;
        if buf.filled().is_empty() {
            return Poll::Ready(Ok(false));
        }
        self.read.extend_from_slice(buf.filled());
        self.last_heard = Instant::now();
        self.ping_sent = None;
        self.arm();
        Poll::Ready(Ok(true))
    }

    /// Runs the connection until it ends; an error ends it at once, after a GOAWAY if one
    /// was queued.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Once a turn: each registers this task's waker, and neither changes within the turn
        // but through what the loop below does to the timer, which re-arming keeps registered.
        if self.going_away.is_none() && self.draining.as_mut().poll(cx).is_ready() {
            self.go_away(NO_ERROR);
        }
        if let Err(err) = self.poll_timer(cx) {
            self.go_away(NO_ERROR);
            return Poll::Ready(Err(err));
        }
        loop {
            if let Err(code) = self.on_frames() {
                return Poll::Ready(Err(self.fail(code)));
            }
            self.send_blocked();
            // Before the bodies: a forwarded response that streams is polled in this turn.
            self.poll_forwarded(cx);
            self.poll_bodies(cx);
            let written = self.poll_write(cx)?;
            if self.going_away.is_some() && self.streams.is_empty() && written.is_ready() {
                ready!(Pin::new(&mut *self.io).poll_shutdown(cx))?;
                return Poll::Ready(Ok(()));
            }
            // Reading waits while answers are unsent, so a client that never reads is not
            // read either.
            if self.out.len() - self.sent > MAX_PENDING_OUTPUT {
                return Poll::Pending;
            }
            // Whole frames held back while output was pending: handled by the next turn.
            if frame::parse(&self.read).is_some() {
                continue;
            }
            match self.poll_read(cx) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) => return Poll::Ready(Ok(())),
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A response body read whole, or `None` if it fails or exceeds [`MAX_RESPONSE`].
async fn read_whole(body: WarpBody) -> Option<Bytes> {
    let limited = http_body_util::Limited::new(body, MAX_RESPONSE);
    let collected = http_body_util::BodyExt::collect(limited).await.ok()?;
    Some(collected.to_bytes())
}
