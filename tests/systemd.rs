//! The real binary under a fake systemd: what it tells `NOTIFY_SOCKET`, and how it reloads,
//! drains and exits on signals.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::http::{Connection, TestCertificate, connector, negotiated, tls_connect};
use common::{Chunk, NatsServer, OPENING, SseClient, body_at, event, publish};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixDatagram;

/// Collects what the service sends to `NOTIFY_SOCKET`, reading continuously as systemd does.
struct FakeSystemd {
    received: Arc<Mutex<Vec<String>>>,
}

impl FakeSystemd {
    fn bind(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0; 4096];
            while let Ok(length) = socket.recv(&mut buffer).await {
                let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
                sink.lock().unwrap().push(message);
            }
        });
        Self { received }
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    /// Waits up to `wait` for a message containing the line `line`.
    async fn expect(&self, line: &str, wait: Duration) {
        self.expect_count(line, 1, wait).await;
    }

    /// Waits up to `wait` until `count` messages contained the line `line`.
    async fn expect_count(&self, line: &str, count: usize, wait: Duration) {
        let deadline = Instant::now() + wait;
        while self.count(line) < count {
            assert!(
                Instant::now() < deadline,
                "no {count} x {line:?} within {wait:?}; got {:?}",
                self.received()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn count(&self, line: &str) -> usize {
        self.received()
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .count()
    }

    fn any_starts_with(&self, prefix: &str) -> bool {
        self.received()
            .iter()
            .any(|m| m.lines().any(|l| l.starts_with(prefix)))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_only_with_nats_then_reload_and_drain_on_signals() {
    let dir = tempfile::tempdir().unwrap();
    let systemd = FakeSystemd::bind(&dir.path().join("notify"));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "first-token\n").unwrap();

    // NATS is down when the service starts.
    let mut nats = NatsServer::start();
    nats.stop();
    let mut daemon = Daemon::spawn(&[
        (
            "NOTIFY_SOCKET",
            dir.path().join("notify").display().to_string(),
        ),
        ("WATCHDOG_USEC", "200000".to_owned()),
        ("NATS_URL", nats.url()),
        (
            "FLAGSMITH_SSE_AUTHENTICATION_TOKEN_FILE",
            token_file.display().to_string(),
        ),
        ("FLAGSMITH_SSE_SHUTDOWN__DRAIN_PERIOD", "1".to_owned()),
        ("FLAGSMITH_SSE_SHUTDOWN__TIMEOUT", "3".to_owned()),
    ]);
    let addr = daemon.listen_addr();

    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        systemd.count("READY=1"),
        0,
        "ready without NATS: {:?}",
        systemd.received()
    );
    assert!(
        systemd.any_starts_with("STATUS=waiting"),
        "{:?}",
        systemd.received()
    );
    assert!(
        systemd.count("WATCHDOG=1") >= 2,
        "watchdog pings at half of 200 ms"
    );

    nats.restart();
    systemd.expect("READY=1", Duration::from_secs(15)).await;

    let mut stream = SseClient::connect(addr, "/sse/environments/env/stream", &[]).await;
    assert_eq!(
        publish(addr, "env", &body_at(1.5), Some("first-token"))
            .await
            .0,
        200
    );
    assert_eq!(stream.next_event().await, event("1.5"));

    // Token rotation: the file changes, SIGHUP, and only the new token works.
    std::fs::write(&token_file, "second-token\n").unwrap();
    daemon.signal("HUP");
    systemd.expect("RELOADING=1", Duration::from_secs(5)).await;
    assert!(systemd.any_starts_with("MONOTONIC_USEC="));
    let deadline = Instant::now() + Duration::from_secs(5);
    while publish(addr, "env", &body_at(2.5), Some("second-token"))
        .await
        .0
        != 200
    {
        assert!(Instant::now() < deadline, "new token never accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    systemd
        .expect_count("READY=1", 2, Duration::from_secs(5))
        .await;
    assert_eq!(
        publish(addr, "env", &body_at(3.5), Some("first-token"))
            .await
            .0,
        401
    );
    assert_eq!(stream.next_event().await, event("2.5"));

    // A client stuck halfway through its request headers must not hold the exit.
    let mut stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
    stuck
        .write_all(b"GET /sse/environments/env/stream HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();

    daemon.signal("TERM");
    systemd.expect("STOPPING=1", Duration::from_secs(5)).await;
    // The stream ends cleanly within the drain period so the SDK reconnects elsewhere.
    assert_eq!(stream.next_data().await, b"retry: 1000\n\n");
    assert!(matches!(
        stream.next_chunk_within(Duration::from_secs(3)).await,
        Some(Chunk::End)
    ));
    let (code, took) = daemon.wait_exit(Duration::from_secs(6));
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_millis(4500),
        "exit took {took:?}, timeout is 3 s"
    );
    let log: Vec<String> = daemon
        .logs
        .try_iter()
        .map(|line| line.to_string())
        .collect();
    assert!(
        log.iter().any(|line| line.contains("\"stopped\"")),
        "{log:?}"
    );
    for line in &log {
        assert!(
            !line.contains("first-token") && !line.contains("second-token"),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_flight_publish_is_answered_during_shutdown() {
    let nats = NatsServer::start();
    let mut daemon = Daemon::spawn(&[
        ("NATS_URL", nats.url()),
        ("SSE_AUTHENTICATION_TOKEN", "t".to_owned()),
        ("FLAGSMITH_SSE_SHUTDOWN__DRAIN_PERIOD", "0".to_owned()),
    ]);
    let addr = daemon.listen_addr();
    common::wait_readiness(addr, true).await;
    // A stalled NATS holds the publish until the service's publish timeout.
    nats.signal("STOP");
    let in_flight =
        tokio::spawn(async move { publish(addr, "env", &body_at(1.5), Some("t")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.signal("TERM");
    let (status, body) = in_flight.await.unwrap();
    nats.signal("CONT");
    assert_eq!(status, 503, "{body}");
}

#[test]
fn the_open_files_soft_limit_is_raised_to_the_hard_limit() {
    let hard = Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .unwrap();
    let hard: u64 = common::text(&hard.stdout).trim().parse().unwrap();
    assert!(
        hard > 256,
        "the hard limit here is {hard}: nothing to raise"
    );
    let mut child = Command::new("sh")
        .args([
            "-c",
            "ulimit -Sn 256 && exec \"$0\"",
            env!("CARGO_BIN_EXE_flagsmith-sse"),
        ])
        .env("SSE_AUTHENTICATION_TOKEN", "t")
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("FLAGSMITH_SSE_LOG__FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let line = std::io::BufRead::lines(stderr)
        .find_map(|line| line.ok().filter(|line| line.contains("open files limit")))
        .expect("open files log line");
    let _ = child.kill();
    let _ = child.wait();
    let logged: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(logged["soft"].as_u64(), Some(hard), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_spreads_stream_ends_over_the_drain_period() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t").unwrap();
    let mut daemon = Daemon::spawn(&[
        (
            "FLAGSMITH_SSE_AUTHENTICATION_TOKEN_FILE",
            token_file.display().to_string(),
        ),
        ("FLAGSMITH_SSE_SHUTDOWN__DRAIN_PERIOD", "2".to_owned()),
        ("FLAGSMITH_SSE_SHUTDOWN__TIMEOUT", "5".to_owned()),
        ("FLAGSMITH_SSE_MAX_STREAM_AGE", "0".to_owned()),
    ]);
    let addr = daemon.listen_addr();
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut stream = SseClient::connect(addr, "/sse/environments/env/stream", &[]).await;
        assert_eq!(stream.next_data().await, OPENING);
        streams.push(stream);
    }
    let started = Instant::now();
    daemon.signal("TERM");
    // Each stream is read by its own task, so an end is timed when it arrives.
    let ends = streams.into_iter().map(|mut stream| async move {
        assert_eq!(stream.next_data().await, b"retry: 1000\n\n");
        assert!(matches!(
            stream.next_chunk_within(Duration::from_secs(3)).await,
            Some(Chunk::End)
        ));
        started.elapsed()
    });
    let mut ended_after = futures_util::future::join_all(ends).await;
    ended_after.sort();
    let first = ended_after[0];
    let last = ended_after[ended_after.len() - 1];
    assert!(
        last < Duration::from_millis(2500),
        "last stream ended after {last:?}"
    );
    assert!(
        last - first > Duration::from_millis(500),
        "ends not spread: {ended_after:?}"
    );
    let (code, _) = daemon.wait_exit(Duration::from_secs(6));
    assert_eq!(code, Some(0));
}

#[test]
fn a_bad_configuration_stops_start_up_with_exit_code_2() {
    let mut daemon = Daemon::spawn(&[("FLAGSMITH_SSE_MAX_STREAM_AGE", "soon".to_owned())]);
    let (code, _) = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(2));
    let message = daemon.logs.recv_timeout(Duration::from_secs(5)).unwrap();
    let message = message["msg"].as_str().unwrap().to_owned();
    assert!(
        message.to_lowercase().contains("max_stream_age"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_tls_certificate_and_open_streams_carry_on() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let first = TestCertificate::generate(dir.path(), "first");
    let files = first.files.clone();
    std::fs::set_permissions(&files.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut daemon = Daemon::spawn(&[
        ("SSE_AUTHENTICATION_TOKEN", common::TOKEN.to_owned()),
        (
            "FLAGSMITH_SSE_TLS__CERTIFICATE_FILE",
            files.certificate_file.display().to_string(),
        ),
        (
            "FLAGSMITH_SSE_TLS__KEY_FILE",
            files.key_file.display().to_string(),
        ),
    ]);
    let warning = daemon.wait_log("the tls key file is readable by other users");
    assert_eq!(warning["level"], "WARN", "{warning}");
    let loaded = daemon.wait_log("loaded the tls certificate");
    assert_eq!(loaded["sha256"], first.fingerprint().as_str());
    let addr = daemon.listen_addr();

    let second = TestCertificate::generate(dir.path(), "second");
    let trusting_both = connector(&[&first, &second], &["h2"]);
    let open = tls_connect(addr, &trusting_both).await;
    assert_eq!(negotiated(&open).1, first.fingerprint());
    let mut open = Connection::tls(open).await;
    let mut stream = open.subscribe("env").await;

    // Replaced the way ACME clients do it, by renaming new files over the old ones.
    std::fs::rename(&second.files.certificate_file, &files.certificate_file).unwrap();
    std::fs::rename(&second.files.key_file, &files.key_file).unwrap();
    daemon.signal("HUP");
    let reloaded = daemon.wait_log("reloaded the tls certificate");
    assert_eq!(reloaded["sha256"], second.fingerprint().as_str());

    // The same client: its session ticket from before the reload does not resume.
    let fresh = tls_connect(addr, &trusting_both).await;
    assert_eq!(negotiated(&fresh).1, second.fingerprint());
    assert_eq!(
        fresh.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    let mut fresh = Connection::tls(fresh).await;
    assert_eq!(fresh.publish("env", &body_at(1.5)).await.0, 200);
    assert_eq!(stream.next_event().await, event("1.5"));

    // A broken pair is refused with the reason, and the current one stays in service.
    std::fs::write(&files.key_file, "-----BEGIN PRIVATE KEY-----\nbroken\n").unwrap();
    daemon.signal("HUP");
    let refused = daemon.wait_log("tls reload failed, keeping the current certificate");
    let reason = refused["error"].as_str().unwrap();
    assert!(
        reason.contains(&files.key_file.display().to_string()),
        "{refused}"
    );
    assert_eq!(refused["sha256"], second.fingerprint().as_str());
    let after = tls_connect(addr, &trusting_both).await;
    assert_eq!(negotiated(&after).1, second.fingerprint());
    assert_eq!(
        Connection::tls(after)
            .await
            .publish("env", &body_at(2.5))
            .await
            .0,
        200
    );
    assert_eq!(stream.next_event().await, event("2.5"));
}

#[test]
fn a_missing_or_mismatched_certificate_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestCertificate::generate(dir.path(), "first");
    let second = TestCertificate::generate(dir.path(), "second");
    let missing = dir.path().join("missing.crt");
    for (certificate, key, expected) in [
        (
            &missing,
            &first.files.key_file,
            "cannot read the TLS certificate file",
        ),
        (
            &first.files.certificate_file,
            &second.files.key_file,
            "does not belong to the certificate",
        ),
    ] {
        let mut daemon = Daemon::spawn(&[
            ("SSE_AUTHENTICATION_TOKEN", "t".to_owned()),
            (
                "FLAGSMITH_SSE_TLS__CERTIFICATE_FILE",
                certificate.display().to_string(),
            ),
            ("FLAGSMITH_SSE_TLS__KEY_FILE", key.display().to_string()),
        ]);
        let (code, _) = daemon.wait_exit(Duration::from_secs(10));
        assert_eq!(code, Some(1));
        let fatal = daemon.wait_log("fatal");
        let error = fatal["error"].as_str().unwrap();
        assert!(error.contains(expected), "{fatal}");
        assert!(
            error.contains(&certificate.display().to_string()),
            "{fatal}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_show_backend_states_refused_publishes_and_stream_ends() {
    let mut nats = NatsServer::start();
    let mut daemon = Daemon::spawn(&[
        ("NATS_URL", nats.url()),
        ("SSE_AUTHENTICATION_TOKEN", "the-token".to_owned()),
        ("FLAGSMITH_SSE_LOG__LEVEL", "debug".to_owned()),
        ("FLAGSMITH_SSE_SHUTDOWN__DRAIN_PERIOD", "0".to_owned()),
    ]);
    let addr = daemon.listen_addr();
    for state in ["connected", "ready"] {
        let line = daemon.wait_log("backend state");
        assert_eq!(
            (&line["state"], &line["level"]),
            (&state.into(), &"INFO".into())
        );
        assert_eq!(line["backend"], "nats");
    }

    // A subscriber that leaves: one debug line with its duration and why it ended.
    let subscriber = SseClient::connect(addr, "/sse/environments/env/stream", &[]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(subscriber);
    let ended = daemon.wait_log("stream ended");
    assert_eq!(ended["level"], "DEBG");
    assert_eq!(
        (&ended["env"], &ended["reason"]),
        (&"env".into(), &"client_gone".into())
    );
    let duration = ended["duration_s"].as_f64().unwrap();
    assert!((0.2..5.0).contains(&duration), "{ended}");

    // A refused publish: one warning with the caller's request id, never the token.
    let refused = reqwest::Client::new()
        .post(format!("http://{addr}/sse/environments/env/queue-change"))
        .header("authorization", "Token a-wrong-token")
        .header("x-request-id", "req-7")
        .body(body_at(1.0))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let failed = daemon.wait_log("publish failed");
    assert_eq!(failed["level"], "WARN");
    assert_eq!(
        (&failed["request_id"], &failed["status"]),
        (&"req-7".into(), &401.into())
    );
    assert!(!failed.to_string().contains("a-wrong-token"), "{failed}");

    // NATS goes away: one state change, one warning however often the client retries, and
    // publishes refused with the backend's reason.
    nats.stop();
    let disconnected = daemon.wait_log("backend state");
    assert_eq!(disconnected["state"], "disconnected");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        publish(addr, "env", &body_at(2.0), Some("the-token"))
            .await
            .0,
        503
    );
    let unavailable = daemon.wait_log("publish failed");
    assert_eq!(unavailable["status"], 503);
    assert!(
        unavailable["cause"].as_str().unwrap().contains("NATS"),
        "{unavailable}"
    );
    assert_eq!(unavailable["request_id"].as_str().unwrap().len(), 16);
    let count =
        |logs: &[serde_json::Value], msg: &str| logs.iter().filter(|l| l["msg"] == msg).count();
    let logs = daemon.all_logs();
    assert_eq!(count(logs, "nats error, retrying"), 1, "{logs:#?}");
    assert!(
        count(logs, "nats error") >= 1,
        "the retries are still logged at debug"
    );

    nats.restart();
    let back = daemon.wait_log("backend state");
    assert_eq!(back["state"], "connected");

    // Streams ended by the shutdown say so.
    let mut open = SseClient::connect(addr, "/sse/environments/env/stream", &[]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    daemon.signal("TERM");
    while let Some(Chunk::Data(_)) = open.next_chunk_within(Duration::from_secs(5)).await {}
    let shutdown = daemon.wait_log("stream ended");
    assert_eq!(shutdown["reason"], "shutdown", "{shutdown}");
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).0, Some(0));
}
