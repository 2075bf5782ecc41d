//! TLS for the listeners: a certificate chain and key read from PEM files with
//! `rustls-pki-types`' [`PemObject`] (the maintained successor of the archived
//! `rustls-pemfile`), served by rustls with ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3 only.
//!
//! A listener's [`Certificate`] is also its rustls certificate resolver, so a reload swaps the
//! pair for the handshakes that follow while established connections keep theirs. A reload
//! also replaces the session-ticket keys: a session begun under the old pair is not resumed
//! under the new one, which matters when a pair is replaced because its key leaked.
//!
//! Connections are served by `stream`, over rustls's unbuffered API: an idle connection
//! holds no buffer. TLS 1.3 connections prefer `chacha`'s ChaCha20-Poly1305, whose keys an
//! idle connection holds in 88 bytes.

mod chacha;
mod stream;

pub use stream::{TlsStream, accept};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, NoServerSessionStorage, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, ServerConfig, version};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {kind} file {path}: {source}")]
    Read {
        kind: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the TLS {kind} file {path} is not valid PEM: {source}")]
    Pem {
        kind: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("the TLS certificate file {0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("the TLS key file {path} holds no usable private key: {source}")]
    Key {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("the TLS key {key} does not belong to the certificate {certificate}: {source}")]
    Mismatch {
        certificate: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot set up TLS: {0}")]
    Setup(rustls::Error),
}

/// A listener's certificate and key, reloadable while connections stay open.
#[derive(Debug)]
pub struct Certificate {
    files: TlsConfig,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    tickets: Arc<TicketKeys>,
}

impl Certificate {
    /// Reads and checks the pair; a missing, unreadable or mismatched pair is an error.
    pub fn load(files: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(provider());
        let pair = read_pair(files, &provider)?;
        Ok(Arc::new(Self {
            files: files.clone(),
            provider,
            current: RwLock::new(Arc::new(pair)),
            tickets: Arc::new(TicketKeys(RwLock::new(new_ticketer()?))),
        }))
    }

    pub fn files(&self) -> &TlsConfig {
        &self.files
    }

    /// Re-reads the files. New handshakes use the new pair; on error the current pair stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = read_pair(&self.files, &self.provider)?;
        let ticketer = new_ticketer()?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
        *self.tickets.0.write().unwrap_or_else(|p| p.into_inner()) = ticketer;
        Ok(())
    }

    /// SHA-256 of the leaf certificate in hex, the fingerprint `openssl x509 -fingerprint
    /// -sha256` shows, for the logs.
    pub fn fingerprint(&self) -> String {
        let current = self.current_pair();
        let digest = Sha256::digest(current.cert.first().map_or(&[][..], |leaf| leaf.as_ref()));
        digest.iter().fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
    }

    /// The rustls configuration for accepting connections: HTTP/2 and HTTP/1.1, TLS 1.3 and
    /// 1.2, with this certificate.
    pub fn acceptor(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // The service's order of suites, ChaCha20-Poly1305 first (see `provider`).
        config.ignore_client_order = true;
        // SDKs reconnect every `max_stream_age`; session tickets let them resume without a full
        // handshake, which saves the service most of the handshake's CPU. Tickets only, no
        // server-side session cache: its entries could not be dropped on reload.
        config.ticketer = self.tickets.clone();
        config.session_storage = Arc::new(NoServerSessionStorage {});
        Ok(Arc::new(config))
    }

    fn current_pair(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current_pair())
    }
}

/// Session-ticket keys that a reload can replace. The keys inside also rotate on their own,
/// every few hours, as rustls' ticketer does.
#[derive(Debug)]
struct TicketKeys(RwLock<Arc<dyn ProducesTickets>>);

impl TicketKeys {
    fn current(&self) -> Arc<dyn ProducesTickets> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.current().lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.current().encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.current().decrypt(cipher)
    }
}

/// ring's algorithms, with TLS 1.3's ChaCha20-Poly1305 first and its keys held compactly
/// ([`chacha`]), chosen over AES-GCM whenever a client offers it (current browsers, OpenSSL,
/// Go, Java, rustls, .NET on Linux): an idle TLS connection then holds about 1 KiB less. On
/// records as small as events the two ciphers cost about the same.
fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|suite| suite.suite() != CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    provider.cipher_suites.insert(0, chacha::suite());
    provider
}

fn new_ticketer() -> Result<Arc<dyn ProducesTickets>, TlsError> {
    rustls::crypto::ring::Ticketer::new().map_err(TlsError::Setup)
}

fn read_pair(files: &TlsConfig, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let certificate_pem = read("certificate", &files.certificate_file)?;
    let chain = CertificateDer::pem_slice_iter(&certificate_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            kind: "certificate",
            path: files.certificate_file.clone(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(files.certificate_file.clone()));
    }
    let key_pem = read("key", &files.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::Pem {
        kind: "key",
        path: files.key_file.clone(),
        source,
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::Key {
            path: files.key_file.clone(),
            source,
        })?;
    let pair = CertifiedKey::new(chain, signing_key);
    match pair.keys_match() {
        // rustls cannot compare every kind of key; the handshake will tell.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(pair)
        }
        Err(source) => Err(TlsError::Mismatch {
            certificate: files.certificate_file.clone(),
            key: files.key_file.clone(),
            source,
        }),
    }
}

fn read(kind: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        kind,
        path: path.to_owned(),
        source,
    })
}
