//! The fan-out scenario: N subscribers over E environments, then numbered updates published
//! through `queue-change`, each timed from the moment its publish was sent to the moment each
//! subscriber read it.
//!
//! Phases: publish update 0 to every environment; connect every subscriber (each gets update 0
//! as its first event, as a reconnecting SDK would); let the service settle and weigh it; publish
//! updates 1..=U at a fixed interval; wait until every subscriber has the last one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Protocol, Target};
use crate::events::{Block, Numbering, SseReader};
use crate::h1::Http1Stream;
use crate::h2::{Event, Http2Connection};
use crate::measure::{Percentiles, ProcessSample, ProcessUse, StreamState};
use crate::publish::Publisher;
use crate::{Common, Error, seconds};

/// Publishes of one round go out over this many connections at once.
const PUBLISH_CONNECTIONS: usize = 8;
/// Subscribers driven by one task, on HTTP/2 in whole connections.
const STREAMS_PER_TASK: usize = 1024;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base URL of the listener serving streams.
    #[arg(long, default_value = "http://127.0.0.1:8088")]
    url: String,
    /// Base URL of the listener serving queue-change, when it is a separate one.
    #[arg(long)]
    publish_url: Option<String>,
    /// Streams to open.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Environments the streams are spread over, round robin.
    #[arg(long, default_value_t = 1)]
    environments: usize,
    /// HTTP version of the streams: 1 (a connection each) or 2 (multiplexed).
    #[arg(long = "http", value_enum, default_value = "1")]
    protocol: Protocol,
    /// HTTP/2 streams per connection; keep it at or below the service's
    /// http2.max_concurrent_streams.
    #[arg(long, default_value_t = 500)]
    streams_per_connection: usize,
    /// Numbered updates to publish after update 0, to every environment.
    #[arg(long, default_value_t = 10)]
    updates: u64,
    /// Seconds between two updates.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds to wait once every stream is open, before weighing the idle service.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Seconds each phase (connecting, delivering) may take before the run gives up on it.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub protocol: Protocol,
    pub subscribers: usize,
    pub environments: usize,
    pub connections: usize,
    pub updates: u64,
    /// Streams that answered `200` and delivered a first event.
    pub connected: usize,
    /// Streams that failed, by reason.
    pub errors: BTreeMap<String, usize>,
    /// Subscribers that received every update, 1..=U.
    pub complete: usize,
    /// (subscriber, update) pairs never received.
    pub missed: u64,
    /// Events that were not well-formed `environment_updated` events.
    pub malformed: u64,
    /// Streams the service ended (max_stream_age) that the subscriber opened again.
    pub reopened: u64,
    /// From starting to connect to the response headers.
    pub connect: Option<Percentiles>,
    /// From starting to connect to the first event (update 0, the newest when it connected).
    pub first_event: Option<Percentiles>,
    /// From sending a publish to reading the event, over every subscriber and update.
    pub fanout: Option<Percentiles>,
    /// `queue-change` round trips of updates 1..=U.
    pub publish: Option<Percentiles>,
    pub service: Option<ServiceUse>,
    /// This generator's own CPU time while the updates were published and delivered: it
    /// shares the machine with the service.
    pub generator_delivering_cpu_seconds: f64,
    pub nats: Option<NatsUse>,
    pub redis: Option<RedisUse>,
    pub duration_seconds: f64,
}

impl Report {
    /// Whether every subscriber connected and received every update.
    pub fn is_complete(&self) -> bool {
        self.connected == self.subscribers && self.complete == self.subscribers
    }
}

#[derive(Debug, Serialize)]
pub struct ServiceUse {
    /// RSS the open, idle streams added, per stream.
    pub idle_rss_per_subscriber_kib: f64,
    /// While the streams were opening (and settling).
    pub connecting: ProcessUse,
    /// While the updates were published and delivered.
    pub delivering: ProcessUse,
}

#[derive(Debug, Serialize)]
pub struct NatsUse {
    pub without_subscribers: StreamState,
    pub with_subscribers: StreamState,
}

/// Subscriptions on the Redis update channel, before the streams opened and while they were
/// open: the service keeps one per instance, whatever its subscribers.
#[derive(Debug, Serialize)]
pub struct RedisUse {
    pub subscriptions_without_subscribers: u64,
    pub subscriptions_with_subscribers: u64,
}

/// What the subscriber tasks and the publisher share.
struct Shared {
    started: Instant,
    /// Per update and environment: when its publish was sent (µs since `started`).
    published: Vec<AtomicU64>,
    /// Per update: subscribers that have it.
    arrived: Vec<AtomicUsize>,
    /// Subscribers that failed for good.
    failed: AtomicUsize,
    /// Caps connections being opened; a connection holds a permit until its streams' first
    /// events.
    connecting: Semaphore,
    numbering: Numbering,
    environments: usize,
    updates: u64,
    stop: CancellationToken,
}

impl Shared {
    fn now(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    fn published_at(&self, update: u64, environment: usize) -> u64 {
        self.published[update as usize * self.environments + environment].load(Ordering::Acquire)
    }

    fn arrived(&self, update: u64) -> usize {
        self.arrived[update as usize].load(Ordering::Acquire)
    }

    /// Waits until every subscriber still alive has `update`, or `limit` passes.
    async fn wait_for_all(&self, update: u64, subscribers: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.arrived(update) + self.failed.load(Ordering::Acquire) >= subscribers {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// What one subscriber saw.
struct Record {
    environment: usize,
    connect: Option<u64>,
    first_event: Option<u64>,
    /// Per update: when it was read (µs since the start), if it was.
    received: Vec<Option<u64>>,
    malformed: u64,
    reopened: u64,
    error: Option<String>,
}

impl Record {
    fn new(environment: usize, updates: u64) -> Self {
        Self {
            environment,
            connect: None,
            first_event: None,
            received: vec![None; updates as usize + 1],
            malformed: 0,
            reopened: 0,
            error: None,
        }
    }

    /// Ends the subscriber for good with `error`.
    fn fail(&mut self, error: String, shared: &Shared) {
        self.error = Some(error);
        shared.failed.fetch_add(1, Ordering::AcqRel);
    }
}

impl Args {
    pub fn common(&self) -> &Common {
        &self.common
    }
}

pub async fn run(args: Args) -> Result<Report, Error> {
    let common = &args.common;
    if args.subscribers == 0 || args.environments == 0 || args.streams_per_connection == 0 {
        return Err(
            "--subscribers, --environments and --streams-per-connection must be > 0".into(),
        );
    }
    let target = Arc::new(Target::new(
        &args.url,
        args.protocol,
        common.ca_file.as_deref(),
        common.sources,
    )?);
    let publish_target = Arc::new(Target::new(
        args.publish_url.as_deref().unwrap_or(&args.url),
        Protocol::Http1,
        common.ca_file.as_deref(),
        1,
    )?);
    let token = common.token()?;
    let jetstream = common.jetstream().await?;
    let redis = common.redis().await?;
    let limit = seconds("--timeout", args.timeout)?;
    let settle = seconds("--settle", args.settle)?;
    let interval = seconds("--interval", args.interval)?;
    let run_id = crate::run_id();
    let keys: Vec<String> = (0..args.environments)
        .map(|e| format!("bench-{run_id}-{e}"))
        .collect();
    let slots = (args.updates as usize + 1) * args.environments;
    let shared = Arc::new(Shared {
        started: Instant::now(),
        published: (0..slots).map(|_| AtomicU64::new(u64::MAX)).collect(),
        arrived: (0..=args.updates).map(|_| AtomicUsize::new(0)).collect(),
        failed: AtomicUsize::new(0),
        connecting: Semaphore::new(args.connect_concurrency.max(1)),
        numbering: Numbering::starting_now(),
        environments: args.environments,
        updates: args.updates,
        stop: CancellationToken::new(),
    });

    let mut publishers = Vec::new();
    for n in 0..PUBLISH_CONNECTIONS.min(args.environments) {
        publishers.push(Publisher::connect(publish_target.clone(), n, &token).await?);
    }
    let nats_before = match &jetstream {
        Some(jetstream) => Some(jetstream.state().await?),
        None => None,
    };
    let redis_before = match &redis {
        Some(redis) => Some(redis.subscriptions().await?),
        None => None,
    };
    let mut publish_times = Vec::new();
    publish_round(&mut publishers, &keys, 0, &shared, &mut publish_times).await?;
    let before = common.pid.map(ProcessSample::read).transpose()?;

    eprintln!(
        "opening {} {} streams over {} environment(s)...",
        args.subscribers, args.protocol, args.environments
    );
    let streams_per_connection = match args.protocol {
        Protocol::Http1 => 1,
        Protocol::Http2 => args.streams_per_connection,
    };
    let connection_count = args.subscribers.div_ceil(streams_per_connection);
    // Subscribers run in groups, one task per few HTTP/1.1 streams or HTTP/2 connections: an
    // update then wakes the generator's scheduler once per group, not once per stream, which
    // keeps the generator's own CPU use down on the machine it shares with the service.
    let connections_per_task = (STREAMS_PER_TASK / streams_per_connection).max(1);
    let mut tasks = JoinSet::new();
    for first in (0..connection_count).step_by(connections_per_task) {
        let group: FuturesUnordered<_> = (first
            ..connection_count.min(first + connections_per_task))
            .map(|n| {
                let subscribers = (n * streams_per_connection
                    ..args.subscribers.min((n + 1) * streams_per_connection))
                    .map(|i| (keys[i % args.environments].clone(), i % args.environments))
                    .collect();
                subscribe(
                    target.clone(),
                    args.protocol,
                    n,
                    subscribers,
                    shared.clone(),
                )
            })
            .collect();
        tasks.spawn(async move {
            let records: Vec<Vec<Record>> = group.collect().await;
            records.into_iter().flatten().collect::<Vec<Record>>()
        });
    }
    if !shared.wait_for_all(0, args.subscribers, limit).await {
        eprintln!(
            "only {} of {} streams delivered update 0 within {:?}",
            shared.arrived(0),
            args.subscribers,
            limit
        );
    }
    tokio::time::sleep(settle).await;
    let idle = common.pid.map(ProcessSample::read).transpose()?;
    let generator_idle = ProcessSample::read(std::process::id())?;
    let nats_with = match &jetstream {
        Some(jetstream) => Some(jetstream.state().await?),
        None => None,
    };
    let redis_with = match &redis {
        Some(redis) => Some(redis.subscriptions().await?),
        None => None,
    };
    let connected = shared.arrived(0);

    eprintln!(
        "{connected} streams open; publishing {} updates...",
        args.updates
    );
    publish_times.clear();
    let mut next = Instant::now();
    for update in 1..=args.updates {
        tokio::time::sleep_until(next).await;
        next += interval;
        publish_round(&mut publishers, &keys, update, &shared, &mut publish_times).await?;
    }
    if args.updates > 0
        && !shared
            .wait_for_all(args.updates, args.subscribers, limit)
            .await
    {
        eprintln!(
            "only {} of {} streams received the last update within {:?}",
            shared.arrived(args.updates),
            args.subscribers,
            limit
        );
    }
    let delivered = common.pid.map(ProcessSample::read).transpose()?;
    let generator = ProcessUse::between(generator_idle, ProcessSample::read(std::process::id())?);

    shared.stop.cancel();
    let mut records = Vec::with_capacity(args.subscribers);
    while let Some(group) = tasks.join_next().await {
        records.extend(group?);
    }
    let service = match (before, idle, delivered) {
        (Some(before), Some(idle), Some(delivered)) => Some(ServiceUse {
            idle_rss_per_subscriber_kib: idle.rss_kib.saturating_sub(before.rss_kib) as f64
                / connected.max(1) as f64,
            connecting: ProcessUse::between(before, idle),
            delivering: ProcessUse::between(idle, delivered),
        }),
        _ => None,
    };
    let nats = match (nats_before, nats_with) {
        (Some(without_subscribers), Some(with_subscribers)) => Some(NatsUse {
            without_subscribers,
            with_subscribers,
        }),
        _ => None,
    };
    let redis = match (redis_before, redis_with) {
        (Some(without_subscribers), Some(with_subscribers)) => Some(RedisUse {
            subscriptions_without_subscribers: without_subscribers,
            subscriptions_with_subscribers: with_subscribers,
        }),
        _ => None,
    };
    let mut report = summarise(&args, connection_count, &shared, records, publish_times);
    report.service = service;
    report.generator_delivering_cpu_seconds = generator.cpu_seconds;
    report.nats = nats;
    report.redis = redis;
    Ok(report)
}

/// Publishes `update` to every environment, spread over the publishers.
async fn publish_round(
    publishers: &mut [Publisher],
    keys: &[String],
    update: u64,
    shared: &Shared,
    times: &mut Vec<u64>,
) -> Result<(), Error> {
    let count = publishers.len();
    let rounds = publishers
        .iter_mut()
        .enumerate()
        .map(|(p, publisher)| async move {
            let mut times = Vec::new();
            for environment in (p..keys.len()).step_by(count) {
                let body = shared.numbering.body(update);
                let sent = shared.now();
                shared.published[update as usize * shared.environments + environment]
                    .store(sent, Ordering::Release);
                let status = publisher.publish(&keys[environment], body).await?;
                if status != 200 {
                    return Err(Error::from(format!(
                        "queue-change for {} answered {status}",
                        keys[environment]
                    )));
                }
                times.push(shared.now() - sent);
            }
            Ok(times)
        });
    for round in futures_util::future::join_all(rounds).await {
        times.extend(round?);
    }
    Ok(())
}

/// The subscribers of one connection, the `n`th of the run: each opens its stream and reads
/// events until the run stops, and opens it again if the service ends it, as SDKs do. Each is
/// given as its environment's key and number.
async fn subscribe(
    target: Arc<Target>,
    protocol: Protocol,
    n: usize,
    subscribers: Vec<(String, usize)>,
    shared: Arc<Shared>,
) -> Vec<Record> {
    let mut records: Vec<Record> = subscribers
        .iter()
        .map(|&(_, environment)| Record::new(environment, shared.updates))
        .collect();
    let paths: Vec<String> = subscribers
        .iter()
        .map(|(key, _)| format!("/sse/environments/{key}/stream"))
        .collect();
    let permit = shared.connecting.acquire().await.expect("never closed");
    let read = async {
        match protocol {
            Protocol::Http1 => {
                read_http1(&target, n, &paths[0], &shared, &mut records[0], permit).await
            }
            Protocol::Http2 => read_http2(&target, n, &paths, &shared, &mut records, permit).await,
        }
    };
    let result = tokio::select! {
        () = shared.stop.cancelled() => Ok(()),
        result = read => result,
    };
    if let Err(err) = result {
        for record in records.iter_mut().filter(|record| record.error.is_none()) {
            record.fail(err.to_string(), &shared);
        }
    }
    records
}

/// Reads an HTTP/1.1 stream, and opens it again each time the service ends it.
async fn read_http1(
    target: &Target,
    n: usize,
    path: &str,
    shared: &Shared,
    record: &mut Record,
    permit: SemaphorePermit<'_>,
) -> Result<(), Error> {
    let mut permit = Some(permit);
    loop {
        let mut events = Events::new(shared);
        let mut stream = Http1Stream::open(target, n, path).await?;
        record.connect.get_or_insert(shared.now() - events.started);
        while stream.read(|data| events.push(record, data)).await? {
            if record.first_event.is_some() {
                permit.take();
            }
        }
        if record.first_event.is_none() {
            return Err("stream ended before its first event".into());
        }
        record.reopened += 1;
    }
}

/// Opens an HTTP/2 connection with a stream for each of `records`, reads them, and opens a
/// stream again each time the service ends one.
async fn read_http2(
    target: &Target,
    n: usize,
    paths: &[String],
    shared: &Shared,
    records: &mut [Record],
    permit: SemaphorePermit<'_>,
) -> Result<(), Error> {
    let mut permit = Some(permit);
    let mut connection = Http2Connection::open(target, n).await?;
    // Each open stream's subscriber, and its events.
    let mut streams = HashMap::new();
    for (i, path) in paths.iter().enumerate() {
        streams.insert(connection.get(path), (i, Events::new(shared)));
    }
    let mut ended = Vec::new();
    loop {
        connection.flush().await?;
        let open = connection
            .read(|event| {
                let (stream, data, end) = match event {
                    Event::Head {
                        stream,
                        status,
                        ended,
                    } => {
                        let Some((i, events)) = streams.get(&stream) else {
                            return;
                        };
                        if status != 200 {
                            records[*i].fail(format!("stream answered {status}"), shared);
                            streams.remove(&stream);
                            return;
                        }
                        records[*i]
                            .connect
                            .get_or_insert(shared.now() - events.started);
                        (stream, &[][..], ended)
                    }
                    Event::Data {
                        stream,
                        data,
                        ended,
                    } => (stream, data, ended),
                    Event::Reset { stream, code } => {
                        if let Some((i, _)) = streams.remove(&stream) {
                            records[i].fail(format!("stream reset with error {code:#x}"), shared);
                        }
                        return;
                    }
                };
                let Some((i, events)) = streams.get_mut(&stream) else {
                    return;
                };
                events.push(&mut records[*i], data);
                if end {
                    ended.push(stream);
                }
            })
            .await?;
        for stream in ended.drain(..) {
            let Some((i, _)) = streams.remove(&stream) else {
                continue;
            };
            if records[i].first_event.is_none() {
                records[i].fail("stream ended before its first event".into(), shared);
            } else {
                records[i].reopened += 1;
                streams.insert(connection.get(&paths[i]), (i, Events::new(shared)));
            }
        }
        if permit.is_some()
            && records
                .iter()
                .all(|record| record.first_event.is_some() || record.error.is_some())
        {
            permit.take();
        }
        if !open {
            return Err("the service closed the connection".into());
        }
    }
}

/// The events of one stream, recorded as they are read.
struct Events<'a> {
    shared: &'a Shared,
    /// When the stream was requested (µs since the start).
    started: u64,
    reader: SseReader,
}

impl<'a> Events<'a> {
    fn new(shared: &'a Shared) -> Self {
        Self {
            shared,
            started: shared.now(),
            reader: SseReader::default(),
        }
    }

    fn push(&mut self, record: &mut Record, data: &[u8]) {
        let now = self.shared.now();
        let (shared, started) = (self.shared, self.started);
        self.reader.push(data, |block| match block {
            Block::Update(updated_at) => {
                record.first_event.get_or_insert(now - started);
                let Some(update) = shared.numbering.number(updated_at) else {
                    record.malformed += 1;
                    return;
                };
                match record.received.get_mut(update as usize) {
                    Some(slot @ None) => {
                        *slot = Some(now);
                        shared.arrived[update as usize].fetch_add(1, Ordering::AcqRel);
                    }
                    // Again, after the stream was opened anew.
                    Some(Some(_)) => {}
                    None => record.malformed += 1,
                }
            }
            Block::Control => {}
            Block::Malformed => record.malformed += 1,
        });
    }
}

fn summarise(
    args: &Args,
    connections: usize,
    shared: &Shared,
    records: Vec<Record>,
    publish_times: Vec<u64>,
) -> Report {
    let mut errors = BTreeMap::new();
    let (mut connect, mut first_event, mut fanout) = (Vec::new(), Vec::new(), Vec::new());
    let (mut complete, mut missed, mut malformed, mut reopened) = (0, 0, 0, 0);
    for record in &records {
        if let Some(error) = &record.error {
            *errors.entry(error.clone()).or_insert(0) += 1;
        }
        connect.extend(record.connect);
        first_event.extend(record.first_event);
        malformed += record.malformed;
        reopened += record.reopened;
        let mut missing = 0;
        for update in 1..=args.updates {
            match record.received[update as usize] {
                Some(at) => {
                    fanout.push(at.saturating_sub(shared.published_at(update, record.environment)))
                }
                None => missing += 1,
            }
        }
        if missing == 0 && record.first_event.is_some() {
            complete += 1;
        }
        missed += missing;
    }
    Report {
        protocol: args.protocol,
        subscribers: args.subscribers,
        environments: args.environments,
        connections,
        updates: args.updates,
        connected: records
            .iter()
            .filter(|record| record.first_event.is_some())
            .count(),
        errors,
        complete,
        missed,
        malformed,
        reopened,
        connect: Percentiles::of(connect),
        first_event: Percentiles::of(first_event),
        fanout: Percentiles::of(fanout),
        publish: Percentiles::of(publish_times),
        service: None,
        generator_delivering_cpu_seconds: 0.0,
        nats: None,
        redis: None,
        duration_seconds: shared.started.elapsed().as_secs_f64(),
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "fan-out: {} {} subscribers on {} connection(s), {} environment(s), {} updates, {:.1} s",
            self.subscribers,
            self.protocol,
            self.connections,
            self.environments,
            self.updates,
            self.duration_seconds
        )?;
        writeln!(
            f,
            "  connected       {} of {}; every update received by {} ({} deliveries missed, {} malformed, {} streams reopened)",
            self.connected,
            self.subscribers,
            self.complete,
            self.missed,
            self.malformed,
            self.reopened
        )?;
        for (error, count) in &self.errors {
            writeln!(f, "  failed          {count} × {error}")?;
        }
        let line = |f: &mut std::fmt::Formatter<'_>, name: &str, figures: &Option<Percentiles>| {
            match figures {
                Some(figures) => writeln!(f, "  {name:<15} {figures}"),
                None => writeln!(f, "  {name:<15} -"),
            }
        };
        line(f, "connect", &self.connect)?;
        line(f, "first event", &self.first_event)?;
        line(f, "fan-out", &self.fanout)?;
        line(f, "publish", &self.publish)?;
        if let Some(service) = &self.service {
            writeln!(
                f,
                "  service RSS     {} KiB before, {} KiB with streams open: {:.2} KiB per idle subscriber",
                service.connecting.rss_before_kib,
                service.connecting.rss_after_kib,
                service.idle_rss_per_subscriber_kib
            )?;
            writeln!(
                f,
                "  service CPU     {:.2} s while connecting, {:.2} s while delivering",
                service.connecting.cpu_seconds, service.delivering.cpu_seconds
            )?;
        }
        writeln!(
            f,
            "  generator CPU   {:.2} s while delivering",
            self.generator_delivering_cpu_seconds
        )?;
        if let Some(nats) = &self.nats {
            writeln!(
                f,
                "  NATS consumers  {} without subscribers, {} with {} open",
                nats.without_subscribers.consumers, nats.with_subscribers.consumers, self.connected
            )?;
        }
        if let Some(redis) = &self.redis {
            writeln!(
                f,
                "  Redis channel   {} subscriptions without subscribers, {} with {} open",
                redis.subscriptions_without_subscribers,
                redis.subscriptions_with_subscribers,
                self.connected
            )?;
        }
        Ok(())
    }
}
