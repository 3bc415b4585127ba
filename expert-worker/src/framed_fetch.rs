//! `FetchExperts` over the expert worker's port in frames instead of HTTP/2 (the
//! [`expertmesh_dispatch::frame`] format framed dispatch uses): the same requests and the
//! same [`pb::WeightChunk`]s, each chunk's bytes written from the held tensor straight after
//! its header and read into one buffer that the receiver checks and writes into its cache.
//! gRPC's framing, flow control and per-message copies were most of a transfer's cost
//! (`expertmesh bench transfer`).
//!
//! ```text
//! connection: MAGIC, then, as many times as the fetcher likes:
//!   fetcher → holder: a frame whose header is a FetchExpertsRequest (no bytes)
//!   holder → fetcher: the experts' chunks, a frame each (the chunk without its bytes as the
//!                     header, the bytes as the frame's), the last with `last` set; or one
//!                     chunk with `refused` set, naming why
//! ```
//!
//! The fetcher keeps a connection for its next expert once one has arrived whole (or was
//! refused); a connection whose transfer failed is closed. A holder closes connections that
//! stay idle; a fetcher does not reuse one that has waited long, and asks again on a new
//! connection when a kept one fails before the first frame of its answer (the holder
//! restarted).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use expertmesh_dispatch::frame::{self, OutFrame};
use expertmesh_dispatch::framed::Protocol;
use expertmesh_proto::tls::{Conn, Io, PeerRole};
use expertmesh_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::shard::ExpertShard;
use crate::transfer::{
    chunks_to_send, ChunkStream, ExpertSource, RateLimit, TransferError, EXPERT_DEADLINE,
};

/// What a fetcher writes first (framed dispatch's is `EMF1`, HTTP/2's `PRI `).
pub const MAGIC: [u8; 4] = *b"EMW1";
/// Who may fetch experts (as over gRPC).
const FETCHERS: &[PeerRole] = &[PeerRole::ExpertWorker, PeerRole::Admin];
/// How long a holder waits for a connection's next request.
const IDLE_HOLDER: Duration = Duration::from_secs(60);
/// How long a fetcher keeps an idle connection for its next expert (well inside the
/// holder's patience, so that a kept connection is not one the holder is closing).
const IDLE_FETCHER: Duration = Duration::from_secs(10);
/// Idle connections a fetcher keeps per holder.
const KEPT_CONNECTIONS: usize = crate::transfer::FETCHES_IN_FLIGHT;
/// How long one frame may take to be written (a fetcher that stops reading is left).
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
const CONNECT_DEADLINE: Duration = Duration::from_secs(3);
/// How long the first frame of an answer may take (as long as any chunk may).
const FIRST_FRAME_DEADLINE: Duration = Duration::from_secs(10);
/// Chunks read ahead of the receiver's checks and writes.
const CHUNKS_AHEAD: usize = 4;

/// The holder's side, for [`expertmesh_dispatch::framed::incoming`]: `shard`'s experts, sent
/// at the pace of `pace` (shared with gRPC's `FetchExperts`).
pub fn protocol(shard: Arc<ExpertShard>, pace: Arc<RateLimit>) -> Protocol {
    Protocol {
        magic: MAGIC,
        roles: FETCHERS,
        serve: Arc::new(move |conn| Box::pin(serve(conn, shard.clone(), pace.clone()))),
    }
}

/// Serves one fetcher's connection until it closes, stays idle, or sends what is not a
/// request.
async fn serve(mut conn: Conn, shard: Arc<ExpertShard>, pace: Arc<RateLimit>) {
    let mut magic = [0u8; 4];
    if conn.read_exact(&mut magic).await.is_err() || magic != MAGIC {
        return;
    }
    loop {
        let Ok(Ok(Some(f))) = tokio::time::timeout(IDLE_HOLDER, frame::read(&mut conn)).await
        else {
            return;
        };
        let Ok((request, data)) = f.into_message::<pb::FetchExpertsRequest>() else {
            return;
        };
        if !data.is_empty() {
            return;
        }
        let chunks = match chunks_to_send(&shard, &request.experts) {
            Ok(chunks) => chunks,
            Err(refusal) => {
                let chunk = pb::WeightChunk {
                    refused: refusal.to_string(),
                    ..Default::default()
                };
                if write(&mut conn, Bytes::new(), &chunk).await.is_err() {
                    return;
                }
                continue;
            }
        };
        for mut chunk in chunks {
            let data = std::mem::take(&mut chunk.data);
            let bytes = data.len();
            pace.take(bytes).await;
            if write(&mut conn, data, &chunk).await.is_err() {
                return;
            }
            shard
                .transfers()
                .sent_bytes
                .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Writes one frame of `data` under `header`, within [`WRITE_DEADLINE`].
async fn write(
    conn: &mut (impl tokio::io::AsyncWrite + Unpin),
    data: Bytes,
    header: &impl prost::Message,
) -> std::io::Result<()> {
    let frame = OutFrame::new(data, header).map_err(std::io::Error::other)?;
    tokio::time::timeout(WRITE_DEADLINE, frame.write_to(conn))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// A peer expert worker's experts over its port's framed form, on connections kept from
/// one expert to the next.
pub struct FramedSource {
    address: String,
    kept: Arc<Mutex<Vec<Kept>>>,
}

/// A connection kept for the next expert, and since when.
type Kept = (Box<dyn Io>, Instant);

impl FramedSource {
    /// A source at `address` (connected on first use).
    pub fn new(address: &str) -> Self {
        Self {
            address: address.to_owned(),
            kept: Arc::default(),
        }
    }

    /// A kept connection that has not waited too long.
    fn kept(&self) -> Option<Box<dyn Io>> {
        let mut kept = self.kept.lock().expect("kept connections lock");
        kept.retain(|(_, since)| since.elapsed() < IDLE_FETCHER);
        kept.pop().map(|(conn, _)| conn)
    }

    /// A new connection, its magic written.
    async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        tokio::time::timeout(CONNECT_DEADLINE, async {
            let mut conn =
                expertmesh_proto::tls::connect(&self.address, PeerRole::ExpertWorker).await?;
            conn.write_all(&MAGIC).await?;
            Ok(conn)
        })
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }
}

/// How reading a fetch's chunks ended.
enum Ended {
    /// The last chunk arrived, or the holder refused (why): the connection can be kept.
    Whole(Option<String>),
    /// The connection cannot be used again (why, when the fetcher should hear it).
    Broken(Option<String>),
}

/// Asks `conn` for expert `e`; the first frame of the answer.
async fn ask(conn: &mut Box<dyn Io>, e: u32) -> Result<frame::Frame, String> {
    write(
        conn,
        Bytes::new(),
        &pb::FetchExpertsRequest { experts: vec![e] },
    )
    .await
    .map_err(|e| e.to_string())?;
    match tokio::time::timeout(FIRST_FRAME_DEADLINE, frame::read(conn)).await {
        Err(_) => Err(format!("nothing came within {FIRST_FRAME_DEADLINE:?}")),
        Ok(Ok(Some(f))) => Ok(f),
        Ok(Ok(None)) => Err("the holder closed the connection".into()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// Reads one fetch's chunks from `conn`, `first` already read, into `tx`.
async fn read_chunks(
    conn: &mut Box<dyn Io>,
    first: frame::Frame,
    tx: &mpsc::Sender<Result<pb::WeightChunk, TransferError>>,
) -> Ended {
    let mut next = Some(first);
    loop {
        let frame = match next.take() {
            Some(f) => f,
            None => match frame::read(conn).await {
                Ok(Some(f)) => f,
                Ok(None) => return Ended::Broken(Some("the holder closed the connection".into())),
                Err(e) => return Ended::Broken(Some(e.to_string())),
            },
        };
        let (mut chunk, data) = match frame.into_message::<pb::WeightChunk>() {
            Ok(message) => message,
            Err(e) => return Ended::Broken(Some(e.to_string())),
        };
        if !chunk.refused.is_empty() {
            return Ended::Whole(Some(format!("refused: {}", chunk.refused)));
        }
        if !chunk.data.is_empty() {
            return Ended::Broken(Some("a chunk's bytes are inside its header".into()));
        }
        chunk.data = data;
        let last = chunk.last;
        if tx.send(Ok(chunk)).await.is_err() {
            // The receiver has stopped listening (it found something wrong).
            return Ended::Broken(None);
        }
        if last {
            return Ended::Whole(None);
        }
    }
}

#[tonic::async_trait]
impl ExpertSource for FramedSource {
    fn name(&self) -> String {
        self.address.clone()
    }

    async fn fetch(&self, e: u32) -> Result<ChunkStream, TransferError> {
        let peer = |reason: String| TransferError::Peer {
            peer: self.address.clone(),
            reason,
        };
        // A kept connection the holder has closed meanwhile (it restarted) fails at once:
        // then once more on a new one.
        let asked_kept = match self.kept() {
            Some(mut conn) => ask(&mut conn, e).await.ok().map(|first| (conn, first)),
            None => None,
        };
        let (mut conn, first) = match asked_kept {
            Some(asked) => asked,
            None => {
                let mut conn = self.connect().await.map_err(|e| peer(e.to_string()))?;
                let first = ask(&mut conn, e).await.map_err(peer)?;
                (conn, first)
            }
        };
        let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
        let (address, kept) = (self.address.clone(), self.kept.clone());
        tokio::spawn(async move {
            let ended = tokio::select! {
                ended = tokio::time::timeout(EXPERT_DEADLINE, read_chunks(&mut conn, first, &tx)) => {
                    ended.unwrap_or_else(|_| Ended::Broken(Some(format!(
                        "expert {e} took longer than {EXPERT_DEADLINE:?}"
                    ))))
                }
                () = tx.closed() => Ended::Broken(None),
            };
            let why = match ended {
                Ended::Whole(why) => {
                    let mut kept = kept.lock().expect("kept connections lock");
                    if kept.len() < KEPT_CONNECTIONS {
                        kept.push((conn, Instant::now()));
                    }
                    why
                }
                Ended::Broken(why) => why,
            };
            if let Some(reason) = why {
                let _ = tx
                    .send(Err(TransferError::Peer {
                        peer: address,
                        reason,
                    }))
                    .await;
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}
