//! Both transports of `FetchExperts` against a real expert worker's port (gRPC, and the
//! port's framed form): every expert arrives byte for byte as the holder has it, a refusal is
//! an error that leaves the framed connection usable, and a hostile holder or fetcher is an
//! error on its own connection, never a panic or a hang.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use expertmesh_dispatch::frame::{self, OutFrame};
use expertmesh_dispatch::Transport;
use expertmesh_expert_worker::framed_fetch::{FramedSource, MAGIC};
use expertmesh_expert_worker::transfer::{
    expert_digest, fetch_expert, receive, source, ExpertCache, ExpertSource, TransferError,
};
use expertmesh_expert_worker::{Batcher, BatcherConfig, ExpertServer, ExpertShard};
use expertmesh_model::{ModelSource, TextConfig};
use expertmesh_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The tiny fixture's config and a shard over its checkpoint.
fn holder() -> (TextConfig, Arc<ExpertShard>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-maverick");
    let source = ModelSource::Dir(dir);
    let config = source.config().unwrap();
    let shard = ExpertShard::new(&config, source.weights().unwrap().as_ref()).unwrap();
    (config, Arc::new(shard))
}

/// Serves `shard` as an expert worker's port does (framed dispatch, framed fetches, gRPC);
/// its address.
async fn serve(shard: &Arc<ExpertShard>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let batcher = Batcher::spawn(shard.clone(), BatcherConfig::default());
    tokio::spawn(ExpertServer::new(batcher, Arc::default()).serve(listener));
    address
}

/// A weightless shard over a fresh cache in memory.
fn receiver(config: &TextConfig) -> (Arc<ExpertCache>, Arc<ExpertShard>) {
    let cache = ExpertCache::create(None, config).unwrap();
    let shard = ExpertShard::new(config, cache.weights())
        .unwrap()
        .weightless();
    cache.unlink().unwrap();
    (Arc::new(cache), Arc::new(shard))
}

/// One expert from `source` into `cache`, checked against `digest`, without marking it held.
async fn receive_one(
    source: &dyn ExpertSource,
    cache: &ExpertCache,
    e: u32,
    digest: u32,
) -> Result<u64, TransferError> {
    let stream = source.fetch(e).await?;
    receive(cache, e, Some(digest), "holder", stream, &AtomicU64::new(0))
        .await
        .map(|arrived| arrived.bytes)
}

#[tokio::test]
async fn every_transport_moves_every_expert_whole() {
    let (config, from) = holder();
    let address = serve(&from).await;
    for transport in [Transport::Tcp, Transport::Grpc] {
        let (cache, to) = receiver(&config);
        let sources = [source(transport, &address).unwrap()];
        // Eight at a time, as a joining worker fetches.
        let mut tasks = tokio::task::JoinSet::new();
        for e in 0..config.num_local_experts as u32 {
            let digest = Some(expert_digest(&from, e).unwrap());
            let (to, cache, sources) = (to.clone(), cache.clone(), sources.clone());
            tasks.spawn(async move { fetch_expert(&to, &cache, e, digest, &sources).await });
            if tasks.len() == 8 {
                tasks.join_next().await.unwrap().unwrap().unwrap();
            }
        }
        while let Some(done) = tasks.join_next().await {
            assert_eq!(done.unwrap().unwrap().0, cache.expert_bytes());
        }
        for e in 0..config.num_local_experts as u32 {
            assert!(to.holds(e));
            assert_eq!(
                expert_digest(&to, e).unwrap(),
                expert_digest(&from, e).unwrap(),
                "{transport}: expert {e}"
            );
        }
        assert_eq!(to.transfers().failed.load(Ordering::Relaxed), 0);
    }
    // What the holder sent, counted once per transport.
    let sent = from.transfers().sent_bytes.load(Ordering::Relaxed);
    let (cache, _) = receiver(&config);
    assert_eq!(
        sent,
        2 * config.num_local_experts as u64 * cache.expert_bytes()
    );
}

#[tokio::test]
async fn a_refusal_is_an_error_and_the_framed_connection_goes_on() {
    let (config, full) = holder();
    // A weightless worker that holds expert 7 only (fetched from the full one) is the holder.
    let (cache, partial) = receiver(&config);
    let digest = expert_digest(&full, 7).unwrap();
    let full_source = source(Transport::Tcp, &serve(&full).await).unwrap();
    fetch_expert(&partial, &cache, 7, Some(digest), &[full_source])
        .await
        .unwrap();
    let address = serve(&partial).await;
    let (cache, _) = receiver(&config);
    for transport in [Transport::Tcp, Transport::Grpc] {
        let source = source(transport, &address).unwrap();
        let refused = receive_one(source.as_ref(), &cache, 9, digest)
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, TransferError::Peer { reason, .. } if reason.contains("expert 9 is not held here")),
            "{transport}: {refused}"
        );
        // The same source (for the framed form: the connection kept after the refusal).
        let got = receive_one(source.as_ref(), &cache, 7, digest)
            .await
            .unwrap();
        assert_eq!(got, cache.expert_bytes(), "{transport}");
    }
}

/// A holder speaking the framed protocol that answers the first fetch of each connection
/// with the bytes `reply` makes of its request, then hangs up; its address.
async fn fake_holder(
    reply: impl Fn(pb::FetchExpertsRequest) -> Vec<u8> + Send + Sync + 'static,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut magic = [0u8; 4];
                s.read_exact(&mut magic).await.unwrap();
                assert_eq!(magic, MAGIC);
                let request = frame::read(&mut s).await.unwrap().unwrap();
                let (request, _) = request.into_message().unwrap();
                let _ = s.write_all(&reply(request)).await;
            });
        }
    });
    address
}

/// A holder that answers with `reply` whatever is asked.
async fn hostile_holder(reply: Vec<u8>) -> String {
    fake_holder(move |_| reply.clone()).await
}

/// The frame of `chunk` with `data` as the frame's bytes.
fn chunk_frame(chunk: &pb::WeightChunk, data: &[u8]) -> Vec<u8> {
    OutFrame::new(bytes::Bytes::copy_from_slice(data), chunk)
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn a_hostile_holder_is_an_error_on_its_connection() {
    let (config, from) = holder();
    let (cache, _) = receiver(&config);
    let digest = expert_digest(&from, 0).unwrap();
    // The holder's true first chunk, to spoil in each way.
    let mut first = expertmesh_expert_worker::transfer::expert_chunks(&from, 0)
        .unwrap()
        .next()
        .unwrap();
    let data = std::mem::take(&mut first.data);
    let inside = pb::WeightChunk {
        data: data.clone(),
        ..first.clone()
    };
    let over = ((expertmesh_dispatch::frame::FRAME_BYTES_MAX + 1) as u32).to_le_bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a header that is not protobuf", {
            let mut f = 6u32.to_le_bytes().to_vec();
            f.extend(2u32.to_le_bytes());
            f.extend([0xff, 0xff]);
            f
        }),
        ("bytes inside the header", chunk_frame(&inside, &[])),
        ("a frame over the cap", over.to_vec()),
        ("a flipped byte", {
            let mut spoiled = data.to_vec();
            spoiled[3] ^= 1;
            chunk_frame(&first, &spoiled)
        }),
        (
            "a frame cut short",
            chunk_frame(&first, &data)[..100].to_vec(),
        ),
        ("a stream cut short", chunk_frame(&first, &data)),
    ];
    for (what, reply) in cases {
        let address = hostile_holder(reply).await;
        let source = FramedSource::new(&address);
        let got = tokio::time::timeout(
            Duration::from_secs(30),
            receive_one(&source, &cache, 0, digest),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: hung"));
        let err = got.expect_err(what);
        assert!(
            matches!(
                err,
                TransferError::Peer { .. } | TransferError::Corrupt { .. }
            ),
            "{what}: {err}"
        );
    }
}

#[tokio::test]
async fn a_hostile_fetcher_is_cut_off_and_the_holder_goes_on() {
    let (config, from) = holder();
    let address = serve(&from).await;
    for garbage in [
        // A request frame whose header is not protobuf.
        [
            6u32.to_le_bytes().as_slice(),
            &2u32.to_le_bytes(),
            &[0xff, 0xff],
        ]
        .concat(),
        // A request carrying bytes.
        OutFrame::new(
            bytes::Bytes::from_static(b"abcd"),
            &pb::FetchExpertsRequest { experts: vec![1] },
        )
        .unwrap()
        .to_vec(),
        // More experts than the model has.
        OutFrame::new(
            bytes::Bytes::new(),
            &pb::FetchExpertsRequest {
                experts: vec![0; 10_000],
            },
        )
        .unwrap()
        .to_vec(),
    ] {
        let mut s = tokio::net::TcpStream::connect(&address).await.unwrap();
        s.write_all(&MAGIC).await.unwrap();
        s.write_all(&garbage).await.unwrap();
        // Closed, or answered with a refusal: either way within the test's patience, and
        // nothing of an expert is sent.
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
                if let Ok(Some(f)) = frame::read(&mut got.as_slice()).await {
                    let (chunk, data) = f.into_message::<pb::WeightChunk>().unwrap();
                    assert!(!chunk.refused.is_empty() && data.is_empty());
                    break;
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the holder neither closed nor refused");
    }
    // The holder still serves a fetcher that keeps to the protocol.
    let (cache, _) = receiver(&config);
    let digest = expert_digest(&from, 2).unwrap();
    let got = receive_one(&FramedSource::new(&address), &cache, 2, digest)
        .await
        .unwrap();
    assert_eq!(got, cache.expert_bytes());
}

/// A holder that answers one fetch per connection (`holder`'s experts, as the port sends
/// them) and then closes it, as a holder that restarted between two fetches looks to a
/// fetcher that kept the connection.
async fn one_fetch_holder(holder: Arc<ExpertShard>) -> String {
    fake_holder(move |request| {
        let chunks =
            expertmesh_expert_worker::transfer::chunks_to_send(&holder, &request.experts).unwrap();
        chunks
            .flat_map(|mut chunk| {
                let data = std::mem::take(&mut chunk.data);
                OutFrame::new(data, &chunk).unwrap().to_vec()
            })
            .collect()
    })
    .await
}

#[tokio::test]
async fn a_kept_connection_the_holder_closed_is_replaced() {
    let (config, from) = holder();
    let address = one_fetch_holder(from.clone()).await;
    let (cache, _) = receiver(&config);
    let source = FramedSource::new(&address);
    for e in [3, 4, 5] {
        let digest = expert_digest(&from, e).unwrap();
        let got = receive_one(&source, &cache, e, digest).await.unwrap();
        assert_eq!(got, cache.expert_bytes(), "expert {e}");
    }
}
