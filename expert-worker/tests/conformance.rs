//! The conformance suite of the `Dispatch` seam: the in-process implementation, the gRPC
//! one (a real server on loopback), the NCCL one (on a GPU) and the fault-injecting test
//! double (unscripted, around the in-process one) must answer the same batches with the same
//! outputs, bit for bit, and the same typed errors. The double's scripted faults then show
//! what a sender sees of each fault.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use expertmesh_dispatch::{
    framed, Dispatch, DispatchBatch, DispatchError, Fault, FaultyDispatch, FramedDispatch,
    GrpcDispatch, InProcessDispatch, WireDType,
};
use expertmesh_expert_worker::{Assignment, Batcher, BatcherConfig, ExpertServer, ExpertShard};
use expertmesh_model::moe::{ExpertGroup, Experts};
use expertmesh_model::synthetic::SyntheticSpec;
use expertmesh_model::{InMemoryWeights, TextConfig};
use tokio::net::TcpListener;

const EPOCH: u64 = 7;

fn spec() -> SyntheticSpec {
    SyntheticSpec {
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        experts: 8,
        expert_inter: 32,
        dense_inter: 96,
        vocab: 100,
        chunk: 8,
        moe_step: 2,
        seed: 11,
    }
}

struct Fixture {
    config: TextConfig,
    weights: InMemoryWeights,
}

impl Fixture {
    fn new() -> Self {
        let (config, weights) = spec().build().unwrap();
        Self { config, weights }
    }

    /// The same model with its routed experts in FP8 (W8A8).
    fn fp8() -> Self {
        let (config, mut weights) = spec().build().unwrap();
        let config = expertmesh_model::synthetic::to_fp8(&config, &mut weights).unwrap();
        Self { config, weights }
    }

    /// A shard that owns experts 0..6 of 8 under `EPOCH`.
    fn shard(&self) -> Arc<ExpertShard> {
        let shard = ExpertShard::new(&self.config, &self.weights).unwrap();
        shard.assign(Assignment {
            epoch: EPOCH,
            experts: (0..6).collect::<BTreeSet<u32>>(),
        });
        Arc::new(shard)
    }

    fn experts(&self) -> Experts {
        Experts::load(&self.weights, &self.config, 1).unwrap()
    }
}

fn batch(groups: &[(u32, u32)], dtype: WireDType, seed: u32) -> DispatchBatch {
    let groups: Vec<ExpertGroup> = groups
        .iter()
        .map(|&(expert, rows)| ExpertGroup { expert, rows })
        .collect();
    let rows: usize = groups.iter().map(|g| g.rows as usize).sum();
    DispatchBatch {
        epoch: EPOCH,
        layer: 1,
        batch_id: 0,
        timeout: Duration::from_secs(5),
        groups,
        hidden: 64,
        dtype,
        activations: (0..rows * 64)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect(),
        traces: vec![u128::from(seed) + 1],
    }
}

async fn in_process(f: &Fixture, config: BatcherConfig) -> Box<dyn Dispatch> {
    Box::new(InProcessDispatch::new(Arc::new(Batcher::spawn(
        f.shard(),
        config,
    ))))
}

fn faulty(f: &Fixture) -> FaultyDispatch {
    let batcher = Arc::new(Batcher::spawn(f.shard(), BatcherConfig::default()));
    FaultyDispatch::new(Arc::new(InProcessDispatch::new(batcher)))
}

/// An expert worker's port as its node serves it: gRPC and framed dispatch on one listener,
/// told apart by their first bytes.
async fn worker_port(f: &Fixture, config: BatcherConfig) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let batcher = Batcher::spawn(f.shard(), config);
    tokio::spawn(ExpertServer::new(batcher, Arc::new(AtomicU64::new(1))).serve(listener));
    addr.to_string()
}

async fn grpc(f: &Fixture, config: BatcherConfig) -> Box<dyn Dispatch> {
    Box::new(GrpcDispatch::new(worker_port(f, config).await))
}

async fn tcp(f: &Fixture, config: BatcherConfig) -> Box<dyn Dispatch> {
    Box::new(FramedDispatch::new(worker_port(f, config).await))
}

/// Framed dispatch over a Unix socket (co-located workers).
async fn unix(f: &Fixture, config: BatcherConfig) -> Box<dyn Dispatch> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "expertmesh-conformance-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let batcher = Arc::new(Batcher::spawn(f.shard(), config));
    tokio::spawn(framed::serve_unix(listener, batcher));
    Box::new(FramedDispatch::new(format!("unix:{}", path.display())))
}

async fn conformance(f: &Fixture, d: &dyn Dispatch) {
    let experts = f.experts();
    // Outputs equal the direct computation, bit for bit, in f32.
    let b = batch(&[(0, 3), (2, 1), (5, 4)], WireDType::F32, 1);
    let expected = experts.run_groups(&b.groups, &b.activations, 64);
    assert_eq!(d.dispatch(b).await.unwrap(), expected);

    // Concurrent batches (merged by the batcher) each get their own exact answer.
    let batches: Vec<DispatchBatch> = (0..6)
        .map(|i| batch(&[(i % 3, 2), (3 + i % 3, 1)], WireDType::F32, 100 + i))
        .collect();
    let answers = futures_join(batches.iter().map(|b| d.dispatch(b.clone())).collect()).await;
    for (b, got) in batches.iter().zip(answers) {
        assert_eq!(
            got.unwrap(),
            experts.run_groups(&b.groups, &b.activations, 64)
        );
    }

    // bf16 on the wire: rounded inputs in, rounded outputs back.
    let b = batch(&[(1, 2)], WireDType::Bf16, 3);
    let mut rounded = b.activations.clone();
    WireDType::Bf16.carry(&mut rounded, 64);
    let mut expected = experts.run_groups(&b.groups, &rounded, 64);
    WireDType::Bf16.carry(&mut expected, 64);
    assert_eq!(d.dispatch(b).await.unwrap(), expected);

    if f.config.experts_take_fp8_inputs(1) {
        // fp8 on the wire to FP8 experts: their own input quantization, done before the
        // trip, so the outputs (f32) are those of the f32 rows, bit for bit — also when fp8
        // and f32 batches of the layer are merged by the batcher.
        let batches: Vec<DispatchBatch> = (0..6)
            .map(|i| {
                let dtype = [WireDType::Fp8, WireDType::F32][i as usize % 2];
                batch(&[(i % 3, 2), (3 + i % 3, 1)], dtype, 200 + i)
            })
            .collect();
        let answers = futures_join(batches.iter().map(|b| d.dispatch(b.clone())).collect()).await;
        for (b, got) in batches.iter().zip(answers) {
            assert_eq!(
                got.unwrap(),
                experts.run_groups(&b.groups, &b.activations, 64),
                "{:?}",
                b.dtype
            );
        }
    } else {
        // Experts that do not quantize their inputs refuse rows that were.
        let b = batch(&[(1, 2)], WireDType::Fp8, 3);
        let err = d.dispatch(b).await.unwrap_err();
        assert!(
            matches!(&err, DispatchError::BadRequest(r) if r.contains("FP8")),
            "{err:?}"
        );
    }

    // Typed errors.
    let mut b = batch(&[(0, 1)], WireDType::F32, 4);
    b.epoch = EPOCH + 1;
    assert_eq!(
        d.dispatch(b).await,
        Err(DispatchError::WrongEpoch { current: EPOCH })
    );
    let b = batch(&[(0, 1), (7, 1)], WireDType::F32, 5);
    assert_eq!(
        d.dispatch(b).await,
        Err(DispatchError::ExpertNotHere {
            layer: 1,
            expert: 7
        })
    );
    let b = batch(&[(9, 1)], WireDType::F32, 5);
    assert!(matches!(
        d.dispatch(b).await,
        Err(DispatchError::BadRequest(_))
    ));
    let mut b = batch(&[(0, 1)], WireDType::F32, 6);
    b.layer = 0;
    assert!(matches!(
        d.dispatch(b).await,
        Err(DispatchError::BadRequest(_))
    ));
    let mut b = batch(&[(0, 2)], WireDType::F32, 6);
    b.hidden = 32;
    assert!(matches!(
        d.dispatch(b).await,
        Err(DispatchError::ShapeMismatch { .. })
    ));
    // An empty batch is answered with nothing.
    let b = batch(&[], WireDType::F32, 7);
    assert_eq!(d.dispatch(b).await.unwrap(), Vec::<f32>::new());
}

async fn futures_join<T: Send + 'static>(
    futures: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_conforms() {
    let f = Fixture::new();
    conformance(&f, in_process(&f, BatcherConfig::default()).await.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_double_conforms_and_injects_each_fault() {
    let f = Fixture::new();
    let d = faulty(&f);
    conformance(&f, &d).await;
    let calls = d.calls();
    let experts = f.experts();
    let b = batch(&[(0, 2)], WireDType::F32, 9);
    let exact = experts.run_groups(&b.groups, &b.activations, 64);
    d.script([
        Fault::Drop,
        Fault::WrongEpoch(EPOCH + 3),
        Fault::Unavailable,
        Fault::Delay(Duration::from_millis(30)),
        Fault::Delay(Duration::from_secs(30)),
        Fault::Hang,
    ]);
    let mut short = b.clone();
    short.timeout = Duration::from_millis(50);
    assert!(matches!(
        d.dispatch(b.clone()).await,
        Err(DispatchError::Unavailable(_))
    ));
    assert_eq!(
        d.dispatch(b.clone()).await,
        Err(DispatchError::WrongEpoch { current: EPOCH + 3 })
    );
    assert!(matches!(
        d.dispatch(b.clone()).await,
        Err(DispatchError::Unavailable(_))
    ));
    assert_eq!(
        d.dispatch(b.clone()).await.unwrap(),
        exact,
        "a late answer is still exact"
    );
    let started = std::time::Instant::now();
    assert_eq!(
        d.dispatch(short.clone()).await,
        Err(DispatchError::DeadlineExceeded)
    );
    assert_eq!(
        d.dispatch(short).await,
        Err(DispatchError::DeadlineExceeded)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "faults end at the deadline"
    );
    // The script is used up: batches pass again; `always` makes a dead worker.
    assert_eq!(d.dispatch(b.clone()).await.unwrap(), exact);
    d.always(Fault::Drop);
    assert!(d.dispatch(b).await.is_err());
    assert_eq!(d.calls(), calls + 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_conforms() {
    let f = Fixture::new();
    conformance(&f, grpc(&f, BatcherConfig::default()).await.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_tcp_conforms() {
    let f = Fixture::new();
    conformance(&f, tcp(&f, BatcherConfig::default()).await.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_unix_conforms() {
    let f = Fixture::new();
    conformance(&f, unix(&f, BatcherConfig::default()).await.as_ref()).await;
}

/// The same suite with FP8 experts (where `--wire-dtype fp8` is exact), every transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fp8_experts_conform() {
    let f = Fixture::fp8();
    assert!(f.config.experts_take_fp8_inputs(1));
    let c = BatcherConfig::default();
    conformance(&f, in_process(&f, c).await.as_ref()).await;
    conformance(&f, grpc(&f, c).await.as_ref()).await;
    conformance(&f, tcp(&f, c).await.as_ref()).await;
}

/// With a batching window longer than the deadline, the batch times out (every path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_are_enforced() {
    let f = Fixture::new();
    let slow = BatcherConfig {
        window_us: 300_000,
        ..BatcherConfig::default()
    };
    for d in [
        in_process(&f, slow).await,
        grpc(&f, slow).await,
        tcp(&f, slow).await,
    ] {
        let mut b = batch(&[(0, 1)], WireDType::F32, 1);
        b.timeout = Duration::from_millis(20);
        let started = std::time::Instant::now();
        assert_eq!(d.dispatch(b).await, Err(DispatchError::DeadlineExceeded));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

/// A worker that goes away turns into `Unavailable` at once, not a hang, for both socket
/// transports. The server runs on its own runtime; dropping the runtime kills its
/// connections as a dead process would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_gone_is_unavailable() {
    type Client = fn(String) -> Arc<dyn Dispatch>;
    let clients: [Client; 2] = [
        |a| GrpcDispatch::new(a) as Arc<dyn Dispatch>,
        |a| FramedDispatch::new(a) as Arc<dyn Dispatch>,
    ];
    for client in clients {
        let f = Fixture::new();
        let shard = f.shard();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let server_thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let batcher = Batcher::spawn(shard, BatcherConfig::default());
                tokio::spawn(
                    ExpertServer::new(batcher, Arc::new(AtomicU64::new(1))).serve(listener),
                );
            });
            let _ = stopped.recv();
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        let addr = addr_rx.recv().unwrap();
        let d = client(addr.to_string());
        assert!(d
            .dispatch(batch(&[(0, 1)], WireDType::F32, 1))
            .await
            .is_ok());
        stop.send(()).unwrap();
        server_thread.join().unwrap();
        let started = std::time::Instant::now();
        let mut b = batch(&[(0, 1)], WireDType::F32, 2);
        b.timeout = Duration::from_secs(10);
        let err = d.dispatch(b).await.unwrap_err();
        assert!(matches!(err, DispatchError::Unavailable(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

/// Hostile bytes on a worker's port: after the framed magic, a frame over the cap, one
/// whose header does not fit, one whose header does not decode; each closes that connection
/// (no allocation of the claimed size, no panic), and the port keeps serving both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_only_their_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::new();
    let addr = worker_port(&f, BatcherConfig::default()).await;
    let mut garbage_header = vec![];
    garbage_header.extend(12u32.to_le_bytes());
    garbage_header.extend(8u32.to_le_bytes());
    garbage_header.extend([0xff; 8]);
    let hostile: [Vec<u8>; 4] = [
        u32::MAX.to_le_bytes().to_vec(),
        [8u32.to_le_bytes(), 9u32.to_le_bytes(), [0; 4]].concat(),
        garbage_header,
        b"not a protocol at all, longer than the HTTP/2 preface".to_vec(),
    ];
    for (i, bytes) in hostile.into_iter().enumerate() {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        if bytes.starts_with(b"not") {
            s.write_all(&bytes).await.unwrap();
        } else {
            s.write_all(&expertmesh_dispatch::frame::MAGIC)
                .await
                .unwrap();
            s.write_all(&bytes).await.unwrap();
        }
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "the worker closes hostile connection {i}");
    }
    let b = batch(&[(0, 2)], WireDType::F32, 3);
    let exact = f.experts().run_groups(&b.groups, &b.activations, 64);
    assert_eq!(
        FramedDispatch::new(addr.clone())
            .dispatch(b.clone())
            .await
            .unwrap(),
        exact
    );
    assert_eq!(GrpcDispatch::new(addr).dispatch(b).await.unwrap(), exact);
}

/// The NCCL implementation on one GPU (a single-rank group): the group's unique id is offered
/// to and handed out by a real coordinator over gRPC, then every batch's rows cross NCCL both
/// ways around the same batcher. Skips with the reason without a GPU or NCCL.
#[cfg(feature = "cuda")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nccl_conforms() {
    use expertmesh_coordinator::{Coordinator, CoordinatorClient, NodeConfig, Settings, Timing};
    use expertmesh_dispatch::nccl::NcclDispatch;
    for lib in ["cuda", "nccl"] {
        if let Err(e) = expertmesh_model::cuda::preload(lib) {
            println!("skipped: {e}");
            return;
        }
    }
    if let Err(e) = expertmesh_model::cuda::probe(0) {
        println!("skipped: {e}");
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let dir = std::env::temp_dir().join(format!("expertmesh-nccl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (coordinator, _) = Coordinator::start(NodeConfig {
        id: 1,
        peers: [(1, address.clone())].into_iter().collect(),
        data_dir: dir.clone(),
        join: false,
        tick: Duration::from_millis(50),
        timing: Timing::default(),
        model_fingerprint: "fp".into(),
        num_experts: 8,
        settings: Settings::default(),
    })
    .unwrap();
    tokio::spawn(expertmesh_coordinator::serve(
        coordinator,
        listener,
        std::future::pending(),
    ));
    let client = CoordinatorClient::new(&address).unwrap();
    let f = Fixture::new();
    let batcher = Arc::new(Batcher::spawn(f.shard(), BatcherConfig::default()));
    let agree = |offer: Vec<u8>| async move {
        client
            .nccl_id("conformance", Some(&offer), Duration::from_secs(10))
            .await
    };
    let nccl = NcclDispatch::single_rank(0, agree, batcher).await.unwrap();
    println!("NCCL dispatch over {}", nccl.link().description);
    conformance(&f, &nccl).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Capacity by memory counts each expert at its checkpoint's dtype: the same memory holds
/// about twice as many FP8 experts as bf16 ones (codes plus one f32 scale per output row).
#[test]
fn fp8_experts_take_half_the_memory_in_placement() {
    use expertmesh_expert_worker::ExpertWorkerConfig;
    let (bf16, fp8) = (Fixture::new().shard(), Fixture::fp8().shard());
    let (b, f) = (bf16.copy_bytes(), fp8.copy_bytes());
    // One expert of the synthetic model in its one MoE layer: 3 × 64 × 32 weights.
    assert_eq!(b, 3 * 64 * 32 * 2);
    assert_eq!(f, 3 * 64 * 32 + 4 * (32 + 32 + 64));
    let config = ExpertWorkerConfig {
        expert_memory_mib: Some(1),
        ..ExpertWorkerConfig::default()
    };
    let (cb, cf) = (
        config.capacity_for(b).unwrap(),
        config.capacity_for(f).unwrap(),
    );
    assert_eq!(cb, (1 << 20) / b);
    assert!(cf as f64 > 1.8 * cb as f64, "{cf} FP8 vs {cb} bf16 experts");
    let both = ExpertWorkerConfig {
        capacity: Some(3),
        ..config.clone()
    };
    assert_eq!(both.capacity_for(f), Some(3));
    assert_eq!(ExpertWorkerConfig::default().capacity_for(f), None);
}
