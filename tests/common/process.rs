//! Child processes and ports: finding binaries, signalling and killing children, free ports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// `name` from PATH, or a panic that says how to install it.
pub fn binary_on_path(name: &str, install: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| panic!("{name} is not on PATH; {install}"))
}

/// Resident memory of a process (a pid, or `self` for this one: in-process services run in
/// it), in KiB, as the kernel counts it.
pub fn rss_kib_of(process: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

pub fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends `signal` to a server process; after `STOP`, returns once it is stopped.
pub fn signal_child(child: &Child, signal: &str) {
    let pid = child.id();
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    if signal == "STOP" {
        wait_until_stopped(pid);
    }
}

/// Waits until every thread of `pid` is stopped. A busy machine can let a thread of a
/// SIGSTOPped process run for a moment (seen here: nats-server still answering a PING), so a
/// test that needs a frozen server waits for the kernel to say so.
fn wait_until_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        let stopped = tasks
            .map(|task| task.unwrap().path().join("stat"))
            .all(|stat| {
                // The state follows the parenthesised command name.
                std::fs::read_to_string(stat).is_ok_and(|stat| {
                    stat.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
                })
            });
        if stopped {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A free loopback port: bound and released, for a process that takes it right after.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_tcp(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "{addr} never accepted connections"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An SDK check script's output, for a failure message.
pub fn describe(output: &std::process::Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        super::text(&output.stdout),
        super::text(&output.stderr)
    )
}

/// The JSON result an SDK check script prints last, once it succeeded and saw the change
/// within a second; `name` is what the failure messages call it.
pub fn sdk_result(output: &std::process::Output, name: &str) -> serde_json::Value {
    let report = describe(output);
    assert!(output.status.success(), "{name} check failed\n{report}");
    let stdout = super::text(&output.stdout);
    let last_line = stdout.lines().last().unwrap_or_default();
    let result: serde_json::Value = serde_json::from_str(last_line)
        .unwrap_or_else(|err| panic!("last stdout line is not JSON ({err})\n{report}"));
    println!("{name} check: {last_line}");
    assert_eq!(result["ok"], true, "{report}");
    let seconds = result["seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no seconds in the result\n{report}"));
    assert!(seconds < 1.0, "took {seconds} s\n{report}");
    result
}
