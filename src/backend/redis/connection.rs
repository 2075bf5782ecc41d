//! Connections to one server or to a cluster, made with the deployment's secrets and
//! certificates; each sends its pushes to the follower.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo,
    RedisConnectionInfo, RedisFuture, RedisResult, TlsCertificates, Value,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use slog::Logger;
use tokio::sync::mpsc;

use super::RedisError;
use crate::config::RedisConfig;
use crate::secret;

pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Every command but the subscription's reads; publishes are bounded by `publish_timeout`.
pub(super) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to one server, or to a cluster; both reconnect by themselves and renew the
/// subscription after reconnecting.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    pub(super) async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Connection::Single(connection) => connection.subscribe(channel).await,
            Connection::Cluster(connection) => connection.ssubscribe(channel).await,
        }
    }

    /// The publish command that reaches this connection's subscribers.
    pub(super) fn publish_command(&self) -> &'static str {
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

pub(super) fn node_info(config: &RedisConfig, password: Option<&str>) -> redis::ConnectionInfo {
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

pub(super) fn read_password(path: &Path, log: &Logger) -> Result<String, RedisError> {
    secret::read(path, "redis password", log).map_err(|source| RedisError::PasswordFile {
        path: path.to_path_buf(),
        source,
    })
}

pub(super) fn read_ca_file(path: &PathBuf) -> Result<TlsCertificates, RedisError> {
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
pub(super) struct Connector {
    pub(super) node: redis::ConnectionInfo,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) certificates: Option<TlsCertificates>,
    pub(super) pushes: mpsc::UnboundedSender<PushInfo>,
    pub(super) address: String,
}

impl Connector {
    pub(super) fn client_error(&self, source: redis::RedisError) -> RedisError {
        RedisError::Client {
            address: self.address.clone(),
            source,
        }
    }

    /// This connector with `password` instead of its own.
    pub(super) fn with_password(&self, config: &RedisConfig, password: String) -> Self {
        Self {
            node: node_info(config, Some(&password)),
            password: Some(password),
            ..self.clone()
        }
    }

    pub(super) fn client(&self) -> Result<redis::Client, RedisError> {
        match &self.certificates {
            Some(certificates) => {
                redis::Client::build_with_tls(self.node.clone(), certificates.clone())
            }
            None => redis::Client::open(self.node.clone()),
        }
        .map_err(|err| self.client_error(err))
    }

    pub(super) fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_push_sender(self.pushes.clone())
            .set_automatic_resubscription()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1))
    }

    /// One server's connection, made lazily: it never fails to be made.
    pub(super) fn single(&self) -> Result<Connection, RedisError> {
        ConnectionManager::new_lazy_with_config(self.client()?, self.manager_config())
            .map(Connection::Single)
            .map_err(|err| self.client_error(err))
    }

    pub(super) async fn cluster(&self) -> RedisResult<Connection> {
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
