//! The script behind `nix run .#demo`, run as Nix's writeShellApplication runs it (bash with
//! `set -euo pipefail`) against this build and the test machine's nats-server: the commands
//! it prints work, and it leaves nothing behind.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{SseClient, body_at, event, free_port, publish, wait_readiness};

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_serves_what_it_prints_and_cleans_up() {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_flagsmith-sse"));
    let path = format!(
        "{}:{}",
        binary.parent().unwrap().display(),
        std::env::var("PATH").unwrap()
    );
    let (sse_port, nats_port) = (free_port(), free_port());
    let mut demo = Command::new("bash")
        .args(["-euo", "pipefail"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/nix/demo.sh"))
        .env("PATH", path)
        .env("SSE_PORT", sse_port.to_string())
        .env("NATS_PORT", nats_port.to_string())
        .env("FLAGSMITH_SSE_LOG__FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bash runs the demo");

    // The instructions: the token and the temporary directory to be removed on exit.
    let mut instructions = String::new();
    let mut stdout = BufReader::new(demo.stdout.take().unwrap());
    while !instructions.contains("Press Ctrl-C") {
        assert!(
            stdout.read_line(&mut instructions).unwrap() > 0,
            "{instructions}"
        );
    }
    let token = instructions
        .split("Token ")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("a token in the instructions")
        .to_owned();
    let dir = instructions
        .split("and remove ")
        .nth(1)
        .map(|rest| PathBuf::from(rest.trim().trim_end_matches('.')))
        .expect("the temporary directory in the instructions");
    assert!(dir.is_dir(), "{}", dir.display());

    let addr = format!("127.0.0.1:{sse_port}").parse().unwrap();
    wait_readiness(addr, true).await;
    assert!(instructions.contains(&format!(
        "curl -N http://{addr}/sse/environments/my-environment-key/stream"
    )));
    let mut stream =
        SseClient::connect(addr, "/sse/environments/my-environment-key/stream", &[]).await;
    let (status, body) = publish(addr, "my-environment-key", &body_at(1.5), Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(stream.next_event().await, event("1.5"));

    // What Ctrl-C in a terminal or `kill` does: the demo stops both servers and its directory.
    let status = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = demo.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the demo did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(!dir.exists(), "{} was left behind", dir.display());
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the service still listens"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err(),
        "nats-server still listens"
    );
}
