//! Smoke runs of `flagsmith-sse-bench` against the service on NATS and on Redis: a few hundred
//! subscribers over HTTP/1.1, h2c and HTTP/2 over TLS, and short throughput runs. They keep the
//! load generator working; the full-size runs and their figures are in docs/performance.md.

// The service's own test helpers: the service in this process, nats-server and redis-server.
#[path = "../../tests/common/mod.rs"]
mod common;

use std::process::Output;

use common::http::{Connection, TestCertificate, tls_connect};
use common::redis::{RedisServer, redis_config};
use common::{NatsServer, Service, TOKEN, nats_config};
use flagsmith_sse::Config;
use serde_json::Value;

/// Runs the generator with `args`, reading this test process as the service's.
async fn bench(args: &[&str]) -> (Output, Value) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_flagsmith-sse-bench"))
        .args(args)
        .args(["--json", "--token", TOKEN, "--pid"])
        .arg(std::process::id().to_string())
        .output()
        .await
        .expect("run flagsmith-sse-bench");
    let report = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output, report)
}

/// A short fan-out run: `updates` updates 0.1 s apart, with `options` (which name the
/// backend: `--nats-url` or `--redis-url`).
async fn fanout(url: &str, updates: u64, options: &[&str]) -> (Output, Value) {
    let updates = updates.to_string();
    let mut args = vec![
        "fanout",
        "--url",
        url,
        "--updates",
        &updates,
        "--interval",
        "0.1",
    ];
    args.extend(["--settle", "0.2"]);
    args.extend(options);
    bench(&args).await
}

/// Checks a fan-out report: every subscriber connected and got every update, and each
/// delivery was timed.
fn assert_complete_fanout(output: &Output, report: &Value, subscribers: u64, updates: u64) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {report:#} {stderr}");
    assert_eq!(report["connected"], subscribers, "{report:#}");
    assert_eq!(report["complete"], subscribers, "{report:#}");
    assert_eq!(report["missed"], 0, "{report:#}");
    assert_eq!(report["malformed"], 0, "{report:#}");
    assert_eq!(
        report["fanout"]["count"],
        subscribers * updates,
        "{report:#}"
    );
    assert_eq!(report["first_event"]["count"], subscribers, "{report:#}");
    let fanout_max = report["fanout"]["max_ms"].as_f64().unwrap();
    assert!(fanout_max > 0.0 && fanout_max < 10_000.0, "{report:#}");
    assert!(report["service"]["delivering"]["cpu_seconds"].is_number());
    assert!(report["service"]["idle_rss_per_subscriber_kib"].is_number());
}

/// Checks that the service kept one NATS consumer however many streams were open.
fn assert_one_nats_consumer(report: &Value) {
    let nats = &report["nats"];
    assert_eq!(nats["without_subscribers"]["consumers"], 1, "{report:#}");
    assert_eq!(nats["with_subscribers"]["consumers"], 1, "{report:#}");
}

/// Checks that the service kept one subscription on the Redis channel however many streams
/// were open.
fn assert_one_redis_subscription(report: &Value) {
    let redis = &report["redis"];
    assert_eq!(redis["subscriptions_without_subscribers"], 1, "{report:#}");
    assert_eq!(redis["subscriptions_with_subscribers"], 1, "{report:#}");
}

/// Fan-outs over HTTP/1.1 (300 streams over 3 environments) and h2c (400 over 2), checking
/// delivery; `backend` names the backend for the generator.
async fn fanout_over_http1_and_h2c(url: &str, backend: &[&str]) -> Vec<Value> {
    let mut reports = Vec::new();
    for (protocol, subscribers, environments) in [("1", 300, 3), ("2", 400, 2)] {
        let (subscribers_arg, environments_arg) =
            (subscribers.to_string(), environments.to_string());
        let mut options = vec![
            "--http",
            protocol,
            "--subscribers",
            &subscribers_arg,
            "--environments",
            &environments_arg,
            "--streams-per-connection",
            "100",
        ];
        options.extend(backend);
        let (output, report) = fanout(url, 3, &options).await;
        assert_complete_fanout(&output, &report, subscribers, 3);
        let connections = if protocol == "1" { subscribers } else { 4 };
        assert_eq!(report["connections"], connections, "{report:#}");
        reports.push(report);
    }
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_http1_and_h2c_delivers_every_update_with_one_consumer() {
    let nats = NatsServer::start();
    let service = Service::start_ready(nats_config(&nats)).await;
    let url = format!("http://{}", service.addr);
    for report in fanout_over_http1_and_h2c(&url, &["--nats-url", &nats.url()]).await {
        assert_one_nats_consumer(&report);
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_on_redis_delivers_every_update_with_one_subscription() {
    let redis = RedisServer::start();
    let service = Service::start_ready(redis_config(&redis)).await;
    let url = format!("http://{}", service.addr);
    let redis_url = format!("redis://127.0.0.1:{}", redis.port);
    for report in fanout_over_http1_and_h2c(&url, &["--redis-url", &redis_url]).await {
        assert_one_redis_subscription(&report);
    }
    service.stop().await;
}

/// Over TLS, as browsers (HTTP/2, several streams on a connection or one each) and server SDKs
/// over https (HTTP/1.1) connect. The HTTP/1.1 run is large enough that the generator's tasks
/// exhaust tokio's cooperative budget, which once left requests unsent in rustls' buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_tls_delivers_every_update_on_http2_and_http1() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let certificate = TestCertificate::generate(dir.path(), "server");
    let config = Config {
        tls: Some(certificate.files.clone()),
        ..nats_config(&nats)
    };
    let service = Service::start(config).await;
    let connector = certificate.connector(&["h2"]);
    let mut probe = Connection::tls(tls_connect(service.addr, &connector).await).await;
    for attempt in 0.. {
        if probe.get("/readyz").await.0 == 200 {
            break;
        }
        assert!(attempt < 500, "the service is not ready after 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let url = format!("https://localhost:{}", service.addr.port());
    let ca_file = certificate.files.certificate_file.to_str().unwrap();
    let nats_url = nats.url();
    for (http, subscribers, per_connection) in [("2", 200, "50"), ("2", 200, "1"), ("1", 2000, "1")]
    {
        let subscribers_arg = subscribers.to_string();
        let options = [
            "--ca-file",
            ca_file,
            "--http",
            http,
            "--subscribers",
            &subscribers_arg,
            "--streams-per-connection",
            per_connection,
            "--nats-url",
            &nats_url,
        ];
        let (output, report) = fanout(&url, 2, &options).await;
        assert_complete_fanout(&output, &report, subscribers, 2);
        assert_one_nats_consumer(&report);
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_counts_only_jetstream_acknowledged_publishes() {
    let nats = NatsServer::start();
    let service = Service::start_ready(nats_config(&nats)).await;
    let (output, report) = bench(&[
        "throughput",
        "--url",
        &format!("http://{}", service.addr),
        "--connections",
        "8",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--nats-url",
        &nats.url(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {report:#} {stderr}");
    let acknowledged = report["statuses"]["200"].as_u64().unwrap();
    assert!(acknowledged > 0, "{report:#}");
    assert_eq!(
        report["statuses"].as_object().unwrap().len(),
        1,
        "{report:#}"
    );
    assert_eq!(report["latency"]["count"], acknowledged, "{report:#}");
    // Every 200 of the run, warm-up included, is one message JetStream stored.
    assert_eq!(
        report["jetstream_stored"], report["acknowledged_total"],
        "{report:#}"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_on_redis_checks_that_the_newest_acknowledged_update_is_stored() {
    let redis = RedisServer::start();
    let service = Service::start_ready(redis_config(&redis)).await;
    let url = format!("http://{}", service.addr);
    let redis_url = format!("redis://127.0.0.1:{}", redis.port);
    let (output, report) = bench(&[
        "throughput",
        "--url",
        &url,
        "--connections",
        "8",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--redis-url",
        &redis_url,
    ])
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {report:#} {stderr}");
    let acknowledged = report["statuses"]["200"].as_u64().unwrap();
    assert!(acknowledged > 0, "{report:#}");
    assert_eq!(
        report["statuses"].as_object().unwrap().len(),
        1,
        "{report:#}"
    );
    // One environment per connection, each holding the newest update it acknowledged.
    assert_eq!(report["redis"]["environments"], 8, "{report:#}");
    assert_eq!(report["redis"]["newest_stored"], 8, "{report:#}");
    assert_eq!(report["redis"]["mismatches"], Value::Array(vec![]));
    assert_eq!(redis.cli(&["HLEN", "{flagsmith-sse}:updated-at"]), "8");

    // Looking under another namespace, the generator finds none of them stored, and fails.
    let (output, report) = bench(&[
        "throughput",
        "--url",
        &url,
        "--connections",
        "2",
        "--warmup",
        "0",
        "--duration",
        "0.3",
        "--redis-url",
        &redis_url,
        "--redis-namespace",
        "elsewhere",
    ])
    .await;
    // Every publish was acknowledged: the check alone fails the run.
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    assert!(
        report["statuses"]["200"].as_u64().unwrap() > 0,
        "{report:#}"
    );
    assert_eq!(
        report["statuses"].as_object().unwrap().len(),
        1,
        "{report:#}"
    );
    assert_eq!(report["redis"]["newest_stored"], 0, "{report:#}");
    assert_eq!(report["redis"]["mismatches"][0]["stored"], Value::Null);
    service.stop().await;
}

#[tokio::test]
async fn an_option_given_again_replaces_the_earlier_value() {
    // As bench/run passes them: the scenario's value first, the caller's after it.
    let (output, _) = bench(&[
        "fanout",
        "--url",
        "http://127.0.0.1:8088",
        "--url",
        "http://192.0.2.1:8088",
    ])
    .await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("resolves to 192.0.2.1, which is not a loopback address"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_generator_refuses_targets_off_this_machine_and_a_wrong_token() {
    let (output, _) = bench(&["fanout", "--url", "http://192.0.2.1:8088"]).await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");

    let service = Service::start(common::test_config()).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_flagsmith-sse-bench"))
        .args(["fanout", "--token", "wrong", "--subscribers", "1", "--url"])
        .arg(format!("http://{}", service.addr))
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("answered 401"), "{stderr}");
    service.stop().await;
}
