//! Backends carry updates between instances: they store each accepted update durably and feed
//! every update, from any instance, into the local [`Hub`].
//!
//! HTTP code only sees [`Backend`]; which [`Store`] runs is decided once, at start-up.
//! What every store shares: [`Backend::publish`] hands the hub what was stored, `link` keeps
//! the state of the link to the broker, and `Background` the task that follows it.

mod link;
pub mod memory;
pub mod nats;
pub mod redis;

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::{BoxFuture, FutureExt};
use tokio_util::sync::CancellationToken;

pub use link::Readiness;

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

/// An update as stored, with when it was stored: what the hub gets after a publish.
#[derive(Debug, Clone)]
pub struct Stored {
    pub update: Update,
    pub at: SystemTime,
}

impl Stored {
    /// `update`, stored just now.
    pub fn now(update: Update) -> Self {
        Self {
            update,
            at: SystemTime::now(),
        }
    }
}

/// What each backend implements: storing, the link to its broker, and its files.
pub trait Store: Send + Sync + 'static {
    /// Stores `update` durably. Resolves `Ok` only once the update is stored, so that an HTTP
    /// `200` is never sent for an update that could be lost. Storing the same update twice
    /// must store it once. Resolves to what is now stored for the environment (the update,
    /// or a newer one), or `None` when this instance's hub already has that.
    fn store(&self, update: Update) -> BoxFuture<'_, Result<Option<Stored>, BackendError>>;

    fn readiness(&self) -> Readiness;

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

/// The running backend and the hub it feeds: what HTTP code publishes through.
pub struct Backend {
    store: Box<dyn Store>,
    hub: Arc<Hub>,
}

impl Backend {
    pub fn new(store: impl Store, hub: Arc<Hub>) -> Self {
        Self {
            store: Box::new(store),
            hub,
        }
    }

    /// Stores `update`, then hands the hub what is stored, so that a subscriber arriving right
    /// after the `200` gets it first without waiting for the broker to bring it back (which
    /// then changes nothing). Every backend's publishes reach the hub here.
    pub async fn publish(&self, update: Update) -> Result<(), BackendError> {
        if let Some(stored) = self.store.store(update).await? {
            self.hub.apply(&stored.update, stored.at);
        }
        Ok(())
    }

    pub fn readiness(&self) -> Readiness {
        self.store.readiness()
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    pub async fn reload(&self) -> Result<bool, ReloadError> {
        self.store.reload().await
    }

    pub async fn close(&self) {
        self.store.close().await;
    }
}

/// A backend's task in the background, stopped and awaited by `close()`, or stopped with
/// the service's shutdown tree.
struct Background {
    stop: CancellationToken,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Background {
    fn spawn<F>(stop: CancellationToken, run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let task = tokio::spawn(run(stop.clone()));
        Self {
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }

    async fn stop(&self) {
        self.stop.cancel();
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

/// Builds the configured backend; it starts feeding `hub` at once and connects in the
/// background, until `close()` or until `stop` fires.
pub async fn start(
    config: &Config,
    hub: Arc<Hub>,
    metrics: &Metrics,
    stop: &CancellationToken,
    log: &slog::Logger,
) -> Result<Backend, StartError> {
    let store: Box<dyn Store> = match config.backend {
        BackendKind::Memory => {
            // Nothing to connect to: always up.
            metrics.backend.connected.set(1);
            Box::new(memory::MemoryBackend)
        }
        BackendKind::Nats => Box::new(
            nats::NatsBackend::start(
                &config.nats,
                hub.clone(),
                metrics.backend.clone(),
                metrics.nats.clone(),
                stop.child_token(),
                log,
            )
            .await?,
        ),
        BackendKind::Redis => Box::new(redis::RedisBackend::start(
            &config.redis,
            hub.clone(),
            metrics.backend.clone(),
            metrics.redis.clone(),
            stop.child_token(),
            log,
        )?),
    };
    Ok(Backend { store, hub })
}
