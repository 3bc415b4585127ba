//! The HTTP ports' connections (the API of every gateway and the front door), with the
//! bounds a public port needs against slow or greedy clients: connections at most
//! ([`CONNECTIONS_MAX`]; more are closed at once), request head size
//! ([`HEAD_BYTES_MAX`]: 431 beyond it), the time a request's head may take to arrive
//! ([`HEAD_TIMEOUT`]: a slowloris client is cut off), HTTP/2 streams per connection
//! ([`STREAMS_PER_CONNECTION`]) and pings that drop a dead HTTP/2 peer. Request bodies are
//! bounded in size and time where they are read (`routes`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Open connections at most per port.
pub const CONNECTIONS_MAX: usize = 4096;
/// Bytes of a request's start line and headers at most.
pub const HEAD_BYTES_MAX: usize = 64 << 10;
/// How long a request's head may take to arrive once a connection is open or a request
/// ended (also how long an idle kept-alive HTTP/1 connection stays open).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HTTP/2 streams per connection.
pub const STREAMS_PER_CONNECTION: u32 = 256;
/// How long in-flight requests may run on after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` completes, then lets in-flight requests
/// finish (for [`DRAIN_TIMEOUT`] at most).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(HEAD_BYTES_MAX)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(STREAMS_PER_CONNECTION)
        .max_header_list_size(HEAD_BYTES_MAX as u32)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Over the limit: closed at once rather than queued.
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // A client that opens a connection and says nothing is closed (the protocol is
            // told from the first bytes, before any of hyper's timers run).
            let mut first = [0u8; 1];
            if !matches!(
                tokio::time::timeout(HEAD_TIMEOUT, stream.peek(&mut first)).await,
                Ok(Ok(1..))
            ) {
                return;
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(conn.into_owned()).await;
            drop(permit);
        });
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    Ok(())
}
