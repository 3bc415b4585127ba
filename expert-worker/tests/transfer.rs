//! Experts sent between workers, in one process: a weightless shard fills its cache from
//! sources that send the tiny fixture's experts, some of them corrupting a chunk, dying
//! mid-stream or sending a chunk out of place. What is marked held is byte for byte the
//! checkpoint's; what failed is never held (and never computed); senders keep their pace.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use expertmesh_dispatch::WireDType;
use expertmesh_expert_worker::transfer::{
    expert_chunks, expert_digest, fetch_expert, receive, ChunkStream, ExpertCache, ExpertSource,
    RateLimit, TransferError,
};
use expertmesh_expert_worker::{Assignment, ExpertShard};
use expertmesh_model::moe::{ExpertGroup, Experts};
use expertmesh_model::{ModelSource, TextConfig};
use expertmesh_proto::v1 as pb;
use tokio_stream::StreamExt;

/// The tiny bf16 fixture's config and a shard over its checkpoint (the sender).
fn sender() -> (TextConfig, Arc<ExpertShard>) {
    sender_of("tiny-maverick")
}

/// A fixture's config and a shard over its checkpoint.
fn sender_of(fixture: &str) -> (TextConfig, Arc<ExpertShard>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let source = ModelSource::Dir(dir.join(fixture));
    let config = source.config().unwrap();
    let shard = ExpertShard::new(&config, source.weights().unwrap().as_ref()).unwrap();
    (config, Arc::new(shard))
}

/// A weightless shard over a fresh cache (the receiver): in memory, as a worker's is by
/// default, or with `in_file` in a cache file of that name, its name removed.
fn receiver(config: &TextConfig, in_file: Option<&str>) -> (ExpertCache, Arc<ExpertShard>) {
    let dir = in_file.map(|name| {
        std::env::temp_dir().join(format!("expertmesh-transfer-{name}-{}", std::process::id()))
    });
    let cache = ExpertCache::create(dir.as_deref(), config).unwrap();
    let shard = ExpertShard::new(config, cache.weights())
        .unwrap()
        .weightless();
    // As the worker does: what is written after the name is gone still reaches the map.
    cache.unlink().unwrap();
    assert!(dir.is_none_or(|d| !d.exists()));
    (cache, Arc::new(shard))
}

/// What can go wrong with a sender.
#[derive(Clone, Copy)]
enum Fault {
    None,
    /// Flips a byte of this chunk after its CRC was computed.
    Corrupt(usize),
    /// The stream ends (as a killed sender's does) after this many chunks.
    Die(usize),
    /// This chunk comes with the next chunk's offset.
    Misplace(usize),
    /// After this many chunks the sender says nothing more, and keeps the stream open.
    Stall(usize),
    /// Sends other bytes in this chunk, with CRCs that match them (a peer whose copy is
    /// not the checkpoint's): only the coordinators' digest can tell.
    Impostor(usize),
}

struct FakeSource {
    shard: Arc<ExpertShard>,
    fault: Fault,
}

#[tonic::async_trait]
impl ExpertSource for FakeSource {
    fn name(&self) -> String {
        "fake".into()
    }

    async fn fetch(&self, e: u32) -> Result<ChunkStream, TransferError> {
        let mut chunks: Vec<pb::WeightChunk> = expert_chunks(&self.shard, e)?.collect();
        match self.fault {
            Fault::None => {}
            Fault::Corrupt(k) => {
                let mut data = chunks[k].data.to_vec();
                data[7] ^= 0x40;
                chunks[k].data = data.into();
            }
            Fault::Impostor(k) => {
                let mut data = chunks[k].data.to_vec();
                data[7] ^= 0x40;
                chunks[k].data = data.into();
                let mut whole = crc32fast::Hasher::new();
                for c in &mut chunks {
                    c.crc32 = crc32fast::hash(&c.data);
                    whole.update(&c.data);
                }
                chunks.last_mut().unwrap().whole_crc32 = whole.finalize();
            }
            Fault::Die(k) => chunks.truncate(k),
            Fault::Misplace(k) => chunks[k].offset += 1,
            Fault::Stall(k) => {
                chunks.truncate(k);
                let sent = tokio_stream::iter(chunks.into_iter().map(Ok));
                return Ok(Box::pin(sent.chain(tokio_stream::pending::<
                    Result<pb::WeightChunk, TransferError>,
                >())));
            }
        }
        Ok(Box::pin(tokio_stream::iter(chunks.into_iter().map(Ok))))
    }
}

fn source(shard: &Arc<ExpertShard>, fault: Fault) -> Arc<dyn ExpertSource> {
    Arc::new(FakeSource {
        shard: shard.clone(),
        fault,
    })
}

/// Expert `e`'s bytes in every MoE layer of `shard`.
fn bytes_of(shard: &ExpertShard, e: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for experts in shard.layers().values() {
        let Experts::Fused { gate_up, down } = experts else {
            panic!("the fixture's experts are fused");
        };
        out.extend_from_slice(gate_up.outer(e as usize).bytes());
        out.extend_from_slice(down.outer(e as usize).bytes());
    }
    out
}

#[tokio::test]
async fn a_fetched_expert_is_the_checkpoints_bytes_whatever_failed_first() {
    let (config, from) = sender();
    let (cache, to) = receiver(&config, Some("failover"));
    assert!(!to.holds(3));
    let faults = [
        Fault::Corrupt(2),
        Fault::Die(3),
        Fault::Misplace(1),
        Fault::Impostor(1),
    ];
    for (e, fault) in [3u32, 17, 100, 64].into_iter().zip(faults) {
        let sources = [source(&from, fault), source(&from, Fault::None)];
        let digest = Some(expert_digest(&from, e).unwrap());
        let (bytes, _) = fetch_expert(&to, &cache, e, digest, &sources)
            .await
            .unwrap();
        assert_eq!(bytes, cache.expert_bytes());
        assert!(to.holds(e));
        assert_eq!(bytes_of(&to, e), bytes_of(&from, e), "expert {e}");
    }
    // Only what was fetched is held; /metrics counts it and the failed tries.
    assert!(!to.holds(4));
    let stats = to.transfers();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(get(&stats.fetched_bytes), 4 * cache.expert_bytes());
    assert_eq!(get(&stats.failed), 4);
    assert_eq!(get(&stats.fetching), 0);
}

#[tokio::test]
async fn an_expert_no_holder_sends_whole_is_never_held_nor_computed() {
    let (config, from) = sender();
    let (cache, to) = receiver(&config, None);
    let sources = [
        source(&from, Fault::Corrupt(0)),
        source(&from, Fault::Die(1)),
        source(&from, Fault::Impostor(0)),
    ];
    let digest = Some(expert_digest(&from, 5).unwrap());
    let failed = fetch_expert(&to, &cache, 5, digest, &sources)
        .await
        .unwrap_err();
    assert!(
        matches!(&failed, TransferError::NoHolder { what, .. } if what == "expert 5"),
        "{failed}"
    );
    assert!(failed.to_string().contains("CRC"), "{failed}");
    assert!(
        failed.to_string().contains("digest the coordinators hold"),
        "{failed}"
    );
    assert!(!to.holds(5));
    // Assigned anyway, a batch for it is refused rather than computed on half its bytes.
    to.assign(Assignment {
        epoch: 1,
        experts: BTreeSet::from([5]),
    });
    let layer = *to.layers().keys().next().unwrap();
    let batch = expertmesh_dispatch::DispatchBatch {
        epoch: 1,
        layer,
        batch_id: 0,
        timeout: Duration::from_secs(5),
        hidden: to.hidden(),
        groups: vec![expertmesh_model::moe::ExpertGroup { expert: 5, rows: 1 }],
        activations: vec![0.5; to.hidden()],
        dtype: expertmesh_dispatch::WireDType::F32,
        traces: Vec::new(),
    };
    let refused = to.check(&batch).unwrap_err();
    assert!(
        matches!(
            refused,
            expertmesh_dispatch::DispatchError::ExpertNotHere { expert: 5, .. }
        ),
        "{refused}"
    );
}

/// A holder sends the chunk CRCs it worked out with the digest (or, for an expert it
/// fetched, the ones it checked on arrival) instead of reading the bytes again for them:
/// the chunks are those worked out anew, and a fetched expert travels on from its fetcher.
#[tokio::test]
async fn kept_chunk_crcs_send_the_chunks_worked_out_anew() {
    let (config, from) = sender();
    // Not digested yet: each chunk's CRC is worked out as it goes.
    let anew: Vec<pb::WeightChunk> = expert_chunks(&from, 12).unwrap().collect();
    let digest = expert_digest(&from, 12).unwrap();
    assert_eq!(digest, crc32fast::hash(&bytes_of(&from, 12)));
    let kept: Vec<pb::WeightChunk> = expert_chunks(&from, 12).unwrap().collect();
    assert_eq!(kept, anew);
    let (cache, to) = receiver(&config, None);
    fetch_expert(&to, &cache, 12, Some(digest), &[source(&from, Fault::None)])
        .await
        .unwrap();
    let onward: Vec<pb::WeightChunk> = expert_chunks(&to, 12).unwrap().collect();
    assert_eq!(onward, anew);
    let (third_cache, third) = receiver(&config, None);
    fetch_expert(
        &third,
        &third_cache,
        12,
        Some(digest),
        &[source(&to, Fault::None)],
    )
    .await
    .unwrap();
    assert_eq!(bytes_of(&third, 12), bytes_of(&from, 12));
}

/// Two fetches of one expert at once (a placement's gain and a backup): one moves its
/// bytes, the other finds it held; nothing is written twice.
#[tokio::test]
async fn an_expert_is_fetched_once_however_many_ask() {
    let (config, from) = sender();
    let (cache, to) = receiver(&config, None);
    let sources = [source(&from, Fault::None)];
    let digest = Some(expert_digest(&from, 9).unwrap());
    let (a, b) = tokio::join!(
        fetch_expert(&to, &cache, 9, digest, &sources),
        fetch_expert(&to, &cache, 9, digest, &sources)
    );
    let mut moved = [a.unwrap().0, b.unwrap().0];
    moved.sort();
    assert_eq!(moved, [0, cache.expert_bytes()]);
    let fetched = to
        .transfers()
        .fetched_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(fetched, cache.expert_bytes());
    assert_eq!(bytes_of(&to, 9), bytes_of(&from, 9));
}

/// An FP8 checkpoint's experts travel per projection (e4m3 codes, then the scales as f32):
/// a fetched one is read anew and computes the sender's bits.
#[tokio::test]
async fn fp8_experts_travel_and_compute_the_senders_bits() {
    let (config, from) = sender_of("tiny-maverick-fp8");
    let (cache, to) = receiver(&config, Some("fp8"));
    for e in [0u32, 77, 127] {
        let sources = [source(&from, Fault::Corrupt(1)), source(&from, Fault::None)];
        let digest = expert_digest(&from, e).unwrap();
        fetch_expert(&to, &cache, e, Some(digest), &sources)
            .await
            .unwrap();
        assert!(to.holds(e));
        assert_eq!(expert_digest(&to, e).unwrap(), digest, "expert {e}");
    }
    assert!(!to.holds(1));
    let hidden = to.hidden();
    let groups = [(0, 2), (77, 1), (127, 3)].map(|(expert, rows)| ExpertGroup { expert, rows });
    let inputs: Vec<f32> = (0..6 * hidden)
        .map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0)
        .collect();
    for &layer in from.layers().keys() {
        let want = from
            .compute(layer, &groups, &inputs, WireDType::F32)
            .unwrap();
        assert!(want.iter().any(|&v| v != 0.0));
        let got = to.compute(layer, &groups, &inputs, WireDType::F32).unwrap();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "layer {layer}"
        );
    }
}

#[tokio::test]
async fn chunks_for_another_expert_or_past_the_end_are_refused() {
    let (config, from) = sender();
    let (cache, _) = receiver(&config, None);
    // Expert 9's chunks offered as expert 8's.
    let chunks: Vec<pb::WeightChunk> = expert_chunks(&from, 9).unwrap().collect();
    let stream: ChunkStream = Box::pin(tokio_stream::iter(chunks.clone().into_iter().map(Ok)));
    let wrong = receive(&cache, 8, None, "hostile", stream, &Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&wrong, TransferError::Corrupt { what, .. } if what == "expert 8"),
        "{wrong}"
    );
    // An expert the model does not have.
    let stream: ChunkStream = Box::pin(tokio_stream::iter(chunks.into_iter().map(Ok)));
    let past = receive(&cache, 128, None, "hostile", stream, &Default::default())
        .await
        .unwrap_err();
    assert!(past.to_string().contains("no such expert"), "{past}");
}

/// A sender that stops sending and keeps the stream open is left after 10 s of silence; the
/// transfer shows in the worker's report meanwhile.
#[tokio::test(start_paused = true)]
async fn a_stalled_sender_is_left_for_the_next_holder() {
    let (config, from) = sender();
    let (cache, to) = receiver(&config, None);
    let started = tokio::time::Instant::now();
    let sources = [source(&from, Fault::Stall(2)), source(&from, Fault::None)];
    // During the stall the heartbeat's report shows the transfer, its verified bytes short
    // of the whole; afterwards only where the expert came from.
    let during = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        to.transfer_report()
    };
    let (fetched, (in_flight, origins)) =
        tokio::join!(fetch_expert(&to, &cache, 42, None, &sources), during);
    fetched.unwrap();
    assert!(origins.is_empty());
    let [t] = &in_flight[..] else {
        panic!("{in_flight:?}")
    };
    assert_eq!((t.expert, t.source.as_str()), (42, "fake"));
    assert_eq!(t.total, cache.expert_bytes());
    assert!(t.bytes > 0 && t.bytes < t.total, "{t:?}");
    let (in_flight, origins) = to.transfer_report();
    assert!(in_flight.is_empty());
    assert_eq!(
        origins,
        [pb::ExpertOrigin {
            expert: 42,
            source: "fake".into()
        }]
    );
    assert!(to.holds(42));
    assert_eq!(bytes_of(&to, 42), bytes_of(&from, 42));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "{waited:?}"
    );
}

/// 80 Mbit/s is 10 MB/s: 100 MB of chunks take 10 s (on tokio's clock), within 10%.
#[tokio::test(start_paused = true)]
async fn a_sender_keeps_to_its_rate() {
    let pace = RateLimit::new(80);
    let started = tokio::time::Instant::now();
    for _ in 0..100 {
        pace.take(1_000_000).await;
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took <= Duration::from_secs(11),
        "{took:?}"
    );
    // No limit: no wait.
    let free = RateLimit::new(0);
    let started = tokio::time::Instant::now();
    free.take(1 << 30).await;
    assert_eq!(started.elapsed(), Duration::ZERO);
}
