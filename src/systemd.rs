//! Talks to systemd (`Type=notify`): readiness, status lines, reloads, stopping, watchdog.
//! Each call is a no-op when the service was not started by systemd (`NOTIFY_SOCKET` unset).
//!
//! The notify variables are never unset: they are read again for every message, and unsetting
//! environment variables once worker threads run is undefined behaviour.

use std::time::Duration;

use sd_notify::NotifyState;
use slog::{Logger, debug, info};
use tokio_util::sync::CancellationToken;

fn notify(log: &Logger, states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        debug!(log, "systemd notification failed"; "error" => %err);
    }
}

pub fn status(log: &Logger, status: &str) {
    notify(log, &[NotifyState::Status(status)]);
}

pub fn ready(log: &Logger, status: &str) {
    notify(log, &[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn reloading(log: &Logger) {
    // systemd 253+ needs the timestamp to match the reload with its request.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(log, &[NotifyState::Reloading, now]),
        Err(_) => notify(log, &[NotifyState::Reloading]),
    }
}

pub fn stopping(log: &Logger) {
    notify(
        log,
        &[NotifyState::Stopping, NotifyState::Status("draining")],
    );
}

/// Pings the watchdog at half its interval until `stop` fires, if systemd asked for it.
/// The pings come from the runtime itself, so a stalled runtime gets the service restarted.
pub fn spawn_watchdog(log: &Logger, stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(10));
    info!(log, "systemd watchdog enabled"; "interval_ms" => interval.as_millis());
    let log = log.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => notify(&log, &[NotifyState::Watchdog]),
            }
        }
    });
}
