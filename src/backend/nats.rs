//! The NATS JetStream backend.
//!
//! Every environment is a subject `flagsmith.environment.<key>` in one stream that keeps the
//! last message per subject for the retention window. Publishing is a compare-and-set on the
//! subject's last sequence, so that the stream holds the newest `updated_at` rather than the
//! last written, and waits for the JetStream ack.
//!
//! Each instance reads the stream through exactly one ordered consumer, whatever its number of
//! subscribers: it starts with the last message of every subject and then follows new ones,
//! feeding the hub. The ordered consumer recreates itself after a gap or a reconnect, resuming
//! from the last stream sequence it delivered, so the newest value of an environment is never
//! skipped: with one message per subject, the newest one is always at or after that sequence.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::connection::State;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, FutureExt};
use prometheus::IntCounter;
use slog::{Logger, debug, error, info, warn};
use tokio_util::sync::CancellationToken;

use super::link::Link;
use super::{BackendError, Background, Readiness, Store, Stored};
use crate::config::{NatsConfig, NatsStorage};
use crate::domain::{EnvironmentKey, Update, UpdatedAt};
use crate::hub::Hub;
use crate::metrics::{BackendMetrics, NatsMetrics};
use crate::secret;

/// Subjects of all environments; one token per environment key follows the prefix.
pub const SUBJECT_PREFIX: &str = "flagsmith.environment.";
const SUBJECTS: &str = "flagsmith.environment.>";
/// Retries of the same update within this window are stored once.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long each pull of the ordered consumer waits for messages; the server sends an idle
/// heartbeat every half of it. An ordered consumer lives on one NATS node, and when that node
/// dies the client recreates it after two missed heartbeats. With async-nats's defaults (30 s
/// pulls, 15 s heartbeats) an instance whose consumer died with a cluster node heard nothing
/// for over half a minute while it reported ready; with these it is 2 to 4 s. It costs an idle
/// instance one pull request every 2 s and a heartbeat every second.
const CONSUMER_PULL_EXPIRES: Duration = Duration::from_secs(2);
/// The longest pause between two attempts to reconnect. async-nats waits up to 4 s, doubling
/// from 1 ms: after a two-second restart of NATS it could stay away for as long again, and a
/// publish waiting for it within Flagsmith's 2 s would give up first. An attempt against a
/// server that is down costs a refused connection.
const RECONNECT_DELAY_MAX: Duration = Duration::from_millis(250);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub struct NatsBackend {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// The stream, for reading an environment's stored update before replacing it.
    stream: stream::Stream<()>,
    last_stored: Arc<LastStored>,
    link: Arc<Link>,
    follower: Background,
    servers: String,
    metrics: NatsMetrics,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot use NATS url {url:?}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use JetStream stream {name:?}: {source}")]
    Stream {
        name: String,
        source: jetstream::context::GetStreamError,
    },
}

impl NatsBackend {
    /// Connects in the background (the service starts while NATS is down) and starts the
    /// consumer, which ensures the stream as soon as NATS answers.
    pub async fn start(
        config: &NatsConfig,
        hub: Arc<Hub>,
        backend_metrics: BackendMetrics,
        metrics: NatsMetrics,
        stop: CancellationToken,
        log: &Logger,
    ) -> Result<Self, NatsError> {
        let log = log.new(slog::o!("backend" => "nats"));
        let link = Arc::new(Link::new("nats error", backend_metrics, log.clone()));
        let events = Arc::new(ConnectionEvents {
            link: link.clone(),
            connect_errors: metrics.connect.clone(),
            log: log.clone(),
        });
        let mut options = async_nats::ConnectOptions::new()
            .name("flagsmith-sse")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(reconnect_delay)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let events = events.clone();
                async move { events.record(event) }
            });
        if let Some(path) = &config.credentials_file {
            secret::check_permissions(path, "nats credentials", &log);
            options =
                options
                    .credentials_file(path)
                    .await
                    .map_err(|source| NatsError::Credentials {
                        path: path.clone(),
                        source,
                    })?;
        }
        // async-nats reads a string as one URL: a cluster's list is given as several.
        let servers: Vec<&str> = config.url.split(',').map(str::trim).collect();
        let client = options
            .connect(servers)
            .await
            .map_err(|source| NatsError::Connect {
                url: config.redacted_url(),
                source,
            })?;
        let jetstream = jetstream::new(client.clone());
        // Validated with the configuration; this makes no request.
        let stream = jetstream
            .get_stream_no_info(&config.stream)
            .await
            .map_err(|source| NatsError::Stream {
                name: config.stream.clone(),
                source,
            })?;
        let last_stored = Arc::new(LastStored::default());
        let follower = Follower {
            jetstream: jetstream.clone(),
            last_stored: last_stored.clone(),
            stream_config: stream_config(config, hub.retention()),
            hub,
            link: link.clone(),
            metrics: metrics.clone(),
            log: log.clone(),
        };
        Ok(Self {
            client,
            jetstream,
            stream,
            last_stored,
            link,
            follower: Background::spawn(stop, |stop| follower.run(stop)),
            servers: config.redacted_url(),
            metrics,
        })
    }
}

/// What this instance last saw stored for each environment: the update and its stream
/// sequence, from its own publishes' acks and from its consumer. A publish expects that
/// sequence, so that storing an update usually takes one round trip; when another update was
/// stored since, JetStream refuses the expectation and the publish reads the stream instead.
/// One entry per environment stored while this instance ran, a few dozen bytes each.
#[derive(Default)]
struct LastStored(Mutex<HashMap<EnvironmentKey, (UpdatedAt, u64)>>);

impl LastStored {
    fn get(&self, key: &EnvironmentKey) -> Option<(UpdatedAt, u64)> {
        self.0
            .lock()
            .unwrap_or_else(|err| err.into_inner())
            .get(key)
            .copied()
    }

    /// Keeps the later of what is known and `sequence`: the consumer may deliver a message
    /// after the ack of a newer one.
    fn record(&self, update: &Update, sequence: u64) {
        let mut known = self.0.lock().unwrap_or_else(|err| err.into_inner());
        match known.get_mut(&update.key) {
            Some(entry) if entry.1 >= sequence => {}
            Some(entry) => *entry = (update.updated_at, sequence),
            None => {
                known.insert(update.key.clone(), (update.updated_at, sequence));
            }
        }
    }

    fn forget(&self, key: &EnvironmentKey) {
        self.0
            .lock()
            .unwrap_or_else(|err| err.into_inner())
            .remove(key);
    }

    /// After the stream was recreated, whose sequences start again.
    fn clear(&self) {
        self.0.lock().unwrap_or_else(|err| err.into_inner()).clear();
    }
}

/// What the stream holds for an environment, compared with an update to store.
enum InStream {
    /// The same update or a newer one: storing this one would change nothing, or go back.
    Newer {
        updated_at: UpdatedAt,
        stored_at: SystemTime,
    },
    /// An older update at this sequence, or none (sequence 0), or one that cannot be read.
    Older { sequence: u64 },
}

impl NatsBackend {
    async fn stored_for(&self, subject: &str, update: &Update) -> Result<InStream, BackendError> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => match UpdatedAt::from_body(&message.payload) {
                Ok(stored) if stored >= update.updated_at => Ok(InStream::Newer {
                    updated_at: stored,
                    stored_at: SystemTime::from(message.time),
                }),
                _ => Ok(InStream::Older {
                    sequence: message.sequence,
                }),
            },
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => {
                Ok(InStream::Older { sequence: 0 })
            }
            Err(err) => {
                self.metrics.publish.inc();
                Err(BackendError::NotAcknowledged(format!(
                    "cannot read the stored update: {err}"
                )))
            }
        }
    }
}

/// What the client reports about its connection: the state for the follower and the
/// metrics, and one log line per change of state.
struct ConnectionEvents {
    link: Arc<Link>,
    connect_errors: IntCounter,
    log: Logger,
}

impl ConnectionEvents {
    fn record(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => self.link.connected(),
            async_nats::Event::Disconnected => self.link.disconnected("the connection closed"),
            async_nats::Event::ClientError(_) | async_nats::Event::ServerError(_) => {
                self.connect_errors.inc();
                self.link.failed(&event.to_string());
            }
            other => info!(self.log, "nats event"; "event" => %other),
        }
    }
}

impl Store for NatsBackend {
    fn store(&self, update: Update) -> BoxFuture<'_, Result<Option<Stored>, BackendError>> {
        async move {
            // Queuing a publish while disconnected would only end in a timeout; answer now.
            if self.client.connection_state() != State::Connected {
                self.metrics.publish.inc();
                return Err(BackendError::Unavailable("not connected to NATS".into()));
            }
            let subject = format!("{SUBJECT_PREFIX}{}", update.key);
            // Compare and set: the stream keeps one message per subject, so a plain publish of
            // an older update (a retried task, another instance) would replace a newer one,
            // and instances started later would serve it. Each attempt expects the subject's
            // last sequence, as last seen here or else as read; another write in between fails
            // it, and it reads again. Every retry follows a write of another update, so this
            // ends; the caller's publish_timeout bounds it.
            let mut last_seen = self.last_stored.get(&update.key);
            loop {
                let expected = match last_seen.take() {
                    // Stored values only grow, so the stream holds this one or a newer one, and
                    // the hub got it when it was seen.
                    Some((stored, _)) if stored >= update.updated_at => return Ok(None),
                    Some((_, sequence)) => sequence,
                    None => match self.stored_for(&subject, &update).await? {
                        InStream::Newer {
                            updated_at,
                            stored_at,
                        } => {
                            return Ok(Some(Stored {
                                update: Update {
                                    key: update.key,
                                    updated_at,
                                },
                                at: stored_at,
                            }));
                        }
                        InStream::Older { sequence } => sequence,
                    },
                };
                let message = PublishMessage::build()
                    .payload(update.payload().into())
                    .message_id(update.message_id())
                    .expected_last_subject_sequence(expected);
                let ack = self
                    .jetstream
                    .send_publish(subject.clone(), message)
                    .await
                    .map_err(|err| {
                        self.metrics.publish.inc();
                        BackendError::NotAcknowledged(err.to_string())
                    })?;
                match ack.await {
                    Ok(ack) => {
                        self.last_stored.record(&update, ack.sequence);
                        break;
                    }
                    Err(err) if is_wrong_last_sequence(&err) => {
                        self.metrics.publish_conflicts.inc();
                        self.last_stored.forget(&update.key);
                    }
                    Err(err) => {
                        self.metrics.ack.inc();
                        return Err(BackendError::NotAcknowledged(err.to_string()));
                    }
                }
            }
            Ok(Some(Stored::now(update)))
        }
        .boxed()
    }

    fn readiness(&self) -> Readiness {
        self.link.readiness()
    }

    fn describe(&self) -> String {
        format!("nats jetstream at {}", self.servers)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            self.follower.stop().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
        }
        .boxed()
    }
}

fn stream_config(config: &NatsConfig, retention: Duration) -> stream::Config {
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
struct Follower {
    jetstream: jetstream::Context,
    last_stored: Arc<LastStored>,
    stream_config: stream::Config,
    hub: Arc<Hub>,
    /// The client's connection, as its events report it, and whether the consumer has
    /// delivered every update that existed when it started.
    link: Arc<Link>,
    metrics: NatsMetrics,
    log: Logger,
}

impl Follower {
    async fn run(mut self, stop: CancellationToken) {
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
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                // A restarted server forgets our ephemeral consumer, and missed heartbeats
                // would take many seconds to tell; start over from our last sequence as soon
                // as the client is connected again.
                () = self.link.until_connected(false) => {
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

/// Whether JetStream refused a publish's expected last subject sequence: error 10071 from a
/// single server, 10164 (the same refusal, worded without the sequence) from a clustered
/// stream's leader, which async-nats 0.51 reports as `Other`.
fn is_wrong_last_sequence(err: &PublishError) -> bool {
    err.kind() == PublishErrorKind::WrongLastSequence
        || std::error::Error::source(err)
            .and_then(|source| source.downcast_ref::<jetstream::Error>())
            .is_some_and(|error| {
                error.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            })
}

/// The pause before reconnection attempt `attempts`: none for the first, then doubling from
/// 2 ms up to [`RECONNECT_DELAY_MAX`].
fn reconnect_delay(attempts: usize) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
    match attempts {
        0 | 1 => Duration::ZERO,
        _ => Duration::from_millis(2_u64.saturating_pow(doublings)).min(RECONNECT_DELAY_MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnection_attempts_are_never_far_apart() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(2));
        assert_eq!(reconnect_delay(5), Duration::from_millis(16));
        assert_eq!(reconnect_delay(9), RECONNECT_DELAY_MAX);
        assert_eq!(reconnect_delay(usize::MAX), RECONNECT_DELAY_MAX);
    }

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
