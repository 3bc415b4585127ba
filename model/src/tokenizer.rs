//! Text in and out: the Hugging Face tokenizer (`tokenizers` crate) and the chat template
//! (`minijinja`, configured like transformers' `jinja2` sandbox: `trim_blocks`,
//! `lstrip_blocks`, Python string methods, `raise_exception`).

use std::path::{Path, PathBuf};

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The model's tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self { inner, path })
    }

    fn err(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Encodes text. `add_special_tokens` lets the post-processor add BOS; leave it off
    /// for text rendered by the chat template, which already starts with BOS.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids, special tokens included. Ids the tokenizer does not know (the model's
    /// vocabulary may be larger) decode to nothing.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let known = self.inner.get_vocab_size(true) as u32;
        let ids: Vec<u32> = ids.iter().copied().filter(|&id| id < known).collect();
        self.inner.decode(&ids, false).map_err(|e| self.err(e))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Turns a stream of ids into text pieces as soon as they form whole characters (the
/// prefix/read offsets scheme of text-generation-inference).
#[derive(Debug, Default)]
pub struct DetokenizeStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DetokenizeStream {
    /// The text still held back (an incomplete character at the end, decoded as U+FFFD),
    /// at the end of the stream.
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.strip_prefix(&prefix).unwrap_or_default().to_owned())
    }

    /// Adds one id; returns the new text, if any is complete.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{fffd}') && full.starts_with(&prefix) {
            let piece = full[prefix.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }
}

/// One chat message. `content` is a string or a list of typed parts
/// (`{"type": "text", "text": ...}`, `{"type": "image"}`), as in OpenAI's API; an assistant
/// turn that called tools has its `tool_calls`, a tool's answer the `tool_call_id` it
/// answers (both as OpenAI spells them, for the template to render).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: Value::String(content.into()),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// A model's chat template and the special tokens it refers to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Reads the template from `tokenizer_config.json` (`chat_template`, a string or a
    /// list of named templates, "default" preferred) or from `chat_template.jinja`.
    /// Returns `None` when the model has no template.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        Self::from_dir_with(dir, None)
    }

    /// `from_dir`, with the template read from `template` instead when given (vLLM's
    /// `--chat-template`); the special tokens still come from the model directory.
    pub fn from_dir_with(dir: &Path, template: Option<&Path>) -> Result<Option<Self>> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: cfg_path.clone(),
                source,
            })?
        } else {
            Value::Null
        };
        let jinja_path = dir.join("chat_template.jinja");
        let given = match template {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| ModelError::io(p, e))?),
            None => None,
        };
        let source = match cfg.get("chat_template") {
            _ if given.is_some() => given,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ if jinja_path.exists() => Some(
                std::fs::read_to_string(&jinja_path).map_err(|e| ModelError::io(&jinja_path, e))?,
            ),
            _ => None,
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let token = |key: &str| -> String {
            match cfg.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                _ => String::new(),
            }
        };
        Self::new(source, token("bos_token"), token("eos_token")).map(Some)
    }

    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| ModelError::Template {
                reason: e.to_string(),
            })?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders a conversation; with `add_generation_prompt` it ends with the assistant
    /// header, ready for the model to answer.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// `render` with the functions the model may call (OpenAI's `tools` list), which the
    /// template places as the checkpoint's does (a template without tools ignores them).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(ModelError::Template {
                reason: "the conversation has no messages".into(),
            });
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template {
                reason: e.to_string(),
            })?;
        tmpl.render(context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ModelError::Template {
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_errors_are_typed() {
        let t = ChatTemplate::new(
            "{{ raise_exception('no system role') }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = t
            .render(&[ChatMessage::new("user", "hi")], true)
            .unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
        assert!(ChatTemplate::new("{% if %}".into(), String::new(), String::new()).is_err());
        assert!(t.render(&[], true).is_err());
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip() }}|{% endfor %}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "  hi  ")], false)
            .unwrap();
        assert_eq!(out, "hi|");
    }
}
