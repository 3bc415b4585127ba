//! Request validation: a parsed OpenAI request ([`CompletionRequest`]) becomes a typed
//! [`ValidRequest`] — the model name checked, the prompt tokenized (text with BOS, chat
//! through the template, or token ids checked against the vocabulary), `max_tokens` fitted
//! to the context — or a 400/404 naming the field.

use expertmesh_model::{
    ChatTemplate, GrammarSpec, Grammars, ImageError, ImageTokens, TextConfig, TextTokenizer,
};

use crate::error::ApiError;
use crate::images::{image_error, LoadedImage};
use crate::openai::{CompletionRequest, Prompt};

/// What validation needs of the model: its tokenizer, template, config and names.
pub struct Validator {
    /// None for synthetic models: prompts are token ids and tokens have no text.
    pub tokenizer: Option<TextTokenizer>,
    pub template: Option<ChatTemplate>,
    pub config: TextConfig,
    /// The names a request's `model` may use.
    pub model_name: String,
    pub model_path: String,
    /// `max_tokens` of a completion that names none.
    pub completion_tokens_default: usize,
    /// For a model with a vision tower: its image tokens and the rows one tile yields.
    pub vision: Option<(ImageTokens, usize)>,
    /// Structured outputs' compiler (none for a model without a tokenizer): a grammar is
    /// compiled here once, so that one that cannot be is a 400 before a worker sees it.
    pub grammars: Option<Grammars>,
}

/// A request that passed every check, tokenized, ready to send.
#[derive(Debug)]
pub struct ValidRequest {
    /// `/v1/chat/completions` (else `/v1/completions`).
    pub chat: bool,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub request: CompletionRequest,
    /// The images' encoded bytes, in prompt order.
    pub images: Vec<Vec<u8>>,
    /// The request's trace context as this gateway passes it on (its span the parent).
    pub trace: Option<expertmesh_proto::trace::TraceParent>,
}

/// Stop token ids one request may name.
const STOP_TOKEN_IDS_MAX: usize = 64;

impl Validator {
    /// Validates a parsed request whose images (`request.images`, resolved and checked by
    /// `images::load`) are `images`.
    pub fn validate(
        &self,
        request: CompletionRequest,
        chat: bool,
        images: Vec<LoadedImage>,
    ) -> Result<ValidRequest, ApiError> {
        if let Some(m) = &request.model {
            if *m != self.model_name && *m != self.model_path {
                return Err(ApiError::NotFound(format!(
                    "the model `{m}` does not exist"
                )));
            }
        }
        let tools = request.tools.as_ref().map(|t| &t.list);
        let mut prompt = self.tokenize_with_tools(&request.prompt, tools)?;
        if !images.is_empty() {
            let (tokens, per_tile) = self.vision.ok_or(image_error(ImageError::NoVision))?;
            let grids: Vec<(usize, usize)> = images.iter().map(|i| i.grid).collect();
            prompt = tokens
                .expand(&prompt, &grids, per_tile)
                .map_err(|e| ApiError::bad(e.to_string(), "messages"))?;
        }
        let max_tokens = self.max_tokens(prompt.len(), request.max_tokens, chat)?;
        let resumed = &request.resume_token_ids;
        if resumed.len() > max_tokens {
            return Err(ApiError::bad(
                format!(
                    "{} resumed tokens are more than max_tokens {max_tokens}",
                    resumed.len()
                ),
                "resume_token_ids",
            ));
        }
        self.check_vocabulary(resumed, "resume_token_ids")?;
        if !resumed.is_empty() && request.best_of > 1 {
            return Err(ApiError::bad(
                "a stream with n > 1 cannot be resumed",
                "resume_token_ids",
            ));
        }
        self.check_vocabulary(&request.stop_token_ids, "stop_token_ids")?;
        let biased: Vec<u32> = request.adjust.logit_bias.iter().map(|b| b.0).collect();
        self.check_vocabulary(&biased, "logit_bias")?;
        if request.min_tokens > max_tokens {
            return Err(ApiError::bad(
                format!(
                    "min_tokens {} is over max_tokens {max_tokens}",
                    request.min_tokens
                ),
                "min_tokens",
            ));
        }
        if request.stop_token_ids.len() > STOP_TOKEN_IDS_MAX {
            return Err(ApiError::bad(
                format!("at most {STOP_TOKEN_IDS_MAX} stop_token_ids"),
                "stop_token_ids",
            ));
        }
        Ok(ValidRequest {
            chat,
            prompt,
            max_tokens,
            request,
            images: images.into_iter().map(|i| i.bytes).collect(),
            trace: None,
        })
    }

    /// The tokens a request may generate after `prompt` tokens: what it asked for when that
    /// fits the context, the rest of the context for chat, the default for completions.
    fn max_tokens(
        &self,
        prompt: usize,
        asked: Option<usize>,
        chat: bool,
    ) -> Result<usize, ApiError> {
        let context = self.config.max_position_embeddings;
        let room = context.saturating_sub(prompt);
        let max_tokens = match asked {
            Some(n) if n > room => {
                return Err(ApiError::bad(
                    format!(
                        "{prompt} prompt tokens + max_tokens {n} exceed the context of {context} tokens"
                    ),
                    "max_tokens",
                ))
            }
            Some(n) => n,
            None if chat => room,
            None => self.completion_tokens_default.min(room),
        };
        // Only an echo asks for 0 (`openai::CompletionRequest::parse`).
        if max_tokens == 0 && asked != Some(0) {
            return Err(ApiError::bad(
                format!("the prompt fills the context of {context} tokens"),
                "prompt",
            ));
        }
        Ok(max_tokens)
    }

    /// Compiles a request's grammar (off the async threads): a 400 naming `field` and what
    /// llguidance found wrong.
    pub async fn check_grammar(&self, spec: &GrammarSpec, field: &str) -> Result<(), ApiError> {
        let grammars = self.grammars.clone().ok_or_else(|| {
            ApiError::bad("this model has no tokenizer: no structured outputs", field)
        })?;
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || grammars.compile(&spec).map(drop))
            .await
            .map_err(|e| ApiError::Internal(format!("compiling the grammar: {e}")))?
            .map_err(|e| ApiError::bad(e.to_string(), field))
    }

    pub fn check_vocabulary(&self, ids: &[u32], field: &str) -> Result<(), ApiError> {
        let vocab = self.config.vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => Err(ApiError::bad(
                format!("token id {id} is outside the vocabulary of {vocab}"),
                field,
            )),
            None => Ok(()),
        }
    }

    fn tokenizer(&self) -> Result<&TextTokenizer, ApiError> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ApiError::bad("this model has no tokenizer: send token ids", "prompt"))
    }

    /// The token ids of `prompt` (a chat rendered with the generation prompt).
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
        self.tokenize_with_tools(prompt, None)
    }

    /// `tokenize`, a chat rendered with the functions it may call.
    pub fn tokenize_with_tools(
        &self,
        prompt: &Prompt,
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>, ApiError> {
        let internal = |e: expertmesh_model::ModelError| ApiError::Internal(e.to_string());
        let ids = match prompt {
            Prompt::Ids(ids) => {
                self.check_vocabulary(ids, "prompt")?;
                ids.clone()
            }
            Prompt::Text(text) => {
                let mut ids = self.tokenizer()?.encode(text, true).map_err(internal)?;
                if let Some(bos) = self.config.bos_token_id {
                    if ids.first() != Some(&bos) {
                        ids.insert(0, bos);
                    }
                }
                ids
            }
            Prompt::Chat(messages) => {
                let template = self
                    .template
                    .as_ref()
                    .ok_or_else(|| ApiError::bad("this model has no chat template", "messages"))?;
                let rendered = template
                    .render_with_tools(messages, tools, true)
                    .map_err(|e| ApiError::bad(e.to_string(), "messages"))?;
                self.tokenizer()?
                    .encode(&rendered, false)
                    .map_err(internal)?
            }
        };
        if ids.is_empty() {
            return Err(ApiError::bad("the prompt is empty", "prompt"));
        }
        Ok(ids)
    }
}
