//! A raw HTTP/2 client for hostile tests: frames are written and read as bytes, with no flow
//! control or stream state of its own, so a test can send what no well-behaved client would.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const STREAM_CLOSED: u32 = 0x5;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const COMPRESSION_ERROR: u32 = 0x9;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// What reading the next frame found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Frame(Frame),
    /// The service closed the connection (or reset it).
    Closed,
    /// Nothing arrived in time.
    Silent,
}

pub struct RawH2 {
    pub socket: TcpStream,
    read: Vec<u8>,
}

impl RawH2 {
    /// Connects and sends the preface and a SETTINGS frame with `settings`.
    pub async fn connect(addr: SocketAddr, settings: &[(u16, u32)]) -> Self {
        let socket = TcpStream::connect(addr).await.unwrap();
        socket.set_nodelay(true).unwrap();
        let mut client = Self {
            socket,
            read: Vec::new(),
        };
        let mut payload = Vec::new();
        for (id, value) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        let mut opening = PREFACE.to_vec();
        opening.extend(frame(SETTINGS, 0, 0, &payload));
        client.send(&opening).await.unwrap();
        client
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.socket.write_all(bytes).await
    }

    /// The next frame, waiting up to `within`.
    pub async fn next(&mut self, within: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.read.len() >= 9 {
                let length = u32::from_be_bytes([0, self.read[0], self.read[1], self.read[2]]);
                let end = 9 + length as usize;
                if self.read.len() >= end {
                    let frame = Frame {
                        kind: self.read[3],
                        flags: self.read[4],
                        stream: u32::from_be_bytes(self.read[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.read[9..end].to_vec(),
                    };
                    self.read.drain(..end);
                    return Next::Frame(frame);
                }
            }
            let mut buffer = [0; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.socket.read(&mut buffer)).await {
                Err(_) => return Next::Silent,
                Ok(Ok(0) | Err(_)) => return Next::Closed,
                Ok(Ok(read)) => self.read.extend_from_slice(&buffer[..read]),
            }
        }
    }

    /// Frames until one matches `wanted`, the connection closes, or `within` passes; ACKs
    /// the service's SETTINGS on the way, as a client must.
    pub async fn until(
        &mut self,
        within: Duration,
        mut wanted: impl FnMut(&Frame) -> bool,
    ) -> Next {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Frame(frame) if wanted(&frame) => return Next::Frame(frame),
                Next::Frame(frame) => {
                    if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                        let _ = self.send(&self::frame(SETTINGS, ACK, 0, &[])).await;
                    }
                }
                other => return other,
            }
        }
    }
}

/// One frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap();
    assert!(length < 1 << 24, "a frame's length has 24 bits");
    let mut bytes = length.to_be_bytes()[1..].to_vec();
    bytes.extend_from_slice(&[kind, flags]);
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// An HPACK integer with an `prefix`-bit prefix whose other bits are `first` (RFC 7541 §5.1).
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

/// A header field as a literal without indexing, with a literal name and no Huffman coding: no
/// state in the service's decoder depends on it.
pub fn header(name: &str, value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    integer(0, 7, name.len(), out);
    out.extend_from_slice(name.as_bytes());
    integer(0, 7, value.len(), out);
    out.extend_from_slice(value);
}

/// A header field as a literal with incremental indexing and a literal name (RFC 7541
/// §6.2.1): the service's decoder adds it to its dynamic table.
pub fn indexed_header(name: &str, value: &[u8], out: &mut Vec<u8>) {
    out.push(0x40);
    integer(0, 7, name.len(), out);
    out.extend_from_slice(name.as_bytes());
    integer(0, 7, value.len(), out);
    out.extend_from_slice(value);
}

/// A dynamic table size update to `size` (RFC 7541 §6.3), which starts a header block.
pub fn table_size_update(size: usize, out: &mut Vec<u8>) {
    integer(0x20, 5, size, out);
}

/// The header block of a request with these pseudo-header fields, in this order.
pub fn request(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        header(name, value.as_bytes(), &mut block);
    }
    block
}

/// The header block of `GET path` over h2c.
pub fn get(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    header(":method", b"GET", &mut block);
    header(":scheme", b"http", &mut block);
    header(":authority", b"localhost", &mut block);
    header(":path", path.as_bytes(), &mut block);
    block
}

/// A frame's error code: RST_STREAM's payload, or GOAWAY's after its last stream.
pub fn error_code(frame: &Frame) -> u32 {
    let at = if frame.kind == GOAWAY { 4 } else { 0 };
    u32::from_be_bytes(frame.payload[at..at + 4].try_into().unwrap())
}

/// Whether a response's header block starts with `:status: 200`, which HPACK's static table
/// holds (index 8, so the byte 0x88); any other status is a literal.
pub fn is_200(block: &[u8]) -> bool {
    block.first() == Some(&0x88)
}
