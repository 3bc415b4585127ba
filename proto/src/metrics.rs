//! Every role's `/metrics` endpoint (`--metrics ADDR`): Prometheus text over HTTP/1.1, from a
//! render function the role gives. Deliberately small: one request per connection, the
//! request head bounded in size and time, `GET /metrics` answered and anything else 404.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read.
const HEAD_MAX_BYTES: usize = 8 << 10;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections answered at once at most (more wait in the listen queue).
const CONNECTIONS_MAX: usize = 32;

/// Serves `render()`'s text at `/metrics` on `listener` until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let accepting = async {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let _ = answer(stream, &*render).await;
                drop(permit);
            });
        }
    };
    tokio::select! {
        () = accepting => {}
        () = shutdown => {}
    }
}

/// Reads one request head and answers it.
async fn answer(
    mut stream: TcpStream,
    render: &(dyn Fn() -> String + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < HEAD_MAX_BYTES {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    };
    if tokio::time::timeout(HEAD_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, body) = match (method, path) {
        (Some(b"GET"), Some(p)) if p == b"/metrics" || p.starts_with(b"/metrics?") => {
            ("200 OK", render() + &crate::tls::render_metrics())
        }
        _ => (
            "404 Not Found",
            "only GET /metrics is served here\n".to_owned(),
        ),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// Writes one metric family: `# HELP`, `# TYPE` (counter when the name ends in `_total`,
/// gauge otherwise) and one sample per (labels, value).
pub fn write_family(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    use std::fmt::Write;
    let kind = if name.ends_with("_total") {
        "counter"
    } else {
        "gauge"
    };
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(address: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(address).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn metrics_are_served_and_nothing_else() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(|| {
            let mut out = String::new();
            write_family(&mut out, "x_total", "X.", &[("a=\"1\"".into(), 2.0)]);
            out
        });
        tokio::spawn(serve_metrics(listener, render, std::future::pending()));
        let ok = get(address, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(
            ok.ends_with("# HELP x_total X.\n# TYPE x_total counter\nx_total{a=\"1\"} 2\n"),
            "{ok}"
        );
        let other = get(address, "POST /admin HTTP/1.1\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        // A head that never ends is cut off at the bound, not read forever.
        let junk = "A".repeat(3 * HEAD_MAX_BYTES);
        let cut = get(address, &junk).await;
        assert!(cut.starts_with("HTTP/1.1 404"), "{cut}");
    }
}
