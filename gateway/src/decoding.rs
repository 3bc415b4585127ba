//! How a request body asks to decode, beyond its prompt and length: how many choices, the
//! log-probabilities it wants, the penalties and `logit_bias` on its logits, and the
//! grammar its text must match. Each field is range-checked here; a bad one is a 400 naming it.

use serde_json::{Map, Value};

use expertmesh_model::sampling::{LOGIT_BIAS_MAX, TOP_LOGPROBS_MAX};
use expertmesh_model::{Adjust, GrammarSpec};

use crate::error::ApiError;
use crate::openai::{opt_bool, opt_int, opt_num, CHOICES_MAX};
use crate::tools::Tools;

/// How many choices to return and to generate: `n`, and `best_of` (completions, not
/// streamed, at least `n`).
pub fn choices(obj: &Map<String, Value>, chat: bool) -> Result<(usize, usize), ApiError> {
    let n = match opt_int(obj, "n")? {
        None => 1,
        Some(n) if (1..=CHOICES_MAX as i64).contains(&n) => n as usize,
        Some(_) => {
            return Err(ApiError::bad(
                format!("n must be between 1 and {CHOICES_MAX}"),
                "n",
            ))
        }
    };
    let best_of = match opt_int(obj, "best_of")? {
        None => n,
        Some(b) if !chat && (n as i64..=CHOICES_MAX as i64).contains(&b) => b as usize,
        Some(_) => {
            return Err(ApiError::bad(
                format!("best_of must be between n and {CHOICES_MAX} (completions only)"),
                "best_of",
            ))
        }
    };
    if best_of > n && opt_bool(obj, "stream")? {
        return Err(ApiError::bad("best_of cannot be streamed", "best_of"));
    }
    Ok((n, best_of))
}

/// What the output must match and the field that asked: a structured output, or the
/// grammar `tools` force a call with (`tool_choice` required or named); not both.
pub fn grammar(
    obj: &Map<String, Value>,
    tools: Option<&Tools>,
) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
    let asked = structured_output(obj)?;
    match tools.and_then(Tools::grammar) {
        Some(_) if asked.is_some() => Err(ApiError::bad(
            "a required tool call and a structured output cannot be combined",
            "tool_choice",
        )),
        Some(forced) => Ok(Some((forced, "tool_choice"))),
        None => Ok(asked),
    }
}

/// The structured output asked for: OpenAI's `response_format` (`json_object`, or
/// `json_schema` with its `schema`), or vLLM's `structured_outputs` (`json`, `regex`,
/// `choice`, `grammar`) and its older `guided_json`, `guided_regex`, `guided_choice`,
/// `guided_grammar`; at most one. Grammars are Lark (llguidance's dialect).
fn structured_output(
    obj: &Map<String, Value>,
) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
    let schema = |v: &Value, field: &str| match v {
        Value::Object(_) => Ok(GrammarSpec::JsonSchema(v.to_string())),
        Value::String(s) => Ok(GrammarSpec::JsonSchema(s.clone())),
        _ => Err(ApiError::bad(
            format!("{field} must be a JSON schema"),
            field,
        )),
    };
    let text = |v: &Value, field: &str| {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| ApiError::bad(format!("{field} must be a string"), field))
    };
    let choice = |v: &Value, field: &str| {
        v.as_array()
            .filter(|a| !a.is_empty())
            .and_then(|a| a.iter().map(|c| c.as_str().map(str::to_owned)).collect())
            .map(GrammarSpec::Choice)
            .ok_or_else(|| ApiError::bad(format!("{field} must be a list of strings"), field))
    };
    let mut found: Vec<(GrammarSpec, &'static str)> = Vec::new();
    match obj.get("response_format") {
        None | Some(Value::Null) => {}
        Some(rf) => {
            const F: &str = "response_format";
            match rf.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some("json_object") => found.push((GrammarSpec::JsonObject, F)),
                Some("json_schema") => {
                    let s = rf
                        .get("json_schema")
                        .and_then(|j| j.get("schema"))
                        .ok_or_else(|| ApiError::bad("json_schema.schema is required", F))?;
                    found.push((schema(s, F)?, F));
                }
                _ => {
                    return Err(ApiError::bad(
                        "response_format.type must be text, json_object or json_schema",
                        F,
                    ))
                }
            }
        }
    }
    const GUIDED: [&str; 4] = [
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    ];
    for field in GUIDED {
        let Some(v) = obj.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let spec = match field {
            "guided_json" => schema(v, field)?,
            "guided_regex" => GrammarSpec::Regex(text(v, field)?),
            "guided_choice" => choice(v, field)?,
            _ => GrammarSpec::Lark(text(v, field)?),
        };
        found.push((spec, field));
    }
    if let Some(so) = obj.get("structured_outputs").filter(|v| !v.is_null()) {
        const F: &str = "structured_outputs";
        let so = so
            .as_object()
            .ok_or_else(|| ApiError::bad("structured_outputs must be an object", F))?;
        for (key, v) in so.iter().filter(|(_, v)| !v.is_null()) {
            let spec = match key.as_str() {
                "json" => schema(v, F)?,
                "regex" => GrammarSpec::Regex(text(v, F)?),
                "choice" => choice(v, F)?,
                "grammar" => GrammarSpec::Lark(text(v, F)?),
                "json_object" if v == &Value::Bool(true) => GrammarSpec::JsonObject,
                _ => continue,
            };
            found.push((spec, F));
        }
    }
    if found.len() > 1 {
        return Err(ApiError::bad(
            "at most one structured output (response_format, structured_outputs, guided_*)",
            found[1].1,
        ));
    }
    Ok(found.pop())
}

/// How many alternatives each token's log-probability comes with, if asked for: chat's
/// `logprobs` (a boolean) with `top_logprobs`, completions' `logprobs` (a count).
pub fn logprobs(obj: &Map<String, Value>, chat: bool) -> Result<Option<usize>, ApiError> {
    let range = |field: &str, v: Option<i64>| match v {
        Some(k) if !(0..=TOP_LOGPROBS_MAX as i64).contains(&k) => Err(ApiError::bad(
            format!("{field} must be between 0 and {TOP_LOGPROBS_MAX}"),
            field,
        )),
        v => Ok(v.map(|k| k as usize)),
    };
    if !chat {
        return range("logprobs", opt_int(obj, "logprobs")?);
    }
    let top = range("top_logprobs", opt_int(obj, "top_logprobs")?)?;
    match (opt_bool(obj, "logprobs")?, top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, Some(t)) if t > 0 => Err(ApiError::bad(
            "top_logprobs needs logprobs: true",
            "top_logprobs",
        )),
        (false, _) => Ok(None),
    }
}

/// The penalties and `logit_bias` (OpenAI's `{"token id": bias}`), each range-checked.
pub fn adjust(obj: &Map<String, Value>) -> Result<Adjust, ApiError> {
    let mut a = Adjust::default();
    if let Some(r) = opt_num(obj, "repetition_penalty")? {
        if !(r > 0.0 && r <= 2.0) {
            return Err(ApiError::bad(
                "repetition_penalty must be in (0, 2]",
                "repetition_penalty",
            ));
        }
        a.repetition_penalty = r as f32;
    }
    for (field, slot) in [
        ("presence_penalty", &mut a.presence_penalty),
        ("frequency_penalty", &mut a.frequency_penalty),
    ] {
        if let Some(v) = opt_num(obj, field)? {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::bad(
                    format!("{field} must be between -2 and 2"),
                    field,
                ));
            }
            *slot = v as f32;
        }
    }
    let bad = |why: String| Err(ApiError::bad(why, "logit_bias"));
    match obj.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            if map.len() > LOGIT_BIAS_MAX {
                return bad(format!("logit_bias takes at most {LOGIT_BIAS_MAX} entries"));
            }
            for (id, bias) in map {
                let Ok(id) = id.parse::<u32>() else {
                    return bad(format!("logit_bias key `{id}` is not a token id"));
                };
                match bias.as_f64() {
                    Some(b) if (-100.0..=100.0).contains(&b) => a.logit_bias.push((id, b as f32)),
                    _ => return bad(format!("logit_bias of {id} must be between -100 and 100")),
                }
            }
        }
        Some(_) => return bad("logit_bias must be an object of token ids to biases".into()),
    }
    Ok(a)
}
