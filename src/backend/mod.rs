//! Backends carry updates between instances: they store each accepted update durably and feed
//! every update, from any instance, into the local [`Hub`].
//!
//! HTTP code only sees [`Backend`]; which implementation runs is decided once, at start-up.

pub mod memory;
pub mod nats;
pub mod redis;

use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};

use crate::config::{BackendKind, Config};
use crate::domain::Update;
use crate::hub::Hub;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend is not connected; nothing was sent.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend was asked but did not confirm storing the update.
    #[error("backend did not confirm the update: {0}")]
    NotAcknowledged(String),
}

/// Why a backend could not start: its settings or files are unusable. (A broker that is
/// down is not one: backends connect in the background.)
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// Why a reload left the backend as it was.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ReloadError(#[from] redis::RedisError);

pub trait Backend: Send + Sync + 'static {
    /// Stores `update` durably. Resolves `Ok` only once the update is stored, so that an HTTP
    /// `200` is never sent for an update that could be lost, and only once the local hub has
    /// it, so that a subscriber arriving right after the `200` gets it first. Publishing the
    /// same update twice must store it once.
    fn publish(&self, update: Update) -> BoxFuture<'_, Result<(), BackendError>>;

    /// Whether the backend is connected and has loaded the newest updates. Reads local state
    /// only, so probes generate no backend traffic.
    fn is_ready(&self) -> bool;

    /// Resolves once [`Backend::is_ready`] first becomes true.
    fn ready(&self) -> BoxFuture<'_, ()>;

    /// A one-line description for logs and `STATUS=` (never credentials).
    fn describe(&self) -> String;

    /// Re-reads what the backend reads from files (the Redis password) and, if it changed,
    /// connects with it. Resolves to whether it changed; on error the backend carries on as
    /// it was.
    fn reload(&self) -> BoxFuture<'_, Result<bool, ReloadError>> {
        async { Ok(false) }.boxed()
    }

    /// Stops background work and flushes what is in flight.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Builds the configured backend; it starts feeding `hub` at once and connects in the background.
pub async fn start(
    config: &Config,
    hub: Arc<Hub>,
    metrics: &Metrics,
    log: &slog::Logger,
) -> Result<Arc<dyn Backend>, StartError> {
    Ok(match config.backend {
        BackendKind::Memory => {
            // Nothing to connect to: always up.
            metrics.backend.connected.set(1);
            Arc::new(memory::MemoryBackend::new(hub))
        }
        BackendKind::Nats => Arc::new(
            nats::NatsBackend::start(
                &config.nats,
                hub,
                metrics.backend.clone(),
                metrics.nats.clone(),
                log,
            )
            .await?,
        ),
        BackendKind::Redis => Arc::new(redis::RedisBackend::start(
            &config.redis,
            hub,
            metrics.backend.clone(),
            metrics.redis.clone(),
            log,
        )?),
    })
}
