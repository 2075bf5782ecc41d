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
//!
//! # Layout
//! - this file: the backend, which stores updates, and its connection's events;
//! - `last_stored`: what this instance last saw stored, for the compare-and-set;
//! - `follower`: the task that follows the stream into the hub.

mod follower;
mod last_stored;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::connection::State;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use futures_util::future::{BoxFuture, FutureExt};
use prometheus::IntCounter;
use slog::{Logger, info};
use tokio_util::sync::CancellationToken;

use super::link::Link;
use super::{BackendError, Background, Readiness, Store, Stored};
use crate::config::NatsConfig;
use crate::domain::{Update, UpdatedAt};
use crate::hub::Hub;
use crate::metrics::{BackendMetrics, NatsMetrics};
use crate::secret;
use follower::{Follower, stream_config};
use last_stored::LastStored;

/// Subjects of all environments; one token per environment key follows the prefix.
pub const SUBJECT_PREFIX: &str = "flagsmith.environment.";
const SUBJECTS: &str = "flagsmith.environment.>";
/// The longest pause between two attempts to reconnect. async-nats waits up to 4 s, doubling
/// from 1 ms: after a two-second restart of NATS it could stay away for as long again, and a
/// publish waiting for it within Flagsmith's 2 s would give up first. An attempt against a
/// server that is down costs a refused connection.
const RECONNECT_DELAY_MAX: Duration = Duration::from_millis(250);

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
}
