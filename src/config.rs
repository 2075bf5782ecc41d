//! Configuration, layered with figment; later layers win:
//!
//! 1. built-in defaults ([`Config::default`]);
//! 2. TOML files (`--config`, or `/etc/flagsmith-sse/config.toml` when it exists);
//! 3. `FLAGSMITH_SSE_*` environment variables, nested keys joined by `__`
//!    (`FLAGSMITH_SSE_NATS__URL`);
//! 4. the variable names of the `flagsmith/sse` images this service replaces (`NATS_URL`,
//!    `LISTEN_ADDR`, `SSE_AUTHENTICATION_TOKEN`, `MAX_STREAM_AGE`, `STREAM_DELAY`, and the
//!    `REDIS_*` and cache variables of the Redis-based 3.x and 4.0).
//!
//! `REDIS_HOST` also brings the Redis-based image's port, 8000, as a default that every layer
//! above the built-in defaults overrides.
//!
//! Unknown keys and bad values stop start-up with a message naming the key and where it came
//! from; [`Config::validate`] adds the checks serde cannot express.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Read when no `--config` is given and the file exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/flagsmith-sse/config.toml";
/// Prefix of this service's own environment variables.
pub const ENV_PREFIX: &str = "FLAGSMITH_SSE_";
/// Where the Redis-based `flagsmith/sse` image listened.
pub const LEGACY_REDIS_LISTEN: &str = "0.0.0.0:8000";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the public listener: streams, health, and publishes unless `publish_listen`
    /// is set. Default `0.0.0.0:8088`; `:8088` means all IPv4 interfaces. Legacy variable:
    /// `LISTEN_ADDR`.
    pub listen: ListenAddr,
    /// TLS on the public listener. Default none: plaintext, serving HTTP/1.1 and HTTP/2 with
    /// prior knowledge (h2c) on the same port.
    pub tls: Option<TlsConfig>,
    /// Address of a second listener that serves only `queue-change` (and health), so that
    /// publishing can stay on an internal address. When set, the public listener no longer
    /// serves `queue-change`. Default none.
    pub publish_listen: Option<ListenAddr>,
    /// TLS on the publish listener. Default none.
    pub publish_tls: Option<TlsConfig>,
    /// Token Flagsmith's task processor sends as `Authorization: Token <token>`. Prefer
    /// `authentication_token_file`. Legacy variable: `SSE_AUTHENTICATION_TOKEN`.
    pub authentication_token: Option<Secret>,
    /// File holding the token (a trailing newline is ignored); re-read on SIGHUP, so tokens
    /// rotate without a restart. Works with systemd credentials (`$CREDENTIALS_DIRECTORY`).
    pub authentication_token_file: Option<PathBuf>,
    /// Where updates are stored and shared: `memory` (one instance, the default), `nats` or
    /// `redis`. Setting `NATS_URL` selects `nats`; setting `REDIS_HOST` selects `redis`.
    pub backend: BackendKind,
    /// Seconds after which a stream ends cleanly so the client reconnects. Default 30; `0`
    /// keeps streams open forever. Legacy variable: `MAX_STREAM_AGE` (negative = endless).
    pub max_stream_age: Seconds,
    /// Fraction of `max_stream_age` by which a stream may end earlier, chosen at random per
    /// stream so that a fleet's clients do not reconnect in waves. Default 0.1.
    pub max_stream_age_jitter: f64,
    /// Seconds without a write after which a stream gets a `: ping` comment. Default 15.
    pub keepalive_interval: Seconds,
    /// Seconds a write may wait for a client that reads nothing before its connection is
    /// closed. Default 30.
    pub write_timeout: Seconds,
    /// Seconds an update stays known, to be sent first to new subscribers. Default 3600; also
    /// the NATS stream's `max_age`.
    pub retention: Seconds,
    /// Most concurrent streams; beyond it, new streams get `503` with `Retry-After`.
    /// Default 200000.
    pub max_streams: usize,
    /// Seconds a `queue-change` may wait for the backend before answering `503`. Default 1.5;
    /// must stay below Flagsmith's 2 s client timeout.
    pub publish_timeout: Seconds,
    pub http2: Http2Config,
    pub nats: NatsConfig,
    pub redis: RedisConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ListenAddr(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::UNSPECIFIED,
                8088,
            ))),
            tls: None,
            publish_listen: None,
            publish_tls: None,
            authentication_token: None,
            authentication_token_file: None,
            backend: BackendKind::Memory,
            max_stream_age: Seconds(30.0),
            max_stream_age_jitter: 0.1,
            keepalive_interval: Seconds(15.0),
            write_timeout: Seconds(30.0),
            retention: Seconds(3600.0),
            max_streams: 200_000,
            publish_timeout: Seconds(1.5),
            http2: Http2Config::default(),
            nats: NatsConfig::default(),
            redis: RedisConfig::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// A certificate and its key, as PEM files. Both are re-read on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first (a `fullchain.pem`).
    pub certificate_file: PathBuf,
    /// The private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Config {
    /// Streams one HTTP/2 connection may carry at once. Default 1000: a browser with many tabs
    /// open, or a proxy multiplexing many clients onto one connection.
    pub max_concurrent_streams: u32,
    /// Seconds without hearing from the peer after which the service sends an HTTP/2 PING.
    /// Default 20.
    pub keepalive_interval: Seconds,
    /// Seconds to wait for the PING's answer before closing the connection as dead.
    /// Default 20.
    pub keepalive_timeout: Seconds,
}

impl Default for Http2Config {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 1000,
            keepalive_interval: Seconds(20.0),
            keepalive_timeout: Seconds(20.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Memory,
    Nats,
    Redis,
}

impl BackendKind {
    /// The name used in the configuration, and in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Memory => "memory",
            BackendKind::Nats => "nats",
            BackendKind::Redis => "redis",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas. Default `nats://127.0.0.1:4222`.
    /// Legacy variable: `NATS_URL`.
    pub url: String,
    /// JetStream stream holding the updates. Default `environments-stream`, the name
    /// Flagsmith's own service uses, so both can share a NATS during a migration.
    pub stream: String,
    /// `file` (default) or `memory`.
    pub storage: NatsStorage,
    /// Stream replicas: 1 (default) on a single server, 3 on a cluster.
    pub replicas: usize,
    /// NATS credentials (`.creds`) file, for servers that require authentication.
    pub credentials_file: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            stream: "environments-stream".to_owned(),
            storage: NatsStorage::File,
            replicas: 1,
            credentials_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsStorage {
    File,
    Memory,
}

/// A Redis or Valkey server, or a cluster, shared by every instance. The legacy variable of
/// each key is the one the Redis-based `flagsmith/sse` 3.x and 4.0 read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Host name or address; with `cluster`, any node of the cluster (or its configuration
    /// endpoint). Default `localhost`. Legacy variable: `REDIS_HOST`, which also selects the
    /// `redis` backend.
    pub host: String,
    /// Default 6379. Legacy variable: `REDIS_PORT`.
    pub port: u16,
    /// ACL user. Default none (the `default` user). Legacy variable: `REDIS_USERNAME`.
    pub username: Option<String>,
    /// Prefer `password_file`. Legacy variable: `REDIS_PASSWORD`.
    pub password: Option<Secret>,
    /// File holding the password (a trailing newline is ignored). Works with systemd
    /// credentials.
    pub password_file: Option<PathBuf>,
    /// Connect with TLS, verifying the server's certificate. Default false. Legacy variable:
    /// `REDIS_USE_SSL`.
    pub tls: bool,
    /// PEM file of the certificate authorities to trust instead of the system's, for a
    /// server with a private CA.
    pub tls_ca_file: Option<PathBuf>,
    /// Connect to a Redis Cluster: updates go through sharded pub/sub. Default false. Legacy
    /// variable: `USE_CLUSTER_MODE`.
    pub cluster: bool,
    /// Environments read per request when reloading every update. Default 500. Legacy
    /// variable: `REDIS_SCAN_COUNT`.
    pub scan_count: u32,
    /// Seconds between full reloads of every update. Updates are pushed as they are stored,
    /// and reloaded whenever the connection comes back; this periodic reload is a safety net.
    /// Default 30. Legacy variable: `CACHE_UPDATE_INTERVAL_SECONDS` (the old polling
    /// interval).
    pub resync_interval: Seconds,
    /// Prefix of the keys and channel, so that several deployments can share one Redis.
    /// Default `flagsmith-sse`.
    pub namespace: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            host: "localhost".to_owned(),
            port: 6379,
            username: None,
            password: None,
            password_file: None,
            tls: false,
            tls_ca_file: None,
            cluster: false,
            scan_count: 500,
            resync_interval: Seconds(30.0),
            namespace: "flagsmith-sse".to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Seconds over which open streams are ended after SIGTERM, each at a random moment, so
    /// that clients reconnect to other instances gradually. Default 10.
    pub drain_period: Seconds,
    /// Seconds after SIGTERM when the process exits even if connections remain. Default 20;
    /// at least `drain_period`.
    pub timeout: Seconds,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_period: Seconds(10.0),
            timeout: Seconds(20.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `auto` (default: terminal when stderr is a terminal, JSON otherwise), `json` or
    /// `terminal`.
    pub format: LogFormat,
    /// `critical`, `error`, `warning`, `info` (default), `debug` or `trace`.
    pub level: LogLevel,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: LogLevel::Info,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Terminal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Critical,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for slog::Level {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Critical => slog::Level::Critical,
            LogLevel::Error => slog::Level::Error,
            LogLevel::Warning => slog::Level::Warning,
            LogLevel::Info => slog::Level::Info,
            LogLevel::Debug => slog::Level::Debug,
            LogLevel::Trace => slog::Level::Trace,
        }
    }
}

/// A non-negative, finite number of seconds; integers and fractions are both accepted.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Seconds(f64);

impl Seconds {
    pub fn new(seconds: f64) -> Option<Self> {
        (seconds.is_finite() && seconds >= 0.0).then_some(Self(seconds))
    }

    pub fn duration(self) -> Duration {
        Duration::from_secs_f64(self.0)
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0.0
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecondsVisitor;

        impl serde::de::Visitor<'_> for SecondsVisitor {
            type Value = Seconds;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative number of seconds")
            }

            fn visit_f64<E: serde::de::Error>(self, seconds: f64) -> Result<Seconds, E> {
                Seconds::new(seconds)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Float(seconds), &self))
            }

            fn visit_i64<E: serde::de::Error>(self, seconds: i64) -> Result<Seconds, E> {
                self.visit_f64(seconds as f64)
            }

            fn visit_u64<E: serde::de::Error>(self, seconds: u64) -> Result<Seconds, E> {
                self.visit_f64(seconds as f64)
            }
        }

        deserializer.deserialize_any(SecondsVisitor)
    }
}

/// A listen address: `host:port`, `[v6]:port`, or `:port` for all IPv4 interfaces (the form
/// the replaced image's `LISTEN_ADDR` used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl std::str::FromStr for ListenAddr {
    type Err = std::net::AddrParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.strip_prefix(':') {
            Some(port) => format!("0.0.0.0:{port}").parse().map(ListenAddr),
            None => text.parse().map(ListenAddr),
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|_| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Str(&text),
                &"an address like 0.0.0.0:8088, [::]:8088 or :8088",
            )
        })
    }
}

/// A secret string: never printed, serialized as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Environment values that look like numbers arrive as numbers; a token is still text.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Unsigned(u64),
            Signed(i64),
        }
        Ok(Secret(match Raw::deserialize(deserializer)? {
            Raw::Text(text) => text,
            Raw::Unsigned(number) => number.to_string(),
            Raw::Signed(number) => number.to_string(),
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("{}", list_errors(.0))]
    Figment(Box<figment::Error>),
    #[error("invalid `{key}` (from {source_name}): {message}")]
    Invalid {
        key: &'static str,
        source_name: String,
        message: String,
    },
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        Self::Figment(Box::new(error))
    }
}

/// figment collects every error it meets; show them all, one per line.
fn list_errors(error: &figment::Error) -> String {
    error
        .clone()
        .into_iter()
        .map(|error| error.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads every layer. `files` are the `--config` paths; empty means the default path if
    /// it exists.
    pub fn load(files: &[PathBuf]) -> Result<Self, ConfigError> {
        let figment = Self::figment(files)?;
        let config: Config = figment.extract()?;
        config.validate(&figment)?;
        Ok(config)
    }

    pub fn figment(files: &[PathBuf]) -> Result<Figment, ConfigError> {
        let mut figment =
            Figment::from(Serialized::defaults(Config::default())).merge(RedisImageDefaults);
        if files.is_empty() {
            if Path::new(DEFAULT_CONFIG_PATH).exists() {
                figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_PATH));
            }
        } else {
            for file in files {
                if !file.exists() {
                    return Err(ConfigError::MissingFile(file.clone()));
                }
                figment = figment.merge(Toml::file_exact(file));
            }
        }
        // Env parses values ("0123" becomes 123); secrets must arrive exactly as written.
        figment = figment
            .merge(
                Env::prefixed(ENV_PREFIX)
                    .split("__")
                    .ignore(&["authentication_token", "redis.password"]),
            )
            .merge(VerbatimVariable::AuthenticationToken)
            .merge(VerbatimVariable::OwnRedisPassword);
        for variable in VerbatimVariable::LEGACY {
            figment = figment.merge(variable);
        }
        Ok(figment)
    }

    /// Checks what types alone cannot; errors name the key and the layer it came from.
    pub fn validate(&self, figment: &Figment) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: &str| ConfigError::Invalid {
            key,
            source_name: origin(figment, key),
            message: message.to_owned(),
        };
        match (&self.authentication_token, &self.authentication_token_file) {
            (None, None) => {
                return Err(invalid(
                    "authentication_token_file",
                    "an authentication token is required: set authentication_token_file \
                     (or FLAGSMITH_SSE_AUTHENTICATION_TOKEN_FILE), or SSE_AUTHENTICATION_TOKEN",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "authentication_token_file",
                    &format!(
                        "set either it or authentication_token (set by {}), not both",
                        origin(figment, "authentication_token")
                    ),
                ));
            }
            (Some(token), None) if token.expose().trim().is_empty() => {
                return Err(invalid("authentication_token", "must not be empty"));
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&self.max_stream_age_jitter) {
            return Err(invalid(
                "max_stream_age_jitter",
                "must be a fraction from 0 up to (not including) 1",
            ));
        }
        if self.keepalive_interval.is_zero() {
            return Err(invalid("keepalive_interval", "must be more than 0 seconds"));
        }
        if self.write_timeout.is_zero() {
            return Err(invalid("write_timeout", "must be more than 0 seconds"));
        }
        if self.retention.is_zero() {
            return Err(invalid("retention", "must be more than 0 seconds"));
        }
        if self.publish_timeout.is_zero()
            || self.publish_timeout.duration() >= Duration::from_secs(2)
        {
            return Err(invalid(
                "publish_timeout",
                "must be more than 0 and less than 2 seconds, Flagsmith's request timeout",
            ));
        }
        if self.max_streams == 0 {
            return Err(invalid("max_streams", "must be at least 1"));
        }
        match &self.publish_listen {
            Some(publish) if publish.0 == self.listen.0 => {
                return Err(invalid(
                    "publish_listen",
                    &format!(
                        "{} is also `listen` (from {}); use another address, or unset \
                         publish_listen to publish on the public listener",
                        publish.0,
                        origin(figment, "listen")
                    ),
                ));
            }
            None if self.publish_tls.is_some() => {
                return Err(invalid(
                    "publish_tls",
                    "is set but publish_listen is not; set publish_listen, or use `tls` for \
                     the public listener",
                ));
            }
            _ => {}
        }
        if self.http2.max_concurrent_streams == 0 {
            return Err(invalid(
                "http2.max_concurrent_streams",
                "must be at least 1",
            ));
        }
        if self.http2.keepalive_interval.is_zero() {
            return Err(invalid(
                "http2.keepalive_interval",
                "must be more than 0 seconds",
            ));
        }
        if self.http2.keepalive_timeout.is_zero() {
            return Err(invalid(
                "http2.keepalive_timeout",
                "must be more than 0 seconds",
            ));
        }
        if self.shutdown.timeout < self.shutdown.drain_period {
            return Err(invalid(
                "shutdown.timeout",
                &format!(
                    "{} s must be at least shutdown.drain_period, {} s from {}",
                    self.shutdown.timeout.0,
                    self.shutdown.drain_period.0,
                    origin(figment, "shutdown.drain_period")
                ),
            ));
        }
        if self.backend == BackendKind::Nats {
            if self.nats.url.trim().is_empty() {
                return Err(invalid("nats.url", "must not be empty"));
            }
            if self.nats.stream.is_empty()
                || self
                    .nats
                    .stream
                    .chars()
                    .any(|c| !c.is_ascii_graphic() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
            {
                return Err(invalid(
                    "nats.stream",
                    "must be a JetStream stream name (no spaces, '.', '*', '>', '/')",
                ));
            }
            if !(1..=5).contains(&self.nats.replicas) {
                return Err(invalid("nats.replicas", "must be from 1 to 5"));
            }
        }
        if self.backend == BackendKind::Redis {
            self.validate_redis(figment)?;
        }
        Ok(())
    }

    fn validate_redis(&self, figment: &Figment) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: &str| ConfigError::Invalid {
            key,
            source_name: origin(figment, key),
            message: message.to_owned(),
        };
        let redis = &self.redis;
        if redis.host.trim().is_empty() {
            return Err(invalid("redis.host", "must not be empty"));
        }
        if redis.port == 0 {
            return Err(invalid("redis.port", "must be from 1 to 65535"));
        }
        if redis.password.is_some() && redis.password_file.is_some() {
            return Err(invalid(
                "redis.password_file",
                &format!(
                    "set either it or redis.password (set by {}), not both",
                    origin(figment, "redis.password")
                ),
            ));
        }
        if redis.tls_ca_file.is_some() && !redis.tls {
            return Err(invalid(
                "redis.tls_ca_file",
                "is set but redis.tls is not; set redis.tls (REDIS_USE_SSL) to connect with TLS",
            ));
        }
        if redis.scan_count == 0 {
            return Err(invalid("redis.scan_count", "must be at least 1"));
        }
        if redis.resync_interval.is_zero() {
            return Err(invalid(
                "redis.resync_interval",
                "must be more than 0 seconds",
            ));
        }
        if redis.namespace.is_empty()
            || redis
                .namespace
                .chars()
                .any(|c| !c.is_ascii_graphic() || matches!(c, '{' | '}'))
        {
            return Err(invalid(
                "redis.namespace",
                "must be printable ASCII without spaces, '{' or '}'",
            ));
        }
        Ok(())
    }

    /// The effective configuration for the start-up log: secrets redacted.
    pub fn redacted(&self) -> serde_json::Value {
        let mut shown = self.clone();
        shown.nats.url = crate::backend::nats::redact_url(&shown.nats.url);
        serde_json::to_value(shown).unwrap_or_default()
    }
}

/// The variables of the replaced `flagsmith/sse` images that the service reads, besides its
/// own `FLAGSMITH_SSE_*`.
pub fn legacy_variables() -> impl Iterator<Item = &'static str> {
    VerbatimVariable::LEGACY
        .into_iter()
        .map(VerbatimVariable::name)
}

/// Whether a secret file can be read by users other than its owner and group. Files under
/// `$CREDENTIALS_DIRECTORY` are exempt: systemd gives them to the service alone.
pub fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let in_credentials = std::env::var_os("CREDENTIALS_DIRECTORY")
        .is_some_and(|directory| path.starts_with(directory));
    !in_credentials
        && std::fs::metadata(path).is_ok_and(|metadata| metadata.permissions().mode() & 0o004 != 0)
}

/// Where `key`'s value came from, for error messages: the file, the exact environment
/// variable, or the built-in defaults.
fn origin(figment: &Figment, key: &str) -> String {
    let Some(metadata) = figment.find_metadata(key) else {
        return "built-in defaults".to_owned();
    };
    match &metadata.source {
        Some(Source::File(path)) => format!("{} {}", metadata.name, path.display()),
        Some(Source::Code(_)) => "built-in defaults".to_owned(),
        _ if metadata.name.contains(ENV_PREFIX) => format!(
            "environment variable `{ENV_PREFIX}{}`",
            key.replace('.', "__").to_ascii_uppercase()
        ),
        _ => metadata.name.to_string(),
    }
}

/// An environment variable read verbatim into one key: the variables of the replaced
/// `flagsmith/sse` images, and our own token variable. Each is its own provider so that
/// errors name the exact variable.
#[derive(Debug, Clone, Copy)]
enum VerbatimVariable {
    AuthenticationToken,
    OwnRedisPassword,
    NatsUrl,
    ListenAddr,
    LegacyAuthenticationToken,
    MaxStreamAge,
    StreamDelay,
    RedisHost,
    RedisPort,
    RedisUsername,
    RedisPassword,
    RedisUseSsl,
    UseClusterMode,
    RedisScanCount,
    CacheUpdateIntervalSeconds,
}

impl VerbatimVariable {
    /// The replaced images' variables; they override everything else.
    const LEGACY: [VerbatimVariable; 13] = [
        Self::NatsUrl,
        Self::ListenAddr,
        Self::LegacyAuthenticationToken,
        Self::MaxStreamAge,
        Self::StreamDelay,
        Self::RedisHost,
        Self::RedisPort,
        Self::RedisUsername,
        Self::RedisPassword,
        Self::RedisUseSsl,
        Self::UseClusterMode,
        Self::RedisScanCount,
        Self::CacheUpdateIntervalSeconds,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::AuthenticationToken => "FLAGSMITH_SSE_AUTHENTICATION_TOKEN",
            Self::OwnRedisPassword => "FLAGSMITH_SSE_REDIS__PASSWORD",
            Self::NatsUrl => "NATS_URL",
            Self::ListenAddr => "LISTEN_ADDR",
            Self::LegacyAuthenticationToken => "SSE_AUTHENTICATION_TOKEN",
            Self::MaxStreamAge => "MAX_STREAM_AGE",
            Self::StreamDelay => "STREAM_DELAY",
            Self::RedisHost => "REDIS_HOST",
            Self::RedisPort => "REDIS_PORT",
            Self::RedisUsername => "REDIS_USERNAME",
            Self::RedisPassword => "REDIS_PASSWORD",
            Self::RedisUseSsl => "REDIS_USE_SSL",
            Self::UseClusterMode => "USE_CLUSTER_MODE",
            Self::RedisScanCount => "REDIS_SCAN_COUNT",
            Self::CacheUpdateIntervalSeconds => "CACHE_UPDATE_INTERVAL_SECONDS",
        }
    }
}

impl Provider for VerbatimVariable {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variable `{}`", self.name()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let Ok(value) = std::env::var(self.name()) else {
            return Ok(Map::new());
        };
        let mut dict = Dict::new();
        let redis = |key: &str, value: Value| {
            let mut redis = Dict::new();
            redis.insert(key.into(), value);
            ("redis".to_owned(), Value::from(redis))
        };
        match self {
            Self::NatsUrl => {
                // As in the replaced image, naming a NATS server is what selects NATS.
                dict.insert("backend".into(), Value::from("nats"));
                let mut nats = Dict::new();
                nats.insert("url".into(), Value::from(value));
                dict.insert("nats".into(), Value::from(nats));
            }
            Self::ListenAddr => {
                dict.insert("listen".into(), Value::from(value));
            }
            Self::AuthenticationToken | Self::LegacyAuthenticationToken => {
                dict.insert("authentication_token".into(), Value::from(value));
            }
            Self::MaxStreamAge => {
                let age = match value.trim().parse::<f64>() {
                    Ok(age) if age < 0.0 => Value::from(0.0),
                    Ok(age) => Value::from(age),
                    // Left as text, the type check reports it with this variable's name.
                    Err(_) => Value::from(value),
                };
                dict.insert("max_stream_age".into(), age);
            }
            // Pushing needs no polling delay; accepted so existing deployments start unchanged.
            Self::StreamDelay => {}
            Self::RedisHost => {
                if std::env::var_os(Self::NatsUrl.name()).is_some() {
                    return Err(figment::Error::from(
                        "NATS_URL and REDIS_HOST are both set, and each selects its backend; \
                         unset one of them"
                            .to_owned(),
                    ));
                }
                // As in the Redis-based image, naming a Redis server is what selects Redis.
                dict.insert("backend".into(), Value::from("redis"));
                dict.extend([redis("host", Value::from(value))]);
            }
            Self::RedisUsername => dict.extend([redis("username", Value::from(value))]),
            Self::RedisPassword | Self::OwnRedisPassword => {
                dict.extend([redis("password", Value::from(value))]);
            }
            Self::RedisPort => dict.extend([redis("port", number(value))]),
            Self::RedisScanCount => dict.extend([redis("scan_count", number(value))]),
            Self::CacheUpdateIntervalSeconds => {
                dict.extend([redis("resync_interval", number(value))]);
            }
            Self::RedisUseSsl => dict.extend([redis("tls", boolean(value))]),
            Self::UseClusterMode => dict.extend([redis("cluster", boolean(value))]),
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// A number as the variable holds it; anything else stays text, which the type check reports
/// with the variable's name.
fn number(text: String) -> Value {
    let trimmed = text.trim();
    if let Ok(integer) = trimmed.parse::<u64>() {
        Value::from(integer)
    } else if let Ok(float) = trimmed.parse::<f64>() {
        Value::from(float)
    } else {
        Value::from(text)
    }
}

/// A boolean the way the Python images read theirs (`True`, `false`, `1`, ...); anything else
/// stays text, which the type check reports with the variable's name.
fn boolean(text: String) -> Value {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Value::from(true),
        "false" | "0" | "no" | "off" | "" => Value::from(false),
        _ => Value::from(text),
    }
}

/// The Redis-based image listened on port 8000, and the Flagsmith API and SDKs of its
/// deployments point there: when `REDIS_HOST` stands in for that image, 8000 is the default
/// listen port. Merged just above the built-in defaults, so any configured `listen` wins.
struct RedisImageDefaults;

impl Provider for RedisImageDefaults {
    fn metadata(&self) -> Metadata {
        Metadata::named("the Redis-based image's defaults (REDIS_HOST is set)")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        if std::env::var_os(VerbatimVariable::RedisHost.name()).is_none() {
            return Ok(Map::new());
        }
        let mut dict = Dict::new();
        dict.insert("listen".into(), Value::from(LEGACY_REDIS_LISTEN));
        Ok(Profile::Default.collect(dict))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_readable_secret_files_are_noticed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "t").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(readable_by_others(&path));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(!readable_by_others(&path));
    }
}
