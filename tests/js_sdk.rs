//! The published Flagsmith JavaScript SDK (`@flagsmith/flagsmith`), under Node with the
//! `eventsource` package as its EventSource, streaming from this service: it sees a flag
//! change within 1 s of a `queue-change` POST, on a stream that opened with the keep-alive
//! comment written when no update is known. The Node side lives in
//! `tests/js/realtime_sdk_check.mjs`; `npm ci --prefix tests/js` installs what it needs, as
//! `.ci/run` does.

mod common;

use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

const NODE: &str = "node";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

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
    let result = common::sdk_result(&output, "JS SDK");
    // The flags at start, and once more for the change.
    assert_eq!(result["flag_fetches"], 2, "{}", common::describe(&output));

    service.stop().await;
}
