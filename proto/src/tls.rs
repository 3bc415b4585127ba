//! Mutual TLS between nodes (rustls with ring; no OpenSSL). A process given a TLS directory
//! (`--tls-dir DIR`: `ca.pem`, the cluster's CA; `node.pem` and `node.key`, this node's
//! certificate and key) serves every port (gRPC and the framed data path) over TLS only,
//! requires a certificate from the cluster's CA of every client, and presents its own to
//! every server it calls.
//!
//! A certificate names its node's role with a DNS name `<role>.role.expertmesh`
//! ([`PeerRole::dns_name`]; `expertmesh certs issue` writes it). A client checks that the
//! server it reached holds the role it meant to call (the name it verifies is the role's,
//! not the address's: a cluster's addresses change, its roles do not); a server checks the
//! client's role per call ([`authorize`]): only coordinators may send raft messages, only
//! attention workers (and admins) dispatch, and so on.
//!
//! The files are read again when they change (checked at most every [`RELOAD_EVERY`]), so
//! certificates are renewed without a restart: new connections use the new ones.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How often the files are looked at for changes, at most.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;

/// The role a node's certificate names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Coordinator,
    ExpertWorker,
    AttentionWorker,
    /// An operator's tools: `admin`, `generate --attention-worker`, `loadgen experts`.
    Admin,
}

impl PeerRole {
    pub const ALL: [PeerRole; 4] = [
        Self::Coordinator,
        Self::ExpertWorker,
        Self::AttentionWorker,
        Self::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Coordinator => "coordinator",
            Self::ExpertWorker => "expert-worker",
            Self::AttentionWorker => "attention-worker",
            Self::Admin => "admin",
        }
    }

    /// The DNS name in the certificates of this role.
    pub fn dns_name(self) -> String {
        format!("{}.role.expertmesh", self.name())
    }
}

impl std::str::FromStr for PeerRole {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?} (coordinator, expert-worker, attention-worker, admin)")
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(String),
}

/// The configurations made from the files, and when the files were last changed.
#[derive(Clone)]
struct Loaded {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    stamp: Vec<Option<SystemTime>>,
    /// When this node's certificate and the CA's expire (Unix seconds).
    node_expiry: i64,
    ca_expiry: i64,
}

struct State {
    dir: PathBuf,
    /// Where the certificate this process presents as a client is, when not in `dir`
    /// ([`install_split`]).
    client_dir: Option<PathBuf>,
    loaded: RwLock<Loaded>,
    checked: Mutex<Instant>,
}

static STATE: OnceLock<State> = OnceLock::new();

fn files(dir: &Path) -> [PathBuf; 3] {
    [
        dir.join("ca.pem"),
        dir.join("node.pem"),
        dir.join("node.key"),
    ]
}

fn stamp(dir: &Path) -> Vec<Option<SystemTime>> {
    files(dir)
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Every certificate of a PEM file.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in it"));
    }
    Ok(certs)
}

/// The CA certificates `cas`, read from `path`, as a root store.
fn roots(
    path: &Path,
    cas: &[CertificateDer<'static>],
) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).map_err(|e| file_error(path, e))?;
    }
    Ok(Arc::new(roots))
}

/// The certificate chain and key of `cert` and `key`.
fn identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = read_certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    Ok((certs, key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // ring: it builds with a C compiler alone. It has no post-quantum key exchange (rustls
    // deprecates it for that); the threat model in the README says so.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration trusting the CA certificates of `ca`, presenting `identity`
/// (certificate and key files) when given: what [`connect_with`] takes. For tools and
/// tests that speak to a cluster with other certificates than this process's.
pub fn client_config(
    ca: &Path,
    identity_files: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let identity = identity_files
        .map(|(cert, key)| identity(cert, key))
        .transpose()?;
    client_from(roots(ca, &read_certificates(ca)?)?, identity)
}

/// A client configuration over `roots`, presenting `identity` when given.
fn client_from(
    roots: Arc<rustls::RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(Arc::new(match identity {
        Some((certs, key)) => builder.with_client_auth_cert(certs, key)?,
        None => builder.with_no_client_auth(),
    }))
}

/// The server and client configurations of the files in `dir`.
fn load(dir: &Path) -> Result<Loaded, TlsError> {
    let [ca_path, cert_path, key_path] = files(dir);
    let stamp = stamp(dir);
    let ca_certs = read_certificates(&ca_path)?;
    let roots = roots(&ca_path, &ca_certs)?;
    let (certs, key) = identity(&cert_path, &key_path)?;
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())?;
    let node_expiry = not_after(&certs[0]).map_err(|e| file_error(&cert_path, e))?;
    let ca_expiry = ca_certs
        .iter()
        .map(not_after)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(&ca_path, e))?
        .into_iter()
        .min()
        .unwrap_or(i64::MAX);
    Ok(Loaded {
        server: Arc::new(server),
        client: client_from(roots, Some((certs, key)))?,
        stamp,
        node_expiry,
        ca_expiry,
    })
}

/// When `certificate` expires, in Unix seconds.
pub fn not_after(certificate: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(certificate)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(cert.validity().not_after.timestamp())
}

/// The TLS metrics of this process (none without TLS): when its certificate and its CA
/// expire, for an alert well before they do.
pub fn render_metrics() -> String {
    let Some(loaded) = current() else {
        return String::new();
    };
    let mut out = String::new();
    crate::metrics::write_family(
        &mut out,
        "expertmesh_tls_certificate_expiry_seconds",
        "When this node's TLS certificate (cert=\"node\") and its CA (cert=\"ca\") expire, in Unix seconds.",
        &[
            ("cert=\"node\"".to_owned(), loaded.node_expiry as f64),
            ("cert=\"ca\"".to_owned(), loaded.ca_expiry as f64),
        ],
    );
    out
}

/// Turns TLS on for this process with the files of `dir` (checked now: a missing or bad
/// file is an error here, not at the first connection). Once per process.
pub fn install(dir: &Path) -> Result<(), TlsError> {
    install_state(dir, None)
}

/// [`install`] for a process that runs both ends of one link (`expertmesh bench dispatch`:
/// an expert worker's server and an operator's dispatching clients): its servers present
/// the certificate of `server_dir` and trust that directory's CA, its clients present the
/// certificate of `client_dir` and trust that directory's CA. Both are read again when
/// they change, as [`install`]'s are.
pub fn install_split(server_dir: &Path, client_dir: &Path) -> Result<(), TlsError> {
    install_state(server_dir, Some(client_dir))
}

fn install_state(dir: &Path, client_dir: Option<&Path>) -> Result<(), TlsError> {
    let loaded = load_split(dir, client_dir)?;
    let _ = STATE.set(State {
        dir: dir.to_owned(),
        client_dir: client_dir.map(Path::to_owned),
        loaded: RwLock::new(loaded),
        checked: Mutex::new(Instant::now()),
    });
    Ok(())
}

/// [`load`] of `dir`, with the client configuration of `client_dir` when given.
fn load_split(dir: &Path, client_dir: Option<&Path>) -> Result<Loaded, TlsError> {
    let mut loaded = load(dir)?;
    if let Some(other) = client_dir {
        let client = load(other)?;
        loaded.client = client.client;
        loaded.stamp.extend(client.stamp);
    }
    Ok(loaded)
}

/// When the files of `dir` (and of `client_dir`) last changed.
fn stamps(dir: &Path, client_dir: Option<&Path>) -> Vec<Option<SystemTime>> {
    let mut all = stamp(dir);
    if let Some(other) = client_dir {
        all.extend(stamp(other));
    }
    all
}

/// Whether this process speaks TLS.
pub fn enabled() -> bool {
    STATE.get().is_some()
}

/// The directory of this process's TLS files, when it has one.
pub fn dir() -> Option<PathBuf> {
    STATE.get().map(|s| s.dir.clone())
}

/// The current configurations, read again first when the files changed (a change that does
/// not load keeps the ones before, with a warning).
fn current() -> Option<Loaded> {
    let state = STATE.get()?;
    let due = {
        let mut checked = state.checked.lock().expect("tls lock");
        let due = checked.elapsed() >= RELOAD_EVERY;
        if due {
            *checked = Instant::now();
        }
        due
    };
    let client_dir = state.client_dir.as_deref();
    if due && stamps(&state.dir, client_dir) != state.loaded.read().expect("tls lock").stamp {
        match load_split(&state.dir, client_dir) {
            Ok(loaded) => {
                tracing::info!(dir = %state.dir.display(), "TLS certificates read again");
                *state.loaded.write().expect("tls lock") = loaded;
            }
            Err(e) => {
                tracing::warn!(
                    "TLS certificates changed but do not load ({e}); keeping the ones before"
                );
                // Do not try again until they change again.
                state.loaded.write().expect("tls lock").stamp = stamps(&state.dir, client_dir);
            }
        }
    }
    Some(state.loaded.read().expect("tls lock").clone())
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub address: Option<SocketAddr>,
    /// The client's certificate chain (empty without TLS).
    pub certificates: Arc<Vec<CertificateDer<'static>>>,
}

/// A byte stream a connection runs over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An accepted connection, plain or TLS, whose first bytes may have been read to tell
/// protocols apart ([`Conn::sniff`]) and are read again by whoever serves it.
pub struct Conn {
    io: Box<dyn Io>,
    prefix: Vec<u8>,
    replayed: usize,
    peer: PeerInfo,
}

impl Conn {
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Reads until the connection's first bytes either are `magic` (`Some(true)`) or
    /// cannot be (`Some(false)`); `None` when it closes or shows too little within
    /// `patience`. The bytes read are served again to whoever reads the connection.
    pub async fn sniff(&mut self, magic: &[u8], patience: Duration) -> Option<bool> {
        let until = tokio::time::Instant::now() + patience;
        loop {
            // What has been read may already tell (an earlier sniff for another magic).
            let seen = self.prefix.len().min(magic.len());
            if self.prefix[..seen] != magic[..seen] {
                return Some(false);
            }
            if seen == magic.len() {
                return Some(true);
            }
            let mut byte = [0u8; 64];
            let want = magic.len() - seen;
            let n = tokio::time::timeout_at(until, self.io.read(&mut byte[..want]))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            self.prefix.extend_from_slice(&byte[..n]);
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.prefix.len() {
            let rest = &this.prefix[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

/// Takes an accepted TCP connection: Nagle off, and the TLS handshake (a client
/// certificate from the cluster's CA required) when TLS is on.
pub async fn accept(stream: TcpStream) -> std::io::Result<Conn> {
    stream.set_nodelay(true)?;
    let address = stream.peer_addr().ok();
    let Some(loaded) = current() else {
        return Ok(Conn {
            io: Box::new(stream),
            prefix: Vec::new(),
            replayed: 0,
            peer: PeerInfo {
                address,
                certificates: Arc::default(),
            },
        });
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(loaded.server);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))??;
    let certificates = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    Ok(Conn {
        io: Box::new(tls),
        prefix: Vec::new(),
        replayed: 0,
        peer: PeerInfo {
            address,
            certificates: Arc::new(certificates),
        },
    })
}

/// The connections of `listener`, each [`accept`]ed (handshakes run concurrently, so a
/// slow or silent client holds up no other); for `tonic`'s `serve_with_incoming`.
/// Connections that fail their handshake are dropped. Accepting stops when the stream is
/// dropped.
pub fn incoming(
    listener: TcpListener,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let Ok((stream, _)) = accepted else {
                // Out of descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match accept(stream).await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(e) => tracing::debug!("connection refused: {e}"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Connects to `address`, a node of role `peer`: plain TCP, or TLS checking that the
/// server's certificate is from the cluster's CA and names role `peer`.
pub async fn connect(address: &str, peer: PeerRole) -> std::io::Result<Box<dyn Io>> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    match current() {
        None => Ok(Box::new(stream)),
        Some(loaded) => handshake(loaded.client, stream, peer).await,
    }
}

/// Connects to `address`, a node of role `peer`, over TLS with `config`.
pub async fn connect_with(
    config: Arc<rustls::ClientConfig>,
    address: &str,
    peer: PeerRole,
) -> std::io::Result<Box<dyn Io>> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    handshake(config, stream, peer).await
}

async fn handshake(
    config: Arc<rustls::ClientConfig>,
    stream: TcpStream,
    peer: PeerRole,
) -> std::io::Result<Box<dyn Io>> {
    let name = ServerName::try_from(peer.dns_name())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await?;
    Ok(Box::new(tls))
}

/// Dials `address` for a channel: with `config`, or this process's TLS (or none).
async fn dial(
    address: String,
    peer: PeerRole,
    config: Option<Arc<rustls::ClientConfig>>,
) -> std::io::Result<hyper_util::rt::TokioIo<Box<dyn Io>>> {
    let io = match config {
        Some(config) => connect_with(config, &address, peer).await?,
        None => connect(&address, peer).await?,
    };
    Ok(hyper_util::rt::TokioIo::new(io))
}

/// A lazily connecting channel to `address`, a node of role `peer`, with `endpoint`'s
/// settings: over [`connect`] when TLS is on.
pub fn channel(
    endpoint: tonic::transport::Endpoint,
    address: &str,
    peer: PeerRole,
) -> tonic::transport::Channel {
    if !enabled() {
        return endpoint.connect_lazy();
    }
    let address = address.to_owned();
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
        dial(address.clone(), peer, None)
    }))
}

/// [`channel`], connected now.
pub async fn connect_channel(
    endpoint: tonic::transport::Endpoint,
    address: &str,
    peer: PeerRole,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    if !enabled() {
        return endpoint.connect().await;
    }
    let address = address.to_owned();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            dial(address.clone(), peer, None)
        }))
        .await
}

/// A channel to `address`, a node of role `peer`, over TLS with `config` (not this
/// process's certificates), connected now.
pub async fn channel_with(
    config: Arc<rustls::ClientConfig>,
    endpoint: tonic::transport::Endpoint,
    address: &str,
    peer: PeerRole,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let address = address.to_owned();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            dial(address.clone(), peer, Some(config.clone()))
        }))
        .await
}

/// Whether the caller of `request` may make it: any caller without TLS; with TLS, one whose
/// certificate names one of `allowed` (`Unauthenticated` without a certificate,
/// `PermissionDenied` with another role's).
pub fn authorize<T>(
    request: &tonic::Request<T>,
    allowed: &[PeerRole],
) -> Result<(), tonic::Status> {
    if !enabled() {
        return Ok(());
    }
    let peer = request
        .extensions()
        .get::<PeerInfo>()
        .filter(|p| !p.certificates.is_empty())
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))?;
    if permits(peer, allowed) {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied(format!(
            "this call is for {} certificates",
            allowed
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// Whether `peer` may do what `allowed` may: always without TLS; with TLS, when its
/// certificate names one of them.
pub fn permits(peer: &PeerInfo, allowed: &[PeerRole]) -> bool {
    !enabled()
        || peer
            .certificates
            .first()
            .is_some_and(|leaf| role_of(leaf, allowed).is_some())
}

/// The first of `roles` that `certificate` names.
pub fn role_of(certificate: &CertificateDer<'_>, roles: &[PeerRole]) -> Option<PeerRole> {
    let cert = webpki::EndEntityCert::try_from(certificate).ok()?;
    roles.iter().copied().find(|r| {
        ServerName::try_from(r.dns_name())
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    })
}

/// Every role.
pub const ANY: &[PeerRole] = &PeerRole::ALL;
/// Who may send dispatch batches to an expert worker: attention workers, and operators'
/// tools (`loadgen experts`, `bench`).
pub const DISPATCHERS: &[PeerRole] = &[PeerRole::AttentionWorker, PeerRole::Admin];
