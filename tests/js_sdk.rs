//! The published Flagsmith JavaScript SDK (`@flagsmith/flagsmith`), under Node with the
//! `eventsource` package as its EventSource, streaming from this service: it sees a flag
//! change within 1 s of a `queue-change` POST, on a stream that opened with the keep-alive
//! comment written when no update is known. The Node side lives in
//! `tests/js/realtime_sdk_check.mjs`; `npm ci --prefix tests/js` installs what it needs, as
//! `.ci/run` does.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

const NODE: &str = "node";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

fn describe(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        common::text(&output.stdout),
        common::text(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn js_sdk_reads_past_the_opening_comment_and_sees_a_change_within_a_second() {
    let node = common::binary_on_path(NODE, "install Node.js 20 or later (Debian's nodejs)");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    // A missing SDK fails the test: skipping would let the suite pass without testing anything.
    for package in ["@flagsmith/flagsmith", "eventsource"] {
        assert!(
            dir.join("node_modules").join(package).is_dir(),
            "{package} is not installed in {}; run `npm ci --prefix tests/js`, as .ci/run does",
            dir.display()
        );
    }
    let service = common::Service::start_ready(common::test_config()).await;

    let run = Command::new(node)
        .current_dir(&dir)
        .arg("realtime_sdk_check.mjs")
        .args(["--sse-url", &service.url("/"), "--token", common::TOKEN])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("the JS SDK check did not finish within {SCRIPT_TIMEOUT:?}"))
        .expect("run the JS SDK check");
    let report = describe(&output);
    assert!(output.status.success(), "JS SDK check failed\n{report}");

    let stdout = common::text(&output.stdout);
    let last_line = stdout.lines().last().unwrap_or_default();
    let result: serde_json::Value = serde_json::from_str(last_line)
        .unwrap_or_else(|err| panic!("last stdout line is not JSON ({err})\n{report}"));
    println!("JS SDK check: {last_line}");
    assert_eq!(result["ok"], true, "{report}");
    let seconds = result["seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no seconds in the result\n{report}"));
    assert!(seconds < 1.0, "took {seconds} s\n{report}");
    // The flags at start, and once more for the change.
    assert_eq!(result["flag_fetches"], 2, "{report}");

    service.stop().await;
}
