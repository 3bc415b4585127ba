//! Prometheus metrics of the gateway, plus the cluster's load as workers report it.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use expertmesh_proto::v1::WorkerLoad;

/// Upper bounds (seconds) of the latency histograms.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug, Default)]
struct State {
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    ttft: Histogram,
    itl: Histogram,
    in_flight: i64,
    migrations: u64,
}

/// A per-worker gauge: name, help, and how to read it from a worker's load.
type Gauge = (&'static str, &'static str, fn(&WorkerLoad) -> f64);

/// One series per attention worker for each of `series` (name, help, value).
fn per_worker(out: &mut String, series: &[Gauge], loads: &BTreeMap<u64, WorkerLoad>) {
    for (name, help, get) in series {
        let samples: Vec<(String, f64)> = loads
            .iter()
            .map(|(id, l)| (format!("worker=\"{id}\""), get(l)))
            .collect();
        expertmesh_proto::metrics::write_family(out, name, help, &samples);
    }
}

/// The gateway's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut s = self.state.lock().expect("metrics lock");
        *s.requests.entry((endpoint.to_owned(), status)).or_default() += 1;
    }

    pub fn tokens(&self, prompt: usize, completion: usize) {
        let mut s = self.state.lock().expect("metrics lock");
        s.prompt_tokens += prompt as u64;
        s.completion_tokens += completion as u64;
    }

    /// A request moved to another attention worker.
    pub fn migration(&self) {
        self.state.lock().expect("metrics lock").migrations += 1;
    }

    pub fn first_token(&self, seconds: f64) {
        self.state
            .lock()
            .expect("metrics lock")
            .ttft
            .observe(seconds);
    }

    pub fn inter_token(&self, seconds: f64) {
        self.state
            .lock()
            .expect("metrics lock")
            .itl
            .observe(seconds);
    }

    pub fn in_flight(&self, delta: i64) {
        self.state.lock().expect("metrics lock").in_flight += delta;
    }

    /// The Prometheus text: the gateway's own counters, then each attention worker's load,
    /// then the tokens routed to each expert.
    pub fn render(&self, loads: &BTreeMap<u64, WorkerLoad>) -> String {
        let mut out = String::new();
        self.render_own(&mut out);
        render_workers(&mut out, loads);
        render_routed(&mut out, loads);
        out
    }

    /// The gateway's own requests, tokens and latencies.
    fn render_own(&self, out: &mut String) {
        let s = self.state.lock().expect("metrics lock");
        let _ = writeln!(out, "# HELP expertmesh_requests_total HTTP requests by endpoint and status.\n# TYPE expertmesh_requests_total counter");
        for ((endpoint, code), n) in &s.requests {
            let _ = writeln!(
                out,
                "expertmesh_requests_total{{endpoint=\"{endpoint}\",code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# TYPE expertmesh_prompt_tokens_total counter\nexpertmesh_prompt_tokens_total {}",
            s.prompt_tokens
        );
        let _ = writeln!(out, "# TYPE expertmesh_completion_tokens_total counter\nexpertmesh_completion_tokens_total {}", s.completion_tokens);
        let _ = writeln!(out, "# HELP expertmesh_request_migrations_total Requests moved to another attention worker after theirs failed.\n# TYPE expertmesh_request_migrations_total counter\nexpertmesh_request_migrations_total {}", s.migrations);
        let _ = writeln!(
            out,
            "# TYPE expertmesh_requests_in_flight gauge\nexpertmesh_requests_in_flight {}",
            s.in_flight
        );
        s.ttft.render(
            out,
            "expertmesh_time_to_first_token_seconds",
            "Time from request to first token.",
        );
        s.itl.render(
            out,
            "expertmesh_inter_token_latency_seconds",
            "Time between tokens of one stream.",
        );
    }
}

/// Each attention worker's load as its last heartbeat reported it.
fn render_workers(out: &mut String, loads: &BTreeMap<u64, WorkerLoad>) {
    let gauges: [Gauge; 5] = [
        (
            "expertmesh_queue_depth",
            "Requests waiting for admission.",
            |l| l.waiting as f64,
        ),
        (
            "expertmesh_running_sequences",
            "Sequences in the running batch.",
            |l| l.running as f64,
        ),
        (
            "expertmesh_kv_blocks_used",
            "KV cache blocks held by sequences (those only the prefix cache holds count as free).",
            |l| (l.total_kv_blocks - l.free_kv_blocks) as f64,
        ),
        (
            "expertmesh_kv_blocks_total",
            "KV cache blocks in the pool.",
            |l| l.total_kv_blocks as f64,
        ),
        (
            "expertmesh_scheduler_steps_total",
            "Batched forward steps.",
            |l| l.steps as f64,
        ),
    ];
    per_worker(out, &gauges, loads);
    let _ = writeln!(out, "# HELP expertmesh_dispatch_round_trip_seconds Routed batches sent to expert workers.\n# TYPE expertmesh_dispatch_round_trip_seconds summary");
    let (n, secs) = loads.values().fold((0, 0.0), |(n, t), l| {
        (n + l.dispatches, t + l.dispatch_seconds)
    });
    let _ = writeln!(out, "expertmesh_dispatch_round_trip_seconds_sum {secs}\nexpertmesh_dispatch_round_trip_seconds_count {n}");
    let (n, secs) = loads.values().fold((0, 0.0), |(n, t), l| {
        (n + l.routed_batches, t + l.routed_batch_seconds)
    });
    let _ = writeln!(out, "# HELP expertmesh_routed_batch_seconds One MoE layer's routed batch, from its start to its last answer.\n# TYPE expertmesh_routed_batch_seconds summary\nexpertmesh_routed_batch_seconds_sum {secs}\nexpertmesh_routed_batch_seconds_count {n}");
    let (queried, hit) = loads.values().fold((0, 0), |(q, h), l| {
        (q + l.prefix_queried_tokens, h + l.prefix_hit_tokens)
    });
    let rate = if queried == 0 {
        0.0
    } else {
        hit as f64 / queried as f64
    };
    let _ = writeln!(out, "# HELP expertmesh_prefix_cache_hit_rate Share of admitted prompt tokens taken from cached KV blocks, every attention worker since it started.\n# TYPE expertmesh_prefix_cache_hit_rate gauge\nexpertmesh_prefix_cache_hit_rate {rate}");
    let prefix: [Gauge; 4] = [
        (
            "expertmesh_prefix_cache_queried_tokens_total",
            "Prompt tokens of the sequences admitted.",
            |l| l.prefix_queried_tokens as f64,
        ),
        (
            "expertmesh_prefix_cache_hit_tokens_total",
            "Prompt tokens taken from cached KV blocks instead of computed.",
            |l| l.prefix_hit_tokens as f64,
        ),
        (
            "expertmesh_prefix_cache_evicted_blocks_total",
            "Cached KV blocks given up for room.",
            |l| l.prefix_evicted_blocks as f64,
        ),
        (
            "expertmesh_prefix_cache_blocks",
            "KV blocks the prefix cache holds.",
            |l| l.prefix_cached_blocks as f64,
        ),
    ];
    per_worker(out, &prefix, loads);
    let timers: [Gauge; 3] = [
        (
            "expertmesh_engine_step_seconds_total",
            "Engine time in steps: planning, the forward pass, sampling, handing tokens on.",
            |l| l.step_seconds,
        ),
        (
            "expertmesh_engine_forward_seconds_total",
            "Engine time in the forward pass.",
            |l| l.forward_seconds,
        ),
        (
            "expertmesh_engine_expert_wait_seconds_total",
            "Engine time blocked waiting for routed experts' answers (not hidden).",
            |l| l.expert_wait_seconds,
        ),
    ];
    per_worker(out, &timers, loads);
}

/// Tokens routed to each expert, every attention worker together.
fn render_routed(out: &mut String, loads: &BTreeMap<u64, WorkerLoad>) {
    let _ = writeln!(out, "# HELP expertmesh_routed_tokens_total Tokens routed to each expert.\n# TYPE expertmesh_routed_tokens_total counter");
    let mut routed: BTreeMap<(usize, usize), u64> = BTreeMap::new();
    for l in loads.values() {
        let e = (l.num_experts as usize).max(1);
        for (i, c) in l.routed_tokens.iter().enumerate() {
            *routed.entry((i / e, i % e)).or_default() += c;
        }
    }
    for ((layer, expert), c) in routed {
        let _ = writeln!(
            out,
            "expertmesh_routed_tokens_total{{moe_layer=\"{layer}\",expert=\"{expert}\"}} {c}"
        );
    }
}
