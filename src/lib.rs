//! flagsmith-sse: real-time flag updates for Flagsmith SDKs over Server-Sent Events.
//!
//! Flagsmith's task processor posts "environment X changed" to `queue-change`; every instance
//! of the fleet pushes it to the SDKs streaming environment X.
//!
//! # Layout
//! - [`config`]: layered configuration (defaults, TOML, environment, legacy variables).
//! - [`domain`]: environment keys, timestamps, the event written on the wire.
//! - [`hub`]: the newest update per environment and the subscribers waiting for it.
//! - [`backend`]: how updates are stored and shared: in-process or NATS JetStream.
//! - [`http`]: the routes, the SSE body, and the accept loop.
//! - [`auth`]: the publish token, rotated on SIGHUP.
//! - [`systemd`]: readiness, status, watchdog and stopping notifications.
//! - [`shutdown`]: signals, mapped to shutdown and reload.
//! - [`logging`]: the slog logger.
//!
//! [`run`] ties them together; `main.rs` only parses the command line and binds.

pub mod auth;
pub mod backend;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod hub;
pub mod logging;
pub mod shutdown;
pub mod systemd;

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

/// The bound sockets the service serves.
#[derive(Debug)]
pub struct Listeners {
    /// Streams, publishes and health.
    pub public: TcpListener,
}

/// Runs the service on `listeners` until `control.shutdown` fires and the drain is over.
pub async fn run(
    config: Config,
    listeners: Listeners,
    control: Control,
    log: Logger,
) -> Result<()> {
    let auth = Arc::new(auth::Authenticator::from_config(&config)?);
    if let Some(path) = &config.authentication_token_file
        && auth::readable_by_others(path)
    {
        warn!(log, "the token file is readable by other users"; "path" => %path.display());
    }
    let hub = Arc::new(hub::Hub::new(config.retention.duration()));
    let backend = backend::start(&config, hub.clone(), &log).await?;
    let public_addr = listeners
        .public
        .local_addr()
        .map_err(|source| Error::Bind {
            addr: config.listen.0,
            source,
        })?;
    info!(log, "starting";
        "listen" => %public_addr,
        "backend" => backend.describe(),
        "config" => slog::Serde(config.redacted()));

    let draining = CancellationToken::new();
    let admission = http::stream::Admission::new(config.max_streams);
    let state = Arc::new(http::State {
        hub: hub.clone(),
        backend: backend.clone(),
        auth: auth.clone(),
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
        log: log.clone(),
    });
    let service = http::service(http::routes(state));
    // Serve before the backend is ready: liveness answers, streams open, and publishes get a
    // clear 503 until the backend can store them.
    let server = tokio::spawn(http::serve::serve(
        listeners.public,
        service,
        draining.clone(),
        log.clone(),
    ));

    let systemd = systemd::Notifier::start(&log);
    let background = CancellationToken::new();
    systemd.spawn_watchdog(&log, background.clone());
    spawn_sweeper(hub.clone(), background.clone(), log.clone());

    systemd.status(&format!("waiting for {}", backend.describe()));
    tokio::select! {
        () = backend.ready() => {
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
    if tokio::time::timeout(timeout, server).await.is_err() {
        warn!(log, "shutdown timeout reached with connections still open");
    }
    background.cancel();
    backend.close().await;
    info!(log, "stopped");
    Ok(())
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
