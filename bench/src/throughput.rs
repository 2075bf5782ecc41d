//! The throughput scenario: many keep-alive HTTP/1.1 clients post `queue-change` back to back,
//! as a busy Flagsmith task processor fleet would, each to its own environment with ever newer
//! timestamps. Only requests that start after the warm-up and finish before the end count.
//!
//! With `--nats-url` it compares the messages JetStream stored with the `200`s; with
//! `--redis-url`, which keeps only the newest update per environment, it checks that Redis
//! holds the newest acknowledged `updated_at` of every environment.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{Protocol, Target};
use crate::events::Numbering;
use crate::measure::{Percentiles, ProcessSample, ProcessUse, Redis};
use crate::publish::Publisher;
use crate::{Common, Error, seconds};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base URL of the listener serving queue-change.
    #[arg(long, default_value = "http://127.0.0.1:8088")]
    url: String,
    /// Concurrent keep-alive connections, each posting to its own environment.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub connections: usize,
    pub duration_seconds: f64,
    /// Requests in the measured window, by status (`error` for a broken connection).
    pub statuses: BTreeMap<String, u64>,
    /// `200`s per second in the measured window.
    pub acknowledged_per_second: f64,
    pub latency: Option<Percentiles>,
    /// All `200`s of the run, warm-up included, and how far the JetStream stream's sequence
    /// moved meanwhile: every `200` is a stored message.
    pub acknowledged_total: u64,
    pub jetstream_stored: Option<u64>,
    pub redis: Option<RedisStored>,
    pub service: Option<ProcessUse>,
}

impl Report {
    /// Whether every request in the window was acknowledged and, with `--redis-url`, Redis
    /// holds what was acknowledged.
    pub fn passed(&self) -> bool {
        self.statuses.keys().all(|status| status == "200")
            && self
                .redis
                .as_ref()
                .is_none_or(|redis| redis.mismatches.is_empty())
    }
}

/// What Redis stored for the run's environments, one per connection, at its end.
#[derive(Debug, Serialize)]
pub struct RedisStored {
    pub environments: usize,
    /// Environments whose stored `updated_at` is the newest one acknowledged with a `200`
    /// (or that have none stored, having none acknowledged).
    pub newest_stored: usize,
    pub mismatches: Vec<Mismatch>,
}

/// An environment whose stored `updated_at` is not its newest acknowledged one.
#[derive(Debug, Serialize)]
pub struct Mismatch {
    pub environment: String,
    /// The update number of the newest `200`.
    pub acknowledged: Option<u64>,
    /// The stored value, as Redis holds it.
    pub stored: Option<String>,
}

/// What one client counted.
#[derive(Default)]
struct Tally {
    statuses: BTreeMap<String, u64>,
    latencies: Vec<u64>,
    acknowledged_total: u64,
}

impl Args {
    pub fn common(&self) -> &Common {
        &self.common
    }
}

pub async fn run(args: Args) -> Result<Report, Error> {
    let common = &args.common;
    if args.connections == 0 {
        return Err("--connections must be > 0".into());
    }
    let target = Arc::new(Target::new(
        &args.url,
        Protocol::Http1,
        common.ca_file.as_deref(),
        common.sources,
    )?);
    let token = common.token()?;
    let jetstream = common.jetstream().await?;
    let redis = common.redis().await?;
    let warmup = seconds("--warmup", args.warmup)?;
    let duration = seconds("--duration", args.duration)?;
    let run_id = crate::run_id();
    let numbering = Numbering::starting_now();
    let mut publishers = Vec::with_capacity(args.connections);
    for n in 0..args.connections {
        publishers.push(Publisher::connect(target.clone(), n, &token).await?);
    }
    let sequence_before = match &jetstream {
        Some(jetstream) => Some(jetstream.state().await?.last_sequence),
        None => None,
    };
    let started = Instant::now();
    let measure_from = started + warmup;
    let end = measure_from + duration;
    eprintln!(
        "{} connections posting for {:?} after a {:?} warm-up...",
        args.connections, duration, warmup
    );
    let mut clients = JoinSet::new();
    let mut service_before = None;
    for (n, mut publisher) in publishers.into_iter().enumerate() {
        let key = format!("bench-{run_id}-{n}");
        clients.spawn(async move {
            let mut tally = Tally::default();
            // The client posts ever newer updates, one at a time: its newest 200 is its last.
            let mut newest_acknowledged = None;
            let mut update = 0;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    return (tally, key, newest_acknowledged);
                }
                update += 1;
                let result = publisher.publish(&key, numbering.body(update)).await;
                let done = Instant::now();
                if matches!(result, Ok(200)) {
                    tally.acknowledged_total += 1;
                    newest_acknowledged = Some(update);
                }
                if sent >= measure_from && done <= end {
                    let status = match &result {
                        Ok(status) => status.to_string(),
                        Err(_) => "error".to_owned(),
                    };
                    *tally.statuses.entry(status).or_default() += 1;
                    tally.latencies.push((done - sent).as_micros() as u64);
                }
                if result.is_err() {
                    return (tally, key, newest_acknowledged);
                }
            }
        });
    }
    tokio::time::sleep_until(measure_from).await;
    if let Some(pid) = common.pid {
        service_before = Some(ProcessSample::read(pid)?);
    }
    tokio::time::sleep_until(end).await;
    let service_after = common.pid.map(ProcessSample::read).transpose()?;
    let mut total = Tally::default();
    let mut newest_acknowledged = Vec::with_capacity(args.connections);
    while let Some(client) = clients.join_next().await {
        let (tally, environment, newest) = client?;
        newest_acknowledged.push((environment, newest));
        for (status, count) in tally.statuses {
            *total.statuses.entry(status).or_default() += count;
        }
        total.latencies.extend(tally.latencies);
        total.acknowledged_total += tally.acknowledged_total;
    }
    let jetstream_stored = match (&jetstream, sequence_before) {
        (Some(jetstream), Some(before)) => Some(jetstream.state().await?.last_sequence - before),
        _ => None,
    };
    let redis = match &redis {
        Some(redis) => Some(check_stored(redis, numbering, newest_acknowledged).await?),
        None => None,
    };
    let window = duration.as_secs_f64();
    Ok(Report {
        connections: args.connections,
        duration_seconds: window,
        acknowledged_per_second: total.statuses.get("200").copied().unwrap_or(0) as f64 / window,
        statuses: total.statuses,
        latency: Percentiles::of(total.latencies),
        acknowledged_total: total.acknowledged_total,
        jetstream_stored,
        redis,
        service: match (service_before, service_after) {
            (Some(before), Some(after)) => Some(ProcessUse::between(before, after)),
            _ => None,
        },
    })
}

/// Compares what Redis stored for each environment with its newest acknowledged update.
async fn check_stored(
    redis: &Redis,
    numbering: Numbering,
    newest_acknowledged: Vec<(String, Option<u64>)>,
) -> Result<RedisStored, Error> {
    let environments: Vec<String> = newest_acknowledged
        .iter()
        .map(|(environment, _)| environment.clone())
        .collect();
    let stored = redis.stored(&environments).await?;
    let mismatches: Vec<Mismatch> = newest_acknowledged
        .into_iter()
        .zip(stored)
        .filter(|((_, acknowledged), stored)| {
            let stored_update = stored
                .as_deref()
                .and_then(|text| text.parse::<f64>().ok())
                .and_then(|updated_at| numbering.number(updated_at));
            stored_update != *acknowledged
        })
        .map(|((environment, acknowledged), stored)| Mismatch {
            environment,
            acknowledged,
            stored,
        })
        .collect();
    Ok(RedisStored {
        environments: environments.len(),
        newest_stored: environments.len() - mismatches.len(),
        mismatches,
    })
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "throughput: {} keep-alive HTTP/1.1 connections posting queue-change for {:.1} s",
            self.connections, self.duration_seconds
        )?;
        writeln!(
            f,
            "  acknowledged    {:.0} publishes/s",
            self.acknowledged_per_second
        )?;
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(status, count)| format!("{status}: {count}"))
            .collect();
        writeln!(f, "  statuses        {}", statuses.join(", "))?;
        match &self.latency {
            Some(latency) => writeln!(f, "  latency         {latency}")?,
            None => writeln!(f, "  latency         -")?,
        }
        if let Some(stored) = self.jetstream_stored {
            writeln!(
                f,
                "  JetStream       {stored} messages stored for {} acknowledged publishes (warm-up included)",
                self.acknowledged_total
            )?;
        }
        if let Some(redis) = &self.redis {
            writeln!(
                f,
                "  Redis           {} of {} environments hold their newest acknowledged updated_at",
                redis.newest_stored, redis.environments
            )?;
            for mismatch in &redis.mismatches {
                writeln!(
                    f,
                    "  mismatch        {}: update {} acknowledged, {} stored",
                    mismatch.environment,
                    mismatch
                        .acknowledged
                        .map_or_else(|| "none".to_owned(), |update| update.to_string()),
                    mismatch.stored.as_deref().unwrap_or("nothing")
                )?;
            }
        }
        if let Some(service) = &self.service {
            writeln!(
                f,
                "  service         {:.2} CPU s ({:.2} cores), RSS {} KiB → {} KiB",
                service.cpu_seconds,
                service.cpu_seconds / self.duration_seconds,
                service.rss_before_kib,
                service.rss_after_kib
            )?;
        }
        Ok(())
    }
}
