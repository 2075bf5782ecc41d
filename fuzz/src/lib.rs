//! What the fuzz targets share: how each reads its input, which `seeds.py` writes the same way,
//! and the in-memory transports they drive the service's code over.
//!
//! Inputs are bytes libFuzzer mutates, so every format reads any bytes: what is missing counts
//! as zero, and every count or index is taken modulo what it can be.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads the input front to back; past its end, every byte is zero.
pub struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&first, rest)) => {
                self.bytes = rest;
                first
            }
            None => 0,
        }
    }

    /// Little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

/// `h1_request`'s input: a count `n` (a byte, modulo 17), `n` split points (little-endian
/// `u16`s, modulo the length of what follows), then the bytes a client sends, which arrive in
/// one read per piece between split points.
pub fn h1_input(data: &[u8]) -> Vec<&[u8]> {
    let mut cursor = Cursor::new(data);
    let splits = usize::from(cursor.u8() % 17);
    let points: Vec<u16> = (0..splits).map(|_| cursor.u16()).collect();
    let bytes = cursor.rest();
    let mut cuts: Vec<usize> = points
        .into_iter()
        .map(|point| usize::from(point) % (bytes.len() + 1))
        .collect();
    cuts.push(0);
    cuts.push(bytes.len());
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|pair| &bytes[pair[0]..pair[1]])
        .collect()
}

/// A client whose bytes arrive in `pieces`, at most one piece a read, and then its end.
pub struct Pieces<'a> {
    pieces: VecDeque<&'a [u8]>,
}

impl<'a> Pieces<'a> {
    pub fn new(pieces: &[&'a [u8]]) -> Self {
        Self {
            pieces: pieces.iter().copied().collect(),
        }
    }
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(piece) = this.pieces.pop_front() {
            let taken = piece.len().min(buf.remaining());
            buf.put_slice(&piece[..taken]);
            if taken < piece.len() {
                this.pieces.push_front(&piece[taken..]);
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Both directions of an in-memory connection between a client the target drives and the
/// service's stream.
#[derive(Default)]
pub struct Pipe {
    /// What the client sent and the service has not read.
    pub to_service: VecDeque<u8>,
    /// The client closed its side: reads end once `to_service` is empty.
    pub client_closed: bool,
    /// What the service sent and the client has not read.
    pub to_client: Vec<u8>,
}

/// The service's end of a [`Pipe`]: reads wait (pending) until the client sends or closes;
/// writes always succeed.
#[derive(Clone, Default)]
pub struct ServiceEnd(pub Rc<RefCell<Pipe>>);

impl AsyncRead for ServiceEnd {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut pipe = self.0.borrow_mut();
        if pipe.to_service.is_empty() {
            return if pipe.client_closed {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        }
        let taken = pipe.to_service.len().min(buf.remaining());
        let bytes: Vec<u8> = pipe.to_service.drain(..taken).collect();
        buf.put_slice(&bytes);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ServiceEnd {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.borrow_mut().to_client.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `tls_stream`'s input, in order:
/// - a byte: the client, [`CLIENTS`] modulo 3;
/// - a byte: `1 + b % 8` application writes, each a little-endian `u16` length modulo 20,000;
/// - a byte of flags: bit 0, the client sends close_notify after its writes; bits 1–3, the
///   size of the service's reads ([`READ_SIZES`]);
/// - then operations of 4 bytes each, `[op, a, b, c]`, applied in order to the client's
///   records after the handshake ([`Op`]).
pub struct TlsScript {
    pub client: usize,
    pub writes: Vec<usize>,
    pub close_notify: bool,
    pub read_size: usize,
    pub ops: Vec<Op>,
}

/// The clients `tls_stream` can be: TLS 1.3 with every suite (the service picks
/// ChaCha20-Poly1305), TLS 1.3 with AES-128-GCM only, and TLS 1.2.
pub const CLIENTS: usize = 3;
/// Buffer sizes the service's reads use: a byte at a time, odd sizes, and more than a record.
pub const READ_SIZES: [usize; 8] = [1, 7, 100, 1024, 4096, 16_384, 17_000, 65_536];
/// The longest application write the client makes.
pub const MAX_WRITE: usize = 20_000;

/// What an operation does to the client's records; `a`, `b` and `c` are its argument bytes,
/// record indices are modulo the number of records, offsets modulo the record's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// 0: record `a` is lost.
    Drop { record: u8 },
    /// 1: record `a` arrives twice.
    Duplicate { record: u8 },
    /// 2: records `a` and `b` swap places.
    Swap { first: u8, second: u8 },
    /// 3: byte `b` of record `a` is XORed with `c | 1` (so always changed).
    Flip { record: u8, offset: u8, xor: u8 },
    /// 4: record `a` keeps only its first `b` bytes.
    Truncate { record: u8, length: u8 },
    /// 5: `b + 1` bytes of value `c` arrive before record `a`.
    Garbage { record: u8, length: u8, byte: u8 },
    /// 6: a record header of content type `20 + a % 5` and length `b << 8 | c`, without a body
    /// beyond what follows it, arrives last.
    Header { kind: u8, length: u16 },
    /// 7: the connection's bytes end after byte `b << 8 | c` of record `a`.
    Cut { record: u8, at: u16 },
    /// 8: not done to the records, but to how they arrive: in pieces whose sizes cycle
    /// through every `Deliver`'s `a << 8 | b` (at least 1; without any `Deliver`, all at
    /// once), and after each piece the service writes `c` × 64 bytes of its own.
    Deliver { chunk: u16, service_writes: u8 },
}

impl TlsScript {
    pub fn decode(data: &[u8]) -> Self {
        let mut cursor = Cursor::new(data);
        let client = usize::from(cursor.u8()) % CLIENTS;
        let count = 1 + usize::from(cursor.u8() % 8);
        let writes = (0..count)
            .map(|_| usize::from(cursor.u16()) % MAX_WRITE)
            .collect();
        let flags = cursor.u8();
        let mut ops = Vec::new();
        while !cursor.is_empty() {
            let [op, a, b, c] = [cursor.u8(), cursor.u8(), cursor.u8(), cursor.u8()];
            ops.push(match op % 9 {
                0 => Op::Drop { record: a },
                1 => Op::Duplicate { record: a },
                2 => Op::Swap {
                    first: a,
                    second: b,
                },
                3 => Op::Flip {
                    record: a,
                    offset: b,
                    xor: c | 1,
                },
                4 => Op::Truncate {
                    record: a,
                    length: b,
                },
                5 => Op::Garbage {
                    record: a,
                    length: b,
                    byte: c,
                },
                6 => Op::Header {
                    kind: 20 + a % 5,
                    length: u16::from(b) << 8 | u16::from(c),
                },
                7 => Op::Cut {
                    record: a,
                    at: u16::from(b) << 8 | u16::from(c),
                },
                _ => Op::Deliver {
                    chunk: (u16::from(a) << 8 | u16::from(b)).max(1),
                    service_writes: c,
                },
            });
        }
        Self {
            client,
            writes,
            close_notify: flags & 1 == 1,
            read_size: READ_SIZES[usize::from(flags >> 1 & 7)],
            ops,
        }
    }
}

/// TLS bytes as records: a 5-byte header and the length it states; a last record cut short
/// stays as it is.
pub fn records(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let length = match bytes {
            [_, _, _, high, low, ..] => 5 + (usize::from(*high) << 8 | usize::from(*low)),
            _ => bytes.len(),
        };
        let (record, rest) = bytes.split_at(length.min(bytes.len()));
        records.push(record.to_vec());
        bytes = rest;
    }
    records
}

/// The `n`th byte the client or the service writes: every offset has its own value for a
/// long stretch, so a byte out of place shows.
pub fn pattern(offset: usize) -> u8 {
    (offset % 251) as u8 ^ (offset / 251 % 256) as u8
}

/// An HPACK integer with a `prefix`-bit prefix whose other bits are `first` (RFC 7541 §5.1),
/// written from the RFC for the HTTP/2 targets, not taken from the service they check.
pub fn hpack_integer(first: u8, prefix: u32, value: usize, out: &mut Vec<u8>) {
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

/// A header field as a literal with a literal name and no Huffman coding (RFC 7541 §6.2),
/// added to the dynamic table if `indexed`.
pub fn hpack_literal(name: &[u8], value: &[u8], indexed: bool, out: &mut Vec<u8>) {
    out.push(if indexed { 0x40 } else { 0x00 });
    hpack_integer(0, 7, name.len(), out);
    out.extend_from_slice(name);
    hpack_integer(0, 7, value.len(), out);
    out.extend_from_slice(value);
}
