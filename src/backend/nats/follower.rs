//! The task that reads the stream into the hub through one ordered consumer.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use slog::{Logger, debug, error, info, warn};
use tokio_util::sync::CancellationToken;

use super::last_stored::LastStored;
use super::{SUBJECT_PREFIX, SUBJECTS};
use crate::backend::link::Link;
use crate::config::{NatsConfig, NatsStorage};
use crate::domain::{EnvironmentKey, Update, UpdatedAt};
use crate::hub::Hub;
use crate::metrics::NatsMetrics;

/// Retries of the same update within this window are stored once.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long each pull of the ordered consumer waits for messages; the server sends an idle
/// heartbeat every half of it. An ordered consumer lives on one NATS node, and when that node
/// dies the client recreates it after two missed heartbeats. With async-nats's defaults (30 s
/// pulls, 15 s heartbeats) an instance whose consumer died with a cluster node heard nothing
/// for over half a minute while it reported ready; with these it is 2 to 4 s. It costs an idle
/// instance one pull request every 2 s and a heartbeat every second.
const CONSUMER_PULL_EXPIRES: Duration = Duration::from_secs(2);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub(super) fn stream_config(config: &NatsConfig, retention: Duration) -> stream::Config {
    stream::Config {
        name: config.stream.clone(),
        subjects: vec![SUBJECTS.to_owned()],
        max_messages_per_subject: 1,
        max_age: retention,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        storage: match config.storage {
            NatsStorage::File => stream::StorageType::File,
            NatsStorage::Memory => stream::StorageType::Memory,
        },
        num_replicas: config.replicas,
        ..Default::default()
    }
}

/// Reads the stream into the hub through one ordered consumer, for the life of the backend.
pub(super) struct Follower {
    pub(super) jetstream: jetstream::Context,
    pub(super) last_stored: Arc<LastStored>,
    pub(super) stream_config: stream::Config,
    pub(super) hub: Arc<Hub>,
    /// The client's connection, as its events report it, and whether the consumer has
    /// delivered every update that existed when it started.
    pub(super) link: Arc<Link>,
    pub(super) metrics: NatsMetrics,
    pub(super) log: Logger,
}

impl Follower {
    pub(super) async fn run(mut self, stop: CancellationToken) {
        let mut last_sequence = None;
        let mut delay = RETRY_MIN;
        loop {
            let attempt = self.follow(&mut last_sequence, &mut delay);
            tokio::select! {
                () = stop.cancelled() => return,
                () = attempt => {}
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).clamp(RETRY_MIN, RETRY_MAX);
        }
    }

    /// Ensures the stream, then consumes it until the consumer fails for good or the client
    /// reconnects.
    async fn follow(&mut self, last_sequence: &mut Option<u64>, delay: &mut Duration) {
        self.link.until_connected(true).await;
        let mut stream = match self
            .jetstream
            .create_or_update_stream(self.stream_config.clone())
            .await
        {
            Ok(_) => match self.jetstream.get_stream(&self.stream_config.name).await {
                Ok(stream) => stream,
                Err(err) => {
                    self.metrics.create_jetstream.inc();
                    warn!(self.log, "cannot open stream"; "error" => %err);
                    return;
                }
            },
            Err(err) => {
                self.metrics.create_jetstream.inc();
                warn!(self.log, "cannot ensure stream"; "stream" => &self.stream_config.name, "error" => %err);
                return;
            }
        };
        // A stream that was recreated empty restarts its sequences; resuming from our old
        // position would skip everything published since.
        if let (Some(seen), Ok(info)) = (*last_sequence, stream.info().await)
            && info.state.last_sequence < seen
        {
            warn!(self.log, "stream was reset; reloading"; "last_seen" => seen, "stream_last" => info.state.last_sequence);
            *last_sequence = None;
            self.last_stored.clear();
        }
        let deliver_policy = match *last_sequence {
            None => consumer::DeliverPolicy::LastPerSubject,
            Some(sequence) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: sequence + 1,
            },
        };
        let consumer = match stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: SUBJECTS.to_owned(),
                deliver_policy,
                max_expires: CONSUMER_PULL_EXPIRES,
                ..Default::default()
            })
            .await
        {
            Ok(consumer) => consumer,
            Err(err) => {
                self.metrics.create_consumer.inc();
                warn!(self.log, "cannot create consumer"; "error" => %err);
                return;
            }
        };
        let pending = consumer.cached_info().num_pending;
        self.metrics
            .pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        if pending == 0 {
            self.link.set_loaded(true);
        }
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(err) => {
                self.metrics.pull.inc();
                warn!(self.log, "cannot start consumer"; "error" => %err);
                return;
            }
        };
        info!(self.log, "following stream"; "stream" => &self.stream_config.name, "from" => ?last_sequence);
        *delay = RETRY_MIN;
        // Made once for the consumer's life, not for every message.
        let link = self.link.clone();
        let disconnected = link.until_connected(false);
        tokio::pin!(disconnected);
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                // A restarted server forgets our ephemeral consumer, and missed heartbeats
                // would take many seconds to tell; start over from our last sequence as soon
                // as the client is connected again.
                () = &mut disconnected => {
                    info!(self.log, "disconnected, will resume"; "from" => ?last_sequence);
                    *delay = Duration::ZERO;
                    return;
                }
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    self.metrics.pull.inc();
                    error!(self.log, "consumer failed"; "error" => %err);
                    return;
                }
                None => {
                    warn!(self.log, "consumer ended");
                    return;
                }
            };
            let Ok(info) = message.info() else {
                self.metrics.read.inc();
                warn!(self.log, "message without jetstream metadata"; "subject" => %message.subject);
                continue;
            };
            *last_sequence = Some(info.stream_sequence);
            self.metrics
                .sequence
                .set(i64::try_from(info.stream_sequence).unwrap_or(i64::MAX));
            let pending = info.pending;
            self.metrics
                .pending
                .set(i64::try_from(pending).unwrap_or(i64::MAX));
            let stored_at = SystemTime::from(info.published);
            match parse_message(&message.subject, &message.payload) {
                Ok(update) => {
                    self.last_stored.record(&update, info.stream_sequence);
                    if self.hub.apply(&update, stored_at) {
                        debug!(self.log, "update"; "env" => %update.key, "updated_at" => %update.updated_at);
                    }
                }
                Err(reason) => {
                    self.metrics.read.inc();
                    warn!(self.log, "ignoring malformed message"; "subject" => %message.subject, "reason" => reason)
                }
            }
            if pending == 0 {
                self.link.set_loaded(true);
            }
        }
    }
}

fn parse_message(subject: &str, payload: &[u8]) -> Result<Update, String> {
    let key = subject
        .strip_prefix(SUBJECT_PREFIX)
        .ok_or_else(|| "subject outside the stream's prefix".to_owned())?;
    let key = EnvironmentKey::parse(key).map_err(|err| err.to_string())?;
    let updated_at = UpdatedAt::from_body(payload).map_err(|err| err.to_string())?;
    Ok(Update { key, updated_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_become_updates() {
        let update =
            parse_message("flagsmith.environment.abc", br#"{"updated_at": 12.5}"#).unwrap();
        assert_eq!(update.key.as_str(), "abc");
        assert_eq!(update.updated_at.to_string(), "12.5");
        assert!(parse_message("other.abc", br#"{"updated_at": 1}"#).is_err());
        assert!(parse_message("flagsmith.environment.abc", b"{}").is_err());
    }
}
