//! h2spec, the HTTP/2 conformance suite hyper's h2, nginx and h2o are held to (146 cases, each
//! a MUST of RFC 9113 or RFC 7541), against the service: on the stream listener, served by the
//! service's own HTTP/2, every case must pass, on h2c and over TLS (ALPN h2), on `/livez`
//! (forwarded to the routes) and on a stream path; on the publish listener, served by hyper,
//! only hyper's own failures are allowed. The suite is not on any registry: a static build is
//! kept in `../shared/tools/h2spec/`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::http::TestCertificate;
use common::{Service, TOKEN, body_at, publish, seconds, test_config};
use flagsmith_sse::Config;

/// Cases hyper fails on the publish listener, some of them only in some runs: it answers
/// `/livez` at once and sends END_STREAM before the frames the case sends after its request
/// arrive, or it answers a broken preface as HTTP/1.1.
const HYPER_FAILS: &[&str] = &[
    "http2/3.5 Sends invalid connection preface",
    "http2/6.9.1 Sends multiple WINDOW_UPDATE frames increasing the flow control window to above 2^31-1 on a stream",
    "http2/8.1 Sends a second HEADERS frame without the END_STREAM flag",
    "http2/8.1.2.1 Sends a HEADERS frame that contains a pseudo-header field as trailers",
    "http2/8.1.2.6 Sends a HEADERS frame with the \"content-length\" header field which does not equal the DATA frame payload length",
    "http2/8.1.2.6 Sends a HEADERS frame with the \"content-length\" header field which does not equal the sum of the multiple DATA frames payload length",
];

const CASES: usize = 146;

fn h2spec() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/h2spec/h2spec");
    assert!(
        path.exists(),
        "{} is missing: the suite is kept beside the project in shared/tools/h2spec",
        path.display()
    );
    path
}

/// What one run of h2spec found: every case, and the failed ones as `package case`.
#[derive(Debug)]
struct Report {
    cases: usize,
    failed: Vec<String>,
    output: String,
}

/// Runs every case against `addr` with requests for `path`.
async fn run(addr: SocketAddr, tls: bool, path: &str, dir: &Path) -> Report {
    let report = dir.join(format!(
        "{}-{}.xml",
        if tls { "tls" } else { "h2c" },
        addr.port()
    ));
    let mut command = tokio::process::Command::new(h2spec());
    command
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "-P",
            path,
        ])
        // Each case that times out is a failure: the service sent nothing it should have.
        .args(["-o", "3", "-j"])
        .arg(&report);
    if tls {
        command.args(["-t", "-k"]);
    }
    let output = command.output().await.expect("run h2spec");
    let xml = std::fs::read_to_string(&report).expect("h2spec wrote its report");
    let mut cases = 0;
    let mut failed = Vec::new();
    for case in xml.split("<testcase ").skip(1) {
        cases += 1;
        let body = &case[..case.find("</testcase>").unwrap_or(case.len())];
        if body.contains("<failure") || body.contains("<skipped") || body.contains("<error") {
            failed.push(format!(
                "{} {}",
                attribute(case, "package"),
                attribute(case, "classname")
            ));
        }
    }
    Report {
        cases,
        failed,
        output: String::from_utf8_lossy(&output.stdout).into_owned(),
    }
}

/// An attribute's value in a JUnit tag, with h2spec's escapes undone.
fn attribute(tag: &str, name: &str) -> String {
    let start = tag.find(&format!("{name}=\"")).expect("the attribute") + name.len() + 2;
    let value = &tag[start..start + tag[start..].find('"').expect("its end")];
    value
        .replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The service, with a publish listener, and an update for `KEY` already known, so that a
/// stream path answers with DATA at once (the flow-control cases need it). Streams end after
/// a second: the cases on closed streams wait for the stream to end.
async fn service(tls: Option<&TestCertificate>) -> Service {
    let config = Config {
        tls: tls.map(|certificate| certificate.files.clone()),
        max_stream_age: seconds(1.0),
        max_stream_age_jitter: 0.0,
        ..test_config()
    };
    let service = Service::start_with_publish_listener(config).await;
    let publish_addr = service.publish_addr.unwrap();
    let (status, _) = publish(publish_addr, KEY, &body_at(1.5), Some(TOKEN)).await;
    assert_eq!(status, 200);
    service
}

const KEY: &str = "h2spec";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_own_http2_passes_every_case_on_h2c_and_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certificate = TestCertificate::generate(dir.path(), "server");
    let plain = service(None).await;
    let tls = service(Some(&certificate)).await;
    let stream_path = format!("/sse/environments/{KEY}/stream");
    let runs = [
        ("h2c /livez", plain.addr, false, "/livez"),
        ("h2c stream", plain.addr, false, stream_path.as_str()),
        ("TLS /livez", tls.addr, true, "/livez"),
        ("TLS stream", tls.addr, true, stream_path.as_str()),
    ];
    let reports = futures_util::future::join_all(
        runs.iter()
            .map(|(_, addr, tls, path)| run(*addr, *tls, path, dir.path())),
    )
    .await;
    let mut failures = Vec::new();
    for ((name, ..), report) in runs.iter().zip(&reports) {
        println!(
            "{name}: {} cases, {} failed",
            report.cases,
            report.failed.len()
        );
        if report.cases != CASES || !report.failed.is_empty() {
            failures.push(format!("{name}: {:#?}\n{}", report.failed, report.output));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    plain.stop().await;
    tls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_listener_fails_only_hypers_own_cases() {
    let dir = tempfile::tempdir().unwrap();
    let service = service(None).await;
    let report = run(service.publish_addr.unwrap(), false, "/livez", dir.path()).await;
    println!(
        "publish listener: {} cases, failed {:#?}",
        report.cases, report.failed
    );
    assert_eq!(report.cases, CASES, "{}", report.output);
    let unexpected: Vec<_> = report
        .failed
        .iter()
        .filter(|case| !HYPER_FAILS.contains(&case.as_str()))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}\n{}", report.output);
    service.stop().await;
}
