//! `/metricsz`: scraped before and after real actions, checked by promtool; and the Grafana
//! dashboard, whose every query must name metrics the service exports.

mod common;

use std::time::Duration;

use common::http::{Connection, Protocol, TestCertificate};
use common::redis::{RedisServer, redis_config};
use common::{
    NatsServer, OPENING, Scrape, Service, TOKEN, body_at, event, nats_config, scrape_until,
    seconds, test_config,
};
use flagsmith_sse::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The sample of a metric with one label.
fn series(name: &str, label: &str, value: &str) -> String {
    format!("flagsmith_sse_{name}{{{label}=\"{value}\"}}")
}

fn outcome(value: &str) -> String {
    series("publish_requests_total", "outcome", value)
}

fn closed(reason: &str) -> String {
    series("streams_closed_total", "reason", reason)
}

fn writes(message: &str) -> String {
    series("http_writes_total", "message", message)
}

fn errors(message: &str) -> String {
    series("http_errors_total", "message", message)
}

async fn publish_with(
    service: &Service,
    key: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(service.url(&format!("/sse/environments/{key}/queue-change")))
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn every_metric_is_there_from_the_start() {
    let service = Service::start_ready(test_config()).await;
    let scrape = Scrape::of(service.addr).await;
    for zero in [
        "flagsmith_sse_subscribers".to_owned(),
        "flagsmith_sse_subscribers_total".to_owned(),
        "flagsmith_sse_events_coalesced_total".to_owned(),
        "flagsmith_sse_updates_total".to_owned(),
        "flagsmith_sse_fanout_delay_seconds_count".to_owned(),
        "flagsmith_sse_publish_duration_seconds_count".to_owned(),
        "flagsmith_sse_backend_reconnects_total".to_owned(),
        "flagsmith_sse_tls_handshake_errors_total".to_owned(),
        "flagsmith_sse_write_timeouts_total".to_owned(),
        "flagsmith_sse_nats_consumer_sequence".to_owned(),
        "flagsmith_sse_nats_consumer_pending".to_owned(),
        "flagsmith_sse_environments".to_owned(),
        series("connections", "protocol", "http2"),
        series("connections_total", "protocol", "http2"),
        writes("data"),
        writes("keepalive"),
        errors("data"),
        errors("keepalive"),
        errors("healthcheck"),
        closed("client_gone"),
        closed("max_age"),
        closed("shutdown"),
        closed("rejected"),
        outcome("stored"),
        outcome("duplicate"),
        outcome("unauthorized"),
        outcome("throttled"),
        outcome("bad_request"),
        outcome("too_large"),
        outcome("unavailable"),
        outcome("timeout"),
    ]
    .into_iter()
    .chain(
        [
            "connect",
            "publish",
            "create_jetstream",
            "create_consumer",
            "pull",
            "read",
            "ack",
        ]
        .map(|operation| series("nats_errors_total", "operation", operation)),
    )
    .chain(
        ["connect", "subscribe", "publish", "probe", "resync", "read"]
            .map(|operation| series("redis_errors_total", "operation", operation)),
    )
    .chain([
        "flagsmith_sse_redis_resyncs_total".to_owned(),
        "flagsmith_sse_redis_resync_environments".to_owned(),
    ]) {
        assert_eq!(scrape.value(&zero), 0.0, "{zero}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(scrape.value(&series("build_info", "version", version)), 1.0);
    assert_eq!(
        scrape.value(&series("backend_connected", "backend", "memory")),
        1.0
    );
    assert_eq!(
        scrape.value(&series("backend_ready", "backend", "memory")),
        1.0
    );
    // start_ready's probes.
    assert!(scrape.value(&writes("healthcheck")) >= 1.0);
    assert!(scrape.value("process_resident_memory_bytes") > 1e6);
    assert!(scrape.value("process_open_fds") > 0.0);
    // Computed without /proc/stat, which the systemd unit hides (ProcSubset=pid); here it is
    // readable, so compare with the boot time it gives (whole seconds).
    let boot_time: f64 = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let start_ticks: f64 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let expected = boot_time + start_ticks / rustix::param::clock_ticks_per_second() as f64;
    let reported = scrape.value("process_start_time_seconds");
    assert!(
        (reported - expected).abs() < 1.5,
        "process_start_time_seconds {reported}, from /proc/stat {expected}"
    );
    service.stop().await;
}

#[tokio::test]
async fn subscribing_publishing_and_leaving_move_the_counters() {
    let service = Service::start_ready(test_config()).await;
    let before = Scrape::of(service.addr).await;
    assert_eq!(before.value("flagsmith_sse_subscribers"), 0.0);

    let mut first = service.subscribe("env").await;
    let mut second = service.subscribe("env").await;
    let subscribed = Scrape::of(service.addr).await;
    assert_eq!(subscribed.value("flagsmith_sse_subscribers"), 2.0);
    assert_eq!(subscribed.value("flagsmith_sse_subscribers_total"), 2.0);
    assert_eq!(subscribed.value("flagsmith_sse_environments"), 1.0);
    // Each stream opened with a keep-alive comment: nothing is known of `env` yet.
    assert_eq!(subscribed.value(&writes("keepalive")), 2.0);

    assert_eq!(service.publish("env", &body_at(10.5)).await.0, 200);
    assert_eq!(first.next_event().await, event("10.5"));
    assert_eq!(second.next_event().await, event("10.5"));
    let published = Scrape::of(service.addr).await;
    assert_eq!(published.value(&outcome("stored")), 1.0);
    assert_eq!(published.value("flagsmith_sse_updates_total"), 1.0);
    assert_eq!(published.value(&writes("data")), 2.0);
    // Both waiting subscribers wrote it, so its fan-out completed once.
    assert_eq!(
        published.value("flagsmith_sse_fanout_delay_seconds_count"),
        1.0
    );
    assert_eq!(
        published.value("flagsmith_sse_publish_duration_seconds_count"),
        1.0
    );

    // The same update again, a wrong token, a bad body and an oversized one.
    assert_eq!(service.publish("env", &body_at(10.5)).await.0, 200);
    let unauthorized = publish_with(
        &service,
        "env",
        &body_at(11.0),
        &[("authorization", "Token wrong"), ("x-request-id", "req-42")],
    )
    .await;
    assert_eq!(unauthorized.status(), 401);
    assert_eq!(unauthorized.headers()["x-request-id"], "req-42");
    let authorization = format!("Token {TOKEN}");
    let bad = publish_with(
        &service,
        "env",
        "{}",
        &[("authorization", authorization.as_str())],
    )
    .await;
    assert_eq!(bad.status(), 400);
    let generated = bad.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 16, "a generated id: {generated}");
    let huge = "x".repeat(5000);
    let too_large = publish_with(
        &service,
        "env",
        &huge,
        &[("authorization", authorization.as_str())],
    )
    .await;
    assert_eq!(too_large.status(), 413);

    let refused = Scrape::of(service.addr).await;
    for (what, count) in [
        ("stored", 1.0),
        ("duplicate", 1.0),
        ("unauthorized", 1.0),
        ("bad_request", 1.0),
        ("too_large", 1.0),
        ("unavailable", 0.0),
        ("timeout", 0.0),
    ] {
        assert_eq!(refused.value(&outcome(what)), count, "{what}");
    }
    assert_eq!(
        refused.value("flagsmith_sse_publish_duration_seconds_count"),
        5.0
    );
    assert_eq!(refused.value("flagsmith_sse_updates_total"), 1.0);
    // No series is labelled by environment.
    assert!(!refused.text.contains("env\""), "{}", refused.text);

    drop(first);
    let left = scrape_until(service.addr, "the first subscriber gone", |scrape| {
        scrape.value("flagsmith_sse_subscribers") == 1.0
    })
    .await;
    assert_eq!(left.value(&closed("client_gone")), 1.0);
    // Its last write was the event: the connection failed after it.
    assert_eq!(left.value(&errors("data")), 1.0);
    assert_eq!(left.value(&errors("keepalive")), 0.0);
    service.stop().await;
}

#[tokio::test]
async fn streams_end_by_age_and_are_rejected_over_the_cap() {
    let config = Config {
        max_streams: 1,
        max_stream_age: seconds(0.6),
        max_stream_age_jitter: 0.0,
        keepalive_interval: seconds(0.2),
        ..test_config()
    };
    let service = Service::start_ready(config).await;
    let mut stream = service.subscribe("env").await;
    let rejected = service.subscribe("env").await;
    assert_eq!(rejected.status, 503);
    assert!(rejected.header("retry-after").is_some());

    // The opening comment, then keep-alives until the stream reaches its age and ends cleanly
    // after its `retry:`.
    assert_eq!(stream.next_data().await, OPENING);
    let mut keepalives = 0;
    let mut rest = Vec::new();
    while let Some(common::Chunk::Data(data)) =
        stream.next_chunk_within(Duration::from_secs(5)).await
    {
        match &data[..] {
            b": ping\n\n" => keepalives += 1,
            _ => rest.push(data),
        }
    }
    assert!(keepalives >= 1);
    assert_eq!(rest, [b"retry: 1000\n\n"]);
    let ended = scrape_until(service.addr, "the stream closed", |scrape| {
        scrape.value("flagsmith_sse_subscribers") == 0.0
    })
    .await;
    assert_eq!(ended.value(&closed("max_age")), 1.0);
    assert_eq!(ended.value(&closed("rejected")), 1.0);
    assert_eq!(ended.value(&closed("client_gone")), 0.0);
    assert_eq!(ended.value("flagsmith_sse_subscribers_total"), 1.0);
    // The opening comment counts as a keep-alive: the same bytes.
    assert_eq!(ended.value(&writes("keepalive")), f64::from(keepalives + 1));
    assert_eq!(ended.value(&errors("keepalive")), 0.0);
    service.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_cannot_take_more_skips_to_the_newest_update() {
    let service = Service::start_ready(test_config()).await;
    let event_len = event("1.0").len();
    // The client lets the service send the opening comment and exactly one event before it
    // reads.
    let tcp = TcpStream::connect(service.addr).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(u32::try_from(OPENING.len() + event_len).unwrap())
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::get(format!(
        "http://{}/sse/environments/env/stream",
        service.addr
    ))
    .body(())
    .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let mut body = response.await.unwrap().into_body();
    let opening = body.data().await.unwrap().unwrap();
    assert_eq!(opening, OPENING);

    assert_eq!(service.publish("env", &body_at(1.0)).await.0, 200);
    let first = body.data().await.unwrap().unwrap();
    assert_eq!(first, event("1.0"));
    // The window is used up. The connection takes one more event and holds it until the
    // window opens; after that, updates wait in the hub, where only the newest counts.
    assert_eq!(service.publish("env", &body_at(2.0)).await.0, 200);
    scrape_until(service.addr, "the second event taken", |scrape| {
        scrape.value(&writes("data")) == 2.0
    })
    .await;
    for at in [3.0, 4.0] {
        assert_eq!(service.publish("env", &body_at(at)).await.0, 200);
    }
    let mut received = Vec::new();
    // Each event read lets exactly one more out; the opening comment's credit stays spent.
    let mut released = first.len();
    while received.len() < 2 {
        body.flow_control().release_capacity(released).unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .expect("an event after the window opens")
            .unwrap()
            .unwrap();
        released = next.len();
        received.push(next);
    }
    assert_eq!(received, [event("2.0"), event("4.0")]);

    let scrape = Scrape::of(service.addr).await;
    assert_eq!(scrape.value("flagsmith_sse_events_coalesced_total"), 1.0);
    assert_eq!(scrape.value("flagsmith_sse_updates_total"), 4.0);
    assert_eq!(scrape.value(&writes("data")), 3.0);
    // The opening comment.
    assert_eq!(scrape.value(&writes("keepalive")), 1.0);
    // 1.0, 2.0 and 4.0 reached their only subscriber; 3.0 was overtaken.
    assert_eq!(
        scrape.value("flagsmith_sse_fanout_delay_seconds_count"),
        3.0
    );
    assert_eq!(
        scrape.value(&series("connections", "protocol", "http2")),
        1.0
    );
    // A client that reads nothing more would hold the drain until the shutdown timeout.
    connection.abort();
    service.stop().await;
}

#[tokio::test]
async fn connections_are_counted_by_protocol() {
    let service = Service::start_ready(test_config()).await;
    let mut http1 = Connection::plain(service.addr, Protocol::Http1).await;
    let mut http2 = Connection::plain(service.addr, Protocol::Http2).await;
    let _stream = http2.subscribe("env").await;
    let (status, text) = http1.get("/metricsz").await;
    assert_eq!(status, 200);
    let both = Scrape::parse(text);
    assert_eq!(both.value(&series("connections", "protocol", "http1")), 1.0);
    assert_eq!(both.value(&series("connections", "protocol", "http2")), 1.0);
    assert_eq!(both.value("flagsmith_sse_subscribers"), 1.0);

    drop((_stream, http2));
    let closed = scrape_until(service.addr, "the HTTP/2 connection closed", |scrape| {
        scrape.value(&series("connections", "protocol", "http2")) == 0.0
    })
    .await;
    // The HTTP/1.1 connection above, and the scrape's own.
    assert!(closed.value(&series("connections", "protocol", "http1")) >= 1.0);
    assert_eq!(
        closed.value(&series("connections_total", "protocol", "http2")),
        1.0
    );
    assert_eq!(closed.value("flagsmith_sse_subscribers"), 0.0);
    drop(http1);
    service.stop().await;
}

#[tokio::test]
async fn failed_tls_handshakes_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let certificate = TestCertificate::generate(dir.path(), "server");
    let config = Config {
        tls: Some(certificate.files.clone()),
        ..test_config()
    };
    let service = Service::start_with_publish_listener(config).await;
    let publish_addr = service.publish_addr.unwrap();
    let mut garbage = TcpStream::connect(service.addr).await.unwrap();
    garbage
        .write_all(b"GET /metricsz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), garbage.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP is not answered");
    // The publish listener is plaintext here and serves the metrics of the whole instance.
    let scrape = scrape_until(publish_addr, "the failed handshake", |scrape| {
        scrape.value("flagsmith_sse_tls_handshake_errors_total") == 1.0
    })
    .await;
    assert_eq!(
        scrape.value(&series("connections", "protocol", "http2")),
        0.0
    );
    service.stop().await;
}

/// Once `backend` is gone under `service` and its one subscriber: neither connected nor
/// ready, readiness and a publish answered `503`, the refused publish counted once as a
/// request, and each of its attempts within publish_timeout as the backend's publish error.
async fn assert_backend_down(service: &Service, backend: &str) {
    let connected = series("backend_connected", "backend", backend);
    let ready = series("backend_ready", "backend", backend);
    scrape_until(service.addr, "the backend down", |scrape| {
        scrape.value(&connected) == 0.0 && scrape.value(&ready) == 0.0
    })
    .await;
    assert_eq!(service.readyz().await, 503);
    assert_eq!(service.publish("env", &body_at(2.0)).await.0, 503);
    let down = Scrape::of(service.addr).await;
    assert_eq!(down.value(&outcome("unavailable")), 1.0);
    let attempts = down.value(&series(
        &format!("{backend}_errors_total"),
        "operation",
        "publish",
    ));
    assert!(attempts > 1.0, "{attempts} attempts");
    assert!(down.value(&errors("healthcheck")) >= 1.0);
    assert_eq!(down.value("flagsmith_sse_subscribers"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_outage_shows_in_the_backend_metrics() {
    let mut nats = NatsServer::start();
    let service = Service::start_ready(nats_config(&nats)).await;
    let connected = series("backend_connected", "backend", "nats");
    let ready = series("backend_ready", "backend", "nats");
    let up = Scrape::of(service.addr).await;
    assert_eq!(up.value(&connected), 1.0);
    assert_eq!(up.value(&ready), 1.0);
    assert_eq!(up.value("flagsmith_sse_backend_reconnects_total"), 0.0);

    let mut subscriber = service.subscribe("env").await;
    assert_eq!(service.publish("env", &body_at(1.0)).await.0, 200);
    assert_eq!(subscriber.next_event().await, event("1.0"));
    // The consumer brings the same message back: stream sequence 1, nothing pending.
    let followed = scrape_until(service.addr, "the consumer at sequence 1", |scrape| {
        scrape.value("flagsmith_sse_nats_consumer_sequence") == 1.0
    })
    .await;
    assert_eq!(followed.value("flagsmith_sse_nats_consumer_pending"), 0.0);

    nats.stop();
    assert_backend_down(&service, "nats").await;

    nats.restart();
    service.wait_ready(true).await;
    let back = Scrape::of(service.addr).await;
    assert_eq!(back.value(&connected), 1.0);
    assert_eq!(back.value("flagsmith_sse_backend_reconnects_total"), 1.0);
    assert!(back.value(&series("nats_errors_total", "operation", "connect")) >= 1.0);
    assert_eq!(service.publish("env", &body_at(3.0)).await.0, 200);
    assert_eq!(subscriber.next_event().await, event("3.0"));
    scrape_until(service.addr, "the consumer at sequence 2", |scrape| {
        scrape.value("flagsmith_sse_nats_consumer_sequence") == 2.0
    })
    .await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_outage_shows_in_the_backend_metrics() {
    let mut redis = RedisServer::start();
    let service = Service::start_ready(redis_config(&redis)).await;
    let connected = series("backend_connected", "backend", "redis");
    let ready = series("backend_ready", "backend", "redis");
    let up = Scrape::of(service.addr).await;
    assert_eq!(up.value(&connected), 1.0);
    assert_eq!(up.value(&ready), 1.0);
    assert_eq!(up.value("flagsmith_sse_backend_reconnects_total"), 0.0);
    assert_eq!(up.value("flagsmith_sse_redis_resyncs_total"), 1.0);
    assert_eq!(up.value("flagsmith_sse_redis_resync_environments"), 0.0);

    let mut subscriber = service.subscribe("env").await;
    assert_eq!(service.publish("env", &body_at(1.0)).await.0, 200);
    assert_eq!(subscriber.next_event().await, event("1.0"));

    redis.stop();
    assert_backend_down(&service, "redis").await;

    redis.restart();
    service.wait_ready(true).await;
    let back = Scrape::of(service.addr).await;
    assert_eq!(back.value(&connected), 1.0);
    assert_eq!(back.value("flagsmith_sse_backend_reconnects_total"), 1.0);
    assert_eq!(back.value("flagsmith_sse_redis_resyncs_total"), 2.0);
    assert!(back.value(&series("redis_errors_total", "operation", "connect")) >= 1.0);
    assert_eq!(service.publish("env", &body_at(3.0)).await.0, 200);
    assert_eq!(subscriber.next_event().await, event("3.0"));
    service.stop().await;
}

/// The dashboard's queries, each with the metric names it reads.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, Vec<String>)> {
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    let mut pending: Vec<&serde_json::Value> =
        dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = pending.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            pending.extend(nested);
        }
        panels.push(panel);
    }
    let mut queries = Vec::new();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap().to_owned();
            let names = metric_names(&expr);
            assert!(!names.is_empty(), "{expr} reads no metric of ours");
            queries.push((expr, names));
        }
    }
    queries
}

/// Identifiers in a PromQL expression that name our metrics or the process collector's.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("flagsmith_sse_") || word.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_dashboard_reads_only_metrics_the_service_exports() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/etc/grafana/flagsmith-sse.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    // Importable as is: it asks for a Prometheus data source and every panel uses it.
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus");
    let input = format!(
        "${{{}}}",
        dashboard["__inputs"][0]["name"].as_str().unwrap()
    );
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let mut ids = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        assert!(panel["gridPos"].is_object());
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"].as_str(), Some(input.as_str()));
        }
    }

    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 6, "{queries:?}");
    // Every query parses as PromQL: promtool checks them as recording rules, with Grafana's
    // variables given plain values.
    let rules = queries
        .iter()
        .enumerate()
        .map(|(index, (expr, _))| {
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$instance", ".*")
                .replace("$job", ".*");
            format!("      - record: dashboard:query{index}\n        expr: {expr:?}\n")
        })
        .collect::<String>();
    let dir = tempfile::tempdir().unwrap();
    let rules_file = dir.path().join("dashboard.rules.yml");
    std::fs::write(
        &rules_file,
        format!("groups:\n  - name: dashboard\n    rules:\n{rules}"),
    )
    .unwrap();
    common::promtool_check(&["rules", rules_file.to_str().unwrap()], "");

    let service = Service::start_ready(test_config()).await;
    let mut subscriber = service.subscribe("env").await;
    assert_eq!(service.publish("env", &body_at(1.0)).await.0, 200);
    subscriber.next_event().await;
    let scrape = Scrape::of(service.addr).await;
    let exported = scrape.names();
    for (expr, names) in &queries {
        for name in names {
            assert!(
                exported.contains(name.as_str()),
                "the dashboard reads {name} ({expr}), which /metricsz does not have"
            );
        }
    }
    drop(subscriber);
    service.stop().await;
}
