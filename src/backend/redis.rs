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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::{BoxFuture, FutureExt};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, PushKind,
    RedisConnectionInfo, RedisFuture, RedisResult, TlsCertificates, Value,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use slog::{Logger, debug, info, warn};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Backend, BackendError, ReloadError};
use crate::config::RedisConfig;
use crate::domain::{EnvironmentKey, Update, UpdatedAt};
use crate::hub::Hub;
use crate::metrics::{BackendMetrics, RedisMetrics};
use crate::secret;

/// Stores an update if it is newer than the stored one, and announces it.
///
/// KEYS: the hash of `updated_at`s, the sorted set of stored-at times.
/// ARGV: environment key, `updated_at`, retention in ms, channel, `PUBLISH` or `SPUBLISH`.
/// Returns 1 if stored, 0 if the stored update is as new or newer.
///
/// Redis's clock stamps the update, so every instance ages it alike. Before Redis 7 a script
/// that reads the clock may only write if it replicates its effects, hence
/// `replicate_commands` (a no-op since 7). Timestamps are compared as numbers: each is the
/// shortest decimal that round-trips its f64, and Lua's numbers are the same doubles.
pub const STORE_SCRIPT: &str = r"
redis.replicate_commands()
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - tonumber(ARGV[3])), 'LIMIT', 0, 1000)
if #expired > 0 then
  redis.call('ZREM', KEYS[2], unpack(expired))
  redis.call('HDEL', KEYS[1], unpack(expired))
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and tonumber(current) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call(ARGV[5], ARGV[4], 'u ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. string.format('%d', now))
return 1
";

/// Between probes while the subscription works; a silently dead connection is noticed within
/// this plus [`PROBE_TIMEOUT`].
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a probe may take to come back before the connection counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Between probes while down: how soon a recovered Redis is noticed.
const RECOVERY_PROBE_INTERVAL: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Every command but the subscription's reads; publishes are bounded by `publish_timeout`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

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

/// The names this deployment uses in Redis.
#[derive(Debug, Clone)]
pub struct Keys {
    /// Hash: environment key → newest `updated_at`.
    pub updated_at: String,
    /// Sorted set: environment key → when it was stored (ms since the epoch).
    pub stored_at: String,
    /// Where stored updates are announced.
    pub channel: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        // The hash tag puts all three in one slot: one node of a cluster owns them, and the
        // store script may touch both keys and publish on the shard channel.
        Self {
            updated_at: format!("{{{namespace}}}:updated-at"),
            stored_at: format!("{{{namespace}}}:stored-at"),
            channel: format!("{{{namespace}}}:updates"),
        }
    }
}

/// A connection to one server, or to a cluster; both reconnect by themselves and renew the
/// subscription after reconnecting.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Connection::Single(connection) => connection.subscribe(channel).await,
            Connection::Cluster(connection) => connection.ssubscribe(channel).await,
        }
    }

    /// The publish command that reaches this connection's subscribers.
    fn publish_command(&self) -> &'static str {
        match self {
            Connection::Single(_) => "PUBLISH",
            Connection::Cluster(_) => "SPUBLISH",
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// What the backend and its follower task share.
struct Shared {
    connection: watch::Receiver<Option<Connection>>,
    /// True while the last probe came back.
    connected: AtomicBool,
    /// True once connected and reloaded, until the connection is lost.
    ready: watch::Sender<bool>,
    hub: Arc<Hub>,
    keys: Keys,
    script: redis::Script,
    retention_ms: u64,
    backend_metrics: BackendMetrics,
    metrics: RedisMetrics,
}

pub struct RedisBackend {
    shared: Arc<Shared>,
    stop: CancellationToken,
    follower: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
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
            connected: AtomicBool::new(false),
            ready: watch::channel(false).0,
            hub: hub.clone(),
            script: redis::Script::new(STORE_SCRIPT),
            retention_ms: u64::try_from(hub.retention().as_millis()).unwrap_or(u64::MAX),
            keys,
            backend_metrics,
            metrics,
        });
        let stop = CancellationToken::new();
        let follower = Follower {
            shared: shared.clone(),
            connector: connector.clone(),
            connection: connection_tx,
            pushes,
            replacements,
            instance: rand::random(),
            scan_count: config.scan_count,
            resync_interval: config.resync_interval.duration(),
            ever_connected: false,
            failure_logged: false,
            log: log.clone(),
        };
        let task = tokio::spawn(follower.run(stop.clone()));
        Ok(Self {
            shared,
            stop,
            follower: tokio::sync::Mutex::new(Some(task)),
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

impl Backend for RedisBackend {
    fn publish(&self, update: Update) -> BoxFuture<'_, Result<(), BackendError>> {
        async move {
            let shared = &self.shared;
            let connection = shared.connection.borrow().clone();
            let Some(mut connection) =
                connection.filter(|_| shared.connected.load(Ordering::Acquire))
            else {
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
            // Stored (or an equal or newer one was): local subscribers need not wait for the
            // announcement, which changes nothing when it arrives.
            shared.hub.apply(&update, SystemTime::now());
            Ok(())
        }
        .boxed()
    }

    fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    fn ready(&self) -> BoxFuture<'_, ()> {
        let mut ready = self.shared.ready.subscribe();
        async move {
            // The sender lives as long as the backend.
            let _ = ready.wait_for(|ready| *ready).await;
        }
        .boxed()
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
        async move {
            self.stop.cancel();
            if let Some(task) = self.follower.lock().await.take() {
                let _ = task.await;
            }
        }
        .boxed()
    }
}

fn node_info(config: &RedisConfig, password: Option<&str>) -> redis::ConnectionInfo {
    let addr = if config.tls {
        ConnectionAddr::TcpTls {
            host: config.host.clone(),
            port: config.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(config.host.clone(), config.port)
    };
    let mut redis = RedisConnectionInfo::default()
        .set_protocol(ProtocolVersion::RESP3)
        .set_lib_name("flagsmith-sse", env!("CARGO_PKG_VERSION"));
    if let Some(username) = &config.username {
        redis = redis.set_username(username);
    }
    if let Some(password) = password {
        redis = redis.set_password(password);
    }
    addr.into_connection_info()
        .expect("an address is always connection info")
        .set_redis_settings(redis)
}

fn read_password(path: &Path, log: &Logger) -> Result<String, RedisError> {
    secret::read(path, "redis password", log).map_err(|source| RedisError::PasswordFile {
        path: path.to_path_buf(),
        source,
    })
}

fn read_ca_file(path: &PathBuf) -> Result<TlsCertificates, RedisError> {
    let invalid = |reason: String| RedisError::CaFile {
        path: path.clone(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|err| invalid(err.to_string()))?;
    let count = CertificateDer::pem_slice_iter(&pem)
        .map(|certificate| certificate.map_err(|err| invalid(err.to_string())))
        .collect::<Result<Vec<_>, _>>()?
        .len();
    if count == 0 {
        return Err(invalid("no PEM certificate in it".to_owned()));
    }
    Ok(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    })
}

/// Makes connections, with the pushes of every one sent to the follower.
#[derive(Clone)]
struct Connector {
    node: redis::ConnectionInfo,
    username: Option<String>,
    password: Option<String>,
    certificates: Option<TlsCertificates>,
    pushes: mpsc::UnboundedSender<PushInfo>,
    address: String,
}

impl Connector {
    fn client_error(&self, source: redis::RedisError) -> RedisError {
        RedisError::Client {
            address: self.address.clone(),
            source,
        }
    }

    /// This connector with `password` instead of its own.
    fn with_password(&self, config: &RedisConfig, password: String) -> Self {
        Self {
            node: node_info(config, Some(&password)),
            password: Some(password),
            ..self.clone()
        }
    }

    fn client(&self) -> Result<redis::Client, RedisError> {
        match &self.certificates {
            Some(certificates) => {
                redis::Client::build_with_tls(self.node.clone(), certificates.clone())
            }
            None => redis::Client::open(self.node.clone()),
        }
        .map_err(|err| self.client_error(err))
    }

    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_push_sender(self.pushes.clone())
            .set_automatic_resubscription()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1))
    }

    /// One server's connection, made lazily: it never fails to be made.
    fn single(&self) -> Result<Connection, RedisError> {
        ConnectionManager::new_lazy_with_config(self.client()?, self.manager_config())
            .map(Connection::Single)
            .map_err(|err| self.client_error(err))
    }

    async fn cluster(&self) -> RedisResult<Connection> {
        let mut builder = ClusterClientBuilder::new([self.node.clone()])
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(self.pushes.clone())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(2);
        if let Some(username) = &self.username {
            builder = builder.username(username);
        }
        if let Some(password) = &self.password {
            builder = builder.password(password);
        }
        if let Some(certificates) = &self.certificates {
            builder = builder.certs(certificates.clone());
        }
        let client = builder.build()?;
        Ok(Connection::Cluster(client.get_async_connection().await?))
    }
}

/// A probe sent on the channel and not yet heard back.
struct Probe {
    nonce: u64,
    sent: tokio::time::Instant,
}

/// Owns the connection's life: subscribes, proves the subscription, reloads, and applies
/// what the channel brings.
struct Follower {
    shared: Arc<Shared>,
    connector: Connector,
    connection: watch::Sender<Option<Connection>>,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    replacements: mpsc::UnboundedReceiver<Replacement>,
    /// Tells this instance's probes from other instances'.
    instance: u64,
    scan_count: u32,
    resync_interval: Duration,
    ever_connected: bool,
    /// Set once a failure was logged at warning since the last change of state: while Redis
    /// is down every probe fails.
    failure_logged: bool,
    log: Logger,
}

impl Follower {
    async fn run(mut self, stop: CancellationToken) {
        let mut subscribed = false;
        let mut probe: Option<Probe> = None;
        let mut nonce = 0_u64;
        let mut next_probe = tokio::time::Instant::now();
        let mut next_resync = tokio::time::Instant::now() + self.resync_interval;
        loop {
            let deadline = match &probe {
                Some(probe) => probe.sent + self.probe_timeout(),
                None => next_probe,
            };
            let push = tokio::select! {
                () = stop.cancelled() => return,
                Some(replacement) = self.replacements.recv() => {
                    // Already subscribed; the old connection's subscription ends as it drops.
                    self.connector = replacement.connector;
                    self.connection.send_replace(Some(replacement.connection));
                    subscribed = true;
                    continue;
                }
                push = self.pushes.recv() => push,
                () = tokio::time::sleep_until(deadline) => None,
                () = tokio::time::sleep_until(next_resync), if self.is_connected() => {
                    next_resync = tokio::time::Instant::now() + self.resync_interval;
                    if let Err(err) = self.resync().await {
                        self.shared.metrics.resync.inc();
                        self.lost(&format!("reload failed: {err}"));
                    }
                    continue;
                }
            };
            match push {
                Some(push) => {
                    if self.on_push(push, &mut probe) {
                        // The probe came back: the subscription works.
                        next_probe = tokio::time::Instant::now() + PROBE_INTERVAL;
                        if !self.is_connected() {
                            self.found().await;
                            next_resync = tokio::time::Instant::now() + self.resync_interval;
                        }
                    } else if !self.is_connected() {
                        // Lost just now, perhaps: look for the way back at the recovery pace.
                        next_probe =
                            next_probe.min(tokio::time::Instant::now() + RECOVERY_PROBE_INTERVAL);
                    }
                }
                None => {
                    if let Some(unanswered) = probe.take() {
                        debug!(self.log, "probe unanswered"; "nonce" => unanswered.nonce);
                        self.shared.metrics.probe.inc();
                        self.lost("a probe on the channel did not come back");
                        next_probe = tokio::time::Instant::now();
                        continue;
                    }
                    nonce += 1;
                    next_probe = tokio::time::Instant::now() + self.probe_interval();
                    match self.send_probe(&mut subscribed, nonce).await {
                        Ok(()) => {
                            probe = Some(Probe {
                                nonce,
                                sent: tokio::time::Instant::now(),
                            });
                        }
                        Err(err) => self.lost(&err),
                    }
                }
            }
        }
    }

    fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    fn probe_interval(&self) -> Duration {
        if self.is_connected() {
            PROBE_INTERVAL
        } else {
            RECOVERY_PROBE_INTERVAL
        }
    }

    fn probe_timeout(&self) -> Duration {
        if self.is_connected() {
            PROBE_TIMEOUT
        } else {
            // While down, a probe that is not back soon is retried rather than waited for.
            PROBE_TIMEOUT.min(RECOVERY_PROBE_INTERVAL * 4)
        }
    }

    /// Makes the connection if there is none yet, subscribes if not yet subscribed, and
    /// publishes a probe.
    async fn send_probe(&mut self, subscribed: &mut bool, nonce: u64) -> Result<(), String> {
        let existing = self.connection.borrow().clone();
        let mut connection = match existing {
            Some(connection) => connection,
            None => match self.connector.cluster().await {
                Ok(connection) => {
                    self.connection.send_replace(Some(connection.clone()));
                    connection
                }
                Err(err) => {
                    self.shared.metrics.connect.inc();
                    return Err(format!("cannot connect to the cluster: {err}"));
                }
            },
        };
        if !*subscribed {
            connection
                .subscribe(&self.shared.keys.channel)
                .await
                .map_err(|err| {
                    self.shared.metrics.subscribe.inc();
                    format!("cannot subscribe: {err}")
                })?;
            *subscribed = true;
        }
        let receivers: i64 = redis::cmd(connection.publish_command())
            .arg(&self.shared.keys.channel)
            .arg(format!("p {:x} {nonce}", self.instance))
            .query_async(&mut connection)
            .await
            .map_err(|err| {
                self.shared.metrics.connect.inc();
                format!("cannot publish a probe: {err}")
            })?;
        if receivers == 0 {
            // Nobody heard it, not even this instance: the subscription did not survive a
            // reconnection. Subscribe again next time.
            *subscribed = false;
        }
        Ok(())
    }

    /// Handles one push; true if it was this instance's outstanding probe.
    fn on_push(&mut self, push: PushInfo, probe: &mut Option<Probe>) -> bool {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let Some(Value::BulkString(payload)) = push.data.get(1) else {
                    self.malformed("a message without a payload");
                    return false;
                };
                match Announcement::parse(payload) {
                    Ok(Announcement::Update(update, stored_at)) => {
                        if self.shared.hub.apply(&update, stored_at) {
                            debug!(self.log, "update"; "env" => %update.key, "updated_at" => %update.updated_at);
                        }
                        false
                    }
                    Ok(Announcement::Probe { instance, nonce }) => {
                        let ours = instance == self.instance
                            && probe.as_ref().is_some_and(|probe| probe.nonce == nonce);
                        if ours {
                            *probe = None;
                        }
                        ours
                    }
                    Err(reason) => {
                        self.malformed(reason);
                        false
                    }
                }
            }
            PushKind::Disconnection => {
                self.shared.metrics.connect.inc();
                self.lost("the connection closed");
                *probe = None;
                false
            }
            // The cluster moved the channel's slot; the client subscribes on its new owner,
            // and the next probe tells when that is done.
            PushKind::SUnsubscribe => {
                self.lost("the cluster moved the channel");
                false
            }
            _ => false,
        }
    }

    fn malformed(&self, reason: &str) {
        self.shared.metrics.read.inc();
        warn!(self.log, "ignoring a malformed message"; "channel" => &self.shared.keys.channel, "reason" => reason);
    }

    /// The subscription works again: connected, then ready once reloaded.
    async fn found(&mut self) {
        self.shared.connected.store(true, Ordering::Release);
        self.shared.backend_metrics.connected.set(1);
        if std::mem::replace(&mut self.ever_connected, true) {
            self.shared.backend_metrics.reconnects.inc();
        }
        self.failure_logged = false;
        info!(self.log, "backend state"; "state" => "connected");
        match self.resync().await {
            Ok(()) => {
                self.shared.ready.send_replace(true);
                info!(self.log, "backend state"; "state" => "ready");
            }
            Err(err) => {
                self.shared.metrics.resync.inc();
                self.lost(&format!("reload failed: {err}"));
            }
        }
    }

    /// The connection is down, or not proven to work: neither connected nor ready.
    fn lost(&mut self, reason: &str) {
        let was_connected = self.shared.connected.swap(false, Ordering::AcqRel);
        self.shared.backend_metrics.connected.set(0);
        self.shared.ready.send_replace(false);
        if was_connected {
            self.failure_logged = false;
            info!(self.log, "backend state"; "state" => "disconnected", "reason" => reason);
        } else if std::mem::replace(&mut self.failure_logged, true) {
            debug!(self.log, "redis unavailable"; "reason" => reason);
        } else {
            warn!(self.log, "redis unavailable, retrying"; "reason" => reason);
        }
    }

    /// Reads every stored update into the hub, `scan_count` environments per request.
    async fn resync(&mut self) -> RedisResult<()> {
        let Some(mut connection) = self.connection.borrow().clone() else {
            return Ok(());
        };
        let keys = &self.shared.keys;
        let now = SystemTime::now();
        let mut cursor = 0_u64;
        let mut loaded = 0_usize;
        loop {
            let (next, page): (u64, Vec<(String, f64)>) = redis::cmd("ZSCAN")
                .arg(&keys.stored_at)
                .arg(cursor)
                .arg("COUNT")
                .arg(self.scan_count)
                .query_async(&mut connection)
                .await?;
            if !page.is_empty() {
                let values: Vec<Option<String>> = redis::cmd("HMGET")
                    .arg(&keys.updated_at)
                    .arg(page.iter().map(|(key, _)| key.as_str()).collect::<Vec<_>>())
                    .query_async(&mut connection)
                    .await?;
                for ((key, stored_ms), value) in page.into_iter().zip(values) {
                    // Removed since the scan read it: expired, nothing to load.
                    let Some(value) = value else { continue };
                    match stored_update(&key, &value, stored_ms) {
                        Ok((update, stored_at)) => {
                            if !self.shared.hub.is_expired(stored_at, now) {
                                loaded += 1;
                                self.shared.hub.apply(&update, stored_at);
                            }
                        }
                        Err(reason) => {
                            self.shared.metrics.read.inc();
                            warn!(self.log, "ignoring a malformed stored update"; "env" => key, "reason" => reason);
                        }
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        self.shared.metrics.resyncs.inc();
        self.shared
            .metrics
            .resync_environments
            .set(i64::try_from(loaded).unwrap_or(i64::MAX));
        debug!(self.log, "reloaded"; "environments" => loaded);
        Ok(())
    }
}

/// What the channel carries.
#[derive(Debug, PartialEq)]
enum Announcement {
    /// `u <key> <updated_at> <stored-at ms>`, from [`STORE_SCRIPT`].
    Update(Update, SystemTime),
    /// `p <instance, hex> <nonce>`, an instance checking its subscription.
    Probe { instance: u64, nonce: u64 },
}

impl Announcement {
    fn parse(payload: &[u8]) -> Result<Self, &'static str> {
        let text = std::str::from_utf8(payload).map_err(|_| "not UTF-8")?;
        let mut fields = text.split(' ');
        match (fields.next(), fields.next(), fields.next(), fields.next()) {
            (Some("u"), Some(key), Some(updated_at), Some(stored_ms)) => {
                let stored_ms = stored_ms.parse::<f64>().map_err(|_| "bad stored-at time")?;
                stored_update(key, updated_at, stored_ms)
                    .map(|(update, stored_at)| Self::Update(update, stored_at))
            }
            (Some("p"), Some(instance), Some(nonce), None) => Ok(Self::Probe {
                instance: u64::from_str_radix(instance, 16).map_err(|_| "bad probe")?,
                nonce: nonce.parse().map_err(|_| "bad probe")?,
            }),
            _ => Err("neither an update nor a probe"),
        }
    }
}

fn stored_update(
    key: &str,
    updated_at: &str,
    stored_ms: f64,
) -> Result<(Update, SystemTime), &'static str> {
    let key = EnvironmentKey::parse(key).map_err(|_| "bad environment key")?;
    let updated_at = updated_at
        .parse::<f64>()
        .ok()
        .and_then(|seconds| UpdatedAt::from_unix_seconds(seconds).ok())
        .ok_or("bad updated_at")?;
    if !(stored_ms.is_finite() && stored_ms >= 0.0) {
        return Err("bad stored-at time");
    }
    let stored_at = UNIX_EPOCH + Duration::from_millis(stored_ms as u64);
    Ok((Update { key, updated_at }, stored_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_parsed_strictly() {
        let Ok(Announcement::Update(update, stored_at)) =
            Announcement::parse(b"u abc 1735229888.76 1735229889000")
        else {
            panic!("an update")
        };
        assert_eq!(update.key.as_str(), "abc");
        assert_eq!(update.updated_at.to_string(), "1735229888.76");
        assert_eq!(stored_at, UNIX_EPOCH + Duration::from_millis(1735229889000));
        assert_eq!(
            Announcement::parse(b"p ff 7"),
            Ok(Announcement::Probe {
                instance: 255,
                nonce: 7
            })
        );
        for bad in [
            &b"u abc 1.5"[..],
            b"u a.b 1.5 1",
            b"u abc x 1",
            b"u abc 1.5 -1",
            b"p zz 1",
            b"p ff 1 extra",
            b"",
            b"\xff",
        ] {
            assert!(Announcement::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn every_key_shares_one_hash_tag() {
        let keys = Keys::new("flagsmith-sse");
        assert_eq!(keys.updated_at, "{flagsmith-sse}:updated-at");
        assert_eq!(keys.stored_at, "{flagsmith-sse}:stored-at");
        assert_eq!(keys.channel, "{flagsmith-sse}:updates");
    }
}
