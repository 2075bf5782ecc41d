//! Connections to the service under test: TCP from one of several loopback source addresses,
//! optionally TLS (with ALPN for the HTTP version), and hyper's HTTP/1.1 client for requests
//! other than streams.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use crate::Error;

/// A connection to the service, TLS or not.
pub type Io = Either<TcpStream, TlsStream<TcpStream>>;

pub type Body = Full<Bytes>;

/// The HTTP version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Protocol {
    /// HTTP/1.1: one connection per stream or request in flight.
    #[value(name = "1")]
    Http1,
    /// HTTP/2 (h2c with prior knowledge on http://, ALPN h2 on https://), many streams per
    /// connection.
    #[value(name = "2")]
    Http2,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Http1 => "HTTP/1.1",
            Self::Http2 => "HTTP/2",
        })
    }
}

/// Where the service listens, and how to reach it.
pub struct Target {
    addr: SocketAddr,
    /// `host:port` as given, for `Host` and `:authority`.
    authority: String,
    scheme: &'static str,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    sources: Vec<IpAddr>,
}

impl Target {
    /// Parses `http://host:port` or `https://host:port`. The host must resolve to a loopback
    /// address: this tool floods what it targets. With more than one source address, connections
    /// take them in turn (`127.0.0.1`, `127.0.0.2`, ...), so that the number of connections is
    /// not bounded by one address's ephemeral ports.
    pub fn new(
        url: &str,
        protocol: Protocol,
        ca_file: Option<&Path>,
        sources: usize,
    ) -> Result<Self, Error> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?}: expected http://host:port or https://host:port"))?;
        let scheme = match scheme {
            "http" => "http",
            "https" => "https",
            other => return Err(format!("{url:?}: unsupported scheme {other:?}").into()),
        };
        let authority = rest.trim_end_matches('/').to_owned();
        if authority.contains('/') {
            return Err(format!("{url:?}: give the service's base URL, without a path").into());
        }
        let addr = authority
            .to_socket_addrs()
            .map_err(|err| format!("{url:?}: {err}"))?
            .next()
            .ok_or_else(|| format!("{url:?}: the host resolves to no address"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{url:?} resolves to {}, which is not a loopback address; \
                 this tool only loads services on this machine",
                addr.ip()
            )
            .into());
        }
        let tls = match scheme {
            "https" => {
                let host = authority
                    .rsplit_once(':')
                    .map_or(authority.as_str(), |(host, _)| host)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|err| format!("{url:?}: {err}"))?;
                Some((connector(protocol, ca_file)?, name))
            }
            _ => None,
        };
        let sources = match addr.ip() {
            IpAddr::V4(_) => (0..sources.clamp(1, 254))
                .map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + n as u8)))
                .collect(),
            // IPv6 has a single loopback address.
            IpAddr::V6(ip) => vec![IpAddr::V6(ip)],
        };
        Ok(Self {
            addr,
            authority,
            scheme,
            tls,
            sources,
        })
    }

    /// An HTTP/1.1 request for `path` on this target, as SDKs send it: the path and a `Host`
    /// header (hyper's connection-level client would send the whole URL).
    pub fn request(&self, method: http::Method, path: &str, body: Bytes) -> Request<Body> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        let host = http::HeaderValue::try_from(&self.authority)
            .expect("the authority comes from a valid URL");
        request.headers_mut().insert(http::header::HOST, host);
        *request.uri_mut() = path.parse().expect("the path is built from a valid URL");
        request
    }

    /// An HTTP/1.1 connection, the `n`th this run opens (which picks its source address).
    pub async fn http1(&self, n: usize) -> Result<http1::SendRequest<Body>, Error> {
        let io = self.connect(n).await?;
        let (sender, connection) = http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// `host:port`, for `Host` headers and `:authority`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// `http` or `https`, for `:scheme`.
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// A new connection, the `n`th this run opens (which picks its source address).
    pub async fn connect(&self, n: usize) -> Result<Io, Error> {
        let source = self.sources[n % self.sources.len()];
        let socket = match source {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|err| format!("cannot bind source address {source}: {err}"))?;
        let stream = socket.connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(match &self.tls {
            None => Either::Left(stream),
            Some((connector, name)) => {
                Either::Right(connector.connect(name.clone(), stream).await?)
            }
        })
    }
}

fn connector(protocol: Protocol, ca_file: Option<&Path>) -> Result<TlsConnector, Error> {
    let ca_file = ca_file.ok_or("https:// needs --ca-file, the PEM certificate to trust")?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca_file)
        .map_err(|err| format!("{}: {err}", ca_file.display()))?
    {
        let certificate = certificate.map_err(|err| format!("{}: {err}", ca_file.display()))?;
        roots.add(certificate)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![match protocol {
        Protocol::Http1 => b"http/1.1".to_vec(),
        Protocol::Http2 => b"h2".to_vec(),
    }];
    Ok(TlsConnector::from(Arc::new(config)))
}
