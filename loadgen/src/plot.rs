//! PNG plots of a run, drawn on a plain RGB canvas with a 3×5 pixel font (no font files,
//! no plotting dependency): latency distributions, throughput and latency over time, the
//! throughput-latency curve of a sweep, and, from an expertmesh `/metrics` page, the
//! per-layer × per-expert routed load and per-worker load.

use std::path::Path;

use crate::report::Report;

type Rgb = [u8; 3];
const BLACK: Rgb = [20, 20, 20];
const GREY: Rgb = [200, 200, 200];
const BLUE: Rgb = [40, 90, 200];
const ORANGE: Rgb = [230, 120, 30];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    fn line(&mut self, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            self.set(x0, y0, c);
            if x0 == x1 && y0 == y1 {
                return;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    /// Text in the 3×5 font, scaled ×2, upper-cased.
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb) {
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch.to_ascii_uppercase());
            for row in 0..5 {
                for col in 0..3 {
                    if g >> (14 - (row * 3 + col)) & 1 == 1 {
                        let (px, py) = (x + (k as i64) * 8 + col * 2, y + row * 2);
                        self.rect(px, py, px + 1, py + 1, c);
                    }
                }
            }
        }
    }

    fn save(&self, path: &Path) -> Result<(), String> {
        let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut enc =
            png::Encoder::new(std::io::BufWriter::new(file), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| e.to_string())?;
        writer.write_image_data(&self.px).map_err(|e| e.to_string())
    }
}

/// 3×5 glyphs, rows top to bottom, 3 bits each (left bit first).
fn glyph(c: char) -> u16 {
    let rows: [u8; 5] = match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '/' => [1, 1, 2, 4, 4],
        ':' => [0, 2, 0, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        '_' => [0, 0, 0, 0, 7],
        '%' => [5, 1, 2, 4, 5],
        ',' => [0, 0, 0, 2, 4],
        _ => [0; 5],
    };
    rows.iter().fold(0u16, |acc, r| (acc << 3) | u16::from(*r))
}

/// A chart panel with axes and min/max labels; maps data to pixels.
struct Panel {
    x0: i64,
    y0: i64,
    w: i64,
    h: i64,
    xmax: f64,
    ymax: f64,
}

impl Panel {
    fn draw(
        c: &mut Canvas,
        (x0, y0, w, h): (i64, i64, i64, i64),
        title: &str,
        xlabel: &str,
        xmax: f64,
        ymax: f64,
    ) -> Self {
        let (xmax, ymax) = (xmax.max(1e-9), ymax.max(1e-9));
        c.text(x0, y0 - 16, title, BLACK);
        c.line((x0, y0 + h), (x0 + w, y0 + h), BLACK);
        c.line((x0, y0), (x0, y0 + h), BLACK);
        for k in 1..4 {
            let y = y0 + h - h * k / 4;
            c.line((x0 + 1, y), (x0 + w, y), GREY);
        }
        c.text(x0 - 8 * fmt(ymax).len() as i64 - 4, y0, &fmt(ymax), BLACK);
        c.text(x0 - 12, y0 + h - 8, "0", BLACK);
        c.text(
            x0 + w - 8 * fmt(xmax).len() as i64,
            y0 + h + 6,
            &fmt(xmax),
            BLACK,
        );
        c.text(
            x0 + w / 2 - 4 * xlabel.len() as i64,
            y0 + h + 6,
            xlabel,
            BLACK,
        );
        Self {
            x0,
            y0,
            w,
            h,
            xmax,
            ymax,
        }
    }

    fn at(&self, x: f64, y: f64) -> (i64, i64) {
        (
            self.x0 + ((x / self.xmax).clamp(0.0, 1.0) * self.w as f64) as i64,
            self.y0 + self.h - ((y / self.ymax).clamp(0.0, 1.0) * self.h as f64) as i64,
        )
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn histogram(
    c: &mut Canvas,
    frame: (i64, i64, i64, i64),
    title: &str,
    values_ms: &[f64],
    color: Rgb,
) {
    const BINS: usize = 40;
    let max = values_ms.iter().copied().fold(0.0, f64::max).max(1e-6);
    let mut counts = [0usize; BINS];
    for v in values_ms {
        counts[((v / max) * (BINS - 1) as f64) as usize] += 1;
    }
    let top = *counts.iter().max().unwrap_or(&1) as f64;
    let p = Panel::draw(c, frame, title, "MS", max, top);
    let bw = p.w / BINS as i64;
    for (i, n) in counts.iter().enumerate() {
        if *n > 0 {
            let (_, y) = p.at(0.0, *n as f64);
            let x = p.x0 + i as i64 * bw + 1;
            c.rect(x, y, x + bw - 2, p.y0 + p.h - 1, color);
        }
    }
}

/// Latency distributions: time to first token, inter-token latency, end to end.
pub fn latency(report: &Report, path: &Path) -> Result<(), String> {
    let mut c = Canvas::new(900, 720);
    let ms =
        |v: &[std::time::Duration]| v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>();
    let s = &report.samples;
    histogram(
        &mut c,
        (90, 40, 780, 160),
        "TIME TO FIRST TOKEN - REQUESTS PER BIN",
        &ms(&s.ttft),
        BLUE,
    );
    histogram(
        &mut c,
        (90, 270, 780, 160),
        "INTER-TOKEN LATENCY - TOKENS PER BIN",
        &ms(&s.itl),
        ORANGE,
    );
    histogram(
        &mut c,
        (90, 500, 780, 160),
        "END TO END - REQUESTS PER BIN",
        &ms(&s.e2e),
        BLUE,
    );
    c.save(path)
}

/// Output tokens/s per second of the run, and each request's end-to-end latency by start.
pub fn timeline(report: &Report, path: &Path) -> Result<(), String> {
    let mut c = Canvas::new(900, 520);
    let t_max = report.timeline.last().map_or(1.0, |s| s.t as f64 + 1.0);
    let tok_max = report
        .timeline
        .iter()
        .map(|s| s.output_tokens as f64)
        .fold(0.0, f64::max);
    let p = Panel::draw(
        &mut c,
        (90, 40, 780, 180),
        "OUTPUT TOKENS/S OVER TIME",
        "S",
        t_max,
        tok_max,
    );
    let points: Vec<(i64, i64)> = report
        .timeline
        .iter()
        .map(|s| p.at(s.t as f64 + 0.5, s.output_tokens as f64))
        .collect();
    for w in points.windows(2) {
        c.line(w[0], w[1], BLUE);
    }
    let starts = &report.samples.starts;
    let e2e_max = starts
        .iter()
        .map(|(_, e)| e.as_secs_f64() * 1e3)
        .fold(0.0, f64::max);
    let span = starts
        .iter()
        .map(|(s, _)| s.as_secs_f64())
        .fold(1.0, f64::max);
    let p = Panel::draw(
        &mut c,
        (90, 300, 780, 180),
        "END TO END MS BY START TIME",
        "S",
        span,
        e2e_max,
    );
    for (s, e) in starts {
        let (x, y) = p.at(s.as_secs_f64(), e.as_secs_f64() * 1e3);
        c.rect(x - 1, y - 1, x + 1, y + 1, ORANGE);
    }
    c.save(path)
}

/// A sweep's throughput-latency curve: output tokens/s against p50 and p99 end to end.
pub fn sweep(reports: &[Report], path: &Path) -> Result<(), String> {
    let mut c = Canvas::new(900, 520);
    let x_max = reports
        .iter()
        .map(|r| r.output_tokens_per_s)
        .fold(0.0, f64::max);
    let y_max = reports.iter().map(|r| r.e2e_ms.p99).fold(0.0, f64::max);
    let p = Panel::draw(
        &mut c,
        (90, 50, 780, 400),
        "E2E MS P50 BLUE P99 ORANGE BY OUTPUT TOKENS/S",
        "TOK/S",
        x_max,
        y_max,
    );
    let p50: fn(&Report) -> f64 = |r| r.e2e_ms.p50;
    let p99: fn(&Report) -> f64 = |r| r.e2e_ms.p99;
    for (get, color) in [(p50, BLUE), (p99, ORANGE)] {
        let pts: Vec<(i64, i64)> = reports
            .iter()
            .map(|r| p.at(r.output_tokens_per_s, get(r)))
            .collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], color);
        }
        for (k, &(x, y)) in pts.iter().enumerate() {
            c.rect(x - 2, y - 2, x + 2, y + 2, color);
            if color == BLUE {
                c.text(
                    x + 4,
                    y - 14,
                    reports[k].label.split('=').nth(1).unwrap_or(""),
                    BLACK,
                );
            }
        }
    }
    c.save(path)
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

/// Routed tokens per MoE layer (rows) and expert (columns) from expertmesh's `/metrics`.
pub fn expert_heatmap(page: &str, path: &Path) -> Result<(), String> {
    let cells: Vec<(usize, usize, f64)> = metric_values(page, "expertmesh_routed_tokens_total")
        .into_iter()
        .filter_map(|(l, v)| Some((label(&l, "moe_layer")?, label(&l, "expert")?, v)))
        .collect();
    if cells.is_empty() {
        return Err("the target's /metrics has no expertmesh_routed_tokens_total".into());
    }
    let layers = cells.iter().map(|c| c.0).max().unwrap_or(0) + 1;
    let experts = cells.iter().map(|c| c.1).max().unwrap_or(0) + 1;
    let max = cells.iter().map(|c| c.2).fold(0.0, f64::max).max(1.0);
    let cw = (820 / experts).clamp(2, 40) as i64;
    let ch = (360 / layers).clamp(4, 60) as i64;
    let mut c = Canvas::new(
        (cw * experts as i64 + 120) as usize,
        (ch * layers as i64 + 110) as usize,
    );
    c.text(
        60,
        12,
        &format!("ROUTED TOKENS PER MOE LAYER X EXPERT - MAX {}", fmt(max)),
        BLACK,
    );
    for (l, e, v) in cells {
        let t = v / max;
        let color = [
            (255.0 - 215.0 * t) as u8,
            (255.0 - 165.0 * t) as u8,
            (255.0 - 55.0 * t) as u8,
        ];
        let (x, y) = (60 + e as i64 * cw, 40 + l as i64 * ch);
        c.rect(x, y, x + cw - 1, y + ch - 1, color);
    }
    for l in 0..layers {
        c.text(20, 40 + l as i64 * ch + ch / 2 - 5, &l.to_string(), BLACK);
    }
    c.text(60, 40 + ch * layers as i64 + 8, "EXPERT 0", BLACK);
    c.save(path)
}

/// Per-worker load from expertmesh's `/metrics`: running sequences and KV blocks in use.
pub fn worker_load(page: &str, path: &Path) -> Result<(), String> {
    let running = metric_values(page, "expertmesh_running_sequences");
    let kv = metric_values(page, "expertmesh_kv_blocks_used");
    if running.is_empty() && kv.is_empty() {
        return Err("the target's /metrics has no per-worker load".into());
    }
    let mut c = Canvas::new(900, 440);
    for (k, (title, values)) in [
        ("RUNNING SEQUENCES BY WORKER", running),
        ("KV BLOCKS USED BY WORKER", kv),
    ]
    .into_iter()
    .enumerate()
    {
        let top = values.iter().map(|v| v.1).fold(0.0, f64::max).max(1.0);
        let p = Panel::draw(
            &mut c,
            (90, 40 + 210 * k as i64, 780, 140),
            title,
            "WORKER",
            values.len() as f64,
            top,
        );
        let bw = (p.w / values.len().max(1) as i64).min(120);
        for (i, (labels, v)) in values.iter().enumerate() {
            let (_, y) = p.at(0.0, *v);
            let x = p.x0 + i as i64 * bw + 4;
            c.rect(
                x,
                y,
                x + bw - 8,
                p.y0 + p.h - 1,
                if k == 0 { BLUE } else { ORANGE },
            );
            c.text(
                x,
                p.y0 + p.h + 6,
                &label(labels, "worker").unwrap_or(i).to_string(),
                BLACK,
            );
        }
    }
    c.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
