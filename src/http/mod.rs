//! The HTTP API of SPEC §1: warp filters for the routes, plus the glue warp 0.4 leaves to us.
//!
//! warp routes every request and builds every response, but it cannot carry a custom streaming
//! body: the stream route hands its [`stream::Subscription`] back in the response's extensions
//! and [`service`] swaps it for the [`stream::SseBody`] that writes the events. The exception:
//! plain HTTP/1.1 stream requests, which `h1` answers before hyper and warp see them, with the
//! same subscription, body and response head.
//!
//! Before warp, an HTTP/1.1 request without exactly one `Host` gets its 400 (RFC 9112 §3.2),
//! which neither hyper nor warp checks; `h1` hands such requests here.

pub(crate) mod h1;
pub(crate) mod h2;
pub mod health;
pub mod metricsz;
pub mod publish;
pub mod serve;
pub mod stream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use tokio_util::sync::CancellationToken;
use warp::{Filter, Rejection, Reply};

use crate::auth::{Authenticator, Throttle};
use crate::backend::Backend;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Everything the handlers share.
pub struct State {
    pub hub: Arc<Hub>,
    pub backend: Arc<Backend>,
    pub auth: Arc<Authenticator>,
    /// Failed publish authentications per peer.
    pub throttle: Throttle,
    pub streams: stream::StreamSettings,
    pub admission: stream::Admission,
    pub publish_timeout: Duration,
    /// Fires when shutdown begins: streams start ending and readiness turns 503.
    pub draining: CancellationToken,
    pub metrics: Arc<Metrics>,
    pub log: slog::Logger,
}

impl State {
    /// Begins the drain: the listeners stop accepting, and every stream plans its end. The
    /// hub keeps its own flag of it, which streams read on every wake without a lock.
    pub fn drain(&self) {
        self.draining.cancel();
        self.hub.drain();
    }
}

/// The address of the client a request came from, put in its extensions by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Which routes a listener serves; health checks and CORS preflight are on every listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub streams: bool,
    pub publish: bool,
    /// `/metricsz`: on the internal listener when there is one.
    pub metrics: bool,
}

impl Endpoints {
    /// The public listener when there is no publish listener.
    pub const ALL: Self = Self {
        streams: true,
        publish: true,
        metrics: true,
    };
    /// The public listener beside a publish listener.
    pub const STREAMS: Self = Self {
        streams: true,
        publish: false,
        metrics: false,
    };
    /// The publish listener, the internal one.
    pub const PUBLISH: Self = Self {
        streams: false,
        publish: true,
        metrics: true,
    };
}

/// A listener's routes, as [`routes`] builds them: every request gets a response.
pub trait Routes:
    Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone + Send + Sync + 'static
{
}

impl<F> Routes for F where
    F: Filter<Extract = (warp::reply::Response,), Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The routes of `endpoints`, with errors as JSON and CORS on every response.
pub fn routes(state: Arc<State>, endpoints: Endpoints) -> impl Routes {
    served_if(endpoints.streams)
        .and(stream::route(state.clone()))
        .or(served_if(endpoints.publish).and(publish::route(state.clone())))
        .unify()
        .or(health::routes(state.clone()))
        .or(served_if(endpoints.metrics).and(metricsz::route(state)))
        .or(preflight())
        .recover(handle_rejection)
        .with(warp::reply::with::header(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            "*",
        ))
        .map(Reply::into_response)
}

/// Names the body type of warp's responses, which warp 0.4 keeps private.
pub trait ResponseBody {
    type Body;
}

impl<B> ResponseBody for Response<B> {
    type Body = B;
}

pub type WarpBody = <warp::reply::Response as ResponseBody>::Body;

pub(crate) fn with_state(
    state: Arc<State>,
) -> impl Filter<Extract = (Arc<State>,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// Passes when the route is served on this listener; otherwise the path is "not found", as
/// for any path the listener does not know.
fn served_if(served: bool) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::any()
        .and_then(move || async move {
            if served {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
}

/// Answers CORS preflight requests for every path, allowing any origin and requested header.
fn preflight() -> impl Filter<Extract = (Response<String>,), Error = Rejection> + Clone {
    // Other methods are "not found" here rather than warp's "method not allowed", which would
    // outrank the 404 of an unknown path.
    warp::method()
        .and_then(|method: http::Method| async move {
            if method == http::Method::OPTIONS {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
        .and(warp::header::optional::<String>(
            header::ACCESS_CONTROL_REQUEST_HEADERS.as_str(),
        ))
        .map(|requested: Option<String>| {
            let mut response = Response::new(String::new());
            *response.status_mut() = StatusCode::NO_CONTENT;
            let headers = response.headers_mut();
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            let allowed = requested
                .and_then(|requested| HeaderValue::from_str(&requested).ok())
                .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type"));
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed);
            headers.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("86400"),
            );
            response
        })
}

/// Errors the handlers answer with. The status of each is decided in one exhaustive match.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Invalid authorization header")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("The update could not be stored in time; retry later.")]
    PublishTimeout,
    #[error("Too many open streams, retry later")]
    TooManyStreams,
    #[error("Request body is larger than {} bytes", publish::MAX_BODY_BYTES)]
    PayloadTooLarge,
    /// Too many failed authentications from this peer; it may try again after this long.
    #[error("Too many failed authentications, retry later")]
    Throttled(std::time::Duration),
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::PublishTimeout | ApiError::TooManyStreams => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// Seconds a client should wait before retrying; spread for streams so a shed herd does
    /// not come back all at once.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Unauthorized | ApiError::BadRequest(_) | ApiError::PayloadTooLarge => None,
            ApiError::Unavailable(_) | ApiError::PublishTimeout => Some(1),
            ApiError::TooManyStreams => Some(rand::random_range(1..=10)),
            ApiError::Throttled(wait) => Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)),
        }
    }

    pub fn into_response(self) -> warp::reply::Response {
        let mut response = json_detail(self.status(), &self.to_string());
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// `{"detail": ...}`, the error shape Flagsmith's API uses.
pub(crate) fn json_detail(status: StatusCode, detail: &str) -> warp::reply::Response {
    warp::reply::with_status(
        warp::reply::json(&serde_json::json!({ "detail": detail })),
        status,
    )
    .into_response()
}

async fn handle_rejection(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    // Handlers answer their own errors; what reaches here is routing.
    let (status, detail) = if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "Not found.")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.")
    } else {
        (StatusCode::BAD_REQUEST, "Bad request.")
    };
    Ok(json_detail(status, detail))
}

/// The hyper service for one connection: warp's routes, with `//sse/...` paths accepted (the
/// Flagsmith API joins URLs by string concatenation) and subscriptions turned into SSE bodies.
pub fn service<F: Routes>(
    routes: F,
) -> impl hyper::service::Service<
    Request<hyper::body::Incoming>,
    Response = Response<Either<WarpBody, stream::SseBody>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let routed = route(&routes, request);
        async move { Ok::<_, Infallible>(routed.await) }
    })
}

/// `request` through `routes`, with `//sse/...` paths accepted and a subscription turned into
/// its SSE body.
fn route<F: Routes, B>(
    routes: &F,
    mut request: Request<B>,
) -> impl Future<Output = RoutedResponse> + use<F, B>
where
    B: http_body::Body + Send + Sync + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let refused = host_error(&request);
    collapse_slashes(request.uri_mut());
    let mut routes = warp::service(routes.clone());
    async move {
        if let Some(response) = refused {
            return response.map(Either::Left);
        }
        let Ok(response) = tower_service::Service::call(&mut routes, request).await;
        stream::attach_body(response)
    }
}

/// The `detail` of the 400 for an HTTP/1.1 request without exactly one `Host`.
const HOST_REQUIRED: &str = "Bad Request: an HTTP/1.1 request needs exactly one Host header";

/// RFC 9112 §3.2: a server answers 400 to an HTTP/1.1 request that lacks a `Host` header or
/// has more than one, and hyper leaves that check to the service. HTTP/1.0 may leave it out,
/// and HTTP/2 names the host in `:authority`. The connection closes after the answer, as
/// after hyper's own 400s: a client that gets this much wrong may have framed the rest wrong
/// too.
fn host_error<B>(request: &Request<B>) -> Option<warp::reply::Response> {
    let hosts = request.headers().get_all(header::HOST).iter().count();
    if request.version() != Version::HTTP_11 || hosts == 1 {
        return None;
    }
    let mut response = ApiError::BadRequest(HOST_REQUIRED.to_owned()).into_response();
    let headers = response.headers_mut();
    // What `routes` adds to every response it gives.
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    Some(response)
}

/// A response as the routes give it: warp's body, or a stream's.
pub type RoutedResponse = Response<Either<WarpBody, stream::SseBody>>;

/// The routes for requests the HTTP/2 stream writer (`h2`) read whole but does not serve
/// itself: they go to warp as they would through hyper.
pub type Forward = Arc<
    dyn Fn(
            Request<http_body_util::Full<bytes::Bytes>>,
        ) -> futures_util::future::BoxFuture<'static, RoutedResponse>
        + Send
        + Sync,
>;

/// [`Forward`] for `routes`.
pub fn forward<F: Routes>(routes: F) -> Forward {
    Arc::new(move |request| Box::pin(route(&routes, request)))
}

/// `//sse//environments/x/stream` → `/sse/environments/x/stream`.
fn collapse_slashes(uri: &mut Uri) {
    if !uri.path().contains("//") {
        return;
    }
    let mut path = String::with_capacity(uri.path().len());
    for (index, segment) in uri.path().split('/').enumerate() {
        if index == 0 || !segment.is_empty() {
            if index > 0 {
                path.push('/');
            }
            path.push_str(segment);
        }
    }
    if uri.path().ends_with('/') && !path.ends_with('/') {
        path.push('/');
    }
    if let Some(query) = uri.query() {
        path.push('?');
        path.push_str(query);
    }
    let mut parts = uri.clone().into_parts();
    if let Ok(path_and_query) = path.parse() {
        parts.path_and_query = Some(path_and_query);
        if let Ok(collapsed) = Uri::from_parts(parts) {
            *uri = collapsed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubled_slashes_collapse() {
        for (raw, expected) in [
            ("//sse/environments/a/stream", "/sse/environments/a/stream"),
            (
                "/sse//environments/a/stream?x=1",
                "/sse/environments/a/stream?x=1",
            ),
            ("//health/liveness/", "/health/liveness/"),
            ("/livez", "/livez"),
        ] {
            let mut uri: Uri = raw.parse().unwrap();
            collapse_slashes(&mut uri);
            assert_eq!(uri.to_string(), expected, "{raw}");
        }
    }
}
