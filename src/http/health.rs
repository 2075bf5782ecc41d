//! Liveness and readiness probes, under their names and the aliases existing deployments use:
//! `/health` (v3) and the Flagsmith Helm chart's `/health/liveness/` and `/health/readiness/`.
//! Every answer counts as a `healthcheck` write, and a readiness 503 as a `healthcheck` error.

use std::sync::Arc;

use http::StatusCode;
use warp::{Filter, Reply};

use super::{State, with_state};

pub fn routes(
    state: Arc<State>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let livez = warp::path!("livez")
        .or(warp::path!("health" / "liveness"))
        .unify();
    let readyz = warp::path!("readyz")
        .or(warp::path!("health" / "readiness"))
        .unify()
        .or(warp::path!("health"))
        .unify();
    let live = livez
        .and(warp::get())
        .and(with_state(state.clone()))
        .map(|state: Arc<State>| {
            state.metrics.writes.healthcheck.inc();
            status(StatusCode::OK, "ok")
        });
    let ready = readyz
        .and(warp::get())
        .and(with_state(state))
        .map(|state: Arc<State>| readiness(&state));
    live.or(ready).unify()
}

/// Ready while the backend is connected and caught up, and the service is not draining.
/// Reads local state only: probes never cause backend traffic.
fn readiness(state: &State) -> warp::reply::Response {
    state.metrics.writes.healthcheck.inc();
    let unready = if state.draining.is_cancelled() {
        "shutting down"
    } else if state.backend.readiness().is_ready() {
        return status(StatusCode::OK, "ok");
    } else {
        "backend unavailable"
    };
    state.metrics.errors.healthcheck.inc();
    status(StatusCode::SERVICE_UNAVAILABLE, unready)
}

fn status(code: StatusCode, status: &str) -> warp::reply::Response {
    warp::reply::with_status(
        warp::reply::json(&serde_json::json!({ "status": status })),
        code,
    )
    .into_response()
}
