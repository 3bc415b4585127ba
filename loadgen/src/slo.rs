//! Service-level objectives and goodput: the requests (and their output tokens) that met
//! every objective, per second — what `vllm bench serve --goodput`, GuideLLM and AIPerf
//! report beside raw throughput, since a server can raise its tokens/s by making each user
//! wait longer.
//!
//! An objective bounds one per-request figure: the time to the first token (`ttft_ms`), the
//! mean time per output token after the first (`tpot_ms`, also spelt `itl_ms`: a request's
//! mean inter-token latency), or the whole request (`e2e_ms`). A request meets the SLO when
//! it meets every objective given. A request of one token has no time per output token:
//! it meets any `tpot_ms` (vLLM counts its TPOT as 0); one with no first token meets no
//! `ttft_ms`.

use std::time::Duration;

use serde::Serialize;

/// The objectives of a run, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpot_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e2e_ms: Option<f64>,
}

/// What the SLO looks at in one request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestTimes {
    pub ttft: Option<Duration>,
    /// Mean time per output token after the first.
    pub tpot: Option<Duration>,
    pub e2e: Duration,
    pub output_tokens: usize,
}

impl std::str::FromStr for Slo {
    type Err = String;

    /// `ttft_ms=500,tpot_ms=50,e2e_ms=10000` (any of them; `itl_ms` is `tpot_ms`).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut slo = Slo::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || {
                format!(
                    "`{part}`: an objective is ttft_ms=N, tpot_ms=N (itl_ms=N) or e2e_ms=N, N > 0"
                )
            };
            let (key, value) = part.split_once('=').ok_or_else(bad)?;
            let value: f64 = value.trim().parse().map_err(|_| bad())?;
            if !(value.is_finite() && value > 0.0) {
                return Err(bad());
            }
            let slot = match key.trim() {
                "ttft_ms" => &mut slo.ttft_ms,
                "tpot_ms" | "itl_ms" => &mut slo.tpot_ms,
                "e2e_ms" => &mut slo.e2e_ms,
                _ => return Err(bad()),
            };
            *slot = Some(value);
        }
        if slo == Slo::default() {
            return Err(format!("`{s}` sets no objective"));
        }
        Ok(slo)
    }
}

impl Slo {
    /// Whether one request met every objective.
    pub fn met(&self, r: &RequestTimes) -> bool {
        let within = |bound: Option<f64>, got: Option<Duration>| match (bound, got) {
            (None, _) => true,
            (Some(b), Some(d)) => d.as_secs_f64() * 1e3 <= b,
            (Some(_), None) => false,
        };
        let tpot = r.tpot.or((r.output_tokens <= 1).then_some(Duration::ZERO));
        within(self.ttft_ms, r.ttft)
            && within(self.tpot_ms, tpot)
            && within(self.e2e_ms, Some(r.e2e))
    }
}

/// The requests of a run that met its SLO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Goodput {
    pub slo: Slo,
    pub requests_met: usize,
    /// Share of the successful requests that met the SLO.
    pub met_share: f64,
    /// Requests per second that met the SLO.
    pub request_goodput: f64,
    /// Output tokens per second of the requests that met the SLO.
    pub output_goodput: f64,
}

impl Goodput {
    /// Goodput of `requests` over `duration_s` seconds.
    pub fn of(slo: Slo, requests: &[RequestTimes], duration_s: f64) -> Self {
        let met: Vec<&RequestTimes> = requests.iter().filter(|r| slo.met(r)).collect();
        let tokens: usize = met.iter().map(|r| r.output_tokens).sum();
        Self {
            slo,
            requests_met: met.len(),
            met_share: met.len() as f64 / requests.len().max(1) as f64,
            request_goodput: met.len() as f64 / duration_s.max(1e-9),
            output_goodput: tokens as f64 / duration_s.max(1e-9),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn objectives_parse_and_bad_ones_are_refused() {
        let slo: Slo = "ttft_ms=500, itl_ms=50".parse().unwrap();
        assert_eq!(
            slo,
            Slo {
                ttft_ms: Some(500.0),
                tpot_ms: Some(50.0),
                e2e_ms: None
            }
        );
        assert_eq!("e2e_ms=2000".parse::<Slo>().unwrap().e2e_ms, Some(2000.0));
        for bad in [
            "",
            "ttft=5",
            "ttft_ms",
            "ttft_ms=-1",
            "ttft_ms=x",
            "e2e_ms=inf",
        ] {
            assert!(bad.parse::<Slo>().is_err(), "{bad}");
        }
    }

    /// Goodput against requests of known latencies: only those within every bound count.
    #[test]
    fn goodput_counts_the_requests_within_every_objective() {
        let request = |ttft, tpot: Option<u64>, e2e, tokens| RequestTimes {
            ttft: Some(ms(ttft)),
            tpot: tpot.map(ms),
            e2e: ms(e2e),
            output_tokens: tokens,
        };
        let requests = [
            request(100, Some(20), 900, 10),  // meets all
            request(600, Some(20), 900, 10),  // first token too late
            request(100, Some(80), 900, 10),  // too slow per token
            request(100, None, 150, 1),       // one token: meets any tpot
            request(100, Some(20), 3000, 50), // too long in all
        ];
        let slo: Slo = "ttft_ms=500,tpot_ms=50,e2e_ms=2000".parse().unwrap();
        let g = Goodput::of(slo, &requests, 2.0);
        assert_eq!(g.requests_met, 2);
        assert_eq!((g.request_goodput, g.output_goodput), (1.0, 5.5));
        assert_eq!(g.met_share, 0.4);
        // Without a tpot bound, the slow one per token meets the others too.
        let slo: Slo = "ttft_ms=500,e2e_ms=2000".parse().unwrap();
        assert_eq!(Goodput::of(slo, &requests, 2.0).requests_met, 3);
    }
}
