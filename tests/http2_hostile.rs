//! HTTP/2 abuse with raw frames: header blocks beyond the limit, CONTINUATION and rapid-reset
//! floods, SETTINGS and PING floods from a client that never reads, a client's flow-control
//! window, and shutdown. Each attack ends with the attacker refused or cut off while a
//! subscriber on another connection still gets its update, and the service's memory stays
//! bounded.

mod common;

use std::time::{Duration, Instant};

use common::frames::{
    CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, Next, PING, RST_STREAM, RawH2,
    SETTINGS, SETTINGS_INITIAL_WINDOW_SIZE, WINDOW_UPDATE, frame, get, header, is_200,
};
use common::{OPENING, Service, body_at, event, seconds, test_config};

const WAIT: Duration = Duration::from_secs(10);

/// This process's resident memory: the service runs in it.
fn rss_kib() -> u64 {
    common::rss_kib_of("self")
}

/// A subscriber of `key` on a connection of its own gets an update published now.
async fn others_are_served(service: &Service, key: &str) {
    let mut subscriber = service.subscribe(key).await;
    let (status, _) = service.publish(key, &body_at(1.5)).await;
    assert_eq!(status, 200);
    let received = tokio::time::timeout(WAIT, subscriber.next_event()).await;
    assert_eq!(received.expect("the update within 10 s"), event("1.5"));
}

/// Opens `stream` as a subscription to `key`.
async fn subscribe(client: &mut RawH2, stream: u32, key: &str) {
    let request = get(&format!("/sse/environments/{key}/stream"));
    let opening = frame(HEADERS, END_STREAM | END_HEADERS, stream, &request);
    client.send(&opening).await.unwrap();
}

/// Whether the service refused or ended `stream`: any response but a 200, a reset of the
/// stream, a GOAWAY, or a closed connection.
async fn refused(client: &mut RawH2, stream: u32) -> bool {
    match client
        .until(WAIT, |frame| {
            frame.kind == GOAWAY
                || (frame.stream == stream && matches!(frame.kind, HEADERS | RST_STREAM))
        })
        .await
    {
        Next::Frame(frame) => frame.kind != HEADERS || !is_200(&frame.payload),
        Next::Closed => true,
        Next::Silent => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_beyond_the_limit_is_refused() {
    let service = Service::start_ready(test_config()).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    let mut block = get("/sse/environments/env/stream");
    header("x-padding", &vec![b'a'; 256 * 1024], &mut block);
    // HEADERS, then CONTINUATION frames of 16 KiB, the largest frame a client may send.
    let mut chunks = block.chunks(16 * 1024);
    let mut bytes = frame(HEADERS, END_STREAM, 1, chunks.next().unwrap());
    let mut chunks = chunks.peekable();
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        bytes.extend(frame(CONTINUATION, flags, 1, chunk));
    }
    // The service may stop reading, or close, before all of it is sent.
    let _ = client.send(&bytes).await;
    assert!(
        refused(&mut client, 1).await,
        "a 256 KiB header block was served"
    );
    others_are_served(&service, "bystander").await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off() {
    let service = Service::start_ready(test_config()).await;
    let before = rss_kib();
    let mut client = RawH2::connect(service.addr, &[]).await;
    client
        .send(&frame(HEADERS, 0, 1, &get("/sse/environments/env/stream")))
        .await
        .unwrap();
    // CONTINUATION frames that never end the block, each a valid literal header, until the
    // service stops reading or closes: at most 64 MiB.
    let mut junk = Vec::new();
    while junk.len() < 16 * 1024 - 64 {
        header("x-flood", b"0123456789abcdef0123456789abcdef", &mut junk);
    }
    let continuation = frame(CONTINUATION, 0, 1, &junk);
    let started = Instant::now();
    let mut sent = 0;
    while sent < 64 << 20 && started.elapsed() < WAIT {
        match tokio::time::timeout(Duration::from_secs(1), client.send(&continuation)).await {
            Ok(Ok(())) => sent += continuation.len(),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    assert!(
        sent < 64 << 20,
        "the service read 64 MiB of one header block"
    );
    assert!(
        refused(&mut client, 1).await,
        "the flooding stream was served"
    );
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 32 * 1024, "the service grew by {grown} KiB");
    others_are_served(&service, "bystander").await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_met_with_goaway_and_leaves_no_stream_open() {
    let service = Service::start_ready(test_config()).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    // Streams opened and cancelled at once (CVE-2023-44487), 20,000 of them.
    let request = get("/sse/environments/env/stream");
    let mut burst = Vec::new();
    let mut stream = 1;
    let mut cut_off = false;
    for _ in 0..100 {
        burst.clear();
        for _ in 0..200 {
            burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &request));
            burst.extend(frame(RST_STREAM, 0, stream, &8_u32.to_be_bytes()));
            stream += 2;
        }
        if client.send(&burst).await.is_err() {
            cut_off = true;
            break;
        }
    }
    let ended = client.until(WAIT, |frame| frame.kind == GOAWAY).await;
    assert!(
        cut_off || matches!(ended, Next::Frame(_) | Next::Closed),
        "no GOAWAY after {} reset streams: {ended:?}",
        stream / 2
    );
    // Every cancelled stream was let go.
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = reqwest::get(service.url("/metricsz")).await.unwrap();
        let text = metrics.text().await.unwrap();
        if text.contains("\nflagsmith_sse_subscribers 0\n") {
            break;
        }
        assert!(Instant::now() < deadline, "streams still open:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    others_are_served(&service, "bystander").await;
    service.stop().await;
}

/// SETTINGS and PING each need an answer; a client that sends them without end and never
/// reads must not make the service queue answers without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_ping_floods_from_a_client_that_never_reads_stay_bounded() {
    let service = Service::start_ready(test_config()).await;
    let before = rss_kib();
    for flood in [frame(SETTINGS, 0, 0, &[]), frame(PING, 0, 0, &[7; 8])] {
        let mut client = RawH2::connect(service.addr, &[]).await;
        let burst = flood.repeat(4096);
        let started = Instant::now();
        let mut sent = 0_usize;
        while started.elapsed() < Duration::from_secs(3) {
            match tokio::time::timeout(Duration::from_millis(500), client.send(&burst)).await {
                Ok(Ok(())) => sent += burst.len(),
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let grown = rss_kib().saturating_sub(before);
        assert!(
            grown < 32 * 1024,
            "the service grew by {grown} KiB after {sent} bytes of {:?} frames",
            flood[3]
        );
        others_are_served(&service, &format!("bystander-{}", flood[3])).await;
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_sends_no_more_than_the_client_window_allows() {
    let service = Service::start_ready(test_config()).await;
    assert_eq!(service.publish("env", &body_at(1.5)).await.0, 200);
    let expected = event("1.5");
    let mut client = RawH2::connect(service.addr, &[(SETTINGS_INITIAL_WINDOW_SIZE, 10)]).await;
    subscribe(&mut client, 1, "env").await;
    let mut received = Vec::new();
    loop {
        match client
            .until(Duration::from_secs(1), |frame| frame.stream == 1)
            .await
        {
            Next::Frame(frame) if frame.kind == HEADERS => assert!(is_200(&frame.payload)),
            Next::Frame(frame) if frame.kind == DATA => received.extend(frame.payload),
            Next::Silent => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, expected[..10], "only the window's 10 bytes");
    client
        .send(&frame(WINDOW_UPDATE, 0, 1, &1000_u32.to_be_bytes()))
        .await
        .unwrap();
    while received.len() < expected.len() {
        match client.until(WAIT, |frame| frame.stream == 1).await {
            Next::Frame(frame) if frame.kind == DATA => received.extend(frame.payload),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, expected);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_goaway_and_ends_open_streams_cleanly() {
    let mut config = test_config();
    config.shutdown.drain_period = seconds(0.2);
    let service = Service::start_ready(config).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    subscribe(&mut client, 1, "env").await;
    assert!(matches!(
        client.until(WAIT, |frame| frame.stream == 1 && frame.kind == HEADERS).await,
        Next::Frame(frame) if is_200(&frame.payload)
    ));
    // Nothing is known of `env`: the stream opens with a keep-alive comment.
    match client.until(WAIT, |frame| frame.stream == 1).await {
        Next::Frame(frame) if frame.kind == DATA => assert_eq!(frame.payload, OPENING),
        other => panic!("no opening comment: {other:?}"),
    }
    let stopping = tokio::spawn(service.stop());
    let goaway = client.until(WAIT, |frame| frame.kind == GOAWAY).await;
    assert!(matches!(goaway, Next::Frame(_)), "{goaway:?}");
    let mut body = Vec::new();
    loop {
        match client.until(WAIT, |frame| frame.stream == 1).await {
            Next::Frame(frame) if frame.kind == DATA => {
                body.extend(&frame.payload);
                if frame.flags & END_STREAM != 0 {
                    break;
                }
            }
            other => panic!("the stream did not end cleanly: {other:?}"),
        }
    }
    assert_eq!(String::from_utf8_lossy(&body), "retry: 1000\n\n");
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_answering_pings_is_closed_and_others_carry_on() {
    let mut config = test_config();
    config.http2.keepalive_interval = seconds(0.3);
    config.http2.keepalive_timeout = seconds(0.3);
    let service = Service::start_ready(config).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    subscribe(&mut client, 1, "env").await;
    // This client reads but never answers a PING.
    let mut pinged = false;
    let ended = loop {
        match client
            .until(WAIT, |frame| matches!(frame.kind, PING | GOAWAY))
            .await
        {
            Next::Frame(frame) if frame.kind == PING => pinged = true,
            other => break other,
        }
    };
    assert!(pinged, "closed without a PING");
    assert!(matches!(ended, Next::Frame(_)), "no GOAWAY: {ended:?}");
    assert_eq!(client.next(WAIT).await, Next::Closed);
    others_are_served(&service, "bystander").await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_body_larger_than_the_window_gets_413() {
    let service = Service::start_ready(test_config()).await;
    let mut client = RawH2::connect(service.addr, &[]).await;
    let mut block = Vec::new();
    header(":method", b"POST", &mut block);
    header(":scheme", b"http", &mut block);
    header(":authority", b"localhost", &mut block);
    header(":path", b"/sse/environments/env/queue-change", &mut block);
    header(
        "authorization",
        format!("Token {}", common::TOKEN).as_bytes(),
        &mut block,
    );
    let mut bytes = frame(HEADERS, END_HEADERS, 1, &block);
    // 16 KiB, the stream's whole window, and no END_STREAM: the rest could never be sent.
    for _ in 0..4 {
        bytes.extend(frame(DATA, 0, 1, &[b' '; 4096]));
    }
    client.send(&bytes).await.unwrap();
    let answer = client
        .until(WAIT, |frame| {
            frame.stream == 1 && matches!(frame.kind, HEADERS | RST_STREAM)
        })
        .await;
    let Next::Frame(answer) = answer else {
        panic!("no answer: {answer:?}")
    };
    assert_eq!(answer.kind, HEADERS);
    // `:status: 413`, never indexed, with the static name (index 8).
    assert_eq!(&answer.payload[..5], b"\x18\x03413", "{:?}", answer.payload);
    others_are_served(&service, "bystander").await;
    service.stop().await;
}
