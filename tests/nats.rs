//! The NATS JetStream backend: several instances sharing updates through one nats-server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{NatsServer, Service, body_at, event, nats_config, scenarios, seconds};
use flagsmith_sse::backend::Store;
use flagsmith_sse::backend::nats::NatsBackend;
use flagsmith_sse::domain::{EnvironmentKey, Update, UpdatedAt};
use flagsmith_sse::hub::Hub;
use flagsmith_sse::metrics::Metrics;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_on_one_instance_reaches_subscribers_on_another() {
    let nats = NatsServer::start();
    scenarios::a_publish_on_one_instance_reaches_subscribers_on_another(&nats_config(&nats)).await;
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
async fn an_older_timestamp_published_after_a_newer_one_changes_nothing() {
    let nats = NatsServer::start();
    scenarios::an_older_timestamp_published_after_a_newer_one_changes_nothing(&nats_config(&nats))
        .await;
    assert_eq!(
        common::stored_payload(&nats.url(), "env").await,
        r#"{"updated_at": 5.5}"#
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_publishes_from_two_instances_keep_the_newest() {
    let nats = NatsServer::start();
    scenarios::concurrent_publishes_from_two_instances_keep_the_newest(&nats_config(&nats)).await;
    assert_eq!(
        common::stored_payload(&nats.url(), "env").await,
        r#"{"updated_at": 400.25}"#
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn jetstream_deduplicates_by_message_id() {
    let nats = NatsServer::start();
    let config = nats_config(&nats);
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let metrics = Metrics::new("nats");
    let hub = Arc::new(Hub::new(Duration::from_secs(3600), metrics.hub.clone()));
    let backend = NatsBackend::start(
        &config.nats,
        hub,
        metrics.backend,
        metrics.nats,
        CancellationToken::new(),
        &log,
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), backend.readiness().wait())
        .await
        .unwrap();
    let update = Update {
        key: EnvironmentKey::parse("env").unwrap(),
        updated_at: UpdatedAt::from_unix_seconds(1735234027.5).unwrap(),
    };
    // Published straight to the backend, skipping the HTTP layer's "already known" shortcut.
    for _ in 0..3 {
        backend.store(update.clone()).await.unwrap();
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
    let config = nats_config(&nats);
    scenarios::backend_restart_flips_readiness_and_updates_flow_again(&config, |up| match up {
        true => nats.restart(),
        false => nats.stop(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_during_a_nats_restart_is_stored_once_it_is_back() {
    let mut nats = NatsServer::start();
    let config = nats_config(&nats);
    scenarios::a_publish_during_a_restart_is_stored_once_the_backend_is_back(
        &config,
        |up| match up {
            true => nats.restart(),
            false => nats.stop(),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_nats_gets_503_before_flagsmiths_timeout() {
    let nats = NatsServer::start();
    scenarios::a_stalled_backend_gets_503_before_flagsmiths_timeout(&nats_config(&nats), || {
        nats.signal("STOP")
    })
    .await;
    nats.signal("CONT");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_starts_while_nats_is_down_and_becomes_ready_later() {
    let mut nats = NatsServer::start();
    let config = nats_config(&nats);
    scenarios::the_service_starts_while_the_backend_is_down(&config, |up| match up {
        true => nats.restart(),
        false => nats.stop(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_cut_off_from_nats_catches_up_on_what_it_missed() {
    let nats = NatsServer::start();
    let mut proxy = common::Proxy::start(([127, 0, 0, 1], nats.port).into()).await;
    let mut cut_off = nats_config(&nats);
    cut_off.nats.url = proxy.url();
    scenarios::an_instance_cut_off_catches_up_on_what_it_missed(
        &cut_off,
        &nats_config(&nats),
        &mut proxy,
    )
    .await;
}
