//! The published Flagsmith Python SDK, streaming from this service, sees a flag change within
//! 1 s of a `queue-change` POST carrying an ISO 8601 timestamp, as Flagsmith's task processor
//! sends it, on the NATS backend and on the Redis backend. The Python side lives in
//! `tests/python/realtime_sdk_check.py`.

mod common;

use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

const PYTHON: &str = "python3";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// A missing SDK fails the test: skipping would let the suite pass without testing anything.
async fn require_sdk() {
    let output = Command::new(PYTHON)
        .args(["-c", "import flagsmith"])
        .output()
        .await
        .unwrap_or_else(|err| panic!("cannot run {PYTHON}: {err}"));
    assert!(
        output.status.success(),
        "the Flagsmith Python SDK is not importable; run \
         `pip install -r tests/python/requirements.txt`\n{}",
        common::describe(&output)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_sees_a_change_within_a_second_on_nats() {
    let nats = common::NatsServer::start();
    sdk_sees_a_change_within_a_second(common::nats_config(&nats)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_sees_a_change_within_a_second_on_redis() {
    let redis = common::redis::RedisServer::start();
    sdk_sees_a_change_within_a_second(common::redis::redis_config(&redis)).await;
}

async fn sdk_sees_a_change_within_a_second(config: flagsmith_sse::Config) {
    require_sdk().await;
    let service = common::Service::start_ready(config).await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/realtime_sdk_check.py");
    let run = Command::new(PYTHON)
        .arg(&script)
        .args(["--sse-url", &service.url("/"), "--token", common::TOKEN])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} did not finish within {SCRIPT_TIMEOUT:?}",
                script.display()
            )
        })
        .expect("run the SDK check");
    common::sdk_result(&output, "python SDK");

    service.stop().await;
}
