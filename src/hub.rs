//! The fan-out hub: the newest update of every environment this instance knows, and the
//! subscribers waiting for the next one.
//!
//! Each environment has a `watch` channel holding its newest event. A subscriber that reads
//! slowly never holds anyone up and never queues anything: when it polls again it sees only the
//! newest value. The event's bytes are built once per update and shared by every subscriber.
//!
//! Each update also carries its sequence within the environment, so that a subscriber can tell
//! how many it skipped, and a [`FanOut`] that times its delivery to the local subscribers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;

use crate::domain::{EnvironmentKey, Update, UpdatedAt};
use crate::metrics::{FanOut, HubMetrics};

/// The newest update of one environment, ready to write.
#[derive(Debug, Clone)]
pub struct Event {
    pub updated_at: UpdatedAt,
    /// The complete SSE event, shared by all subscribers.
    pub frame: Bytes,
    /// When the backend stored the update; the retention window counts from here.
    pub stored_at: SystemTime,
    /// 1 for the first update of the environment in this hub, then one more per update.
    pub sequence: u64,
    /// The subscribers that were waiting for this update when it arrived, counting down.
    pub fanout: Arc<FanOut>,
}

/// What a subscriber watches: `None` until an update is known (or after it expired).
pub type Latest = watch::Receiver<Option<Event>>;

#[derive(Debug)]
pub struct Hub {
    environments: RwLock<HashMap<EnvironmentKey, watch::Sender<Option<Event>>>>,
    retention: Duration,
    /// Set once at shutdown: every stream plans its end.
    draining: AtomicBool,
    metrics: HubMetrics,
}

impl Hub {
    pub fn new(retention: Duration, metrics: HubMetrics) -> Self {
        Self {
            environments: RwLock::default(),
            retention,
            draining: AtomicBool::new(false),
            metrics,
        }
    }

    /// Starts the drain: wakes every subscriber, which then sees [`Hub::is_draining`]. The
    /// value they watch stays as it is, so they write nothing for this wake.
    ///
    /// Streams learn of the drain this way, through the channel they already watch, instead
    /// of each also waiting on a shutdown signal that every poll would have to check.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        for sender in self.read().values() {
            sender.send_modify(|_| {});
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// How long an update stays known after it was stored.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Watches `key`. The receiver's current value is the newest update still within retention.
    pub fn subscribe(&self, key: &EnvironmentKey) -> Latest {
        if let Some(sender) = self.read().get(key) {
            return sender.subscribe();
        }
        self.write()
            .entry(key.clone())
            .or_insert_with(|| watch::Sender::new(None))
            .subscribe()
    }

    /// Records `update` if it is newer than what is known, and wakes its subscribers.
    /// Returns whether it was newer. Updates older than the retention window are ignored.
    pub fn apply(&self, update: &Update, stored_at: SystemTime) -> bool {
        if self.is_expired(stored_at, SystemTime::now()) {
            return false;
        }
        let send = |sender: &watch::Sender<Option<Event>>| {
            let applied = sender.send_if_modified(|current| {
                if current
                    .as_ref()
                    .is_some_and(|known| known.updated_at >= update.updated_at)
                {
                    return false;
                }
                let sequence = match current {
                    Some(overtaken) => {
                        overtaken.fanout.overtaken();
                        overtaken.sequence + 1
                    }
                    None => 1,
                };
                // Counted while the value is locked: a subscriber arriving from now on sees
                // this update as its first, not as a change it has to write.
                let waiting = sender.receiver_count();
                *current = Some(Event {
                    updated_at: update.updated_at,
                    frame: update.event_frame(),
                    stored_at,
                    sequence,
                    fanout: Arc::new(FanOut::new(waiting, &self.metrics.fanout)),
                });
                true
            });
            if applied {
                self.metrics.updates.inc();
            }
            applied
        };
        if let Some(sender) = self.read().get(&update.key) {
            return send(sender);
        }
        let mut environments = self.write();
        let sender = environments
            .entry(update.key.clone())
            .or_insert_with(|| watch::Sender::new(None));
        send(sender)
    }

    /// The fan-out of `key`'s newest update if it is later than `sequence`: what a subscriber
    /// that last saw `sequence` still owes a write to when it leaves.
    pub fn unwritten(&self, key: &EnvironmentKey, sequence: u64) -> Option<Arc<FanOut>> {
        self.read().get(key).and_then(|sender| {
            sender
                .borrow()
                .as_ref()
                .filter(|event| event.sequence > sequence)
                .map(|event| event.fanout.clone())
        })
    }

    /// The newest known `updated_at` of `key` within retention.
    pub fn latest(&self, key: &EnvironmentKey) -> Option<UpdatedAt> {
        let now = SystemTime::now();
        self.read().get(key).and_then(|sender| {
            let current = sender.borrow();
            current
                .as_ref()
                .filter(|event| !self.is_expired(event.stored_at, now))
                .map(|event| event.updated_at)
        })
    }

    pub fn is_expired(&self, stored_at: SystemTime, now: SystemTime) -> bool {
        now.duration_since(stored_at)
            .is_ok_and(|age| age > self.retention)
    }

    /// Forgets environments nobody watches whose update is older than the retention window.
    /// A watched environment keeps its expired update, which is no longer offered on connect
    /// but keeps its sequence for the subscribers counting from it.
    pub fn sweep(&self, now: SystemTime) {
        self.write().retain(|_, sender| {
            sender.receiver_count() > 0
                || sender
                    .borrow()
                    .as_ref()
                    .is_some_and(|event| !self.is_expired(event.stored_at, now))
        });
    }

    /// Environments currently held in memory.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<EnvironmentKey, watch::Sender<Option<Event>>>> {
        // A panic while holding the lock cannot leave the map half-updated: every mutation is
        // a single insert, remove or value swap, so the data is still consistent.
        self.environments
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<EnvironmentKey, watch::Sender<Option<Event>>>>
    {
        self.environments
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn update(key: &str, at: f64) -> Update {
        Update {
            key: EnvironmentKey::parse(key).unwrap(),
            updated_at: UpdatedAt::from_unix_seconds(at).unwrap(),
        }
    }

    #[test]
    fn only_newer_updates_wake_subscribers() {
        let hub = Hub::new(Duration::from_secs(3600), Metrics::new("memory").hub);
        let mut rx = hub.subscribe(&EnvironmentKey::parse("env").unwrap());
        assert!(rx.borrow_and_update().is_none());
        assert!(hub.apply(&update("env", 10.5), SystemTime::now()));
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            rx.borrow_and_update()
                .as_ref()
                .unwrap()
                .updated_at
                .as_secs_f64(),
            10.5
        );
        assert!(!hub.apply(&update("env", 10.5), SystemTime::now()));
        assert!(!hub.apply(&update("env", 9.0), SystemTime::now()));
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn fanout_ends_with_the_last_waiting_subscriber() {
        let metrics = Metrics::new("memory");
        let hub = Hub::new(Duration::from_secs(3600), metrics.hub.clone());
        let key = EnvironmentKey::parse("env").unwrap();
        let (mut a, mut b) = (hub.subscribe(&key), hub.subscribe(&key));
        let take = |rx: &mut Latest| rx.borrow_and_update().clone().unwrap();
        let completed = || metrics.hub.fanout.get_sample_count();

        hub.apply(&update("env", 1.0), SystemTime::now());
        take(&mut a).fanout.written();
        assert_eq!(completed(), 0, "b has not written it yet");
        let first = take(&mut b);
        first.fanout.written();
        assert_eq!((first.sequence, completed()), (1, 1));

        // The second update is overtaken before anyone writes it: only the third completes.
        hub.apply(&update("env", 2.0), SystemTime::now());
        hub.apply(&update("env", 3.0), SystemTime::now());
        let third = take(&mut a);
        assert_eq!(third.sequence, 3);
        third.fanout.written();
        take(&mut b).fanout.written();
        assert_eq!(completed(), 2);
        assert_eq!(metrics.hub.updates.get(), 3);
    }

    #[test]
    fn drain_wakes_every_subscriber_with_the_value_unchanged() {
        let hub = Hub::new(Duration::from_secs(3600), Metrics::new("memory").hub);
        let (env, idle) = (
            EnvironmentKey::parse("env").unwrap(),
            EnvironmentKey::parse("idle").unwrap(),
        );
        let (mut a, mut b) = (hub.subscribe(&env), hub.subscribe(&idle));
        hub.apply(&update("env", 1.0), SystemTime::now());
        let sequence = a.borrow_and_update().as_ref().unwrap().sequence;
        assert!(!hub.is_draining());

        hub.drain();
        assert!(hub.is_draining());
        assert!(a.has_changed().unwrap() && b.has_changed().unwrap());
        assert_eq!(a.borrow_and_update().as_ref().unwrap().sequence, sequence);
        assert!(b.borrow_and_update().is_none());
    }

    #[test]
    fn retention_drops_old_values_and_idle_environments() {
        let hub = Hub::new(Duration::from_secs(60), Metrics::new("memory").hub);
        let long_ago = SystemTime::now() - Duration::from_secs(120);
        assert!(!hub.apply(&update("stale", 1.0), long_ago));

        let recent = SystemTime::now() - Duration::from_secs(30);
        assert!(hub.apply(&update("env", 1.0), recent));
        let key = EnvironmentKey::parse("env").unwrap();
        assert_eq!(hub.latest(&key).map(UpdatedAt::as_secs_f64), Some(1.0));
        let watcher = hub.subscribe(&key);
        let later = SystemTime::now() + Duration::from_secs(60);
        assert!(hub.is_expired(recent, later));
        hub.sweep(later);
        assert_eq!(hub.len(), 1, "a watched environment stays");
        drop(watcher);
        hub.sweep(SystemTime::now());
        assert_eq!(
            hub.len(),
            1,
            "an unwatched environment stays within retention"
        );
        hub.sweep(later);
        assert!(hub.is_empty());
    }
}
