//! A server-side TLS stream over rustls's unbuffered API, which leaves the buffers to the caller.
//!
//! rustls's buffered connection (what tokio-rustls wraps) keeps a 4 KiB read buffer, zero-filled
//! and so resident, for the connection's whole life. An idle subscriber's connection only ever
//! needs bytes while a record is on its way, so here every buffer is allocated when bytes
//! arrive or leave and released once they are used: an idle connection holds none.
//!
//! Reads go through a buffer on the stack, and only what a read brings is kept on the heap.
//! Writes are encrypted straight into one outgoing buffer, which a write sends at once; a write
//! waits while earlier bytes are still unsent, so that buffer holds one write at most.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{AppDataRecord, ConnectionState, EncodeError, EncryptError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Read from the socket at once: a few records, or a large part of one.
const READ_CHUNK: usize = 4096;

/// Completes a TLS handshake on `io` as a server, then returns the stream for the application's
/// bytes. Bytes the client sent after its handshake (an HTTP/2 preface, a request) are kept.
pub async fn accept<IO>(io: IO, config: Arc<ServerConfig>) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let connection = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
    let mut stream = TlsStream {
        io,
        connection,
        incoming: Vec::new(),
        plaintext: Vec::new(),
        plaintext_read: 0,
        outgoing: Vec::new(),
        outgoing_sent: 0,
        peer_closed: false,
        close_notify_sent: false,
        failed: false,
    };
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

/// A TLS connection after its handshake.
pub struct TlsStream<IO> {
    io: IO,
    connection: UnbufferedServerConnection,
    /// TLS bytes read and not yet processed.
    incoming: Vec<u8>,
    /// Application bytes decrypted and not yet read, from `plaintext_read` on.
    plaintext: Vec<u8>,
    plaintext_read: usize,
    /// TLS bytes for the socket, from `outgoing_sent` on.
    outgoing: Vec<u8>,
    outgoing_sent: usize,
    /// The client sent close_notify: no more application bytes will come.
    peer_closed: bool,
    close_notify_sent: bool,
    /// rustls reported an error: the connection is over. rustls must not be given it again,
    /// to read, write or close: it would answer the same records with a second fatal alert,
    /// which its debug builds assert against (found by `fuzz/`'s `tls_stream`).
    failed: bool,
}

/// What one step of the TLS state machine did.
enum Step {
    /// Decrypted application bytes are waiting to be read.
    Plaintext,
    /// TLS bytes of the handshake or its aftermath were queued for the socket.
    Output,
    /// The application bytes given to `step` were encrypted and queued for the socket.
    Encrypted,
    /// Nothing more can happen without bytes from the client; the handshake is over when
    /// `handshaking` is false.
    NeedInput { handshaking: bool },
    /// Both sides sent close_notify.
    Closed,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// The ALPN protocol the client and the service agreed on.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.connection.alpn_protocol()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send(cx))?;
            match self.step(None)? {
                Step::Plaintext | Step::Output | Step::Encrypted => {}
                Step::NeedInput { handshaking: false } => return Poll::Ready(Ok(())),
                Step::NeedInput { handshaking: true } => {
                    if ready!(self.poll_receive(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the client closed the connection during the TLS handshake",
                        )));
                    }
                }
                Step::Closed => {
                    return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
                }
            }
        }
    }

    /// Runs the state machine over what was received until it needs the caller: decrypted
    /// bytes, bytes to send, or more input. With `write`, encrypts those application bytes
    /// as soon as the connection may send them, and reports them as output. After an error,
    /// every step is one.
    fn step(&mut self, write: Option<&[&[u8]]>) -> io::Result<Step> {
        if self.failed {
            return Err(invalid_data("the TLS connection failed earlier"));
        }
        let step = self.advance(write);
        self.failed = step.is_err();
        step
    }

    fn advance(&mut self, mut write: Option<&[&[u8]]>) -> io::Result<Step> {
        loop {
            let status = self.connection.process_tls_records(&mut self.incoming);
            let mut discard = status.discard;
            let state = status.state.map_err(invalid_data)?;
            let step = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let AppDataRecord {
                            discard: used,
                            payload,
                        } = record.map_err(invalid_data)?;
                        discard += used;
                        self.plaintext.extend_from_slice(payload);
                    }
                    Some(Step::Plaintext)
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    append(&mut self.outgoing, READ_CHUNK, |room| {
                        encode.encode(room).map_err(|err| match err {
                            EncodeError::InsufficientSize(needed) => Grow::To(needed.required_size),
                            err => Grow::Fail(invalid_data(err)),
                        })
                    })?;
                    None
                }
                // Every queued byte goes out before anything queued later, so the handshake's
                // bytes count as transmitted once they are queued.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    Some(Step::Output)
                }
                ConnectionState::WriteTraffic(mut traffic) => match write.take() {
                    Some(slices) => {
                        for slice in slices.iter().filter(|slice| !slice.is_empty()) {
                            // One record per 16 KiB of data, each with at most 22 bytes more.
                            let room = slice.len() + 64 + slice.len() / 256;
                            append(&mut self.outgoing, room, |room| {
                                traffic.encrypt(slice, room).map_err(|err| match err {
                                    EncryptError::InsufficientSize(needed) => {
                                        Grow::To(needed.required_size)
                                    }
                                    err => Grow::Fail(invalid_data(err)),
                                })
                            })?;
                        }
                        Some(Step::Encrypted)
                    }
                    None => Some(Step::NeedInput {
                        handshaking: self.connection.is_handshaking(),
                    }),
                },
                ConnectionState::BlockedHandshake => Some(Step::NeedInput { handshaking: true }),
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    Some(Step::Closed)
                }
                // Early data is off (ServerConfig's default), and further states are new ones
                // this service does not use.
                _ => return Err(invalid_data("unexpected TLS state")),
            };
            self.incoming.drain(..discard);
            if self.incoming.is_empty() {
                self.incoming = Vec::new();
            }
            if let Some(step) = step {
                return Ok(step);
            }
        }
    }

    /// Reads from the socket into `incoming`; the number of bytes read, 0 at its end.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut chunk = [MaybeUninit::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
        self.incoming.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    }

    /// Sends what `outgoing` holds; pending until all of it is sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outgoing_sent < self.outgoing.len() {
            let sent = ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.outgoing_sent..])
            )?;
            if sent == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing_sent += sent;
        }
        self.outgoing = Vec::new();
        self.outgoing_sent = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[&[u8]],
    ) -> Poll<io::Result<usize>> {
        // What an earlier write queued goes first, and bounds what is queued to one write.
        ready!(self.poll_send(cx))?;
        let len = slices.iter().map(|slice| slice.len()).sum();
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        loop {
            match self.step(Some(slices))? {
                Step::Encrypted => break,
                Step::Output | Step::Plaintext => {}
                Step::NeedInput { .. } | Step::Closed => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
            }
        }
        // Sent now if the socket takes it; otherwise the next write or flush sends it.
        if let Poll::Ready(Err(err)) = self.poll_send(cx) {
            return Poll::Ready(Err(err));
        }
        Poll::Ready(Ok(len))
    }
}

#[cfg(feature = "fuzzing")]
impl<IO> TlsStream<IO> {
    /// The bytes allocated for the incoming TLS, the decrypted and the outgoing TLS buffers:
    /// what a connection costs beyond rustls's state, which the fuzz targets hold to a bound.
    pub(crate) fn buffer_capacities(&self) -> [usize; 3] {
        [
            self.incoming.capacity(),
            self.plaintext.capacity(),
            self.outgoing.capacity(),
        ]
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plaintext_read < this.plaintext.len() {
                let unread = &this.plaintext[this.plaintext_read..];
                let taken = unread.len().min(buf.remaining());
                buf.put_slice(&unread[..taken]);
                this.plaintext_read += taken;
                if this.plaintext_read == this.plaintext.len() {
                    this.plaintext = Vec::new();
                    this.plaintext_read = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            // Session tickets and key updates wait for no write of the application's; a socket
            // that cannot take them now wakes this task when it can.
            if let Poll::Ready(Err(err)) = this.poll_send(cx) {
                return Poll::Ready(Err(err));
            }
            match this.step(None)? {
                Step::Plaintext | Step::Output | Step::Encrypted => {}
                Step::Closed => return Poll::Ready(Ok(())),
                Step::NeedInput { .. } => {
                    if ready!(this.poll_receive(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the client closed the connection without a TLS close_notify",
                        )));
                    }
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, &[buf])
    }

    /// One set of records for all of `bufs`: a chunk's size line, data and CRLF are one
    /// write, not three records and three system calls.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|buf| buf.len()).sum();
        if len <= READ_CHUNK {
            let mut storage = [MaybeUninit::uninit(); READ_CHUNK];
            let mut gathered = ReadBuf::uninit(&mut storage);
            for buf in bufs {
                gathered.put_slice(buf);
            }
            this.poll_write_slices(cx, &[gathered.filled()])
        } else {
            let slices: Vec<&[u8]> = bufs.iter().map(|buf| &buf[..]).collect();
            this.poll_write_slices(cx, &slices)
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Sends close_notify, then closes the socket for writing.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        // After an error rustls has queued its fatal alert instead, which nothing sends: the
        // connection closes without a close_notify.
        if !this.close_notify_sent && !this.failed {
            this.close_notify_sent = true;
            let status = this.connection.process_tls_records(&mut this.incoming);
            let discard = status.discard;
            if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state {
                let mut alert = [0_u8; 64];
                if let Ok(written) = traffic.queue_close_notify(&mut alert) {
                    this.outgoing.extend_from_slice(&alert[..written]);
                }
            }
            this.incoming.drain(..discard);
            ready!(this.poll_send(cx))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Why `append`'s writer wrote nothing.
enum Grow {
    /// It needs this much room.
    To(usize),
    Fail(io::Error),
}

/// Appends to `out` what `write` puts in the room it is given, `room` bytes at first and as
/// much as it asks for after.
fn append(
    out: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Grow>,
) -> io::Result<()> {
    let at = out.len();
    loop {
        out.resize(at + room, 0);
        match write(&mut out[at..]) {
            Ok(written) => {
                out.truncate(at + written);
                return Ok(());
            }
            Err(Grow::To(needed)) => room = needed,
            Err(Grow::Fail(err)) => {
                out.truncate(at);
                return Err(err);
            }
        }
    }
}

fn invalid_data(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err)
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let certificate = params.self_signed(&key).unwrap();
        let der = CertificateDer::from(certificate.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_an_idle_stream_holds_no_buffer() {
        let (server_config, client_config) = configs();
        let (client_io, server_io) = tokio::io::duplex(1024);
        let client = tokio::spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(client_config);
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, client_io).await.unwrap();
            tls.write_all(b"request").await.unwrap();
            tls.flush().await.unwrap();
            let mut response = Vec::new();
            // To the server's close_notify: a clean end, not an unexpected EOF.
            tls.read_to_end(&mut response).await.unwrap();
            response
        });
        let mut stream = accept(server_io, server_config).await.unwrap();
        let mut request = [0; 7];
        stream.read_exact(&mut request).await.unwrap();
        assert_eq!(&request, b"request");
        let idle = [
            stream.incoming.capacity(),
            stream.plaintext.capacity(),
            stream.outgoing.capacity(),
        ];
        assert_eq!(idle, [0, 0, 0], "buffers held after a read");

        // Larger than a record and than the pipe: sent over several writes of the socket.
        let response: Vec<u8> = (0..100_000_u32).map(|n| n as u8).collect();
        stream.write_all(&response).await.unwrap();
        let slices = [
            IoSlice::new(b"a"),
            IoSlice::new(b"bc"),
            IoSlice::new(b"\r\n"),
        ];
        assert_eq!(stream.write_vectored(&slices).await.unwrap(), 5);
        stream.flush().await.unwrap();
        assert_eq!(stream.outgoing.capacity(), 0, "buffer held after a flush");
        stream.shutdown().await.unwrap();

        let mut expected = response;
        expected.extend_from_slice(b"abc\r\n");
        assert_eq!(client.await.unwrap(), expected);
    }

    /// Found by `fuzz/`'s `tls_stream`: after a record that fails to decrypt, the next write
    /// (an event on its way) handed rustls the same record again, and rustls, which had already
    /// answered it with a fatal alert, panicked on a debug assertion.
    #[tokio::test]
    async fn after_a_forged_record_reads_writes_and_closing_fail_cleanly() {
        let (server_config, client_config) = configs();
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (accepted, handshake_over) = tokio::sync::oneshot::channel();
        let client = tokio::spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(client_config);
            let name = ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, client_io).await.unwrap();
            let (mut raw, _) = tls.into_inner();
            handshake_over.await.unwrap();
            // Application data whose authentication tag cannot verify.
            let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x20];
            record.extend_from_slice(&[0xa5; 0x20]);
            raw.write_all(&record).await.unwrap();
            let mut rest = Vec::new();
            raw.read_to_end(&mut rest).await.unwrap();
        });
        let mut stream = accept(server_io, server_config).await.unwrap();
        accepted.send(()).unwrap();
        let mut buffer = [0; 64];
        let error = stream.read(&mut buffer).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        let error = stream.write_all(b"event: x\n\n").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert!(stream.read(&mut buffer).await.is_err());
        stream.shutdown().await.unwrap();
        drop(stream);
        client.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_gone_mid_handshake_is_an_error() {
        let (server_config, _) = configs();
        let (mut client_io, server_io) = tokio::io::duplex(1024);
        client_io.write_all(b"\x16\x03\x01\x00").await.unwrap();
        drop(client_io);
        let error = accept(server_io, server_config).await.err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
