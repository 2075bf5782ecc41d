//! Shared test helpers, one concern to a file: the service in this process (`service`), a real
//! `nats-server` (`nats`), child processes and ports (`process`), a raw HTTP/1.1 SSE client
//! (`sse`), `/metricsz` and promtool (`metrics`), a TCP proxy for faults (`proxy`), and more
//! below. Tests name them through this module.
#![allow(dead_code)] // Each test binary uses a different part of this module.

pub mod daemon;
pub mod frames;
pub mod http;
pub mod redis;
pub mod scenarios;

mod metrics;
mod nats;
mod process;
mod proxy;
mod service;
mod sse;

// Each test binary uses a different part of these.
#[allow(unused_imports)]
pub use {metrics::*, nats::*, process::*, proxy::*, service::*, sse::*};
