//! `expertmesh bench image`: the prefill of a prompt with one image of 1, 4 and 16 tiles
//! (the vision tower, then the prefill with the image rows merged) against the text
//! prefill of a prompt of the same number of tokens, in the same run, on the benchmark
//! model (`synthetic:bench` with its synthetic tower: Maverick's tile geometry, widths cut
//! like the text model's). Figures are medians over `--runs`.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use expertmesh_model::synthetic::{SyntheticSpec, SyntheticVisionSpec};
use expertmesh_model::{ImageTokens, LogitRows, Model, Pixels, Sequence};
use serde::Serialize;

use super::steps::median;

#[derive(Args, Debug)]
pub struct ImageArgs {
    /// Timed runs per point (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct ImagePoint {
    /// Tiles the tower encodes (the global tile included).
    tiles: usize,
    grid: (usize, usize),
    prompt_tokens: usize,
    vision_ms: f64,
    image_prefill_ms: f64,
    /// Vision tower + prefill with the rows merged.
    image_total_ms: f64,
    text_prefill_ms: f64,
    /// image_total ÷ text prefill of the same token count.
    ratio_to_text: f64,
}

#[derive(Serialize)]
struct ImageReport {
    model: String,
    threads: usize,
    points: Vec<ImagePoint>,
}

/// Grids whose tiles (with the global tile past one) are 1, 4 and 16.
const GRIDS: [(usize, usize); 3] = [(1, 1), (1, 3), (3, 5)];

/// Synthetic marker ids inside the benchmark vocabulary.
const TOKENS: ImageTokens = ImageTokens {
    image_start: 31990,
    image_end: 31991,
    image: 31992,
    patch: 31993,
    tile_x_separator: 31994,
    tile_y_separator: 31995,
};

pub fn run(args: ImageArgs) -> Result<()> {
    let spec = SyntheticSpec::bench_maverick();
    let (config, mut weights) = spec.build()?;
    let vision_spec = SyntheticVisionSpec::bench();
    vision_spec.build_into(config.hidden_size, &mut weights)?;
    let mut vision = vision_spec.config(config.hidden_size)?;
    vision.image_token_id = TOKENS.patch;
    let mut model = Model::from_source(config, &weights)?;
    model.load_vision(Some(vision.clone()), &weights)?;
    let per_tile = vision.tokens_per_tile();
    let text_ids =
        |n: usize| -> Vec<u32> { (0..n).map(|i| (i * 7919 % 30000) as u32 + 1).collect() };
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<Duration> {
        let mut times = Vec::with_capacity(args.runs);
        for _ in 0..args.runs.max(1) {
            let t0 = Instant::now();
            f()?;
            times.push(t0.elapsed());
        }
        Ok(median(&mut times))
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut points = Vec::new();
    for grid in GRIDS {
        let mut prompt = vec![1u32];
        prompt.extend(TOKENS.image_ids(grid, per_tile));
        prompt.extend(text_ids(16));
        let pixels = Pixels {
            grid,
            tile_size: vision.image_size,
            values: Vec::new(),
        };
        let tiles = pixels.tiles();
        let pixels = Pixels {
            values: (0..tiles * vision.tile_values())
                .map(|i| ((i % 255) as f32 / 127.5) - 1.0)
                .collect(),
            ..pixels
        };
        let images = std::slice::from_ref(&pixels);
        let vision_time = time(&mut || {
            model.encode_images(images)?;
            Ok(())
        })?;
        let rows = model.encode_images(images)?;
        let prefill = |tokens: &[u32], patches: &[f32]| -> Result<()> {
            let mut cache = model.new_cache();
            let mut seq = Sequence::new(&mut cache, tokens);
            seq.patches = patches;
            model.forward(&mut [seq], LogitRows::Last)?;
            Ok(())
        };
        let image_prefill = time(&mut || prefill(&prompt, &rows.rows))?;
        let text = text_ids(prompt.len());
        let text_prefill = time(&mut || prefill(&text, &[]))?;
        let total = vision_time + image_prefill;
        points.push(ImagePoint {
            tiles,
            grid,
            prompt_tokens: prompt.len(),
            vision_ms: ms(vision_time),
            image_prefill_ms: ms(image_prefill),
            image_total_ms: ms(total),
            text_prefill_ms: ms(text_prefill),
            ratio_to_text: total.as_secs_f64() / text_prefill.as_secs_f64(),
        });
        eprintln!("measured {tiles} tiles");
    }
    let report = ImageReport {
        model: "synthetic:bench + synthetic vision tower".into(),
        threads: rayon::current_num_threads(),
        points,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "{} ({} threads), medians of {} runs",
        report.model, report.threads, args.runs
    );
    println!(
        "{:>5} {:>6} {:>7} {:>10} {:>12} {:>10} {:>10} {:>8}",
        "tiles", "grid", "tokens", "vision ms", "prefill ms", "total ms", "text ms", "ratio"
    );
    for p in &report.points {
        println!(
            "{:>5} {:>6} {:>7} {:>10.1} {:>12.1} {:>10.1} {:>10.1} {:>8.2}",
            p.tiles,
            format!("{}x{}", p.grid.0, p.grid.1),
            p.prompt_tokens,
            p.vision_ms,
            p.image_prefill_ms,
            p.image_total_ms,
            p.text_prefill_ms,
            p.ratio_to_text
        );
    }
    Ok(())
}
