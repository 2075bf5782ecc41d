//! HTTP/2 on the listeners that serve streams, without hyper.
//!
//! hyper's HTTP/2 server (h2) gives every connection a 16 KiB write buffer, an 8 KiB read
//! buffer and a 4 KiB header-decoding buffer, and every stream a task of its own: 25 KiB for a
//! browser's connection with its one stream, where an HTTP/1.1 subscriber costs 2.5 KiB, and a
//! wake-up per stream for every update. Here one task serves a connection and writes the
//! frames of all its streams; buffers exist only while bytes are on their way, and each stream
//! is its [`SseBody`](super::stream::SseBody).
//!
//! Stream subscriptions are served here. Every other request (a proxy may send publishes and
//! probes on the connection its clients' streams use, and h2load sends nothing but them) is read
//! whole, up to 16 KiB, and answered by the same warp routes hyper would call, its response
//! read whole too.
//!
//! It is held to what h2 is held to: the conformance suite h2spec, every case, in CI, and
//! the checks h2 makes against abuse. Header blocks are bounded (and with them CONTINUATION
//! floods) and so is the HPACK table; a client that resets streams, or makes the service reset
//! them, faster than a budget allows gets GOAWAY; answers to SETTINGS and PING wait while
//! earlier output is unsent (a client that never reads stops being read); streams honour the
//! client's flow-control windows; idle connections are pinged and closed when they do not
//! answer; and shutdown sends GOAWAY and lets every stream end with its `retry:`.
//!
//! # Layout, as h2's `frame/`, `hpack/`, `proto/streams/state.rs` and `server.rs`
//! - [`frame`]: reading and writing frames, with every check of a frame on its own.
//! - [`hpack`]: the client's header blocks decoded, responses encoded.
//! - [`request`]: a request's header list checked (RFC 9113 §8).
//! - [`state`]: a stream's states, as the table of RFC 9113 §5.1.
//! - [`connection`]: the I/O loop that ties them to the socket, the streams' bodies and warp.

mod connection;
pub mod frame;
pub mod hpack;
pub mod request;
pub mod state;

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use self::connection::Connection;
use super::h1::Outcome;
use super::{Forward, PeerAddr, State};
use crate::config::Http2Config;

/// What every HTTP/2 connection sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface's request line: bytes that start with it are HTTP/2's, never HTTP/1.1's.
const PREFACE_LINE: usize = 16;
/// How long a connection ending in error waits for its GOAWAY to go out.
const GOAWAY_FLUSH: Duration = Duration::from_secs(1);

/// Whether a connection's first bytes are HTTP/2's: they start as the preface does, as far as
/// its request line.
pub fn is_preface_start(bytes: &[u8]) -> bool {
    let compared = bytes.len().min(PREFACE_LINE);
    bytes[..compared] == PREFACE[..compared]
}

/// What a connection is served with.
pub struct Served<'a> {
    pub state: &'a Arc<State>,
    pub forward: &'a Forward,
    pub config: &'a Http2Config,
    pub peer: PeerAddr,
}

/// How the connection came to be HTTP/2's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    /// Its first bytes look like the preface; hyper gets them if they turn out not to be.
    Sniffed,
    /// TLS's ALPN chose `h2`: what follows is HTTP/2 or an error (RFC 7301).
    Negotiated,
}

/// Serves an HTTP/2 connection whose first bytes, `read`, were read already. Hands it to
/// hyper, having written nothing, if they are not HTTP/2's preface after all and HTTP/2 was
/// only `Sniffed`.
pub async fn serve<I>(
    io: &mut I,
    served: Served<'_>,
    mut read: Vec<u8>,
    header_timeout: Duration,
    chosen: Chosen,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + header_timeout;
    loop {
        let compared = read.len().min(PREFACE.len());
        if read[..compared] != PREFACE[..compared] {
            if chosen == Chosen::Sniffed && compared < PREFACE_LINE {
                return Outcome::Handoff(read);
            }
            // Not a preface where one must be: a connection error (RFC 9113 §3.4).
            let mut goaway = Vec::new();
            frame::put_goaway(&mut goaway, 0, frame::PROTOCOL_ERROR);
            let _ = tokio::time::timeout(GOAWAY_FLUSH, io.write_all(&goaway)).await;
            let _ = tokio::time::timeout(GOAWAY_FLUSH, io.shutdown()).await;
            return Outcome::Closed;
        }
        if compared == PREFACE.len() {
            break;
        }
        read.reserve(PREFACE.len());
        let read_more = tokio::io::AsyncReadExt::read_buf(io, &mut read);
        match tokio::time::timeout_at(deadline, read_more).await {
            Ok(Ok(length)) if length > 0 => {}
            _ => return Outcome::Closed,
        }
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
