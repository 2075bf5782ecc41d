//! flagsmith-sse: real-time flag updates for Flagsmith SDKs over Server-Sent Events.
//!
//! Flagsmith's task processor posts "environment X changed" to `queue-change`; every instance
//! of the fleet pushes it to the SDKs streaming environment X.
//!
//! # Layout
//! - [`config`]: layered configuration (defaults, TOML, environment, legacy variables).
//! - [`domain`]: environment keys, timestamps, the event written on the wire.
//! - [`hub`]: the newest update per environment and the subscribers waiting for it.
//! - [`backend`]: how updates are stored and shared: in-process, NATS JetStream or Redis.
//! - [`http`]: the routes, the SSE body, HTTP/1.1 streams served without hyper, and the accept
//!   loop (HTTP/1.1, HTTP/2, h2c).
//! - [`tls`]: certificates for TLS listeners, reloaded on SIGHUP.
//! - [`auth`]: the publish token, rotated on SIGHUP.
//! - [`secret`]: reading the files that hold secrets, and warning when others can read them.
//! - [`systemd`]: readiness, status, watchdog and stopping notifications.
//! - [`shutdown`]: signals, mapped to shutdown and reload.
//! - [`metrics`]: the Prometheus metrics served at `/metricsz`.
//! - [`logging`]: the slog logger.
//!
//! [`run`] ties them together; `main.rs` only parses the command line and binds.
//!
//! Imports run one way, from this file down: `http` → `auth`, `backend`, `tls` → `hub`,
//! `secret` → `domain`, `config`, `metrics`. `tests/layers.rs` holds them to it.

pub mod auth;
pub mod backend;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod hub;
pub mod logging;
pub mod metrics;
pub mod secret;
pub mod shutdown;
pub mod systemd;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use slog::{Logger, info, warn};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::config::Config;
pub use crate::error::{Error, Result};
pub use crate::shutdown::Control;

/// How often expired updates and unwatched environments are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The bound sockets the service serves. Whether each speaks TLS comes from the
/// configuration: `tls` for `public`, `publish_tls` for `publish`.
#[derive(Debug)]
pub struct Listeners {
    /// Streams and health, and publishes when there is no `publish` listener.
    pub public: TcpListener,
    /// Publishes and health only.
    pub publish: Option<TcpListener>,
}

/// Runs the service on `listeners` until `control.shutdown` fires and the drain is over.
pub async fn run(
    config: Config,
    listeners: Listeners,
    control: Control,
    log: Logger,
) -> Result<()> {
    let auth = Arc::new(auth::Authenticator::from_config(&config, &log)?);
    // Certificates first: a bad pair stops start-up before anything connects.
    let public_endpoints = match listeners.publish {
        Some(_) => http::Endpoints::STREAMS,
        None => http::Endpoints::ALL,
    };
    let mut served = vec![Served::new(
        "public",
        listeners.public,
        config.listen,
        public_endpoints,
        config.tls.as_ref(),
        &log,
    )?];
    if let Some(listener) = listeners.publish {
        served.push(Served::new(
            "publish",
            listener,
            config.publish_listen.unwrap_or(config.listen),
            http::Endpoints::PUBLISH,
            config.publish_tls.as_ref(),
            &log,
        )?);
    }
    let metrics = Arc::new(metrics::Metrics::new(config.backend.name()));
    let hub = Arc::new(hub::Hub::new(
        config.retention.duration(),
        metrics.hub.clone(),
    ));
    let backend = Arc::new(backend::start(&config, hub.clone(), &metrics, &log).await?);
    info!(log, "starting";
        "listen" => %served[0].addr,
        "tls" => served[0].certificate.is_some(),
        "publish_listen" => served.get(1).map(|publish| publish.addr.to_string()),
        "backend" => backend.describe(),
        "config" => slog::Serde(config.redacted()));

    let draining = CancellationToken::new();
    let admission = http::stream::Admission::new(config.max_streams);
    let state = Arc::new(http::State {
        hub: hub.clone(),
        backend: backend.clone(),
        auth: auth.clone(),
        throttle: auth::Throttle::default(),
        streams: http::stream::StreamSettings {
            max_age: (!config.max_stream_age.is_zero()).then(|| config.max_stream_age.duration()),
            max_age_jitter: config.max_stream_age_jitter,
            keepalive: config.keepalive_interval.duration(),
            retention: config.retention.duration(),
            drain_period: config.shutdown.drain_period.duration(),
        },
        admission: admission.clone(),
        publish_timeout: config.publish_timeout.duration(),
        draining: draining.clone(),
        metrics: metrics.clone(),
        log: log.clone(),
    });
    // Serve before the backend is ready: liveness answers, streams open, and publishes get a
    // clear 503 until the backend can store them.
    let connections = Arc::new(http::serve::Connections::new(
        &config.http2,
        config.write_timeout.duration(),
        metrics.connections.clone(),
    ));
    let mut servers = tokio::task::JoinSet::new();
    let mut certificates = Vec::new();
    for listener in served {
        let acceptor = match &listener.certificate {
            Some(certificate) => {
                certificates.push((listener.name, certificate.clone()));
                Some(certificate.acceptor()?)
            }
            None => None,
        };
        servers.spawn(http::serve::serve(
            listener.listener,
            acceptor,
            connections.clone(),
            http::service(http::routes(state.clone(), listener.endpoints)),
            listener.endpoints.streams.then(|| http::serve::Streams {
                state: state.clone(),
                forward: http::forward(http::routes(state.clone(), listener.endpoints)),
            }),
            draining.clone(),
            log.new(slog::o!("listener" => listener.name)),
        ));
    }

    let systemd = systemd::Notifier::start(&log);
    let background = CancellationToken::new();
    systemd.spawn_watchdog(&log, background.clone());
    spawn_sweeper(hub.clone(), background.clone(), log.clone());

    systemd.status(&format!("waiting for {}", backend.describe()));
    tokio::select! {
        () = backend.readiness().wait() => {
            info!(log, "ready"; "backend" => backend.describe());
            systemd.ready(&format!("serving, backend {}", backend.describe()));
        }
        () = control.shutdown.cancelled() => {}
    }

    loop {
        tokio::select! {
            () = control.shutdown.cancelled() => break,
            () = control.reload.notified() => {
                systemd.reloading();
                match auth.reload() {
                    Ok(changed) => info!(log, "reloaded"; "token_changed" => changed),
                    Err(err) => warn!(log, "reload failed, keeping the current token"; "error" => %err),
                }
                match backend.reload().await {
                    Ok(true) => info!(log, "reconnected the backend with its new password";
                        "backend" => backend.describe()),
                    Ok(false) => {}
                    Err(err) => warn!(log, "backend reload failed, keeping the current connection";
                        "error" => %err),
                }
                for (listener, certificate) in &certificates {
                    let log = log.new(slog::o!("listener" => *listener));
                    match certificate.reload() {
                        Ok(()) => info!(log, "reloaded the tls certificate";
                            "file" => %certificate.files().certificate_file.display(),
                            "sha256" => certificate.fingerprint()),
                        Err(err) => warn!(log, "tls reload failed, keeping the current certificate";
                            "error" => %err, "sha256" => certificate.fingerprint()),
                    }
                }
                systemd.ready(&format!("serving, backend {}", backend.describe()));
            }
        }
    }

    systemd.stopping();
    let timeout = config.shutdown.timeout.duration();
    info!(log, "draining";
        "open_streams" => admission.open_streams(),
        "drain_period_s" => config.shutdown.drain_period.duration().as_secs_f64(),
        "timeout_s" => timeout.as_secs_f64());
    draining.cancel();
    hub.drain();
    if tokio::time::timeout(timeout, servers.join_all())
        .await
        .is_err()
    {
        warn!(log, "shutdown timeout reached with connections still open");
    }
    background.cancel();
    backend.close().await;
    info!(log, "stopped");
    Ok(())
}

/// A bound listener with what it serves.
struct Served {
    /// For the logs: `public` or `publish`.
    name: &'static str,
    listener: TcpListener,
    addr: SocketAddr,
    endpoints: http::Endpoints,
    certificate: Option<Arc<tls::Certificate>>,
}

impl Served {
    fn new(
        name: &'static str,
        listener: TcpListener,
        configured: config::ListenAddr,
        endpoints: http::Endpoints,
        tls: Option<&config::TlsConfig>,
        log: &Logger,
    ) -> Result<Self> {
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: configured.0,
            source,
        })?;
        let certificate = match tls {
            Some(files) => {
                let certificate = tls::Certificate::load(files)?;
                secret::check_permissions(
                    &files.key_file,
                    "tls key",
                    &log.new(slog::o!("listener" => name)),
                );
                info!(log, "loaded the tls certificate";
                    "listener" => name,
                    "file" => %files.certificate_file.display(),
                    "sha256" => certificate.fingerprint());
                Some(certificate)
            }
            None => None,
        };
        Ok(Self {
            name,
            listener,
            addr,
            endpoints,
            certificate,
        })
    }
}

fn spawn_sweeper(hub: Arc<hub::Hub>, stop: CancellationToken, log: Logger) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {
                    hub.sweep(SystemTime::now());
                    slog::debug!(log, "swept"; "environments" => hub.len());
                }
            }
        }
    });
}
