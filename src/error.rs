//! The crate's top-level error: one variant per domain.

use crate::auth::AuthError;
use crate::backend::StartError;
use crate::config::ConfigError;
use crate::tls::TlsError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Backend(#[from] StartError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
