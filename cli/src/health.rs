//! `expertmesh health`: checks that nodes answer, for a container's `HEALTHCHECK` and
//! Kubernetes exec probes (the binary is the only program in the image: no shell, no curl).
//! Each target is `grpc://ROLE@HOST:PORT` (the standard `grpc.health.v1` check every role
//! serves on its gRPC port; ROLE is the role the server's certificate must name under TLS)
//! or `http://HOST:PORT/PATH` (a gateway's `/health`: a 200). Exits 0 when every target
//! is healthy, 1 naming the first that is not.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use expertmesh_proto::tls::PeerRole;

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// What to check: `grpc://ROLE@HOST:PORT` or `http://HOST:PORT/PATH`. Also
    /// EXPERTMESH_HEALTH, space-separated (what the image's HEALTHCHECK runs).
    #[arg(env = "EXPERTMESH_HEALTH", value_delimiter = ' ', required = true)]
    targets: Vec<String>,
    /// Deadline of each check.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

/// One thing to check.
#[derive(Debug, PartialEq)]
enum Target {
    Grpc { role: PeerRole, address: String },
    Http { address: String, path: String },
}

impl std::str::FromStr for Target {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("grpc://") {
            let Some((role, address)) = rest.split_once('@') else {
                bail!("{s}: name the server's role, grpc://ROLE@HOST:PORT");
            };
            let role = role.parse().map_err(|e| anyhow::anyhow!("{s}: {e}"))?;
            return Ok(Target::Grpc {
                role,
                address: address.to_owned(),
            });
        }
        if let Some(rest) = s.strip_prefix("http://") {
            let (address, path) = rest.split_once('/').unwrap_or((rest, ""));
            return Ok(Target::Http {
                address: address.to_owned(),
                path: format!("/{path}"),
            });
        }
        bail!("{s}: a target is grpc://ROLE@HOST:PORT or http://HOST:PORT/PATH")
    }
}

pub fn run(args: HealthArgs) -> Result<()> {
    let deadline = Duration::from_millis(args.timeout_ms);
    let targets = args
        .targets
        .iter()
        .filter(|t| !t.is_empty())
        .map(|t| t.parse())
        .collect::<Result<Vec<Target>>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    for target in targets {
        match target {
            Target::Grpc { role, address } => {
                runtime.block_on(expertmesh_proto::health::check(&address, role, deadline))?
            }
            Target::Http { address, path } => http_ok(&address, &path, deadline)?,
        }
    }
    Ok(())
}

/// `GET path` on `address` answers 200 within `deadline`.
fn http_ok(address: &str, path: &str, deadline: Duration) -> Result<()> {
    let socket = std::net::ToSocketAddrs::to_socket_addrs(address)
        .with_context(|| format!("resolving {address}"))?
        .next()
        .with_context(|| format!("{address} has no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&socket, deadline)
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(deadline))?;
    stream.set_write_timeout(Some(deadline))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    // The status line is all that is read: a bounded read, whatever the server sends.
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .with_context(|| format!("reading {address}{path}'s answer"))?;
    let status = String::from_utf8_lossy(&head[9..12]).into_owned();
    if status != "200" {
        bail!("{address}{path}: HTTP {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let cases = [
            (
                "grpc://coordinator@127.0.0.1:7000",
                Some(Target::Grpc {
                    role: PeerRole::Coordinator,
                    address: "127.0.0.1:7000".into(),
                }),
            ),
            (
                "http://localhost:8000/health",
                Some(Target::Http {
                    address: "localhost:8000".into(),
                    path: "/health".into(),
                }),
            ),
            (
                "http://localhost:8000",
                Some(Target::Http {
                    address: "localhost:8000".into(),
                    path: "/".into(),
                }),
            ),
            ("grpc://127.0.0.1:7000", None),
            ("grpc://nobody@127.0.0.1:7000", None),
            ("tcp://127.0.0.1:7000", None),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Target>().ok(), want, "{text}");
        }
    }
}
