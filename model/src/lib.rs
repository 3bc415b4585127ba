//! # expertmesh-model
//!
//! The Llama 4 model as one process runs it: the reference every distributed and GPU path
//! is checked against.
//!
//! - [`config`] reads `config.json` (both transformers spellings, both architectures).
//! - [`checkpoint`] maps safetensors checkpoints behind the [`WeightSource`] seam; weights
//!   stay bf16 in memory.
//! - [`tokenizer`] wraps the HF tokenizer and renders chat templates.
//! - [`model`] is the decoder: [`Model::forward`] takes a batch of sequences, each with its
//!   [`KvCache`] and new tokens, and returns logits and each MoE layer's routes. The forward
//!   pass is written once (`forward.rs`: micro-batches, the layer loop, the MoE start/finish
//!   around the [`moe::ExpertRunner`] seam, the cache advance) over a compute backend
//!   (`backend.rs`): the CPU backend (`cpu.rs`: RMSNorm → [`attention`] (RoPE/NoPE,
//!   chunked/global) → RMSNorm → dense [`moe::Mlp`] or top-1 [`moe::Moe`], products through
//!   [`linear`]) or the CUDA one.
//! - [`vision`] is the image path: preprocessing, prompt expansion and the vision tower,
//!   whose rows replace the `<|patch|>` embeddings (`Sequence::patches`).
//! - [`generate`] is the prefill-then-decode loop with [`sampling`].
//! - [`prefix_cache`] keeps the KV blocks of computed prefixes for the requests that share them.
//! - [`synthetic`] builds random models of any shape in memory, for benchmarks.
//! - `cuda` (cargo feature `cuda`; an uninhabited stub without it) is the GPU backend behind
//!   [`Model::to_device`]: weights on the device in bf16, cuBLAS products, NVRTC kernels and
//!   their typed launches, the paged KV store on the device, GPU expert shards, NCCL links
//!   and the GPU benchmarks. The CPU backend stays the reference that every GPU test
//!   compares against.

pub mod attention;
mod backend;
pub mod checkpoint;
pub mod config;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_off.rs"]
pub mod cuda;
pub mod device;
pub mod error;
mod forward;
pub mod fp8;
pub mod generate;
pub mod grammar;
pub mod hot;
pub mod kernels;
pub mod kv_cache;
pub mod landing;
pub mod linear;
pub mod model;
pub mod moe;
pub mod norm;
pub mod prefix_cache;
pub mod quant;
pub mod rope;
pub mod sampling;
pub mod source;
pub mod synthetic;
pub mod tokenizer;
pub mod vision;

pub use checkpoint::{DType, InMemoryWeights, SafetensorsCheckpoint, Tensor, WeightSource};
pub use config::TextConfig;
pub use device::{Device, GemmPrecision};
pub use error::{ExpertsFailure, Fault, ModelError, Result};
pub use generate::{
    generate, generate_with, prompt_logprobs, FinishReason, GenerateOutput, GenerateRequest,
};
pub use grammar::{Constraint, GrammarSpec, Grammars, TokenMask};
pub use kv_cache::KvCache;
pub use model::{Forward, ImageRows, LocalExperts, LogitRows, Model, Sequence};
pub use prefix_cache::{ChainKey, PrefixCache};
pub use sampling::{logprobs, Adjust, Sampler, SamplingParams, TokenLogprobs};
pub use source::ModelSource;
pub use tokenizer::{ChatMessage, ChatTemplate, DetokenizeStream, TextTokenizer};
pub use vision::{ImageError, ImageLimits, ImageTokens, Pixels, ProcessorConfig, VisionConfig};
