//! The service's TLS stream (src/tls/stream.rs, over rustls's unbuffered API, with the
//! service's own rustls configuration) against a real rustls client, in memory: a handshake,
//! the client's application data, then its records lost, repeated, swapped, altered, cut
//! short, preceded by garbage or cut off as the input says (`TlsScript` in src/lib.rs), while
//! the service reads and writes.
//!
//! Checked, beyond "no panic":
//! - every handshake between the service and rustls completes;
//! - the service never reads a byte the client did not send: what it reads is a prefix of the
//!   client's plaintext;
//! - it ends in an error or a clean end once the client's bytes end, never waiting for more;
//!   a clean end only after the client's own close_notify, with all of its plaintext read
//!   (so a cut connection cannot pass for a complete one);
//! - its buffers stay under [`MAX_BUFFER`] whatever arrives;
//! - what it writes meanwhile reaches the client intact.
#![no_main]

use std::future::Future;
use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use flagsmith_sse::config::TlsConfig;
use flagsmith_sse::fuzzing::tls_buffers;
use flagsmith_sse::tls::{Certificate, TlsStream};
use flagsmith_sse_fuzz::{Op, ServiceEnd, TlsScript, pattern, records};
use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most any buffer of the stream may hold: a whole record (16 KiB and its overhead) and a
/// read beside it, with room for how a `Vec` grows.
const MAX_BUFFER: usize = 64 * 1024;
/// What the service writes in all, at most: enough for many records, few enough to stay fast.
const MAX_SERVICE_WRITES: usize = 64 * 1024;
/// Polls of a write before it counts as never ending.
const MAX_POLLS: usize = 100_000;

struct Fixture {
    service: Arc<ServerConfig>,
    clients: Vec<Arc<ClientConfig>>,
}

/// A self-signed certificate for `localhost`, loaded as the service loads one, and the clients
/// that trust it: made once per process.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("a key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        let certificate = params.self_signed(&key).expect("a certificate");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let files = TlsConfig {
            certificate_file: dir.path().join("fuzz.crt"),
            key_file: dir.path().join("fuzz.key"),
        };
        std::fs::write(&files.certificate_file, certificate.pem()).expect("write");
        std::fs::write(&files.key_file, key.serialize_pem()).expect("write");
        let service = Certificate::load(&files)
            .expect("the pair loads")
            .acceptor()
            .expect("a server configuration");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(certificate.der().to_vec()))
            .expect("a root");
        let ring = rustls::crypto::ring::default_provider;
        let aes_only = rustls::crypto::CryptoProvider {
            cipher_suites: vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256],
            ..ring()
        };
        let clients = [
            (ring(), &rustls::version::TLS13),
            (aes_only, &rustls::version::TLS13),
            (ring(), &rustls::version::TLS12),
        ]
        .into_iter()
        .map(|(provider, version)| {
            let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .expect("a protocol version")
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(config)
        })
        .collect();
        Fixture { service, clients }
    })
}

fuzz_target!(|data: &[u8]| {
    let script = TlsScript::decode(data);
    let fixture = fixture();
    let mut cx = Context::from_waker(Waker::noop());
    let end = ServiceEnd::default();
    let name = ServerName::try_from("localhost").expect("a name");
    let mut client =
        ClientConnection::new(fixture.clients[script.client].clone(), name).expect("a client");
    let mut stream = handshake(&mut client, &end, fixture.service.clone(), &mut cx);

    // The client's application data, as records, before anything is done to them.
    let mut sent = Vec::new();
    let mut tls = Vec::new();
    for &length in &script.writes {
        let start = sent.len();
        sent.extend((start..start + length).map(pattern));
        // Encrypted write by write, as rustls holds at most 64 KiB of plaintext unsent.
        client.writer().write_all(&sent[start..]).expect("buffered");
        while client.wants_write() {
            client.write_tls(&mut tls).expect("into memory");
        }
    }
    if script.close_notify {
        client.send_close_notify();
        while client.wants_write() {
            client.write_tls(&mut tls).expect("into memory");
        }
    }
    let mut records = records(&tls);

    let mut cut = None;
    for op in &script.ops {
        apply(op, &mut records, &mut cut);
    }
    let mut wire = records.concat();
    if let Some(at) = cut {
        wire.truncate(at.min(wire.len()));
    }

    let mut service = Service {
        stream: &mut stream,
        read_size: script.read_size,
        received: Vec::new(),
        written: Vec::new(),
        ended: None,
    };
    let mut schedule: Vec<(usize, usize)> = script
        .ops
        .iter()
        .filter_map(|op| match *op {
            Op::Deliver {
                chunk,
                service_writes,
            } => Some((usize::from(chunk), usize::from(service_writes) * 64)),
            _ => None,
        })
        .collect();
    if schedule.is_empty() {
        schedule.push((usize::MAX, 0));
    }
    let mut delivered = 0;
    for &(chunk, service_writes) in schedule.iter().cycle() {
        if delivered == wire.len() || service.ended.is_some() {
            break;
        }
        let next = delivered.saturating_add(chunk).min(wire.len());
        end.0.borrow_mut().to_service.extend(&wire[delivered..next]);
        delivered = next;
        service.read_all(&mut cx, &sent, false);
        service.write(&mut cx, service_writes);
    }
    end.0.borrow_mut().client_closed = true;
    service.read_all(&mut cx, &sent, true);
    let clean = match service
        .ended
        .as_ref()
        .expect("the stream ended with the client's bytes")
    {
        Ok(()) => true,
        Err(_) => false,
    };
    if clean {
        assert!(
            script.close_notify,
            "a clean end without the client's close_notify"
        );
        assert_eq!(
            service.received.len(),
            sent.len(),
            "a clean end before all was read"
        );
    }
    let written = std::mem::take(&mut service.written);
    // Ends as the service ends a connection; whatever happened, without a panic.
    let _ = poll_until_ready(&mut cx, |cx| Pin::new(&mut stream).poll_shutdown(cx));
    check_buffers(&stream);

    // What the service wrote reaches the client whole: nothing the client sent can spoil it.
    let to_client = std::mem::take(&mut end.0.borrow_mut().to_client);
    let mut readable = &to_client[..];
    let mut got = Vec::new();
    let mut alerted = false;
    while !readable.is_empty() && !alerted {
        if client.read_tls(&mut readable).expect("from memory") == 0 {
            break;
        }
        match client.process_new_packets() {
            Ok(_) => {}
            // The service may end with an alert of its own.
            Err(rustls::Error::AlertReceived(_)) => alerted = true,
            Err(err) => panic!("the client cannot read what the service wrote: {err}"),
        }
        let _ = client.reader().read_to_end(&mut got);
    }
    if alerted {
        assert!(
            written.starts_with(&got),
            "the client read bytes the service did not write"
        );
    } else {
        assert_eq!(
            got, written,
            "the client read otherwise than the service wrote"
        );
    }
});

/// Completes a handshake between `client` and the service's `accept`.
fn handshake(
    client: &mut ClientConnection,
    end: &ServiceEnd,
    config: Arc<ServerConfig>,
    cx: &mut Context<'_>,
) -> TlsStream<ServiceEnd> {
    let mut accept = Box::pin(flagsmith_sse::tls::accept(end.clone(), config));
    let mut stream = None;
    for _ in 0..32 {
        let mut flight = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut flight).expect("into memory");
        }
        end.0.borrow_mut().to_service.extend(flight);
        if stream.is_none() {
            match accept.as_mut().poll(cx) {
                Poll::Ready(Ok(accepted)) => stream = Some(accepted),
                Poll::Ready(Err(err)) => panic!("the service refused a handshake: {err}"),
                Poll::Pending => {}
            }
        }
        let answer = std::mem::take(&mut end.0.borrow_mut().to_client);
        let mut answer = &answer[..];
        while !answer.is_empty() {
            client.read_tls(&mut answer).expect("from memory");
            client
                .process_new_packets()
                .unwrap_or_else(|err| panic!("the client refused the service's handshake: {err}"));
        }
        if let Some(stream) = stream.take_if(|_| !client.is_handshaking()) {
            return stream;
        }
    }
    panic!("the handshake did not complete");
}

/// What the input does to the records, and where they end.
fn apply(op: &Op, records: &mut Vec<Vec<u8>>, cut: &mut Option<usize>) {
    let index = |records: &Vec<Vec<u8>>, at: u8| usize::from(at) % records.len().max(1);
    match *op {
        // How the bytes arrive, not what they are.
        Op::Deliver { .. } => {}
        Op::Header { kind, length } => {
            let [high, low] = length.to_be_bytes();
            records.push(vec![kind, 3, 3, high, low]);
        }
        _ if records.is_empty() => {}
        Op::Drop { record } => {
            records.remove(index(records, record));
        }
        Op::Duplicate { record } => {
            let at = index(records, record);
            records.insert(at, records[at].clone());
        }
        Op::Swap { first, second } => {
            let (first, second) = (index(records, first), index(records, second));
            records.swap(first, second);
        }
        Op::Flip {
            record,
            offset,
            xor,
        } => {
            let at_record = index(records, record);
            let record = &mut records[at_record];
            if !record.is_empty() {
                let at = usize::from(offset) % record.len();
                record[at] ^= xor;
            }
        }
        Op::Truncate { record, length } => {
            let at_record = index(records, record);
            let record = &mut records[at_record];
            record.truncate(usize::from(length) % record.len().max(1));
        }
        Op::Garbage {
            record,
            length,
            byte,
        } => {
            let at = index(records, record);
            records.insert(at, vec![byte; usize::from(length) + 1]);
        }
        Op::Cut { record, at } => {
            let at_record = index(records, record);
            let before: usize = records[..at_record].iter().map(Vec::len).sum();
            *cut = Some(before + usize::from(at) % (records[at_record].len() + 1));
        }
    }
}

/// The service's side: its stream, and what it read and wrote.
struct Service<'a> {
    stream: &'a mut TlsStream<ServiceEnd>,
    read_size: usize,
    received: Vec<u8>,
    /// What writes reported as written.
    written: Vec<u8>,
    /// How reading ended: `Ok` at a clean end, `Err` at an error.
    ended: Option<Result<(), std::io::Error>>,
}

impl Service<'_> {
    /// Reads until the stream waits for more bytes or ends; with `closed`, the client's side
    /// is closed and the stream must end.
    fn read_all(&mut self, cx: &mut Context<'_>, sent: &[u8], closed: bool) {
        let mut buffer = vec![0; self.read_size];
        // Every poll but the last reads a byte or more of what was sent, so this ends.
        loop {
            if self.ended.is_some() {
                return;
            }
            let mut read = ReadBuf::new(&mut buffer);
            let polled = Pin::new(&mut *self.stream).poll_read(cx, &mut read);
            check_buffers(self.stream);
            match polled {
                Poll::Pending if closed => panic!("the stream waits for a client that is gone"),
                Poll::Pending => return,
                Poll::Ready(Err(err)) => self.ended = Some(Err(err)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => self.ended = Some(Ok(())),
                Poll::Ready(Ok(())) => {
                    self.received.extend_from_slice(read.filled());
                    assert!(
                        sent.starts_with(&self.received),
                        "the service read bytes the client did not send"
                    );
                }
            }
        }
    }

    /// Writes `length` bytes as the service writes events, if the stream still takes them.
    fn write(&mut self, cx: &mut Context<'_>, length: usize) {
        if length == 0 || self.written.len() >= MAX_SERVICE_WRITES {
            return;
        }
        let start = self.written.len();
        let bytes: Vec<u8> = (start..start + length).map(pattern).collect();
        if let Poll::Ready(Ok(written)) =
            poll_until_ready(cx, |cx| Pin::new(&mut *self.stream).poll_write(cx, &bytes))
        {
            assert!(written <= bytes.len());
            self.written.extend_from_slice(&bytes[..written]);
        }
        let _ = poll_until_ready(cx, |cx| Pin::new(&mut *self.stream).poll_flush(cx));
        check_buffers(self.stream);
    }
}

/// Polls until ready; the in-memory socket always takes writes, so a write that waits is
/// one that never ends.
fn poll_until_ready<T>(
    cx: &mut Context<'_>,
    mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> Poll<T> {
    for _ in 0..MAX_POLLS {
        if let Poll::Ready(ready) = poll(cx) {
            return Poll::Ready(ready);
        }
    }
    panic!("a write to a socket that takes everything never ended");
}

fn check_buffers<IO: AsyncRead + AsyncWrite + Unpin>(stream: &TlsStream<IO>) {
    let buffers = tls_buffers(stream);
    assert!(
        buffers.incoming <= MAX_BUFFER
            && buffers.plaintext <= MAX_BUFFER
            && buffers.outgoing <= MAX_BUFFER,
        "{buffers:?}"
    );
}
