//! Repeated runs of one level: the mean of each headline figure over the runs and its 95%
//! confidence interval (Student's t, the runs taken as independent samples), so that two
//! configurations are compared by more than one noisy run each.

use serde::Serialize;

use crate::report::Report;

/// A figure's mean over the runs and the half-width of its 95% confidence interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MeanCi {
    pub mean: f64,
    pub ci95: f64,
}

/// Student's t at 97.5% for `dof` degrees of freedom.
fn t975(dof: usize) -> f64 {
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    match dof {
        0 => f64::NAN,
        1..=10 => T[dof - 1],
        11..=20 => 2.1,
        21..=30 => 2.05,
        _ => 1.96,
    }
}

impl MeanCi {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return Self::default();
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        if n == 1 {
            return Self { mean, ci95: 0.0 };
        }
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        Self {
            mean,
            ci95: t975(n - 1) * (var / n as f64).sqrt(),
        }
    }
}

/// One level over its runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub label: String,
    pub runs: usize,
    pub requests_per_s: MeanCi,
    pub output_tokens_per_s: MeanCi,
    pub ttft_p50_ms: MeanCi,
    pub itl_p50_ms: MeanCi,
    pub e2e_p50_ms: MeanCi,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_goodput: Option<MeanCi>,
}

impl Summary {
    pub fn of(label: &str, runs: &[Report]) -> Self {
        let over = |f: fn(&Report) -> f64| MeanCi::of(&runs.iter().map(f).collect::<Vec<_>>());
        let goodput: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.goodput.map(|g| g.request_goodput))
            .collect();
        Self {
            label: label.to_owned(),
            runs: runs.len(),
            requests_per_s: over(|r| r.requests_per_s),
            output_tokens_per_s: over(|r| r.output_tokens_per_s),
            ttft_p50_ms: over(|r| r.ttft_ms.p50),
            itl_p50_ms: over(|r| r.itl_ms.p50),
            e2e_p50_ms: over(|r| r.e2e_ms.p50),
            request_goodput: (!goodput.is_empty()).then(|| MeanCi::of(&goodput)),
        }
    }

    /// One line: `label  over N runs: X ± Y tok/s, TTFT p50 ...`.
    pub fn line(&self) -> String {
        let f =
            |m: &MeanCi, digits: usize| format!("{:.*} ± {:.*}", digits, m.mean, digits, m.ci95);
        format!(
            "{:<16} over {} runs (mean ± 95% CI): {} req/s, {} tok/s, TTFT p50 {} ms, ITL p50 {} ms, e2e p50 {} ms\n",
            self.label,
            self.runs,
            f(&self.requests_per_s, 2),
            f(&self.output_tokens_per_s, 1),
            f(&self.ttft_p50_ms, 1),
            f(&self.itl_p50_ms, 1),
            f(&self.e2e_p50_ms, 1)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_follows_students_t() {
        assert_eq!(MeanCi::of(&[]), MeanCi::default());
        assert_eq!(
            MeanCi::of(&[4.0]),
            MeanCi {
                mean: 4.0,
                ci95: 0.0
            }
        );
        // Mean 2, sample sd 1, n = 3: 4.303 · 1/√3.
        let m = MeanCi::of(&[1.0, 2.0, 3.0]);
        assert_eq!(m.mean, 2.0);
        assert!((m.ci95 - 4.303 / 3f64.sqrt()).abs() < 1e-9, "{m:?}");
        let runs = [
            Report {
                requests_per_s: 1.0,
                ..Report::default()
            },
            Report {
                requests_per_s: 3.0,
                ..Report::default()
            },
        ];
        let s = Summary::of("c=1", &runs);
        assert_eq!((s.runs, s.requests_per_s.mean), (2, 2.0));
        assert!(s.line().starts_with("c=1"));
    }
}
