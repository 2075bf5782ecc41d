//! HTTP/1.1 streams read straight off the socket.
//!
//! The generator stands in for thousands of SDKs on the machine the service runs on, so what
//! it spends per event is taken from the service. Through hyper's client each event costs two
//! tasks (the connection's and the reader's) and a channel between them; here it is one read
//! and a parse in place, in the reader's task.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Error;
use crate::client::{Io, Target};

/// Read at once: a few events, or a whole response head.
const READ_BUFFER: usize = 4096;
/// Response heads beyond this are refused.
const MAX_HEAD: usize = 16 * 1024;

/// An open stream: a `200` with a chunked body.
pub struct Http1Stream {
    io: Io,
    /// Read and not yet decoded.
    buffer: Vec<u8>,
    chunked: Chunked,
}

impl Http1Stream {
    /// Opens a new connection, the `n`th of the run, and requests `path` on it.
    pub async fn open(target: &Target, n: usize, path: &str) -> Result<Self, Error> {
        let mut io = target.connect(n).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            target.authority()
        );
        io.write_all(request.as_bytes()).await?;
        // Over TLS, write_all can return with the request still in rustls' buffer: tokio-rustls
        // counts bytes as written once rustls has them, and the socket write may have been put
        // off (tokio's cooperative budget). Nothing else would send them while this task reads.
        io.flush().await?;
        let mut buffer = Vec::with_capacity(READ_BUFFER);
        loop {
            if io.read_buf(&mut buffer).await? == 0 {
                return Err("the service closed the connection before answering".into());
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&buffer)? {
                httparse::Status::Partial if buffer.len() < MAX_HEAD => {
                    buffer.reserve(READ_BUFFER);
                }
                httparse::Status::Partial => return Err("response head too large".into()),
                httparse::Status::Complete(length) => {
                    let status = response.code.unwrap_or_default();
                    if status != 200 {
                        return Err(format!("stream answered {status}").into());
                    }
                    let chunked = response.headers.iter().any(|header| {
                        header.name.eq_ignore_ascii_case("transfer-encoding")
                            && header.value.eq_ignore_ascii_case(b"chunked")
                    });
                    if !chunked {
                        return Err("the stream's body is not chunked".into());
                    }
                    buffer.drain(..length);
                    return Ok(Self {
                        io,
                        buffer,
                        chunked: Chunked::Size,
                    });
                }
            }
        }
    }

    /// Hands `each` the next body bytes, reading from the socket when what was read before
    /// holds none (the response head usually arrives with the first event). `Ok(false)` once
    /// the body ended cleanly.
    pub async fn read(&mut self, mut each: impl FnMut(&[u8])) -> Result<bool, Error> {
        loop {
            let decoded = self.chunked.decode(&self.buffer, &mut each)?;
            self.buffer.drain(..decoded);
            if decoded > 0 || self.chunked == Chunked::Done {
                return Ok(self.chunked != Chunked::Done);
            }
            if self.buffer.capacity() - self.buffer.len() < READ_BUFFER / 2 {
                self.buffer.reserve(READ_BUFFER);
            }
            if self.io.read_buf(&mut self.buffer).await? == 0 {
                return Err("the connection closed in the middle of the body".into());
            }
        }
    }
}

/// Where a chunked body's decoder is (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    Size,
    /// Bytes of the current chunk still to come.
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The CRLF after the last, empty, chunk (the service sends no trailers).
    LastEnd,
    Done,
}

impl Chunked {
    /// Decodes what it can of `bytes`, handing data to `each`; returns the bytes used.
    fn decode(&mut self, bytes: &[u8], each: &mut impl FnMut(&[u8])) -> Result<usize, Error> {
        let mut used = 0;
        loop {
            let rest = &bytes[used..];
            match *self {
                Chunked::Size => {
                    let Some(end) = rest.windows(2).position(|pair| pair == b"\r\n") else {
                        return Ok(used);
                    };
                    let digits = rest[..end].split(|&byte| byte == b';').next();
                    let size = digits
                        .and_then(|digits| std::str::from_utf8(digits).ok())
                        .and_then(|digits| usize::from_str_radix(digits.trim(), 16).ok())
                        .ok_or("bad chunk size line")?;
                    used += end + 2;
                    *self = match size {
                        0 => Chunked::LastEnd,
                        size => Chunked::Data(size),
                    };
                }
                Chunked::Data(remaining) => {
                    if rest.is_empty() {
                        return Ok(used);
                    }
                    let taken = remaining.min(rest.len());
                    each(&rest[..taken]);
                    used += taken;
                    *self = match remaining - taken {
                        0 => Chunked::DataEnd,
                        remaining => Chunked::Data(remaining),
                    };
                }
                Chunked::DataEnd | Chunked::LastEnd => {
                    if rest.len() < 2 {
                        return Ok(used);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err("chunk not terminated by CRLF".into());
                    }
                    used += 2;
                    *self = match *self {
                        Chunked::DataEnd => Chunked::Size,
                        _ => Chunked::Done,
                    };
                }
                Chunked::Done => return Ok(used),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_anywhere_decode_to_the_same_body() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        for split in 0..=body.len() {
            let mut chunked = Chunked::Size;
            let mut data = Vec::new();
            let mut buffer = Vec::new();
            for part in [&body[..split], &body[split..]] {
                buffer.extend_from_slice(part);
                let used = chunked
                    .decode(&buffer, &mut |bytes| data.extend_from_slice(bytes))
                    .unwrap();
                buffer.drain(..used);
            }
            assert_eq!(data, b"hello, world", "split at {split}");
            assert_eq!(chunked, Chunked::Done, "split at {split}");
            assert!(buffer.is_empty());
        }
    }

    #[test]
    fn broken_framing_is_an_error() {
        for body in [&b"zz\r\n"[..], b"2\r\nabXY"] {
            let mut chunked = Chunked::Size;
            assert!(chunked.decode(body, &mut |_| {}).is_err(), "{body:?}");
        }
    }
}
