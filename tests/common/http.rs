//! HTTP/1.1 and HTTP/2 clients over plain TCP or TLS (hyper's client connections, so the
//! test picks the protocol and sees the ALPN result and the server's certificate), and test
//! certificates generated with rcgen.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flagsmith_sse::config::TlsConfig;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::TOKEN;

const WAIT: Duration = Duration::from_secs(10);

/// A self-signed certificate for `localhost` and its key, written as PEM files.
pub struct TestCertificate {
    pub files: TlsConfig,
    pub der: CertificateDer<'static>,
}

impl TestCertificate {
    /// Generates a fresh pair and writes it to `<name>.crt` and `<name>.key` in `dir`.
    pub fn generate(dir: &Path, name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let certificate = params.self_signed(&key).unwrap();
        let files = TlsConfig {
            certificate_file: dir.join(format!("{name}.crt")),
            key_file: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.certificate_file, certificate.pem()).unwrap();
        std::fs::write(&files.key_file, key.serialize_pem()).unwrap();
        Self {
            files,
            der: certificate.der().clone(),
        }
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.der)
    }

    /// A client that trusts only this certificate and offers `alpn` (empty: no ALPN).
    pub fn connector(&self, alpn: &[&str]) -> TlsConnector {
        connector(&[self], alpn)
    }
}

/// A client that trusts `trusted` and offers `alpn` (empty: no ALPN).
pub fn connector(trusted: &[&TestCertificate], alpn: &[&str]) -> TlsConnector {
    connector_for_versions(trusted, alpn, rustls::DEFAULT_VERSIONS)
}

/// A client as [`connector`] makes, limited to the TLS `versions`.
pub fn connector_for_versions(
    trusted: &[&TestCertificate],
    alpn: &[&str],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in trusted {
        roots.add(certificate.der.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// SHA-256 of a DER certificate, in lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Connects and completes a TLS handshake for `localhost`.
pub async fn tls_connect(addr: SocketAddr, connector: &TlsConnector) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(
        WAIT,
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("handshake within 10 s")
    .expect("handshake succeeds")
}

/// What the server agreed to in the handshake: the ALPN protocol and its leaf certificate.
pub fn negotiated(stream: &TlsStream<TcpStream>) -> (Option<String>, String) {
    let (_, session) = stream.get_ref();
    let alpn = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let leaf = &session.peer_certificates().expect("a certificate")[0];
    (alpn, fingerprint(leaf))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

/// One client connection speaking `protocol` over `io`.
pub struct Connection {
    sender: Sender,
    authority: String,
    scheme: &'static str,
}

impl Connection {
    /// HTTP/1.1 or h2c (HTTP/2 with prior knowledge) over plain TCP.
    pub async fn plain(addr: SocketAddr, protocol: Protocol) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        Self::handshake(tcp, protocol, addr.to_string(), "http").await
    }

    /// Over TLS: HTTP/2 when the server chose `h2`, HTTP/1.1 otherwise.
    pub async fn tls(stream: TlsStream<TcpStream>) -> Self {
        let protocol = match negotiated(&stream).0.as_deref() {
            Some("h2") => Protocol::Http2,
            _ => Protocol::Http1,
        };
        Self::handshake(stream, protocol, "localhost".to_owned(), "https").await
    }

    async fn handshake<I>(
        io: I,
        protocol: Protocol,
        authority: String,
        scheme: &'static str,
    ) -> Self
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        let sender = match protocol {
            Protocol::Http1 => {
                let (sender, connection) = http1::handshake(io).await.unwrap();
                tokio::spawn(connection);
                Sender::Http1(sender)
            }
            Protocol::Http2 => {
                let (sender, connection) =
                    http2::handshake(TokioExecutor::new(), io).await.unwrap();
                tokio::spawn(connection);
                Sender::Http2(sender)
            }
        };
        Self {
            sender,
            authority,
            scheme,
        }
    }

    pub fn protocol(&self) -> Protocol {
        match self.sender {
            Sender::Http1(_) => Protocol::Http1,
            Sender::Http2(_) => Protocol::Http2,
        }
    }

    /// Sends a request and waits for the response head.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Response<Incoming> {
        let mut request = Request::builder().method(method);
        request = match self.sender {
            // HTTP/2 carries the scheme and authority as pseudo-headers, taken from the URI.
            Sender::Http2(_) => request.uri(format!("{}://{}{path}", self.scheme, self.authority)),
            Sender::Http1(_) => request.uri(path).header("host", &self.authority),
        };
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                sender.ready().await.unwrap();
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                sender.ready().await.unwrap();
                sender.send_request(request).await
            }
        };
        let response = response.expect("a response");
        assert_eq!(
            response.version(),
            match self.protocol() {
                Protocol::Http1 => http::Version::HTTP_11,
                Protocol::Http2 => http::Version::HTTP_2,
            }
        );
        response
    }

    /// Opens the stream of `key`; panics unless it answers 200.
    pub async fn subscribe(&mut self, key: &str) -> EventStream {
        let response = self
            .send("GET", &format!("/sse/environments/{key}/stream"), &[], "")
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        EventStream {
            body: response.into_body(),
        }
    }

    /// Publishes with the test token; returns the status and body.
    pub async fn publish(&mut self, key: &str, body: &str) -> (u16, String) {
        let authorization = format!("Token {TOKEN}");
        let response = self
            .send(
                "POST",
                &format!("/sse/environments/{key}/queue-change"),
                &[
                    ("authorization", &authorization),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await;
        let status = response.status().as_u16();
        (status, read_text(response).await)
    }

    /// A GET's status and body.
    pub async fn get(&mut self, path: &str) -> (u16, String) {
        let response = self.send("GET", path, &[], "").await;
        let status = response.status().as_u16();
        (status, read_text(response).await)
    }
}

async fn read_text(response: Response<Incoming>) -> String {
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body within 10 s")
        .unwrap()
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// An SSE response body, read frame by frame.
pub struct EventStream {
    body: Incoming,
}

impl EventStream {
    /// The next data frame, comments included, within 10 s.
    pub async fn next_data(&mut self) -> Vec<u8> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("a data frame within 10 s")
                .expect("the stream is still open")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                return data.to_vec();
            }
        }
    }

    /// The next data frame that is not a keep-alive comment, within 10 s.
    pub async fn next_event(&mut self) -> Vec<u8> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("an event within 10 s")
                .expect("the stream is still open")
                .unwrap();
            if let Ok(data) = frame.into_data()
                && !data.starts_with(b":")
            {
                return data.to_vec();
            }
        }
    }
}
