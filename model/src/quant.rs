//! `quantization_config` of a compressed-tensors checkpoint (the layout of Meta's FP8
//! Maverick; `../shared/fixtures/FP8.md` §1): what the engine accepts, checked once, with
//! errors that name the field.
//!
//! Accepted: `quant_method: compressed-tensors`, `format: float-quantized`, config groups
//! whose weights are 8-bit float per output channel (symmetric) and whose input activations
//! are 8-bit float, per token, dynamic (or absent: weight-only). `targets` name the modules
//! quantized (`Linear`: every linear module) and the `ignore` list those kept in bf16,
//! literally or as `re:` patterns.

use serde_json::{Map, Value};

use crate::checkpoint::WeightSource;
use crate::error::{ModelError, Result};
use crate::linear::{Layout, Linear};

/// A validated compressed-tensors FP8 configuration.
#[derive(Debug, Clone)]
pub struct Quantization {
    /// Modules the config groups quantize (`targets`; `Linear` is every linear module).
    targets: Vec<Modules>,
    /// Modules left unquantized: literal names and `re:` patterns.
    ignore: Vec<Modules>,
    /// Input activations are quantize-dequantized per token (W8A8); false: weight-only.
    pub dynamic_activations: bool,
}

/// A `targets` or `ignore` entry: a module name, a `re:` pattern, or the `Linear` class.
#[derive(Debug, Clone)]
enum Modules {
    Name(String),
    Pattern(regex::Regex),
    AnyLinear,
}

impl Modules {
    fn parse(s: &str, field: &str) -> Result<Self> {
        match s.strip_prefix("re:") {
            Some(p) => regex::Regex::new(p)
                .map(Modules::Pattern)
                .map_err(|e| invalid(field, format!("`{s}`: {e}"))),
            None if s == "Linear" => Ok(Modules::AnyLinear),
            None => Ok(Modules::Name(s.to_owned())),
        }
    }

    /// Whether linear module `name` (with or without the `language_model.` prefix) matches.
    fn matches(&self, name: &str) -> bool {
        let full = format!("language_model.{name}");
        match self {
            Modules::Name(n) => n == name || *n == full,
            Modules::Pattern(p) => p.is_match(name) || p.is_match(&full),
            Modules::AnyLinear => true,
        }
    }

    fn key(&self) -> String {
        match self {
            Modules::Name(n) => n.clone(),
            Modules::Pattern(p) => format!("re:{}", p.as_str()),
            Modules::AnyLinear => "Linear".into(),
        }
    }
}

/// A list of `targets` or `ignore` entries (absent or null: empty).
fn modules(v: Option<&Value>, field: &str) -> Result<Vec<Modules>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| {
                let s = v
                    .as_str()
                    .ok_or_else(|| invalid(field, "not a list of strings".into()))?;
                Modules::parse(s, field)
            })
            .collect(),
        Some(_) => Err(invalid(field, "not a list".into())),
    }
}

impl PartialEq for Quantization {
    fn eq(&self, other: &Self) -> bool {
        let key = |l: &[Modules]| -> Vec<String> { l.iter().map(Modules::key).collect() };
        key(&self.targets) == key(&other.targets)
            && key(&self.ignore) == key(&other.ignore)
            && self.dynamic_activations == other.dynamic_activations
    }
}

fn invalid(field: &str, reason: String) -> ModelError {
    ModelError::InvalidField {
        file: "config.json".into(),
        field: format!("quantization_config.{field}"),
        reason,
    }
}

impl Quantization {
    /// Reads `quantization_config` (at the root or in `text_config`); `None` when absent.
    pub fn from_json(root: &Map<String, Value>) -> Result<Option<Self>> {
        let Some(q) = root.get("quantization_config").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let q = q
            .as_object()
            .ok_or_else(|| invalid("(root)", "not an object".into()))?;
        let text = |k: &str| q.get(k).and_then(Value::as_str).unwrap_or("");
        if text("quant_method") != "compressed-tensors" {
            return Err(invalid(
                "quant_method",
                format!(
                    "`{}` is not supported (compressed-tensors)",
                    text("quant_method")
                ),
            ));
        }
        if text("format") != "float-quantized" {
            return Err(invalid(
                "format",
                format!(
                    "`{}` is not supported (float-quantized: FP8 weights with per-channel scales)",
                    text("format")
                ),
            ));
        }
        let groups = q
            .get("config_groups")
            .and_then(Value::as_object)
            .filter(|g| !g.is_empty())
            .ok_or_else(|| invalid("config_groups", "missing or empty".into()))?;
        let mut dynamic = None;
        let mut targets = Vec::new();
        for (name, g) in groups {
            let field = |k: &str| format!("config_groups.{name}.{k}");
            match g.get("targets") {
                // compressed-tensors always writes targets; without them, every Linear.
                None | Some(Value::Null) => targets.push(Modules::AnyLinear),
                t => targets.extend(modules(t, &field("targets"))?),
            }
            let weights = g
                .get("weights")
                .and_then(Value::as_object)
                .ok_or_else(|| invalid(&field("weights"), "missing".into()))?;
            check_scheme(weights, &field("weights"), "channel")?;
            let acts = match g.get("input_activations") {
                None | Some(Value::Null) => false,
                Some(Value::Object(a)) => {
                    check_scheme(a, &field("input_activations"), "token")?;
                    if a.get("dynamic") != Some(&Value::Bool(true)) {
                        return Err(invalid(
                            &field("input_activations.dynamic"),
                            "only dynamic activation scales are supported".into(),
                        ));
                    }
                    true
                }
                Some(_) => {
                    return Err(invalid(&field("input_activations"), "not an object".into()))
                }
            };
            if dynamic.is_some_and(|d| d != acts) {
                return Err(invalid(
                    &field("input_activations"),
                    "config groups disagree on activation quantization".into(),
                ));
            }
            dynamic = Some(acts);
        }
        let ignore = modules(q.get("ignore"), "ignore")?;
        Ok(Some(Self {
            targets,
            ignore,
            dynamic_activations: dynamic.unwrap_or(false),
        }))
    }

    /// Whether module `name` (as the checkpoint names it, with or without the
    /// `language_model.` prefix) is left unquantized.
    pub fn is_ignored(&self, name: &str) -> bool {
        self.ignore.iter().any(|i| i.matches(name))
    }

    /// Whether linear module `name` is quantized: a config group targets it and `ignore`
    /// does not list it.
    pub fn is_quantized(&self, name: &str) -> bool {
        self.targets.iter().any(|t| t.matches(name)) && !self.is_ignored(name)
    }
}

/// Linear module `module` (`{module}.weight`, `[out, in]`, `nn.Linear` orientation) as the
/// checkpoint stores it: FP8 e4m3 with `{module}.weight_scale` (`[out, 1]` or `[out]`,
/// bf16/f16/f32), or bf16. It must be FP8 exactly when `quantization_config` says so
/// (targeted, not ignored): a mismatch is a broken checkpoint, not a guess.
pub(crate) fn linear(
    src: &dyn WeightSource,
    q: Option<&Quantization>,
    module: &str,
    out: usize,
    inp: usize,
) -> Result<Linear> {
    let name = format!("{module}.weight");
    let l = match src.fp8_tensor(&name)? {
        None => Linear::new(src.tensor_shaped(&name, &[out, inp])?, Layout::OutIn),
        Some(weight) => {
            if weight.shape != [out, inp] {
                return Err(ModelError::TensorShape {
                    name,
                    expected: vec![out, inp],
                    got: weight.shape,
                });
            }
            let scale_name = format!("{module}.weight_scale");
            let scale = match src.tensor(&scale_name) {
                Ok(t) => t,
                Err(ModelError::MissingTensor { .. }) => {
                    return Err(ModelError::Quantized {
                        name,
                        reason: format!("is FP8 but the checkpoint has no `{scale_name}`"),
                    })
                }
                Err(e) => return Err(e),
            };
            if scale.shape != [out, 1] && scale.shape != [out] {
                return Err(ModelError::TensorShape {
                    name: scale_name,
                    expected: vec![out, 1],
                    got: scale.shape,
                });
            }
            let scale = scale.to_f32_vec();
            // The kernels rescale by 2^120 on the way (`kernels::Weight for u8`); scales that
            // large or not finite are no checkpoint's.
            if let Some(s) = scale
                .iter()
                .find(|s| s.is_nan() || s.abs() >= 2f32.powi(100))
            {
                return Err(ModelError::Quantized {
                    name: scale_name,
                    reason: format!("holds {s}: a weight scale must be finite and below 2^100"),
                });
            }
            let qdq = q.is_some_and(|q| q.dynamic_activations);
            Linear::fp8(weight, scale, qdq)
        }
    };
    let declared = q.map(|q| q.is_quantized(module));
    match declared {
        Some(d) if d != l.is_fp8() => Err(ModelError::Quantized {
            name,
            reason: if l.is_fp8() {
                "is FP8 but quantization_config leaves its module unquantized (ignore, targets)"
                    .into()
            } else {
                "is not FP8 but quantization_config quantizes its module (targets, ignore)".into()
            },
        }),
        None if l.is_fp8() => Err(ModelError::Quantized {
            name,
            reason: "is FP8 but config.json has no quantization_config".into(),
        }),
        _ => Ok(l),
    }
}

fn check_scheme(s: &Map<String, Value>, field: &str, strategy: &str) -> Result<()> {
    let get = |k: &str| s.get(k).cloned().unwrap_or(Value::Null);
    if get("num_bits") != 8 || get("type") != "float" {
        return Err(invalid(
            field,
            "only 8-bit float (FP8 e4m3) is supported".into(),
        ));
    }
    if get("strategy") != strategy {
        return Err(invalid(
            &format!("{field}.strategy"),
            format!("{} is not supported ({strategy})", get("strategy")),
        ));
    }
    if get("symmetric") == Value::Bool(false) {
        return Err(invalid(
            &format!("{field}.symmetric"),
            "asymmetric quantization is not supported".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(q: Value) -> Result<Option<Quantization>> {
        Quantization::from_json(json!({ "quantization_config": q }).as_object().unwrap())
    }

    fn good() -> Value {
        json!({"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                    "symmetric": true, "dynamic": true}}},
            "ignore": ["lm_head", "re:.*self_attn.*"]})
    }

    #[test]
    fn accepts_the_fp8_layout_and_matches_ignores() {
        let q = parse(good()).unwrap().unwrap();
        assert!(q.dynamic_activations);
        assert!(q.is_ignored("lm_head"));
        assert!(q.is_ignored("model.layers.0.self_attn.q_proj"));
        assert!(!q.is_ignored("model.layers.1.feed_forward.experts.3.gate_proj"));
        assert!(q.is_quantized("model.layers.1.feed_forward.experts.3.gate_proj"));
        assert!(!q.is_quantized("lm_head"));
        assert!(parse(Value::Null).unwrap().is_none());
        // Targets by pattern: only what they match is quantized.
        let mut narrow = good();
        narrow["config_groups"]["group_0"]["targets"] = json!(["re:.*experts.*"]);
        let q = parse(narrow).unwrap().unwrap();
        assert!(q.is_quantized("model.layers.1.feed_forward.experts.3.gate_proj"));
        assert!(!q.is_quantized("model.layers.1.feed_forward.shared_expert.gate_proj"));
    }

    #[test]
    fn refuses_what_it_cannot_compute_naming_the_field() {
        let cases: [(&str, Value, &str); 5] = [
            ("format", json!("pack-quantized"), "format"),
            ("format", json!("naive-quantized"), "format"),
            ("quant_method", json!("fbgemm_fp8"), "quant_method"),
            ("ignore", json!(["re:("]), "ignore"),
            ("config_groups", json!({}), "config_groups"),
        ];
        for (key, value, field) in cases {
            let mut q = good();
            q[key] = value;
            let err = parse(q).unwrap_err().to_string();
            assert!(err.contains(field), "{key}: {err}");
        }
        let mut q = good();
        q["config_groups"]["group_0"]["weights"]["strategy"] = json!("tensor");
        assert!(parse(q)
            .unwrap_err()
            .to_string()
            .contains("weights.strategy"));
        let mut q = good();
        q["config_groups"]["group_0"]["input_activations"]["dynamic"] = json!(false);
        assert!(parse(q).is_err());
    }
}
