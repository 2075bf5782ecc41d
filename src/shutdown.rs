//! Process control: signals become a shutdown token and reload requests.

use std::sync::Arc;

use slog::{Logger, info, warn};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How the outside world steers a running service. Tests build one directly.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Cancelled to begin a graceful shutdown.
    pub shutdown: CancellationToken,
    /// Notified to re-read the token file.
    pub reload: Arc<Notify>,
}

impl Control {
    /// Maps SIGTERM and SIGINT to shutdown and SIGHUP to reload. A second SIGTERM or SIGINT
    /// during the drain exits at once.
    pub fn from_signals(log: &Logger) -> std::io::Result<Self> {
        let control = Control::default();
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let (shutdown, reload, log) = (
            control.shutdown.clone(),
            control.reload.clone(),
            log.clone(),
        );
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = terminate.recv() => "SIGTERM",
                    _ = interrupt.recv() => "SIGINT",
                    _ = hangup.recv() => {
                        info!(log, "reload requested"; "signal" => "SIGHUP");
                        reload.notify_one();
                        continue;
                    }
                };
                if shutdown.is_cancelled() {
                    warn!(log, "second stop signal, exiting now"; "signal" => name);
                    std::process::exit(1);
                }
                info!(log, "shutdown requested"; "signal" => name);
                shutdown.cancel();
            }
        });
        Ok(control)
    }
}
