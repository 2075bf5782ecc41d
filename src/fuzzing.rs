//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`), into code the crate does
//! not otherwise make public. Each calls the real code and only translates its answer into
//! public types: what the targets check is what the service runs.

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
