//! HTTP/2 streams read straight off the connection.
//!
//! For the reason `h1` gives: through hyper's client each event costs the connection's task,
//! the stream's task and a channel between them, and the generator shares the machine with the
//! service it measures. Here a connection is read by the task that records its streams' events,
//! and each DATA frame is parsed where it lies.
//!
//! Only what a subscriber needs: GET requests with END_STREAM, response heads (their
//! `:status`), DATA, RST_STREAM and GOAWAY; SETTINGS and PING are answered. Windows are opened
//! to their maximum at the start, and the connection's is topped up as data arrives; a single
//! stream would need 2 GiB of events before it ran dry.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Error;
use crate::client::{Io, Target};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

const MAX_WINDOW: u32 = (1 << 31) - 1;
/// The connection's window is topped up once this much of it was used.
const WINDOW_REFILL: u32 = 1 << 30;
/// Frames beyond the default SETTINGS_MAX_FRAME_SIZE, which this client does not raise.
const MAX_FRAME: usize = 16 * 1024;
/// Read at once: many frames.
const READ_BUFFER: usize = 16 * 1024;

/// What a connection's frames say about its streams.
#[derive(Debug, PartialEq)]
pub enum Event<'a> {
    /// A response head; `ended` if it came with END_STREAM.
    Head {
        stream: u32,
        status: u16,
        ended: bool,
    },
    Data {
        stream: u32,
        data: &'a [u8],
        ended: bool,
    },
    Reset {
        stream: u32,
        code: u32,
    },
}

/// An HTTP/2 connection on which streams are opened and read.
pub struct Http2Connection {
    io: Io,
    /// `:scheme` and `:authority` of every request.
    scheme: &'static str,
    authority: String,
    /// Read and not yet parsed.
    buffer: Vec<u8>,
    /// Frames to send.
    out: Vec<u8>,
    decoder: loona_hpack::Decoder<'static>,
    /// A response head arriving in CONTINUATION frames: its stream, END_STREAM, and its block.
    continuation: Option<(u32, bool, Vec<u8>)>,
    next_stream: u32,
    /// DATA received since the connection's window was last topped up.
    unacknowledged: u32,
}

impl Http2Connection {
    /// Opens a new connection, the `n`th of the run, and sends the preface and SETTINGS.
    pub async fn open(target: &Target, n: usize) -> Result<Self, Error> {
        let io = target.connect(n).await?;
        let mut connection = Self {
            io,
            scheme: target.scheme(),
            authority: target.authority().to_owned(),
            buffer: Vec::with_capacity(READ_BUFFER),
            out: PREFACE.to_vec(),
            decoder: loona_hpack::Decoder::new(),
            continuation: None,
            next_stream: 1,
            unacknowledged: 0,
        };
        let mut settings = Vec::new();
        for (id, value) in [
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
        ] {
            settings.extend_from_slice(&id.to_be_bytes());
            settings.extend_from_slice(&value.to_be_bytes());
        }
        connection.queue(SETTINGS, 0, 0, &settings);
        let opened = MAX_WINDOW - 65_535;
        connection.queue(WINDOW_UPDATE, 0, 0, &opened.to_be_bytes());
        Ok(connection)
    }

    /// Queues a GET of `path` on a new stream and returns the stream; [`Self::flush`] sends it.
    pub fn get(&mut self, path: &str) -> u32 {
        let stream = self.next_stream;
        self.next_stream += 2;
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "GET"),
            (":scheme", self.scheme),
            (":authority", &self.authority),
            (":path", path),
            ("accept", "text/event-stream"),
        ] {
            literal(name.as_bytes(), value.as_bytes(), &mut block);
        }
        self.queue(HEADERS, END_HEADERS | END_STREAM, stream, &block);
        stream
    }

    /// Sends what is queued.
    pub async fn flush(&mut self) -> Result<(), Error> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.io.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads from the socket once and hands `each` what its whole frames say. `Ok(false)` once
    /// the service sent GOAWAY or closed the connection.
    pub async fn read(&mut self, mut each: impl FnMut(Event<'_>)) -> Result<bool, Error> {
        if self.buffer.capacity() - self.buffer.len() < READ_BUFFER / 2 {
            self.buffer.reserve(READ_BUFFER);
        }
        if self.io.read_buf(&mut self.buffer).await? == 0 {
            return Ok(false);
        }
        let (used, open) = self.frames(&mut each)?;
        self.buffer.drain(..used);
        self.flush().await?;
        Ok(open)
    }

    /// Handles the whole frames in `buffer`: the bytes they took, and whether the connection
    /// is still open.
    fn frames(&mut self, each: &mut impl FnMut(Event<'_>)) -> Result<(usize, bool), Error> {
        let buffer = std::mem::take(&mut self.buffer);
        let mut used = 0;
        let mut open = true;
        while open && buffer.len() - used >= 9 {
            let header = &buffer[used..used + 9];
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            if length > MAX_FRAME {
                return Err(
                    format!("a frame of {length} bytes, beyond the default maximum").into(),
                );
            }
            if buffer.len() - used < 9 + length {
                break;
            }
            let (kind, flags) = (header[3], header[4]);
            let stream =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & !(1 << 31);
            let payload = &buffer[used + 9..used + 9 + length];
            used += 9 + length;
            open = self.frame(kind, flags, stream, payload, each)?;
        }
        self.buffer = buffer;
        Ok((used, open))
    }

    fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        each: &mut impl FnMut(Event<'_>),
    ) -> Result<bool, Error> {
        if self.continuation.is_some() && kind != CONTINUATION {
            return Err("a frame in the middle of a header block".into());
        }
        match kind {
            DATA => {
                self.unacknowledged += payload.len() as u32;
                if self.unacknowledged >= WINDOW_REFILL {
                    let refill = std::mem::take(&mut self.unacknowledged);
                    self.queue(WINDOW_UPDATE, 0, 0, &refill.to_be_bytes());
                }
                let data = unpadded(flags, payload)?;
                each(Event::Data {
                    stream,
                    data,
                    ended: flags & END_STREAM != 0,
                });
            }
            HEADERS => {
                let mut block = unpadded(flags, payload)?;
                if flags & PRIORITY != 0 {
                    block = block.get(5..).ok_or("HEADERS too short for its priority")?;
                }
                let ended = flags & END_STREAM != 0;
                if flags & END_HEADERS != 0 {
                    self.head(stream, ended, block, each)?;
                } else {
                    self.continuation = Some((stream, ended, block.to_vec()));
                }
            }
            CONTINUATION => {
                let Some((started, ended, mut block)) = self.continuation.take() else {
                    return Err("CONTINUATION without a header block".into());
                };
                if started != stream {
                    return Err("CONTINUATION on another stream".into());
                }
                block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    self.head(stream, ended, &block, each)?;
                } else {
                    self.continuation = Some((stream, ended, block));
                }
            }
            RST_STREAM => {
                let code = payload.try_into().map(u32::from_be_bytes).unwrap_or(0);
                each(Event::Reset { stream, code });
            }
            SETTINGS if flags & ACK == 0 => self.queue(SETTINGS, ACK, 0, &[]),
            PING if flags & ACK == 0 => self.queue(PING, ACK, 0, payload),
            GOAWAY => return Ok(false),
            _ => {}
        }
        Ok(true)
    }

    fn head(
        &mut self,
        stream: u32,
        ended: bool,
        block: &[u8],
        each: &mut impl FnMut(Event<'_>),
    ) -> Result<(), Error> {
        let mut status = None;
        self.decoder
            .decode_with_cb(block, |name, value| {
                if &name[..] == b":status" {
                    status = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.parse().ok());
                }
            })
            .map_err(|err| format!("a response head HPACK cannot decode: {err:?}"))?;
        let status = status.ok_or("a response head without :status")?;
        each(Event::Head {
            stream,
            status,
            ended,
        });
        Ok(())
    }

    fn queue(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let length = payload.len() as u32;
        self.out.extend_from_slice(&length.to_be_bytes()[1..]);
        self.out.extend_from_slice(&[kind, flags]);
        self.out.extend_from_slice(&stream.to_be_bytes());
        self.out.extend_from_slice(payload);
    }
}

/// A frame's payload without its padding.
fn unpadded(flags: u8, payload: &[u8]) -> Result<&[u8], Error> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let (&padding, rest) = payload
        .split_first()
        .ok_or("a padded frame without its length")?;
    rest.len()
        .checked_sub(padding as usize)
        .map(|end| &rest[..end])
        .ok_or_else(|| "padding longer than the frame".into())
}

/// A header field as a literal without indexing, its strings without Huffman coding
/// (RFC 7541 §6.2.2): nothing for the service's decoder to remember.
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    for string in [name, value] {
        length(string.len(), out);
        out.extend_from_slice(string);
    }
}

/// A string's length as an HPACK integer with a 7-bit prefix and the Huffman bit clear.
fn length(mut value: usize, out: &mut Vec<u8>) {
    if value < 127 {
        out.push(value as u8);
        return;
    }
    out.push(127);
    value -= 127;
    while value >= 128 {
        out.push((value % 128) as u8 | 128);
        value /= 128;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_decode_to_the_fields_they_encode() {
        let long = "x".repeat(300);
        let mut block = Vec::new();
        literal(b":path", long.as_bytes(), &mut block);
        literal(b"accept", b"text/event-stream", &mut block);
        let mut fields = Vec::new();
        loona_hpack::Decoder::new()
            .decode_with_cb(&block, |name, value| {
                fields.push((name.into_owned(), value.into_owned()));
            })
            .unwrap();
        assert_eq!(
            fields,
            [
                (b":path".to_vec(), long.into_bytes()),
                (b"accept".to_vec(), b"text/event-stream".to_vec()),
            ]
        );
    }

    #[test]
    fn padding_is_removed_and_checked() {
        assert_eq!(unpadded(PADDED, b"\x02abcXY").unwrap(), b"abc");
        assert_eq!(unpadded(0, b"\x02abc").unwrap(), b"\x02abc");
        assert!(unpadded(PADDED, b"\x05ab").is_err());
        assert!(unpadded(PADDED, b"").is_err());
    }
}
