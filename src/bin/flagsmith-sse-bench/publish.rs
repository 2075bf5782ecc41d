//! `queue-change` over one keep-alive HTTP/1.1 connection, as Flagsmith's task processor sends it.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http_body_util::BodyExt;
use hyper::client::conn::http1;

use crate::Error;
use crate::client::{Body, Protocol, Target};

pub struct Publisher {
    sender: http1::SendRequest<Body>,
    target: Arc<Target>,
    authorization: HeaderValue,
}

impl Publisher {
    pub async fn connect(target: Arc<Target>, n: usize, token: &str) -> Result<Self, Error> {
        let authorization = HeaderValue::try_from(format!("Token {token}"))
            .map_err(|_| "the token must be printable ASCII")?;
        Ok(Self {
            sender: target.http1(n).await?,
            target,
            authorization,
        })
    }

    /// Posts `body` for environment `key`; returns the status once the whole response is read.
    pub async fn publish(&mut self, key: &str, body: String) -> Result<u16, Error> {
        let mut request = self.target.request(
            Protocol::Http1,
            http::Method::POST,
            &format!("/sse/environments/{key}/queue-change"),
            Bytes::from(body),
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
