//! The in-process backend: one instance, no broker. The hub itself is the store.

use futures_util::future::{self, BoxFuture, FutureExt};

use super::{BackendError, Readiness, Store, Stored};
use crate::domain::Update;

pub struct MemoryBackend;

impl Store for MemoryBackend {
    fn store(&self, update: Update) -> BoxFuture<'_, Result<Option<Stored>, BackendError>> {
        future::ready(Ok(Some(Stored::now(update)))).boxed()
    }

    fn readiness(&self) -> Readiness {
        Readiness::always()
    }

    fn describe(&self) -> String {
        "in-process".to_owned()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        future::ready(()).boxed()
    }
}
