//! The NATS JetStream backend: several instances sharing updates through one nats-server.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{NatsServer, Service, body_at, event, nats_config, seconds};
use flagsmith_sse::backend::Backend;
use flagsmith_sse::backend::nats::NatsBackend;
use flagsmith_sse::domain::{EnvironmentKey, Update, UpdatedAt};
use flagsmith_sse::hub::Hub;
use flagsmith_sse::metrics::Metrics;

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_on_one_instance_reaches_subscribers_on_another() {
    let nats = NatsServer::start();
    let a = Service::start_ready(nats_config(&nats)).await;
    let b = Service::start_ready(nats_config(&nats)).await;
    let mut on_b = b.subscribe("env").await;
    let mut on_a = a.subscribe("env").await;

    let (status, _) = a
        .publish(
            "env",
            r#"{"updated_at": "2024-12-26T17:27:07.123456+00:00"}"#,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(on_b.next_event().await, event("1735234027.123456"));
    assert_eq!(on_a.next_event().await, event("1735234027.123456"));

    // A subscriber arriving later on B gets the newest value first.
    b.publish("env", &body_at(1735234099.5)).await;
    let mut late = b.subscribe("env").await;
    assert_eq!(late.next_event().await, event("1735234099.5"));
    // And a new instance loads it from the stream.
    let c = Service::start_ready(nats_config(&nats)).await;
    let mut on_c = c.subscribe("env").await;
    assert_eq!(on_c.next_event().await, event("1735234099.5"));
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_of_the_same_update_produce_one_event() {
    let nats = NatsServer::start();
    let mut config = nats_config(&nats);
    config.keepalive_interval = seconds(0.3);
    let a = Service::start_ready(config.clone()).await;
    let b = Service::start_ready(config).await;
    let mut on_b = b.subscribe("env").await;
    let body = r#"{"updated_at": "2024-12-26T17:27:07+00:00"}"#;
    for service in [&a, &b, &a, &b] {
        assert_eq!(service.publish("env", body).await.0, 200);
    }
    assert_eq!(on_b.next_event().await, event("1735234027.0"));
    assert_eq!(on_b.next_data().await, b": ping\n\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn jetstream_deduplicates_by_message_id() {
    let nats = NatsServer::start();
    let config = nats_config(&nats);
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let metrics = Metrics::new("nats");
    let hub = Arc::new(Hub::new(Duration::from_secs(3600), metrics.hub.clone()));
    let backend = NatsBackend::start(&config.nats, hub, metrics.backend, metrics.nats, &log)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), backend.ready())
        .await
        .unwrap();
    let update = Update {
        key: EnvironmentKey::parse("env").unwrap(),
        updated_at: UpdatedAt::from_unix_seconds(1735234027.5).unwrap(),
    };
    // Published straight to the backend, skipping the HTTP layer's "already known" shortcut.
    for _ in 0..3 {
        backend.publish(update.clone()).await.unwrap();
    }
    let client = async_nats::connect(nats.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream("environments-stream").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.last_sequence, 1, "duplicates were stored");
    assert_eq!(info.config.max_messages_per_subject, 1);
    assert_eq!(info.config.max_age, Duration::from_secs(3600));
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
    assert_eq!(info.config.subjects, ["flagsmith.environment.>"]);
    let stored = stream
        .get_last_raw_message_by_subject("flagsmith.environment.env")
        .await
        .unwrap();
    assert_eq!(&stored.payload[..], br#"{"updated_at": 1735234027.5}"#);
    backend.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_consumer_per_instance_whatever_the_subscribers() {
    let nats = NatsServer::start();
    let a = Service::start_ready(nats_config(&nats)).await;
    assert_eq!(nats.consumer_count("environments-stream").await, 1);
    let mut clients = Vec::new();
    for index in 0..200 {
        clients.push(a.subscribe(&format!("env-{}", index % 20)).await);
    }
    a.publish("env-3", &body_at(7.5)).await;
    for client in clients.iter_mut().skip(3).step_by(20) {
        assert_eq!(client.next_event().await, event("7.5"));
    }
    assert_eq!(nats.consumer_count("environments-stream").await, 1);
    let _b = Service::start_ready(nats_config(&nats)).await;
    assert_eq!(nats.consumer_count("environments-stream").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_restart_flips_readiness_and_updates_flow_again() {
    let mut nats = NatsServer::start();
    let a = Service::start_ready(nats_config(&nats)).await;
    let b = Service::start_ready(nats_config(&nats)).await;
    let mut on_a = a.subscribe("env").await;
    let mut on_b = b.subscribe("env").await;
    a.publish("env", &body_at(1.5)).await;
    assert_eq!(on_a.next_event().await, event("1.5"));
    assert_eq!(on_b.next_event().await, event("1.5"));

    nats.stop();
    a.wait_ready(false).await;
    b.wait_ready(false).await;
    // Never a 2xx for an update that could not be stored, and an answer well within 2 s.
    let started = Instant::now();
    let (status, body) = a.publish("env", &body_at(2.5)).await;
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let response = reqwest::Client::new()
        .post(a.url("/sse/environments/env/queue-change"))
        .header("authorization", format!("Token {}", common::TOKEN))
        .body(body_at(2.5))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");

    nats.restart();
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    // The subscribers stayed connected through the outage and get what is published now.
    assert_eq!(a.publish("env", &body_at(3.5)).await.0, 200);
    assert_eq!(on_a.next_event().await, event("3.5"));
    assert_eq!(on_b.next_event().await, event("3.5"));
    assert_eq!(b.publish("other", &body_at(4.5)).await.0, 200);
    let mut other_on_a = a.subscribe("other").await;
    assert_eq!(other_on_a.next_event().await, event("4.5"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_nats_gets_503_before_flagsmiths_timeout() {
    let nats = NatsServer::start();
    let a = Service::start_ready(nats_config(&nats)).await;
    nats.signal("STOP");
    let started = Instant::now();
    let (status, _) = a.publish("env", &body_at(1.5)).await;
    let took = started.elapsed();
    nats.signal("CONT");
    assert_eq!(status, 503);
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_starts_while_nats_is_down_and_becomes_ready_later() {
    let mut nats = NatsServer::start();
    let port = nats.port;
    let config = nats_config(&nats);
    nats.stop();
    let service = Service::start(config).await;
    // Alive and answering, but not ready, and publishes are refused.
    let livez = reqwest::get(service.url("/livez")).await.unwrap();
    assert_eq!(livez.status(), 200);
    assert_eq!(service.readyz().await, 503);
    assert_eq!(service.publish("env", &body_at(1.5)).await.0, 503);
    let mut early = service.subscribe("env").await;
    assert_eq!(early.status, 200);

    nats.restart();
    assert_eq!(nats.port, port);
    service.wait_ready(true).await;
    assert_eq!(service.publish("env", &body_at(2.5)).await.0, 200);
    assert_eq!(early.next_event().await, event("2.5"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_cut_off_from_nats_catches_up_on_what_it_missed() {
    let nats = NatsServer::start();
    let mut proxy = common::Proxy::start(([127, 0, 0, 1], nats.port).into()).await;
    let mut cut_off_config = nats_config(&nats);
    cut_off_config.nats.url = proxy.url();
    let cut_off = Service::start_ready(cut_off_config).await;
    let other = Service::start_ready(nats_config(&nats)).await;
    let mut env_a = cut_off.subscribe("env-a").await;
    other.publish("env-a", &body_at(1.5)).await;
    assert_eq!(env_a.next_event().await, event("1.5"));

    proxy.cut();
    cut_off.wait_ready(false).await;
    // Published while the instance is away; env-a twice, so only the newest is kept.
    other.publish("env-a", &body_at(2.5)).await;
    other.publish("env-a", &body_at(3.5)).await;
    other.publish("env-b", &body_at(4.5)).await;

    proxy.restore().await;
    cut_off.wait_ready(true).await;
    assert_eq!(env_a.next_event().await, event("3.5"));
    let mut env_b = cut_off.subscribe("env-b").await;
    assert_eq!(env_b.next_event().await, event("4.5"));
}
