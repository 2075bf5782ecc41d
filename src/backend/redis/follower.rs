//! The task that owns the connection's life: it subscribes, proves the subscription with
//! probes, reloads every stored update, and feeds the hub what the channel brings.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::{PushInfo, PushKind, RedisResult, Value};
use slog::{Logger, debug, warn};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, Connector};
use super::schema::{Announcement, stored_update};
use super::{Replacement, Shared};

/// Between probes while the subscription works; a silently dead connection is noticed within
/// this plus [`PROBE_TIMEOUT`].
pub(super) const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a probe may take to come back before the connection counts as down.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Between probes while down: how soon a recovered Redis is noticed.
pub(super) const RECOVERY_PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// A probe sent on the channel and not yet heard back.
pub(super) struct Probe {
    pub(super) nonce: u64,
    pub(super) sent: tokio::time::Instant,
}

/// Owns the connection's life: subscribes, proves the subscription, reloads, and applies
/// what the channel brings.
pub(super) struct Follower {
    pub(super) shared: Arc<Shared>,
    pub(super) connector: Connector,
    pub(super) connection: watch::Sender<Option<Connection>>,
    pub(super) pushes: mpsc::UnboundedReceiver<PushInfo>,
    pub(super) replacements: mpsc::UnboundedReceiver<Replacement>,
    /// Tells this instance's probes from other instances'.
    pub(super) instance: u64,
    pub(super) scan_count: u32,
    pub(super) resync_interval: Duration,
    pub(super) log: Logger,
}

impl Follower {
    pub(super) async fn run(mut self, stop: CancellationToken) {
        let mut subscribed = false;
        let mut probe: Option<Probe> = None;
        let mut nonce = 0_u64;
        let mut next_probe = tokio::time::Instant::now();
        let mut next_resync = tokio::time::Instant::now() + self.resync_interval;
        loop {
            let deadline = match &probe {
                Some(probe) => probe.sent + self.probe_timeout(),
                None => next_probe,
            };
            let push = tokio::select! {
                () = stop.cancelled() => return,
                Some(replacement) = self.replacements.recv() => {
                    // Already subscribed; the old connection's subscription ends as it drops.
                    self.connector = replacement.connector;
                    self.connection.send_replace(Some(replacement.connection));
                    subscribed = true;
                    continue;
                }
                push = self.pushes.recv() => push,
                () = tokio::time::sleep_until(deadline) => None,
                () = tokio::time::sleep_until(next_resync), if self.is_connected() => {
                    next_resync = tokio::time::Instant::now() + self.resync_interval;
                    if let Err(err) = self.resync().await {
                        self.shared.metrics.resync.inc();
                        self.lost(&format!("reload failed: {err}"));
                    }
                    continue;
                }
            };
            match push {
                Some(push) => {
                    if self.on_push(push, &mut probe) {
                        // The probe came back: the subscription works.
                        next_probe = tokio::time::Instant::now() + PROBE_INTERVAL;
                        if !self.is_connected() {
                            self.found().await;
                            next_resync = tokio::time::Instant::now() + self.resync_interval;
                        }
                    } else if !self.is_connected() {
                        // Lost just now, perhaps: look for the way back at the recovery pace.
                        next_probe =
                            next_probe.min(tokio::time::Instant::now() + RECOVERY_PROBE_INTERVAL);
                    }
                }
                None => {
                    if let Some(unanswered) = probe.take() {
                        debug!(self.log, "probe unanswered"; "nonce" => unanswered.nonce);
                        self.shared.metrics.probe.inc();
                        self.lost("a probe on the channel did not come back");
                        next_probe = tokio::time::Instant::now();
                        continue;
                    }
                    nonce += 1;
                    next_probe = tokio::time::Instant::now() + self.probe_interval();
                    match self.send_probe(&mut subscribed, nonce).await {
                        Ok(()) => {
                            probe = Some(Probe {
                                nonce,
                                sent: tokio::time::Instant::now(),
                            });
                        }
                        Err(err) => self.lost(&err),
                    }
                }
            }
        }
    }

    pub(super) fn is_connected(&self) -> bool {
        self.shared.link.is_connected()
    }

    pub(super) fn probe_interval(&self) -> Duration {
        if self.is_connected() {
            PROBE_INTERVAL
        } else {
            RECOVERY_PROBE_INTERVAL
        }
    }

    pub(super) fn probe_timeout(&self) -> Duration {
        if self.is_connected() {
            PROBE_TIMEOUT
        } else {
            // While down, a probe that is not back soon is retried rather than waited for.
            PROBE_TIMEOUT.min(RECOVERY_PROBE_INTERVAL * 4)
        }
    }

    /// Makes the connection if there is none yet, subscribes if not yet subscribed, and
    /// publishes a probe.
    pub(super) async fn send_probe(
        &mut self,
        subscribed: &mut bool,
        nonce: u64,
    ) -> Result<(), String> {
        let existing = self.connection.borrow().clone();
        let mut connection = match existing {
            Some(connection) => connection,
            None => match self.connector.cluster().await {
                Ok(connection) => {
                    self.connection.send_replace(Some(connection.clone()));
                    connection
                }
                Err(err) => {
                    self.shared.metrics.connect.inc();
                    return Err(format!("cannot connect to the cluster: {err}"));
                }
            },
        };
        if !*subscribed {
            connection
                .subscribe(&self.shared.keys.channel)
                .await
                .map_err(|err| {
                    self.shared.metrics.subscribe.inc();
                    format!("cannot subscribe: {err}")
                })?;
            *subscribed = true;
        }
        let receivers: i64 = redis::cmd(connection.publish_command())
            .arg(&self.shared.keys.channel)
            .arg(format!("p {:x} {nonce}", self.instance))
            .query_async(&mut connection)
            .await
            .map_err(|err| {
                self.shared.metrics.connect.inc();
                format!("cannot publish a probe: {err}")
            })?;
        if receivers == 0 {
            // Nobody heard it, not even this instance: the subscription did not survive a
            // reconnection. Subscribe again next time.
            *subscribed = false;
        }
        Ok(())
    }

    /// Handles one push; true if it was this instance's outstanding probe.
    pub(super) fn on_push(&mut self, push: PushInfo, probe: &mut Option<Probe>) -> bool {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let Some(Value::BulkString(payload)) = push.data.get(1) else {
                    self.malformed("a message without a payload");
                    return false;
                };
                match Announcement::parse(payload) {
                    Ok(Announcement::Update(update, stored_at)) => {
                        if self.shared.hub.apply(&update, stored_at) {
                            debug!(self.log, "update"; "env" => %update.key, "updated_at" => %update.updated_at);
                        }
                        false
                    }
                    Ok(Announcement::Probe { instance, nonce }) => {
                        let ours = instance == self.instance
                            && probe.as_ref().is_some_and(|probe| probe.nonce == nonce);
                        if ours {
                            *probe = None;
                        }
                        ours
                    }
                    Err(reason) => {
                        self.malformed(reason);
                        false
                    }
                }
            }
            PushKind::Disconnection => {
                self.shared.metrics.connect.inc();
                self.lost("the connection closed");
                *probe = None;
                false
            }
            // The cluster moved the channel's slot; the client subscribes on its new owner,
            // and the next probe tells when that is done.
            PushKind::SUnsubscribe => {
                self.lost("the cluster moved the channel");
                false
            }
            _ => false,
        }
    }

    pub(super) fn malformed(&self, reason: &str) {
        self.shared.metrics.read.inc();
        warn!(self.log, "ignoring a malformed message"; "channel" => &self.shared.keys.channel, "reason" => reason);
    }

    /// The subscription works again: connected, then ready once reloaded.
    pub(super) async fn found(&mut self) {
        self.shared.link.connected();
        match self.resync().await {
            Ok(()) => self.shared.link.set_loaded(true),
            Err(err) => {
                self.shared.metrics.resync.inc();
                self.lost(&format!("reload failed: {err}"));
            }
        }
    }

    /// The connection is down, or not proven to work: neither connected nor ready.
    pub(super) fn lost(&mut self, reason: &str) {
        self.shared.link.set_loaded(false);
        self.shared.link.disconnected(reason);
    }

    /// Reads every stored update into the hub, `scan_count` environments per request.
    pub(super) async fn resync(&mut self) -> RedisResult<()> {
        let Some(mut connection) = self.connection.borrow().clone() else {
            return Ok(());
        };
        let keys = &self.shared.keys;
        let now = SystemTime::now();
        let mut cursor = 0_u64;
        let mut loaded = 0_usize;
        loop {
            let (next, page): (u64, Vec<(String, f64)>) = redis::cmd("ZSCAN")
                .arg(&keys.stored_at)
                .arg(cursor)
                .arg("COUNT")
                .arg(self.scan_count)
                .query_async(&mut connection)
                .await?;
            if !page.is_empty() {
                let values: Vec<Option<String>> = redis::cmd("HMGET")
                    .arg(&keys.updated_at)
                    .arg(page.iter().map(|(key, _)| key.as_str()).collect::<Vec<_>>())
                    .query_async(&mut connection)
                    .await?;
                for ((key, stored_ms), value) in page.into_iter().zip(values) {
                    // Removed since the scan read it: expired, nothing to load.
                    let Some(value) = value else { continue };
                    match stored_update(&key, &value, stored_ms) {
                        Ok((update, stored_at)) => {
                            if !self.shared.hub.is_expired(stored_at, now) {
                                loaded += 1;
                                self.shared.hub.apply(&update, stored_at);
                            }
                        }
                        Err(reason) => {
                            self.shared.metrics.read.inc();
                            warn!(self.log, "ignoring a malformed stored update"; "env" => key, "reason" => reason);
                        }
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        self.shared.metrics.resyncs.inc();
        self.shared
            .metrics
            .resync_environments
            .set(i64::try_from(loaded).unwrap_or(i64::MAX));
        debug!(self.log, "reloaded"; "environments" => loaded);
        Ok(())
    }
}
