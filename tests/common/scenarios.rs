//! What every backend that joins instances must do, whatever it is built on; `tests/nats.rs`
//! and `tests/redis.rs` run each scenario against their real server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flagsmith_sse::Config;
use flagsmith_sse::domain::{EnvironmentKey, Update, UpdatedAt};
use flagsmith_sse::hub::Hub;
use flagsmith_sse::metrics::Metrics;
use tokio_util::sync::CancellationToken;

use super::{Proxy, Service, TOKEN, body_at, event, seconds};

/// An older update published after a newer one, through another instance, is accepted (a
/// newer one is stored) and changes nothing: no event, and a new instance sends the newer.
pub async fn an_older_timestamp_published_after_a_newer_one_changes_nothing(config: &Config) {
    let mut config = config.clone();
    config.keepalive_interval = seconds(0.3);
    let a = Service::start_ready(config.clone()).await;
    let b = Service::start_ready(config.clone()).await;
    let mut on_a = a.subscribe("env").await;
    let mut on_b = b.subscribe("env").await;

    assert_eq!(a.publish("env", &body_at(5.5)).await.0, 200);
    assert_eq!(on_a.next_event().await, event("5.5"));
    assert_eq!(on_b.next_event().await, event("5.5"));
    // Older, through the other instance: accepted (it is stored: a newer one is), no event.
    assert_eq!(b.publish("env", &body_at(3.5)).await.0, 200);
    // Retries of the newest: one event in all, already sent.
    assert_eq!(a.publish("env", &body_at(5.5)).await.0, 200);
    assert_eq!(b.publish("env", &body_at(5.5)).await.0, 200);
    assert_eq!(on_a.next_data().await, b": ping\n\n");
    assert_eq!(on_b.next_data().await, b": ping\n\n");
    let c = Service::start_ready(config).await;
    assert_eq!(c.subscribe("env").await.next_event().await, event("5.5"));
}

/// 400 updates of one environment, in a shuffled order, published at once through two
/// instances straight to their backends (skipping the HTTP layer's "already known" shortcut,
/// as a retried task or an instance that has not heard of the newest yet would): every publish
/// succeeds, both instances end with the newest, and so does an instance started afterwards,
/// whose first event is the newest. The caller then checks what its store holds: 400.25.
pub async fn concurrent_publishes_from_two_instances_keep_the_newest(config: &Config) {
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let start = || async {
        let metrics = Metrics::new(config.backend.name());
        let hub = Arc::new(Hub::new(Duration::from_secs(3600), metrics.hub.clone()));
        let backend = flagsmith_sse::backend::start(
            config,
            hub.clone(),
            &metrics,
            &CancellationToken::new(),
            &log,
        )
        .await
        .unwrap();
        // A new NATS cluster elects its JetStream leader first: seconds.
        tokio::time::timeout(Duration::from_secs(30), backend.readiness().wait())
            .await
            .expect("the backend becomes ready");
        (backend, hub)
    };
    let (a, hub_a) = start().await;
    let (b, hub_b) = start().await;
    let update = |seconds: f64| Update {
        key: EnvironmentKey::parse("env").unwrap(),
        updated_at: UpdatedAt::from_unix_seconds(seconds).unwrap(),
    };
    let mut order: Vec<u32> = (1..=400).collect();
    order.sort_by_key(|n| (n * 7919) % 401);
    let publishes = order.iter().enumerate().map(|(index, n)| {
        let backend = if index % 2 == 0 { &a } else { &b };
        backend.publish(update(f64::from(*n) + 0.25))
    });
    for result in futures_util::future::join_all(publishes).await {
        result.unwrap();
    }
    let key = EnvironmentKey::parse("env").unwrap();
    for hub in [&hub_a, &hub_b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while hub.latest(&key).map(UpdatedAt::as_secs_f64) != Some(400.25) {
            assert!(Instant::now() < deadline, "an instance missed the newest");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    a.close().await;
    b.close().await;
    let c = Service::start_ready(config.clone()).await;
    assert_eq!(c.subscribe("env").await.next_event().await, event("400.25"));
}

/// A publish on one instance reaches subscribers on another and on itself; a subscriber
/// arriving later gets the newest value first, and so does a new instance. Returns the
/// instances, for checks of the backend's own state.
pub async fn a_publish_on_one_instance_reaches_subscribers_on_another(
    config: &Config,
) -> [Service; 3] {
    let a = Service::start_ready(config.clone()).await;
    let b = Service::start_ready(config.clone()).await;
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

    b.publish("env", &body_at(1735234099.5)).await;
    let mut late = b.subscribe("env").await;
    assert_eq!(late.next_event().await, event("1735234099.5"));
    let c = Service::start_ready(config.clone()).await;
    let mut on_c = c.subscribe("env").await;
    assert_eq!(on_c.next_event().await, event("1735234099.5"));
    [a, b, c]
}

/// The backend goes away (`set_up(false)`) under two instances with subscribers, and comes
/// back (`set_up(true)`): readiness follows it, publishes meanwhile get a quick `503` with
/// `Retry-After`, and afterwards updates flow to the subscribers that stayed connected.
pub async fn backend_restart_flips_readiness_and_updates_flow_again(
    config: &Config,
    mut set_up: impl FnMut(bool),
) {
    let a = Service::start_ready(config.clone()).await;
    let b = Service::start_ready(config.clone()).await;
    let mut on_a = a.subscribe("env").await;
    let mut on_b = b.subscribe("env").await;
    a.publish("env", &body_at(1.5)).await;
    assert_eq!(on_a.next_event().await, event("1.5"));
    assert_eq!(on_b.next_event().await, event("1.5"));

    set_up(false);
    a.wait_ready(false).await;
    b.wait_ready(false).await;
    // Never a 2xx for an update that could not be stored, and an answer well within 2 s.
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(a.url("/sse/environments/env/queue-change"))
        .header("authorization", format!("Token {TOKEN}"))
        .body(body_at(2.5))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(b.publish("env", &body_at(2.5)).await.0, 503);

    set_up(true);
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    assert_eq!(a.publish("env", &body_at(3.5)).await.0, 200);
    assert_eq!(on_a.next_event().await, event("3.5"));
    assert_eq!(on_b.next_event().await, event("3.5"));
    assert_eq!(b.publish("other", &body_at(4.5)).await.0, 200);
    let mut other_on_a = a.subscribe("other").await;
    assert_eq!(other_on_a.next_event().await, event("4.5"));
}

/// Flagsmith tries a failed publish again only at its next poll, three times in all. A publish
/// that arrives while the backend restarts waits for it, within `publish_timeout`, and is
/// stored: a `200` inside Flagsmith's 2 s, not a `503` at once.
pub async fn a_publish_during_a_restart_is_stored_once_the_backend_is_back(
    config: &Config,
    mut set_up: impl FnMut(bool),
) {
    let a = Service::start_ready(config.clone()).await;
    let mut on_a = a.subscribe("env").await;
    set_up(false);
    a.wait_ready(false).await;
    let started = Instant::now();
    let addr = a.addr;
    let publish =
        tokio::spawn(async move { super::publish(addr, "env", &body_at(5.5), Some(TOKEN)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    set_up(true);
    let (status, body) = publish.await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    assert_eq!(on_a.next_event().await, event("5.5"));
}

/// A backend that stops answering (`freeze()`) gets a publish `503` before Flagsmith's 2 s
/// timeout. Returns the instance, the backend still frozen.
pub async fn a_stalled_backend_gets_503_before_flagsmiths_timeout(
    config: &Config,
    freeze: impl FnOnce(),
) -> Service {
    let service = Service::start_ready(config.clone()).await;
    freeze();
    let started = Instant::now();
    let (status, _) = service.publish("env", &body_at(1.5)).await;
    let took = started.elapsed();
    assert_eq!(status, 503);
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    service
}

/// With the backend down (`set_up(false)` before the service starts), the service lives,
/// streams and refuses publishes; once the backend is up it becomes ready on its own.
pub async fn the_service_starts_while_the_backend_is_down(
    config: &Config,
    mut set_up: impl FnMut(bool),
) {
    set_up(false);
    let service = Service::start(config.clone()).await;
    let livez = reqwest::get(service.url("/livez")).await.unwrap();
    assert_eq!(livez.status(), 200);
    assert_eq!(service.readyz().await, 503);
    assert_eq!(service.publish("env", &body_at(1.5)).await.0, 503);
    let mut early = service.subscribe("env").await;
    assert_eq!(early.status, 200);

    set_up(true);
    service.wait_ready(true).await;
    assert_eq!(service.publish("env", &body_at(2.5)).await.0, 200);
    assert_eq!(early.next_event().await, event("2.5"));
}

/// An instance reaching the backend through `proxy` (configured by `cut_off`) is cut off
/// while another (`other`) publishes; once the proxy is restored it has caught up on what it
/// missed: the newest value of every environment.
pub async fn an_instance_cut_off_catches_up_on_what_it_missed(
    cut_off: &Config,
    other: &Config,
    proxy: &mut Proxy,
) {
    let cut_off = Service::start_ready(cut_off.clone()).await;
    let other = Service::start_ready(other.clone()).await;
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
