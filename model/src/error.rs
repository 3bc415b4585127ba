//! The model crate's one error type. Every variant names the file, tensor or field it is
//! about, so that a bad checkpoint or a bad request can be fixed from the message alone.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model or running one request.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: missing field `{field}`")]
    MissingField { file: String, field: String },
    #[error("{file}: field `{field}` is invalid: {reason}")]
    InvalidField {
        file: String,
        field: String,
        reason: String,
    },
    #[error("{path} is not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("checkpoint has no tensor `{name}`")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {dtype}, expected one of bf16, f16, f32")]
    TensorDtype { name: String, dtype: String },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfVocab { id: u32, vocab: usize },
    #[error("prompt of {len} tokens plus {new} new tokens exceeds the context of {max} tokens")]
    ContextExceeded { len: usize, new: usize, max: usize },
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("chat template: {reason}")]
    Template { reason: String },
    #[error("MoE layer {layer}: routed experts did not answer: {reason}")]
    ExpertsUnavailable { layer: usize, reason: String },
    #[error("the KV cache needs {needed} more blocks but {available} are free")]
    KvCacheFull { needed: usize, available: usize },
    #[error("this model was loaded without its routed experts; run it with an expert runner")]
    NoLocalExperts,
    #[error("device: {0}")]
    Device(String),
    #[error("invalid sampling parameter `{field}`: {reason}")]
    Sampling { field: &'static str, reason: String },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
