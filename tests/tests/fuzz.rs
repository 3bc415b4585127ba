//! Property-based fuzzing (proptest) of every decoder that reads bytes from the network or
//! the disk: dispatch requests and replies (gRPC and framed), the coordinator's requests,
//! cluster states, replicated commands and snapshots, raft message batches, the raft log and
//! snapshot files, safetensors headers, HTTP request bodies and image bytes. Each input is
//! random bytes or a valid encoding with bytes flipped and cut; each decoder must give a
//! value or its typed error, never panic, and allocate no more than its cap (measured by a
//! counting allocator on this thread).
//!
//! `EXPERTMESH_FUZZ_CASES` sets the cases per target (default 256, what CI runs).
#![allow(unsafe_code)] // the counting allocator

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use expertmesh_dispatch::{frame, wire, DispatchBatch, WireDType};
use expertmesh_proto::v1 as pb;
use proptest::prelude::*;
use prost::Message as _;

// ---- Allocation metering ------------------------------------------------------------

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(grown: usize, shrunk: usize) {
    let _ = LIVE.try_with(|live| {
        let now = (live.get() + grown).saturating_sub(shrunk);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call goes to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size(), 0);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size(), 0);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        note(0, layout.size());
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, size) };
        if !q.is_null() {
            note(size, layout.size());
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and asserts that it allocated at most `cap` bytes at once on this thread.
fn within<T>(what: &str, cap: usize, f: impl FnOnce() -> T) -> T {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    let peak = PEAK.with(Cell::get) - start;
    assert!(
        peak <= cap,
        "{what}: {peak} bytes allocated at once (cap {cap})"
    );
    out
}

/// Bytes a decoder may allocate for an input of `n` bytes: a small multiple of the input,
/// plus room for fixed tables.
fn cap_for(n: usize) -> usize {
    16 * n + (4 << 20)
}

// ---- Inputs -------------------------------------------------------------------------------

fn cases() -> u32 {
    std::env::var("EXPERTMESH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn random_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// `seed` with some bytes replaced and perhaps cut short.
fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = seed.len().max(1);
    (
        proptest::collection::vec((0..n, any::<u8>()), 1..8),
        proptest::option::of(0..=n),
    )
        .prop_map(move |(flips, cut)| {
            let mut b = seed.clone();
            for (i, v) in flips {
                if i < b.len() {
                    b[i] = v;
                }
            }
            if let Some(c) = cut {
                b.truncate(c);
            }
            b
        })
}

/// Random bytes or a mutation of `seed`.
fn bytes_like(seed: Vec<u8>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![random_bytes(seed.len() * 2 + 64), mutated(seed)].boxed()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn a_batch() -> DispatchBatch {
    DispatchBatch {
        epoch: 3,
        layer: 1,
        batch_id: 9,
        timeout: Duration::from_secs(2),
        groups: vec![
            expertmesh_model::moe::ExpertGroup { expert: 4, rows: 2 },
            expertmesh_model::moe::ExpertGroup { expert: 7, rows: 1 },
        ],
        hidden: 8,
        dtype: WireDType::F32,
        activations: (0..24).map(|i| i as f32 * 0.5).collect(),
        traces: vec![0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736],
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

// ---- Targets ------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// gRPC dispatch requests: the protobuf, then the domain checks.
    #[test]
    fn dispatch_requests(bytes in bytes_like(pb::DispatchRequest::from(a_batch()).encode_to_vec())) {
        within("dispatch request", cap_for(bytes.len()), || {
            if let Ok(r) = pb::DispatchRequest::decode(bytes.as_slice()) {
                let _ = DispatchBatch::try_from(r);
            }
        });
    }

    /// Dispatch replies, checked against the rows and width asked for.
    #[test]
    fn dispatch_replies(bytes in bytes_like(
        wire::reply_ok(9, (0..24).map(|i| i as f32).collect(), 3, 8, WireDType::F32).encode_to_vec()
    )) {
        within("dispatch reply", cap_for(bytes.len()), || {
            if let Ok(r) = pb::DispatchReply::decode(bytes.as_slice()) {
                let _ = wire::decode_reply(r, 3, 8);
            }
        });
    }

    /// Framed dispatch: length-prefixed frames, then the request or reply inside. A frame
    /// may reserve what its length states (at most the frame cap), nothing more.
    #[test]
    fn frames(bytes in bytes_like(frame_bytes())) {
        let rt = runtime();
        within("frame", frame::FRAME_BYTES_MAX + cap_for(bytes.len()), || {
            let mut input = bytes.as_slice();
            while let Ok(Some(f)) = rt.block_on(frame::read(&mut input)) {
                let again = f.clone();
                if let Ok(r) = f.into_request() {
                    let _ = DispatchBatch::try_from(r);
                }
                let _ = again.into_reply();
            }
        });
    }

    /// What workers decode from coordinators: the cluster state.
    #[test]
    fn cluster_states(bytes in random_bytes(2048)) {
        within("cluster state", cap_for(bytes.len()), || {
            if let Ok(s) = pb::ClusterState::decode(bytes.as_slice()) {
                let _ = expertmesh_coordinator::ClusterView::try_from(s);
            }
        });
    }

    /// Every coordinator request message.
    #[test]
    fn coordinator_requests(bytes in random_bytes(1024)) {
        within("coordinator requests", cap_for(bytes.len()), || {
            let b = bytes.as_slice();
            let _ = pb::RegisterRequest::decode(b);
            let _ = pb::HeartbeatRequest::decode(b);
            let _ = pb::WatchStateRequest::decode(b);
            let _ = pb::ChangeCoordinatorsRequest::decode(b);
            let _ = pb::DrainRequest::decode(b);
            let _ = pb::NcclIdRequest::decode(b);
            let _ = pb::RebalanceRequest::decode(b);
            let _ = pb::GenerateRequest::decode(b);
        });
    }

    /// Raft message batches, as the `Raft` call decodes them.
    #[test]
    fn raft_batches(messages in proptest::collection::vec(random_bytes(256), 0..8), from in 0u64..4) {
        // rust-protobuf reserves up to 10 MB for a bytes field whose stated length exceeds
        // what arrived (its READ_RAW_BYTES_MAX_ALLOC), one message at a time.
        let cap = 10_000_000 + cap_for(messages.iter().map(Vec::len).sum());
        within("raft batch", cap, || {
            let r = pb::RaftMessages { from, messages: messages.clone() };
            let _ = expertmesh_coordinator::service::decode_raft(&r, 1);
        });
    }

    /// Replicated commands (raft entries' data) and state snapshots.
    #[test]
    fn commands_and_snapshots(bytes in bytes_like(command_bytes())) {
        within("command", cap_for(bytes.len()), || {
            let mut machine = expertmesh_coordinator::machine::Machine::default();
            let _ = machine.apply(&bytes);
            let _ = expertmesh_coordinator::machine::Machine::decode(&bytes);
        });
    }

    /// HTTP request bodies of both endpoints.
    #[test]
    fn http_bodies(bytes in bytes_like(br#"{"model":"m","prompt":"hello","max_tokens":4,"temperature":0.5,"stop":["x"],"logit_bias":{"5":1.0},"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"response_format":{"type":"json_schema","json_schema":{"name":"a","schema":{"type":"object"}}},"tools":[{"type":"function","function":{"name":"f","parameters":{}}}]}"#.to_vec())) {
        within("HTTP body", cap_for(bytes.len()), || {
            let _ = expertmesh_gateway::openai::CompletionRequest::parse(&bytes, false);
            let _ = expertmesh_gateway::openai::CompletionRequest::parse(&bytes, true);
        });
    }
}

proptest! {
    // Image decoding and files on disk are slower per case.
    #![proptest_config(ProptestConfig { cases: cases() / 4 + 1, ..config() })]

    /// Image bytes under the gateway's limits: the header's size checked before decoding.
    #[test]
    fn images(bytes in bytes_like(std::fs::read(fixture("tiny-maverick").join("test-image.png")).unwrap())) {
        use expertmesh_model::vision::preprocess::{preprocess, probe, ImageLimits};
        let limits = ImageLimits { image_pixels_max: 1 << 20, ..ImageLimits::default() };
        let processor = processor();
        // Decoding may hold the pixels (4 bytes each, twice while converting).
        within("image", 8 * limits.image_pixels_max as usize + cap_for(bytes.len()) + (64 << 20), || {
            let _ = probe(&bytes, &limits);
            let _ = preprocess(&bytes, &processor, &limits);
        });
    }

    /// Safetensors files: header length, JSON header, offsets and dtypes.
    #[test]
    fn safetensors_headers(bytes in bytes_like(safetensors_bytes())) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
        within("safetensors", cap_for(bytes.len()), || {
            let _ = expertmesh_model::SafetensorsCheckpoint::open(dir.path());
        });
    }

    /// The raft log and snapshot files: a store written for real, one of its files then
    /// damaged; opening it again gives the store or a typed error.
    #[test]
    fn raft_storage(which in 0usize..8, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in proptest::option::of(any::<usize>())) {
        let dir = tempfile::tempdir().unwrap();
        write_store(dir.path());
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let path = &files[which % files.len()];
        let mut bytes = std::fs::read(path).unwrap();
        if !bytes.is_empty() {
            for (i, v) in &flips {
                let n = bytes.len();
                bytes[i % n] = *v;
            }
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        std::fs::write(path, &bytes).unwrap();
        let total: usize = files.iter().map(|f| std::fs::metadata(f).map_or(0, |m| m.len() as usize)).sum();
        within("raft storage", cap_for(total), || {
            let _ = expertmesh_coordinator::storage::DiskStorage::open(dir.path(), &[1]);
        });
    }
}

// ---- Seeds --------------------------------------------------------------------------------

fn frame_bytes() -> Vec<u8> {
    let rt = runtime();
    let mut out = Vec::new();
    rt.block_on(frame::request(a_batch()).unwrap().write_to(&mut out))
        .unwrap();
    out
}

fn command_bytes() -> Vec<u8> {
    use expertmesh_coordinator::machine::{Command, Envelope};
    Envelope::encode(Command::Prepare {
        epoch: 2,
        experts: vec![vec![1, 2], vec![2]],
    })
}

fn safetensors_bytes() -> Vec<u8> {
    let data: Vec<u8> = (0..64u8).collect();
    let views = [
        (
            "a.weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![4, 4], &data[..32])
                .unwrap(),
        ),
        (
            "b.weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![8], &data[32..])
                .unwrap(),
        ),
    ];
    safetensors::serialize(views, None).unwrap()
}

fn processor() -> expertmesh_model::vision::config::ProcessorConfig {
    expertmesh_model::vision::config::ProcessorConfig::from_dir(&fixture("tiny-maverick")).unwrap()
}

/// A raft store with entries, a hard state and a snapshot, synced to `dir`.
fn write_store(dir: &Path) {
    use raft::eraftpb::{Entry, HardState};
    let mut store = expertmesh_coordinator::storage::DiskStorage::open(dir, &[1]).unwrap();
    let entries: Vec<Entry> = (1..=6)
        .map(|i| Entry {
            term: 1,
            index: i,
            data: format!("entry {i}").into_bytes().into(),
            ..Entry::default()
        })
        .collect();
    store.append(&entries).unwrap();
    store.set_hard_state(HardState {
        term: 1,
        vote: 1,
        commit: 6,
        ..HardState::default()
    });
    store.sync().unwrap();
    store.compact(4, b"the state at 4".to_vec()).unwrap();
    store
        .append(&[Entry {
            term: 1,
            index: 7,
            ..Entry::default()
        }])
        .unwrap();
    store.sync().unwrap();
}
