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
//!
//! # Layout
//! - this file: the schema, its defaults, and the layering;
//! - `backends`: the NATS and Redis settings;
//! - `values`: the value types (seconds, addresses, secrets);
//! - `legacy`: the variables of the replaced `flagsmith/sse` images;
//! - `validate`: the checks after extraction.

mod backends;
mod legacy;
mod validate;
mod values;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use backends::{BackendKind, NatsConfig, NatsStorage, RedisConfig};
pub use legacy::legacy_variables;
pub use values::{ListenAddr, Seconds, Secret};

use legacy::{RedisImageDefaults, VerbatimVariable};

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

    /// The effective configuration for the start-up log: secrets redacted.
    pub fn redacted(&self) -> serde_json::Value {
        let mut shown = self.clone();
        shown.nats.url = shown.nats.redacted_url();
        serde_json::to_value(shown).unwrap_or_default()
    }
}
