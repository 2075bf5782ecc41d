//! A backend's link to its broker, kept the same way by every backend: the `connected` gauge
//! and the reconnection counter, the "backend state" log lines, one warning per outage
//! however often the client retries, and readiness (connected, with every stored update
//! loaded).

use std::sync::atomic::{AtomicBool, Ordering};

use slog::{Logger, debug, info, warn};
use tokio::sync::watch;

use crate::metrics::BackendMetrics;

#[derive(Debug, Clone, Copy, Default)]
struct State {
    connected: bool,
    /// Every update stored when the link came up has reached the hub.
    loaded: bool,
}

impl State {
    fn ready(self) -> bool {
        self.connected && self.loaded
    }
}

pub struct Link {
    state: watch::Sender<State>,
    ever_connected: AtomicBool,
    /// Set once a failure was logged at warning since the last change of state: clients
    /// retry several times a second during an outage, and each attempt fails.
    failure_logged: AtomicBool,
    /// The warning's message, "… unavailable, retrying" at first and "… unavailable" after.
    unavailable: &'static str,
    metrics: BackendMetrics,
    log: Logger,
}

impl Link {
    /// `unavailable` names the outage in the log ("nats error", "redis unavailable").
    pub fn new(unavailable: &'static str, metrics: BackendMetrics, log: Logger) -> Self {
        Self {
            state: watch::Sender::new(State::default()),
            ever_connected: AtomicBool::new(false),
            failure_logged: AtomicBool::new(false),
            unavailable,
            metrics,
            log,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.state.borrow().connected
    }

    /// Resolves once the link is connected (`true`), or is not (`false`).
    pub async fn until_connected(&self, connected: bool) {
        // Never closed: the sender is this link's.
        let _ = self
            .state
            .subscribe()
            .wait_for(|state| state.connected == connected)
            .await;
    }

    /// The broker answers (again).
    pub fn connected(&self) {
        if self.ever_connected.swap(true, Ordering::AcqRel) {
            self.metrics.reconnects.inc();
        }
        self.metrics.connected.set(1);
        self.failure_logged.store(false, Ordering::Release);
        info!(self.log, "backend state"; "state" => "connected");
        self.update(|state| state.connected = true);
    }

    /// The link is down, or no longer proven to work.
    pub fn disconnected(&self, reason: &str) {
        let mut was_connected = false;
        self.update(|state| was_connected = std::mem::replace(&mut state.connected, false));
        self.metrics.connected.set(0);
        if was_connected {
            self.failure_logged.store(false, Ordering::Release);
            info!(self.log, "backend state"; "state" => "disconnected", "reason" => reason);
        } else {
            self.failed(reason);
        }
    }

    /// An attempt to reach the broker failed: a warning for the first since the last change
    /// of state, debug lines after it.
    pub fn failed(&self, reason: &str) {
        if self.failure_logged.swap(true, Ordering::AcqRel) {
            debug!(self.log, "{}", self.unavailable; "reason" => reason);
        } else {
            warn!(self.log, "{}, retrying", self.unavailable; "reason" => reason);
        }
    }

    /// Whether every stored update has reached the hub since the link came up.
    pub fn set_loaded(&self, loaded: bool) {
        self.update(|state| state.loaded = loaded);
    }

    pub fn readiness(&self) -> Readiness {
        Readiness(Some(self.state.subscribe()))
    }

    /// Changes the state and logs when that makes the backend ready.
    fn update(&self, change: impl FnOnce(&mut State)) {
        let mut became_ready = false;
        self.state.send_modify(|state| {
            let was_ready = state.ready();
            change(state);
            became_ready = !was_ready && state.ready();
        });
        if became_ready {
            info!(self.log, "backend state"; "state" => "ready");
        }
    }
}

/// Whether a backend is ready: connected, and has loaded the newest updates. Reads local
/// state only, so probes generate no backend traffic.
#[derive(Clone)]
pub struct Readiness(Option<watch::Receiver<State>>);

impl Readiness {
    /// For a backend that has nothing to connect to.
    pub fn always() -> Self {
        Self(None)
    }

    pub fn is_ready(&self) -> bool {
        self.0.as_ref().is_none_or(|state| state.borrow().ready())
    }

    /// Resolves once ready.
    pub async fn wait(mut self) {
        if let Some(state) = &mut self.0 {
            // The sender lives as long as the backend.
            let _ = state.wait_for(|state| state.ready()).await;
        }
    }
}
