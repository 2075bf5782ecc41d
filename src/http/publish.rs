//! `POST /sse/environments/{key}/queue-change`: Flagsmith's task processor reports a change.
//!
//! `200` means the backend stored the update durably; the same update twice is one update.
//! Flagsmith's client gives up after 2 s, so a backend that cannot store it is tried again until
//! `publish_timeout` (1.5 s), and then answered with `503`.
//!
//! Each request has an id, the caller's `X-Request-Id` or a new one, returned in the response
//! and carried by its log lines; every refused request logs one warning.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use futures_util::{Stream, StreamExt};
use http::HeaderMap;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, HeaderName, HeaderValue};
use slog::{debug, warn};
use warp::{Filter, Reply};

use super::{ApiError, PeerAddr, State, with_state};
use crate::domain::{EnvironmentKey, MAX_KEY_LEN, Update, UpdatedAt};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A `queue-change` body is `{"updated_at": "<ISO 8601>"}`: a few dozen bytes.
pub const MAX_BODY_BYTES: usize = 4096;

/// Request ids longer than this, from a proxy's `X-Request-Id`, are replaced by our own.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// Pauses between attempts to store an update the backend could not store: short at first,
/// so a blip costs little, then at most this, so an outage costs the backend little.
const STORE_RETRY_MIN: Duration = Duration::from_millis(20);
const STORE_RETRY_MAX: Duration = Duration::from_millis(200);

pub fn route(
    state: Arc<State>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    warp::path!("sse" / "environments" / String / "queue-change")
        .and(warp::post())
        .and(warp::ext::optional::<PeerAddr>())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(with_state(state))
        .then(queue_change)
}

/// How an accepted request ended, as `flagsmith_sse_publish_requests_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Stored,
    /// Already known: a retry, or overtaken by a newer update.
    Duplicate,
}

async fn queue_change(
    key: String,
    peer: Option<PeerAddr>,
    headers: HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>>,
    state: Arc<State>,
) -> warp::reply::Response {
    let started = Instant::now();
    let request_id = request_id(&headers);
    let log = state.log.new(slog::o!("request_id" => request_id.clone()));
    // Every request reaches the handler through the accept loop, which names its peer.
    let peer = peer.map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |PeerAddr(addr)| {
        addr.ip()
    });
    let result = accept(&key, peer, &headers, body, &state, &log).await;
    let elapsed = started.elapsed();
    let metrics = &state.metrics.publish;
    metrics.duration.observe(elapsed.as_secs_f64());
    let outcomes = &metrics.outcomes;
    let mut response = match result {
        Ok((update, outcome)) => {
            match outcome {
                Outcome::Stored => outcomes.stored.inc(),
                Outcome::Duplicate => outcomes.duplicate.inc(),
            }
            warp::reply::json(&serde_json::json!({
                "updated_at": update.updated_at.as_secs_f64(),
            }))
            .into_response()
        }
        Err(failure) => {
            let outcome = match &failure.error {
                ApiError::Unauthorized => &outcomes.unauthorized,
                ApiError::Throttled(_) => &outcomes.throttled,
                ApiError::BadRequest(_) => &outcomes.bad_request,
                ApiError::PayloadTooLarge => &outcomes.too_large,
                ApiError::PublishTimeout => &outcomes.timeout,
                ApiError::Unavailable(_) | ApiError::TooManyStreams => &outcomes.unavailable,
            };
            outcome.inc();
            // The path segment as sent, which may not be a key at all: bounded like one.
            let env: String = key.chars().take(MAX_KEY_LEN).collect();
            let log = log.new(slog::o!(
                "env" => env,
                "status" => failure.error.status().as_u16(),
                "duration_ms" => elapsed.as_secs_f64() * 1000.0));
            match &failure.cause {
                Some(cause) => {
                    warn!(log, "publish failed"; "error" => %failure.error, "cause" => cause);
                }
                None => warn!(log, "publish failed"; "error" => %failure.error),
            }
            failure.error.into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(X_REQUEST_ID, value);
    }
    response
}

/// A refused request: what the client is told, and for the log, why.
struct Failure {
    error: ApiError,
    /// The backend's reason, never sent to the client.
    cause: Option<String>,
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Self { error, cause: None }
    }
}

/// The caller's `X-Request-Id` when it is a short printable token (proxies set one), or a new
/// random one; it is logged with the request and returned in the response.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(X_REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_BYTES
                && id.bytes().all(|byte| byte.is_ascii_graphic())
        })
        .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_owned)
}

async fn accept(
    key: &str,
    peer: IpAddr,
    headers: &HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>>,
    state: &State,
    log: &slog::Logger,
) -> Result<(Update, Outcome), Failure> {
    let now = Instant::now();
    state
        .throttle
        .check(peer, now)
        .map_err(ApiError::Throttled)?;
    let authorization = headers.get(AUTHORIZATION).map(|value| value.as_bytes());
    if !state.auth.verify(authorization) {
        state.throttle.failed(peer, now);
        return Err(ApiError::Unauthorized.into());
    }
    let key = EnvironmentKey::from_path_segment(key)
        .map_err(|err| ApiError::BadRequest(err.to_string()))?;
    let body = read_limited(headers, body).await?;
    let updated_at =
        UpdatedAt::from_body(&body).map_err(|err| ApiError::BadRequest(err.to_string()))?;
    let update = Update { key, updated_at };
    // Already stored (a retry, or overtaken by a newer change): nothing to publish.
    if state
        .hub
        .latest(&update.key)
        .is_some_and(|known| known >= update.updated_at)
    {
        debug!(log, "update already known"; "env" => %update.key, "updated_at" => %update.updated_at);
        return Ok((update, Outcome::Duplicate));
    }
    store(update, state, log).await
}

/// Stores `update`, trying again while the backend cannot, until `publish_timeout` is over.
///
/// Flagsmith's task processor tries a failed publish again only at its next poll (500 ms
/// later, whatever `Retry-After` says), three times in all, then drops the update: a broker
/// restart or a new stream leader can outlast all three if each is answered `503` at once.
/// Riding the outage out here, within the budget Flagsmith's 2 s timeout leaves, turns most of
/// them into a late `200`. Backends answer at once when they cannot store, so every attempt is
/// short and the last one's reason is what the log gets.
async fn store(
    update: Update,
    state: &State,
    log: &slog::Logger,
) -> Result<(Update, Outcome), Failure> {
    let deadline = tokio::time::Instant::now() + state.publish_timeout;
    let mut delay = STORE_RETRY_MIN;
    let mut attempts = 0_u32;
    loop {
        attempts += 1;
        let cause = match tokio::time::timeout_at(deadline, state.backend.publish(update.clone()))
            .await
        {
            Ok(Ok(())) => {
                debug!(log, "update stored";
                    "env" => %update.key, "updated_at" => %update.updated_at, "attempts" => attempts);
                return Ok((update, Outcome::Stored));
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => {
                return Err(Failure {
                    error: ApiError::PublishTimeout,
                    cause: Some(format!(
                        "no answer from the backend within {} ms ({attempts} attempts)",
                        state.publish_timeout.as_millis()
                    )),
                });
            }
        };
        if tokio::time::Instant::now() + delay >= deadline {
            return Err(Failure {
                error: ApiError::Unavailable("The update could not be stored; retry later."),
                cause: Some(format!("{cause} ({attempts} attempts)")),
            });
        }
        debug!(log, "update not stored, trying again"; "env" => %update.key, "error" => cause);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(STORE_RETRY_MAX);
    }
}

/// Reads at most [`MAX_BODY_BYTES`], with or without `Content-Length` (chunked bodies too),
/// refusing a declared oversized body before reading it.
async fn read_limited(
    headers: &HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>>,
) -> Result<BytesMut, ApiError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    let mut body = std::pin::pin!(body);
    let mut collected = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|err| ApiError::BadRequest(format!("cannot read body: {err}")))?;
        if collected.len() + chunk.remaining() > MAX_BODY_BYTES {
            return Err(ApiError::PayloadTooLarge);
        }
        collected.put(chunk);
    }
    Ok(collected)
}
