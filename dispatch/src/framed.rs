//! `FramedDispatch`: the `Dispatch` seam over a plain socket (TCP, or a Unix socket for
//! co-located workers) carrying [`crate::frame`]s: no HTTP/2 framing, flow control or
//! per-call task hops, and the tensor bytes converted once into the frame and read in place.
//! gRPC stays the control plane; an expert worker serves both on one port ([`incoming`]
//! tells them apart by the first bytes a client writes).
//!
//! Client: one connection per worker ([`crate::link`]), a writer task that writes whole
//! frames in order, a reader task that hands replies to their waiters. Server ([`serve`]):
//! each request frame is checked ([`crate::wire`]), answered by the worker's [`Answer`]
//! concurrently (bounded), and its reply frame queued for a writer task (bounded).

use std::sync::Arc;
use std::time::Duration;

use expertmesh_proto::tls::{permits, Conn, PeerRole, DISPATCHERS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use crate::frame::{self, OutFrame, MAGIC};
use crate::link::{Connect, Link, Opening, Waiters};
use crate::{Answer, Dispatch, DispatchBatch, DispatchError, DispatchFuture};

/// Frames queued toward one peer before the queuing side waits.
const FRAME_QUEUE: usize = 64;
/// Batches in flight per connection; the connection is not read further until one finishes.
const IN_FLIGHT_PER_CONNECTION: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a new connection may take to show its first bytes.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);
/// Accepted connections waiting for the gRPC server to take them.
const HANDOFF_QUEUE: usize = 64;

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A framed client of one expert worker.
pub struct FramedDispatch {
    link: Arc<Link<FramedSocket>>,
}

impl FramedDispatch {
    /// `address` is `host:port`, or `unix:PATH` for a Unix socket; nothing is connected
    /// until the first dispatch.
    pub fn new(address: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            link: Arc::new(Link::new(address.into(), FramedSocket)),
        })
    }
}

impl Dispatch for FramedDispatch {
    fn dispatch(&self, batch: DispatchBatch) -> DispatchFuture {
        Box::pin(self.link.clone().send(batch))
    }
}

struct FramedSocket;

async fn connect(address: &str) -> std::io::Result<(Reader, Writer)> {
    #[cfg(unix)]
    if let Some(path) = address.strip_prefix("unix:") {
        let (r, w) = tokio::net::UnixStream::connect(path).await?.into_split();
        return Ok((Box::new(r), Box::new(w)));
    }
    if !expertmesh_proto::tls::enabled() {
        // Plain TCP halves, without the lock a generic split takes on every read and write.
        let stream = tokio::net::TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        return Ok((Box::new(r), Box::new(w)));
    }
    let stream =
        expertmesh_proto::tls::connect(address, expertmesh_proto::tls::PeerRole::ExpertWorker)
            .await?;
    let (r, w) = tokio::io::split(stream);
    Ok((Box::new(r), Box::new(w)))
}

impl Connect for FramedSocket {
    type Message = OutFrame;

    fn open(&self, address: String, waiters: Arc<Waiters>) -> Opening<OutFrame> {
        Box::pin(async move {
            let unavailable = |why: String| DispatchError::Unavailable(format!("{address}: {why}"));
            let (mut reader, mut writer) = tokio::time::timeout(CONNECT_TIMEOUT, async {
                let (r, mut w) = connect(&address).await?;
                w.write_all(&MAGIC).await?;
                Ok::<_, std::io::Error>((r, w))
            })
            .await
            .map_err(|_| unavailable("connect timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
            let (tx, mut rx) = mpsc::channel::<OutFrame>(FRAME_QUEUE);
            let writer_waiters = waiters.clone();
            let writer_address = address.clone();
            tokio::spawn(async move {
                while let Some(frame) = rx.recv().await {
                    if let Err(e) = frame.write_to(&mut writer).await {
                        writer_waiters.fail_all(&format!("{writer_address}: {e}"));
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let why = loop {
                    match frame::read(&mut reader).await {
                        Ok(Some(f)) => match f.into_reply() {
                            Ok(reply) => waiters.answer(reply),
                            Err(e) => break e.to_string(),
                        },
                        Ok(None) => break "the worker closed the connection".to_string(),
                        Err(e) => break e.to_string(),
                    }
                };
                waiters.fail_all(&format!("{address}: {why}"));
            });
            Ok(tx)
        })
    }

    fn encode(&self, batch: DispatchBatch) -> Result<OutFrame, DispatchError> {
        frame::request(batch)
    }
}

/// Serves framed dispatch on one connection, which starts with [`MAGIC`], until the client
/// closes it or sends something that is not a frame.
pub async fn serve<S>(stream: S, answer: Arc<dyn Answer>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let mut magic = [0u8; 4];
    match tokio::time::timeout(SNIFF_TIMEOUT, reader.read_exact(&mut magic)).await {
        Ok(Ok(_)) if magic == MAGIC => {}
        _ => return,
    }
    // Each answer writes its own reply (no hand-off to a writer task); the lock keeps
    // frames whole. A failed write leaves the connection to end with its reader.
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_PER_CONNECTION));
    // A frame that does not decode ends the connection, as an undecodable gRPC message
    // ends the stream; a decoded request that fails its checks gets a typed error reply.
    while let Ok(Some(f)) = frame::read(&mut reader).await {
        let Ok(request) = f.into_request() else { break };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (writer, answer) = (writer.clone(), answer.clone());
        tokio::spawn(async move {
            let id = request.batch_id;
            let reply = match DispatchBatch::try_from(request) {
                Err(e) => frame::reply_err(id, &e),
                Ok(batch) => {
                    let (rows, hidden, dtype) = (batch.rows(), batch.hidden, batch.dtype);
                    match answer.answer(batch).await {
                        Ok(out) => frame::reply_ok(id, out, rows, hidden, dtype)
                            .unwrap_or_else(|e| frame::reply_err(id, &e)),
                        Err(e) => frame::reply_err(id, &e),
                    }
                }
            };
            let _ = reply.write_to(&mut *writer.lock().await).await;
            drop(permit);
        });
    }
}

/// Serving one connection of a [`Protocol`].
pub type ServeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Another plain-socket protocol a port serves beside framed dispatch and gRPC: its
/// connections start with its own magic (the expert worker's framed `FetchExperts`).
#[derive(Clone)]
pub struct Protocol {
    pub magic: [u8; 4],
    /// The certificate roles it serves, under TLS.
    pub roles: &'static [PeerRole],
    /// Serves one connection, from its magic on.
    pub serve: Arc<dyn Fn(Conn) -> ServeFuture + Send + Sync>,
}

/// The accepted connections of an expert worker's port (Nagle off, over TLS when the
/// process has it): framed dispatch connections are served here by `answer`, those of
/// `others` by theirs; every other one (HTTP/2, i.e. gRPC) is handed on through the
/// returned stream, for `tonic`'s `serve_with_incoming`. They are told apart by their first
/// bytes, which the one serving them reads again. Accepting stops when that stream is
/// dropped.
pub fn incoming(
    listener: TcpListener,
    answer: Arc<dyn Answer>,
    others: Vec<Protocol>,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
    let mut accepted = expertmesh_proto::tls::incoming(listener);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                c = tokio_stream::StreamExt::next(&mut accepted) => c,
                _ = tx.closed() => return,
            };
            let mut conn = match next {
                Some(Ok(conn)) => conn,
                Some(Err(_)) => continue,
                None => return,
            };
            let (tx, answer, others) = (tx.clone(), answer.clone(), others.clone());
            tokio::spawn(async move {
                match conn.sniff(&MAGIC, SNIFF_TIMEOUT).await {
                    Some(true) if permits(conn.peer(), DISPATCHERS) => serve(conn, answer).await,
                    Some(true) => {
                        tracing::warn!("framed dispatch refused: the client's certificate is not a dispatcher's");
                    }
                    Some(false) => match sniff_others(&mut conn, &others).await {
                        Some(Some(p)) if permits(conn.peer(), p.roles) => (p.serve)(conn).await,
                        Some(Some(p)) => tracing::warn!(
                            "a framed connection refused: the client's certificate is not one of {:?}",
                            p.roles
                        ),
                        Some(None) => {
                            let _ = tx.send(Ok(conn)).await;
                        }
                        None => {}
                    },
                    None => {}
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Which of `others` the connection's first bytes are (`Some(None)`: none of them); `None`
/// when it closes or shows too little.
async fn sniff_others<'a>(conn: &mut Conn, others: &'a [Protocol]) -> Option<Option<&'a Protocol>> {
    for other in others {
        if conn.sniff(&other.magic, SNIFF_TIMEOUT).await? {
            return Some(Some(other));
        }
    }
    Some(None)
}

/// Serves framed dispatch on every connection of a Unix socket (co-located workers), until
/// accepting fails.
#[cfg(unix)]
pub async fn serve_unix(listener: tokio::net::UnixListener, answer: Arc<dyn Answer>) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(serve(stream, answer.clone()));
    }
}
