//! The Redis / Valkey backend: several instances sharing updates through one real
//! `redis-server` (or a cluster of them), as deployments of the Redis-based `flagsmith/sse` do.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::daemon::Daemon;
use common::redis::{RedisCluster, RedisServer, redis_config};
use common::{
    OPENING, Service, SseClient, body_at, event, publish, scenarios, seconds, wait_readiness,
};
use flagsmith_sse::backend::Store;
use flagsmith_sse::backend::redis::RedisBackend;
use flagsmith_sse::config::RedisConfig;
use flagsmith_sse::domain::{EnvironmentKey, Update, UpdatedAt};
use flagsmith_sse::hub::Hub;
use flagsmith_sse::metrics::Metrics;
use tokio_util::sync::CancellationToken;

const UPDATED_AT: &str = "{flagsmith-sse}:updated-at";
const STORED_AT: &str = "{flagsmith-sse}:stored-at";
const CHANNEL: &str = "{flagsmith-sse}:updates";

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_on_one_instance_reaches_subscribers_on_another() {
    let redis = RedisServer::start();
    scenarios::a_publish_on_one_instance_reaches_subscribers_on_another(&redis_config(&redis))
        .await;
    assert_eq!(redis.cli(&["HGET", UPDATED_AT, "env"]), "1735234099.5");
    // One subscription per instance, whatever its subscribers.
    assert_eq!(
        redis.cli(&["PUBSUB", "NUMSUB", CHANNEL]),
        format!("{CHANNEL}\n3")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_timestamp_published_after_a_newer_one_changes_nothing() {
    let redis = RedisServer::start();
    scenarios::an_older_timestamp_published_after_a_newer_one_changes_nothing(&redis_config(
        &redis,
    ))
    .await;
    assert_eq!(redis.cli(&["HGET", UPDATED_AT, "env"]), "5.5");
}

/// Flagsmith's Helm chart runs the image with `args: ["serve"]`, the token in
/// `SSE_AUTHENTICATION_TOKEN`, the Redis variables in `extraEnv`, and probes
/// `/health/liveness/` and `/health/readiness/`. (`container/test` runs the image itself,
/// without `LISTEN_ADDR`, on port 8000.)
#[tokio::test(flavor = "multi_thread")]
async fn the_binary_run_as_the_helm_chart_runs_it_serves_probes_and_updates() {
    let redis = RedisServer::start();
    let mut daemon = Daemon::spawn_with_args(
        &["serve"],
        &[
            ("SSE_AUTHENTICATION_TOKEN", "chart-token".to_owned()),
            ("REDIS_HOST", "127.0.0.1".to_owned()),
            ("REDIS_PORT", redis.port.to_string()),
        ],
    );
    let addr = daemon.listen_addr();
    wait_readiness(addr, true).await;
    let client = reqwest::Client::new();
    for probe in ["/health/liveness/", "/health/readiness/"] {
        let response = client
            .get(format!("http://{addr}{probe}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{probe}");
    }
    let mut subscriber = SseClient::connect(addr, "/sse/environments/env/stream", &[]).await;
    let body = r#"{"updated_at": "2024-12-26T17:27:07.123456+00:00"}"#;
    assert_eq!(publish(addr, "env", body, Some("wrong")).await.0, 401);
    assert_eq!(publish(addr, "env", body, Some("chart-token")).await.0, 200);
    assert_eq!(subscriber.next_event().await, event("1735234027.123456"));
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(25)).0, Some(0));
}

fn backend_config(redis: &RedisServer) -> RedisConfig {
    redis_config(redis).redis
}

async fn start_backend(config: &RedisConfig, retention: Duration) -> (RedisBackend, Arc<Hub>) {
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let metrics = Metrics::new("redis");
    let hub = Arc::new(Hub::new(retention, metrics.hub.clone()));
    let backend = RedisBackend::start(
        config,
        hub.clone(),
        metrics.backend,
        metrics.redis,
        CancellationToken::new(),
        &log,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), backend.readiness().wait())
        .await
        .expect("the backend becomes ready");
    (backend, hub)
}

fn update(key: &str, seconds: f64) -> Update {
    Update {
        key: EnvironmentKey::parse(key).unwrap(),
        updated_at: UpdatedAt::from_unix_seconds(seconds).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_during_a_redis_restart_is_stored_once_it_is_back() {
    let mut redis = RedisServer::start();
    let config = redis_config(&redis);
    scenarios::a_publish_during_a_restart_is_stored_once_the_backend_is_back(
        &config,
        |up| match up {
            true => redis.restart(),
            false => redis.stop(),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_publishes_from_two_instances_keep_the_newest() {
    let redis = RedisServer::start();
    scenarios::concurrent_publishes_from_two_instances_keep_the_newest(&redis_config(&redis)).await;
    assert_eq!(redis.cli(&["HGET", UPDATED_AT, "env"]), "400.25");
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_expire_from_redis_after_the_retention_window() {
    let redis = RedisServer::start();
    let config = backend_config(&redis);
    let (backend, _) = start_backend(&config, Duration::from_secs(1)).await;
    backend.store(update("old", 1.5)).await.unwrap();
    let ttl: i64 = redis.cli(&["PTTL", STORED_AT]).parse().unwrap();
    assert!((1..=1000).contains(&ttl), "PTTL {ttl}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Another environment's publish forgets the expired one; its keys live on.
    backend.store(update("new", 2.5)).await.unwrap();
    assert_eq!(redis.cli(&["HKEYS", UPDATED_AT]), "new");
    assert_eq!(redis.cli(&["ZRANGE", STORED_AT, "0", "-1"]), "new");
    // Nothing published for a whole window: the keys themselves are gone.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(redis.cli(&["EXISTS", UPDATED_AT, STORED_AT]), "0");
    backend.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_instance_does_not_send_an_expired_update() {
    let redis = RedisServer::start();
    let mut config = redis_config(&redis);
    config.retention = seconds(1.0);
    config.keepalive_interval = seconds(0.3);
    let a = Service::start_ready(config.clone()).await;
    assert_eq!(a.publish("env", &body_at(1.5)).await.0, 200);
    // Another environment's publish keeps the keys alive; `env` is not yet old enough to be
    // forgotten by it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(a.publish("other", &body_at(2.5)).await.0, 200);
    // Now `env` is still stored, but older than the window.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(redis.cli(&["HGET", UPDATED_AT, "env"]), "1.5");
    let b = Service::start_ready(config).await;
    assert_eq!(b.subscribe("other").await.next_event().await, event("2.5"));
    // Opened as for an unknown environment, and nothing after.
    let mut env = b.subscribe("env").await;
    assert_eq!(env.next_data().await, OPENING);
    assert_eq!(env.next_data().await, b": ping\n\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restart_flips_readiness_and_updates_flow_again() {
    let mut redis = RedisServer::start();
    let config = redis_config(&redis);
    scenarios::backend_restart_flips_readiness_and_updates_flow_again(&config, |up| match up {
        true => redis.restart(),
        false => redis.stop(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_redis_gets_503_before_flagsmiths_timeout() {
    let redis = RedisServer::start();
    let service = scenarios::a_stalled_backend_gets_503_before_flagsmiths_timeout(
        &redis_config(&redis),
        || redis.signal("STOP"),
    )
    .await;
    // The probes notice a server that answers nothing, and that it is back.
    service.wait_ready(false).await;
    redis.signal("CONT");
    service.wait_ready(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_starts_while_redis_is_down_and_becomes_ready_later() {
    let mut redis = RedisServer::start();
    let config = redis_config(&redis);
    scenarios::the_service_starts_while_the_backend_is_down(&config, |up| match up {
        true => redis.restart(),
        false => redis.stop(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_cut_off_from_redis_catches_up_on_what_it_missed() {
    let redis = RedisServer::start();
    let mut proxy = common::Proxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let mut cut_off = redis_config(&redis);
    cut_off.redis.port = proxy.port;
    scenarios::an_instance_cut_off_catches_up_on_what_it_missed(
        &cut_off,
        &redis_config(&redis),
        &mut proxy,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_password_comes_from_a_file() {
    let redis = RedisServer::start_with_password("s3cret pass");
    let password_file = redis.dir().join("password");
    std::fs::write(&password_file, "s3cret pass\n").unwrap();
    let mut config = redis_config(&redis);
    config.redis.password_file = Some(password_file);
    let service = Service::start_ready(config.clone()).await;
    assert_eq!(service.publish("env", &body_at(1.5)).await.0, 200);
    assert_eq!(redis.cli(&["HGET", UPDATED_AT, "env"]), "1.5");

    // A wrong password: never ready, and publishes are refused, not lost.
    let mut wrong = config;
    wrong.redis.password_file = None;
    wrong.redis.password = Some(flagsmith_sse::config::Secret::new("wrong".to_owned()));
    let refused = Service::start(wrong).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(refused.readyz().await, 503);
    assert_eq!(refused.publish("env", &body_at(2.5)).await.0, 503);
    assert_eq!(redis.cli(&["HGET", UPDATED_AT, "env"]), "1.5");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rotates_the_redis_password() {
    let mut redis = RedisServer::start_with_password("first pass");
    let password_file = redis.dir().join("password");
    std::fs::write(&password_file, "first pass\n").unwrap();
    let envs = [
        ("SSE_AUTHENTICATION_TOKEN", "token".to_owned()),
        ("REDIS_HOST", "127.0.0.1".to_owned()),
        ("REDIS_PORT", redis.port.to_string()),
        (
            "FLAGSMITH_SSE_REDIS__PASSWORD_FILE",
            password_file.display().to_string(),
        ),
    ];
    let mut rotated = Daemon::spawn(&envs);
    // Never reloaded: what the rotation would be without SIGHUP.
    let mut stale = Daemon::spawn(&envs);
    let (addr, stale_addr) = (rotated.listen_addr(), stale.listen_addr());
    wait_readiness(addr, true).await;
    wait_readiness(stale_addr, true).await;
    let mut subscriber = SseClient::connect(addr, "/sse/environments/env/stream", &[]).await;

    // A password Redis does not take: the reload says so and changes nothing.
    std::fs::write(&password_file, "second pass\n").unwrap();
    rotated.signal("HUP");
    let refused = rotated.wait_log("backend reload failed, keeping the current connection");
    assert!(
        refused["error"].as_str().unwrap().contains("127.0.0.1"),
        "{refused}"
    );
    assert_eq!(
        publish(addr, "env", &body_at(1.5), Some("token")).await.0,
        200
    );
    assert_eq!(subscriber.next_event().await, event("1.5"));

    // As an operator rotates it: Redis first (logged-in connections stay), then the file.
    redis.set_password("second pass");
    rotated.signal("HUP");
    rotated.wait_log("reconnected the backend with its new password");
    // Every connection logged in with the old password is cut; only the new one logs in.
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    wait_readiness(stale_addr, false).await;
    assert_eq!(
        publish(stale_addr, "env", &body_at(2.5), Some("token"))
            .await
            .0,
        503
    );
    wait_readiness(addr, true).await;
    assert_eq!(
        publish(addr, "env", &body_at(3.5), Some("token")).await.0,
        200
    );
    assert_eq!(subscriber.next_event().await, event("3.5"));
    assert_eq!(redis.cli(&["HGET", UPDATED_AT, "env"]), "3.5");
    for daemon in [&mut rotated, &mut stale] {
        daemon.signal("TERM");
        assert_eq!(daemon.wait_exit(Duration::from_secs(25)).0, Some(0));
    }
}

#[tokio::test]
async fn unreadable_secrets_and_certificates_stop_start_up_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let start = |config: RedisConfig| {
        let metrics = Metrics::new("redis");
        let hub = Arc::new(Hub::new(Duration::from_secs(3600), metrics.hub.clone()));
        RedisBackend::start(
            &config,
            hub,
            metrics.backend,
            metrics.redis,
            CancellationToken::new(),
            &log,
        )
        .err()
        .expect("start-up refused")
        .to_string()
    };
    let missing = dir.path().join("missing");
    let message = start(RedisConfig {
        password_file: Some(missing.clone()),
        ..RedisConfig::default()
    });
    assert!(message.contains("redis.password_file"), "{message}");
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );

    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let message = start(RedisConfig {
        tls: true,
        tls_ca_file: Some(not_pem.clone()),
        ..RedisConfig::default()
    });
    assert!(message.contains("redis.tls_ca_file"), "{message}");
    assert!(message.contains("no PEM certificate"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_to_redis_verifies_the_server_certificate() {
    let redis = RedisServer::start_tls();
    let tls = redis.tls.as_ref().unwrap();
    let mut config = redis_config(&redis);
    config.redis.host = "localhost".to_owned();
    config.redis.tls = true;
    config.redis.tls_ca_file = Some(tls.ca.clone());
    let a = Service::start_ready(config.clone()).await;
    let b = Service::start_ready(config.clone()).await;
    let mut on_b = b.subscribe("env").await;
    assert_eq!(a.publish("env", &body_at(1.5)).await.0, 200);
    assert_eq!(on_b.next_event().await, event("1.5"));

    // The system's CAs do not know the private one: the certificate is refused.
    let mut untrusted = config;
    untrusted.redis.tls_ca_file = None;
    let refused = Service::start(untrusted).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(refused.readyz().await, 503);
    assert_eq!(refused.publish("env", &body_at(2.5)).await.0, 503);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_shares_updates_through_sharded_pub_sub() {
    let cluster = RedisCluster::start(3, 0);
    let owner = cluster.owner(CHANNEL);
    // Each instance starts from a different node; the client finds the slot's owner.
    let configs: Vec<_> = cluster.nodes[..2]
        .iter()
        .map(|node| {
            let mut config = redis_config(node);
            config.redis.cluster = true;
            config
        })
        .collect();
    let a = Service::start_ready(configs[0].clone()).await;
    let b = Service::start_ready(configs[1].clone()).await;
    let mut on_b = b.subscribe("env").await;
    assert_eq!(a.publish("env", &body_at(1.5)).await.0, 200);
    assert_eq!(on_b.next_event().await, event("1.5"));
    assert_eq!(owner.cli(&["HGET", UPDATED_AT, "env"]), "1.5");
    // Both listen on the shard channel at its owner, not on the cluster-wide bus.
    assert_eq!(
        owner.cli(&["PUBSUB", "SHARDNUMSUB", CHANNEL]),
        format!("{CHANNEL}\n2")
    );
    assert_eq!(
        owner.cli(&["PUBSUB", "NUMSUB", CHANNEL]),
        format!("{CHANNEL}\n0")
    );

    assert_eq!(b.publish("env", &body_at(2.5)).await.0, 200);
    assert_eq!(on_b.next_event().await, event("2.5"));
    let mut late = b.subscribe("env").await;
    assert_eq!(late.next_event().await, event("2.5"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_failover_is_ridden_out() {
    let mut cluster = RedisCluster::start(3, 1);
    let owner = cluster.owner_index(CHANNEL);
    // Both instances start from a node that will survive.
    let seed = (owner + 1) % cluster.nodes.len();
    let mut config = redis_config(&cluster.nodes[seed]);
    config.redis.cluster = true;
    let a = Service::start_ready(config.clone()).await;
    let b = Service::start_ready(config).await;
    let mut on_b = b.subscribe("env").await;
    assert_eq!(a.publish("env", &body_at(1.5)).await.0, 200);
    assert_eq!(on_b.next_event().await, event("1.5"));

    // The master of the slot dies; its replica takes over once the cluster notices, and the
    // instances find it by themselves.
    cluster.nodes[owner].stop();
    a.wait_ready(false).await;
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    // The replica had the update; both instances publish and hear through the new master.
    assert_eq!(a.publish("env", &body_at(2.5)).await.0, 200);
    assert_eq!(on_b.next_event().await, event("2.5"));
    let mut late = b.subscribe("env").await;
    assert_eq!(late.next_event().await, event("2.5"));
}
