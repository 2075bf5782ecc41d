//! `flagsmith-sse-bench`: a load generator for a flagsmith-sse service on this machine.
//!
//! - `fanout`: opens many SSE streams (HTTP/1.1, or HTTP/2 multiplexed, plaintext or TLS),
//!   publishes numbered updates and times every delivery; reports connect and first-event
//!   times, completeness, fan-out and publish latency, and the service's memory and CPU.
//! - `throughput`: many keep-alive clients posting `queue-change` back to back; reports
//!   acknowledged publishes per second and their latency.
//!
//! Both only target loopback addresses, stop by themselves, print a report (or `--json`), and
//! exit with status 1 when the service did not deliver or acknowledge everything, or (with
//! `--redis-url`) Redis does not hold the newest acknowledged update of every environment.
//!
//! # Layout
//! - `client`: connections from several loopback source addresses; TLS; hyper clients.
//! - `publish`: `queue-change` over a keep-alive connection.
//! - `events`: numbered `updated_at` values and the SSE reader.
//! - `measure`: `/proc/<pid>`, the JetStream API, Redis, percentiles.
//! - `fanout`, `throughput`: the two scenarios.

mod client;
mod events;
mod fanout;
mod h1;
mod h2;
mod measure;
mod publish;
mod throughput;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Load generator for flagsmith-sse (loopback only).
#[derive(Debug, Parser)]
// bench/run passes a scenario's sizes before the caller's options, which replace them.
#[command(version, args_override_self = true)]
enum Cli {
    /// Subscribers receive numbered updates: delivery, latency, memory per subscriber.
    Fanout(fanout::Args),
    /// Concurrent keep-alive clients post queue-change: acknowledged publishes per second.
    Throughput(throughput::Args),
}

/// Options both scenarios take.
#[derive(Debug, clap::Args)]
struct Common {
    /// The service's publish token.
    #[arg(
        long,
        env = "FLAGSMITH_SSE_AUTHENTICATION_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// A file holding the publish token.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// PEM certificate(s) to trust for https:// URLs.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// The service's process id: its RSS and CPU time are read from `/proc/<pid>`.
    #[arg(long)]
    pid: Option<u32>,
    /// NATS server the service uses: consumers and stored messages are read from the JetStream API.
    #[arg(long)]
    nats_url: Option<String>,
    /// The JetStream stream the service uses.
    #[arg(long, default_value = "environments-stream")]
    nats_stream: String,
    /// Redis server the service uses (redis://HOST:PORT): subscriptions on its update channel
    /// and stored updates are read from it.
    #[arg(long, conflicts_with = "nats_url")]
    redis_url: Option<String>,
    /// The service's redis.namespace, which names its keys and channel.
    #[arg(long, default_value = "flagsmith-sse")]
    redis_namespace: String,
    /// Loopback source addresses the connections are spread over (127.0.0.1, 127.0.0.2, ...).
    #[arg(long, default_value_t = 4)]
    sources: usize,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl Common {
    /// The JetStream API of `--nats-url`, if given.
    async fn jetstream(&self) -> Result<Option<measure::JetStream>, Error> {
        match &self.nats_url {
            Some(url) => Ok(Some(
                measure::JetStream::connect(url, &self.nats_stream).await?,
            )),
            None => Ok(None),
        }
    }

    /// The Redis server of `--redis-url`, if given.
    async fn redis(&self) -> Result<Option<measure::Redis>, Error> {
        match &self.redis_url {
            Some(url) => Ok(Some(
                measure::Redis::connect(url, &self.redis_namespace).await?,
            )),
            None => Ok(None),
        }
    }

    fn token(&self) -> Result<String, Error> {
        match (&self.token, &self.token_file) {
            (Some(token), _) => Ok(token.clone()),
            (None, Some(path)) => Ok(std::fs::read_to_string(path)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned()),
            (None, None) => Err(
                "give the publish token: --token, --token-file or FLAGSMITH_SSE_AUTHENTICATION_TOKEN"
                    .into(),
            ),
        }
    }
}

/// A positive number of seconds from the command line.
fn seconds(option: &str, value: f64) -> Result<Duration, Error> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| format!("{option} {value}: not a number of seconds").into())
}

/// Tells this run's environments from any earlier run's, whose updates may still be stored.
fn run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every HTTP/1.1 subscriber is a socket of ours too.
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("flagsmith-sse-bench: cannot raise the open files limit: {err}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("flagsmith-sse-bench: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli {
            Cli::Fanout(args) => {
                let json = args.common().json;
                fanout::run(args)
                    .await
                    .map(|report| (print(&report, json), report.is_complete()))
            }
            Cli::Throughput(args) => {
                let json = args.common().json;
                throughput::run(args)
                    .await
                    .map(|report| (print(&report, json), report.passed()))
            }
        }
    });
    // Connections still open are dropped with the runtime.
    runtime.shutdown_background();
    match result {
        Ok(((), true)) => ExitCode::SUCCESS,
        Ok(((), false)) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("flagsmith-sse-bench: {err}");
            ExitCode::from(2)
        }
    }
}

fn print<R: serde::Serialize + std::fmt::Display>(report: &R, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).expect("reports serialize")
        );
    } else {
        print!("{report}");
    }
}
