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
//! - `fuzzing` (feature `fuzzing` only): entry points for the fuzz targets in `fuzz/`.
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
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
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
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    let mut service = Service::build(config, listeners, log).await?;
    let servers = service.serve()?;
    service.wait_for_backend(&control.shutdown).await;
    loop {
        tokio::select! {
            () = control.shutdown.cancelled() => break,
            () = control.reload.notified() => service.reload().await,
        }
    }
    service.drain(servers).await;
    Ok(())
}

/// What `run` builds, then serves, reloads and drains.
struct Service {
    config: Config,
    auth: Arc<auth::Authenticator>,
    hub: Arc<hub::Hub>,
    backend: Arc<backend::Backend>,
    state: Arc<http::State>,
    /// The bound listeners, until `serve` takes them.
    served: Vec<Served>,
    /// The TLS listeners' certificates, reloaded on SIGHUP.
    certificates: Vec<(&'static str, Arc<tls::Certificate>)>,
    systemd: systemd::Notifier,
    /// The root of the shutdown tree. Its child `state.draining` ends the listeners and
    /// streams first; `stop` itself ends the tasks in `background` and the backend's once
    /// they are gone, so that the watchdog keeps pinging through the drain.
    stop: CancellationToken,
    background: TaskTracker,
    log: Logger,
}

impl Service {
    /// Reads the token and certificates (a bad file stops start-up before anything
    /// connects), then starts the backend, which connects in the background.
    async fn build(config: Config, listeners: Listeners, log: Logger) -> Result<Self> {
        let auth = Arc::new(auth::Authenticator::from_config(&config, &log)?);
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
        let stop = CancellationToken::new();
        let backend = backend::start(&config, hub.clone(), &metrics, &stop, &log).await?;
        let backend = Arc::new(backend);
        info!(log, "starting";
            "listen" => %served[0].addr,
            "tls" => served[0].certificate.is_some(),
            "publish_listen" => served.get(1).map(|publish| publish.addr.to_string()),
            "backend" => backend.describe(),
            "config" => slog::Serde(config.redacted()));
        let state = Arc::new(http::State {
            hub: hub.clone(),
            backend: backend.clone(),
            auth: auth.clone(),
            throttle: auth::Throttle::default(),
            streams: http::stream::StreamSettings {
                max_age: (!config.max_stream_age.is_zero())
                    .then(|| config.max_stream_age.duration()),
                max_age_jitter: config.max_stream_age_jitter,
                keepalive: config.keepalive_interval.duration(),
                retention: config.retention.duration(),
                drain_period: config.shutdown.drain_period.duration(),
            },
            admission: http::stream::Admission::new(config.max_streams),
            publish_timeout: config.publish_timeout.duration(),
            draining: stop.child_token(),
            metrics,
            log: log.clone(),
        });
        Ok(Self {
            config,
            auth,
            hub,
            backend,
            state,
            served,
            certificates: Vec::new(),
            systemd: systemd::Notifier::start(&log),
            stop,
            background: TaskTracker::new(),
            log,
        })
    }

    /// Serves every listener, before the backend is ready: liveness answers, streams open,
    /// and publishes get a clear 503 until the backend can store them. Starts the watchdog
    /// and the sweeper.
    fn serve(&mut self) -> Result<JoinSet<()>> {
        let connections = Arc::new(http::serve::Connections::new(
            &self.config.http2,
            self.config.write_timeout.duration(),
            self.state.metrics.connections.clone(),
        ));
        let mut servers = JoinSet::new();
        for listener in std::mem::take(&mut self.served) {
            let acceptor = match &listener.certificate {
                Some(certificate) => {
                    self.certificates.push((listener.name, certificate.clone()));
                    Some(certificate.acceptor()?)
                }
                None => None,
            };
            let routes = || http::routes(self.state.clone(), listener.endpoints);
            servers.spawn(http::serve::serve(
                listener.listener,
                acceptor,
                connections.clone(),
                http::service(routes()),
                listener.endpoints.streams.then(|| http::serve::Streams {
                    state: self.state.clone(),
                    forward: http::forward(routes()),
                }),
                self.state.draining.clone(),
                self.log.new(slog::o!("listener" => listener.name)),
            ));
        }
        let watchdog = self
            .systemd
            .clone()
            .watchdog(self.stop.clone(), self.log.clone());
        self.background.spawn(watchdog);
        self.background
            .spawn(sweep(self.hub.clone(), self.stop.clone(), self.log.clone()));
        Ok(servers)
    }

    /// Tells systemd the service is ready once the backend is, unless shutdown comes first.
    async fn wait_for_backend(&self, shutdown: &CancellationToken) {
        let backend = self.backend.describe();
        self.systemd.status(&format!("waiting for {backend}"));
        tokio::select! {
            () = self.backend.readiness().wait() => {
                info!(self.log, "ready"; "backend" => &backend);
                self.systemd.ready(&format!("serving, backend {backend}"));
            }
            () = shutdown.cancelled() => {}
        }
    }

    /// SIGHUP: re-reads the token, the backend's password and the certificates. Whatever
    /// fails to load is logged and stays as it was.
    async fn reload(&self) {
        let log = &self.log;
        self.systemd.reloading();
        match self.auth.reload() {
            Ok(changed) => info!(log, "reloaded"; "token_changed" => changed),
            Err(err) => warn!(log, "reload failed, keeping the current token"; "error" => %err),
        }
        match self.backend.reload().await {
            Ok(true) => info!(log, "reconnected the backend with its new password";
                "backend" => self.backend.describe()),
            Ok(false) => {}
            Err(err) => warn!(log, "backend reload failed, keeping the current connection";
                "error" => %err),
        }
        for (listener, certificate) in &self.certificates {
            let log = log.new(slog::o!("listener" => *listener));
            match certificate.reload() {
                Ok(()) => info!(log, "reloaded the tls certificate";
                    "file" => %certificate.files().certificate_file.display(),
                    "sha256" => certificate.fingerprint()),
                Err(err) => warn!(log, "tls reload failed, keeping the current certificate";
                    "error" => %err, "sha256" => certificate.fingerprint()),
            }
        }
        self.systemd
            .ready(&format!("serving, backend {}", self.backend.describe()));
    }

    /// Ends every stream over the drain period and waits for the connections, at most
    /// `shutdown.timeout`; then stops the background tasks and the backend.
    async fn drain(self, servers: JoinSet<()>) {
        let log = &self.log;
        self.systemd.stopping();
        let timeout = self.config.shutdown.timeout.duration();
        info!(log, "draining";
            "open_streams" => self.state.admission.open_streams(),
            "drain_period_s" => self.config.shutdown.drain_period.duration().as_secs_f64(),
            "timeout_s" => timeout.as_secs_f64());
        self.state.drain();
        if tokio::time::timeout(timeout, servers.join_all())
            .await
            .is_err()
        {
            warn!(log, "shutdown timeout reached with connections still open");
        }
        self.stop.cancel();
        self.background.close();
        self.background.wait().await;
        self.backend.close().await;
        info!(log, "stopped");
    }
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

/// Forgets expired updates and unwatched environments, every [`SWEEP_INTERVAL`].
async fn sweep(hub: Arc<hub::Hub>, stop: CancellationToken, log: Logger) {
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
}
