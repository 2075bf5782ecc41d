//! `GET /metricsz`: the Prometheus metrics of this instance, in the text format.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use warp::{Filter, Reply};

use super::{State, with_state};
use crate::metrics::Metrics;

pub fn route(
    state: Arc<State>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    warp::path!("metricsz")
        .and(warp::get())
        .and(with_state(state))
        .map(|state: Arc<State>| {
            let text = state.metrics.render(
                state.admission.open_streams(),
                state.hub.len(),
                state.backend.readiness().is_ready(),
            );
            let mut response = text.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(Metrics::content_type()),
            );
            response
        })
}
