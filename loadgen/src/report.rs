//! Figures of a run: counts, throughput, latency percentiles, goodput against an SLO, and
//! a per-second timeline; as JSON, with the keys of `vllm bench serve`'s result file beside
//! its own so that tools built for vLLM's results read it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::client::{Failure, Outcome};
use crate::slo::{Goodput, RequestTimes, Slo};

/// Mean, standard deviation, p50, p90, p99 and max of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub mean: f64,
    pub std: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(values: &mut [Duration]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_unstable();
        let at =
            |q: f64| values[((values.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
        let n = values.len() as f64;
        let mean = values.iter().map(|v| v.as_secs_f64() * 1e3).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|v| (v.as_secs_f64() * 1e3 - mean).powi(2))
            .sum::<f64>()
            / n;
        Self {
            mean,
            std: var.sqrt(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Second {
    pub t: u64,
    pub requests_done: usize,
    pub output_tokens: usize,
    pub mean_e2e_ms: f64,
}

/// The report of one run (or one level of a sweep).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub label: String,
    pub requests_ok: usize,
    pub requests_failed: usize,
    /// Failed requests by kind (`connect`, `timeout`, `http_503`, ...).
    pub failures: BTreeMap<String, usize>,
    /// Output tokens as the server's usage reports them (the client's count where it
    /// reported none).
    pub output_tokens: usize,
    /// Output tokens the client counted itself (one per streamed token).
    pub client_counted_tokens: usize,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Prompt tokens as the server's usage reports them (0 where it reported none).
    pub input_tokens: usize,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    /// Per request: the mean time per output token after the first.
    pub tpot_ms: Percentiles,
    pub e2e_ms: Percentiles,
    /// The requests that met the run's SLO, when it has one ([`Report::apply_slo`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goodput: Option<Goodput>,
    pub timeline: Vec<Second>,
    /// Raw samples for plots (not written to JSON).
    #[serde(skip)]
    pub samples: Samples,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples {
    pub ttft: Vec<Duration>,
    pub itl: Vec<Duration>,
    pub e2e: Vec<Duration>,
    /// (start, e2e) per request.
    pub starts: Vec<(Duration, Duration)>,
    /// What an SLO looks at, per request.
    pub requests: Vec<RequestTimes>,
}

impl Report {
    /// Builds the report from the requests that started after `warmup`.
    pub fn build(
        label: &str,
        records: &[Result<Outcome, (Duration, Failure)>],
        warmup: Duration,
    ) -> Self {
        let mut r = Report {
            label: label.to_owned(),
            ..Report::default()
        };
        let mut s = Samples::default();
        let mut end = warmup;
        let mut seconds: BTreeMap<u64, (usize, usize, f64)> = BTreeMap::new();
        for rec in records {
            match rec {
                Ok(o) if o.started >= warmup => {
                    r.requests_ok += 1;
                    let tokens = o.usage_tokens.unwrap_or(o.client_tokens);
                    r.output_tokens += tokens;
                    r.input_tokens += o.prompt_tokens.unwrap_or(0);
                    let tpot = o
                        .ttft
                        .filter(|_| tokens >= 2)
                        .map(|first| o.e2e.saturating_sub(first) / (tokens - 1) as u32);
                    s.requests.push(RequestTimes {
                        ttft: o.ttft,
                        tpot,
                        e2e: o.e2e,
                        output_tokens: tokens,
                    });
                    r.client_counted_tokens += o.client_tokens;
                    s.ttft.extend(o.ttft);
                    s.itl.extend(o.gaps.iter().copied());
                    s.e2e.push(o.e2e);
                    s.starts.push((o.started - warmup, o.e2e));
                    let done = o.started + o.e2e;
                    end = end.max(done);
                    let sec = seconds.entry((done - warmup).as_secs()).or_default();
                    sec.0 += 1;
                    sec.2 += o.e2e.as_secs_f64() * 1e3;
                    // Tokens count in the second they arrived (streamed), else at the end.
                    // A streamed outcome has one arrival per counted token.
                    let streamed = o.client_tokens == o.gaps.len() + 1;
                    match o.ttft.filter(|_| streamed) {
                        Some(first) => {
                            let mut at = o.started + first;
                            seconds.entry((at - warmup).as_secs()).or_default().1 += 1;
                            for g in &o.gaps {
                                at += *g;
                                seconds.entry((at - warmup).as_secs()).or_default().1 += 1;
                            }
                        }
                        None => {
                            seconds.entry((done - warmup).as_secs()).or_default().1 +=
                                o.usage_tokens.unwrap_or(o.client_tokens);
                        }
                    }
                }
                Err((started, f)) if *started >= warmup => {
                    r.requests_failed += 1;
                    *r.failures.entry(f.to_string()).or_default() += 1;
                }
                _ => {}
            }
        }
        r.duration_s = (end - warmup).as_secs_f64().max(1e-9);
        r.requests_per_s = r.requests_ok as f64 / r.duration_s;
        r.output_tokens_per_s = r.output_tokens as f64 / r.duration_s;
        r.ttft_ms = Percentiles::of(&mut s.ttft);
        r.itl_ms = Percentiles::of(&mut s.itl);
        r.tpot_ms =
            Percentiles::of(&mut s.requests.iter().filter_map(|q| q.tpot).collect::<Vec<_>>());
        r.e2e_ms = Percentiles::of(&mut s.e2e);
        r.timeline = seconds
            .into_iter()
            .map(|(t, (n, tokens, e2e))| Second {
                t,
                requests_done: n,
                output_tokens: tokens,
                mean_e2e_ms: e2e / n.max(1) as f64,
            })
            .collect();
        r.samples = s;
        r
    }

    /// Counts the requests that met `slo` (goodput).
    pub fn apply_slo(&mut self, slo: Slo) {
        self.goodput = Some(Goodput::of(slo, &self.samples.requests, self.duration_s));
    }

    /// The report as JSON: its own fields, and beside them the keys of `vllm bench serve`'s
    /// result file (`completed`, `request_throughput`, `mean_/median_/std_/p99_ttft_ms`, the
    /// same for `tpot`, `itl` and `e2el`, `request_goodput` with an SLO).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("a report is plain data");
        let o = v.as_object_mut().expect("a report is an object");
        o.insert("completed".into(), json!(self.requests_ok));
        o.insert("failed".into(), json!(self.requests_failed));
        o.insert("duration".into(), json!(self.duration_s));
        o.insert("total_input_tokens".into(), json!(self.input_tokens));
        o.insert("total_output_tokens".into(), json!(self.output_tokens));
        o.insert("request_throughput".into(), json!(self.requests_per_s));
        o.insert("output_throughput".into(), json!(self.output_tokens_per_s));
        o.insert(
            "total_token_throughput".into(),
            json!((self.input_tokens + self.output_tokens) as f64 / self.duration_s),
        );
        for (name, p) in [
            ("ttft", &self.ttft_ms),
            ("tpot", &self.tpot_ms),
            ("itl", &self.itl_ms),
            ("e2el", &self.e2e_ms),
        ] {
            o.insert(format!("mean_{name}_ms"), json!(p.mean));
            o.insert(format!("median_{name}_ms"), json!(p.p50));
            o.insert(format!("std_{name}_ms"), json!(p.std));
            o.insert(format!("p90_{name}_ms"), json!(p.p90));
            o.insert(format!("p99_{name}_ms"), json!(p.p99));
        }
        if let Some(g) = &self.goodput {
            o.insert("request_goodput".into(), json!(g.request_goodput));
        }
        v
    }

    /// The table printed at the end of a run or sweep.
    pub fn table(reports: &[Report]) -> String {
        let mut out = format!(
            "{:<16} {:>6} {:>6} {:>9} {:>9} {:>21} {:>21} {:>21}\n",
            "level",
            "ok",
            "failed",
            "req/s",
            "tok/s",
            "TTFT ms p50/p90/p99",
            "ITL ms p50/p90/p99",
            "e2e ms p50/p90/p99"
        );
        for r in reports {
            let p = |x: &Percentiles| format!("{:.0}/{:.0}/{:.0}", x.p50, x.p90, x.p99);
            out += &format!(
                "{:<16} {:>6} {:>6} {:>9.2} {:>9.1} {:>21} {:>21} {:>21}\n",
                r.label,
                r.requests_ok,
                r.requests_failed,
                r.requests_per_s,
                r.output_tokens_per_s,
                p(&r.ttft_ms),
                p(&r.itl_ms),
                p(&r.e2e_ms)
            );
            for (kind, n) in &r.failures {
                out += &format!("{:<16} failed: {kind} × {n}\n", "");
            }
            if let Some(g) = &r.goodput {
                out += &format!(
                    "{:<16} goodput: {:.2} req/s, {:.1} tok/s ({:.0}% of the requests met {})\n",
                    "",
                    g.request_goodput,
                    g.output_goodput,
                    g.met_share * 100.0,
                    serde_json::to_string(&g.slo).unwrap_or_default()
                );
            }
        }
        out
    }
}
