//! Independent clients against the service, as users run them: curl over HTTP/2 with TLS, h2c
//! and HTTP/1.1 over TLS; nghttp2's `nghttp` and `h2load`; Python's httpx over HTTP/2; and
//! Chromium, headless, with an `EventSource` page, which reports the protocol it used through
//! Resource Timing. `.ci/run` installs them (Debian's curl, nghttp2-client and chromium;
//! httpx from tests/python/requirements.txt).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::http::{Connection, TestCertificate, tls_connect};
use common::{OPENING, Service, binary_on_path, body_at, event, test_config};
use flagsmith_sse::Config;

const DEBIAN: &str = "install it from Debian, as .ci/run does";

/// The service with TLS on a certificate for `localhost` (its in-process backend is ready at
/// once), and the certificate.
async fn tls_service(dir: &Path) -> (Service, TestCertificate) {
    let certificate = TestCertificate::generate(dir, "server");
    let config = Config {
        tls: Some(certificate.files.clone()),
        ..test_config()
    };
    (Service::start(config).await, certificate)
}

/// Publishes over HTTP/2 with TLS; the status.
async fn publish(service: &Service, certificate: &TestCertificate, key: &str, at: f64) -> u16 {
    let tls = tls_connect(service.addr, &certificate.connector(&["h2"])).await;
    Connection::tls(tls)
        .await
        .publish(key, &body_at(at))
        .await
        .0
}

fn certificate_file(certificate: &TestCertificate) -> PathBuf {
    certificate.files.certificate_file.clone()
}

/// Runs `program` with `args`, for at most 30 s.
async fn run(program: &Path, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} ran for 30 s", program.display()))
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// curl reading a stream until `--max-time`, 2 s.
fn curl_stream(curl: &Path, args: &[&str], url: &str) -> tokio::task::JoinHandle<Output> {
    let mut command: Vec<String> = ["-sN", "--max-time", "2"].map(str::to_owned).to_vec();
    command.extend(args.iter().map(|arg| (*arg).to_owned()));
    command.push(url.to_owned());
    let curl = curl.to_owned();
    tokio::spawn(async move {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        run(&curl, &args).await
    })
}

/// What the stream read, once `--max-time` ended it (curl's exit code 28).
async fn streamed(reading: tokio::task::JoinHandle<Output>) -> String {
    let output = reading.await.unwrap();
    assert_eq!(output.status.code(), Some(28), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Long enough for a client started now to have its stream open.
async fn connected() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_with_tls_over_h2c_and_over_http1_with_tls() {
    let curl = binary_on_path("curl", DEBIAN);
    let dir = tempfile::tempdir().unwrap();
    let (service, certificate) = tls_service(dir.path()).await;
    let ca = certificate_file(&certificate);
    let ca = ca.to_str().unwrap();
    let base = format!("https://localhost:{}", service.addr.port());

    let readyz = format!("{base}/readyz");
    let version = [
        "-s",
        "--http2",
        "--cacert",
        ca,
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
    ];
    let version = stdout(&run(&curl, &[&version[..], &[readyz.as_str()]].concat()).await);
    assert_eq!(version, "2");
    for (protocol, key, at) in [("--http2", "curl-h2", 1.5), ("--http1.1", "curl-h1", 2.5)] {
        let stream = format!("{base}/sse/environments/{key}/stream");
        let reading = curl_stream(&curl, &[protocol, "--cacert", ca], &stream);
        connected().await;
        assert_eq!(publish(&service, &certificate, key, at).await, 200);
        let received = streamed(reading).await;
        // Nothing was known when curl connected: the opening comment, within curl's 2 s
        // (the first keep-alive would come after 15), then the event.
        let expected = [OPENING, &event(&at.to_string())].concat();
        assert_eq!(received.as_bytes(), expected, "{protocol}");
    }

    let plain = Service::start_ready(test_config()).await;
    let stream = plain.url("/sse/environments/curl/stream");
    let reading = curl_stream(&curl, &["--http2-prior-knowledge"], &stream);
    connected().await;
    assert_eq!(plain.publish("curl", &body_at(3.5)).await.0, 200);
    let expected = [OPENING, &event("3.5")].concat();
    assert_eq!(streamed(reading).await.as_bytes(), expected);
    plain.stop().await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nghttp_reads_a_stream_and_h2load_gets_every_answer() {
    let nghttp = binary_on_path("nghttp", DEBIAN);
    let h2load = binary_on_path("h2load", DEBIAN);
    let dir = tempfile::tempdir().unwrap();
    let (service, certificate) = tls_service(dir.path()).await;
    assert_eq!(publish(&service, &certificate, "nghttp", 1.5).await, 200);
    let base = format!("https://localhost:{}", service.addr.port());

    // nghttp reads until its --timeout; the known update arrives first.
    let output = run(
        &nghttp,
        &[
            "--timeout=1",
            &format!("{base}/sse/environments/nghttp/stream"),
        ],
    )
    .await;
    let received = String::from_utf8_lossy(&output.stdout);
    assert!(
        received.starts_with(std::str::from_utf8(&event("1.5")).unwrap()),
        "{received:?} {}",
        String::from_utf8_lossy(&output.stderr)
    );

    for protocol in [&[][..], &["--h1"][..]] {
        let mut args = vec!["-n", "2000", "-c", "20", "-m", "10"];
        args.extend(protocol);
        let url = format!("{base}/readyz");
        args.push(&url);
        let report = stdout(&run(&h2load, &args).await);
        assert!(
            report.contains("2000 succeeded, 0 failed, 0 errored, 0 timeout"),
            "{protocol:?}: {report}"
        );
        assert!(report.contains("2000 2xx"), "{report}");
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_httpx_reads_a_stream_over_http2() {
    let python = binary_on_path("python3", "install Python 3");
    let dir = tempfile::tempdir().unwrap();
    let (service, certificate) = tls_service(dir.path()).await;
    assert_eq!(publish(&service, &certificate, "httpx", 1.5).await, 200);
    let script = r#"
import sys
try:
    import httpx
except ImportError:
    sys.exit("httpx is missing: pip install -r tests/python/requirements.txt, as .ci/run does")
url, ca = sys.argv[1], sys.argv[2]
with httpx.Client(http2=True, verify=ca, timeout=10) as client:
    with client.stream("GET", url) as response:
        lines = []
        for line in response.iter_lines():
            lines.append(line)
            if line == "" and len(lines) > 1:
                break
        print(response.http_version)
        print("\n".join(lines))
"#;
    let url = format!(
        "https://localhost:{}/sse/environments/httpx/stream",
        service.addr.port()
    );
    let output = stdout(
        &run(
            &python,
            &[
                "-c",
                script,
                &url,
                certificate_file(&certificate).to_str().unwrap(),
            ],
        )
        .await,
    );
    assert_eq!(
        output,
        "HTTP/2\nevent: environment_updated\ndata: {\"updated_at\": 1.5}\nretry: 15000\n\n"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_receives_an_event_over_http2_with_tls() {
    let chromium = binary_on_path("chromium", DEBIAN);
    let dir = tempfile::tempdir().unwrap();
    let (service, certificate) = tls_service(dir.path()).await;
    assert_eq!(publish(&service, &certificate, "browser", 1.5).await, 200);
    let url = format!(
        "https://localhost:{}/sse/environments/browser/stream",
        service.addr.port()
    );
    // The page reports the event and the protocol Resource Timing saw for the stream, which a
    // page of another origin sees only because of Timing-Allow-Origin.
    let page = dir.path().join("page.html");
    std::fs::write(
        &page,
        format!(
            r#"<!doctype html><title>stream</title><body>waiting<script>
const url = "{url}";
const source = new EventSource(url);
source.addEventListener("environment_updated", (event) => {{
  source.close();
  const report = (tries) => {{
    const entry = performance.getEntriesByType("resource").find((e) => e.name === url);
    if (!entry && tries > 0) return setTimeout(() => report(tries - 1), 100);
    document.body.textContent = JSON.stringify({{data: event.data, protocol: entry && entry.nextHopProtocol}});
  }};
  report(20);
}});
source.onerror = () => {{ document.body.textContent = "error"; }};
</script>"#
        ),
    )
    .unwrap();
    let profile = dir.path().join("profile");
    let output = run(
        &chromium,
        &[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            // The test's certificate is its own.
            "--ignore-certificate-errors",
            &format!("--user-data-dir={}", profile.display()),
            "--virtual-time-budget=10000",
            "--dump-dom",
            &format!("file://{}", page.display()),
        ],
    )
    .await;
    let dom = stdout(&output);
    assert!(
        dom.contains(r#"<body>{"data":"{\"updated_at\": 1.5}","protocol":"h2"}</body>"#),
        "{dom}"
    );
    service.stop().await;
}
