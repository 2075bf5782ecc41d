//! The accept loop, the same for plaintext and TLS listeners: one task per connection, HTTP/1.1
//! or HTTP/2 chosen per connection by hyper-util's auto builder. On plaintext that is HTTP/1.1
//! or h2c with prior knowledge; on TLS the client's ALPN choice, `h2` or `http/1.1`. On a
//! listener that serves streams, `h1` reads each connection's first bytes and answers
//! HTTP/1.1 stream requests itself, `h2` serves HTTP/2 connections, and everything else
//! reaches hyper with those bytes.
//!
//! When `stop` fires the listener closes and every connection is asked to finish gracefully:
//! HTTP/1.1 closes after the response in progress, HTTP/2 sends GOAWAY and lets open streams
//! end. The returned future resolves once the last connection is gone.
//!
//! Each connection is counted as open under the protocol its first bytes choose: HTTP/2 always
//! starts with a fixed preface, anything else is HTTP/1.1.
//!
//! Under hyper, an update wakes every stream of an HTTP/2 connection at once, each in its own
//! task, and each stream's frame wakes the connection's task, which tokio runs next. Written
//! straight away, that is one `writev` of a hundred bytes per stream. So an HTTP/2
//! connection's small writes wait turns of the scheduler while the streams queued behind it
//! keep adding frames, and the connection writes them together; on an idle system a write
//! waits one turn. (`h2` gathers its streams' frames itself.)

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::ServerConfig;
use slog::{Logger, debug, error};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::{Forward, PeerAddr, State, h1, h2};
use crate::config::Http2Config;
use crate::metrics::{ConnectionMetrics, ProtocolCounters};

/// Slow-loris guard: a client must finish sending request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The same guard for the TLS handshake, which happens before any header.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error such as running out of file descriptors, instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

// HTTP/2 flow control, sized for this traffic: clients send headers and at most a 4 KiB
// publish body, the service sends events of about a hundred bytes.
/// What a client may send on one stream before the service reads it: a publish body fits.
/// hyper's default, 1 MiB per stream, would let one connection park gigabytes in memory.
const STREAM_RECEIVE_WINDOW: u32 = 16 * 1024;
/// What a client may send on one connection before the service reads it, all streams together.
const CONNECTION_RECEIVE_WINDOW: u32 = 1024 * 1024;
/// Bytes buffered per stream for a client that reads slowly; beyond it the stream waits and
/// coalesces to the newest update instead of queueing (hyper's default is 400 KiB).
const STREAM_SEND_BUFFER: usize = 16 * 1024;

/// What every connection of every listener shares.
pub struct Connections {
    builder: auto::Builder<TokioExecutor>,
    /// The same builder for connections whose protocol TLS's ALPN chose.
    http1_only: auto::Builder<TokioExecutor>,
    http2_only: auto::Builder<TokioExecutor>,
    http2: Http2Config,
    /// How long a write may wait for a client that reads nothing.
    write_timeout: Duration,
    metrics: ConnectionMetrics,
}

impl Connections {
    pub fn new(http2: &Http2Config, write_timeout: Duration, metrics: ConnectionMetrics) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(http2.max_concurrent_streams)
            .keep_alive_interval(http2.keepalive_interval.duration())
            .keep_alive_timeout(http2.keepalive_timeout.duration())
            .initial_stream_window_size(STREAM_RECEIVE_WINDOW)
            .initial_connection_window_size(CONNECTION_RECEIVE_WINDOW)
            .max_send_buf_size(STREAM_SEND_BUFFER);
        Self {
            http1_only: builder.clone().http1_only(),
            http2_only: builder.clone().http2_only(),
            builder,
            http2: http2.clone(),
            write_timeout,
            metrics,
        }
    }
}

/// What a listener that serves streams gives the service's own HTTP/1.1 and HTTP/2 writers:
/// the state streams read, and the routes for the requests the HTTP/2 writer forwards.
#[derive(Clone)]
pub struct Streams {
    pub state: Arc<State>,
    pub forward: Forward,
}

/// Serves `listener` until `stop` fires and its connections have ended. With `tls`, each
/// connection completes a TLS handshake first, in its own task, so a slow or broken handshake
/// never holds up the accept loop or other connections.
///
/// With `streams`, the listener serves stream subscriptions, and HTTP/1.1 ones are answered
/// by `h1` (with `state`'s hub and settings) instead of hyper.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    connections: Arc<Connections>,
    service: S,
    streams: Option<Streams>,
    stop: CancellationToken,
    log: Logger,
) where
    S: hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = Response<B>,
            Error = Infallible,
        > + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    // Shared, not cloned into each connection: a connection's task keeps what it was given
    // for its whole life, twice over (an async fn's argument and the local it is moved into).
    let service = Arc::new(service);
    loop {
        let (socket, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    error!(log, "accept failed"; "error" => %err);
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // Events are small and latency matters more than packet count.
        let _ = socket.set_nodelay(true);
        // Served through a reference from the task's future, which owns it: an async fn's
        // by-value argument would take its room twice (the argument and the local it is
        // moved into) in a future every connection carries for its whole life.
        let connection = Connection {
            shared: connections.clone(),
            service: service.clone(),
            streams: streams.clone(),
            peer,
            log: log.clone(),
        };
        match &tls {
            None => {
                let watcher = graceful.watcher();
                let protocol = Protocol::Sniffed;
                tokio::spawn(async move { connection.serve(socket, protocol, watcher).await });
            }
            Some(config) => {
                let handshake = crate::tls::accept(socket, config.clone());
                let watcher = graceful.watcher();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let handshake = tokio::select! {
                        () = stop.cancelled() => return,
                        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => handshake,
                    };
                    match handshake {
                        // Served by a task of its own, and boxed: this task's future is sized
                        // for the handshake, whose slots a connection would carry for its whole
                        // life, and a future keeps a moved argument's slot beside the local it
                        // was moved into (6.6 KB per idle TLS connection where it is 1.5 KB
                        // without TLS).
                        Ok(Ok(stream)) => {
                            let protocol = Protocol::chosen(stream.alpn_protocol());
                            let stream = Box::new(stream);
                            tokio::spawn(async move {
                                connection.serve(stream, protocol, watcher).await
                            });
                        }
                        Ok(Err(err)) => {
                            connection.shared.metrics.tls_handshake_errors.inc();
                            debug!(connection.log, "tls handshake failed"; "peer" => %peer, "error" => %err);
                        }
                        Err(_) => {
                            connection.shared.metrics.tls_handshake_errors.inc();
                            debug!(connection.log, "tls handshake timed out"; "peer" => %peer);
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection's protocol, as far as it is known before its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Plaintext, or TLS without ALPN: the first bytes tell HTTP/1.1 from HTTP/2's preface.
    Sniffed,
    /// What TLS's ALPN chose, which is the protocol (RFC 7301).
    Http1,
    Http2,
}

impl Protocol {
    fn chosen(alpn: Option<&[u8]>) -> Self {
        match alpn {
            Some(b"h2") => Protocol::Http2,
            Some(b"http/1.1") => Protocol::Http1,
            _ => Protocol::Sniffed,
        }
    }
}

/// One accepted connection, before its protocol is known.
struct Connection<S> {
    shared: Arc<Connections>,
    service: Arc<S>,
    streams: Option<Streams>,
    peer: SocketAddr,
    log: Logger,
}

impl<S> Connection<S> {
    /// Serves the connection; `watcher` lets a graceful shutdown wait for hyper's connections.
    async fn serve<I, B>(&self, io: I, protocol: Protocol, watcher: Watcher)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<
                Request<hyper::body::Incoming>,
                Response = Response<B>,
                Error = Infallible,
            > + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut io = Counted {
            io,
            unread: Vec::new(),
            matched: 0,
            open: None,
            served_by_hyper: false,
            deferred: 0,
            deferred_len: 0,
            stalled: None,
            shared: self.shared.clone(),
        };
        if let Some(Streams { state, forward }) = &self.streams {
            if protocol != Protocol::Http2 {
                match h1::serve(&mut io, state, HEADER_READ_TIMEOUT).await {
                    h1::Outcome::Closed => return,
                    h1::Outcome::Handoff(read) => io.unread = read,
                }
            }
            let sniffed = protocol == Protocol::Sniffed && h2::is_preface_start(&io.unread);
            if sniffed || protocol == Protocol::Http2 {
                let read = std::mem::take(&mut io.unread);
                let served = h2::Served {
                    state,
                    forward,
                    config: &self.shared.http2,
                    peer: PeerAddr(self.peer),
                };
                let chosen = if sniffed {
                    h2::Chosen::Sniffed
                } else {
                    h2::Chosen::Negotiated
                };
                // Boxed, as hyper's connection below: the task of every connection is
                // allocated at the size of its largest state.
                let serving = h2::serve(&mut io, served, read, HEADER_READ_TIMEOUT, chosen);
                match Box::pin(serving).await {
                    h1::Outcome::Closed => return,
                    h1::Outcome::Handoff(read) => io.unread = read,
                }
            }
        }
        io.served_by_hyper = true;
        let builder = match protocol {
            Protocol::Sniffed => &self.shared.builder,
            Protocol::Http1 => &self.shared.http1_only,
            Protocol::Http2 => &self.shared.http2_only,
        };
        let service = WithPeer {
            service: self.service.clone(),
            peer: PeerAddr(self.peer),
        };
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        // Boxed: the task of every connection is allocated at the size of its largest state,
        // and hyper's is kilobytes that a connection served by `h1` never uses.
        if let Err(err) = Box::pin(watcher.watch(connection)).await {
            debug!(self.log, "connection ended with an error"; "peer" => %self.peer, "error" => %err);
        }
    }
}

/// A connection's service, which tells every request whom it came from.
#[derive(Clone)]
struct WithPeer<S> {
    service: Arc<S>,
    peer: PeerAddr,
}

impl<S> hyper::service::Service<Request<hyper::body::Incoming>> for WithPeer<S>
where
    S: hyper::service::Service<Request<hyper::body::Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: Request<hyper::body::Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.peer);
        self.service.call(request)
    }
}

/// HTTP/2 writes at least this large go out at once: they already carry many frames.
const HTTP2_BATCH_BYTES: usize = 8192;
/// An HTTP/2 write waits at most this many turns of the scheduler.
const HTTP2_BATCH_TURNS: u8 = 32;

/// A connection's transport, counted in `flagsmith_sse_connections{protocol}` from its first
/// bytes until it is dropped. After the protocol is known a read costs one branch.
struct Counted<I> {
    io: I,
    /// Bytes `h1` read before it handed the connection to hyper, which reads them first.
    unread: Vec<u8>,
    /// Bytes of the HTTP/2 preface seen so far.
    matched: usize,
    /// The gauge this connection is counted in, once its protocol is known.
    open: Option<prometheus::IntGauge>,
    /// Hyper serves the connection, and if it is HTTP/2, small writes wait for more frames
    /// while more keep coming: hyper writes each stream's frames as they come. `h2` needs no
    /// waiting, as it gathers every ready stream's frames into one write.
    served_by_hyper: bool,
    /// Turns the pending write has waited, and its size when it last waited.
    deferred: u8,
    deferred_len: usize,
    /// Fires `write_timeout` after a write found the client's window full, unless a write
    /// completes first. Allocated only while a write waits.
    stalled: Option<Pin<Box<Sleep>>>,
    shared: Arc<Connections>,
}

impl<I> Counted<I> {
    fn sniff(&mut self, bytes: &[u8]) {
        let expected = &h2::PREFACE[self.matched..];
        let compared = bytes.len().min(expected.len());
        if bytes[..compared] != expected[..compared] {
            self.count(|metrics| &metrics.http1);
        } else {
            self.matched += compared;
            if self.matched == h2::PREFACE.len() {
                self.count(|metrics| &metrics.http2);
            }
        }
    }

    fn count(&mut self, protocol: impl Fn(&ConnectionMetrics) -> &ProtocolCounters) {
        let counters = protocol(&self.shared.metrics);
        counters.accepted.inc();
        counters.open.inc();
        self.open = Some(counters.open.clone());
    }

    /// Passes on a write's result, or fails the write once it has waited `write_timeout` for
    /// a client that reads nothing: such a client would otherwise hold its socket, and its
    /// stream's place under `max_streams`, for as long as it likes, because a stream that
    /// cannot write never reaches its planned end.
    fn guard_stall<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.stalled = None;
            return result;
        }
        let timeout = self.shared.write_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.shared.metrics.write_timeouts.inc();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing for {timeout:?}"),
        )))
    }

    /// Whether a write of `len` bytes should first yield to the tasks queued behind this one
    /// (after waking this task, which tokio then queues behind the others: a task that wakes
    /// itself is not run next). It waits while the write grows from turn to turn, up to a
    /// size or a number of turns; on an idle system that is one turn. Only hyper's HTTP/2
    /// writes wait.
    fn defer(&mut self, len: usize, cx: &mut Context<'_>) -> bool {
        if !self.served_by_hyper || self.matched < h2::PREFACE.len() {
            return false;
        }
        let growing = self.deferred == 0 || len > self.deferred_len;
        if growing && len < HTTP2_BATCH_BYTES && self.deferred < HTTP2_BATCH_TURNS {
            self.deferred += 1;
            self.deferred_len = len;
            cx.waker().wake_by_ref();
            return true;
        }
        self.deferred = 0;
        false
    }
}

impl<I> Drop for Counted<I> {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.dec();
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let taken = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread[..taken]);
            this.unread.drain(..taken);
            if this.unread.is_empty() {
                this.unread = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.open.is_none() && matches!(result, Poll::Ready(Ok(()))) {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                this.sniff(read);
            }
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.defer(buf.len(), cx) {
            return Poll::Pending;
        }
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.guard_stall(result, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.defer(bufs.iter().map(|buf| buf.len()).sum(), cx) {
            return Poll::Pending;
        }
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.guard_stall(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.guard_stall(result, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
