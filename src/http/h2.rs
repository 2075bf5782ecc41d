//! HTTP/2 on the listeners that serve streams, without hyper.
//!
//! hyper's HTTP/2 server (h2) gives every connection a 16 KiB write buffer, an 8 KiB read
//! buffer and a 4 KiB header-decoding buffer, and every stream a task of its own: 25 KiB for a
//! browser's connection with its one stream, where an HTTP/1.1 subscriber costs 2.5 KiB, and a
//! wake-up per stream for every update. Here one task serves a connection and writes the
//! frames of all its streams; buffers exist only while bytes are on their way, and each stream
//! is its [`SseBody`].
//!
//! Stream subscriptions are served here. Every other request (a proxy may send publishes and
//! probes on the connection its clients' streams use, and h2load sends nothing but them) is read
//! whole, up to [`MAX_BODY`], and answered by the same warp routes hyper would call, its
//! response read whole too.
//!
//! What h2 protects against is kept: header blocks are bounded (and with them CONTINUATION
//! floods), a client that resets streams faster than [`RESET_BUDGET`] allows gets GOAWAY,
//! answers to SETTINGS and PING wait while earlier output is unsent (a client that never reads
//! stops being read), streams honour the client's flow-control windows, idle connections are
//! pinged and closed when they do not answer, and shutdown sends GOAWAY and lets every stream
//! end with its `retry:`.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::{AbortHandle, Abortable, Aborted};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use http_body::Body as _;
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::h1::Outcome;
use super::stream::{RESPONSE_HEADERS, SseBody, Subscription, key_segment};
use super::{Forward, PeerAddr, RoutedResponse, State, WarpBody};
use crate::config::Http2Config;
use crate::domain::EnvironmentKey;

/// What every HTTP/2 connection sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The largest frame a client may send: the protocol's default, never raised here.
const MAX_FRAME: usize = 16 * 1024;
/// The largest header block, HEADERS and CONTINUATION together, and header list; a browser's
/// request with cookies is a few KiB.
const MAX_HEADER_BLOCK: usize = 16 * 1024;
/// The flow-control window every stream and connection starts with (RFC 9113 §6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;
const MAX_WINDOW: i64 = (1 << 31) - 1;
/// Output this large stops the reading of frames that ask for an answer until it is sent.
const MAX_PENDING_OUTPUT: usize = 64 * 1024;
/// Streams a client may reset per [`RESET_PERIOD`] before it gets GOAWAY (CVE-2023-44487).
const RESET_BUDGET: u32 = 1000;
const RESET_PERIOD: Duration = Duration::from_secs(10);
/// Read from the socket at once.
const READ_CHUNK: usize = 4096;
/// How long a connection ending in error waits for its GOAWAY to go out.
const GOAWAY_FLUSH: Duration = Duration::from_secs(1);
/// What a client may send on a stream: a request body forwarded to warp fits (publishes are at
/// most 4 KiB); the window is never reopened, and a body that fills it is answered as it is.
const MAX_BODY: usize = 16 * 1024;
/// A forwarded request's response body is read whole before it is sent: `/metricsz` is tens
/// of KiB.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// A frame as read: its header's fields and its payload.
struct Frame<'a> {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &'a [u8],
}

/// The frame at the start of `bytes`, if all of it is there, and its length on the wire.
fn frame(bytes: &[u8]) -> Result<Option<(Frame<'_>, usize)>, u32> {
    if bytes.len() < 9 {
        return Ok(None);
    }
    let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
    if length > MAX_FRAME {
        return Err(FRAME_SIZE_ERROR);
    }
    if bytes.len() < 9 + length {
        return Ok(None);
    }
    let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
    Ok(Some((
        Frame {
            kind: bytes[3],
            flags: bytes[4],
            stream,
            payload: &bytes[9..9 + length],
        },
        9 + length,
    )))
}

fn put_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let length = u32::try_from(payload.len()).expect("frames are small");
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A HEADERS frame's header block fragment, without padding and priority fields.
fn header_fragment<'a>(frame: &Frame<'a>) -> Result<&'a [u8], u32> {
    let mut payload = frame.payload;
    let mut padding = 0;
    if frame.flags & PADDED != 0 {
        let (&length, rest) = payload.split_first().ok_or(PROTOCOL_ERROR)?;
        padding = usize::from(length);
        payload = rest;
    }
    if frame.flags & PRIORITY_FLAG != 0 {
        payload = payload.get(5..).ok_or(PROTOCOL_ERROR)?;
    }
    if padding > payload.len() {
        return Err(PROTOCOL_ERROR);
    }
    Ok(&payload[..payload.len() - padding])
}

/// A request's header list.
#[derive(Debug, Default)]
struct Request {
    method: Option<Vec<u8>>,
    path: Option<Vec<u8>>,
    scheme: Option<Vec<u8>>,
    authority: Option<Vec<u8>>,
    headers: http::HeaderMap,
    /// A header that HTTP/2 forbids or that is not a valid header.
    malformed: bool,
    /// Decoded header list size as RFC 9113 §6.5.2 counts it.
    size: usize,
}

impl Request {
    /// The environment of a stream subscription, or `None` for any other request.
    fn stream_key(&self) -> Option<EnvironmentKey> {
        if self.method.as_deref() != Some(b"GET") || self.scheme.is_none() || self.malformed {
            return None;
        }
        let path = std::str::from_utf8(self.path.as_deref()?).ok()?;
        EnvironmentKey::from_path_segment(key_segment(path)?).ok()
    }

    /// The request for warp, with `body`; `None` if it is malformed.
    fn into_http(self, body: Vec<u8>, peer: PeerAddr) -> Option<http::Request<Full<Bytes>>> {
        if self.malformed {
            return None;
        }
        let mut uri = http::Uri::builder().path_and_query(self.path?);
        if let (Some(scheme), Some(authority)) = (self.scheme, self.authority) {
            uri = uri.scheme(&scheme[..]).authority(authority);
        }
        let mut request = http::Request::builder()
            .method(&self.method?[..])
            .uri(uri.build().ok()?)
            .version(http::Version::HTTP_2)
            .body(Full::new(Bytes::from(body)))
            .ok()?;
        *request.headers_mut() = self.headers;
        request.extensions_mut().insert(peer);
        Some(request)
    }
}

fn decode(decoder: &mut loona_hpack::Decoder<'static>, block: &[u8]) -> Result<Request, u32> {
    let mut request = Request::default();
    decoder
        .decode_with_cb(block, |name, value| {
            request.size += name.len() + value.len() + 32;
            if request.size > MAX_HEADER_BLOCK {
                request.malformed = true;
                return;
            }
            match &name[..] {
                b":method" => request.method = Some(value.into_owned()),
                b":path" => request.path = Some(value.into_owned()),
                b":scheme" => request.scheme = Some(value.into_owned()),
                b":authority" => request.authority = Some(value.into_owned()),
                b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
                | b"upgrade" => request.malformed = true,
                name if name.starts_with(b":") => request.malformed = true,
                name => match (
                    http::HeaderName::from_bytes(name),
                    http::HeaderValue::from_bytes(&value),
                ) {
                    (Ok(name), Ok(value)) => {
                        request.headers.append(name, value);
                    }
                    _ => request.malformed = true,
                },
            }
        })
        .map_err(|_| COMPRESSION_ERROR)?;
    Ok(request)
}

/// An HPACK integer with a `prefix`-bit prefix whose other bits are `first` (RFC 7541 §5.1).
fn integer(first: u8, prefix: u32, value: usize, out: &mut Vec<u8>) {
    let limit = (1_usize << prefix) - 1;
    if value < limit {
        out.push(first | value as u8);
        return;
    }
    out.push(first | limit as u8);
    let mut rest = value - limit;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A header field as a literal that is never indexed, with no Huffman coding: responses use
/// no dynamic table, so they need no encoder state.
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x10);
    integer(0, 7, name.len(), out);
    out.extend_from_slice(name);
    integer(0, 7, value.len(), out);
    out.extend_from_slice(value);
}

/// A response head: `:status` (from the static table when 200), then every header, and
/// `date` unless one of them is.
fn encode_head<'a>(
    status: http::StatusCode,
    headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Vec<u8> {
    let mut block = Vec::new();
    if status == http::StatusCode::OK {
        block.push(0x88);
    } else {
        // Never indexed, with the static table's name :status (index 8).
        integer(0x10, 4, 8, &mut block);
        integer(0, 7, 3, &mut block);
        block.extend_from_slice(status.as_str().as_bytes());
    }
    let mut dated = false;
    for (name, value) in headers {
        dated |= name == b"date";
        literal(name, value, &mut block);
    }
    if !dated {
        let date = httpdate::fmt_http_date(SystemTime::now());
        literal(b"date", date.as_bytes(), &mut block);
    }
    block
}

/// The response head of every stream served here: the stream route's, as hyper writes it.
fn response_head() -> Vec<u8> {
    let headers = RESPONSE_HEADERS.map(|(name, value)| (name.as_bytes(), value.as_bytes()));
    encode_head(http::StatusCode::OK, headers)
}

/// What a connection is served with.
pub struct Served<'a> {
    pub state: &'a Arc<State>,
    pub forward: &'a Forward,
    pub config: &'a Http2Config,
    pub peer: PeerAddr,
}

/// Serves an HTTP/2 connection whose first bytes, `read`, h1 took. Hands it to hyper, having
/// written nothing, if they are not HTTP/2's preface after all.
pub async fn serve<I>(
    io: &mut I,
    served: Served<'_>,
    mut read: Vec<u8>,
    header_timeout: Duration,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + header_timeout;
    while read.len() < PREFACE.len() {
        if read[..] != PREFACE[..read.len()] {
            return Outcome::Handoff(read);
        }
        read.reserve(PREFACE.len());
        let read_more = tokio::io::AsyncReadExt::read_buf(io, &mut read);
        match tokio::time::timeout_at(deadline, read_more).await {
            Ok(Ok(length)) if length > 0 => {}
            _ => return Outcome::Closed,
        }
    }
    if read[..PREFACE.len()] != *PREFACE {
        return Outcome::Handoff(read);
    }
    let mut connection = Connection::new(io, &served);
    read.drain(..PREFACE.len());
    connection.read = read;
    if poll_fn(|cx| connection.poll(cx)).await.is_err() {
        // The GOAWAY that says why, if the client still reads.
        let flushed = poll_fn(|cx| connection.poll_write(cx));
        let _ = tokio::time::timeout(GOAWAY_FLUSH, flushed).await;
    }
    Outcome::Closed
}

/// The streams whose bodies woke since the connection's task last polled them, and that task.
#[derive(Default)]
struct Woken {
    streams: Mutex<Vec<u32>>,
    task: AtomicWaker,
}

/// The waker a stream's body is polled with: it queues the stream in [`Woken`], once until the
/// body is polled again, and wakes the connection's task, which then polls only the bodies
/// that woke. A stream costs this one allocation, made when it opens.
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

/// One stream of a connection.
struct Stream {
    /// What the client still lets this stream send.
    window: i64,
    /// Data of the body's last frame not yet sent, from `sent` on; the body is polled again
    /// only once it is all out, so a slow reader skips to the newest update.
    pending: Option<(Bytes, usize)>,
    /// END_STREAM goes with the end of the pending data.
    ended: bool,
    /// The body and what it wakes, unless the stream answers a forwarded request whose
    /// response is read whole.
    body: Option<(Box<SseBody>, Arc<StreamWaker>)>,
}

impl Stream {
    fn new(window: i64) -> Self {
        Self {
            window,
            pending: None,
            ended: false,
            body: None,
        }
    }
}

/// What became of a forwarded request: warp's response, or its body read whole.
enum Forwarded {
    Answered(Box<RoutedResponse>),
    Read(Option<Bytes>),
}

/// A forwarded request warp is answering, or a response body being read whole.
type Forwarding = Pin<Box<dyn Future<Output = Result<(u32, Forwarded), Aborted>> + Send>>;

struct Connection<'a, I> {
    io: &'a mut I,
    state: Arc<State>,
    forward: Forward,
    peer: PeerAddr,
    config: Http2Config,
    /// Forwarded requests whose body is still arriving.
    requests: HashMap<u32, (Request, Vec<u8>)>,
    forwarding: FuturesUnordered<Forwarding>,
    /// What aborts a forwarded request's future when the client resets its stream.
    forwarded: HashMap<u32, AbortHandle>,
    decoder: loona_hpack::Decoder<'static>,
    /// Bytes read and not yet parsed: empty, and without an allocation, between frames.
    read: Vec<u8>,
    /// Frames for the socket, from `sent` on.
    out: Vec<u8>,
    sent: usize,
    streams: HashMap<u32, Stream>,
    woken: Arc<Woken>,
    /// Streams whose bodies are to be polled: woken ones, new ones, and ones whose last frame
    /// has gone out.
    polling: Vec<u32>,
    /// Streams with data their windows held back.
    blocked: Vec<u32>,
    /// The client's initial window for new streams, and the connection's send window.
    initial_window: i64,
    window: i64,
    /// The largest DATA payload the client accepts.
    max_frame: usize,
    /// A header block in CONTINUATION frames: its stream, whether END_STREAM came with it, and
    /// what arrived so far.
    continuation: Option<(u32, bool, Vec<u8>)>,
    last_stream: u32,
    /// GOAWAY was sent: no stream opens any more, and the connection ends with its last one.
    going_away: bool,
    resets: u32,
    resets_since: Instant,
    /// Pinged because the client was quiet; unanswered since then.
    ping_sent: Option<Instant>,
    last_heard: Instant,
    timer: Pin<Box<Sleep>>,
    draining: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<'a, I: AsyncRead + AsyncWrite + Unpin> Connection<'a, I> {
    fn new(io: &'a mut I, served: &Served<'_>) -> Self {
        let now = Instant::now();
        let (state, config) = (served.state, served.config);
        let mut connection = Self {
            io,
            state: state.clone(),
            forward: served.forward.clone(),
            peer: served.peer,
            config: config.clone(),
            requests: HashMap::new(),
            forwarding: FuturesUnordered::new(),
            forwarded: HashMap::new(),
            decoder: loona_hpack::Decoder::new(),
            read: Vec::new(),
            out: Vec::new(),
            sent: 0,
            streams: HashMap::new(),
            woken: Arc::default(),
            polling: Vec::new(),
            blocked: Vec::new(),
            initial_window: DEFAULT_WINDOW,
            window: DEFAULT_WINDOW,
            max_frame: MAX_FRAME,
            continuation: None,
            last_stream: 0,
            going_away: false,
            resets: 0,
            resets_since: now,
            ping_sent: None,
            last_heard: now,
            timer: Box::pin(tokio::time::sleep_until(now)),
            draining: Box::pin(state.draining.clone().cancelled_owned()),
        };
        let mut settings = Vec::new();
        for (id, value) in [
            (
                SETTINGS_MAX_CONCURRENT_STREAMS,
                config.max_concurrent_streams,
            ),
            (SETTINGS_INITIAL_WINDOW_SIZE, MAX_BODY as u32),
            (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK as u32),
        ] {
            settings.extend_from_slice(&id.to_be_bytes());
            settings.extend_from_slice(&value.to_be_bytes());
        }
        put_frame(&mut connection.out, SETTINGS, 0, 0, &settings);
        connection.arm();
        connection
    }

    /// Starts serving `stream`: its response head, then its body's frames.
    fn open(&mut self, stream: u32, subscription: Subscription) {
        self.last_stream = self.last_stream.max(stream);
        // Made for each stream: its Date is the response's.
        let head = response_head();
        put_frame(&mut self.out, HEADERS, END_HEADERS, stream, &head);
        self.serve_body(stream, Box::new(SseBody::new(subscription)));
    }

    /// Serves `body` as `stream`'s, polled first by this turn's [`Self::poll_bodies`].
    fn serve_body(&mut self, stream: u32, body: Box<SseBody>) {
        let mut entry = Stream::new(self.initial_window);
        let waker = Arc::new(StreamWaker {
            stream,
            queued: AtomicBool::new(true),
            woken: self.woken.clone(),
        });
        entry.body = Some((body, waker));
        self.streams.insert(stream, entry);
        self.polling.push(stream);
    }

    /// Forgets `stream`: its body, if any, is dropped with it.
    fn close_stream(&mut self, stream: u32) {
        self.streams.remove(&stream);
        self.requests.remove(&stream);
        if let Some(abort) = self.forwarded.remove(&stream) {
            abort.abort();
        }
    }

    fn reset(&mut self, stream: u32, code: u32) {
        put_frame(&mut self.out, RST_STREAM, 0, stream, &code.to_be_bytes());
        self.close_stream(stream);
    }

    /// Passes a whole request to warp.
    fn dispatch(&mut self, stream: u32, request: Request, body: Vec<u8>) {
        let Some(request) = request.into_http(body, self.peer) else {
            self.reset(stream, PROTOCOL_ERROR);
            return;
        };
        let (handle, registration) = AbortHandle::new_pair();
        self.forwarded.insert(stream, handle);
        let answer = (self.forward)(request);
        self.forwarding.push(Box::pin(Abortable::new(
            async move { (stream, Forwarded::Answered(Box::new(answer.await))) },
            registration,
        )));
    }

    /// Starts sending a forwarded request's response: its head, then its body, a stream's as
    /// the streams served here, warp's once read whole.
    fn respond(&mut self, stream: u32, response: RoutedResponse) {
        let (parts, body) = response.into_parts();
        let headers = parts.headers.iter();
        let head = encode_head(
            parts.status,
            headers.map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
        );
        match body {
            http_body_util::Either::Right(body) => {
                put_frame(&mut self.out, HEADERS, END_HEADERS, stream, &head);
                self.serve_body(stream, Box::new(body));
            }
            http_body_util::Either::Left(body) if body.is_end_stream() => {
                put_frame(
                    &mut self.out,
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    stream,
                    &head,
                );
            }
            http_body_util::Either::Left(body) => {
                put_frame(&mut self.out, HEADERS, END_HEADERS, stream, &head);
                let (handle, registration) = AbortHandle::new_pair();
                self.forwarded.insert(stream, handle);
                self.streams
                    .insert(stream, Stream::new(self.initial_window));
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
            self.forwarded.remove(&stream);
            match forwarded {
                Forwarded::Answered(response) => self.respond(stream, *response),
                Forwarded::Read(Some(body)) if !body.is_empty() => {
                    if let Some(entry) = self.streams.get_mut(&stream) {
                        entry.pending = Some((body, 0));
                        entry.ended = true;
                    }
                    if !self.send(stream) {
                        self.blocked.push(stream);
                    }
                }
                Forwarded::Read(Some(_)) => {
                    put_frame(&mut self.out, DATA, END_STREAM, stream, &[]);
                    self.streams.remove(&stream);
                }
                Forwarded::Read(None) => self.reset(stream, PROTOCOL_ERROR),
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
        if self.going_away && code == NO_ERROR {
            return;
        }
        self.going_away = true;
        let mut payload = self.last_stream.to_be_bytes().to_vec();
        payload.extend_from_slice(&code.to_be_bytes());
        put_frame(&mut self.out, GOAWAY, 0, 0, &payload);
    }

    fn on_settings(&mut self, payload: &[u8]) -> Result<(), u32> {
        if !payload.len().is_multiple_of(6) {
            return Err(FRAME_SIZE_ERROR);
        }
        for setting in payload.chunks(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match id {
                SETTINGS_INITIAL_WINDOW_SIZE => {
                    let value = i64::from(value);
                    if value > MAX_WINDOW {
                        return Err(FLOW_CONTROL_ERROR);
                    }
                    let change = value - self.initial_window;
                    self.initial_window = value;
                    for entry in self.streams.values_mut() {
                        entry.window += change;
                        if entry.window > MAX_WINDOW {
                            return Err(FLOW_CONTROL_ERROR);
                        }
                    }
                }
                SETTINGS_MAX_FRAME_SIZE => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return Err(PROTOCOL_ERROR);
                    }
                    self.max_frame = value as usize;
                }
                // Responses are encoded without the dynamic table, whatever its size.
                SETTINGS_HEADER_TABLE_SIZE => {}
                _ => {}
            }
        }
        put_frame(&mut self.out, SETTINGS, ACK, 0, &[]);
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
            match frame(&read[at..]) {
                Ok(Some((frame, length))) => {
                    at += length;
                    if let Err(code) = self.on_frame(&frame) {
                        break Err(code);
                    }
                }
                Ok(None) => break Ok(()),
                Err(code) => break Err(code),
            }
        };
        self.read = read;
        self.read.drain(..at);
        if self.read.is_empty() {
            self.read = Vec::new();
        }
        result
    }

    fn on_frame(&mut self, frame: &Frame<'_>) -> Result<(), u32> {
        if let Some((stream, end_stream, mut fragment)) = self.continuation.take() {
            if frame.kind != CONTINUATION || frame.stream != stream {
                return Err(PROTOCOL_ERROR);
            }
            fragment.extend_from_slice(frame.payload);
            if fragment.len() > MAX_HEADER_BLOCK {
                return Err(ENHANCE_YOUR_CALM);
            }
            if frame.flags & END_HEADERS == 0 {
                self.continuation = Some((stream, end_stream, fragment));
                return Ok(());
            }
            return self.on_request(stream, end_stream, &fragment);
        }
        match frame.kind {
            HEADERS => {
                if frame.stream.is_multiple_of(2) || frame.stream <= self.last_stream {
                    return Err(PROTOCOL_ERROR);
                }
                let fragment = header_fragment(frame)?;
                let end_stream = frame.flags & END_STREAM != 0;
                if frame.flags & END_HEADERS == 0 {
                    self.continuation = Some((frame.stream, end_stream, fragment.to_vec()));
                    return Ok(());
                }
                self.on_request(frame.stream, end_stream, fragment)
            }
            CONTINUATION => Err(PROTOCOL_ERROR),
            // The body of a forwarded request; the connection's window is given back at once,
            // the stream's never (MAX_BODY).
            DATA => {
                if frame.stream == 0 {
                    return Err(PROTOCOL_ERROR);
                }
                if !frame.payload.is_empty() {
                    let length = u32::try_from(frame.payload.len()).expect("a frame");
                    put_frame(&mut self.out, WINDOW_UPDATE, 0, 0, &length.to_be_bytes());
                }
                let data = header_fragment(&Frame {
                    flags: frame.flags & PADDED,
                    ..*frame
                })?;
                match self.requests.get_mut(&frame.stream) {
                    Some((_, body)) if body.len() + data.len() <= MAX_BODY => {
                        body.extend_from_slice(data);
                        // A body that fills the window is too large for any route: warp
                        // answers 413 without the rest, which the client cannot send.
                        if frame.flags & END_STREAM != 0 || body.len() == MAX_BODY {
                            let (request, body) =
                                self.requests.remove(&frame.stream).expect("found above");
                            self.dispatch(frame.stream, request, body);
                        }
                    }
                    Some(_) => self.reset(frame.stream, FLOW_CONTROL_ERROR),
                    None if frame.stream <= self.last_stream => {
                        if self.streams.contains_key(&frame.stream) {
                            self.reset(frame.stream, STREAM_CLOSED);
                        }
                    }
                    None => return Err(PROTOCOL_ERROR),
                }
                Ok(())
            }
            RST_STREAM => {
                if frame.stream == 0 || frame.payload.len() != 4 {
                    return Err(PROTOCOL_ERROR);
                }
                let now = Instant::now();
                if now.duration_since(self.resets_since) > RESET_PERIOD {
                    self.resets = 0;
                    self.resets_since = now;
                }
                self.resets += 1;
                if self.resets > RESET_BUDGET {
                    return Err(ENHANCE_YOUR_CALM);
                }
                self.close_stream(frame.stream);
                Ok(())
            }
            SETTINGS => {
                if frame.stream != 0 {
                    return Err(PROTOCOL_ERROR);
                }
                if frame.flags & ACK != 0 {
                    return if frame.payload.is_empty() {
                        Ok(())
                    } else {
                        Err(FRAME_SIZE_ERROR)
                    };
                }
                self.on_settings(frame.payload)
            }
            PING => {
                if frame.stream != 0 {
                    return Err(PROTOCOL_ERROR);
                }
                if frame.payload.len() != 8 {
                    return Err(FRAME_SIZE_ERROR);
                }
                if frame.flags & ACK != 0 {
                    self.ping_sent = None;
                } else {
                    put_frame(&mut self.out, PING, ACK, 0, frame.payload);
                }
                Ok(())
            }
            GOAWAY => {
                // The client leaves: open streams may end, no new ones come.
                self.go_away(NO_ERROR);
                Ok(())
            }
            WINDOW_UPDATE => {
                if frame.payload.len() != 4 {
                    return Err(FRAME_SIZE_ERROR);
                }
                let increment = i64::from(
                    u32::from_be_bytes(frame.payload.try_into().expect("4 bytes")) & 0x7fff_ffff,
                );
                if increment == 0 {
                    return Err(PROTOCOL_ERROR);
                }
                let window = match frame.stream {
                    0 => &mut self.window,
                    stream => match self.streams.get_mut(&stream) {
                        Some(entry) => &mut entry.window,
                        None => return Ok(()),
                    },
                };
                *window += increment;
                if *window > MAX_WINDOW {
                    return Err(FLOW_CONTROL_ERROR);
                }
                Ok(())
            }
            PUSH_PROMISE => Err(PROTOCOL_ERROR),
            // PRIORITY and frame types this module does not know are ignored (§5.5).
            _ => Ok(()),
        }
    }

    fn on_request(&mut self, stream: u32, end_stream: bool, block: &[u8]) -> Result<(), u32> {
        // Decoded even when refused: the decoder's table must follow the client's encoder.
        let request = decode(&mut self.decoder, block)?;
        self.last_stream = self.last_stream.max(stream);
        if self.going_away {
            return Ok(());
        }
        if self.streams.len() + self.requests.len() + self.forwarded.len()
            >= self.config.max_concurrent_streams as usize
        {
            put_frame(
                &mut self.out,
                RST_STREAM,
                0,
                stream,
                &REFUSED_STREAM.to_be_bytes(),
            );
            return Ok(());
        }
        let key = if end_stream {
            request.stream_key()
        } else {
            None
        };
        match key.and_then(|key| Subscription::admit(key, self.state.clone())) {
            Some(subscription) => self.open(stream, subscription),
            // Any other request, a stream's that is malformed, and one beyond max_streams,
            // whose 503 warp writes.
            None if end_stream => self.dispatch(stream, request, Vec::new()),
            None => {
                self.requests.insert(stream, (request, Vec::new()));
            }
        }
        Ok(())
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
                put_frame(
                    &mut self.out,
                    DATA,
                    flags,
                    stream,
                    &data[*sent..*sent + length],
                );
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
            self.streams.remove(&stream);
        } else if entry.body.is_some() {
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
            let (Some((body, waker)), None) = (&mut entry.body, &entry.pending) else {
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
                    put_frame(&mut self.out, DATA, END_STREAM, stream, &[]);
                    self.streams.remove(&stream);
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
                    put_frame(&mut self.out, PING, 0, 0, &[0; 8]);
                    self.ping_sent = Some(now);
                }
                _ => {}
            }
            self.arm();
        }
        Ok(())
    }

    /// Writes `out` until it is all sent or the socket is full.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Once a turn: each registers this task's waker, and neither changes within the turn
        // but through what the loop below does to the timer, which re-arming keeps registered.
        if !self.going_away && self.draining.as_mut().poll(cx).is_ready() {
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
            let idle = self.streams.is_empty() && self.forwarded.is_empty();
            if self.going_away && idle && written.is_ready() {
                ready!(Pin::new(&mut *self.io).poll_shutdown(cx))?;
                return Poll::Ready(Ok(()));
            }
            // Reading waits while answers are unsent, so a client that never reads is not
            // read either.
            if self.out.len() - self.sent > MAX_PENDING_OUTPUT {
                return Poll::Pending;
            }
            // Whole frames held back while output was pending: handled by the next turn.
            if frame(&self.read).map_or(true, |found| found.is_some()) {
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
