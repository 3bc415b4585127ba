//! Llama 4 `config.json`, in both spellings that exist in the wild.
//!
//! Mirrors `transformers/models/llama4/configuration_llama4.py` (LLAMA4.md §1): the
//! multimodal `Llama4ForConditionalGeneration` nests the text model under `text_config`; the
//! text-only `Llama4ForCausalLM` is flat. transformers 4.51 writes `rope_theta`,
//! `rope_scaling` and `torch_dtype`; 5.x writes `rope_parameters` and `dtype`. Derived lists
//! (`moe_layers`, `no_rope_layers`) are rebuilt the way transformers rebuilds them when a
//! file leaves them out or empty.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// How RoPE frequencies are scaled (HF `modeling_rope_utils.py`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain `θ_j = theta^(-2j/d)` (Maverick).
    None,
    /// Llama 3 frequency-band scaling (Scout).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The validated text-model configuration every other part of the engine reads.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of each routed expert and of the shared expert.
    pub intermediate_size: usize,
    /// Width of the dense FFN layers.
    pub intermediate_size_mlp: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub num_local_experts: usize,
    /// Sorted indices of the MoE layers; every other layer is a dense SwiGLU.
    pub moe_layers: Vec<usize>,
    /// Per layer: true when the layer uses RoPE (and chunked attention), false for NoPE
    /// (global attention). transformers calls this list `no_rope_layers`, with 1 = RoPE.
    pub rope_layers: Vec<bool>,
    pub attention_chunk_size: usize,
    pub use_qk_norm: bool,
    pub attn_temperature_tuning: bool,
    pub floor_scale: f64,
    pub attn_scale: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The checkpoint's declared dtype (`torch_dtype` or `dtype`), for information only:
    /// the engine reads each tensor's own dtype.
    pub dtype: Option<String>,
    /// A compressed-tensors FP8 checkpoint's `quantization_config`.
    pub quantization: Option<crate::quant::Quantization>,
}

impl TextConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path, source })?;
        Self::from_json(&value)
    }

    /// Parses a config object of either architecture and either spelling.
    pub fn from_json(root: &Value) -> Result<Self> {
        let root_obj = root
            .as_object()
            .ok_or_else(|| invalid("(root)", "not an object"))?;
        let text = match root_obj.get("text_config") {
            Some(Value::Object(t)) => t,
            Some(_) => return Err(invalid("text_config", "not an object")),
            None => root_obj,
        };
        let f = Fields { obj: text };
        let root_fields = Fields { obj: root_obj };

        let hidden_size = f.usize("hidden_size")?;
        let num_hidden_layers = f.usize("num_hidden_layers")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f.usize("num_key_value_heads")?;
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => hidden_size / num_attention_heads.max(1),
        };
        let step = f.opt_usize("interleave_moe_layer_step")?.unwrap_or(1);
        if step == 0 {
            return Err(invalid("interleave_moe_layer_step", "must be at least 1"));
        }
        let moe_layers = match f.opt_usize_list("moe_layers")? {
            Some(list) if !list.is_empty() => list,
            _ => (step - 1..num_hidden_layers).step_by(step).collect(),
        };
        let interval = f.opt_usize("no_rope_layer_interval")?.unwrap_or(4).max(1);
        let rope_layers = match f.opt_usize_list("no_rope_layers")? {
            Some(list) if !list.is_empty() => list.iter().map(|&v| v != 0).collect(),
            _ => (0..num_hidden_layers)
                .map(|i| (i + 1) % interval != 0)
                .collect(),
        };
        let (rope_theta, rope_scaling) = rope(&f)?;
        let eos_token_ids = match f.obj.get("eos_token_id") {
            Some(_) => f.id_list("eos_token_id")?,
            None => root_fields.id_list("eos_token_id")?,
        };
        let dtype = ["torch_dtype", "dtype"]
            .iter()
            .find_map(|k| text.get(*k).or_else(|| root_obj.get(*k)))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let experts_per_token = f.opt_usize("num_experts_per_tok")?.unwrap_or(1);
        if experts_per_token != 1 {
            return Err(invalid(
                "num_experts_per_tok",
                &format!("{experts_per_token} is not supported; Llama 4 routes top-1"),
            ));
        }

        Self {
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            intermediate_size_mlp: f.opt_usize("intermediate_size_mlp")?.unwrap_or(16384),
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-5) as f32,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(131072),
            num_local_experts: f.usize("num_local_experts")?,
            moe_layers,
            rope_layers,
            attention_chunk_size: f.opt_usize("attention_chunk_size")?.unwrap_or(8192),
            use_qk_norm: f.opt_flag("use_qk_norm")?.unwrap_or(true),
            attn_temperature_tuning: f.opt_flag("attn_temperature_tuning")?.unwrap_or(true),
            floor_scale: f.opt_f64("floor_scale")?.unwrap_or(8192.0),
            attn_scale: f.opt_f64("attn_scale")?.unwrap_or(0.1),
            rope_theta,
            rope_scaling,
            bos_token_id: f
                .opt_id("bos_token_id")?
                .or(root_fields.opt_id("bos_token_id")?),
            eos_token_ids,
            pad_token_id: f
                .opt_id("pad_token_id")?
                .or(root_fields.opt_id("pad_token_id")?),
            dtype,
            quantization: match crate::quant::Quantization::from_json(root_obj)? {
                Some(q) => Some(q),
                None => crate::quant::Quantization::from_json(text)?,
            },
        }
        .validate()
    }

    /// Checks the relations between fields that the forward pass relies on.
    pub fn validate(self) -> Result<Self> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("num_local_experts", self.num_local_experts),
            ("attention_chunk_size", self.attention_chunk_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in nonzero {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(invalid(
                "num_key_value_heads",
                "must divide num_attention_heads",
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid("head_dim", "must be even for RoPE"));
        }
        if self.rope_layers.len() != self.num_hidden_layers {
            return Err(invalid(
                "no_rope_layers",
                &format!(
                    "has {} entries for {} layers",
                    self.rope_layers.len(),
                    self.num_hidden_layers
                ),
            ));
        }
        if let Some(&l) = self
            .moe_layers
            .iter()
            .find(|&&l| l >= self.num_hidden_layers)
        {
            return Err(invalid("moe_layers", &format!("layer {l} does not exist")));
        }
        if self.floor_scale <= 0.0 {
            return Err(invalid("floor_scale", "must be positive"));
        }
        Ok(self)
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe_layers.contains(&layer)
    }

    /// Whether every routed expert of MoE layer `layer` is FP8 with per-token dynamic input
    /// quantization in gate and up (what `quantization_config` declares, which loading
    /// checks against the tensors): then the layer's routed rows may travel already
    /// quantized (`--wire-dtype fp8`) at no cost in exactness.
    pub fn experts_take_fp8_inputs(&self, layer: usize) -> bool {
        let Some(q) = self.quantization.as_ref().filter(|q| q.dynamic_activations) else {
            return false;
        };
        self.is_moe_layer(layer)
            && (0..self.num_local_experts).all(|e| {
                ["gate_proj", "up_proj"].iter().all(|p| {
                    q.is_quantized(&format!(
                        "model.layers.{layer}.feed_forward.experts.{e}.{p}"
                    ))
                })
            })
    }
}

pub(crate) fn invalid(field: &str, reason: &str) -> ModelError {
    ModelError::InvalidField {
        file: "config.json".into(),
        field: field.into(),
        reason: reason.into(),
    }
}

fn missing(field: &str) -> ModelError {
    ModelError::MissingField {
        file: "config.json".into(),
        field: field.into(),
    }
}

/// Reads RoPE settings from either `rope_parameters` (5.x) or `rope_theta` +
/// `rope_scaling` (4.51).
fn rope(f: &Fields<'_>) -> Result<(f64, RopeScaling)> {
    let (theta, params) = match f.obj.get("rope_parameters") {
        Some(Value::Object(p)) => {
            let pf = Fields { obj: p };
            let theta = pf
                .opt_f64("rope_theta")?
                .or(f.opt_f64("rope_theta")?)
                .unwrap_or(500000.0);
            (theta, Some(p))
        }
        Some(Value::Null) | None => {
            let theta = f.opt_f64("rope_theta")?.unwrap_or(500000.0);
            match f.obj.get("rope_scaling") {
                Some(Value::Object(p)) => (theta, Some(p)),
                Some(Value::Null) | None => (theta, None),
                Some(_) => return Err(invalid("rope_scaling", "not an object or null")),
            }
        }
        Some(_) => return Err(invalid("rope_parameters", "not an object")),
    };
    let Some(p) = params else {
        return Ok((theta, RopeScaling::None));
    };
    let pf = Fields { obj: p };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok((theta, RopeScaling::None)),
        "llama3" => Ok((
            theta,
            RopeScaling::Llama3 {
                factor: pf.f64("factor")?,
                low_freq_factor: pf.f64("low_freq_factor")?,
                high_freq_factor: pf.f64("high_freq_factor")?,
                original_max_position_embeddings: pf.f64("original_max_position_embeddings")?,
            },
        )),
        other => Err(invalid(
            "rope_type",
            &format!("`{other}` is not supported (default, llama3)"),
        )),
    }
}

/// Typed access to one JSON object's fields, with errors that name the field.
pub(crate) struct Fields<'a> {
    pub(crate) obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    pub(crate) fn get(&self, name: &str) -> Option<&Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    pub(crate) fn usize(&self, name: &str) -> Result<usize> {
        self.opt_usize(name)?.ok_or_else(|| missing(name))
    }

    pub(crate) fn opt_usize(&self, name: &str) -> Result<Option<usize>> {
        self.get(name)
            .map(|v| as_usize(v).ok_or_else(|| invalid(name, "not a non-negative integer")))
            .transpose()
    }

    pub(crate) fn f64(&self, name: &str) -> Result<f64> {
        self.opt_f64(name)?.ok_or_else(|| missing(name))
    }

    pub(crate) fn opt_f64(&self, name: &str) -> Result<Option<f64>> {
        self.get(name)
            .map(|v| v.as_f64().ok_or_else(|| invalid(name, "not a number")))
            .transpose()
    }

    /// A flag that configs write as a bool or as an int (`attn_temperature_tuning: 4`).
    pub(crate) fn opt_flag(&self, name: &str) -> Result<Option<bool>> {
        self.get(name)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                Value::Number(n) => Ok(n.as_f64() != Some(0.0)),
                _ => Err(invalid(name, "not a bool or a number")),
            })
            .transpose()
    }

    pub(crate) fn opt_usize_list(&self, name: &str) -> Result<Option<Vec<usize>>> {
        self.get(name)
            .map(|v| {
                v.as_array()
                    .and_then(|a| a.iter().map(as_usize).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| invalid(name, "not a list of non-negative integers"))
            })
            .transpose()
    }

    pub(crate) fn opt_id(&self, name: &str) -> Result<Option<u32>> {
        self.get(name)
            .map(|v| as_id(v).ok_or_else(|| invalid(name, "not a token id")))
            .transpose()
    }

    /// A token id or a list of them; absent means none.
    pub(crate) fn id_list(&self, name: &str) -> Result<Vec<u32>> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| as_id(v).ok_or_else(|| invalid(name, "not a list of token ids")))
                .collect(),
            Some(v) => Ok(vec![
                as_id(v).ok_or_else(|| invalid(name, "not a token id"))?
            ]),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

fn as_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// Reads the stop ids of `generation_config.json` when the directory has one.
pub fn generation_eos_ids(dir: &Path) -> Result<Option<Vec<u32>>> {
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path, source })?;
    let obj = value.as_object().ok_or_else(|| ModelError::InvalidField {
        file: "generation_config.json".into(),
        field: "(root)".into(),
        reason: "not an object".into(),
    })?;
    if obj.get("eos_token_id").is_none_or(Value::is_null) {
        return Ok(None);
    }
    Fields { obj }
        .id_list("eos_token_id")
        .map(Some)
        .map_err(|e| match e {
            ModelError::InvalidField { field, reason, .. } => ModelError::InvalidField {
                file: "generation_config.json".into(),
                field,
                reason,
            },
            other => other,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 768,
            "intermediate_size": 64, "intermediate_size_mlp": 256, "num_local_experts": 16
        })
    }

    #[test]
    fn derives_lists_when_absent_or_empty() {
        let mut v = base();
        v["interleave_moe_layer_step"] = json!(2);
        v["no_rope_layers"] = json!([]);
        let c = TextConfig::from_json(&v).unwrap();
        assert_eq!(c.moe_layers, vec![1, 3]);
        assert_eq!(c.rope_layers, vec![true, true, true, false]);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert_eq!(c.rope_theta, 500000.0);
    }

    #[test]
    fn step_one_makes_every_layer_moe() {
        let c = TextConfig::from_json(&base()).unwrap();
        assert_eq!(c.moe_layers, vec![0, 1, 2, 3]);
    }

    #[test]
    fn nested_text_config_and_451_spelling() {
        let mut t = base();
        t["rope_theta"] = json!(10000.0);
        t["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        t["attn_temperature_tuning"] = json!(4);
        let v = json!({"text_config": t, "torch_dtype": "bfloat16"});
        let c = TextConfig::from_json(&v).unwrap();
        assert_eq!(c.rope_theta, 10000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert!(c.attn_temperature_tuning);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn five_x_spelling() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 250000.0,
            "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
            "original_max_position_embeddings": 64});
        v["dtype"] = json!("bfloat16");
        v["attn_temperature_tuning"] = json!(false);
        v["eos_token_id"] = json!(5);
        let c = TextConfig::from_json(&v).unwrap();
        assert_eq!(c.rope_theta, 250000.0);
        assert!(!c.attn_temperature_tuning);
        assert_eq!(c.eos_token_ids, vec![5]);
    }

    #[test]
    fn missing_and_bad_fields_are_named() {
        for field in ["hidden_size", "vocab_size", "num_local_experts"] {
            let mut v = base();
            v.as_object_mut().unwrap().remove(field);
            let err = TextConfig::from_json(&v).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let err = TextConfig::from_json(&v).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        let mut v = base();
        v["hidden_size"] = json!("big");
        let err = TextConfig::from_json(&v).unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
        let mut v = base();
        v["num_experts_per_tok"] = json!(2);
        assert!(TextConfig::from_json(&v).is_err());
    }
}
