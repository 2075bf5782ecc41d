//! The Prometheus metrics served at `/metricsz`, in the text exposition format 0.0.4.
//!
//! Every labelled series is resolved once, here, into a handle that is a shared atomic: the
//! hot paths (an event written to a subscriber, a keep-alive) add to an atomic and never touch
//! a lock, a map or the allocator. Labels have a few fixed values each; there is no label per
//! environment, whose keys are unbounded.
//!
//! The metrics use the classic text format rather than OpenMetrics on purpose: SPEC §1 names a
//! gauge `flagsmith_sse_subscribers` beside a counter `flagsmith_sse_subscribers_total`, which
//! OpenMetrics would read as one family twice.

use std::sync::atomic::{AtomicI64, Ordering};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::time::Instant;

const NAMESPACE: &str = "flagsmith_sse";

/// Publish latency buckets, in seconds: from an in-process store to Flagsmith's 2 s timeout.
const PUBLISH_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
];
/// Fan-out delay buckets, in seconds: from one subscriber to a hundred thousand.
const FANOUT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Every metric of the service, registered in a registry of its own (so that several services
/// in one test process never share counts).
pub struct Metrics {
    registry: Registry,
    pub streams: StreamMetrics,
    pub hub: HubMetrics,
    pub publish: PublishMetrics,
    pub backend: BackendMetrics,
    pub nats: NatsMetrics,
    pub redis: RedisMetrics,
    pub connections: ConnectionMetrics,
    pub writes: MessageCounters,
    pub errors: MessageCounters,
    /// Set from the service's state at each scrape.
    subscribers: IntGauge,
    environments: IntGauge,
}

/// The two kinds of frames a stream writes, and health-check answers: the `message` label of
/// `flagsmith_sse_http_writes_total` and `flagsmith_sse_http_errors_total`.
#[derive(Debug, Clone)]
pub struct MessageCounters {
    pub data: IntCounter,
    pub keepalive: IntCounter,
    pub healthcheck: IntCounter,
}

#[derive(Debug, Clone)]
pub struct StreamMetrics {
    pub opened: IntCounter,
    pub closed: ClosedCounters,
    pub coalesced: IntCounter,
}

/// `flagsmith_sse_streams_closed_total` by `reason`.
#[derive(Debug, Clone)]
pub struct ClosedCounters {
    pub client_gone: IntCounter,
    pub max_age: IntCounter,
    pub shutdown: IntCounter,
    pub rejected: IntCounter,
}

#[derive(Debug, Clone)]
pub struct HubMetrics {
    pub updates: IntCounter,
    pub fanout: Histogram,
}

#[derive(Debug, Clone)]
pub struct PublishMetrics {
    pub outcomes: PublishOutcomes,
    pub duration: Histogram,
}

/// `flagsmith_sse_publish_requests_total` by `outcome`.
#[derive(Debug, Clone)]
pub struct PublishOutcomes {
    pub stored: IntCounter,
    pub duplicate: IntCounter,
    pub unauthorized: IntCounter,
    pub throttled: IntCounter,
    pub bad_request: IntCounter,
    pub too_large: IntCounter,
    pub unavailable: IntCounter,
    pub timeout: IntCounter,
}

#[derive(Debug, Clone)]
pub struct BackendMetrics {
    pub connected: IntGauge,
    pub ready: IntGauge,
    pub reconnects: IntCounter,
}

/// `flagsmith_sse_nats_errors_total` by `operation`, and where the consumer is.
#[derive(Debug, Clone)]
pub struct NatsMetrics {
    pub connect: IntCounter,
    pub publish: IntCounter,
    pub create_jetstream: IntCounter,
    pub create_consumer: IntCounter,
    pub pull: IntCounter,
    pub read: IntCounter,
    pub ack: IntCounter,
    /// Publishes that found another update written since they read the stored one, and read
    /// again (compare and set).
    pub publish_conflicts: IntCounter,
    pub sequence: IntGauge,
    pub pending: IntGauge,
}

/// `flagsmith_sse_redis_errors_total` by `operation`, and the reloads of every update.
#[derive(Debug, Clone)]
pub struct RedisMetrics {
    pub connect: IntCounter,
    pub subscribe: IntCounter,
    pub publish: IntCounter,
    pub probe: IntCounter,
    pub resync: IntCounter,
    pub read: IntCounter,
    pub resyncs: IntCounter,
    pub resync_environments: IntGauge,
}

/// Open and accepted connections, by the protocol their first bytes chose.
#[derive(Debug, Clone)]
pub struct ConnectionMetrics {
    pub http1: ProtocolCounters,
    pub http2: ProtocolCounters,
    pub tls_handshake_errors: IntCounter,
    pub write_timeouts: IntCounter,
}

#[derive(Debug, Clone)]
pub struct ProtocolCounters {
    pub open: IntGauge,
    pub accepted: IntCounter,
}

impl Metrics {
    /// Registers every metric; `backend` names the backend in its labels.
    pub fn new(backend: &str) -> Self {
        let registry = Registry::new();
        let r = Registrar(&registry);

        let writes = r.counter_vec(
            "http_writes_total",
            "Messages written: data (an event to a subscriber), keepalive (a ping comment to a \
             subscriber), healthcheck (a health-check answer).",
            "message",
        );
        let errors = r.counter_vec(
            "http_errors_total",
            "Failed messages: data or keepalive, a stream whose connection failed after that \
             message was handed to it; healthcheck, a readiness check answered 503.",
            "message",
        );
        let messages = |vec: &IntCounterVec| MessageCounters {
            data: vec.with_label_values(&["data"]),
            keepalive: vec.with_label_values(&["keepalive"]),
            healthcheck: vec.with_label_values(&["healthcheck"]),
        };
        let closed = r.counter_vec(
            "streams_closed_total",
            "Streams closed, by reason: client_gone, max_age, shutdown, or rejected (over \
             max_streams, answered 503).",
            "reason",
        );
        let streams = StreamMetrics {
            opened: r.counter("subscribers_total", "Streams opened."),
            closed: ClosedCounters {
                client_gone: closed.with_label_values(&["client_gone"]),
                max_age: closed.with_label_values(&["max_age"]),
                shutdown: closed.with_label_values(&["shutdown"]),
                rejected: closed.with_label_values(&["rejected"]),
            },
            coalesced: r.counter(
                "events_coalesced_total",
                "Updates a subscriber skipped because a newer one for the same environment \
                 arrived before it could be written.",
            ),
        };
        let hub = HubMetrics {
            updates: r.counter(
                "updates_total",
                "Environment updates that were newer than the known one and were fanned out.",
            ),
            fanout: r.histogram(
                "fanout_delay_seconds",
                "From an update reaching this instance to its write to the last local \
                 subscriber waiting for it. Updates overtaken by a newer one first are not \
                 observed.",
                FANOUT_BUCKETS,
            ),
        };

        let outcomes = r.counter_vec(
            "publish_requests_total",
            "queue-change requests by outcome: stored, duplicate (already known), \
             unauthorized, throttled (refused after repeated failed authentications), \
             bad_request, too_large, unavailable (backend refused), timeout.",
            "outcome",
        );
        let outcome = |name: &str| outcomes.with_label_values(&[name]);
        let publish = PublishMetrics {
            outcomes: PublishOutcomes {
                stored: outcome("stored"),
                duplicate: outcome("duplicate"),
                unauthorized: outcome("unauthorized"),
                throttled: outcome("throttled"),
                bad_request: outcome("bad_request"),
                too_large: outcome("too_large"),
                unavailable: outcome("unavailable"),
                timeout: outcome("timeout"),
            },
            duration: r.histogram(
                "publish_duration_seconds",
                "Time to answer a queue-change request, whatever the outcome.",
                PUBLISH_BUCKETS,
            ),
        };

        let backend_metrics = BackendMetrics {
            connected: r
                .gauge_vec(
                    "backend_connected",
                    "1 while the backend connection is up.",
                    "backend",
                )
                .with_label_values(&[backend]),
            ready: r
                .gauge_vec(
                    "backend_ready",
                    "1 while the backend is connected and has loaded the newest updates \
                     (what /readyz reports).",
                    "backend",
                )
                .with_label_values(&[backend]),
            reconnects: r.counter(
                "backend_reconnects_total",
                "Times the backend connection came back after being lost.",
            ),
        };

        let nats_errors = r.counter_vec(
            "nats_errors_total",
            "NATS failures by operation: connect, publish, create_jetstream (ensure the \
             stream), create_consumer, pull (the consumer failed), read (an unreadable \
             message), ack (a publish JetStream did not acknowledge).",
            "operation",
        );
        let operation = |name: &str| nats_errors.with_label_values(&[name]);
        let nats = NatsMetrics {
            connect: operation("connect"),
            publish: operation("publish"),
            create_jetstream: operation("create_jetstream"),
            create_consumer: operation("create_consumer"),
            pull: operation("pull"),
            read: operation("read"),
            ack: operation("ack"),
            publish_conflicts: r.counter(
                "nats_publish_conflicts_total",
                "Publishes that found another update stored since they read the subject's last \
                 one, and compared again before storing theirs.",
            ),
            sequence: r.gauge(
                "nats_consumer_sequence",
                "Stream sequence of the last message this instance's consumer delivered.",
            ),
            pending: r.gauge(
                "nats_consumer_pending",
                "Messages in the stream this instance's consumer has yet to deliver (its lag).",
            ),
        };

        let redis_errors = r.counter_vec(
            "redis_errors_total",
            "Redis failures by operation: connect (the connection was lost, a command \
             failed, or no cluster node answered), subscribe, publish (an update not stored), probe (this instance's \
             probe did not come back through the channel), resync (a reload of every update \
             failed), read (an unreadable message or stored update).",
            "operation",
        );
        let operation = |name: &str| redis_errors.with_label_values(&[name]);
        let redis = RedisMetrics {
            connect: operation("connect"),
            subscribe: operation("subscribe"),
            publish: operation("publish"),
            probe: operation("probe"),
            resync: operation("resync"),
            read: operation("read"),
            resyncs: r.counter(
                "redis_resyncs_total",
                "Reloads of every stored update: on each (re)connection, and every \
                 resync_interval.",
            ),
            resync_environments: r.gauge(
                "redis_resync_environments",
                "Environments with an update within the retention window at the last reload.",
            ),
        };

        let open = r.gauge_vec(
            "connections",
            "Open client connections by protocol: http1 or http2.",
            "protocol",
        );
        let accepted = r.counter_vec(
            "connections_total",
            "Client connections by protocol: http1 or http2.",
            "protocol",
        );
        let protocol = |name: &str| ProtocolCounters {
            open: open.with_label_values(&[name]),
            accepted: accepted.with_label_values(&[name]),
        };
        let connections = ConnectionMetrics {
            http1: protocol("http1"),
            http2: protocol("http2"),
            tls_handshake_errors: r.counter(
                "tls_handshake_errors_total",
                "TLS handshakes that failed or timed out.",
            ),
            write_timeouts: r.counter(
                "write_timeouts_total",
                "Connections closed because the client read nothing for write_timeout.",
            ),
        };

        r.gauge_vec(
            "build_info",
            "Always 1; the version of the running binary is in the label.",
            "version",
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        #[cfg(target_os = "linux")]
        r.register(ProcessMetrics::for_self());

        Self {
            subscribers: r.gauge("subscribers", "Streams open now."),
            environments: r.gauge(
                "environments",
                "Environments held in memory: those with subscribers or a recent update.",
            ),
            registry,
            streams,
            hub,
            publish,
            backend: backend_metrics,
            nats,
            redis,
            connections,
            writes: messages(&writes),
            errors: messages(&errors),
        }
    }

    /// The text exposition of every metric, with the gauges read from state set first.
    pub fn render(&self, subscribers: usize, environments: usize, backend_ready: bool) -> String {
        self.subscribers.set(saturating_i64(subscribers));
        self.environments.set(saturating_i64(environments));
        self.backend.ready.set(i64::from(backend_ready));
        let mut text = Vec::new();
        // Encoding only fails on a registry whose metrics contradict each other, which the
        // registration above would have refused.
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .expect("metrics encode");
        String::from_utf8(text).expect("the text format is UTF-8")
    }

    /// The `Content-Type` of [`Metrics::render`]'s output.
    pub fn content_type() -> &'static str {
        prometheus::TEXT_FORMAT
    }
}

/// Prometheus' process metrics, with `process_start_time_seconds` computed here: the crate's
/// collector adds the boot time from `/proc/stat`, which the systemd unit's `ProcSubset=pid`
/// hides, and then reports 0.
#[cfg(target_os = "linux")]
struct ProcessMetrics {
    collector: prometheus::process_collector::ProcessCollector,
    start_time: prometheus::Gauge,
}

#[cfg(target_os = "linux")]
impl ProcessMetrics {
    const START_TIME: &'static str = "process_start_time_seconds";

    fn for_self() -> Self {
        let start_time = prometheus::Gauge::new(
            Self::START_TIME,
            "Start time of the process since unix epoch in seconds.",
        )
        .expect("gauge");
        if let Some(seconds) = process_start_time() {
            start_time.set(seconds);
        }
        Self {
            collector: prometheus::process_collector::ProcessCollector::for_self(),
            start_time,
        }
    }
}

#[cfg(target_os = "linux")]
impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut descs: Vec<_> = self
            .collector
            .desc()
            .into_iter()
            .filter(|desc| desc.fq_name != Self::START_TIME)
            .collect();
        descs.extend(self.start_time.desc());
        descs
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families: Vec<_> = self
            .collector
            .collect()
            .into_iter()
            .filter(|family| family.name() != Self::START_TIME)
            .collect();
        families.extend(self.start_time.collect());
        families
    }
}

/// When this process started, in Unix seconds: its start in clock ticks after boot (field 22
/// of `/proc/self/stat`, readable under `ProcSubset=pid`) after the boot time, which is now on
/// the real-time clock less now on the boot-time clock.
#[cfg(target_os = "linux")]
fn process_start_time() -> Option<f64> {
    use rustix::time::{ClockId, clock_gettime};
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name, in parentheses, may hold spaces and parentheses: count from after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let start_ticks: f64 = after_name.split_whitespace().nth(19)?.parse().ok()?;
    let since_boot = clock_gettime(ClockId::Boottime);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    let boot = now - (since_boot.tv_sec as f64 + since_boot.tv_nsec as f64 / 1e9);
    Some(boot + start_ticks / rustix::param::clock_ticks_per_second() as f64)
}

fn saturating_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Registers metrics under the namespace. The names and labels are constants of this module,
/// so a registration error is a programming error caught by every test.
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn register(&self, collector: impl prometheus::core::Collector + 'static) {
        self.0
            .register(Box::new(collector))
            .expect("metric registration");
    }

    fn opts(name: &str, help: &str) -> Opts {
        Opts::new(name, help).namespace(NAMESPACE)
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        let counter = IntCounter::with_opts(Self::opts(name, help)).expect("counter");
        self.register(counter.clone());
        counter
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let gauge = IntGauge::with_opts(Self::opts(name, help)).expect("gauge");
        self.register(gauge.clone());
        gauge
    }

    fn counter_vec(&self, name: &str, help: &str, label: &str) -> IntCounterVec {
        let vec = IntCounterVec::new(Self::opts(name, help), &[label]).expect("counter vec");
        self.register(vec.clone());
        vec
    }

    fn gauge_vec(&self, name: &str, help: &str, label: &str) -> IntGaugeVec {
        let vec = IntGaugeVec::new(Self::opts(name, help), &[label]).expect("gauge vec");
        self.register(vec.clone());
        vec
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help)
            .namespace(NAMESPACE)
            .buckets(buckets.to_vec());
        let histogram = Histogram::with_opts(opts).expect("histogram");
        self.register(histogram.clone());
        histogram
    }
}

/// Tracks one update's fan-out: how many local subscribers were waiting for it when it arrived,
/// and when it arrived. The subscriber that writes it last observes the delay; each write costs
/// one atomic subtraction.
#[derive(Debug)]
pub struct FanOut {
    waiting: AtomicI64,
    arrived: Instant,
    histogram: Histogram,
}

/// Subtracted when a newer update overtakes this one: later writes can no longer bring the
/// count to exactly zero, so an overtaken update is never observed.
const OVERTAKEN: i64 = 1 << 48;

impl FanOut {
    pub fn new(waiting: usize, histogram: &Histogram) -> Self {
        Self {
            waiting: AtomicI64::new(saturating_i64(waiting)),
            arrived: Instant::now(),
            histogram: histogram.clone(),
        }
    }

    /// One waiting subscriber has written the update, or has left without it.
    pub fn written(&self) {
        if self.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.histogram.observe(self.arrived.elapsed().as_secs_f64());
        }
    }

    /// A newer update replaced this one before every subscriber wrote it.
    pub fn overtaken(&self) {
        self.waiting.fetch_sub(OVERTAKEN, Ordering::AcqRel);
    }
}
