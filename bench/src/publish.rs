//! `queue-change` over one keep-alive HTTP/1.1 connection, as Flagsmith's task processor sends it.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http_body_util::BodyExt;
use hyper::client::conn::http1;

use crate::Error;
use crate::client::{Body, Target};

pub struct Publisher {
    sender: http1::SendRequest<Body>,
    target: Arc<Target>,
    /// Which connection of the run this is (it picks the source address), for reconnecting.
    n: usize,
    authorization: HeaderValue,
}

impl Publisher {
    pub async fn connect(target: Arc<Target>, n: usize, token: &str) -> Result<Self, Error> {
        let authorization = HeaderValue::try_from(format!("Token {token}"))
            .map_err(|_| "the token must be printable ASCII")?;
        Ok(Self {
            sender: target.http1(n).await?,
            target,
            n,
            authorization,
        })
    }

    /// Posts `body` for environment `key`; returns the status once the whole response is read.
    ///
    /// The service closes a keep-alive connection idle for 10 s, which a long connect phase
    /// outlasts, and the close can cross a request on the wire: a failed request goes again,
    /// once, on a new connection. A publish is idempotent, so sending it twice changes nothing.
    pub async fn publish(&mut self, key: &str, body: String) -> Result<u16, Error> {
        let body = Bytes::from(body);
        if self.sender.is_closed() {
            self.reconnect().await?;
        }
        match self.send(key, body.clone()).await {
            Err(err) => {
                eprintln!("publish failed ({err}); publishing again on a new connection");
                self.reconnect().await?;
                self.send(key, body).await
            }
            sent => sent,
        }
    }

    async fn reconnect(&mut self) -> Result<(), Error> {
        self.sender = self.target.http1(self.n).await?;
        Ok(())
    }

    async fn send(&mut self, key: &str, body: Bytes) -> Result<u16, Error> {
        let mut request = self.target.request(
            http::Method::POST,
            &format!("/sse/environments/{key}/queue-change"),
            body,
        );
        let headers = request.headers_mut();
        headers.insert(AUTHORIZATION, self.authorization.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::client::Protocol;

    /// A server that answers one request per connection and then closes it, as the service
    /// does with a keep-alive connection idle for too long.
    async fn one_request_per_connection(listener: tokio::net::TcpListener) -> usize {
        let mut connections = 0;
        while let Ok(Ok((mut socket, _))) =
            tokio::time::timeout(std::time::Duration::from_secs(2), listener.accept()).await
        {
            connections += 1;
            let mut request = Vec::new();
            while !request.ends_with(b"}") {
                let mut buffer = [0; 1024];
                match socket.read(&mut buffer).await.unwrap() {
                    0 => break,
                    read => request.extend_from_slice(&buffer[..read]),
                }
            }
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        }
        connections
    }

    #[tokio::test]
    async fn a_closed_connection_is_replaced_and_the_publish_sent_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(one_request_per_connection(listener));
        let target = Arc::new(Target::new(&url, Protocol::Http1, None, 1).unwrap());
        let mut publisher = Publisher::connect(target, 0, "token").await.unwrap();
        for update in 0..3 {
            let body = format!("{{\"updated_at\": {update}}}");
            assert_eq!(publisher.publish("env", body).await.unwrap(), 200);
        }
        assert_eq!(server.await.unwrap(), 3);
    }
}
