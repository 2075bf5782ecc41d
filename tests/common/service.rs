//! The service in this process, on listeners the test binds, and what tests ask of it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use flagsmith_sse::config::{BackendKind, Seconds, Secret};
use flagsmith_sse::{Config, Control, Listeners};

use super::nats::NatsServer;
use super::sse::SseClient;

pub const TOKEN: &str = "test-token";

/// A configuration for tests: the token above, loopback, and short intervals.
pub fn test_config() -> Config {
    Config {
        authentication_token: Some(Secret::new(TOKEN.to_owned())),
        keepalive_interval: Seconds::new(15.0).unwrap(),
        ..Config::default()
    }
}

pub fn nats_config(nats: &NatsServer) -> Config {
    let mut config = test_config();
    config.backend = BackendKind::Nats;
    config.nats.url = nats.url();
    config
}

pub fn seconds(value: f64) -> Seconds {
    Seconds::new(value).unwrap()
}

pub struct Service {
    pub addr: SocketAddr,
    /// The publish listener, when started with one.
    pub publish_addr: Option<SocketAddr>,
    pub control: Control,
    task: tokio::task::JoinHandle<flagsmith_sse::Result<()>>,
}

impl Service {
    pub async fn start(config: Config) -> Self {
        Self::start_listening(config, false).await
    }

    /// Starts the service with a publish listener beside the public one.
    pub async fn start_with_publish_listener(config: Config) -> Self {
        Self::start_listening(config, true).await
    }

    async fn start_listening(config: Config, publish_listener: bool) -> Self {
        let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = public.local_addr().unwrap();
        let publish = match publish_listener {
            true => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let publish_addr = publish.as_ref().map(|l| l.local_addr().unwrap());
        let control = Control::default();
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let task = tokio::spawn(flagsmith_sse::run(
            config,
            Listeners { public, publish },
            control.clone(),
            log,
        ));
        Self {
            addr,
            publish_addr,
            control,
            task,
        }
    }

    /// Starts the service and waits until `/readyz` answers 200.
    pub async fn start_ready(config: Config) -> Self {
        let service = Self::start(config).await;
        service.wait_ready(true).await;
        service
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn readyz(&self) -> u16 {
        readyz(self.addr).await.expect("/readyz answers")
    }

    pub async fn wait_ready(&self, ready: bool) {
        wait_readiness(self.addr, ready).await;
    }

    pub async fn publish(&self, key: &str, body: &str) -> (u16, String) {
        publish(self.addr, key, body, Some(TOKEN)).await
    }

    pub async fn subscribe(&self, key: &str) -> SseClient {
        SseClient::connect(self.addr, &format!("/sse/environments/{key}/stream"), &[]).await
    }

    /// Begins graceful shutdown and waits for `run` to return.
    pub async fn stop(self) {
        self.control.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("service stops")
            .unwrap()
            .unwrap();
    }
}

/// The status of `/readyz`, or `None` if nothing answers yet.
pub async fn readyz(addr: SocketAddr) -> Option<u16> {
    let response = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
    Some(response.status().as_u16())
}

/// Waits (up to 20 s) until `/readyz` says `ready`.
pub async fn wait_readiness(addr: SocketAddr, ready: bool) {
    let want = if ready { 200 } else { 503 };
    let deadline = Instant::now() + Duration::from_secs(20);
    while readyz(addr).await != Some(want) {
        assert!(Instant::now() < deadline, "/readyz never became {want}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn publish(
    addr: SocketAddr,
    key: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut request = client
        .post(format!("http://{addr}/sse/environments/{key}/queue-change"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.header("authorization", format!("Token {token}"));
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// `{"updated_at": <seconds>}`.
pub fn body_at(seconds: f64) -> String {
    format!("{{\"updated_at\": {seconds:?}}}")
}

/// What a stream writes first, right after its head, when no update is known: the keep-alive
/// comment, so that every browser's EventSource opens at once.
pub const OPENING: &[u8] = b": ping\n\n";

/// The exact event the service writes for `updated_at` (as the service prints it).
pub fn event(updated_at: &str) -> Vec<u8> {
    format!("event: environment_updated\ndata: {{\"updated_at\": {updated_at}}}\nretry: 15000\n\n")
        .into_bytes()
}
