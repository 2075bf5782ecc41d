//! What h2spec found the service's own HTTP/2 getting wrong, one test per RFC section, with
//! raw frames: so that `cargo test` alone catches a regression (tests/h2spec.rs runs the suite
//! itself). Each violation is answered with the GOAWAY or RST_STREAM the RFC names, at once,
//! and a stream error leaves the connection's other streams running.

mod common;

use std::time::Duration;

use common::frames::{
    COMPRESSION_ERROR, DATA, END_HEADERS, END_STREAM, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, Frame,
    GOAWAY, HEADERS, Next, PRIORITY, PROTOCOL_ERROR, REFUSED_STREAM, RST_STREAM, RawH2, SETTINGS,
    SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE, STREAM_CLOSED, WINDOW_UPDATE, error_code,
    frame, get, header, indexed_header, is_200, request, table_size_update,
};
use common::http::{TestCertificate, tls_connect};
use common::{Service, TOKEN, body_at, event, test_config};
use flagsmith_sse::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

fn stream_path(key: &str) -> String {
    format!("/sse/environments/{key}/stream")
}

/// Opens `stream` as a subscription to `key` and waits for its 200.
async fn subscribe(client: &mut RawH2, stream: u32, key: &str) {
    let opening = frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        stream,
        &get(&stream_path(key)),
    );
    client.send(&opening).await.unwrap();
    match client
        .until(WAIT, |frame| {
            frame.stream == stream && frame.kind == HEADERS
        })
        .await
    {
        Next::Frame(head) => assert!(is_200(&head.payload), "{head:?}"),
        other => panic!("no response head: {other:?}"),
    }
}

/// The next RST_STREAM of `stream` or GOAWAY.
async fn error_for(client: &mut RawH2, stream: u32) -> Frame {
    match client
        .until(WAIT, |frame| {
            frame.kind == GOAWAY || (frame.kind == RST_STREAM && frame.stream == stream)
        })
        .await
    {
        Next::Frame(frame) => frame,
        other => panic!("neither RST_STREAM nor GOAWAY: {other:?}"),
    }
}

async fn expect_reset(client: &mut RawH2, stream: u32, code: u32) {
    let answer = error_for(client, stream).await;
    assert_eq!(
        (answer.kind, error_code(&answer)),
        (RST_STREAM, code),
        "{answer:?}"
    );
}

async fn expect_goaway(client: &mut RawH2, code: u32) {
    let answer = match client.until(WAIT, |frame| frame.kind == GOAWAY).await {
        Next::Frame(frame) => frame,
        other => panic!("no GOAWAY: {other:?}"),
    };
    assert_eq!(error_code(&answer), code, "{answer:?}");
}

/// The next event of subscription `stream`, as the bytes of its DATA frames; keep-alive
/// comments are skipped.
async fn next_event(client: &mut RawH2, stream: u32) -> Vec<u8> {
    let mut data = Vec::new();
    while !data.ends_with(b"\n\n") || data.starts_with(b":") {
        if data.ends_with(b"\n\n") {
            data.clear();
        }
        match client
            .until(WAIT, |frame| frame.stream == stream && frame.kind == DATA)
            .await
        {
            Next::Frame(frame) => data.extend(frame.payload),
            other => panic!("no event on stream {stream}: {other:?}"),
        }
    }
    data
}

/// The still-open subscription `stream` gets an update published now.
async fn still_served(service: &Service, client: &mut RawH2, stream: u32, key: &str, at: f64) {
    assert_eq!(service.publish(key, &body_at(at)).await.0, 200);
    assert_eq!(next_event(client, stream).await, event(&at.to_string()));
}

/// A queue-change request's pseudo-header fields and token.
fn queue_change(key: &str) -> Vec<u8> {
    let path = format!("/sse/environments/{key}/queue-change");
    let mut block = request(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "localhost"),
        (":path", &path),
    ]);
    header(
        "authorization",
        format!("Token {TOKEN}").as_bytes(),
        &mut block,
    );
    block
}

/// RFC 7541 §6.3, h2spec `hpack/6.3/1`: a dynamic table size update beyond
/// SETTINGS_HEADER_TABLE_SIZE (4,096, the default the service keeps) is a decoding error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_6_3_a_table_larger_than_advertised_is_a_compression_error() {
    let service = Service::start_ready(test_config()).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    subscribe(&mut client, 1, "within").await;
    // Up to the advertised size is allowed.
    let mut block = Vec::new();
    table_size_update(4096, &mut block);
    block.extend(get("/livez"));
    client
        .send(&frame(HEADERS, END_STREAM | END_HEADERS, 3, &block))
        .await
        .unwrap();
    match client
        .until(WAIT, |frame| frame.stream == 3 && frame.kind == HEADERS)
        .await
    {
        Next::Frame(head) => assert!(is_200(&head.payload)),
        other => panic!("{other:?}"),
    }
    let mut block = Vec::new();
    table_size_update(1 << 27, &mut block);
    block.extend(get("/livez"));
    client
        .send(&frame(HEADERS, END_STREAM | END_HEADERS, 5, &block))
        .await
        .unwrap();
    expect_goaway(&mut client, COMPRESSION_ERROR).await;
    service.stop().await;
}

/// The hole h2spec's `hpack/6.3/1` pointed at: a client that raises its table and fills it
/// with fresh indexed fields would pin up to 256 MiB per connection. 5,000 requests each
/// adding a 3 KiB field would hold 15 MiB in one table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_grows_memory_through_the_hpack_table() {
    let service = Service::start_ready(test_config()).await;
    let before = common::rss_kib_of("self");
    let socket = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    let (mut reader, mut writer) = socket.into_split();
    // Reads everything, so that the service is never held up by unread answers.
    let drained = tokio::spawn(async move {
        let mut read = Vec::new();
        let mut chunk = vec![0; 64 * 1024];
        while let Ok(Ok(length)) =
            tokio::time::timeout(Duration::from_secs(2), reader.read(&mut chunk)).await
        {
            if length == 0 {
                break;
            }
            read.extend_from_slice(&chunk[..length]);
        }
        read
    });
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(frame(SETTINGS, 0, 0, &[]));
    writer.write_all(&opening).await.unwrap();
    let value = vec![b'v'; 3 * 1024];
    let mut sent = 0;
    for request in 0..5000_u32 {
        let mut block = Vec::new();
        if request == 0 {
            table_size_update(1 << 27, &mut block);
        }
        block.extend(get("/livez"));
        indexed_header(&format!("x-fresh-{request}"), &value, &mut block);
        let stream = 2 * request + 1;
        let bytes = frame(HEADERS, END_STREAM | END_HEADERS, stream, &block);
        if writer.write_all(&bytes).await.is_err() {
            break;
        }
        sent += 1;
    }
    let grown = common::rss_kib_of("self").saturating_sub(before);
    let read = drained.await.unwrap();
    assert!(grown < 8 * 1024, "grew by {grown} KiB over {sent} requests");
    // The first block's update was refused: GOAWAY COMPRESSION_ERROR, no response.
    let mut at = 0;
    let mut codes = Vec::new();
    while at + 9 <= read.len() {
        let length = u32::from_be_bytes([0, read[at], read[at + 1], read[at + 2]]) as usize;
        if read[at + 3] == GOAWAY {
            codes.push(u32::from_be_bytes(
                read[at + 13..at + 17].try_into().unwrap(),
            ));
        }
        assert_ne!(read[at + 3], HEADERS, "a request was answered");
        at += 9 + length;
    }
    assert_eq!(codes, [COMPRESSION_ERROR]);
    service.stop().await;
}

/// RFC 9113 §8.1.1, §8.2 and §8.3, h2spec `http2/8.1.2*`: a malformed request is a stream
/// error PROTOCOL_ERROR and never reaches a route; the connection's other streams go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_malformed_requests_are_reset_and_never_routed() {
    let service = Service::start_ready(test_config()).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    subscribe(&mut client, 1, "bystander").await;
    let publish = |extra: &[(&str, &[u8])]| {
        let mut block = queue_change("victim");
        for (name, value) in extra {
            header(name, value, &mut block);
        }
        block
    };
    let mut pseudo_after_regular = publish(&[]);
    header(":scheme", b"http", &mut pseudo_after_regular);
    let mut duplicated = request(&[(":method", "POST")]);
    duplicated.extend(queue_change("victim"));
    let no_scheme = {
        let mut block = request(&[
            (":method", "POST"),
            (":authority", "localhost"),
            (":path", "/sse/environments/victim/queue-change"),
        ]);
        header(
            "authorization",
            format!("Token {TOKEN}").as_bytes(),
            &mut block,
        );
        block
    };
    let empty_path = request(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "localhost"),
        (":path", ""),
    ]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "an upper-case name",
            publish(&[("Content-Type", b"application/json")]),
        ),
        ("a pseudo-header after a regular one", pseudo_after_regular),
        ("a duplicated :method", duplicated),
        ("no :scheme", no_scheme),
        ("an empty :path", empty_path),
        ("connection", publish(&[("connection", b"keep-alive")])),
        ("te other than trailers", publish(&[("te", b"gzip")])),
    ];
    let body = body_at(9.5);
    let mut stream = 3;
    for (case, block) in cases {
        let mut bytes = frame(HEADERS, END_HEADERS, stream, &block);
        bytes.extend(frame(DATA, END_STREAM, stream, body.as_bytes()));
        client.send(&bytes).await.unwrap();
        let answer = error_for(&mut client, stream).await;
        assert_eq!(
            (answer.kind, error_code(&answer)),
            (RST_STREAM, PROTOCOL_ERROR),
            "{case}: {answer:?}"
        );
        stream += 2;
    }
    // A content-length that the body does not match (§8.1.1).
    let mut bytes = frame(
        HEADERS,
        END_HEADERS,
        stream,
        &publish(&[("content-length", b"100")]),
    );
    bytes.extend(frame(DATA, END_STREAM, stream, body.as_bytes()));
    client.send(&bytes).await.unwrap();
    expect_reset(&mut client, stream, PROTOCOL_ERROR).await;
    // None of them published: the first event a new subscriber gets is the later update.
    assert_eq!(service.publish("victim", &body_at(2.5)).await.0, 200);
    let mut subscriber = service.subscribe("victim").await;
    assert_eq!(subscriber.next_event().await, event("2.5"));
    still_served(&service, &mut client, 1, "bystander", 3.5).await;
    service.stop().await;
}

/// RFC 9113 §5.1, h2spec `http2/5.1`: what each state allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_frames_are_checked_against_their_streams_state() {
    let service = Service::start_ready(test_config()).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    subscribe(&mut client, 1, "bystander").await;
    // Half-closed (remote): the request is whole, so DATA and HEADERS are STREAM_CLOSED.
    subscribe(&mut client, 3, "env").await;
    client.send(&frame(DATA, 0, 3, b"more")).await.unwrap();
    expect_reset(&mut client, 3, STREAM_CLOSED).await;
    subscribe(&mut client, 5, "env").await;
    let trailers = frame(HEADERS, END_STREAM | END_HEADERS, 5, &get("/livez"));
    client.send(&trailers).await.unwrap();
    expect_reset(&mut client, 5, STREAM_CLOSED).await;
    // Closed by the client's RST_STREAM: DATA after it is STREAM_CLOSED.
    let open = frame(HEADERS, END_HEADERS, 7, &queue_change("env"));
    let mut bytes = open.clone();
    bytes.extend(frame(RST_STREAM, 0, 7, &8_u32.to_be_bytes()));
    bytes.extend(frame(DATA, END_STREAM, 7, b"{}"));
    client.send(&bytes).await.unwrap();
    expect_reset(&mut client, 7, STREAM_CLOSED).await;
    still_served(&service, &mut client, 1, "bystander", 1.5).await;
    // Closed after both ends: HEADERS again is a connection error STREAM_CLOSED.
    let livez = frame(HEADERS, END_STREAM | END_HEADERS, 9, &get("/livez"));
    client.send(&livez).await.unwrap();
    match client
        .until(WAIT, |frame| {
            frame.stream == 9 && frame.kind == DATA && frame.flags & END_STREAM != 0
        })
        .await
    {
        Next::Frame(_) => {}
        other => panic!("/livez did not end: {other:?}"),
    }
    client.send(&livez).await.unwrap();
    expect_goaway(&mut client, STREAM_CLOSED).await;

    // Idle streams take HEADERS and PRIORITY only.
    for idle in [
        frame(RST_STREAM, 0, 1, &8_u32.to_be_bytes()),
        frame(WINDOW_UPDATE, 0, 1, &100_u32.to_be_bytes()),
        frame(DATA, END_STREAM, 1, b"x"),
    ] {
        let mut client = RawH2::connect(service.addr, &[]).await;
        client.send(&idle).await.unwrap();
        expect_goaway(&mut client, PROTOCOL_ERROR).await;
    }
    // Even streams are the server's, and it opens none: idle, whatever the client opened.
    // (Found by the h2_connection fuzz target: a stream error there got RST_STREAM.)
    let mut client = RawH2::connect(service.addr, &[]).await;
    subscribe(&mut client, 5, "env").await;
    client
        .send(&frame(WINDOW_UPDATE, 0, 2, &0_u32.to_be_bytes()))
        .await
        .unwrap();
    expect_goaway(&mut client, PROTOCOL_ERROR).await;
    // A stream identifier that goes back (§5.1.1).
    let mut client = RawH2::connect(service.addr, &[]).await;
    subscribe(&mut client, 5, "env").await;
    let back = frame(HEADERS, END_STREAM | END_HEADERS, 3, &get("/livez"));
    client.send(&back).await.unwrap();
    expect_goaway(&mut client, PROTOCOL_ERROR).await;
    service.stop().await;
}

/// RFC 9113 §5.3.1 and §6.3, h2spec `http2/5.3.1` and `http2/6.3`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_3_priority_frames_are_checked() {
    let service = Service::start_ready(test_config()).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    subscribe(&mut client, 1, "bystander").await;
    subscribe(&mut client, 3, "env").await;
    client
        .send(&frame(PRIORITY, 0, 3, &[0, 0, 0, 1]))
        .await
        .unwrap();
    expect_reset(&mut client, 3, FRAME_SIZE_ERROR).await;
    // What follows on a stream the service reset is ignored, errors included (§5.4.2).
    client
        .send(&frame(PRIORITY, 0, 3, &[0, 0, 0, 1]))
        .await
        .unwrap();
    let again = client
        .until(Duration::from_millis(500), |frame| {
            frame.kind == GOAWAY || (frame.kind == RST_STREAM && frame.stream == 3)
        })
        .await;
    assert_eq!(again, Next::Silent);
    subscribe(&mut client, 5, "env").await;
    client
        .send(&frame(PRIORITY, 0, 5, &[0, 0, 0, 5, 16]))
        .await
        .unwrap();
    expect_reset(&mut client, 5, PROTOCOL_ERROR).await;
    // Accepted on any stream, idle and closed ones included.
    let mut bytes = frame(PRIORITY, 0, 99, &[0, 0, 0, 1, 16]);
    bytes.extend(frame(PRIORITY, 0, 3, &[0, 0, 0, 1, 16]));
    client.send(&bytes).await.unwrap();
    still_served(&service, &mut client, 1, "bystander", 1.5).await;
    // A HEADERS frame that depends on itself (PRIORITY flag 0x20).
    let mut fields = vec![0, 0, 0, 7, 16];
    fields.extend(get(&stream_path("env")));
    let headers = frame(HEADERS, END_STREAM | END_HEADERS | 0x20, 7, &fields);
    client.send(&headers).await.unwrap();
    expect_reset(&mut client, 7, PROTOCOL_ERROR).await;
    client
        .send(&frame(PRIORITY, 0, 0, &[0, 0, 0, 1, 16]))
        .await
        .unwrap();
    expect_goaway(&mut client, PROTOCOL_ERROR).await;
    service.stop().await;
}

/// The DATA stream 1 sends within half a second.
async fn window_data(client: &mut RawH2) -> Vec<u8> {
    let mut data = Vec::new();
    while let Next::Frame(frame) = client
        .until(Duration::from_millis(500), |frame| {
            frame.stream == 1 && frame.kind == DATA
        })
        .await
    {
        data.extend(frame.payload);
    }
    data
}

/// RFC 9113 §6.5.2 and §6.9.2, h2spec `http2/6.5.2` and `http2/6.9.2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_5_settings_are_checked_and_window_changes_honoured() {
    let service = Service::start_ready(test_config()).await;
    assert_eq!(service.publish("env", &body_at(1.5)).await.0, 200);
    let expected = event("1.5");
    let mut client = RawH2::connect(service.addr, &[(SETTINGS_ENABLE_PUSH, 2)]).await;
    expect_goaway(&mut client, PROTOCOL_ERROR).await;

    // A window of 0, then of 3 once the stream is open: 3 bytes. Then 0 again, which makes
    // the stream's window -3: a WINDOW_UPDATE of 4 lets one more byte out.
    let mut client = RawH2::connect(service.addr, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)]).await;
    subscribe(&mut client, 1, "env").await;
    assert_eq!(window_data(&mut client).await, b"");
    let settings = |window: u32| {
        let mut payload = SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
        payload.extend(window.to_be_bytes());
        frame(SETTINGS, 0, 0, &payload)
    };
    client.send(&settings(3)).await.unwrap();
    assert_eq!(window_data(&mut client).await, expected[..3]);
    client.send(&settings(0)).await.unwrap();
    client
        .send(&frame(WINDOW_UPDATE, 0, 1, &4_u32.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(window_data(&mut client).await, expected[3..4]);
    service.stop().await;
}

/// RFC 9113 §6.9 and §6.9.1, h2spec `http2/6.9.1/3`: a window past 2^31-1 is an error of
/// what it belongs to: one stream's resets that stream alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_9_a_window_overflow_is_an_error_of_what_overflowed() {
    let service = Service::start_ready(test_config()).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    subscribe(&mut client, 1, "bystander").await;
    subscribe(&mut client, 3, "env").await;
    let increment = frame(WINDOW_UPDATE, 0, 3, &0x7fff_ffff_u32.to_be_bytes());
    client.send(&increment).await.unwrap();
    expect_reset(&mut client, 3, FLOW_CONTROL_ERROR).await;
    still_served(&service, &mut client, 1, "bystander", 1.5).await;
    let increment = frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffff_u32.to_be_bytes());
    client.send(&increment).await.unwrap();
    expect_goaway(&mut client, FLOW_CONTROL_ERROR).await;
    service.stop().await;
}

/// RFC 9113 §6.9.2: a stream's window starts with the stream, so credit the client gives
/// with its request counts even though the response has not started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_9_2_a_window_update_before_the_response_is_kept() {
    let service = Service::start_ready(test_config()).await;
    let mut client = RawH2::connect(service.addr, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)]).await;
    let mut bytes = frame(HEADERS, END_STREAM | END_HEADERS, 1, &get("/livez"));
    bytes.extend(frame(WINDOW_UPDATE, 0, 1, &1000_u32.to_be_bytes()));
    client.send(&bytes).await.unwrap();
    match client
        .until(WAIT, |frame| {
            frame.stream == 1 && frame.kind == DATA && frame.flags & END_STREAM != 0
        })
        .await
    {
        Next::Frame(_) => {}
        other => panic!("the response never came: {other:?}"),
    }
    service.stop().await;
}

/// RFC 9113 §8.1, h2spec `generic/2/4`: a request with trailers is served, and the other
/// streams of the connection (a browser's tabs share it) are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_1_a_request_with_trailers_is_served() {
    let service = Service::start_ready(test_config()).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    subscribe(&mut client, 1, "env").await;
    let mut bytes = frame(HEADERS, END_HEADERS, 3, &queue_change("env"));
    bytes.extend(frame(DATA, 0, 3, body_at(2.5).as_bytes()));
    bytes.extend(frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        3,
        &request(&[("x-checksum", "1")]),
    ));
    client.send(&bytes).await.unwrap();
    match client
        .until(WAIT, |frame| {
            frame.stream == 3 && frame.kind != WINDOW_UPDATE
        })
        .await
    {
        Next::Frame(head) => assert!(head.kind == HEADERS && is_200(&head.payload), "{head:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(next_event(&mut client, 1).await, event("2.5"));
    service.stop().await;
}

/// RFC 9113 §3.4 and h2spec `http2/3.5/2`: a connection that starts with neither an HTTP/1.1
/// request nor HTTP/2's preface is closed, with nothing an HTTP/2 client would misread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_3_4_an_invalid_preface_closes_the_connection() {
    let service = Service::start_ready(test_config()).await;
    let mut socket = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    socket
        .write_all(b"INVALID CONNECTION PREFACE\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, socket.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "still open");
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    // A preface that breaks off after its request line is HTTP/2's: GOAWAY.
    let mut socket = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    socket
        .write_all(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, socket.read_to_end(&mut answer)).await;
    assert_eq!(answer.get(3), Some(&GOAWAY), "{answer:?}");
    assert_eq!(&answer[13..17], &PROTOCOL_ERROR.to_be_bytes());
    service.stop().await;
}

/// RFC 7301: what ALPN chose is the protocol. After `h2`, an HTTP/1.1 request is a broken
/// preface; after `http/1.1`, HTTP/2's preface is not served as HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc7301_alpns_choice_is_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let certificate = TestCertificate::generate(dir.path(), "server");
    let config = Config {
        tls: Some(certificate.files.clone()),
        ..test_config()
    };
    let service = Service::start(config).await;
    let livez = b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n";

    let mut tls = tls_connect(service.addr, &certificate.connector(&["h2"])).await;
    tls.write_all(livez).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(answer.get(3), Some(&GOAWAY), "{answer:?}");
    assert_eq!(&answer[13..17], &PROTOCOL_ERROR.to_be_bytes());

    let mut tls = tls_connect(service.addr, &certificate.connector(&["http/1.1"])).await;
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(frame(SETTINGS, 0, 0, &[]));
    tls.write_all(&opening).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
    // hyper's HTTP/1.1 closes a request line of version HTTP/2.0 without an answer; before,
    // the service's HTTP/2 answered it with SETTINGS.
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));

    let mut tls = tls_connect(service.addr, &certificate.connector(&["http/1.1"])).await;
    tls.write_all(livez).await.unwrap();
    let mut head = [0; 15];
    tls.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK");
    service.stop().await;
}

/// A publish's header block, with no END_STREAM: its body is to come.
fn publish_opening(stream: u32) -> Vec<u8> {
    frame(HEADERS, END_HEADERS, stream, &queue_change("bodies"))
}

/// RFC 9113 §6.9.1: what a connection's unfinished request bodies hold is bounded by its
/// receive window, which the service gives back only as bodies are passed on; a client that
/// sends beyond it gets FLOW_CONTROL_ERROR. And a connection has at most 64 requests other
/// than subscriptions in progress: header lists cost memory however few bytes HPACK sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_9_1_request_bodies_are_bounded_by_the_connections_window() {
    let service = Service::start_ready(test_config()).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    // `{"updated_at": 1.5}` padded with JSON's whitespace to 4 KiB.
    let body = format!("{:<4096}", body_at(1.5));
    // 15 bodies of 4 KiB, all but the last byte of 16 KiB more: 65,535 bytes, the window.
    let mut bytes = Vec::new();
    for stream in (1..=31).step_by(2) {
        bytes.extend(publish_opening(stream));
        let length = if stream == 31 { 4095 } else { 4096 };
        bytes.extend(frame(DATA, 0, stream, &body.as_bytes()[..length]));
    }
    client.send(&bytes).await.unwrap();
    // Nothing given back while the bodies wait: no WINDOW_UPDATE for the connection.
    let given = client
        .until(Duration::from_millis(500), |frame| {
            frame.kind == WINDOW_UPDATE || frame.kind == GOAWAY || frame.kind == RST_STREAM
        })
        .await;
    assert_eq!(given, Next::Silent);
    // A finished body is passed on and its 4 KiB given back.
    client.send(&frame(DATA, END_STREAM, 1, &[])).await.unwrap();
    match client
        .until(WAIT, |frame| frame.kind == WINDOW_UPDATE)
        .await
    {
        Next::Frame(update) => {
            assert_eq!(
                (update.stream, &update.payload[..]),
                (0, &4096_u32.to_be_bytes()[..])
            );
        }
        other => panic!("{other:?}"),
    }
    match client
        .until(WAIT, |frame| frame.stream == 1 && frame.kind == HEADERS)
        .await
    {
        Next::Frame(head) => assert!(is_200(&head.payload), "{head:?}"),
        other => panic!("{other:?}"),
    }
    // 4 KiB and one byte more than the window now allows.
    client
        .send(&frame(DATA, 0, 3, &[b' '; 4097]))
        .await
        .unwrap();
    expect_goaway(&mut client, FLOW_CONTROL_ERROR).await;

    let mut client = RawH2::connect(service.addr, &[]).await;
    let mut bytes = Vec::new();
    for stream in (1..=129).step_by(2) {
        bytes.extend(publish_opening(stream));
    }
    client.send(&bytes).await.unwrap();
    expect_reset(&mut client, 129, REFUSED_STREAM).await;
    // Subscriptions are not requests of that kind.
    subscribe(&mut client, 131, "bystander").await;
    service.stop().await;
}
