//! # expertmesh-gateway
//!
//! The OpenAI-compatible HTTP API (DESIGN.md §7), run inside the coordinator process by
//! default, split as TGI's router is:
//!
//! - [`routes`]: the routes and handlers (auth, body cap, permits, metrics per request);
//! - [`openai`] parses a body, [`request`] validates it into a typed `ValidRequest` (the
//!   model's tokenizer and chat template, the context limit);
//! - [`backend`]: the cluster seam, the choice of attention worker (the holder of the
//!   prompt's prefix, [`affinity`], else the most free KV blocks), one channel per worker
//!   and the `AttentionService.Generate` stream;
//! - [`stream`]: a request's tokens as text with stop strings applied ([`text`]), migrated
//!   to another attention worker when its worker fails;
//! - [`response`]: one JSON response or server-sent events over a bounded channel, usage
//!   counts.
//!
//! [`front`] is the front door that `expertmesh up` puts in front of every coordinator's
//! gateway: one URL that outlives any of them, streams resumed across them.
//!
//! A client that disconnects drops the stream, which cancels the request on the worker.
//! Errors take OpenAI's shape ([`error`]); `/metrics` speaks Prometheus ([`metrics`]).

pub mod affinity;
pub mod backend;
pub mod decoding;
pub mod error;
pub mod front;
pub mod http;
pub mod images;
pub mod keys;
pub mod logprobs;
pub mod metrics;
pub mod openai;
pub mod request;
pub mod response;
pub mod routes;
pub mod stream;
pub mod text;
pub mod tools;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use expertmesh_model::config::generation_eos_ids;
use expertmesh_model::{
    ChatTemplate, Grammars, ImageTokens, ModelSource, ProcessorConfig, TextTokenizer,
};
use tokio::sync::Semaphore;

use crate::backend::Backend;
pub use crate::backend::Cluster;
use crate::images::ImageConfig;
use crate::keys::ApiKeys;
use crate::metrics::Metrics;
use crate::request::Validator;

/// Gateway settings.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// HTTP address to listen on.
    pub http: String,
    /// The model directory (tokenizer, chat template, config).
    pub model: String,
    /// When any key is set (here or in `api_key_file`), requests must carry
    /// `Authorization: Bearer <key>` with one of them.
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (`#` comments), read again when it changes.
    pub api_key_file: Option<String>,
    /// The key `/metrics` on the API port requires. With API keys set and no metrics key,
    /// `/metrics` is not served on the API port (serve it on its own address: the
    /// coordinator's `--metrics`).
    pub metrics_key: Option<String>,
    /// Largest request body accepted, in bytes.
    pub body_max_bytes: usize,
    /// Requests in flight at most; more get 429.
    pub requests_max: usize,
    /// Default `max_tokens` of `/v1/completions`.
    pub completion_tokens_default: usize,
    /// A request fails when its worker sends nothing for this long, in ms (first token
    /// included: a long queue or prompt must still make progress within it).
    pub token_timeout_ms: u64,
    /// How images are taken (data: URLs always; http:// URLs when allowed) and bounded.
    pub images: ImageConfig,
    /// A Jinja chat template used instead of the model's (vLLM's `--chat-template`).
    pub chat_template: Option<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            http: "127.0.0.1:8000".into(),
            model: "tests/fixtures/tiny-maverick".into(),
            api_keys: Vec::new(),
            api_key_file: None,
            metrics_key: None,
            // Room for a few base64 images (a 20 MiB image is 27 MiB as base64).
            body_max_bytes: 32 << 20,
            requests_max: 512,
            completion_tokens_default: 16,
            token_timeout_ms: 120_000,
            images: ImageConfig::default(),
            chat_template: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Model(#[from] expertmesh_model::ModelError),
    #[error("cannot serve HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// The gateway's state, shared by its handlers.
pub struct App {
    pub validator: Validator,
    pub backend: Backend,
    pub metrics: Metrics,
    pub config: GatewayConfig,
    /// The keys requests must carry (none: open).
    pub keys: ApiKeys,
    /// Requests in flight (`requests_max`).
    pub permits: Arc<Semaphore>,
    pub next_id: AtomicU64,
    /// How the model's images become tiles (their grids size the prompt).
    pub processor: ProcessorConfig,
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    config: GatewayConfig,
    cluster: Arc<dyn Cluster>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let keys = ApiKeys::new(
        config.api_keys.clone(),
        config.api_key_file.as_ref().map(Into::into),
    )
    .map_err(|e| {
        GatewayError::Io(std::io::Error::other(format!(
            "the API key file {}: {e}",
            config.api_key_file.as_deref().unwrap_or_default()
        )))
    })?;
    let source: ModelSource = config.model.parse()?;
    let model_config = source.config()?;
    let processor = source.processor_config()?;
    let (tokenizer, template, stop_ids, model_name) = match &source {
        ModelSource::Dir(dir) => (
            Some(TextTokenizer::from_dir(dir)?),
            ChatTemplate::from_dir_with(dir, config.chat_template.as_deref().map(Path::new))?,
            generation_eos_ids(dir)?.unwrap_or_else(|| model_config.eos_token_ids.clone()),
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| config.model.clone()),
        ),
        ModelSource::Synthetic(_) => (None, None, Vec::new(), "synthetic-bench".to_owned()),
    };
    let vision = match (source.vision_config()?, &tokenizer) {
        (Some(v), Some(tok)) => Some((ImageTokens::from_tokenizer(tok)?, v.tokens_per_tile())),
        _ => None,
    };
    // Structured outputs' compiler, over the tokenizer already loaded.
    let grammars = match (&source, &tokenizer) {
        (ModelSource::Dir(dir), Some(tok)) => Some(Grammars::with_tokenizer(
            dir,
            tok.clone(),
            model_config.vocab_size,
            &model_config.eos_token_ids,
        )?),
        _ => None,
    };
    let app = Arc::new(App {
        validator: Validator {
            tokenizer,
            template,
            config: model_config,
            model_name,
            model_path: config.model.clone(),
            completion_tokens_default: config.completion_tokens_default,
            vision,
            grammars,
        },
        backend: Backend::new(cluster, stop_ids),
        metrics: Metrics::default(),
        permits: Arc::new(Semaphore::new(config.requests_max)),
        config,
        keys,
        next_id: AtomicU64::new(1),
        processor,
    });
    let router = routes::router(app);
    http::serve(listener, router, shutdown).await?;
    Ok(())
}
