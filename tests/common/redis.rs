//! Real `redis-server`s on dynamic loopback ports: single servers (plaintext or TLS) and
//! clusters, each with its own directory; killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flagsmith_sse::Config;
use flagsmith_sse::config::BackendKind;

use super::{binary_on_path, free_port, test_config, wait_for_tcp};

fn redis_binary(name: &str) -> PathBuf {
    binary_on_path(
        name,
        "install it with `apt-get install redis-server redis-tools`, as .ci/run does",
    )
}

/// A configuration using `redis` as the backend.
pub fn redis_config(redis: &RedisServer) -> Config {
    let mut config = test_config();
    config.backend = BackendKind::Redis;
    config.redis.host = "127.0.0.1".to_owned();
    config.redis.port = redis.port;
    config
}

/// A certificate authority and a server certificate for `localhost` and 127.0.0.1, as PEM
/// files in `dir`.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn create(dir: &Path) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "flagsmith-sse test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        let certificate = params.signed_by(&key, &issuer).unwrap();
        let files = Self {
            ca: dir.join("ca.pem"),
            certificate: dir.join("redis.pem"),
            key: dir.join("redis.key"),
        };
        std::fs::write(&files.ca, ca.pem()).unwrap();
        std::fs::write(&files.certificate, certificate.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Arguments beyond the port, directory and persistence settings.
    extra: Vec<String>,
    /// Files for `--tls-port`, when the server speaks only TLS.
    pub tls: Option<TlsFiles>,
    /// What `redis-cli` needs to log in.
    password: Option<String>,
}

impl RedisServer {
    /// A plaintext server without persistence.
    pub fn start() -> Self {
        Self::start_with(&[], false)
    }

    /// A server requiring `password` for the `default` user.
    pub fn start_with_password(password: &str) -> Self {
        let mut server = Self::new(&["--requirepass", password], false);
        server.password = Some(password.to_owned());
        server.spawn();
        server
    }

    /// A server speaking only TLS, with a certificate for `localhost` from a private CA.
    pub fn start_tls() -> Self {
        Self::start_with(&[], true)
    }

    pub fn start_with(extra: &[&str], tls: bool) -> Self {
        let mut server = Self::new(extra, tls);
        server.spawn();
        server
    }

    fn new(extra: &[&str], tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = tls.then(|| TlsFiles::create(dir.path()));
        Self {
            child: None,
            port: free_port(),
            dir,
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            tls,
            password: None,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut command = Command::new(redis_binary("redis-server"));
        command.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        match &self.tls {
            Some(tls) => {
                command
                    .args([
                        "--port",
                        "0",
                        "--tls-port",
                        &port,
                        "--tls-auth-clients",
                        "no",
                    ])
                    .arg("--tls-cert-file")
                    .arg(&tls.certificate)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca);
            }
            None => {
                command.args(["--port", &port]);
            }
        }
        let child = command
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_for_tcp(SocketAddr::from(([127, 0, 0, 1], self.port)));
        if self.tls.is_none() {
            // Accepting connections comes before loading; wait until commands are served.
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.try_cli(&["PING"]).as_deref() != Some("PONG") {
                assert!(
                    Instant::now() < deadline,
                    "redis-server never answered PING"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills the server (SIGKILL): without persistence, it forgets everything.
    pub fn stop(&mut self) {
        super::kill(&mut self.child);
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn signal(&self, signal: &str) {
        super::signal_child(self.child.as_ref().expect("running"), signal);
    }

    fn cli_command(&self) -> Command {
        let mut command = Command::new(redis_binary("redis-cli"));
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(tls) = &self.tls {
            command.arg("--tls").arg("--cacert").arg(&tls.ca);
        }
        if let Some(password) = &self.password {
            command.args(["--no-auth-warning", "-a", password]);
        }
        command
    }

    pub fn try_cli(&self, args: &[&str]) -> Option<String> {
        let output = self.cli_command().args(args).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Runs `redis-cli` against this server; its output, trimmed.
    /// Changes the `default` user's password; connections already logged in stay.
    pub fn set_password(&mut self, password: &str) {
        self.cli(&["CONFIG", "SET", "requirepass", password]);
        self.password = Some(password.to_owned());
    }

    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of `masters` nodes with `replicas` replicas each, slots spread by
/// `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize, replicas: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| {
                let bus_port = free_port().to_string();
                RedisServer::start_with(
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        &bus_port,
                        "--cluster-node-timeout",
                        "2000",
                        // Replicas sync at once, and may take over however long ago they
                        // last heard their master: a test kills masters right after start.
                        "--repl-diskless-sync-delay",
                        "0",
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                    false,
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let output = Command::new(redis_binary("redis-cli"))
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed:\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes.iter().all(|node| {
            node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") && {
                let replication = node.cli(&["INFO", "replication"]);
                replication.contains("role:master") || replication.contains("master_link_status:up")
            }
        }) {
            assert!(
                Instant::now() < deadline,
                "the cluster never became ok with every replica in sync"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { nodes }
    }

    /// The index of the master that owns `key`'s slot.
    pub fn owner_index(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap();
        self.nodes
            .iter()
            .position(|node| node.try_cli(&["PING"]).is_some() && node_owns_slot(node, slot))
            .expect("some node owns the slot")
    }

    /// The master that owns `key`'s slot.
    pub fn owner(&self, key: &str) -> &RedisServer {
        &self.nodes[self.owner_index(key)]
    }
}

/// Whether `node`'s own entry in `CLUSTER NODES` lists `slot` among its ranges.
fn node_owns_slot(node: &RedisServer, slot: u16) -> bool {
    node.cli(&["CLUSTER", "NODES"])
        .lines()
        .find(|line| line.contains("myself"))
        .is_some_and(|line| {
            line.split(' ').skip(8).any(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                match (start.parse::<u16>(), end.parse::<u16>()) {
                    (Ok(start), Ok(end)) => (start..=end).contains(&slot),
                    _ => false,
                }
            })
        })
}
