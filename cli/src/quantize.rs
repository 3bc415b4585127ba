//! `expertmesh quantize`: a bf16 checkpoint's routed experts to FP8, in the compressed-tensors
//! layout of Meta's FP8 Maverick (`tests/fixtures/FP8.md` §1, §4): each fused expert tensor
//! becomes per-expert `gate_proj` / `up_proj` / `down_proj` weights in e4m3 `[out, in]` with
//! BF16 `weight_scale` `[out, 1]`; every other tensor is copied byte for byte; `config.json`
//! gains `quantization_config` with the literal `ignore` list of every other Linear module;
//! the other files of the directory are copied.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use expertmesh_model::fp8::quantize_fused_expert;
use expertmesh_model::{SafetensorsCheckpoint, Tensor, TextConfig, WeightSource};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::checkpoint_dir::{dtype, write_weights, SHARD_BYTES};

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
    #[arg(long, default_value_t = SHARD_BYTES)]
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
    let mut ignore = Vec::new();
    let mut tensors: Vec<(String, Out)> = Vec::new();
    let mut quantized = 0usize;
    let by_name: HashMap<&str, Tensor> = names
        .iter()
        .map(|n| Ok((n.as_str(), ckpt.tensor(n)?)))
        .collect::<Result<_>>()?;
    for (k, name) in names.iter().enumerate() {
        let t = &by_name[name.as_str()];
        if let Some(base) = name.strip_suffix(".gate_up_proj") {
            let down = by_name
                .get(format!("{base}.down_proj").as_str())
                .with_context(|| format!("{base}.down_proj is missing"))?;
            for e in 0..t.shape[0] {
                for (proj, w, scale) in quantize_fused_expert(&t.outer(e), &down.outer(e)) {
                    let module = format!("{base}.{e}.{proj}");
                    tensors.push((format!("{module}.weight"), out(&w)));
                    tensors.push((format!("{module}.weight_scale"), out(&scale)));
                }
                quantized += 3;
            }
        } else if !(name.ends_with(".experts.down_proj")) {
            if t.shape.len() == 2 && !name.contains("embed_tokens") {
                if let Some(module) = name.strip_suffix(".weight") {
                    ignore.push(module.to_owned());
                }
            }
            tensors.push((name.clone(), out(t)));
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
    let views = tensors
        .iter()
        .map(|(name, o)| {
            Ok((
                name.clone(),
                TensorView::new(o.dtype, o.shape.clone(), &o.bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    write_weights(&args.out, &views, args.shard_bytes)?;
    write_config(&args.model, &args.out, ignore)?;
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

fn out(t: &Tensor) -> Out {
    Out {
        dtype: dtype(t.dtype),
        shape: t.shape.clone(),
        bytes: t.bytes().to_vec(),
    }
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
