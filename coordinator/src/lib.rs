//! # expertmesh-coordinator
//!
//! The coordinators keep the cluster's membership and decide which expert worker holds
//! which expert. They are a raft group (raft-rs, 1, 3 or 5 replicas): every change is a
//! [`machine::Command`] committed through the log and applied by every replica to the same
//! [`machine::Machine`]; the log, hard state and snapshots live on disk
//! ([`storage::DiskStorage`]). Workers `Register` with any replica (writes are forwarded to
//! the leader), heartbeat every replica, and watch the state. The leader proposes what the
//! sans-I/O [`placement::controller`] decides: the failure detector's `MarkDead`, and
//! placements planned with [`placement::planner::plan`] (a pure function): prepared, loaded
//! by the workers, then committed as a new epoch; a dead worker's experts without another
//! copy are re-placed at once, in the command that marks it dead.

pub mod client;
pub mod machine;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod replica;
pub mod service;
pub mod state;
pub mod storage;
mod transport;

use std::future::Future;

pub use client::{Beat, ClientError, CoordinatorClient, Membership, Registration};
pub use machine::Settings;
pub use node::NodeConfig;
pub use replica::{RaftStatus, ReplicaError, Timing};
pub use service::Coordinator;
pub use state::{ClusterView, Member, Placement, Role};

/// Coordinator settings (TOML: `deploy/coordinator.toml`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address to listen on; port 0 picks a free one.
    pub listen: String,
    /// The model the cluster serves (directory or `synthetic:bench`): the coordinator
    /// reads its expert count and fingerprint, not its weights.
    pub model: String,
    /// Where the OpenAI-compatible HTTP API listens; none runs no gateway here.
    pub http: Option<String>,
    /// When any is set (here or in `api_key_file`), HTTP requests must carry
    /// `Authorization: Bearer <key>` with one of these keys.
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line, read again when it changes.
    pub api_key_file: Option<String>,
    /// The key `/metrics` on the HTTP API's port requires (with API keys and no metrics key,
    /// metrics are served only on `metrics`' own address).
    pub metrics_key: Option<String>,
    /// Let the HTTP API fetch `http://` image URLs (off: `data:` URLs only).
    pub allow_image_urls: bool,
    /// A Jinja chat template the HTTP API uses instead of the model's.
    pub chat_template: Option<String>,
    /// This coordinator's raft id (1, 2, ...).
    pub id: u64,
    /// The initial coordinators as `ID=HOST:PORT`, this one included; empty means a
    /// single coordinator at `listen`.
    pub peers: Vec<String>,
    /// Where the raft log, hard state and snapshots live.
    pub data_dir: String,
    /// Start as a new coordinator that an existing group adds (`admin add-coordinator`).
    pub join: bool,
    /// Workers must present this token to register (a new cluster fixes it).
    pub join_token: Option<String>,
    /// A worker silent this long is declared dead (a new cluster fixes it).
    pub lease_ms: u64,
    /// Raft's clock tick; elections time out after 10 to 20 ticks.
    pub tick_ms: u64,
    /// A snapshot is taken every this many applied entries.
    pub compact_every: u64,
    /// Copies of every expert (a new cluster fixes it).
    pub min_replicas: usize,
    /// Extra copies for the hottest experts (a new cluster fixes it).
    pub redundancy: usize,
    /// Re-plan on its own when max worker load exceeds the mean by this many percent.
    pub rebalance_percent: u32,
    /// Serve Prometheus text at `/metrics` on this address (the raft replica and the
    /// cluster state; the gateway's own `/metrics` is on `http`).
    pub metrics: Option<String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7000".into(),
            model: "tests/fixtures/tiny-maverick".into(),
            http: None,
            api_keys: Vec::new(),
            api_key_file: None,
            metrics_key: None,
            allow_image_urls: false,
            chat_template: None,
            id: 1,
            peers: Vec::new(),
            data_dir: "expertmesh-data/coordinator-1".into(),
            join: false,
            join_token: None,
            lease_ms: 5000,
            tick_ms: 100,
            compact_every: 1024,
            min_replicas: 1,
            redundancy: 0,
            rebalance_percent: 25,
            metrics: None,
        }
    }
}

/// A random-enough u64 (never 0) for request ids: time, pid and a counter, mixed.
pub(crate) fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).max(1)
}

/// A coordinator setting that cannot be used: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: `{field}` {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn config_error(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

/// Parses `ID=HOST:PORT` peer entries.
pub fn parse_peers(
    peers: &[String],
) -> Result<std::collections::BTreeMap<u64, String>, ConfigError> {
    let bad = |reason: String| config_error("peers", reason);
    let mut map = std::collections::BTreeMap::new();
    for p in peers {
        let (id, address) = p
            .split_once('=')
            .ok_or_else(|| bad(format!("{p:?} is not ID=HOST:PORT")))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| bad(format!("{p:?}: the id is not a number")))?;
        if id == 0 || address.trim().is_empty() {
            return Err(bad(format!("{p:?}: ids start at 1 and need an address")));
        }
        if map.insert(id, address.trim().to_owned()).is_some() {
            return Err(bad(format!("id {id} appears twice")));
        }
    }
    Ok(map)
}

/// The shortest join token a coordinator takes: 128 bits written as hex.
pub const JOIN_TOKEN_MIN_CHARS: usize = 32;

impl CoordinatorConfig {
    /// The raft node settings, given the model's identity.
    pub fn node(
        &self,
        model_fingerprint: String,
        num_experts: usize,
    ) -> Result<NodeConfig, ConfigError> {
        let mut peers = parse_peers(&self.peers)?;
        if peers.is_empty() {
            peers.insert(self.id, self.listen.clone());
        }
        if !peers.contains_key(&self.id) && !self.join {
            return Err(config_error(
                "id",
                format!(
                    "{} is not among the peers {:?}",
                    self.id,
                    peers.keys().collect::<Vec<_>>()
                ),
            ));
        }
        if let Some(t) = &self.join_token {
            if t.len() < JOIN_TOKEN_MIN_CHARS {
                return Err(config_error(
                    "join_token",
                    format!(
                        "must be at least {JOIN_TOKEN_MIN_CHARS} characters (128 bits as hex); \
                         `expertmesh certs token` prints a new one"
                    ),
                ));
            }
        }
        for (field, value) in [("tick_ms", self.tick_ms), ("lease_ms", self.lease_ms)] {
            if value == 0 {
                return Err(config_error(field, "must be positive"));
            }
        }
        Ok(NodeConfig {
            id: self.id,
            peers,
            data_dir: self.data_dir.clone().into(),
            join: self.join,
            tick: std::time::Duration::from_millis(self.tick_ms),
            timing: Timing {
                compact_every: self.compact_every,
                ..Timing::default()
            },
            model_fingerprint,
            num_experts,
            settings: Settings {
                lease_ms: self.lease_ms,
                join_token: self.join_token.clone(),
                min_replicas: self.min_replicas.max(1),
                redundancy: self.redundancy,
                rebalance_percent: self.rebalance_percent,
            },
        })
    }
}

/// How long a coordinator told to stop lets its calls finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves `coordinator` on `listener` until `shutdown` completes, and then at most
/// [`SHUTDOWN_GRACE`] longer: a graceful stop waits for every call to end, and workers'
/// state watches never do (they move to another coordinator).
pub async fn serve(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (_health, health) = expertmesh_proto::health::service();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = expertmesh_proto::server_builder()
        .add_service(health)
        .add_service(coordinator.into_service())
        .serve_with_incoming_shutdown(expertmesh_proto::incoming(listener), async {
            let _ = stopped.await;
        });
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => return served,
        () = shutdown => {}
    }
    let _ = stop.send(());
    tokio::time::timeout(SHUTDOWN_GRACE, server)
        .await
        .unwrap_or(Ok(()))
}
