//! A TCP proxy that can cut one client off from a server that stays up.

use std::net::SocketAddr;

use tokio::net::TcpStream;

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
