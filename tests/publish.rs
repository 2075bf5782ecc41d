//! `queue-change`: authentication, validation, accepted timestamp forms, idempotence.

mod common;

use common::{OPENING, Service, SseClient, TOKEN, body_at, event, publish, seconds, test_config};

/// A subscriber with 300 ms keep-alives, so "no event" is observable as "a ping came first".
async fn quiet_service() -> Service {
    let mut config = test_config();
    config.keepalive_interval = seconds(0.3);
    Service::start_ready(config).await
}

/// Subscribes to `key`, of which nothing is known yet, and reads the comment that opens its
/// stream: what comes next is an event, or a keep-alive if there is none.
async fn subscribe_opened(service: &Service, key: &str) -> SseClient {
    let mut client = service.subscribe(key).await;
    assert_eq!(client.next_data().await, OPENING, "the opening comment");
    client
}

async fn assert_only_pings(client: &mut SseClient) {
    assert_eq!(
        common::text(&client.next_data().await),
        ": ping\n\n",
        "expected no event"
    );
}

#[tokio::test]
async fn missing_or_wrong_token_is_401_and_publishes_nothing() {
    let service = quiet_service().await;
    let mut client = subscribe_opened(&service, "env").await;
    let body = body_at(10.0);
    for token in [
        None,
        Some("wrong"),
        Some(""),
        Some(&TOKEN[..TOKEN.len() - 1]),
    ] {
        let (status, answer) = publish(service.addr, "env", &body, token).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(answer, r#"{"detail":"Invalid authorization header"}"#);
    }
    let response = reqwest::Client::new()
        .post(service.url("/sse/environments/env/queue-change"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_only_pings(&mut client).await;
}

/// A publish from the source address `source`: status, `Retry-After`, body.
async fn publish_from(service: &Service, source: &str, token: &str) -> (u16, Option<u64>, String) {
    let client = reqwest::Client::builder()
        .local_address(source.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let response = client
        .post(service.url("/sse/environments/env/queue-change"))
        .header("authorization", format!("Token {token}"))
        .body(body_at(20.5))
        .send()
        .await
        .unwrap();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().parse().unwrap());
    (
        response.status().as_u16(),
        retry_after,
        response.text().await.unwrap(),
    )
}

#[tokio::test]
async fn a_peer_that_keeps_failing_authentication_is_throttled_alone() {
    let service = quiet_service().await;
    let mut client = subscribe_opened(&service, "env").await;
    for _ in 0..20 {
        assert_eq!(publish_from(&service, "127.0.0.2", "guess").await.0, 401);
    }
    // From now on even the right token is refused unchecked: a guess would learn nothing.
    for token in ["guess", TOKEN] {
        let (status, retry_after, answer) = publish_from(&service, "127.0.0.2", token).await;
        assert_eq!(status, 429, "{token}");
        let retry_after = retry_after.expect("a Retry-After header");
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        assert_eq!(
            answer,
            r#"{"detail":"Too many failed authentications, retry later"}"#
        );
    }
    assert_only_pings(&mut client).await;
    // Another peer is not held up.
    assert_eq!(publish_from(&service, "127.0.0.3", TOKEN).await.0, 200);
    assert_eq!(client.next_event().await, event("20.5"));
}

#[tokio::test]
async fn malformed_keys_and_bodies_are_400_with_a_detail() {
    let service = quiet_service().await;
    let mut client = subscribe_opened(&service, "env").await;
    for key in ["a.b", "a*", "a>", "a%20b", &"k".repeat(129)] {
        let (status, answer) = service.publish(key, &body_at(10.0)).await;
        assert_eq!(status, 400, "key {key:?}");
        assert!(answer.starts_with(r#"{"detail":"#), "{answer}");
    }
    for body in [
        "",
        "not json",
        "[1]",
        "{}",
        r#"{"updated_at": null}"#,
        r#"{"updated_at": true}"#,
        r#"{"updated_at": "yesterday"}"#,
        r#"{"updated_at": "1735229888.76"}"#,
        r#"{"updated_at": -5}"#,
        r#"{"updated_at": "2024-13-45T99:00:00"}"#,
    ] {
        let (status, answer) = service.publish("env", body).await;
        assert_eq!(status, 400, "body {body:?}");
        let detail: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert!(detail["detail"].as_str().unwrap().len() > 5, "{answer}");
    }
    assert_only_pings(&mut client).await;
}

#[tokio::test]
async fn iso_strings_and_numbers_are_accepted() {
    let service = Service::start_ready(test_config()).await;
    let mut client = subscribe_opened(&service, "env").await;
    for (updated_at, expected) in [
        // What Flagsmith's task processor sends today.
        (r#""2024-12-26T17:27:07.123456+00:00""#, "1735234027.123456"),
        // Microseconds omitted when zero.
        (r#""2024-12-26T17:27:08+00:00""#, "1735234028.0"),
        (r#""2024-12-26T17:27:09.5Z""#, "1735234029.5"),
        (r#""2024-12-26T18:27:10.25+01:00""#, "1735234030.25"),
        // Older docs: naive, meaning UTC.
        (r#""2024-12-26T17:27:11.028060""#, "1735234031.02806"),
        (r#""2024-12-26T17:27:12""#, "1735234032.0"),
        ("1735234033", "1735234033.0"),
        ("1735234034.76", "1735234034.76"),
    ] {
        let (status, answer) = service
            .publish("env", &format!(r#"{{"updated_at": {updated_at}}}"#))
            .await;
        assert_eq!(status, 200, "{updated_at}: {answer}");
        assert_eq!(client.next_data().await, event(expected), "{updated_at}");
    }
}

#[tokio::test]
async fn the_same_update_twice_is_one_event_and_older_ones_change_nothing() {
    let service = quiet_service().await;
    let mut client = subscribe_opened(&service, "env").await;
    let iso = r#"{"updated_at": "2024-12-26T17:27:07.123456+00:00"}"#;
    for _ in 0..3 {
        assert_eq!(service.publish("env", iso).await.0, 200);
    }
    assert_eq!(client.next_data().await, event("1735234027.123456"));
    // An older update arriving late (a retried task) is accepted but not sent.
    assert_eq!(
        service.publish("env", &body_at(1_000_000_000.0)).await.0,
        200
    );
    assert_only_pings(&mut client).await;
    // A late subscriber still gets the newest.
    let mut late = service.subscribe("env").await;
    assert_eq!(late.next_data().await, event("1735234027.123456"));
}

#[tokio::test]
async fn oversized_bodies_and_wrong_methods_are_refused() {
    let service = Service::start_ready(test_config()).await;
    let padding = " ".repeat(5000);
    let (status, answer) = service
        .publish("env", &format!(r#"{{"updated_at": 1.0{padding}}}"#))
        .await;
    assert_eq!(status, 413);
    assert!(answer.contains("detail"));

    let wrong_method = reqwest::get(service.url("/sse/environments/env/queue-change"))
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    let wrong_method = reqwest::Client::new()
        .post(service.url("/sse/environments/env/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
}

#[tokio::test]
async fn publish_then_subscribe_on_another_key_is_isolated() {
    let service = quiet_service().await;
    let mut other = subscribe_opened(&service, "other").await;
    service.publish("env", &body_at(42.0)).await;
    assert_only_pings(&mut other).await;
    let mut client = service.subscribe("env").await;
    assert_eq!(client.next_data().await, event("42.0"));
}
