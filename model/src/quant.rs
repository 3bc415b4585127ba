//! `quantization_config` of a compressed-tensors checkpoint (the layout of Meta's FP8
//! Maverick; `../shared/fixtures/FP8.md` §1): what the engine accepts, checked once, with
//! errors that name the field.
//!
//! Accepted: `quant_method: compressed-tensors`, `format: float-quantized`, config groups
//! whose weights are 8-bit float per output channel (symmetric) and whose input activations
//! are 8-bit float, per token, dynamic (or absent: weight-only). The `ignore` list names
//! modules kept in bf16, literally or as `re:` patterns.

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// A validated compressed-tensors FP8 configuration.
#[derive(Debug, Clone)]
pub struct Quantization {
    /// Modules left unquantized: literal names and `re:` patterns.
    ignore: Vec<Ignored>,
    /// Input activations are quantize-dequantized per token (W8A8); false: weight-only.
    pub dynamic_activations: bool,
}

#[derive(Debug, Clone)]
enum Ignored {
    Name(String),
    Pattern(regex::Regex),
}

impl PartialEq for Quantization {
    fn eq(&self, other: &Self) -> bool {
        let key = |q: &Self| -> Vec<String> {
            q.ignore
                .iter()
                .map(|i| match i {
                    Ignored::Name(n) => n.clone(),
                    Ignored::Pattern(p) => format!("re:{}", p.as_str()),
                })
                .collect()
        };
        key(self) == key(other) && self.dynamic_activations == other.dynamic_activations
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
        for (name, g) in groups {
            let field = |k: &str| format!("config_groups.{name}.{k}");
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
        let ignore = match q.get("ignore") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| {
                    let s = v
                        .as_str()
                        .ok_or_else(|| invalid("ignore", "not a list of strings".into()))?;
                    match s.strip_prefix("re:") {
                        Some(p) => regex::Regex::new(p)
                            .map(Ignored::Pattern)
                            .map_err(|e| invalid("ignore", format!("`{s}`: {e}"))),
                        None => Ok(Ignored::Name(s.to_owned())),
                    }
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(invalid("ignore", "not a list".into())),
        };
        Ok(Some(Self {
            ignore,
            dynamic_activations: dynamic.unwrap_or(false),
        }))
    }

    /// Whether module `name` (as the checkpoint names it, with or without the
    /// `language_model.` prefix) is left unquantized.
    pub fn is_ignored(&self, name: &str) -> bool {
        let full = format!("language_model.{name}");
        self.ignore.iter().any(|i| match i {
            Ignored::Name(n) => n == name || *n == full,
            Ignored::Pattern(p) => p.is_match(name) || p.is_match(&full),
        })
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
        assert!(parse(Value::Null).unwrap().is_none());
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
