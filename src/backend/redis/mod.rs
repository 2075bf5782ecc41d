//! The Redis / Valkey backend, for deployments of the Redis-based `flagsmith/sse` 3.x and 4.0.
//!
//! Two keys hold every update, both under one hash tag so that they live in one cluster slot
//! and one script can change them together: a hash from environment key to its newest
//! `updated_at`, and a sorted set from environment key to when that was stored (Redis's clock,
//! in milliseconds), which is how the retention window is kept.
//!
//! A publish runs [`STORE_SCRIPT`]: it forgets expired updates, stores the new one only if it
//! is newer than the stored one, and announces it on the channel, all atomically. Every
//! instance subscribes to that channel (sharded pub/sub on a cluster) and applies what it
//! hears to its hub; on every (re)connection, and every `resync_interval` as a safety net, it
//! reloads every stored update, so nothing stored while it was away is missed.
//!
//! Pub/sub has no acknowledgements, so an instance proves its subscription instead of assuming
//! it: it publishes a probe on the channel and counts itself connected once the probe comes
//! back. Only then does it reload, so that every update is either in the reload or arrives by
//! the subscription. The probe repeats every few seconds and is the connection check behind
//! `/readyz`.
//!
//! A reload re-reads `password_file`: with a changed password the backend makes and subscribes
//! a new connection, then swaps it in, so that reconnections use the new password. Rotate by
//! letting Redis accept the new password first (an ACL user may have two), then reload.
//!
//! # Layout
//! - this file: the backend, which stores updates;
//! - `schema`: the keys, the script that writes them, and what the channel carries;
//! - `connection`: connections to a server or a cluster, with their secrets;
//! - `follower`: the task that subscribes, probes, reloads and feeds the hub.

mod connection;
mod follower;
mod schema;

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};
use redis::aio::ConnectionManager;
use slog::Logger;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::link::Link;
use super::{BackendError, Background, Readiness, ReloadError, Store, Stored};
use crate::config::RedisConfig;
use crate::domain::Update;
use crate::hub::Hub;
use crate::metrics::{BackendMetrics, RedisMetrics};
use connection::{
    CONNECT_TIMEOUT, Connection, Connector, RESPONSE_TIMEOUT, node_info, read_ca_file,
    read_password,
};
use follower::Follower;
pub use schema::{Keys, STORE_SCRIPT};

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("cannot read redis.password_file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read certificates from redis.tls_ca_file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("cannot use Redis at {address}: {source}")]
    Client {
        address: String,
        source: redis::RedisError,
    },
    #[error("Redis at {address} did not answer in time")]
    ReloadTimeout { address: String },
}

/// What the backend and its follower task share.
struct Shared {
    connection: watch::Receiver<Option<Connection>>,
    /// Connected while the last probe came back; ready once reloaded since, until the
    /// connection is lost.
    link: Link,
    hub: Arc<Hub>,
    keys: Keys,
    script: redis::Script,
    retention_ms: u64,
    metrics: RedisMetrics,
}

pub struct RedisBackend {
    shared: Arc<Shared>,
    follower: Background,
    address: String,
    config: RedisConfig,
    /// The connector in use, from which a reload makes one with the new password.
    connector: std::sync::Mutex<Connector>,
    /// Hands a reload's new connection to the follower.
    replacements: mpsc::UnboundedSender<Replacement>,
    log: Logger,
}

/// A connection made and subscribed with a new password, with the connector that made it.
struct Replacement {
    connector: Connector,
    connection: Connection,
}

impl RedisBackend {
    /// Reads the secrets and certificates, then connects in the background (the service starts
    /// while Redis is down).
    pub fn start(
        config: &RedisConfig,
        hub: Arc<Hub>,
        backend_metrics: BackendMetrics,
        metrics: RedisMetrics,
        stop: CancellationToken,
        log: &Logger,
    ) -> Result<Self, RedisError> {
        let log = log.new(slog::o!("backend" => "redis"));
        let address = format!(
            "{}://{}:{}",
            if config.tls { "rediss" } else { "redis" },
            config.host,
            config.port
        );
        let password = match (&config.password, &config.password_file) {
            (Some(password), _) => Some(password.expose().to_owned()),
            (None, Some(path)) => Some(read_password(path, &log)?),
            (None, None) => None,
        };
        let certificates = match &config.tls_ca_file {
            Some(path) => Some(read_ca_file(path)?),
            None => None,
        };
        let node = node_info(config, password.as_deref());
        let (pushes_tx, pushes) = mpsc::unbounded_channel();
        let (connection_tx, connection) = watch::channel(None);
        let (replacements_tx, replacements) = mpsc::unbounded_channel();
        let connector = Connector {
            node,
            username: config.username.clone(),
            password,
            certificates,
            pushes: pushes_tx,
            address: address.clone(),
        };
        // One server's connection is made lazily and never fails to be made; a cluster's
        // needs a node to answer, so the follower makes it, retrying.
        if !config.cluster {
            connection_tx.send_replace(Some(connector.single()?));
        }
        let keys = Keys::new(&config.namespace);
        let shared = Arc::new(Shared {
            connection,
            link: Link::new("redis unavailable", backend_metrics, log.clone()),
            hub: hub.clone(),
            script: redis::Script::new(STORE_SCRIPT),
            retention_ms: u64::try_from(hub.retention().as_millis()).unwrap_or(u64::MAX),
            keys,
            metrics,
        });
        let follower = Follower {
            shared: shared.clone(),
            connector: connector.clone(),
            connection: connection_tx,
            pushes,
            replacements,
            instance: rand::random(),
            scan_count: config.scan_count,
            resync_interval: config.resync_interval.duration(),
            log: log.clone(),
        };
        Ok(Self {
            shared,
            follower: Background::spawn(stop, |stop| follower.run(stop)),
            address,
            config: config.clone(),
            connector: std::sync::Mutex::new(connector),
            replacements: replacements_tx,
            log,
        })
    }

    /// A connection with `connector`, proven to log in, and subscribed to the channel.
    async fn connect_and_subscribe(&self, connector: &Connector) -> Result<Connection, RedisError> {
        let mut connection = if self.config.cluster {
            connector.cluster().await
        } else {
            ConnectionManager::new_with_config(connector.client()?, connector.manager_config())
                .await
                .map(Connection::Single)
        }
        .map_err(|err| connector.client_error(err))?;
        connection
            .subscribe(&self.shared.keys.channel)
            .await
            .map_err(|err| connector.client_error(err))?;
        Ok(connection)
    }
}

impl Store for RedisBackend {
    fn store(&self, update: Update) -> BoxFuture<'_, Result<Option<Stored>, BackendError>> {
        async move {
            let shared = &self.shared;
            let connection = shared.connection.borrow().clone();
            let Some(mut connection) = connection.filter(|_| shared.link.is_connected()) else {
                shared.metrics.publish.inc();
                return Err(BackendError::Unavailable("not connected to Redis".into()));
            };
            let publish = connection.publish_command();
            shared
                .script
                .key(&shared.keys.updated_at)
                .key(&shared.keys.stored_at)
                .arg(update.key.as_str())
                .arg(update.updated_at.to_string())
                .arg(shared.retention_ms)
                .arg(&shared.keys.channel)
                .arg(publish)
                .invoke_async::<i64>(&mut connection)
                .await
                .map_err(|err| {
                    shared.metrics.publish.inc();
                    BackendError::NotAcknowledged(err.to_string())
                })?;
            // Stored, or an equal or newer one was, which the hub then has or gets from the
            // announcement.
            Ok(Some(Stored::now(update)))
        }
        .boxed()
    }

    fn readiness(&self) -> Readiness {
        self.shared.link.readiness()
    }

    fn describe(&self) -> String {
        format!("redis at {}", self.address)
    }

    fn reload(&self) -> BoxFuture<'_, Result<bool, ReloadError>> {
        async move {
            let Some(path) = &self.config.password_file else {
                return Ok(false);
            };
            let password = read_password(path, &self.log)?;
            let connector = {
                let current = self.connector.lock().expect("never poisoned");
                if current.password.as_deref() == Some(password.as_str()) {
                    return Ok(false);
                }
                current.with_password(&self.config, password)
            };
            // Bounded, as the reload holds systemd in "reloading" and the service's main loop.
            let connection = tokio::time::timeout(
                CONNECT_TIMEOUT + RESPONSE_TIMEOUT,
                self.connect_and_subscribe(&connector),
            )
            .await
            .map_err(|_| RedisError::ReloadTimeout {
                address: self.address.clone(),
            })??;
            *self.connector.lock().expect("never poisoned") = connector.clone();
            // The follower gone means the backend is closing: nothing left to reconnect.
            let _ = self.replacements.send(Replacement {
                connector,
                connection,
            });
            Ok(true)
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move { self.follower.stop().await }.boxed()
    }
}
