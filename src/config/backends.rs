//! The settings of the NATS and Redis backends.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Seconds, Secret};

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

impl NatsConfig {
    /// `url` with credentials hidden (`nats://user:secret@host` → `nats://***@host`), for
    /// logs and status lines.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}***{}", &url[..scheme_end + 3], &url[at..])
            }
            _ => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_logs() {
        assert_eq!(
            redact_url("nats://user:pw@a:4222,tls://tok@b"),
            "nats://***@a:4222,tls://***@b"
        );
        assert_eq!(redact_url("nats://a:4222"), "nats://a:4222");
    }
}
