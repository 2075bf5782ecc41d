//! The accept loop: one task per connection, HTTP/1.1 or HTTP/2 (h2c with prior knowledge)
//! chosen per connection by hyper-util's auto builder.
//!
//! When `stop` fires the listener closes and every connection is asked to finish gracefully:
//! HTTP/1.1 closes after the response in progress, HTTP/2 sends GOAWAY and lets open streams
//! end. The returned future resolves once the last connection is gone.

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use slog::{Logger, debug, error};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Slow-loris guard: a client must finish sending request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error such as running out of file descriptors, instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

pub async fn serve<S, B>(listener: TcpListener, service: S, stop: CancellationToken, log: Logger)
where
    S: hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = Response<B>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        let (socket, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    error!(log, "accept failed"; "error" => %err);
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // Events are small and latency matters more than packet count.
        let _ = socket.set_nodelay(true);
        let connection = builder
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        let connection = graceful.watch(connection);
        let log = log.clone();
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(log, "connection ended with an error"; "peer" => %peer, "error" => %err);
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
