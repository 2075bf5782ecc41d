//! The stream endpoint, byte for byte: what SDKs and browsers see on the wire.

mod common;

use std::time::{Duration, Instant};

use common::http::{Connection, Protocol, TestCertificate, tls_connect};
use flagsmith_sse::Config;

use common::{
    Chunk, OPENING, Service, SseClient, body_at, event, request_head, seconds, test_config, text,
    updated_at_of,
};

#[tokio::test]
async fn stream_headers_are_what_sdks_and_proxies_need() {
    let service = Service::start_ready(test_config()).await;
    let client = service.subscribe("env").await;
    assert_eq!(client.status, 200);
    assert_eq!(client.header("content-type"), Some("text/event-stream"));
    assert_eq!(client.header("cache-control"), Some("no-cache"));
    assert_eq!(client.header("x-accel-buffering"), Some("no"));
    assert_eq!(client.header("timing-allow-origin"), Some("*"));
    assert_eq!(client.header("access-control-allow-origin"), Some("*"));
    assert!(client.chunked, "HTTP/1.1 bodies must be chunked");
    assert_eq!(client.header("content-length"), None);

    // HTTP/2 streams and HTTP/1.1 ones have writers of their own: the same headers either way.
    let mut h2c = Connection::plain(service.addr, Protocol::Http2).await;
    let response = h2c
        .send("GET", "/sse/environments/env/stream", &[], "")
        .await;
    assert_eq!(response.status(), 200);
    for name in [
        "content-type",
        "cache-control",
        "x-accel-buffering",
        "timing-allow-origin",
        "access-control-allow-origin",
    ] {
        let value = response
            .headers()
            .get(name)
            .map(|value| value.to_str().unwrap());
        assert_eq!(value, client.header(name), "{name} over HTTP/2");
    }
}

#[tokio::test]
async fn hyper_and_the_http1_fast_path_send_the_same_stream_head() {
    let service = Service::start_ready(test_config()).await;
    let path = "/sse/environments/env/stream";
    let fast = SseClient::connect(service.addr, path, &[]).await;
    // More headers than the fast path parses (48), in a head longer than it reads (8 KiB):
    // handed to hyper even if one of those limits is raised.
    let names: Vec<String> = (0..64).map(|index| format!("x-filler-{index}")).collect();
    let filler = "f".repeat(128);
    let headers: Vec<(&str, &str)> = names
        .iter()
        .map(|name| (name.as_str(), filler.as_str()))
        .collect();
    assert!(request_head(service.addr, "GET", path, &headers).len() > 8 * 1024);
    let hyper = SseClient::connect(service.addr, path, &headers).await;

    assert_eq!((fast.status, hyper.status), (200, 200));
    // Both keep the connection open and chunk the body, so the framing headers are the same
    // too; only the Date may differ, by the second each head was written in.
    let head = |client: &SseClient| {
        let mut head: Vec<(String, String)> = client
            .headers
            .iter()
            .map(|(name, value)| match name.as_str() {
                "date" => (name.clone(), String::new()),
                _ => (name.clone(), value.clone()),
            })
            .collect();
        head.sort();
        head
    };
    assert_eq!(head(&fast), head(&hyper));
}

#[tokio::test]
async fn each_update_is_one_chunk_with_the_exact_event() {
    let service = Service::start_ready(test_config()).await;
    let mut client = service.subscribe("env").await;
    // Nothing is known yet: the comment that opens the stream, then each update.
    assert_eq!(client.next_data().await, OPENING);
    let (status, _) = service
        .publish(
            "env",
            r#"{"updated_at": "2024-12-26T17:27:07.123456+00:00"}"#,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(client.next_data().await, event("1735234027.123456"));

    // Whole seconds still carry a point: Flutter drops integers.
    service
        .publish("env", r#"{"updated_at": 1735234028}"#)
        .await;
    assert_eq!(client.next_data().await, event("1735234028.0"));
}

#[tokio::test]
async fn newest_known_update_comes_first_on_connect() {
    let service = Service::start_ready(test_config()).await;
    service.publish("env", &body_at(100.25)).await;
    service.publish("env", &body_at(200.5)).await;
    let mut client = service.subscribe("env").await;
    assert_eq!(client.next_data().await, event("200.5"));
}

#[tokio::test]
async fn unknown_environment_gets_200_and_only_keepalives() {
    let mut config = test_config();
    config.keepalive_interval = seconds(0.2);
    let service = Service::start_ready(config).await;
    let mut client = service.subscribe("nobody-publishes-here").await;
    assert_eq!(client.status, 200);
    assert_eq!(client.next_data().await, OPENING);
    // Then a keep-alive each interval, and nothing else.
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(client.next_data().await, b": ping\n\n");
    }
    assert!(started.elapsed() >= Duration::from_millis(550));
}

/// Firefox fires EventSource's `open` only once body bytes arrive: with nothing known, they
/// would be the first keep-alive, 15 s on. Within a second, over every protocol a browser or
/// SDK speaks, the stream writes the opening comment.
#[tokio::test]
async fn a_stream_with_nothing_known_sends_body_bytes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let certificate = TestCertificate::generate(dir.path(), "server");
    let tls = Service::start(Config {
        tls: Some(certificate.files.clone()),
        ..test_config()
    })
    .await;
    let plain = Service::start_ready(test_config()).await;
    let tls_addr = tls.addr;
    let over_tls = |alpn: &'static str| {
        let connector = certificate.connector(&[alpn]);
        async move { Connection::tls(tls_connect(tls_addr, &connector).await).await }
    };
    let connections = [
        (
            Protocol::Http1,
            Connection::plain(plain.addr, Protocol::Http1).await,
        ),
        (
            Protocol::Http2,
            Connection::plain(plain.addr, Protocol::Http2).await,
        ),
        (Protocol::Http2, over_tls("h2").await),
        (Protocol::Http1, over_tls("http/1.1").await),
    ];
    for (index, (protocol, mut connection)) in connections.into_iter().enumerate() {
        assert_eq!(connection.protocol(), protocol, "connection {index}");
        let asked = Instant::now();
        let mut stream = connection.subscribe("nobody-publishes-here").await;
        assert_eq!(stream.next_data().await, OPENING, "connection {index}");
        let took = asked.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "connection {index}: the first body bytes came after {took:?}"
        );
    }
    plain.stop().await;
    tls.stop().await;
}

#[tokio::test]
async fn keepalive_is_sent_only_after_a_quiet_interval() {
    let mut config = test_config();
    config.keepalive_interval = seconds(1.2);
    let service = Service::start_ready(config).await;
    let mut client = service.subscribe("env").await;
    assert_eq!(client.next_data().await, OPENING);
    // Events every 300 ms for longer than the interval keep the stream busy: no ping between.
    for step in 1..=6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        service.publish("env", &body_at(f64::from(step))).await;
        assert_eq!(
            text(&client.next_data().await),
            text(&event(&format!("{step}.0")))
        );
    }
    assert_eq!(client.next_data().await, b": ping\n\n");
}

#[tokio::test]
async fn streams_end_cleanly_after_max_stream_age_with_a_short_retry() {
    let mut config = test_config();
    config.max_stream_age = seconds(0.6);
    config.max_stream_age_jitter = 0.5;
    let service = Service::start_ready(config).await;
    let mut lifetimes = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let mut client = service.subscribe("env").await;
        assert_eq!(client.next_data().await, OPENING);
        assert_eq!(client.next_data().await, b"retry: 1000\n\n");
        assert!(matches!(
            client.next_chunk_within(Duration::from_secs(5)).await,
            Some(Chunk::End)
        ));
        lifetimes.push(started.elapsed());
    }
    for lifetime in &lifetimes {
        assert!(
            *lifetime >= Duration::from_millis(290) && *lifetime < Duration::from_millis(900),
            "lifetime {lifetime:?} outside 0.3..0.6 s (+ slack)"
        );
    }
    let spread =
        lifetimes.iter().max().unwrap().as_millis() - lifetimes.iter().min().unwrap().as_millis();
    assert!(spread > 10, "jitter should vary lifetimes: {lifetimes:?}");
}

#[tokio::test]
async fn zero_max_stream_age_keeps_streams_open() {
    let mut config = test_config();
    config.max_stream_age = seconds(0.0);
    config.keepalive_interval = seconds(0.3);
    let service = Service::start_ready(config).await;
    let mut client = service.subscribe("env").await;
    assert_eq!(client.next_data().await, OPENING);
    // Well past the default lifetime of the other tests: only keep-alives, never an end.
    for _ in 0..5 {
        assert_eq!(client.next_data().await, b": ping\n\n");
    }
}

#[tokio::test]
async fn any_accept_header_query_and_doubled_slash_work() {
    let service = Service::start_ready(test_config()).await;
    service.publish("env", &body_at(5.5)).await;
    for (path, headers) in [
        (
            "/sse/environments/env/stream",
            vec![("Accept", "application/json, text/event-stream")],
        ),
        (
            "/sse/environments/env/stream",
            vec![("Accept", "text/html")],
        ),
        ("/sse/environments/env/stream", vec![]),
        ("//sse/environments/env/stream", vec![]),
        ("/sse/environments/env/stream/", vec![]),
        (
            "/sse/environments/env/stream?foo=bar&x",
            vec![("Accept", "*/*")],
        ),
    ] {
        let mut client = SseClient::connect(service.addr, path, &headers).await;
        assert_eq!(client.status, 200, "{path} {headers:?}");
        assert_eq!(client.next_data().await, event("5.5"), "{path}");
    }
}

#[tokio::test]
async fn preflight_is_answered_for_every_route() {
    let service = Service::start_ready(test_config()).await;
    for path in [
        "/sse/environments/env/stream",
        "/sse/environments/env/queue-change",
        "/livez",
    ] {
        let client = SseClient::request(
            service.addr,
            "OPTIONS",
            path,
            &[
                ("Origin", "https://app.example"),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "authorization, content-type, x-custom",
                ),
            ],
        )
        .await;
        assert_eq!(client.status, 204, "{path}");
        assert_eq!(client.header("access-control-allow-origin"), Some("*"));
        assert!(
            client
                .header("access-control-allow-methods")
                .unwrap()
                .contains("POST")
        );
        assert_eq!(
            client.header("access-control-allow-headers"),
            Some("authorization, content-type, x-custom")
        );
    }
}

#[tokio::test]
async fn a_slow_reader_skips_to_the_newest_update() {
    let service = Service::start_ready(test_config()).await;
    let mut slow = service.subscribe("env").await;
    let mut fast = service.subscribe("env").await;
    assert_eq!(fast.next_data().await, OPENING);
    for step in 1..=50 {
        service.publish("env", &body_at(f64::from(step))).await;
        assert_eq!(fast.next_data().await, event(&format!("{step}.0")));
    }
    // The slow reader read nothing meanwhile: after the opening comment it may get any of
    // the updates, but only ever newer ones, and it must reach the newest.
    assert_eq!(slow.next_data().await, OPENING);
    let mut seen = Vec::new();
    loop {
        let updated_at = updated_at_of(&slow.next_data().await);
        seen.push(updated_at);
        if updated_at == 50.0 {
            break;
        }
    }
    assert!(seen.windows(2).all(|pair| pair[0] < pair[1]), "{seen:?}");
}

#[tokio::test]
async fn a_reader_that_never_reads_does_not_delay_others() {
    let service = Service::start_ready(test_config()).await;
    // Never read: its socket buffers fill with the events of 2000 updates.
    let _stuck = service.subscribe("env").await;
    let mut reader = service.subscribe("env").await;
    assert_eq!(reader.next_data().await, OPENING);
    for step in 1..=2000 {
        service.publish("env", &body_at(f64::from(step))).await;
        assert_eq!(reader.next_data().await, event(&format!("{step}.0")));
    }
}

#[tokio::test]
async fn streams_beyond_the_cap_get_503_with_retry_after() {
    let mut config = test_config();
    config.max_streams = 2;
    let service = Service::start_ready(config).await;
    let first = service.subscribe("a").await;
    let _second = service.subscribe("b").await;
    let shed = service.subscribe("c").await;
    assert_eq!(shed.status, 503);
    let retry_after: u64 = shed.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry_after));
    assert_eq!(shed.header("access-control-allow-origin"), Some("*"));

    // A closed stream frees its place.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let again = service.subscribe("c").await;
        if again.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "place never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn invalid_keys_and_unknown_paths_get_json_errors() {
    let service = Service::start_ready(test_config()).await;
    let mut bad = service.subscribe("a.b").await;
    assert_eq!(bad.status, 400);
    let body = text(&bad.read_body().await);
    assert!(body.contains("\"detail\""), "{body}");
    assert!(body.contains('.'), "{body}");

    let long = "k".repeat(129);
    assert_eq!(service.subscribe(&long).await.status, 400);

    let mut missing = SseClient::connect(service.addr, "/nope", &[]).await;
    assert_eq!(missing.status, 404);
    assert_eq!(
        text(&missing.read_body().await),
        r#"{"detail":"Not found."}"#
    );

    // An absolute target whose authority ends at a `?`: its path is empty, whatever the query
    // holds, so not a stream's.
    let mut query = SseClient::raw(
        service.addr,
        b"GET http://x?y//sse/environments/env/stream HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(query.status, 404);
    assert_eq!(text(&query.read_body().await), r#"{"detail":"Not found."}"#);
}

#[tokio::test]
async fn updates_older_than_the_retention_window_are_not_replayed() {
    let mut config = test_config();
    config.retention = seconds(0.4);
    config.keepalive_interval = seconds(0.3);
    let service = Service::start_ready(config).await;
    service.publish("env", &body_at(1.5)).await;
    let mut fresh = service.subscribe("env").await;
    assert_eq!(fresh.next_data().await, event("1.5"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut late = service.subscribe("env").await;
    // Not replayed: the stream opens as for an unknown environment.
    assert_eq!(late.next_data().await, OPENING);
    assert_eq!(late.next_data().await, b": ping\n\n");
}

// HTTP/1.1 connections: SDKs reuse them after a stream ends, and some pipeline.

fn short_streams() -> flagsmith_sse::Config {
    let mut config = test_config();
    config.max_stream_age = seconds(0.3);
    config.max_stream_age_jitter = 0.0;
    config
}

/// Reads a stream that ends on its own: its events, then the ending `retry:` and the end.
async fn read_to_end(client: &mut SseClient) -> Vec<Vec<u8>> {
    let mut events = Vec::new();
    loop {
        match client.next_chunk_within(Duration::from_secs(5)).await {
            Some(Chunk::Data(data)) => events.push(data),
            Some(Chunk::End) => return events,
            None => panic!("the stream did not end"),
        }
    }
}

async fn read_livez_answer(client: &mut SseClient) {
    client.read_response_head().await;
    assert_eq!(client.status, 200);
    assert!(!client.read_body().await.is_empty());
}

#[tokio::test]
async fn one_connection_carries_stream_after_stream_and_then_other_requests() {
    let service = Service::start_ready(short_streams()).await;
    service.publish("env", &body_at(7.5)).await;
    let mut client = service.subscribe("env").await;
    let ending = b"retry: 1000\n\n".to_vec();
    assert_eq!(
        read_to_end(&mut client).await,
        [event("7.5"), ending.clone()]
    );

    let stream = request_head(service.addr, "GET", "/sse/environments/env/stream", &[]);
    client.send(&stream).await;
    client.read_response_head().await;
    assert_eq!(client.status, 200);
    assert_eq!(client.header("content-type"), Some("text/event-stream"));
    assert!(client.chunked);
    assert_eq!(read_to_end(&mut client).await, [event("7.5"), ending]);

    client
        .send(&request_head(service.addr, "GET", "/livez", &[]))
        .await;
    read_livez_answer(&mut client).await;
}

#[tokio::test]
async fn requests_pipelined_behind_a_stream_are_answered_when_it_ends() {
    let service = Service::start_ready(short_streams()).await;
    service.publish("env", &body_at(8.5)).await;
    let mut requests = request_head(service.addr, "GET", "/sse/environments/env/stream", &[]);
    requests.extend(request_head(service.addr, "GET", "/livez", &[]));
    let mut client =
        SseClient::request(service.addr, "GET", "/sse/environments/env/stream", &[]).await;
    assert_eq!(client.next_data().await, event("8.5"));
    // Sent while the first stream runs: answered in order once it ends.
    client.send(&requests).await;
    assert_eq!(client.next_data().await, b"retry: 1000\n\n");
    assert!(matches!(
        client.next_chunk_within(Duration::from_secs(5)).await,
        Some(Chunk::End)
    ));
    client.read_response_head().await;
    assert_eq!(client.status, 200);
    assert_eq!(read_to_end(&mut client).await.first(), Some(&event("8.5")));
    read_livez_answer(&mut client).await;
}

#[tokio::test]
async fn connection_close_closes_the_connection_after_the_stream() {
    let service = Service::start_ready(short_streams()).await;
    let mut client = SseClient::connect(
        service.addr,
        "/sse/environments/env/stream",
        &[("Connection", "close")],
    )
    .await;
    assert_eq!(client.status, 200);
    assert_eq!(client.header("connection"), Some("close"));
    assert_eq!(
        read_to_end(&mut client).await,
        [OPENING.to_vec(), b"retry: 1000\n\n".to_vec()]
    );
    assert!(
        client.is_closed().await,
        "the service kept the connection open"
    );
}

#[tokio::test]
async fn stream_requests_with_large_heads_are_served() {
    let service = Service::start_ready(test_config()).await;
    service.publish("env", &body_at(9.5)).await;
    let cookie = format!("session={}", "c".repeat(20 * 1024));
    let mut client = SseClient::connect(
        service.addr,
        "/sse/environments/env/stream",
        &[("Cookie", &cookie)],
    )
    .await;
    assert_eq!(client.status, 200);
    assert!(client.chunked);
    assert_eq!(client.next_data().await, event("9.5"));
}
