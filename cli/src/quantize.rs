//! `expertmesh quantize`: a bf16 checkpoint's routed experts to FP8, in the compressed-tensors
//! layout of Meta's FP8 Maverick (`tests/fixtures/FP8.md` §1, §4): each fused expert tensor
//! becomes per-expert `gate_proj` / `up_proj` / `down_proj` weights in e4m3 `[out, in]` with
//! BF16 `weight_scale` `[out, 1]`; every other tensor is copied byte for byte; `config.json`
//! gains `quantization_config` with the literal `ignore` list of every other Linear module;
//! the other files of the directory are copied.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use expertmesh_model::fp8::quantize_row;
use expertmesh_model::{DType, SafetensorsCheckpoint, Tensor, TextConfig, WeightSource};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The bf16 model directory.
    #[arg(long)]
    model: PathBuf,
    /// Where the FP8 copy goes (created; must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// fp8-dynamic: FP8 weights per output channel, FP8 activations per token, dynamic.
    #[arg(long, default_value = "fp8-dynamic")]
    scheme: String,
    /// Bytes per output shard at most.
    #[arg(long, default_value_t = 4 << 30)]
    shard_bytes: usize,
}

/// One output tensor: its dtype, shape and bytes.
struct Out {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    if args.scheme != "fp8-dynamic" {
        bail!("--scheme {} is not supported (fp8-dynamic)", args.scheme);
    }
    let config = TextConfig::from_dir(&args.model)?;
    if config.quantization.is_some() {
        bail!("{} is quantized already", args.model.display());
    }
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!("{} exists and is not empty", args.out.display());
    }
    std::fs::create_dir_all(&args.out)?;
    let ckpt = SafetensorsCheckpoint::open(&args.model)?;
    let mut names: Vec<String> = ckpt.names().cloned().collect();
    names.sort();
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let mut ignore = Vec::new();
    let mut tensors: Vec<(String, Out)> = Vec::new();
    let mut quantized = 0usize;
    for (k, name) in names.iter().enumerate() {
        let t = ckpt.tensor(name)?;
        if let Some(base) = name.strip_suffix(".gate_up_proj") {
            for e in 0..t.shape[0] {
                let slice = t.outer(e); // [h, 2i], "x @ W"
                for (proj, offset) in [("gate_proj", 0), ("up_proj", i)] {
                    let w = transpose_columns(&slice, h, 2 * i, offset, i);
                    tensors.extend(fp8_linear(&format!("{base}.{e}.{proj}"), &w, i, h));
                }
                quantized += 2;
            }
        } else if let Some(base) = name
            .strip_suffix(".down_proj")
            .filter(|b| b.ends_with(".experts"))
        {
            for e in 0..t.shape[0] {
                let w = transpose_columns(&t.outer(e), i, h, 0, h);
                tensors.extend(fp8_linear(&format!("{base}.{e}.down_proj"), &w, h, i));
                quantized += 1;
            }
        } else {
            if t.shape.len() == 2 && !name.contains("embed_tokens") {
                if let Some(module) = name.strip_suffix(".weight") {
                    ignore.push(module.to_owned());
                }
            }
            tensors.push((
                name.clone(),
                Out {
                    dtype: dtype(t.dtype),
                    shape: t.shape.clone(),
                    bytes: t.bytes().to_vec(),
                },
            ));
        }
        eprint!("\rquantize: {} / {} source tensors", k + 1, names.len());
    }
    eprintln!();
    if quantized == 0 {
        bail!(
            "{} has no fused expert tensors to quantize",
            args.model.display()
        );
    }
    let index = write_shards(&args.out, &tensors, args.shard_bytes)?;
    write_config(&args.model, &args.out, ignore)?;
    std::fs::write(
        args.out.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&json!({"metadata": {}, "weight_map": index}))?,
    )?;
    for entry in std::fs::read_dir(&args.model)? {
        let path = entry?.path();
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let skip =
            file == "config.json" || file.starts_with("model") || file.starts_with("reference");
        if path.is_file() && !skip {
            std::fs::copy(&path, args.out.join(file))?;
        }
    }
    eprintln!(
        "quantize: {quantized} expert projections to FP8 in {}",
        args.out.display()
    );
    Ok(())
}

/// Columns `offset..offset + n` of a `[rows, cols]` bf16 matrix, as `[n, rows]` (the
/// `nn.Linear` orientation of an "x @ W" slice).
fn transpose_columns(
    t: &Tensor,
    rows: usize,
    cols: usize,
    offset: usize,
    n: usize,
) -> Vec<half::bf16> {
    let v = t.to_f32_vec();
    assert_eq!(v.len(), rows * cols, "expert slice shape");
    let mut out = Vec::with_capacity(n * rows);
    for c in offset..offset + n {
        for r in 0..rows {
            // Widened from bf16: converting back is exact.
            out.push(half::bf16::from_f32(v[r * cols + c]));
        }
    }
    out
}

/// `{module}.weight` F8_E4M3 `[out, in]` and `{module}.weight_scale` BF16 `[out, 1]`.
fn fp8_linear(module: &str, w: &[half::bf16], out: usize, inp: usize) -> [(String, Out); 2] {
    let mut codes = vec![0u8; out * inp];
    let mut scales = Vec::with_capacity(out * 2);
    for (row, c) in w.chunks_exact(inp).zip(codes.chunks_exact_mut(inp)) {
        scales.extend_from_slice(&quantize_row(row, c).to_le_bytes());
    }
    [
        (
            format!("{module}.weight"),
            Out {
                dtype: Dtype::F8_E4M3,
                shape: vec![out, inp],
                bytes: codes,
            },
        ),
        (
            format!("{module}.weight_scale"),
            Out {
                dtype: Dtype::BF16,
                shape: vec![out, 1],
                bytes: scales,
            },
        ),
    ]
}

fn dtype(d: DType) -> Dtype {
    match d {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
        DType::F8E4M3 => Dtype::F8_E4M3,
    }
}

/// Writes the tensors in shards of at most `shard_bytes`; returns the weight map.
fn write_shards(
    dir: &Path,
    tensors: &[(String, Out)],
    shard_bytes: usize,
) -> Result<BTreeMap<String, String>> {
    let mut shards: Vec<Vec<&(String, Out)>> = vec![Vec::new()];
    let mut size = 0;
    for t in tensors {
        if size + t.1.bytes.len() > shard_bytes && !shards.last().expect("one shard").is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        size += t.1.bytes.len();
        shards.last_mut().expect("one shard").push(t);
    }
    let n = shards.len();
    let mut map = BTreeMap::new();
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let views = shard
            .iter()
            .map(|(name, o)| {
                Ok((
                    name.clone(),
                    TensorView::new(o.dtype, o.shape.clone(), &o.bytes)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, None::<HashMap<String, String>>, &dir.join(&file))
            .with_context(|| format!("writing {file}"))?;
        for (name, _) in shard {
            map.insert(name.clone(), file.clone());
        }
    }
    Ok(map)
}

/// `config.json` with the compressed-tensors `quantization_config` of the FP8 layout.
fn write_config(src: &Path, dst: &Path, ignore: Vec<String>) -> Result<()> {
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)?;
    let scheme = |strategy: &str, dynamic: bool, observer: Value| {
        json!({"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": true,
               "dynamic": dynamic, "observer": observer})
    };
    config["quantization_config"] = json!({
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": scheme("channel", false, json!("minmax")),
            "input_activations": scheme("token", true, Value::Null),
        }},
        "ignore": ignore,
    });
    std::fs::write(
        dst.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}
