//! What this instance last saw stored for each environment.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::domain::{EnvironmentKey, Update, UpdatedAt};

/// What this instance last saw stored for each environment: the update and its stream
/// sequence, from its own publishes' acks and from its consumer. A publish expects that
/// sequence, so that storing an update usually takes one round trip; when another update was
/// stored since, JetStream refuses the expectation and the publish reads the stream instead.
/// One entry per environment stored while this instance ran, a few dozen bytes each.
#[derive(Default)]
pub(super) struct LastStored(Mutex<HashMap<EnvironmentKey, (UpdatedAt, u64)>>);

impl LastStored {
    pub(super) fn get(&self, key: &EnvironmentKey) -> Option<(UpdatedAt, u64)> {
        self.0
            .lock()
            .unwrap_or_else(|err| err.into_inner())
            .get(key)
            .copied()
    }

    /// Keeps the later of what is known and `sequence`: the consumer may deliver a message
    /// after the ack of a newer one.
    pub(super) fn record(&self, update: &Update, sequence: u64) {
        let mut known = self.0.lock().unwrap_or_else(|err| err.into_inner());
        match known.get_mut(&update.key) {
            Some(entry) if entry.1 >= sequence => {}
            Some(entry) => *entry = (update.updated_at, sequence),
            None => {
                known.insert(update.key.clone(), (update.updated_at, sequence));
            }
        }
    }

    pub(super) fn forget(&self, key: &EnvironmentKey) {
        self.0
            .lock()
            .unwrap_or_else(|err| err.into_inner())
            .remove(key);
    }

    /// After the stream was recreated, whose sequences start again.
    pub(super) fn clear(&self) {
        self.0.lock().unwrap_or_else(|err| err.into_inner()).clear();
    }
}
