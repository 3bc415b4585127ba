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
    #[error("tensor `{name}`: {reason}")]
    Quantized { name: String, reason: String },
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
    #[error("MoE layer {layer}: routed experts did not answer ({kind}): {reason}")]
    ExpertsUnavailable {
        layer: usize,
        kind: ExpertsFailure,
        reason: String,
    },
    #[error("the KV cache needs {needed} more blocks but {available} are free")]
    KvCacheFull { needed: usize, available: usize },
    #[error("this model was loaded without its routed experts; run it with an expert runner")]
    NoLocalExperts,
    #[error("device: {0}")]
    Device(String),
    #[error("cannot hold {bytes} bytes of weights in memory: {source}")]
    Memory {
        bytes: usize,
        source: std::io::Error,
    },
    #[error("invalid sampling parameter `{field}`: {reason}")]
    Sampling { field: &'static str, reason: String },
    #[error("structured output: {reason}")]
    Grammar { reason: String },
    #[error(transparent)]
    Image(#[from] crate::vision::ImageError),
    #[error("the prompt holds {placeholders} image placeholders for {images} images")]
    ImageCount { placeholders: usize, images: usize },
    #[error("{rows} image rows for {slots} `<|patch|>` tokens in the prompt")]
    ImageRows { rows: usize, slots: usize },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// How the routed experts failed to answer: the kind of the dispatch error that ended the
/// batch, kept through the `ExpertRunner` seam.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertsFailure {
    /// No reachable copy, or the workers holding it went away.
    Unreachable,
    /// The batch's time budget ran out.
    DeadlineExceeded,
    /// An expert worker's queue was full.
    Overloaded,
    /// The placement kept changing under the batch.
    PlacementChanging,
    /// A worker refused the batch as malformed (a bug on one side).
    Rejected,
}

impl std::fmt::Display for ExpertsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unreachable => "unreachable",
            Self::DeadlineExceeded => "deadline exceeded",
            Self::Overloaded => "overloaded",
            Self::PlacementChanging => "placement changing",
            Self::Rejected => "rejected",
        })
    }
}

/// Whose fault an error is: what every boundary (the engine's failures, the gRPC status,
/// the HTTP status behind it) is decided from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request itself: resending it unchanged fails again.
    Request,
    /// The cluster cannot answer now; another try may succeed.
    Unavailable,
    /// The time budget ran out.
    Deadline,
    /// A bug or a broken installation.
    Internal,
}

impl ModelError {
    /// Whose fault this error is (the one table of it).
    pub fn fault(&self) -> Fault {
        match self {
            Self::TokenOutOfVocab { .. }
            | Self::ContextExceeded { .. }
            | Self::EmptyPrompt
            | Self::Sampling { .. }
            | Self::Grammar { .. }
            | Self::Image(_)
            | Self::ImageCount { .. }
            | Self::ImageRows { .. }
            // The request needs more of the cache than this worker has at all.
            | Self::KvCacheFull { .. } => Fault::Request,
            Self::ExpertsUnavailable {
                kind: ExpertsFailure::DeadlineExceeded,
                ..
            } => Fault::Deadline,
            Self::ExpertsUnavailable { .. } => Fault::Unavailable,
            _ => Fault::Internal,
        }
    }

    pub fn is_request_fault(&self) -> bool {
        self.fault() == Fault::Request
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_one_fault() {
        let experts = |kind| ModelError::ExpertsUnavailable {
            layer: 1,
            kind,
            reason: "x".into(),
        };
        let cases = [
            (ModelError::EmptyPrompt, Fault::Request),
            (
                ModelError::TokenOutOfVocab { id: 9, vocab: 4 },
                Fault::Request,
            ),
            (
                ModelError::ContextExceeded {
                    len: 1,
                    new: 2,
                    max: 2,
                },
                Fault::Request,
            ),
            (
                ModelError::Sampling {
                    field: "top_p",
                    reason: "x".into(),
                },
                Fault::Request,
            ),
            (
                ModelError::KvCacheFull {
                    needed: 9,
                    available: 1,
                },
                Fault::Request,
            ),
            (
                ModelError::Image(crate::vision::ImageError::NoVision),
                Fault::Request,
            ),
            (ModelError::ImageRows { rows: 1, slots: 2 }, Fault::Request),
            (experts(ExpertsFailure::Unreachable), Fault::Unavailable),
            (experts(ExpertsFailure::Overloaded), Fault::Unavailable),
            (
                experts(ExpertsFailure::PlacementChanging),
                Fault::Unavailable,
            ),
            (experts(ExpertsFailure::DeadlineExceeded), Fault::Deadline),
            (ModelError::NoLocalExperts, Fault::Internal),
            (ModelError::Device("x".into()), Fault::Internal),
        ];
        for (e, fault) in cases {
            assert_eq!(e.fault(), fault, "{e}");
            assert_eq!(e.is_request_fault(), fault == Fault::Request, "{e}");
        }
    }
}
