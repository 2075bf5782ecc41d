//! The transport of SPEC §4: HTTP/1.1 and h2c on a plaintext port, TLS with ALPN, many
//! streams on one HTTP/2 connection, the publish listener, HTTP/2 settings and keep-alive, and
//! hostile handshakes.

mod common;

use std::future::poll_fn;
use std::time::Duration;

use common::http::{
    Connection, Protocol, TestCertificate, connector_for_versions, negotiated, tls_connect,
};
use common::{Service, body_at, event, seconds, test_config};
use flagsmith_sse::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The test configuration, with streams ended at once on shutdown: these tests end with
/// streams open.
fn config() -> Config {
    let mut config = test_config();
    config.shutdown.drain_period = seconds(0.0);
    config
}

/// The service with TLS on its public listener, the certificate it serves, and the directory
/// holding the certificate's files.
async fn tls_service() -> (Service, TestCertificate, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let certificate = TestCertificate::generate(dir.path(), "server");
    let config = Config {
        tls: Some(certificate.files.clone()),
        ..config()
    };
    (Service::start(config).await, certificate, dir)
}

#[tokio::test]
async fn a_plaintext_port_serves_http1_and_h2c() {
    let service = Service::start(config()).await;
    let mut http1 = service.subscribe("env").await;
    assert_eq!(http1.status, 200);
    let mut h2c = Connection::plain(service.addr, Protocol::Http2).await;
    let mut h2c_stream = h2c.subscribe("env").await;

    // Publishing works over both too.
    assert_eq!(h2c.publish("env", &body_at(1.5)).await.0, 200);
    assert_eq!(http1.next_event().await, event("1.5"));
    assert_eq!(h2c_stream.next_event().await, event("1.5"));
    let mut plain_http1 = Connection::plain(service.addr, Protocol::Http1).await;
    assert_eq!(plain_http1.publish("env", &body_at(2.5)).await.0, 200);
    assert_eq!(http1.next_event().await, event("2.5"));
    assert_eq!(h2c_stream.next_event().await, event("2.5"));
    service.stop().await;
}

#[tokio::test]
async fn tls_serves_http2_or_http1_as_the_client_asks() {
    let (service, certificate, _dir) = tls_service().await;

    let cases: [(&[&str], Option<&str>, Protocol); 4] = [
        (&["h2"], Some("h2"), Protocol::Http2),
        (&["http/1.1"], Some("http/1.1"), Protocol::Http1),
        (&["h2", "http/1.1"], Some("h2"), Protocol::Http2),
        // A client without ALPN gets HTTP/1.1.
        (&[], None, Protocol::Http1),
    ];
    let mut streams = Vec::new();
    for (offered, chosen, protocol) in cases {
        let tls = tls_connect(service.addr, &certificate.connector(offered)).await;
        let (alpn, fingerprint) = negotiated(&tls);
        assert_eq!(alpn.as_deref(), chosen, "offered {offered:?}");
        assert_eq!(fingerprint, certificate.fingerprint());
        let mut connection = Connection::tls(tls).await;
        assert_eq!(connection.protocol(), protocol);
        streams.push(connection.subscribe("env").await);
    }

    let tls = tls_connect(service.addr, &certificate.connector(&["h2"])).await;
    let mut publisher = Connection::tls(tls).await;
    assert_eq!(publisher.publish("env", &body_at(1.5)).await.0, 200);
    for stream in &mut streams {
        assert_eq!(stream.next_event().await, event("1.5"));
    }
    service.stop().await;
}

#[tokio::test]
async fn tls_1_2_is_accepted_as_well_as_1_3() {
    let (service, certificate, _dir) = tls_service().await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let connector = connector_for_versions(&[&certificate], &[], &[version]);
        let tls = tls_connect(service.addr, &connector).await;
        assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
        let (status, _) = Connection::tls(tls).await.get("/livez").await;
        assert_eq!(status, 200);
    }
    service.stop().await;
}

#[tokio::test]
async fn reconnecting_clients_resume_their_tls_session() {
    use rustls::HandshakeKind;
    let (service, certificate, _dir) = tls_service().await;
    let connector = certificate.connector(&["h2"]);
    let first = tls_connect(service.addr, &connector).await;
    assert_eq!(
        first.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    // A round trip makes the client read the session ticket sent after the handshake.
    assert_eq!(Connection::tls(first).await.get("/livez").await.0, 200);
    let second = tls_connect(service.addr, &connector).await;
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );
    assert_eq!(Connection::tls(second).await.get("/livez").await.0, 200);
    service.stop().await;
}

#[tokio::test]
async fn hundreds_of_streams_on_one_http2_connection_all_get_the_update() {
    const STREAMS: usize = 500;
    let (service, certificate, _dir) = tls_service().await;
    let tls = tls_connect(service.addr, &certificate.connector(&["h2"])).await;
    let mut connection = Connection::tls(tls).await;
    assert_eq!(connection.protocol(), Protocol::Http2);
    let mut streams = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        streams.push(connection.subscribe("env").await);
    }
    // The publish travels on the same connection, beside the open streams.
    assert_eq!(connection.publish("env", &body_at(1.5)).await.0, 200);
    let events = futures_util::future::join_all(
        streams
            .iter_mut()
            .map(|stream| async move { stream.next_event().await }),
    )
    .await;
    assert_eq!(events.len(), STREAMS);
    assert!(events.iter().all(|received| *received == event("1.5")));
    service.stop().await;
}

#[tokio::test]
async fn the_publish_listener_takes_queue_change_off_the_public_one() {
    let dir = tempfile::tempdir().unwrap();
    let certificate = TestCertificate::generate(dir.path(), "internal");
    // Public in plaintext, publishing over TLS on its own listener.
    let config = Config {
        publish_tls: Some(certificate.files.clone()),
        ..config()
    };
    let service = Service::start_with_publish_listener(config).await;
    let publish_addr = service.publish_addr.unwrap();
    let mut subscriber = service.subscribe("env").await;

    let (status, body) = service.publish("env", &body_at(1.5)).await;
    assert_eq!((status, body.as_str()), (404, r#"{"detail":"Not found."}"#));

    let tls = tls_connect(publish_addr, &certificate.connector(&["h2", "http/1.1"])).await;
    let mut internal = Connection::tls(tls).await;
    assert_eq!(internal.publish("env", &body_at(2.5)).await.0, 200);
    assert_eq!(subscriber.next_event().await, event("2.5"));

    // Streams are not served on the publish listener; health is served on both; metrics
    // stay on the internal one.
    let (status, _) = internal.get("/sse/environments/env/stream").await;
    assert_eq!(status, 404);
    assert_eq!(internal.get("/readyz").await.0, 200);
    assert_eq!(service.readyz().await, 200);
    let (status, metrics) = internal.get("/metricsz").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("flagsmith_sse_subscribers 1\n"),
        "{metrics}"
    );
    let public = reqwest::get(service.url("/metricsz")).await.unwrap();
    assert_eq!(public.status(), 404);
    service.stop().await;
}

#[tokio::test]
async fn http2_settings_announce_the_stream_limit_and_small_windows() {
    let config = Config {
        http2: flagsmith_sse::config::Http2Config {
            max_concurrent_streams: 7,
            ..Default::default()
        },
        ..config()
    };
    let service = Service::start(config).await;
    let tcp = TcpStream::connect(service.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    // After one round trip the server's SETTINGS are in force.
    let request = http::Request::get(format!("http://{}/livez", service.addr))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    assert_eq!(client.current_max_send_streams(), 7);

    // A client may send 16 KiB on a stream before the service reads it: a publish body fits,
    // a flood does not park megabytes per stream.
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!(
        "http://{}/sse/environments/env/queue-change",
        service.addr
    ))
    .body(())
    .unwrap();
    let (_, mut body) = client.send_request(request, false).unwrap();
    body.reserve_capacity(1 << 20);
    let granted = poll_fn(|cx| body.poll_capacity(cx)).await.unwrap().unwrap();
    assert_eq!(granted, 16 * 1024);
    service.stop().await;
}

/// The type of each frame an HTTP/2 server sends until it closes the connection.
async fn frames_until_closed(stream: &mut TcpStream) -> Vec<(u8, u8)> {
    let mut frames = Vec::new();
    let mut header = [0; 9];
    loop {
        if stream.read_exact(&mut header).await.is_err() {
            return frames;
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; length];
        if stream.read_exact(&mut payload).await.is_err() {
            return frames;
        }
        frames.push((header[3], header[4]));
    }
}

#[tokio::test]
async fn http2_keep_alive_closes_dead_peers_and_keeps_live_ones() {
    const PING: u8 = 6;
    const GOAWAY: u8 = 7;
    let config = Config {
        http2: flagsmith_sse::config::Http2Config {
            keepalive_interval: seconds(0.3),
            keepalive_timeout: seconds(0.3),
            ..Default::default()
        },
        ..config()
    };
    let service = Service::start(config).await;
    let mut live = Connection::plain(service.addr, Protocol::Http2).await;
    let mut live_stream = live.subscribe("env").await;

    // A peer that opens HTTP/2 and then never answers: no PING reply, no SETTINGS ack.
    let mut dead = TcpStream::connect(service.addr).await.unwrap();
    dead.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let frames = tokio::time::timeout(Duration::from_secs(10), frames_until_closed(&mut dead))
        .await
        .expect("the service closes a dead peer's connection");
    assert!(
        frames.contains(&(PING, 0)),
        "closed without a PING: {frames:?}"
    );
    assert!(frames.iter().any(|(kind, _)| *kind == GOAWAY), "{frames:?}");

    // The live connection answered every PING meanwhile and still works.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(live.publish("env", &body_at(1.5)).await.0, 200);
    assert_eq!(live_stream.next_event().await, event("1.5"));
    service.stop().await;
}

#[tokio::test]
async fn broken_handshakes_and_reset_connections_leave_other_clients_alone() {
    let (service, certificate, _dir) = tls_service().await;
    let connector = certificate.connector(&["h2"]);
    let mut before = Connection::tls(tls_connect(service.addr, &connector).await).await;
    let mut before_stream = before.subscribe("env").await;

    // Clients that stop halfway through a ClientHello: a record header promising 512 bytes,
    // and then nothing.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut socket = TcpStream::connect(service.addr).await.unwrap();
        socket
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
            .await
            .unwrap();
        stalled.push(socket);
    }
    // Garbage instead of a handshake is refused and closed.
    for garbage in [
        &b"GET /sse/environments/env/stream HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xff; 300][..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
    ] {
        let mut socket = TcpStream::connect(service.addr).await.unwrap();
        socket.write_all(garbage).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
            .await
            .expect("the service closes the connection");
        // A TLS alert at most, never an HTTP answer.
        assert!(
            read.is_err() || answer.is_empty() || answer[0] == 0x15,
            "{answer:?}"
        );
    }

    // A client reset in the middle of its stream, after the headers.
    let mut reset = tls_connect(service.addr, &certificate.connector(&["http/1.1"])).await;
    reset
        .write_all(b"GET /sse/environments/env/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0; 12];
    reset.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    reset.get_ref().0.set_zero_linger().unwrap();
    drop(reset);

    let mut after = Connection::tls(tls_connect(service.addr, &connector).await).await;
    let mut after_stream = after.subscribe("env").await;
    assert_eq!(after.publish("env", &body_at(1.5)).await.0, 200);
    assert_eq!(before_stream.next_event().await, event("1.5"));
    assert_eq!(after_stream.next_event().await, event("1.5"));
    drop(stalled);
    service.stop().await;
}

#[test]
fn unusable_certificate_files_are_refused_with_the_file_and_the_reason() {
    use flagsmith_sse::config::TlsConfig;
    use flagsmith_sse::tls::Certificate;
    let dir = tempfile::tempdir().unwrap();
    let a = TestCertificate::generate(dir.path(), "a").files;
    let b = TestCertificate::generate(dir.path(), "b").files;
    let garbage = dir.path().join("garbage.crt");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let cases = [
        (
            dir.path().join("missing.crt"),
            a.key_file.clone(),
            &["cannot read the TLS certificate file", "missing.crt"][..],
        ),
        (
            a.certificate_file.clone(),
            b.key_file.clone(),
            &["does not belong to the certificate", "b.key", "a.crt"][..],
        ),
        (
            a.key_file.clone(),
            a.certificate_file.clone(),
            &["holds no PEM certificate", "a.key"][..],
        ),
        (
            a.certificate_file.clone(),
            a.certificate_file.clone(),
            &["TLS key file", "a.crt"][..],
        ),
        (
            garbage,
            a.key_file.clone(),
            &["is not valid PEM", "garbage.crt"][..],
        ),
    ];
    for (certificate_file, key_file, expected) in cases {
        let files = TlsConfig {
            certificate_file,
            key_file,
        };
        let message = Certificate::load(&files).unwrap_err().to_string();
        for part in expected {
            assert!(message.contains(part), "{part:?} not in {message:?}");
        }
    }
    assert!(Certificate::load(&a).is_ok());
}
