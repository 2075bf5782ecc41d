//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`), into code the crate does
//! not otherwise make public. Each calls the real code and only translates its answer into
//! public types: what the targets check is what the service runs.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use crate::domain::EnvironmentKey;
use crate::http::h1;
use crate::tls::TlsStream;

/// The longest request head the HTTP/1.1 stream reader reads before it hands the connection
/// to hyper.
pub const H1_MAX_HEAD: usize = h1::MAX_HEAD;

/// What the HTTP/1.1 stream reader makes of a request head (`parse` in `http/h1.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum H1Parsed {
    /// A stream request it serves itself.
    Stream {
        key: EnvironmentKey,
        /// The client asked for `Connection: close`.
        close: bool,
    },
    /// A request hyper serves; it may be incomplete.
    Other,
    /// Too short to tell.
    Partial,
    /// A request line of neither HTTP/1.x nor HTTP/2: closed without an answer.
    Neither,
}

/// What `parse` in `http/h1.rs` makes of `bytes`, the bytes a connection has read so far.
pub fn h1_parse(bytes: &[u8]) -> H1Parsed {
    match h1::parse(bytes) {
        h1::Parsed::Stream(request) => H1Parsed::Stream {
            key: request.key,
            close: request.close,
        },
        h1::Parsed::Other => H1Parsed::Other,
        h1::Parsed::Partial => H1Parsed::Partial,
        h1::Parsed::Neither => H1Parsed::Neither,
    }
}

/// How the HTTP/1.1 stream reader left a connection's first request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum H1Read {
    /// A stream request it serves itself, and the bytes it read: its head.
    Stream {
        key: EnvironmentKey,
        close: bool,
        head: Vec<u8>,
    },
    /// Handed to hyper with these bytes.
    Handoff(Vec<u8>),
    /// Closed: the client ended its side (or timed out) before a request was whole.
    Closed,
}

/// Reads a connection's first request from `io` as the service does (`read_request` in
/// `http/h1.rs`), with the service's 10 s header timeout and a shutdown that never comes.
/// Needs a Tokio runtime with time enabled, as the service's runs.
pub async fn h1_read_request<I: AsyncRead + Unpin>(io: &mut I) -> H1Read {
    let mut head = Vec::new();
    let never = CancellationToken::new();
    match h1::read_request(io, &mut head, &never, Duration::from_secs(10)).await {
        Ok(request) => H1Read::Stream {
            key: request.key,
            close: request.close,
            head,
        },
        Err(h1::Outcome::Handoff(read)) => H1Read::Handoff(read),
        Err(h1::Outcome::Closed) => H1Read::Closed,
    }
}

/// The bytes a TLS stream has allocated for its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsBuffers {
    /// TLS records read and not yet processed.
    pub incoming: usize,
    /// Decrypted bytes not yet read.
    pub plaintext: usize,
    /// TLS records not yet sent.
    pub outgoing: usize,
}

/// What `stream`'s buffers hold allocated now.
pub fn tls_buffers<IO>(stream: &TlsStream<IO>) -> TlsBuffers {
    let [incoming, plaintext, outgoing] = stream.buffer_capacities();
    TlsBuffers {
        incoming,
        plaintext,
        outgoing,
    }
}

/// The service's HTTP/2 connection (`src/http/h2/`) with everything it serves: the routes of
/// an in-process service with the in-process backend, built once per process.
struct H2Harness {
    runtime: tokio::runtime::Runtime,
    state: Arc<crate::http::State>,
    forward: crate::http::Forward,
    config: crate::config::Http2Config,
}

fn h2_harness() -> &'static H2Harness {
    static HARNESS: OnceLock<H2Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        // Paused: a connection waiting for bytes that never come lets virtual time run to
        // the end of the run at once, and every run is as deterministic as its input.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        let config = crate::Config {
            authentication_token: Some(crate::config::Secret::new(H2_TOKEN.to_owned())),
            ..crate::Config::default()
        };
        let service = runtime.block_on(async {
            let public = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a loopback port");
            let listeners = crate::Listeners {
                public,
                publish: None,
            };
            let log = slog::Logger::root(slog::Discard, slog::o!());
            crate::Service::build(config.clone(), listeners, log)
                .await
                .expect("the service builds")
        });
        let state = service.state.clone();
        let forward = crate::http::forward(crate::http::routes(
            state.clone(),
            crate::http::Endpoints::ALL,
        ));
        H2Harness {
            runtime,
            state,
            forward,
            config: config.http2,
        }
    })
}

/// The token the HTTP/2 harness's publishes are accepted with.
pub const H2_TOKEN: &str = "fuzz-token";

/// A connection's transport in memory: reads give the client's bytes in the pieces they were
/// cut into, then nothing ever again; writes are kept.
struct Scripted<'a> {
    pieces: std::collections::VecDeque<&'a [u8]>,
    written: Vec<u8>,
}

impl tokio::io::AsyncRead for Scripted<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let Some(piece) = self.pieces.pop_front() else {
            return std::task::Poll::Pending;
        };
        let taken = piece.len().min(buf.remaining());
        buf.put_slice(&piece[..taken]);
        if taken < piece.len() {
            self.pieces.push_front(&piece[taken..]);
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Scripted<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.written.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// How long a run of [`h2_serve`] lasts, in the harness's virtual time: forwarded requests
/// are answered, keep-alive PINGs (20 s) do not come.
const H2_RUN: Duration = Duration::from_secs(1);

/// Serves one HTTP/2 connection, negotiated as by ALPN, whose client sends `input` (the
/// preface included, or not) cut at `cuts`; returns every byte the service wrote. Streams
/// opened are closed with the connection, and the harness's hub forgets them.
pub fn h2_serve(input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let harness = h2_harness();
    let mut pieces = std::collections::VecDeque::new();
    let mut at = 0;
    for &cut in cuts {
        let cut = cut.clamp(at, input.len());
        pieces.push_back(&input[at..cut]);
        at = cut;
    }
    pieces.push_back(&input[at..]);
    pieces.retain(|piece| !piece.is_empty());
    let mut io = Scripted {
        pieces,
        written: Vec::new(),
    };
    harness.runtime.block_on(async {
        let served = crate::http::h2::Served {
            state: &harness.state,
            forward: &harness.forward,
            config: &harness.config,
            peer: crate::http::PeerAddr(([127, 0, 0, 1], 1).into()),
        };
        let serving = crate::http::h2::serve(
            &mut io,
            served,
            Vec::new(),
            Duration::from_secs(10),
            crate::http::h2::Chosen::Negotiated,
        );
        let _ = tokio::time::timeout(H2_RUN, serving).await;
    });
    harness.state.hub.sweep(std::time::SystemTime::now());
    io.written
}

/// What a request's header block is to the service's HTTP/2 (`src/http/h2/request.rs`):
/// whether it is malformed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum H2Block {
    /// The block cannot be decoded: a connection error COMPRESSION_ERROR.
    Undecodable,
    /// Decoded; `Some` says why the request is refused.
    Request { malformed: Option<&'static str> },
}

/// Decodes `blocks` in turn with one connection's HPACK decoder, as the service reads a
/// connection's requests, and checks each; stops at the first that cannot be decoded.
pub fn h2_requests(blocks: &[&[u8]]) -> Vec<H2Block> {
    let mut decoder = crate::http::h2::hpack::Decoder::default();
    let mut found = Vec::new();
    for block in blocks {
        match crate::http::h2::request::Request::decode(&mut decoder, block) {
            Ok(request) => found.push(H2Block::Request {
                malformed: request.malformed,
            }),
            Err(_) => {
                found.push(H2Block::Undecodable);
                break;
            }
        }
    }
    found
}
