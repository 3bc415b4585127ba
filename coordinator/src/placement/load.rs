//! The expert load window: routed tokens per (MoE layer, expert), summed over attention
//! workers from the cumulative counters in their heartbeats.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use expertmesh_proto::v1 as pb;

/// Half-life of the expert load window.
const LOAD_HALF_LIFE: Duration = Duration::from_secs(30);
/// Routed-token counters longer than this are ignored (a hostile or broken report).
const LOAD_COUNTERS_MAX: usize = 1 << 20;

/// Routed tokens per (MoE layer, expert), summed over attention workers from their
/// cumulative heartbeat counters, decaying with a 30 s half-life.
#[derive(Debug, Default)]
pub struct LoadWindow {
    last: HashMap<u64, Vec<u64>>,
    window: Vec<f64>,
    num_experts: usize,
    updated: Option<Instant>,
}

impl LoadWindow {
    pub fn record(&mut self, worker: u64, load: &pb::WorkerLoad) {
        let n = load.routed_tokens.len();
        let e = load.num_experts as usize;
        if e == 0 || n == 0 || !n.is_multiple_of(e) || n > LOAD_COUNTERS_MAX {
            return;
        }
        if self.window.len() != n || self.num_experts != e {
            self.window = vec![0.0; n];
            self.num_experts = e;
            self.last.clear();
        }
        let now = Instant::now();
        if let Some(t) = self.updated {
            let halves = now.duration_since(t).as_secs_f64() / LOAD_HALF_LIFE.as_secs_f64();
            let decay = 0.5f64.powf(halves);
            self.window.iter_mut().for_each(|w| *w *= decay);
        }
        self.updated = Some(now);
        let previous = self.last.insert(worker, load.routed_tokens.clone());
        for (i, &now) in load.routed_tokens.iter().enumerate() {
            let before = previous
                .as_ref()
                .and_then(|p| p.get(i))
                .copied()
                .unwrap_or(0);
            // A restarted worker counts from zero again.
            let delta = if now >= before { now - before } else { now };
            self.window[i] += delta as f64;
        }
    }

    /// (MoE layers, the window layer-major).
    pub fn matrix(&self) -> (usize, Vec<f64>) {
        match self.num_experts {
            0 => (0, Vec::new()),
            e => (self.window.len() / e, self.window.clone()),
        }
    }

    /// Load per expert, summed over layers (a placement holds an expert in every layer).
    pub fn per_expert(&self, num_experts: usize) -> Vec<f64> {
        let mut out = vec![0.0; num_experts];
        if self.num_experts == num_experts {
            for (i, w) in self.window.iter().enumerate() {
                out[i % num_experts] += w;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(counters: &[u64]) -> pb::WorkerLoad {
        pb::WorkerLoad {
            routed_tokens: counters.to_vec(),
            num_experts: 2,
            ..Default::default()
        }
    }

    #[test]
    fn load_window_sums_deltas_across_workers_and_restarts() {
        let mut w = LoadWindow::default();
        // Two MoE layers of two experts, layer-major.
        w.record(1, &report(&[10, 0, 5, 5]));
        w.record(2, &report(&[0, 4, 0, 0]));
        w.record(1, &report(&[12, 0, 5, 9]));
        // Worker 2 restarted: its counters start from zero again.
        w.record(2, &report(&[1, 0, 0, 0]));
        let (layers, m) = w.matrix();
        assert_eq!(layers, 2);
        let rounded: Vec<f64> = m.iter().map(|v| v.round()).collect();
        assert_eq!(rounded, vec![13.0, 4.0, 5.0, 9.0]);
        let per: Vec<f64> = w.per_expert(2).iter().map(|v| v.round()).collect();
        assert_eq!(per, vec![18.0, 13.0]);
        // A malformed report is ignored.
        w.record(
            3,
            &pb::WorkerLoad {
                routed_tokens: vec![1, 2, 3],
                num_experts: 2,
                ..Default::default()
            },
        );
        assert_eq!(w.matrix().1.len(), 4);
    }
}
