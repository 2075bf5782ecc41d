//! The in-process backend: one instance, no broker. The hub itself is the store.

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::{self, BoxFuture, FutureExt};

use super::{Backend, BackendError};
use crate::domain::Update;
use crate::hub::Hub;

pub struct MemoryBackend {
    hub: Arc<Hub>,
}

impl MemoryBackend {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

impl Backend for MemoryBackend {
    fn publish(&self, update: Update) -> BoxFuture<'_, Result<(), BackendError>> {
        self.hub.apply(&update, SystemTime::now());
        future::ready(Ok(())).boxed()
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn ready(&self) -> BoxFuture<'_, ()> {
        future::ready(()).boxed()
    }

    fn describe(&self) -> String {
        "in-process".to_owned()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        future::ready(()).boxed()
    }
}
