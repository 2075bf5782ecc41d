//! HTTP/1.1 stream subscriptions, served without hyper.
//!
//! A subscriber costs what its connection holds while it waits. hyper keeps an 8 to 16 KiB
//! read buffer and an 8 KiB write buffer for every HTTP/1.1 connection for as long as it is
//! open, and has no setting below that: three times the memory of everything else a stream
//! needs. So the first request of an HTTP/1.1 connection is read here, into a buffer that is
//! freed before the stream starts, and a plain `GET /sse/environments/{key}/stream` is answered
//! here too: the response head, then each event as one chunk, written straight from the bytes
//! every subscriber shares.
//!
//! Everything else leaves with the bytes read so far: HTTP/2 to `h2`, and to hyper other routes
//! and methods, HTTP/1.0, request bodies, pipelined requests, heads beyond [`MAX_HEAD`], invalid
//! keys, requests without exactly one `Host` and streams beyond the cap (whose error responses
//! warp writes). Those requests are rare
//! or cheap and hyper's handling of them stays the reference.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::State;
use super::stream::{RESPONSE_HEADERS, SseBody, Subscription, key_segment};
use crate::domain::EnvironmentKey;

/// The request head this module reads before it hands the connection to hyper: SDKs send a
/// few hundred bytes, browsers with cookies a few KiB.
pub const MAX_HEAD: usize = 8 * 1024;
/// The first allocation for a request head; it doubles up to [`MAX_HEAD`].
const FIRST_HEAD_BUFFER: usize = 1024;
/// Headers beyond this many go to hyper.
const MAX_HEADERS: usize = 48;
/// Bytes read at once while a stream runs, only to notice the client closing.
const PEER_READ: usize = 256;

/// How a connection left this module.
#[derive(Debug)]
pub enum Outcome {
    /// Closed, or to be closed: the client left, timed out or asked to close, or the service
    /// is draining.
    Closed,
    /// Not a request served here: hyper serves the connection, starting with these bytes.
    Handoff(Vec<u8>),
}

/// A request this module serves.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StreamRequest {
    pub(crate) key: EnvironmentKey,
    /// The client sent `Connection: close`.
    pub(crate) close: bool,
}

/// What the bytes read so far are.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    Stream(StreamRequest),
    /// A request hyper serves; it may be incomplete.
    Other,
    /// Too short to tell.
    Partial,
    /// Neither HTTP/1.x nor HTTP/2: a request line with another version, which no client of
    /// either sends. Closed without an answer, since no answer would be understood (an
    /// HTTP/2 client with a broken preface reads a 400 as a frame).
    Neither,
}

/// Serves stream requests on `io` until it closes or a request is not one for this module.
/// `header_timeout` bounds the wait for each complete request head, as hyper's does.
pub async fn serve<I>(io: &mut I, state: &Arc<State>, header_timeout: Duration) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    loop {
        let request = match read_request(io, &mut head, &state.draining, header_timeout).await {
            Ok(request) => request,
            Err(outcome) => return outcome,
        };
        let Some(subscription) = Subscription::admit(request.key, state.clone()) else {
            // warp answers with the 503 and counts the rejection.
            return Outcome::Handoff(head);
        };
        // Nothing else was read with the head: its memory goes back while the stream runs.
        head.clear();
        head.shrink_to_fit();
        let mut body = Some(SseBody::new(subscription));
        let after = match stream(io, &mut body, request.close).await {
            Ok(after) => after,
            Err(_) => return Outcome::Closed,
        };
        if request.close || after.close || state.hub.is_draining() {
            let _ = io.shutdown().await;
            return Outcome::Closed;
        }
        head = after.read;
    }
}

/// Reads until `head` holds a request head this module serves, or one it does not.
pub(crate) async fn read_request<I>(
    io: &mut I,
    head: &mut Vec<u8>,
    draining: &CancellationToken,
    header_timeout: Duration,
) -> Result<StreamRequest, Outcome>
where
    I: AsyncRead + Unpin,
{
    let deadline = Instant::now() + header_timeout;
    loop {
        match parse(head) {
            Parsed::Stream(request) => return Ok(request),
            Parsed::Other => return Err(Outcome::Handoff(std::mem::take(head))),
            Parsed::Neither => return Err(Outcome::Closed),
            Parsed::Partial => {}
        }
        // At least: what a client sent during its last stream may sit in a larger buffer.
        if head.len() >= MAX_HEAD {
            return Err(Outcome::Handoff(std::mem::take(head)));
        }
        if head.len() == head.capacity() {
            let grown = (head.capacity() * 2).clamp(FIRST_HEAD_BUFFER, MAX_HEAD);
            head.reserve_exact(grown - head.len());
        }
        let idle = head.is_empty();
        let read = tokio::select! {
            biased;
            read = tokio::time::timeout_at(deadline, io.read_buf(head)) => read,
            // An idle connection closes at once; one with a request on its way finishes it.
            () = draining.cancelled(), if idle => return Err(Outcome::Closed),
        };
        match read {
            Ok(Ok(read)) if read > 0 => {}
            // Timed out, closed or broken: hyper closes such connections without an answer.
            _ => return Err(Outcome::Closed),
        }
    }
}

pub(crate) fn parse(bytes: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let status = request.parse(bytes);
    // HTTP/2's preface reads as a request line of version HTTP/2.0 and method PRI.
    if status == Err(httparse::Error::Version) && request.method != Some("PRI") {
        return Parsed::Neither;
    }
    // Decided as soon as the request line shows it, so other requests reach hyper unchanged
    // however long their heads are.
    if request.method.is_some_and(|method| method != "GET") {
        return Parsed::Other;
    }
    // `Some(None)`: a request line whose path is not a stream's.
    let segment = request.path.map(key_segment);
    if segment == Some(None) {
        return Parsed::Other;
    }
    let length = match status {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    // A pipelined request behind this one, or HTTP/1.0 and its different framing: hyper's.
    if length != bytes.len() || request.version != Some(1) {
        return Parsed::Other;
    }
    let mut close = false;
    let mut hosts = 0;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("content-length") {
            if header.value != b"0" {
                return Parsed::Other;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Parsed::Other;
        } else if name.eq_ignore_ascii_case("connection") {
            close |= header
                .value
                .split(|&byte| byte == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    // RFC 9112 §3.2: answered 400, which `super::route` writes for hyper's requests too.
    if hosts != 1 {
        return Parsed::Other;
    }
    let key = segment
        .flatten()
        .and_then(|segment| EnvironmentKey::from_path_segment(segment).ok());
    match key {
        Some(key) => Parsed::Stream(StreamRequest { key, close }),
        // warp answers an invalid key with its 400.
        None => Parsed::Other,
    }
}

/// The response head of every stream: what hyper writes for the stream route's response.
fn response_head(close: bool) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    for (name, value) in RESPONSE_HEADERS {
        for part in [name.as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
            head.extend_from_slice(part);
        }
    }
    head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    if close {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head
}

/// What a connection read while its stream ran.
#[derive(Debug)]
struct AfterStream {
    /// The start of the client's next request.
    read: Vec<u8>,
    /// The client sent more than a request head while the stream ran.
    close: bool,
}

/// Writes `body` as a chunked response until it ends, and drops it before the last chunk goes
/// out. Fails when the client is gone.
///
/// The body is the caller's: a future keeps an argument moved into it twice (as the argument
/// and as the local it is bound to), and every idle connection carries this future.
async fn stream<I>(io: &mut I, body: &mut Option<SseBody>, close: bool) -> io::Result<AfterStream>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let Some(sse) = body else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    let mut peer = Peer {
        read: Vec::new(),
        reading: true,
    };
    // One slot for the head and one for the data, in place across every write: each local
    // held across an await widens this future, which an idle subscriber carries.
    let mut head = Some(response_head(close));
    // The first frame (the newest update, or the opening comment when none is known) leaves
    // with the head.
    let mut data = match poll_fn(|cx| Poll::Ready(poll_data(sse, cx))).await {
        Poll::Ready(data) => data,
        Poll::Pending => {
            write_all(io, &mut [IoSlice::new(head.as_deref().unwrap_or_default())]).await?;
            head = None;
            next_data(io, sse, &mut peer).await?
        }
    };
    while let Some(frame) = &data {
        let size = ChunkSize::new(frame.len());
        let mut slices = [
            IoSlice::new(head.as_deref().unwrap_or_default()),
            IoSlice::new(size.as_bytes()),
            IoSlice::new(frame),
            IoSlice::new(b"\r\n"),
        ];
        write_all(io, &mut slices).await?;
        head = None;
        data = next_data(io, sse, &mut peer).await?;
    }
    *body = None;
    let mut slices = [
        IoSlice::new(head.as_deref().unwrap_or_default()),
        IoSlice::new(b"0\r\n\r\n"),
    ];
    write_all(io, &mut slices).await?;
    Ok(AfterStream {
        read: peer.read,
        close: !peer.reading,
    })
}

/// The next bytes of `body` to write; `None` at its end.
fn poll_data(body: &mut SseBody, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
    loop {
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Ok(frame))) => {
                // An empty chunk would end the response.
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    return Poll::Ready(Some(data));
                }
            }
        }
    }
}

/// The next bytes of `body` to write, or an error when the client closes meanwhile.
async fn next_data<I>(io: &mut I, body: &mut SseBody, peer: &mut Peer) -> io::Result<Option<Bytes>>
where
    I: AsyncRead + Unpin,
{
    poll_fn(|cx| {
        if let Poll::Ready(Err(err)) = peer.poll_closed(io, cx) {
            return Poll::Ready(Err(err));
        }
        poll_data(body, cx).map(Ok)
    })
    .await
}

/// The client's side of a connection while its stream runs.
struct Peer {
    /// What it sent meanwhile: its next request.
    read: Vec<u8>,
    /// Whether it is still read: a client that sends more than a request head is no longer,
    /// and its connection closes after the stream.
    reading: bool,
}

impl Peer {
    /// Reads what the client sent; an error once it closed. Pending keeps the task woken for
    /// anything it sends next.
    fn poll_closed<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.reading {
            let mut bytes = [MaybeUninit::uninit(); PEER_READ];
            let mut buf = ReadBuf::uninit(&mut bytes);
            match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                Poll::Ready(Ok(())) => {
                    if self.read.len() + buf.filled().len() > MAX_HEAD {
                        self.reading = false;
                    } else {
                        self.read.extend_from_slice(buf.filled());
                    }
                }
            }
        }
        Poll::Pending
    }
}

/// A chunk's size line: hexadecimal digits and CRLF.
struct ChunkSize {
    bytes: [u8; 18],
    len: usize,
}

impl ChunkSize {
    /// Written for every event and subscriber, so without the formatting machinery.
    fn new(size: usize) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digits = (usize::BITS - size.leading_zeros()).div_ceil(4).max(1) as usize;
        let mut bytes = [0; 18];
        for (place, byte) in bytes[..digits].iter_mut().enumerate() {
            *byte = HEX[(size >> (4 * (digits - 1 - place))) & 0xf];
        }
        bytes[digits..digits + 2].copy_from_slice(b"\r\n");
        Self {
            bytes,
            len: digits + 2,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

async fn write_all<I: AsyncWrite + Unpin>(
    io: &mut I,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let written = io.write_vectored(slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    // TLS holds records until flushed.
    io.flush().await
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    fn stream(key: &str, close: bool) -> Parsed {
        Parsed::Stream(StreamRequest {
            key: EnvironmentKey::parse(key).unwrap(),
            close,
        })
    }

    #[test]
    fn stream_requests_are_recognised() {
        for (request, expected) in [
            (
                &b"GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\n\r\n"[..],
                stream("abc", false),
            ),
            (
                b"GET //sse//environments/%61bc/stream?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
                stream("abc", false),
            ),
            (
                b"GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\n",
                stream("abc", true),
            ),
            (
                b"GET HTTP://host:8088//sse/environments/abc/stream?x HTTP/1.1\r\nHost: host:8088\r\n\r\n",
                stream("abc", false),
            ),
            (
                b"GET /sse/environments/abc/stream HTTP/1.1\r\nContent-Length: 0\r\nhOST: x\r\n\r\n",
                stream("abc", false),
            ),
            (
                b"GET /sse/environments/abc/stream/ HTTP/1.1\r\nHost:\r\n\r\n",
                stream("abc", false),
            ),
        ] {
            assert_eq!(parse(request), expected, "{}", String::from_utf8_lossy(request));
        }
    }

    #[test]
    fn other_requests_go_to_hyper_as_soon_as_the_request_line_shows_it() {
        for request in [
            &b"POST /sse/environments/abc/queue-change HTTP/1.1\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /livez HTTP/1.1\r\n",
            b"GET /sse/environments/a/b/stream HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://host HTTP/1.1\r\nHost: host\r\n\r\n",
            b"GET ftp://host/sse/environments/abc/stream HTTP/1.1\r\nHost: host\r\n\r\n",
            b"GET http://host?x//sse/environments/abc/stream HTTP/1.1\r\nHost: host\r\n\r\n",
            b"GET https://host#x/sse/environments/abc/stream HTTP/1.1\r\nHost: host\r\n\r\n",
            b"GET /sse/environments/abc/stream HTTP/1.0\r\nHost: x\r\n\r\n",
            b"GET /sse/environments/a%3Eb/stream HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n",
            b"GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\n\r\nGET /livez HTTP/1.1\r\n\r\n",
            b"GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        ] {
            assert_eq!(
                parse(request),
                Parsed::Other,
                "{}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[test]
    fn http11_requests_without_exactly_one_host_go_to_hyper() {
        for request in [
            &b"GET /sse/environments/abc/stream HTTP/1.1\r\n\r\n"[..],
            b"GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n",
            b"GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\nhost: y\r\n\r\n",
            b"GET http://x/sse/environments/abc/stream HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                parse(request),
                Parsed::Other,
                "{}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[test]
    fn a_request_line_of_neither_http_1_nor_http_2_is_neither() {
        assert_eq!(
            parse(b"INVALID CONNECTION PREFACE\r\n\r\n"),
            Parsed::Neither
        );
        assert_eq!(parse(b"GET / HTTP/3.0\r\n\r\n"), Parsed::Neither);
        assert_eq!(parse(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Parsed::Other);
        assert_eq!(parse(b"PRI * HTTP/2.0\r\n"), Parsed::Other);
    }

    #[test]
    fn a_stream_request_on_its_way_is_partial() {
        let request = b"GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\n\r\n";
        for end in 0..request.len() {
            assert_eq!(parse(&request[..end]), Parsed::Partial, "{end} bytes");
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// What `read_request` makes of `sent`, with the client's side left open.
    async fn read_from(
        sent: &[u8],
        draining: &CancellationToken,
    ) -> Result<StreamRequest, Outcome> {
        read_after(Vec::new(), sent, draining).await
    }

    /// The same, after the connection's last stream left `head` of the next request.
    async fn read_after(
        mut head: Vec<u8>,
        sent: &[u8],
        draining: &CancellationToken,
    ) -> Result<StreamRequest, Outcome> {
        let (mut service, mut client) = tokio::io::duplex(64 * 1024);
        client.write_all(sent).await.unwrap();
        let result = read_request(&mut service, &mut head, draining, TIMEOUT).await;
        drop(client);
        result
    }

    #[tokio::test]
    async fn other_requests_reach_hyper_with_every_byte_read() {
        let sent =
            b"POST /sse/environments/abc/queue-change HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        match read_from(sent, &CancellationToken::new()).await {
            Err(Outcome::Handoff(read)) => assert_eq!(read, sent),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn heads_beyond_the_limit_reach_hyper_whole() {
        let mut sent = b"GET /sse/environments/abc/stream HTTP/1.1\r\nCookie: ".to_vec();
        sent.resize(MAX_HEAD + 100, b'c');
        match read_from(&sent, &CancellationToken::new()).await {
            Err(Outcome::Handoff(read)) => assert_eq!(read, sent[..MAX_HEAD]),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn heads_beyond_the_limit_reach_hyper_in_any_buffer() {
        let mut head = Vec::with_capacity(4 * MAX_HEAD);
        head.extend_from_slice(b"GET /sse/environments/abc/stream HTTP/1.1\r\nCookie: ");
        let rest = vec![b'c'; 2 * MAX_HEAD];
        match read_after(head, &rest, &CancellationToken::new()).await {
            Err(Outcome::Handoff(handed)) => assert!(handed.len() >= MAX_HEAD),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unfinished_head_times_out() {
        let started = Instant::now();
        let result = read_from(
            b"GET /sse/environments/abc/stream HTTP/1.1\r\n",
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(result, Err(Outcome::Closed)), "{result:?}");
        assert_eq!(started.elapsed(), TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_closes_idle_connections_and_lets_requests_finish() {
        let draining = CancellationToken::new();
        draining.cancel();
        let started = Instant::now();
        assert!(matches!(
            read_from(b"", &draining).await,
            Err(Outcome::Closed)
        ));
        assert_eq!(started.elapsed(), Duration::ZERO);
        let request = read_from(
            b"GET /sse/environments/abc/stream HTTP/1.1\r\nHost: x\r\n\r\n",
            &draining,
        )
        .await;
        assert_eq!(request.unwrap().key.as_str(), "abc");
    }

    #[test]
    fn chunk_sizes_are_hexadecimal() {
        assert_eq!(ChunkSize::new(0).as_bytes(), b"0\r\n");
        assert_eq!(ChunkSize::new(93).as_bytes(), b"5d\r\n");
        assert_eq!(ChunkSize::new(4096).as_bytes(), b"1000\r\n");
        assert_eq!(
            ChunkSize::new(usize::MAX).as_bytes(),
            b"ffffffffffffffff\r\n"
        );
    }
}
