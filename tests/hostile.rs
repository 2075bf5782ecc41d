//! Malformed and hostile HTTP: every request gets a client error or a closed connection, never a
//! server error (the documented `503`s aside), no connection task panics, and a subscriber
//! connected throughout still gets its update. Generated `queue-change` bodies (proptest, a
//! fixed seed) get `200`, `400` or `413`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Service, SseClient, body_at, event, test_config, text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Panics anywhere in this test binary, the service's connection tasks included: tokio would
/// otherwise swallow them with the task.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
}

/// A fixed-seed property run: `cases` and `seed` unless `FLAGSMITH_SSE_FUZZ_CASES` and
/// `FLAGSMITH_SSE_FUZZ_SEED` say otherwise, as `faults/run fuzz` does for a long run.
fn fuzz_config(cases: u32, seed: u64) -> proptest::test_runner::Config {
    fn from_env<T: std::str::FromStr>(name: &str) -> Option<T> {
        let value = std::env::var(name).ok()?;
        Some(
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
        )
    }
    proptest::test_runner::Config {
        cases: from_env("FLAGSMITH_SSE_FUZZ_CASES").unwrap_or(cases),
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(
            from_env("FLAGSMITH_SSE_FUZZ_SEED").unwrap_or(seed),
        ),
        ..proptest::test_runner::Config::default()
    }
}

/// What the service answered to `request`: the status of its first response, or `None` when it
/// closed the connection without one. Fails if it neither answers nor closes within 15 s.
async fn answer(service: &Service, request: &[u8]) -> Option<u16> {
    let mut socket = TcpStream::connect(service.addr).await.unwrap();
    // A service that closes early may reset the rest of a long request: that is an answer too.
    let _ = socket.write_all(request).await;
    let mut received = Vec::new();
    let mut buffer = [0; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let read = tokio::time::timeout_at(deadline, socket.read(&mut buffer))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no answer and no close for {:?}",
                    String::from_utf8_lossy(&request[..request.len().min(80)])
                )
            });
        match read {
            Ok(0) | Err(_) => break,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
        }
        if received.windows(2).any(|pair| pair == b"\r\n") {
            break;
        }
    }
    let line = String::from_utf8_lossy(&received);
    let status = line.split_whitespace().nth(1)?;
    Some(
        status
            .parse()
            .unwrap_or_else(|_| panic!("bad status line {line:?}")),
    )
}

fn assert_client_error(request: &[u8], status: Option<u16>) {
    let shown = String::from_utf8_lossy(&request[..request.len().min(80)]);
    match status {
        None => {}
        Some(status) => assert!(
            (400..500).contains(&status),
            "{shown:?} answered {status}, not a client error"
        ),
    }
}

#[tokio::test]
async fn malformed_requests_get_client_errors_and_harm_no_one() {
    count_panics();
    let service = Service::start_ready(test_config()).await;
    let mut bystander = service.subscribe("env").await;

    let huge_header = format!(
        "GET /sse/environments/env/stream HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    let many_headers = format!(
        "GET /sse/environments/env/stream HTTP/1.1\r\n{}\r\n",
        (0..200)
            .map(|n| format!("X-H{n}: v\r\n"))
            .collect::<String>()
    );
    let oversized_body = format!(
        "POST /sse/environments/env/queue-change HTTP/1.1\r\nHost: x\r\nAuthorization: Token {}\r\nContent-Length: 10000000\r\n\r\n{}",
        common::TOKEN,
        "x".repeat(64 * 1024)
    );
    let requests: Vec<Vec<u8>> = vec![
        b"FOO /sse/environments/env/stream HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /sse/environments/env/stream HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /sse/environments/\xff\xfe/stream HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /sse/environments/%ff%fe/stream HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET sse/environments/env/stream HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /sse/environments/env/stream HTTP/1.1\r\nBad Header Line\r\n\r\n".to_vec(),
        format!(
            "POST /sse/environments/env/queue-change HTTP/1.1\r\nHost: x\r\nAuthorization: Token {}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n",
            common::TOKEN
        )
        .into_bytes(),
        [
            format!(
                "POST /sse/environments/env/queue-change HTTP/1.1\r\nHost: x\r\nAuthorization: Token {}\r\nContent-Length: 4\r\n\r\n",
                common::TOKEN
            )
            .as_bytes(),
            b"\xff\xfe\xfd\xfc",
        ]
        .concat(),
        oversized_body.into_bytes(),
        huge_header.into_bytes(),
        many_headers.into_bytes(),
        vec![0; 300],
        b"\r\n\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nthis is not a frame at all".to_vec(),
    ];
    for request in &requests {
        let status = answer(&service, request).await;
        assert_client_error(request, status);
    }

    // Both framings at once: hyper lets Transfer-Encoding win, as RFC 9112 §6.3 says, and reads
    // an empty chunked body (the service's own stream path leaves requests with bodies to it).
    let both = b"GET /sse/environments/env/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let status = answer(&service, both).await;
    assert!(matches!(status, Some(200 | 400) | None), "{status:?}");

    assert_eq!(service.readyz().await, 200);
    assert_eq!(service.publish("env", &body_at(3.5)).await.0, 200);
    assert_eq!(bystander.next_event().await, event("3.5"));
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a task panicked");
}

/// What a client without exactly one `Host` gets: the body of the service's 400.
const HOST_REQUIRED: &str =
    r#"{"detail":"Bad Request: an HTTP/1.1 request needs exactly one Host header"}"#;

/// Sends `request` to `addr` and checks that it gets the 400 of RFC 9112 §3.2, as JSON, and
/// that the connection closes after it.
async fn assert_host_required(addr: std::net::SocketAddr, request: &str) {
    let mut client = SseClient::raw(addr, request.as_bytes()).await;
    assert_eq!(client.status, 400, "{request:?}");
    assert_eq!(
        client.header("content-type"),
        Some("application/json"),
        "{request:?}"
    );
    assert_eq!(client.header("connection"), Some("close"), "{request:?}");
    assert_eq!(
        client.header("access-control-allow-origin"),
        Some("*"),
        "{request:?}"
    );
    assert_eq!(
        text(&client.read_body().await),
        HOST_REQUIRED,
        "{request:?}"
    );
    assert!(
        client.is_closed().await,
        "{request:?} left the connection open"
    );
}

/// RFC 9112 §3.2: an HTTP/1.1 request without a `Host`, or with two, gets 400, on the stream
/// route the service reads itself and on the routes hyper reads, on both listeners. With one
/// `Host`, or over HTTP/1.0, the same requests are served.
#[tokio::test]
async fn http11_requests_without_exactly_one_host_get_400_and_are_closed() {
    count_panics();
    let service = Service::start_with_publish_listener(test_config()).await;
    service.wait_ready(true).await;
    let public = service.addr;
    let internal = service.publish_addr.unwrap();
    let publish = |hosts: &str| {
        format!(
            "POST /sse/environments/env/queue-change HTTP/1.1\r\n{hosts}Authorization: Token {}\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{{\"updated_at\": 2.5}}",
            common::TOKEN
        )
    };
    let stream = |hosts: &str| format!("GET /sse/environments/env/stream HTTP/1.1\r\n{hosts}\r\n");
    let livez = |hosts: &str| format!("GET /livez HTTP/1.1\r\n{hosts}\r\n");
    for hosts in ["", "Host: x\r\nHost: x\r\n", "Host: x\r\nhost: y\r\n"] {
        assert_host_required(public, &stream(hosts)).await;
        assert_host_required(public, &livez(hosts)).await;
        assert_host_required(internal, &livez(hosts)).await;
        assert_host_required(internal, &publish(hosts)).await;
    }
    // An absolute target names the host too, but RFC 9112 still asks for the header.
    assert_host_required(
        public,
        "GET http://x/sse/environments/env/stream HTTP/1.1\r\n\r\n",
    )
    .await;

    // With one Host, the same requests are served, and the update reaches the stream.
    let mut subscriber = SseClient::raw(public, stream("Host: x\r\n").as_bytes()).await;
    assert_eq!(subscriber.status, 200);
    assert_eq!(
        SseClient::raw(public, livez("Host: x\r\n").as_bytes())
            .await
            .status,
        200
    );
    let mut stored = SseClient::raw(internal, publish("Host: x\r\n").as_bytes()).await;
    let answer = text(&stored.read_body().await);
    assert_eq!(stored.status, 200, "{answer}");
    assert_eq!(subscriber.next_event().await, event("2.5"));
    // HTTP/1.0 may leave Host out.
    for request in [
        &b"GET /livez HTTP/1.0\r\n\r\n"[..],
        b"GET /sse/environments/env/stream HTTP/1.0\r\n\r\n",
    ] {
        let status = SseClient::raw(public, request).await.status;
        assert_eq!(status, 200, "{}", text(request));
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a task panicked");
}

#[tokio::test]
async fn slow_loris_heads_are_cut_off_after_ten_seconds() {
    count_panics();
    let service = Service::start_ready(test_config()).await;
    let started = Instant::now();
    // A stream request that never ends its head, and one that trickles a byte a second.
    let mut silent = TcpStream::connect(service.addr).await.unwrap();
    silent
        .write_all(b"GET /sse/environments/env/stream HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let trickle = tokio::spawn({
        let addr = service.addr;
        async move {
            let mut socket = TcpStream::connect(addr).await.unwrap();
            for byte in b"GET /sse/environments/env/stream HTTP/1.1\r\nX-Slow: "
                .iter()
                .cycle()
            {
                if socket.write_all(&[*byte]).await.is_err() {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            unreachable!("the cycle never ends")
        }
    });
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read_to_end(&mut rest))
        .await
        .expect("the service closes a silent connection");
    assert!(read.is_err() || rest.is_empty(), "answered {rest:?}");
    let silent_closed = started.elapsed();
    let trickle_closed = tokio::time::timeout(Duration::from_secs(20), trickle)
        .await
        .expect("the service closes a trickling connection")
        .unwrap()
        - started;
    for closed in [silent_closed, trickle_closed] {
        assert!(
            closed >= Duration::from_secs(9) && closed < Duration::from_secs(15),
            "closed after {closed:?}"
        );
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a task panicked");
}

/// What `queue-change` makes of generated bodies: 200, 400 or 413, never a server error.
#[test]
fn generated_publish_bodies_get_200_400_or_413() {
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;

    count_panics();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let service = runtime.block_on(Service::start_ready(test_config()));
    let client = reqwest::Client::new();
    let json_value = prop_oneof![
        any::<f64>().prop_map(|n| serde_json::json!(n)),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        "\\PC{0,40}".prop_map(|text| serde_json::json!(text)),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})?"
            .prop_map(|text| serde_json::json!(text)),
        Just(serde_json::json!(null)),
        Just(serde_json::json!({ "nested": [1, 2] })),
    ];
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..6000),
        json_value.prop_map(|value| serde_json::json!({ "updated_at": value })
            .to_string()
            .into_bytes()),
    ];
    let mut runner = TestRunner::new(fuzz_config(400, 7));
    let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    runner
        .run(&body, |body| {
            let status = runtime.block_on(async {
                client
                    .post(service.url("/sse/environments/env/queue-change"))
                    .header("authorization", format!("Token {}", common::TOKEN))
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            });
            seen.borrow_mut().insert(status);
            prop_assert!(
                matches!(status, 200 | 400 | 413),
                "{status} for {:?}",
                String::from_utf8_lossy(&body[..body.len().min(80)])
            );
            Ok(())
        })
        .unwrap();
    // The generated bodies reach every outcome, so each was checked.
    assert_eq!(
        seen.into_inner().into_iter().collect::<Vec<_>>(),
        [200, 400, 413]
    );
    runtime.block_on(async {
        assert_eq!(service.readyz().await, 200);
    });
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a task panicked");
}

/// The first flight of a real TLS client (rustls) for `localhost`: a ClientHello offering h2
/// and http/1.1.
fn client_hello() -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut client = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    hello
}

#[test]
fn broken_tls_handshakes_are_closed_and_harm_no_one() {
    use common::http::{Connection, TestCertificate, tls_connect};
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;

    count_panics();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certificate = TestCertificate::generate(dir.path(), "server");
    let config = flagsmith_sse::Config {
        tls: Some(certificate.files.clone()),
        // The subscriber below stays for the whole run, however many cases it has.
        max_stream_age: common::seconds(0.0),
        ..test_config()
    };
    // Publishes and metrics on a plaintext listener beside the TLS one.
    let service = runtime.block_on(Service::start_with_publish_listener(config));
    let publish_addr = service.publish_addr.unwrap();
    let connector = certificate.connector(&["h2", "http/1.1"]);
    let mut bystander = runtime.block_on(async {
        let stream = tls_connect(service.addr, &connector).await;
        Connection::tls(stream).await.subscribe("env").await
    });

    let hello = client_hello();
    let broken = prop_oneof![
        // Cut short anywhere.
        (0..hello.len()).prop_map({
            let hello = hello.clone();
            move |length| hello[..length].to_vec()
        }),
        // A few bytes changed: lengths, versions, extensions, whatever they land on.
        proptest::collection::vec((0..hello.len(), any::<u8>()), 1..8).prop_map({
            let hello = hello.clone();
            move |changes| {
                let mut bytes = hello.clone();
                for (at, byte) in changes {
                    bytes[at] = byte;
                }
                bytes
            }
        }),
        // A whole hello followed by garbage records.
        proptest::collection::vec(any::<u8>(), 1..600).prop_map({
            let hello = hello.clone();
            move |garbage| [hello.clone(), garbage].concat()
        }),
        // No TLS at all.
        proptest::collection::vec(any::<u8>(), 0..3000),
    ];
    let mut runner = TestRunner::new(fuzz_config(300, 8));
    let cases = std::cell::Cell::new(0_u32);
    runner
        .run(&broken, |bytes| {
            cases.set(cases.get() + 1);
            // Each is sent, then the client stops sending: the service must give up on the
            // handshake and close, not wait.
            let closed = runtime.block_on(async {
                let mut socket = TcpStream::connect(service.addr).await.unwrap();
                let _ = socket.write_all(&bytes).await;
                let _ = socket.shutdown().await;
                let mut received = Vec::new();
                tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut received))
                    .await
                    .is_ok()
            });
            prop_assert!(
                closed,
                "the service kept a broken handshake open: {bytes:02x?}"
            );
            Ok(())
        })
        .unwrap();

    runtime.block_on(async {
        // Every one of them failed its handshake, and was counted.
        common::scrape_until(publish_addr, "every broken handshake counted", |scrape| {
            scrape.value("flagsmith_sse_tls_handshake_errors_total") == f64::from(cases.get())
        })
        .await;
        // The subscriber connected throughout still gets its update, and a new client gets in.
        assert_eq!(
            common::publish(publish_addr, "env", &body_at(1.5), Some(common::TOKEN))
                .await
                .0,
            200
        );
        assert_eq!(bystander.next_event().await, event("1.5"));
        let stream = tls_connect(service.addr, &connector).await;
        let (status, _) = Connection::tls(stream).await.get("/livez").await;
        assert_eq!(status, 200);
    });
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a task panicked");
}
