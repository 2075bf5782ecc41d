//! A raw HTTP/1.1 client that decodes chunked bodies one chunk at a time, so a test sees
//! each chunk exactly as the service wrote it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct SseClient {
    reader: BufReader<TcpStream>,
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub chunked: bool,
}

pub enum Chunk {
    Data(Vec<u8>),
    /// The terminating zero-length chunk: a clean end.
    End,
}

impl SseClient {
    pub async fn connect(addr: SocketAddr, path: &str, extra_headers: &[(&str, &str)]) -> Self {
        Self::request(addr, "GET", path, extra_headers).await
    }

    pub async fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        extra_headers: &[(&str, &str)],
    ) -> Self {
        timeout(Self::try_request(addr, method, path, extra_headers))
            .await
            .unwrap_or_else(|err| panic!("{method} {path}: {err}"))
    }

    /// A request whose failure is the caller's to handle: a refused connection, or one closed
    /// before the response head.
    pub async fn try_request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        extra_headers: &[(&str, &str)],
    ) -> std::io::Result<Self> {
        Self::try_raw(addr, &request_head(addr, method, path, extra_headers)).await
    }

    /// Sends `request` as it is, bytes a well-behaved client would not send included, and
    /// reads the response head.
    pub async fn raw(addr: SocketAddr, request: &[u8]) -> Self {
        timeout(Self::try_raw(addr, request))
            .await
            .unwrap_or_else(|err| panic!("{:?}: {err}", text(request)))
    }

    async fn try_raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        let mut client = Self {
            reader: BufReader::new(stream),
            status: 0,
            headers: Vec::new(),
            chunked: false,
        };
        client.reader.get_mut().write_all(request).await?;
        client.try_read_response_head().await?;
        Ok(client)
    }

    /// Writes raw bytes on the connection: the next request, or several pipelined.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).await.unwrap();
    }

    /// Reads the status line and headers of the next response on the connection.
    pub async fn read_response_head(&mut self) {
        timeout(self.try_read_response_head()).await.unwrap();
    }

    async fn try_read_response_head(&mut self) -> std::io::Result<()> {
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.status = status_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"))
            .parse()
            .unwrap();
        self.headers.clear();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            self.headers
                .push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        self.chunked = self
            .headers
            .iter()
            .any(|(name, value)| name == "transfer-encoding" && value == "chunked");
        Ok(())
    }

    /// Whether the service closed the connection: nothing more arrives, within 10 s.
    pub async fn is_closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match tokio::time::timeout(Duration::from_secs(10), self.reader.read_to_end(&mut rest))
            .await
        {
            Ok(Ok(0)) => true,
            Ok(Ok(_)) => panic!("unexpected bytes {:?}", text(&rest)),
            Ok(Err(_)) | Err(_) => false,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The next chunk, or `None` if nothing arrives within `wait`.
    pub async fn next_chunk_within(&mut self, wait: Duration) -> Option<Chunk> {
        match tokio::time::timeout(wait, self.read_chunk()).await {
            Err(_) => None,
            Ok(chunk) => Some(chunk.unwrap_or_else(|err| panic!("reading a chunk: {err}"))),
        }
    }

    /// The next chunk, however long it takes; an error if the connection closes or breaks
    /// first.
    pub async fn read_chunk(&mut self) -> std::io::Result<Chunk> {
        assert!(self.chunked, "body is not chunked");
        let mut size_line = String::new();
        if self.reader.read_line(&mut size_line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed without a final chunk",
            ));
        }
        let size = usize::from_str_radix(size_line.trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
        let mut data = vec![0; size + 2];
        self.reader.read_exact(&mut data).await?;
        assert_eq!(&data[size..], b"\r\n", "chunk not terminated by CRLF");
        data.truncate(size);
        Ok(if size == 0 {
            Chunk::End
        } else {
            Chunk::Data(data)
        })
    }

    /// The next data chunk, within 10 s; panics on a clean end.
    pub async fn next_data(&mut self) -> Vec<u8> {
        match self.next_chunk_within(Duration::from_secs(10)).await {
            Some(Chunk::Data(data)) => data,
            Some(Chunk::End) => panic!("stream ended"),
            None => panic!("no chunk within 10 s"),
        }
    }

    /// The next data chunk that is not a keep-alive comment, within 10 s.
    pub async fn next_event(&mut self) -> Vec<u8> {
        loop {
            let data = self.next_data().await;
            if !data.starts_with(b":") {
                return data;
            }
        }
    }

    /// Reads a body of known `content-length`.
    pub async fn read_body(&mut self) -> Vec<u8> {
        let length: usize = self
            .header("content-length")
            .expect("content-length")
            .parse()
            .unwrap();
        let mut body = vec![0; length];
        timeout(self.reader.read_exact(&mut body)).await.unwrap();
        body
    }
}

/// An HTTP/1.1 request head with a `Host` header.
pub fn request_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in extra_headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// The `updated_at` of an event chunk.
pub fn updated_at_of(event: &[u8]) -> f64 {
    let text = text(event);
    let data = text
        .lines()
        .find_map(|line| line.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no data line in {text:?}"));
    let value: serde_json::Value = serde_json::from_str(data).unwrap();
    value["updated_at"].as_f64().unwrap()
}

async fn timeout<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("no answer within 10 s")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
