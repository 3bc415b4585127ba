//! The standard gRPC health service (`grpc.health.v1.Health`, from tonic-health) that every
//! role serves on its gRPC port, and the check `expertmesh health` runs against it (a
//! container's `HEALTHCHECK`, a Kubernetes exec probe). A server reports SERVING for the
//! whole server (the empty service name) from the moment it accepts connections; over TLS
//! the check presents this process's certificate and verifies the server's role, like every
//! other call between nodes.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::tls::{self, PeerRole};

pub use tonic_health::server::HealthReporter;

/// The health service to add to a role's server, SERVING for the whole server, and its
/// reporter (keep it to say NOT_SERVING while shutting down).
pub fn service() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

/// Says NOT_SERVING for the whole server: probes fail from now on (a draining role).
pub async fn not_serving(reporter: &HealthReporter) {
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("{address}: {status}")]
    NotServing { address: String, status: String },
}

/// Asks the server at `address` (a node of role `peer`) whether it is serving, within
/// `deadline`.
pub async fn check(address: &str, peer: PeerRole, deadline: Duration) -> Result<(), HealthError> {
    let unreachable = |reason: String| HealthError::Unreachable {
        address: address.to_owned(),
        reason,
    };
    let endpoint = crate::endpoint(address, deadline)
        .map_err(|e| unreachable(e.to_string()))?
        .timeout(deadline);
    let channel = tokio::time::timeout(deadline, tls::connect_channel(endpoint, address, peer))
        .await
        .map_err(|_| unreachable("no connection within the deadline".into()))?
        .map_err(|e| unreachable(format!("{e}: {}", source_chain(&e))))?;
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(deadline);
    let reply = HealthClient::new(channel)
        .check(request)
        .await
        .map_err(|s| unreachable(s.to_string()))?
        .into_inner();
    match reply.status() {
        ServingStatus::Serving => Ok(()),
        other => Err(HealthError::NotServing {
            address: address.to_owned(),
            status: other.as_str_name().to_owned(),
        }),
    }
}

/// The causes under a transport error (tonic's own message is only "transport error").
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push(c.to_string());
        cause = c.source();
    }
    out.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_with_the_service_is_serving_until_told_otherwise() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (reporter, service) = service();
        tokio::spawn(
            crate::server_builder()
                .add_service(service)
                .serve_with_incoming(crate::incoming(listener)),
        );
        let deadline = Duration::from_secs(5);
        check(&address, PeerRole::Coordinator, deadline)
            .await
            .unwrap();
        not_serving(&reporter).await;
        let refused = check(&address, PeerRole::Coordinator, deadline).await;
        assert!(
            matches!(refused, Err(HealthError::NotServing { ref status, .. }) if status == "NOT_SERVING"),
            "{refused:?}"
        );
        // Nothing listening: unreachable, within the deadline.
        drop(reporter);
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nobody = closed.local_addr().unwrap().to_string();
        drop(closed);
        let unreachable = check(&nobody, PeerRole::Coordinator, deadline).await;
        assert!(matches!(unreachable, Err(HealthError::Unreachable { .. })));
    }
}
