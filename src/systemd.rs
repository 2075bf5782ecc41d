//! Talks to systemd (`Type=notify`): readiness, status lines, reloads, stopping, watchdog.
//! Every call is a no-op when the service was not started by systemd (`NOTIFY_SOCKET` unset).
//!
//! Sending to `NOTIFY_SOCKET` blocks when the manager does not read, so messages go through a
//! bounded queue to a thread of their own: a stalled manager can never stall the runtime.
//! When the queue is full, a message is dropped (the watchdog ping that follows it reports
//! liveness anyway). The notify variables are never unset: unsetting environment variables
//! once worker threads run is undefined behaviour.

use std::sync::mpsc;
use std::time::Duration;

use sd_notify::NotifyState;
use slog::{Logger, debug, info};
use tokio_util::sync::CancellationToken;

const QUEUE: usize = 64;

enum Message {
    Ready(String),
    Status(String),
    Reloading,
    Stopping,
    Watchdog,
}

/// A handle to the notification thread; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    queue: Option<mpsc::SyncSender<Message>>,
}

impl Notifier {
    /// Starts the notification thread if systemd is listening.
    pub fn start(log: &Logger) -> Self {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Self { queue: None };
        }
        let (queue, messages) = mpsc::sync_channel(QUEUE);
        let log = log.clone();
        let spawned = std::thread::Builder::new()
            .name("systemd-notify".into())
            .spawn(move || {
                for message in messages {
                    send(&log, message);
                }
            });
        Self {
            queue: spawned.ok().map(|_| queue),
        }
    }

    fn post(&self, message: Message) {
        if let Some(queue) = &self.queue {
            let _ = queue.try_send(message);
        }
    }

    pub fn status(&self, status: &str) {
        self.post(Message::Status(status.to_owned()));
    }

    pub fn ready(&self, status: &str) {
        self.post(Message::Ready(status.to_owned()));
    }

    pub fn reloading(&self) {
        self.post(Message::Reloading);
    }

    pub fn stopping(&self) {
        self.post(Message::Stopping);
    }

    /// Pings the watchdog at half its interval until `stop` fires, if systemd asked for it.
    /// The pings come from a runtime task, so a stalled runtime gets the service restarted.
    pub async fn watchdog(self, stop: CancellationToken, log: Logger) {
        let Some(interval) = sd_notify::watchdog_enabled() else {
            return;
        };
        let period = (interval / 2).max(Duration::from_millis(10));
        info!(log, "systemd watchdog enabled"; "interval_ms" => interval.as_millis());
        let mut ticks = tokio::time::interval(period);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => self.post(Message::Watchdog),
            }
        }
    }
}

fn send(log: &Logger, message: Message) {
    let result = match &message {
        Message::Ready(status) => {
            sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)])
        }
        Message::Status(status) => sd_notify::notify(&[NotifyState::Status(status)]),
        // systemd 253+ needs the timestamp to match the reload with its request.
        Message::Reloading => match NotifyState::monotonic_usec_now() {
            Ok(now) => sd_notify::notify(&[NotifyState::Reloading, now]),
            Err(_) => sd_notify::notify(&[NotifyState::Reloading]),
        },
        Message::Stopping => {
            sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("draining")])
        }
        Message::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
    };
    if let Err(err) = result {
        debug!(log, "systemd notification failed"; "error" => %err);
    }
}
