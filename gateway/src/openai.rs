//! OpenAI request bodies, checked field by field. A malformed body is a 400 that names the
//! field; nothing past this module sees untyped JSON.

use serde_json::{Map, Value};

use expertmesh_model::{Adjust, ChatMessage, GrammarSpec};

use crate::decoding::{adjust, choices, grammar, logprobs};
use crate::error::ApiError;
use crate::tools::Tools;

/// Stop strings accepted per request at most (OpenAI's limit).
const STOP_MAX: usize = 4;
/// Choices one request may ask for (`n`).
pub const CHOICES_MAX: usize = 16;

/// What the prompt is.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Chat(Vec<ChatMessage>),
}

/// A completion or chat request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Generate past the model's end-of-sequence tokens (vLLM's `ignore_eos`): only
    /// `max_tokens` and stop strings end the text.
    pub ignore_eos: bool,
    /// Put each choice's token ids beside its text (vLLM's `return_token_ids`; in a stream,
    /// each chunk carries the ids of its tokens).
    pub return_token_ids: bool,
    /// Token ids that end the text besides the model's own end ids (vLLM's
    /// `stop_token_ids`; they apply with `ignore_eos` too).
    pub stop_token_ids: Vec<u32>,
    /// Stop ids (the model's and `stop_token_ids`) cannot end the text before this many
    /// tokens (vLLM's `min_tokens`; stop strings still can).
    pub min_tokens: usize,
    /// Tokens this request already generated before the gateway that streamed them went
    /// away (an expertmesh extension, sent by a front door resuming the stream): it goes on
    /// after them, its text starting after theirs, its usage counting them.
    pub resume_token_ids: Vec<u32>,
    /// The chat's image URLs (`image_url` parts), in the order of their placeholders.
    pub images: Vec<String>,
    /// Choices to return (`n`), each with its own draws.
    pub n: usize,
    /// Choices to generate (`best_of`, at least `n`): the `n` with the highest cumulative
    /// logprob are returned, as vLLM ranks them.
    pub best_of: usize,
    /// Each generated token's log-probability with this many alternatives: chat's
    /// `logprobs` + `top_logprobs`, completions' `logprobs`.
    pub logprobs: Option<usize>,
    /// The prompt goes before each choice's text (completions' `echo`), with its tokens'
    /// log-probabilities when `logprobs` is asked for.
    pub echo: bool,
    /// Penalties and `logit_bias` (token ids checked against the vocabulary later).
    pub adjust: Adjust,
    /// What the output must match, and the field that asked for it (structured outputs, or
    /// a tool call that `tool_choice` requires).
    pub grammar: Option<(GrammarSpec, &'static str)>,
    /// The functions a chat may call.
    pub tools: Option<Tools>,
}

impl CompletionRequest {
    /// Parses a `/v1/completions` (`chat` false) or `/v1/chat/completions` body.
    pub fn parse(body: &[u8], chat: bool) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}"), "body"))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ApiError::bad("the body must be a JSON object", "body"))?;
        let mut images = Vec::new();
        let prompt = if chat {
            Prompt::Chat(messages(obj, &mut images)?)
        } else {
            prompt(obj)?
        };
        let (n, best_of) = choices(obj, chat)?;
        let echo = !chat && opt_bool(obj, "echo")?;
        let tools = if chat { Tools::parse(obj)? } else { None };
        let grammar = grammar(obj, tools.as_ref())?;
        let logprobs = logprobs(obj, chat)?;
        let max_tokens =
            match opt_int(obj, "max_completion_tokens")?.or(opt_int(obj, "max_tokens")?) {
                // The prompt's logprobs alone, as lm-eval-harness asks for them.
                Some(0) if echo => Some(0),
                Some(n) if n < 1 => {
                    return Err(ApiError::bad(
                        "max_tokens must be at least 1 (0 only with echo)",
                        "max_tokens",
                    ))
                }
                Some(n) => Some(n as usize),
                None => None,
            };
        let temperature = opt_num(obj, "temperature")?.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                "temperature must be between 0 and 2",
                "temperature",
            ));
        }
        let top_p = opt_num(obj, "top_p")?.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad("top_p must be in (0, 1]", "top_p"));
        }
        let top_k = match opt_int(obj, "top_k")? {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(_) => return Err(ApiError::bad("top_k must be -1, 0 or positive", "top_k")),
        };
        let seed = opt_int(obj, "seed")?.unwrap_or(0) as u64;
        let stream = opt_bool(obj, "stream")?;
        let ignore_eos = opt_bool(obj, "ignore_eos")?;
        let return_token_ids = opt_bool(obj, "return_token_ids")?;
        let stop_token_ids = opt_ids(obj, "stop_token_ids")?;
        let min_tokens = match opt_int(obj, "min_tokens")? {
            None => 0,
            Some(n) if n >= 0 => n as usize,
            Some(_) => return Err(ApiError::bad("min_tokens must be 0 or more", "min_tokens")),
        };
        let resume_token_ids = match obj.get("resume_token_ids") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => ids(a).ok_or_else(|| {
                ApiError::bad(
                    "resume_token_ids must be a list of token ids",
                    "resume_token_ids",
                )
            })?,
            Some(_) => {
                return Err(ApiError::bad(
                    "resume_token_ids must be a list of token ids",
                    "resume_token_ids",
                ))
            }
        };
        let include_usage = obj
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let model = match obj.get("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(m)) => Some(m.clone()),
            Some(_) => return Err(ApiError::bad("model must be a string", "model")),
        };
        Ok(Self {
            model,
            prompt,
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            seed,
            stop: stop(obj)?,
            stream,
            include_usage,
            ignore_eos,
            return_token_ids,
            stop_token_ids,
            min_tokens,
            resume_token_ids,
            images,
            n,
            best_of,
            logprobs,
            echo,
            adjust: adjust(obj)?,
            grammar,
            tools,
        })
    }
}

/// A list of token ids, empty when absent.
fn opt_ids(obj: &Map<String, Value>, field: &str) -> Result<Vec<u32>, ApiError> {
    let bad = || ApiError::bad(format!("{field} must be a list of token ids"), field);
    match obj.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => ids(a).ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

/// The prompt of a `/tokenize` body: `messages` (rendered by the chat template, with the
/// generation prompt and the `tools` given) or `prompt`, as vLLM takes them; images are not
/// tokenized there.
pub fn tokenize_request(body: &[u8]) -> Result<(Prompt, Option<Tools>), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}"), "body"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| ApiError::bad("the body must be a JSON object", "body"))?;
    if obj.contains_key("messages") {
        let mut images = Vec::new();
        let messages = messages(obj, &mut images)?;
        if !images.is_empty() {
            return Err(ApiError::bad("images are not tokenized here", "messages"));
        }
        return Ok((Prompt::Chat(messages), Tools::parse(obj)?));
    }
    Ok((prompt(obj)?, None))
}

/// The token ids of a `/detokenize` body (`tokens`).
pub fn detokenize_request(body: &[u8]) -> Result<Vec<u32>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}"), "body"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| ApiError::bad("the body must be a JSON object", "body"))?;
    if !obj.contains_key("tokens") {
        return Err(ApiError::bad("tokens is required", "tokens"));
    }
    opt_ids(obj, "tokens")
}

/// A boolean field, false when absent.
pub(crate) fn opt_bool(obj: &Map<String, Value>, field: &str) -> Result<bool, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad(format!("{field} must be a boolean"), field)),
    }
}

pub(crate) fn opt_num(obj: &Map<String, Value>, field: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("{field} must be a number"), field)),
    }
}

pub(crate) fn opt_int(obj: &Map<String, Value>, field: &str) -> Result<Option<i64>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("{field} must be an integer"), field)),
    }
}

fn stop(obj: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let list = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad("stop must be a string or a list of strings", "stop"))?,
        Some(_) => {
            return Err(ApiError::bad(
                "stop must be a string or a list of strings",
                "stop",
            ))
        }
    };
    if list.len() > STOP_MAX || list.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop takes 1 to 4 non-empty strings", "stop"));
    }
    Ok(list)
}

fn ids(a: &[Value]) -> Option<Vec<u32>> {
    a.iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

fn prompt(obj: &Map<String, Value>) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::bad(
            "prompt must be a string, a list of token ids, or a list of one of those",
            "prompt",
        )
    };
    let has_image = |v: &Value| {
        v.as_array().is_some_and(|a| {
            a.iter()
                .any(|p| p.get("type").is_some_and(|t| t == "image_url"))
        })
    };
    if obj
        .get("prompt")
        .is_some_and(|p| has_image(p) || p.as_array().is_some_and(|a| a.iter().any(has_image)))
    {
        return Err(ApiError::bad(
            "images are a chat feature: send them as image_url parts to /v1/chat/completions",
            "prompt",
        ));
    }
    match obj.get("prompt") {
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::bad("prompt is empty", "prompt")),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => {
            ids(a).map(Prompt::Ids).ok_or_else(bad)
        }
        Some(Value::Array(a)) if a.len() == 1 => match &a[0] {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(inner) => ids(inner).map(Prompt::Ids).ok_or_else(bad),
            _ => Err(bad()),
        },
        Some(Value::Array(_)) => Err(ApiError::bad(
            "only one prompt per request is supported",
            "prompt",
        )),
        None | Some(Value::Null) => Err(ApiError::bad("prompt is required", "prompt")),
        Some(_) => Err(bad()),
    }
}

/// One message's content parts as the chat template reads them: text parts as they are,
/// each `image_url` part as `{"type": "image"}` (its URL appended to `images`); `detail` is
/// accepted and ignored. Other part types are refused rather than silently dropped.
fn parts(parts: &[Value], field: &str, images: &mut Vec<String>) -> Result<Value, ApiError> {
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let field = format!("{field}.content[{j}]");
        match part.get("type").and_then(Value::as_str) {
            Some("text") => {
                if !part.get("text").is_some_and(Value::is_string) {
                    return Err(ApiError::bad(
                        format!("{field}.text must be a string"),
                        &field,
                    ));
                }
                out.push(part.clone());
            }
            Some("image_url") => {
                let url = match part.get("image_url") {
                    Some(Value::Object(o)) => o.get("url").and_then(Value::as_str),
                    Some(Value::String(s)) => Some(s.as_str()),
                    _ => None,
                };
                let url = url.ok_or_else(|| {
                    ApiError::bad(format!("{field}.image_url.url must be a string"), &field)
                })?;
                images.push(url.to_owned());
                out.push(serde_json::json!({"type": "image"}));
            }
            Some(other) => {
                return Err(ApiError::bad(
                    format!(
                        "{field}: content part type `{other}` is not supported (text, image_url)"
                    ),
                    &field,
                ))
            }
            None => {
                return Err(ApiError::bad(
                    format!("{field}.type must be a string"),
                    &field,
                ))
            }
        }
    }
    Ok(Value::Array(out))
}

fn messages(
    obj: &Map<String, Value>,
    images: &mut Vec<String>,
) -> Result<Vec<ChatMessage>, ApiError> {
    let list = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad("messages must be a list", "messages"))?;
    if list.is_empty() {
        return Err(ApiError::bad("messages must not be empty", "messages"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let field = format!("messages[{i}]");
            let role_field = format!("{field}.role");
            let role = match m.get("role").and_then(Value::as_str) {
                Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
                // OpenAI's newer name for the system prompt, as vLLM maps it.
                Some("developer") => "system",
                Some(r) => {
                    return Err(ApiError::bad(
                        format!(
                            "{role_field} `{r}` is not one of system, developer, user, \
                             assistant, tool"
                        ),
                        &role_field,
                    ))
                }
                None => {
                    return Err(ApiError::bad(
                        format!("{role_field} must be a string"),
                        &role_field,
                    ))
                }
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => Value::String(s.clone()),
                Some(Value::Array(list)) if list.iter().all(Value::is_object) => {
                    parts(list, &field, images)?
                }
                // Only an assistant turn (one that called tools) may come without content.
                Some(Value::Null) | None if role == "assistant" => Value::String(String::new()),
                Some(Value::Null) | None => {
                    let content = format!("{field}.content");
                    return Err(ApiError::bad(
                        format!("{content} is required for a {role} message"),
                        &content,
                    ));
                }
                Some(_) => {
                    return Err(ApiError::bad(
                        format!("{field}.content must be a string or a list of parts"),
                        &field,
                    ))
                }
            };
            Ok(ChatMessage {
                role: role.to_owned(),
                content,
                tool_calls: tool_calls(m, role, &field)?,
                tool_call_id: match (role, m.get("tool_call_id")) {
                    ("tool", Some(Value::String(id))) => Some(id.clone()),
                    ("tool", Some(_)) => {
                        let f = format!("{field}.tool_call_id");
                        return Err(ApiError::bad(format!("{f} must be a string"), &f));
                    }
                    _ => None,
                },
            })
        })
        .collect()
}

/// An assistant message's `tool_calls`, checked: each `{id, type: "function", function:
/// {name, arguments}}` with the arguments a JSON text, which the template gets parsed (as
/// the checkpoints' templates expect).
fn tool_calls(m: &Value, role: &str, field: &str) -> Result<Option<Value>, ApiError> {
    let f = format!("{field}.tool_calls");
    let list = match m.get("tool_calls") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) if role == "assistant" => list,
        Some(_) => {
            return Err(ApiError::bad(
                format!("{f} must be a list, on an assistant message"),
                &f,
            ))
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (j, call) in list.iter().enumerate() {
        let bad = || ApiError::bad(format!("{f}[{j}] must be a function call"), &f);
        let function = call.get("function").ok_or_else(bad)?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(bad)?;
        let arguments: Value = match function.get("arguments") {
            Some(Value::String(a)) => serde_json::from_str(a).map_err(|_| {
                ApiError::bad(format!("{f}[{j}].function.arguments is not JSON"), &f)
            })?,
            Some(a @ Value::Object(_)) => a.clone(),
            _ => return Err(bad()),
        };
        out.push(serde_json::json!({
            "id": call.get("id").cloned().unwrap_or(Value::Null),
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }));
    }
    Ok(Some(Value::Array(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str, chat: bool) -> Result<CompletionRequest, ApiError> {
        CompletionRequest::parse(body.as_bytes(), chat)
    }

    #[test]
    fn table() {
        let ok = [
            (r#"{"prompt": "hi"}"#, false),
            (
                r#"{"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}"#,
                false,
            ),
            (
                r#"{"prompt": [[1, 2]], "stop": ["a", "b"], "stream": true}"#,
                false,
            ),
            (
                r#"{"messages": [{"role": "user", "content": "hi"}], "top_k": -1, "n": 1}"#,
                true,
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}"#,
                true,
            ),
            (
                r#"{"messages": [{"role": "developer", "content": "be brief"},
                    {"role": "user", "content": "hi"}, {"role": "assistant", "content": null},
                    {"role": "tool", "content": "42"}], "user": "u-1", "stop_token_ids": [7]}"#,
                true,
            ),
        ];
        for (body, chat) in ok {
            assert!(parse(body, chat).is_ok(), "{body}");
        }
        let full = parse(
            r#"{"prompt": [1], "n": 3, "best_of": 3, "logprobs": 2, "echo": true, "max_tokens": 0,
                "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
                "logit_bias": {"7": -100, "9": 2.5}}"#,
            false,
        )
        .unwrap();
        assert_eq!(
            (full.n, full.logprobs, full.echo, full.max_tokens),
            (3, Some(2), true, Some(0))
        );
        let mut bias = full.adjust.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(7, -100.0), (9, 2.5)]);
        assert_eq!(full.adjust.repetition_penalty, 1.2);
        let chat = parse(
            r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 5}"#,
            true,
        )
        .unwrap();
        assert_eq!(chat.logprobs, Some(5));
        let chat = parse(
            r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": false}"#,
            true,
        );
        assert_eq!(chat.unwrap().logprobs, None);
        let with_images = parse(
            r#"{"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:a", "detail": "high"}},
                {"type": "text", "text": "and"},
                {"type": "image_url", "image_url": "data:b"}]}]}"#,
            true,
        )
        .unwrap();
        assert_eq!(with_images.images, vec!["data:a", "data:b"]);
        let developer = parse(
            r#"{"messages": [{"role": "developer", "content": "x"}], "stop_token_ids": [7, 9]}"#,
            true,
        )
        .unwrap();
        let Prompt::Chat(m) = &developer.prompt else {
            panic!("a chat")
        };
        assert_eq!(m[0].role, "system");
        assert_eq!(developer.stop_token_ids, vec![7, 9]);
        let Prompt::Chat(m) = &with_images.prompt else {
            panic!("a chat")
        };
        assert_eq!(m[0].content[0], serde_json::json!({"type": "image"}));
        let bad = [
            ("{not json", false, "body"),
            ("[1]", false, "body"),
            (r#"{"prompt": 5}"#, false, "prompt"),
            (r#"{"prompt": []}"#, false, "prompt"),
            (r#"{"prompt": ["a", "b"]}"#, false, "prompt"),
            (r#"{"prompt": "x", "max_tokens": 0}"#, false, "max_tokens"),
            (r#"{"prompt": "x", "max_tokens": "3"}"#, false, "max_tokens"),
            (r#"{"prompt": "x", "temperature": 3}"#, false, "temperature"),
            (r#"{"prompt": "x", "top_p": 0}"#, false, "top_p"),
            (r#"{"prompt": "x", "n": 0}"#, false, "n"),
            (r#"{"prompt": "x", "n": 17}"#, false, "n"),
            (r#"{"prompt": "x", "n": 2, "best_of": 1}"#, false, "best_of"),
            (r#"{"prompt": "x", "best_of": 17}"#, false, "best_of"),
            (
                r#"{"prompt": "x", "best_of": 2, "stream": true}"#,
                false,
                "best_of",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "best_of": 2}"#,
                true,
                "best_of",
            ),
            (r#"{"prompt": "x", "logprobs": 21}"#, false, "logprobs"),
            (r#"{"prompt": "x", "logprobs": true}"#, false, "logprobs"),
            (
                r#"{"prompt": "x", "max_tokens": 0, "echo": false}"#,
                false,
                "max_tokens",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": 2}"#,
                true,
                "logprobs",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#,
                true,
                "top_logprobs",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": true,
                    "top_logprobs": 21}"#,
                true,
                "top_logprobs",
            ),
            (
                r#"{"prompt": "x", "presence_penalty": 2.5}"#,
                false,
                "presence_penalty",
            ),
            (
                r#"{"prompt": "x", "frequency_penalty": "1"}"#,
                false,
                "frequency_penalty",
            ),
            (
                r#"{"prompt": "x", "repetition_penalty": 0}"#,
                false,
                "repetition_penalty",
            ),
            (
                r#"{"prompt": "x", "logit_bias": {"a": 1}}"#,
                false,
                "logit_bias",
            ),
            (
                r#"{"prompt": "x", "logit_bias": {"5": 101}}"#,
                false,
                "logit_bias",
            ),
            (r#"{"prompt": "x", "logit_bias": [1]}"#, false, "logit_bias"),
            (r#"{"prompt": "x", "stop": ["", "a"]}"#, false, "stop"),
            (r#"{"prompt": "x", "stream": "yes"}"#, false, "stream"),
            (r#"{"prompt": "x", "ignore_eos": 1}"#, false, "ignore_eos"),
            (
                r#"{"prompt": "x", "return_token_ids": "y"}"#,
                false,
                "return_token_ids",
            ),
            (
                r#"{"prompt": "x", "resume_token_ids": [-1]}"#,
                false,
                "resume_token_ids",
            ),
            (
                r#"{"prompt": "x", "resume_token_ids": 3}"#,
                false,
                "resume_token_ids",
            ),
            (
                r#"{"prompt": "x", "stop_token_ids": ["a"]}"#,
                false,
                "stop_token_ids",
            ),
            (r#"{"prompt": "x", "min_tokens": -1}"#, false, "min_tokens"),
            (r#"{"messages": []}"#, true, "messages"),
            (
                r#"{"messages": [{"role": "hacker", "content": "hi"}]}"#,
                true,
                "messages[0].role",
            ),
            (
                r#"{"messages": [{"role": "user"}]}"#,
                true,
                "messages[0].content",
            ),
            (
                r#"{"messages": [{"role": "user", "content": {"text": "hi"}}]}"#,
                true,
                "messages[0]",
            ),
            (r#"{"messages": "hi"}"#, true, "messages"),
            (
                r#"{"messages": [{"content": "hi"}]}"#,
                true,
                "messages[0].role",
            ),
            (r#"{"prompt": "x", "model": 3}"#, false, "model"),
            (
                r#"{"prompt": [{"type": "image_url", "image_url": {"url": "data:,"}}]}"#,
                false,
                "prompt",
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                true,
                "messages[0].content[0]",
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}"#,
                true,
                "messages[0].content[0]",
            ),
        ];
        for (body, chat, param) in bad {
            match parse(body, chat) {
                Err(ApiError::BadRequest { param: Some(p), .. }) => assert_eq!(p, param, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
