//! `POST /sse/environments/{key}/queue-change`: Flagsmith's task processor reports a change.
//!
//! `200` means the backend stored the update durably; the same update twice is one update.
//! Flagsmith's client gives up after 2 s, so a slow backend is answered with `503` before then.

use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use futures_util::{Stream, StreamExt};
use http::HeaderMap;
use http::header::{AUTHORIZATION, CONTENT_LENGTH};
use slog::{debug, warn};
use warp::{Filter, Reply};

use super::{ApiError, State, with_state};
use crate::domain::{EnvironmentKey, Update, UpdatedAt};

/// A `queue-change` body is `{"updated_at": "<ISO 8601>"}`: a few dozen bytes.
pub const MAX_BODY_BYTES: usize = 4096;

pub fn route(
    state: Arc<State>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    warp::path!("sse" / "environments" / String / "queue-change")
        .and(warp::post())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(with_state(state))
        .then(queue_change)
}

async fn queue_change(
    key: String,
    headers: HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>>,
    state: Arc<State>,
) -> warp::reply::Response {
    match accept(key, &headers, body, &state).await {
        Ok(update) => warp::reply::json(&serde_json::json!({
            "updated_at": update.updated_at.as_secs_f64(),
        }))
        .into_response(),
        Err(err) => err.into_response(),
    }
}

async fn accept(
    key: String,
    headers: &HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>>,
    state: &State,
) -> Result<Update, ApiError> {
    let authorization = headers.get(AUTHORIZATION).map(|value| value.as_bytes());
    if !state.auth.verify(authorization) {
        return Err(ApiError::Unauthorized);
    }
    let key = EnvironmentKey::from_path_segment(&key)
        .map_err(|err| ApiError::BadRequest(err.to_string()))?;
    let body = read_limited(headers, body).await?;
    let updated_at =
        UpdatedAt::from_body(&body).map_err(|err| ApiError::BadRequest(err.to_string()))?;
    let update = Update { key, updated_at };
    let log = state.log.new(slog::o!("env" => update.key.to_string()));
    // Already stored (a retry, or overtaken by a newer change): nothing to publish.
    if state
        .hub
        .latest(&update.key)
        .is_some_and(|known| known >= update.updated_at)
    {
        debug!(log, "update already known"; "updated_at" => %update.updated_at);
        return Ok(update);
    }
    match tokio::time::timeout(state.publish_timeout, state.backend.publish(update.clone())).await {
        Ok(Ok(())) => {
            debug!(log, "update stored"; "updated_at" => %update.updated_at);
            Ok(update)
        }
        Ok(Err(err)) => {
            warn!(log, "publish failed"; "error" => %err);
            Err(ApiError::Unavailable(
                "The update could not be stored; retry later.",
            ))
        }
        Err(_) => {
            warn!(log, "publish timed out"; "timeout_ms" => state.publish_timeout.as_millis());
            Err(ApiError::Unavailable(
                "The update could not be stored in time; retry later.",
            ))
        }
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
