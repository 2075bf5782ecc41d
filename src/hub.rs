//! The fan-out hub: the newest update of every environment this instance knows, and the
//! subscribers waiting for the next one.
//!
//! Each environment has a `watch` channel holding its newest event. A subscriber that reads
//! slowly never holds anyone up and never queues anything: when it polls again it sees only the
//! newest value. The event's bytes are built once per update and shared by every subscriber.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;

use crate::domain::{EnvironmentKey, Update, UpdatedAt};

/// The newest update of one environment, ready to write.
#[derive(Debug, Clone)]
pub struct Event {
    pub updated_at: UpdatedAt,
    /// The complete SSE event, shared by all subscribers.
    pub frame: Bytes,
    /// When the backend stored the update; the retention window counts from here.
    pub stored_at: SystemTime,
}

/// What a subscriber watches: `None` until an update is known (or after it expired).
pub type Latest = watch::Receiver<Option<Event>>;

#[derive(Debug)]
pub struct Hub {
    environments: RwLock<HashMap<EnvironmentKey, watch::Sender<Option<Event>>>>,
    retention: Duration,
}

impl Hub {
    pub fn new(retention: Duration) -> Self {
        Self {
            environments: RwLock::default(),
            retention,
        }
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
        let event = || Event {
            updated_at: update.updated_at,
            frame: update.event_frame(),
            stored_at,
        };
        let replace = |current: &mut Option<Event>| match current {
            Some(known) if known.updated_at >= update.updated_at => false,
            _ => {
                *current = Some(event());
                true
            }
        };
        if let Some(sender) = self.read().get(&update.key) {
            return sender.send_if_modified(replace);
        }
        let mut environments = self.write();
        let sender = environments
            .entry(update.key.clone())
            .or_insert_with(|| watch::Sender::new(None));
        sender.send_if_modified(replace)
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

    /// Forgets updates older than the retention window and environments nobody watches.
    /// Subscribers are not woken: an expired value is simply no longer offered on connect.
    pub fn sweep(&self, now: SystemTime) {
        self.write().retain(|_, sender| {
            sender.send_if_modified(|current| {
                if current
                    .as_ref()
                    .is_some_and(|event| self.is_expired(event.stored_at, now))
                {
                    *current = None;
                }
                false
            });
            sender.receiver_count() > 0 || sender.borrow().is_some()
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

    fn update(key: &str, at: f64) -> Update {
        Update {
            key: EnvironmentKey::parse(key).unwrap(),
            updated_at: UpdatedAt::from_unix_seconds(at).unwrap(),
        }
    }

    #[test]
    fn only_newer_updates_wake_subscribers() {
        let hub = Hub::new(Duration::from_secs(3600));
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
    fn retention_drops_old_values_and_idle_environments() {
        let hub = Hub::new(Duration::from_secs(60));
        let long_ago = SystemTime::now() - Duration::from_secs(120);
        assert!(!hub.apply(&update("stale", 1.0), long_ago));

        let recent = SystemTime::now() - Duration::from_secs(30);
        assert!(hub.apply(&update("env", 1.0), recent));
        let key = EnvironmentKey::parse("env").unwrap();
        let watcher = hub.subscribe(&key);
        hub.sweep(SystemTime::now() + Duration::from_secs(60));
        assert_eq!(hub.latest(&key), None);
        assert_eq!(hub.len(), 1, "a watched environment stays");
        drop(watcher);
        hub.sweep(SystemTime::now());
        assert!(hub.is_empty());
    }
}
