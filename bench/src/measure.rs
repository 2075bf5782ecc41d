//! What the benchmark measures besides its own clock: the service process (`/proc/<pid>`),
//! NATS JetStream (through its API), Redis (through plain commands), and percentiles of what
//! it timed.

use std::time::Duration;

use flagsmith_sse::backend::redis::Keys;
use serde::Serialize;

use crate::Error;

/// Memory and CPU time of the service process at one moment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessSample {
    pub rss_kib: u64,
    /// User plus system time.
    pub cpu: Duration,
}

impl ProcessSample {
    pub fn read(pid: u32) -> Result<Self, Error> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|err| format!("cannot read /proc/{pid}/status: {err}"))?;
        let rss_kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/status has no VmRSS line"))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_err(|err| format!("cannot read /proc/{pid}/stat: {err}"))?;
        // The command name (field 2) may contain spaces and parentheses: count from its end.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
        let ticks = |index: usize| -> Result<u64, Error> {
            Ok(fields
                .get(index)
                .and_then(|field| field.parse().ok())
                .ok_or_else(|| format!("/proc/{pid}/stat: unexpected format"))?)
        };
        let ticks = ticks(11)? + ticks(12)?;
        Ok(Self {
            rss_kib,
            cpu: Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second()),
        })
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The service's memory and CPU over a phase of the run.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessUse {
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub cpu_seconds: f64,
}

impl ProcessUse {
    pub fn between(before: ProcessSample, after: ProcessSample) -> Self {
        Self {
            rss_before_kib: before.rss_kib,
            rss_after_kib: after.rss_kib,
            cpu_seconds: after.cpu.saturating_sub(before.cpu).as_secs_f64(),
        }
    }
}

/// Percentiles of durations, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// From samples in microseconds, in any order; `None` without samples.
    pub fn of(mut micros: Vec<u64>) -> Option<Self> {
        if micros.is_empty() {
            return None;
        }
        micros.sort_unstable();
        // Nearest rank: the smallest sample with at least q of all samples at or below it.
        let rank = |q: f64| {
            let index = (q * micros.len() as f64).ceil() as usize;
            micros[index.clamp(1, micros.len()) - 1] as f64 / 1000.0
        };
        Some(Self {
            count: micros.len(),
            p50_ms: rank(0.50),
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            max_ms: rank(1.0),
        })
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms, self.count
        )
    }
}

/// The JetStream stream the service reads, as its API reports it.
pub struct JetStream {
    context: async_nats::jetstream::Context,
    stream: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct StreamState {
    /// Consumers on the stream: the service keeps one per instance, whatever its subscribers.
    pub consumers: usize,
    pub last_sequence: u64,
}

impl JetStream {
    pub async fn connect(url: &str, stream: &str) -> Result<Self, Error> {
        let client = async_nats::connect(url)
            .await
            .map_err(|err| format!("cannot connect to NATS at {url}: {err}"))?;
        Ok(Self {
            context: async_nats::jetstream::new(client),
            stream: stream.to_owned(),
        })
    }

    pub async fn state(&self) -> Result<StreamState, Error> {
        let mut stream = self
            .context
            .get_stream(&self.stream)
            .await
            .map_err(|err| format!("cannot open stream {:?}: {err}", self.stream))?;
        let info = stream.info().await?;
        Ok(StreamState {
            consumers: info.state.consumer_count,
            last_sequence: info.state.last_sequence,
        })
    }
}

/// The Redis server the service uses, read with plain commands. Its key and channel names
/// come from the service's own code, so that the two cannot drift apart.
pub struct Redis {
    connection: redis::aio::MultiplexedConnection,
    keys: Keys,
}

impl Redis {
    /// Connects to `url`; `namespace` is the service's `redis.namespace`.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, Error> {
        let connection = redis::Client::open(url)
            .map_err(|err| format!("bad Redis URL {url}: {err}"))?
            .get_multiplexed_async_connection()
            .await
            .map_err(|err| format!("cannot connect to Redis at {url}: {err}"))?;
        Ok(Self {
            connection,
            keys: Keys::new(namespace),
        })
    }

    /// Subscriptions on the channel updates are announced on: the service keeps one per
    /// instance, whatever its subscribers.
    pub async fn subscriptions(&self) -> Result<u64, Error> {
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&self.keys.channel)
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|err| format!("cannot count subscriptions: {err}"))?;
        Ok(counts
            .first()
            .map(|(_, count)| *count)
            .ok_or("PUBSUB NUMSUB answered no count")?)
    }

    /// The `updated_at` stored for each of `environments`, as the service wrote it.
    pub async fn stored(&self, environments: &[String]) -> Result<Vec<Option<String>>, Error> {
        Ok(redis::cmd("HMGET")
            .arg(&self.keys.updated_at)
            .arg(environments)
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|err| format!("cannot read {}: {err}", self.keys.updated_at))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        assert_eq!(Percentiles::of(vec![]), None);
        let figures = Percentiles::of((1..=100).rev().map(|ms| ms * 1000).collect()).unwrap();
        assert_eq!(
            (
                figures.p50_ms,
                figures.p90_ms,
                figures.p99_ms,
                figures.max_ms
            ),
            (50.0, 90.0, 99.0, 100.0)
        );
        let one = Percentiles::of(vec![1500]).unwrap();
        assert_eq!((one.p50_ms, one.max_ms, one.count), (1.5, 1.5, 1));
    }

    #[test]
    fn reads_its_own_process() {
        let sample = ProcessSample::read(std::process::id()).unwrap();
        assert!(sample.rss_kib > 0);
    }
}
