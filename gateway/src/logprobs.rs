//! Log-probabilities in OpenAI's two shapes: chat's `logprobs.content` (one entry per token:
//! its text, UTF-8 bytes, logprob and `top_logprobs`) and the legacy completions object
//! (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`, the echoed prompt's first
//! token `null`), whole or per streamed chunk.
//!
//! The figures are the raw model's (the log-softmax of the logits before penalties, biases
//! and temperature: vLLM's default). A token's text is its own decoding, as vLLM gives it; a
//! model without a tokenizer names tokens `token_id:<id>` (vLLM's
//! `return_tokens_as_token_ids` spelling). JSON has no infinities: a logprob of −∞ (a token
//! barred by its logit) is written as −9999, as vLLM writes it.

use expertmesh_model::{TextTokenizer, TokenLogprobs};
use serde_json::{json, Map, Value};

/// The figure written for a logprob of −∞.
const LOGPROB_FLOOR: f32 = -9999.0;

fn figure(lp: f32) -> f32 {
    lp.max(LOGPROB_FLOOR)
}

/// A token's text as logprobs name it.
pub fn token_text(tokenizer: Option<&TextTokenizer>, id: u32) -> String {
    match tokenizer {
        Some(t) => t.decode(&[id]).unwrap_or_default(),
        None => format!("token_id:{id}"),
    }
}

/// One chat `logprobs.content` entry.
pub fn chat_entry(tokenizer: Option<&TextTokenizer>, id: u32, lp: &TokenLogprobs) -> Value {
    let one = |id: u32, logprob: f32| {
        let token = token_text(tokenizer, id);
        json!({"token": token, "logprob": figure(logprob), "bytes": token.as_bytes()})
    };
    let mut entry = one(id, lp.logprob);
    entry["top_logprobs"] = lp.top.iter().map(|&(i, l)| one(i, l)).collect();
    entry
}

/// The legacy completions object, built token by token; [`Legacy::take`] hands out what
/// was pushed since the last take (a streamed chunk's part), the offsets running on.
#[derive(Debug, Default)]
pub struct Legacy {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<Map<String, Value>>>,
    text_offset: Vec<usize>,
    /// Characters of text before the next token (Python's `len`, as OpenAI counts).
    offset: usize,
}

impl Legacy {
    /// A token and its logprobs; `None` for the echoed prompt's first token, which has none.
    /// The alternatives include the token itself, as OpenAI's legacy shape does.
    pub fn push(&mut self, tokenizer: Option<&TextTokenizer>, id: u32, lp: Option<&TokenLogprobs>) {
        let text = token_text(tokenizer, id);
        self.text_offset.push(self.offset);
        self.offset += text.chars().count();
        self.token_logprobs.push(lp.map(|l| figure(l.logprob)));
        self.top_logprobs.push(lp.map(|l| {
            let mut top = Map::new();
            for &(i, v) in &l.top {
                top.entry(token_text(tokenizer, i))
                    .or_insert(json!(figure(v)));
            }
            top.entry(text.clone()).or_insert(json!(figure(l.logprob)));
            top
        }));
        self.tokens.push(text);
    }

    /// Everything pushed since the last take, as the legacy object.
    pub fn take(&mut self) -> Value {
        json!({
            "tokens": std::mem::take(&mut self.tokens),
            "token_logprobs": std::mem::take(&mut self.token_logprobs),
            "top_logprobs": std::mem::take(&mut self.top_logprobs),
            "text_offset": std::mem::take(&mut self.text_offset),
        })
    }
}

/// A choice's log-probabilities as its request wants them: chat entries or the legacy
/// object (with the echoed prompt first).
pub enum Logprobs<'t> {
    Chat {
        tokenizer: Option<&'t TextTokenizer>,
        content: Vec<Value>,
    },
    Legacy {
        tokenizer: Option<&'t TextTokenizer>,
        legacy: Legacy,
    },
}

impl<'t> Logprobs<'t> {
    pub fn new(tokenizer: Option<&'t TextTokenizer>, chat: bool) -> Self {
        if chat {
            Self::Chat {
                tokenizer,
                content: Vec::new(),
            }
        } else {
            Self::Legacy {
                tokenizer,
                legacy: Legacy::default(),
            }
        }
    }

    /// The echoed prompt's tokens: the first without logprobs, each other with those the
    /// worker sent (`lps[i]` is of `prompt[i + 1]`). Chat has no echo.
    pub fn prompt(&mut self, prompt: &[u32], lps: &[TokenLogprobs]) {
        if let Self::Legacy { tokenizer, legacy } = self {
            for (i, &id) in prompt.iter().enumerate() {
                legacy.push(*tokenizer, id, i.checked_sub(1).and_then(|j| lps.get(j)));
            }
        }
    }

    /// A generated token.
    pub fn token(&mut self, id: u32, lp: &TokenLogprobs) {
        match self {
            Self::Chat { tokenizer, content } => content.push(chat_entry(*tokenizer, id, lp)),
            Self::Legacy { tokenizer, legacy } => legacy.push(*tokenizer, id, Some(lp)),
        }
    }

    /// What was added since the last take, in the request's shape.
    pub fn take(&mut self) -> Value {
        match self {
            Self::Chat { content, .. } => json!({ "content": std::mem::take(content) }),
            Self::Legacy { legacy, .. } => legacy.take(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(logprob: f32, top: &[(u32, f32)]) -> TokenLogprobs {
        TokenLogprobs {
            logprob,
            top: top.to_vec(),
        }
    }

    #[test]
    fn legacy_echo_has_a_null_first_token_and_running_offsets() {
        let mut l = Logprobs::new(None, false);
        l.prompt(&[5, 6], &[lp(-1.0, &[(6, -1.0)])]);
        l.token(7, &lp(f32::NEG_INFINITY, &[(6, -0.5)]));
        let v = l.take();
        assert_eq!(
            v,
            json!({
                "tokens": ["token_id:5", "token_id:6", "token_id:7"],
                "token_logprobs": [null, -1.0, -9999.0],
                "top_logprobs": [null, {"token_id:6": -1.0},
                                 {"token_id:6": -0.5, "token_id:7": -9999.0}],
                "text_offset": [0, 10, 20],
            })
        );
        l.token(8, &lp(-0.25, &[]));
        let next = l.take();
        assert_eq!(
            next["text_offset"],
            json!([30]),
            "offsets run on across takes"
        );
        assert_eq!(next["tokens"], json!(["token_id:8"]));
    }

    #[test]
    fn chat_entries_carry_bytes_and_alternatives() {
        let mut l = Logprobs::new(None, true);
        l.prompt(&[1, 2], &[]);
        l.token(3, &lp(-0.5, &[(3, -0.5), (4, -1.5)]));
        let v = l.take();
        assert_eq!(
            v["content"].as_array().unwrap().len(),
            1,
            "chat has no echo"
        );
        let e = &v["content"][0];
        assert_eq!(e["token"], "token_id:3");
        assert_eq!(e["bytes"], json!(b"token_id:3".to_vec()));
        assert_eq!(e["top_logprobs"][1]["logprob"], json!(-1.5));
        assert_eq!(l.take(), json!({"content": []}));
    }
}
