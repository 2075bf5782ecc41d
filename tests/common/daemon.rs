//! The real binary as a child process, with its JSON log lines forwarded to a channel.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary, with its JSON log lines forwarded to a channel.
pub struct Daemon {
    child: Child,
    pub logs: mpsc::Receiver<serde_json::Value>,
    /// Lines already taken from `logs` while waiting for another.
    seen: Vec<serde_json::Value>,
}

impl Daemon {
    pub fn spawn(envs: &[(&str, String)]) -> Self {
        Self::spawn_with_args(&[], envs)
    }

    /// Listening on a dynamic loopback port: `LISTEN_ADDR` is set unless `envs` sets it.
    pub fn spawn_with_args(args: &[&str], envs: &[(&str, String)]) -> Self {
        // Set only in the service's own tests: the load generator's smoke test shares these
        // helpers but runs the service in its own process.
        let Some(binary) = option_env!("CARGO_BIN_EXE_flagsmith-sse") else {
            panic!("the real binary is there only in the flagsmith-sse package's tests");
        };
        let mut command = Command::new(binary);
        command.args(args);
        for (name, _) in std::env::vars() {
            if name.starts_with("FLAGSMITH_SSE_")
                || [
                    "NATS_URL",
                    "LISTEN_ADDR",
                    "SSE_AUTHENTICATION_TOKEN",
                    "REDIS_HOST",
                ]
                .contains(&name.as_str())
            {
                command.env_remove(name);
            }
        }
        command
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("FLAGSMITH_SSE_LOG__FORMAT", "json")
            .envs(envs.iter().map(|(name, value)| (*name, value)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start flagsmith-sse");
        let stderr = child.stderr.take().unwrap();
        let (sender, logs) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let parsed = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "msg": line }));
                if sender.send(parsed).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            logs,
            seen: Vec::new(),
        }
    }

    /// Waits up to 10 s for the next log line with message `msg`.
    pub fn wait_log(&mut self, msg: &str) -> serde_json::Value {
        loop {
            let line = self
                .logs
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no {msg:?} log line; log so far: {:?}", self.seen));
            self.seen.push(line.clone());
            if line["msg"] == msg {
                return line;
            }
        }
    }

    /// Every log line so far, waited for or not.
    pub fn all_logs(&mut self) -> &[serde_json::Value] {
        self.seen.extend(self.logs.try_iter());
        &self.seen
    }

    /// The address from the start-up log line.
    pub fn listen_addr(&mut self) -> SocketAddr {
        let line = self.wait_log("starting");
        // The effective configuration, as an object, with the token redacted.
        assert!(line["config"]["max_stream_age"].is_number(), "{line}");
        assert!(
            line["config"]["authentication_token"].is_null()
                || line["config"]["authentication_token"] == "<redacted>",
            "{line}"
        );
        line["listen"].as_str().unwrap().parse().unwrap()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit; returns the exit code and how long it took.
    pub fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), started.elapsed());
            }
            if started.elapsed() > limit {
                let logs: Vec<_> = self.logs.try_iter().map(|line| line.to_string()).collect();
                panic!("still running after {limit:?}; log:\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, in KiB, as the kernel counts it.
    pub fn rss_kib(&self) -> u64 {
        super::rss_kib_of(&self.pid().to_string())
    }

    /// File descriptors the process has open.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// `kill -9`, and waits for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
