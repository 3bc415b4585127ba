//! SVG plots of a run, drawn with plotters (text is SVG text the viewer renders: no font
//! files): latency distributions, throughput and latency over time, the throughput-latency
//! curve and the Pareto curve of a sweep, and, from an expertmesh `/metrics` page, the
//! per-layer × per-expert routed load and per-worker load. Each function returns the SVG
//! document; the caller writes it or puts it on the HTML page.

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::Report;

/// The two series colours; fills use them solid, so a rendered page can be checked for them.
pub const BLUE: RGBColor = RGBColor(40, 90, 200);
pub const ORANGE: RGBColor = RGBColor(230, 120, 30);
const FONT: &str = "sans-serif";

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Drawn = Result<(), Box<dyn std::error::Error>>;
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// An SVG of `size` pixels, white, with `draw` run on its drawing area.
fn svg(size: (u32, u32), draw: impl FnOnce(&Area) -> Drawn) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        draw(&root).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// The upper end of an axis showing values up to `max` (never an empty range).
fn top(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        max * 1.05
    } else {
        1.0
    }
}

fn ms(v: &[std::time::Duration]) -> Vec<f64> {
    v.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

/// A chart on `area` titled `title` over `x` × `y`, its axes described and gridded.
fn axes<'a, 'b>(
    area: &'a Area<'b>,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<Chart<'a, 'b>, Box<dyn std::error::Error>> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 18))
        .margin(10)
        .x_label_area_size(38)
        .y_label_area_size(58)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    Ok(chart)
}

/// A histogram of `values_ms` in 40 bins on `area`.
fn histogram(area: &Area, title: &str, unit: &str, values_ms: &[f64], color: RGBColor) -> Drawn {
    const BINS: usize = 40;
    let max = values_ms.iter().copied().fold(0.0, f64::max).max(1e-6);
    let width = max / BINS as f64;
    let mut counts = [0usize; BINS];
    for v in values_ms {
        counts[((v / width) as usize).min(BINS - 1)] += 1;
    }
    let most = counts.iter().copied().max().unwrap_or(0) as f64;
    let mut chart = axes(area, title, ("ms", unit), 0.0..max, 0.0..top(most))?;
    chart.draw_series(
        counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| {
                let x = i as f64 * width;
                Rectangle::new([(x, 0.0), (x + width * 0.9, *n as f64)], color.filled())
            }),
    )?;
    Ok(())
}

/// Latency distributions: time to first token, inter-token latency, end to end.
pub fn latency(report: &Report) -> Result<String, String> {
    let s = &report.samples;
    svg((900, 780), |root| {
        let panels = root.split_evenly((3, 1));
        histogram(
            &panels[0],
            "Time to first token",
            "requests",
            &ms(&s.ttft),
            BLUE,
        )?;
        histogram(
            &panels[1],
            "Inter-token latency",
            "tokens",
            &ms(&s.itl),
            ORANGE,
        )?;
        histogram(&panels[2], "End to end", "requests", &ms(&s.e2e), BLUE)
    })
}

/// Output tokens/s in each second of the run, and each request's end-to-end latency by its
/// start.
pub fn timeline(report: &Report) -> Result<String, String> {
    svg((900, 560), |root| {
        let (upper, lower) = root.split_vertically(280);
        let t_max = report.timeline.last().map_or(1.0, |s| s.t as f64 + 1.0);
        let tok_max = report
            .timeline
            .iter()
            .map(|s| s.output_tokens as f64)
            .fold(0.0, f64::max);
        let mut chart = axes(
            &upper,
            "Output tokens/s over time",
            ("s", "tokens/s"),
            0.0..t_max,
            0.0..top(tok_max),
        )?;
        let points = report
            .timeline
            .iter()
            .map(|s| (s.t as f64 + 0.5, s.output_tokens as f64));
        chart.draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(2)))?;
        chart.draw_series(points.map(|p| Circle::new(p, 3, BLUE.filled())))?;
        let starts = &report.samples.starts;
        let span = starts
            .iter()
            .map(|(s, _)| s.as_secs_f64())
            .fold(0.0, f64::max);
        let e2e_max = starts
            .iter()
            .map(|(_, e)| e.as_secs_f64() * 1e3)
            .fold(0.0, f64::max);
        let mut chart = axes(
            &lower,
            "End to end by start time",
            ("s", "ms"),
            0.0..top(span),
            0.0..top(e2e_max),
        )?;
        chart.draw_series(starts.iter().map(|(s, e)| {
            Circle::new((s.as_secs_f64(), e.as_secs_f64() * 1e3), 3, ORANGE.filled())
        }))?;
        Ok(())
    })
}

/// The level's value on a sweep's axis: what follows `=` in its label ("concurrency=4").
fn level(report: &Report) -> &str {
    report.label.split('=').nth(1).unwrap_or(&report.label)
}

/// A sweep's throughput-latency curve: end-to-end p50 and p99 against output tokens/s,
/// each point named by its level.
pub fn sweep(reports: &[Report]) -> Result<String, String> {
    svg((900, 520), |root| {
        let x_max = reports
            .iter()
            .map(|r| r.output_tokens_per_s)
            .fold(0.0, f64::max);
        let y_max = reports.iter().map(|r| r.e2e_ms.p99).fold(0.0, f64::max);
        let mut chart = axes(
            root,
            "End-to-end latency against throughput",
            ("output tokens/s", "end to end, ms"),
            0.0..top(x_max),
            0.0..top(y_max),
        )?;
        let p50: fn(&Report) -> f64 = |r| r.e2e_ms.p50;
        let p99: fn(&Report) -> f64 = |r| r.e2e_ms.p99;
        for (name, get, color) in [("p50", p50, BLUE), ("p99", p99, ORANGE)] {
            let points: Vec<(f64, f64)> = reports
                .iter()
                .map(|r| (r.output_tokens_per_s, get(r)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        chart.draw_series(reports.iter().map(|r| {
            Text::new(
                level(r).to_owned(),
                (r.output_tokens_per_s, r.e2e_ms.p50),
                (FONT, 14),
            )
        }))?;
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        Ok(())
    })
}

/// Tokens per second one user sees at a level: 1000 / the median time per output token.
pub fn per_user_tokens_per_s(report: &Report) -> f64 {
    if report.tpot_ms.p50 > 0.0 {
        1e3 / report.tpot_ms.p50
    } else {
        0.0
    }
}

/// The levels on the Pareto front of (total tokens/s, tokens/s per user): no other level
/// is at least as good on both and better on one. Indices, by total tokens/s.
pub fn pareto_front(reports: &[Report]) -> Vec<usize> {
    let point = |r: &Report| (r.output_tokens_per_s, per_user_tokens_per_s(r));
    let mut front: Vec<usize> = (0..reports.len())
        .filter(|&i| {
            let (a, b) = point(&reports[i]);
            !reports.iter().any(|o| {
                let (x, y) = point(o);
                x >= a && y >= b && (x > a || y > b)
            })
        })
        .collect();
    front.sort_by(|&i, &j| {
        reports[i]
            .output_tokens_per_s
            .total_cmp(&reports[j].output_tokens_per_s)
    });
    front
}

/// A sweep's Pareto curve: tokens/s per user against total output tokens/s, every level a
/// point, the front joined.
pub fn pareto(reports: &[Report]) -> Result<String, String> {
    svg((900, 520), |root| {
        let x_max = reports
            .iter()
            .map(|r| r.output_tokens_per_s)
            .fold(0.0, f64::max);
        let y_max = reports
            .iter()
            .map(per_user_tokens_per_s)
            .fold(0.0, f64::max);
        let mut chart = axes(
            root,
            "Tokens/s per user against total tokens/s",
            (
                "output tokens/s, all users",
                "tokens/s per user (1000 / median TPOT)",
            ),
            0.0..top(x_max),
            0.0..top(y_max),
        )?;
        let at = |r: &Report| (r.output_tokens_per_s, per_user_tokens_per_s(r));
        let front: Vec<(f64, f64)> = pareto_front(reports)
            .into_iter()
            .map(|i| at(&reports[i]))
            .collect();
        chart.draw_series(LineSeries::new(front, BLUE.stroke_width(2)))?;
        chart.draw_series(
            reports
                .iter()
                .map(|r| Circle::new(at(r), 5, ORANGE.filled())),
        )?;
        chart.draw_series(
            reports
                .iter()
                .map(|r| Text::new(level(r).to_owned(), at(r), (FONT, 14))),
        )?;
        Ok(())
    })
}

/// Values of a metric by label set, from a Prometheus text page.
pub fn metric_values(page: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    page.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| {
            let (head, value) = l.rsplit_once(' ')?;
            let labels = head
                .find('{')
                .map(|i| {
                    head[i + 1..head.len() - 1]
                        .split(',')
                        .filter_map(|kv| {
                            let (k, v) = kv.split_once('=')?;
                            Some((k.to_owned(), v.trim_matches('"').to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

fn label(labels: &[(String, String)], key: &str) -> Option<usize> {
    labels.iter().find(|(k, _)| k == key)?.1.parse().ok()
}

/// White to blue as `t` goes from 0 to 1.
fn heat(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    RGBColor(
        (255.0 - 215.0 * t) as u8,
        (255.0 - 165.0 * t) as u8,
        (255.0 - 55.0 * t) as u8,
    )
}

/// Routed tokens per MoE layer (rows) and expert (columns) from expertmesh's `/metrics`.
pub fn expert_heatmap(page: &str) -> Result<String, String> {
    let cells: Vec<(usize, usize, f64)> = metric_values(page, "expertmesh_routed_tokens_total")
        .into_iter()
        .filter_map(|(l, v)| Some((label(&l, "moe_layer")?, label(&l, "expert")?, v)))
        .filter(|(l, e, _)| *l < 1024 && *e < 4096)
        .collect();
    if cells.is_empty() {
        return Err("the target's /metrics has no expertmesh_routed_tokens_total".into());
    }
    let layers = cells.iter().map(|c| c.0).max().unwrap_or(0) + 1;
    let experts = cells.iter().map(|c| c.1).max().unwrap_or(0) + 1;
    let max = cells.iter().map(|c| c.2).fold(0.0, f64::max).max(1.0);
    let height = (layers as u32 * 40).clamp(160, 600) + 90;
    svg((900, height), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("Routed tokens per MoE layer × expert (darkest = {max:.0})"),
                (FONT, 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5..experts as f64 - 0.5, -0.5..layers as f64 - 0.5)?;
        // Cells centred on whole numbers, so each tick names its row or column.
        let whole = |v: &f64| {
            if (v - v.round()).abs() < 1e-6 {
                format!("{v:.0}")
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("expert")
            .y_desc("MoE layer")
            .y_labels(layers.min(16))
            .x_label_formatter(&whole)
            .y_label_formatter(&whole)
            .draw()?;
        chart.draw_series(cells.iter().map(|&(l, e, v)| {
            let (x, y) = (e as f64 - 0.5, l as f64 - 0.5);
            Rectangle::new([(x, y), (x + 1.0, y + 1.0)], heat(v / max).filled())
        }))?;
        Ok(())
    })
}

/// Per-worker load from expertmesh's `/metrics`: running sequences and KV blocks in use.
pub fn worker_load(page: &str) -> Result<String, String> {
    let running = metric_values(page, "expertmesh_running_sequences");
    let kv = metric_values(page, "expertmesh_kv_blocks_used");
    if running.is_empty() && kv.is_empty() {
        return Err("the target's /metrics has no per-worker load".into());
    }
    svg((900, 520), |root| {
        let panels = root.split_evenly((2, 1));
        for ((title, values, color), area) in [
            ("Running sequences by worker", running, BLUE),
            ("KV blocks used by worker", kv, ORANGE),
        ]
        .into_iter()
        .zip(panels.iter())
        {
            let most = values.iter().map(|v| v.1).fold(0.0, f64::max);
            let names: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, (l, _))| label(l, "worker").unwrap_or(i).to_string())
                .collect();
            let mut chart = ChartBuilder::on(area)
                .caption(title, (FONT, 18))
                .margin(8)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d(-0.5..values.len().max(1) as f64 - 0.5, 0.0..top(most))?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_desc("worker")
                .x_labels(values.len().max(1))
                .x_label_formatter(&|x| {
                    let whole = (x - x.round()).abs() < 1e-6 && *x >= 0.0;
                    let name = whole.then(|| names.get(x.round() as usize)).flatten();
                    name.cloned().unwrap_or_default()
                })
                .draw()?;
            chart.draw_series(values.iter().enumerate().map(|(i, (_, v))| {
                let x = i as f64;
                Rectangle::new([(x - 0.35, 0.0), (x + 0.35, *v)], color.filled())
            }))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Percentiles;

    #[test]
    fn metrics_pages_parse() {
        let page = "# HELP x\nexpertmesh_routed_tokens_total{moe_layer=\"1\",expert=\"3\"} 7\nexpertmesh_kv_blocks_used{worker=\"2\"} 5\n";
        let v = metric_values(page, "expertmesh_routed_tokens_total");
        assert_eq!(v.len(), 1);
        assert_eq!(
            (
                label(&v[0].0, "moe_layer"),
                label(&v[0].0, "expert"),
                v[0].1
            ),
            (Some(1), Some(3), 7.0)
        );
        assert!(metric_values(page, "expertmesh_kv_blocks").is_empty());
        let svg = expert_heatmap(page).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<rect"), "{svg}");
        assert!(worker_load(page).unwrap().contains("<rect"));
        assert!(expert_heatmap("").is_err() && worker_load("").is_err());
    }

    fn level(label: &str, tokens_per_s: f64, tpot_p50: f64) -> Report {
        Report {
            label: label.into(),
            output_tokens_per_s: tokens_per_s,
            tpot_ms: Percentiles {
                p50: tpot_p50,
                ..Percentiles::default()
            },
            ..Report::default()
        }
    }

    /// The front keeps the levels nothing beats on both axes, ordered by throughput.
    #[test]
    fn the_pareto_front_drops_dominated_levels() {
        let levels = [
            level("c=1", 50.0, 10.0),  // 100 tok/s per user
            level("c=4", 160.0, 25.0), // 40 per user
            level("c=8", 150.0, 50.0), // 20 per user: beaten by c=4 on both
            level("c=16", 300.0, 50.0),
        ];
        assert_eq!(pareto_front(&levels), vec![0, 1, 3]);
        assert_eq!(per_user_tokens_per_s(&levels[0]), 100.0);
        let svg = pareto(&levels).unwrap();
        assert_eq!(svg.matches("<circle").count(), 4, "every level a point");
    }

    /// Empty reports still draw (axes with a non-empty range), never panic.
    #[test]
    fn empty_reports_draw() {
        let empty = Report::default();
        for svg in [
            latency(&empty),
            timeline(&empty),
            sweep(std::slice::from_ref(&empty)),
            pareto(std::slice::from_ref(&empty)),
        ] {
            assert!(svg.unwrap().starts_with("<svg"));
        }
    }
}
