//! The single-sequence generation loop: prefill the prompt, then decode one token at a
//! time with the KV cache until a stop id or the token budget.

use crate::error::{ModelError, Result};
use crate::grammar::GrammarSpec;
use crate::model::{LogitRows, Model, Sequence};
use crate::moe::ExpertRunner;
use crate::sampling::{logprobs, Adjust, Sampler, SamplingParams, TokenLogprobs, TOP_LOGPROBS_MAX};
use crate::vision::Pixels;

/// What to generate.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends after one of these (it is kept in the output).
    pub stop_ids: Vec<u32>,
    /// Return the prefill logits of every prompt position.
    pub prompt_logits: bool,
    /// The prompt's images, preprocessed, in the order of its image placeholders (each
    /// already expanded into `<|patch|>` slots).
    pub images: Vec<Pixels>,
    /// Penalties and biases applied to the logits before sampling.
    pub adjust: Adjust,
    /// Each generated token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Each prompt token's log-probability (after the first) with this many alternatives.
    pub prompt_logprobs: Option<usize>,
    /// What the output must match (structured outputs); the engine that serves the
    /// request compiles it (`grammar::Grammars`).
    pub grammar: Option<GrammarSpec>,
    /// The choices of one request (`n`) carry the same key: an engine that serves several
    /// of them prefills their prompt once and shares its cache.
    pub prompt_group: Option<u64>,
    /// The request's W3C trace id, when it has one: the dispatches that carry its rows name
    /// it, so the expert workers' lines can be found by it.
    pub trace: Option<u128>,
}

impl GenerateRequest {
    /// The checks that need the vocabulary: sampling settings, adjustments, logprobs.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        self.sampling.validate()?;
        self.adjust.check(vocab)?;
        for (field, top) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if top.is_some_and(|t| t > TOP_LOGPROBS_MAX) {
                return Err(ModelError::Sampling {
                    field,
                    reason: format!("at most {TOP_LOGPROBS_MAX} alternatives"),
                });
            }
        }
        Ok(())
    }
}

/// The log-probabilities of `tokens[1..]` from the logits `rows` before each (`rows[i]`
/// predicts `tokens[i + 1]`), `top` alternatives each.
pub fn prompt_logprobs(
    rows: &[f32],
    vocab: usize,
    tokens: &[u32],
    top: usize,
) -> Vec<TokenLogprobs> {
    rows.chunks_exact(vocab)
        .zip(tokens.iter().skip(1))
        .map(|(row, &id)| logprobs(row, id, top))
        .collect()
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub output_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// `[prompt positions, vocab]` when asked for.
    pub prompt_logits: Option<Vec<f32>>,
    /// One per output token when asked for.
    pub logprobs: Vec<TokenLogprobs>,
    /// One per prompt token after the first when asked for.
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
}

/// Runs one request to completion with the model's own experts; `on_token` sees each id
/// as it is chosen.
pub fn generate(
    model: &Model,
    req: &GenerateRequest,
    on_token: impl FnMut(u32),
) -> Result<GenerateOutput> {
    model.check_local_experts()?;
    generate_with(model, req, &model.local_experts(), on_token)
}

/// `generate` with the routed experts reached through `runner`.
pub fn generate_with(
    model: &Model,
    req: &GenerateRequest,
    runner: &dyn ExpertRunner,
    mut on_token: impl FnMut(u32),
) -> Result<GenerateOutput> {
    let vocab = model.config().vocab_size;
    req.validate(vocab)?;
    if req.grammar.is_some() {
        return Err(ModelError::Grammar {
            reason: "structured outputs are served by the engine (`expertmesh up`)".into(),
        });
    }
    let mut cache = model.new_cache();
    model.check_tokens(&cache, &req.prompt, req.max_new_tokens)?;
    let mut sampler = Sampler::with_adjust(req.sampling, req.adjust.clone(), req.prompt.len());
    let mut out = GenerateOutput {
        output_ids: Vec::new(),
        finish_reason: FinishReason::Length,
        prompt_logits: None,
        logprobs: Vec::new(),
        prompt_logprobs: None,
    };
    let every_row = req.prompt_logits || req.prompt_logprobs.is_some();
    if req.max_new_tokens == 0 && !every_row {
        return Ok(out);
    }
    let rows = if every_row {
        LogitRows::All
    } else {
        LogitRows::Last
    };
    let images = model.encode_images(&req.images)?;
    model.check_image_rows(&req.prompt, &images)?;
    let mut prompt = Sequence::new(&mut cache, &req.prompt);
    prompt.patches = &images.rows;
    let mut prefill = model.forward_with(&mut [prompt], rows, runner)?;
    let mut last = prefill.row(prefill.rows - 1).to_vec();
    if let Some(top) = req.prompt_logprobs {
        out.prompt_logprobs = Some(prompt_logprobs(&prefill.logits, vocab, &req.prompt, top));
    }
    if req.prompt_logits {
        out.prompt_logits = Some(std::mem::take(&mut prefill.logits));
    }
    let mut tokens = req.prompt.clone();
    while out.output_ids.len() < req.max_new_tokens {
        let id = sampler.next(&last, &tokens, out.output_ids.len(), &req.stop_ids, None);
        if let Some(top) = req.logprobs {
            out.logprobs.push(logprobs(&last, id, top));
        }
        tokens.push(id);
        out.output_ids.push(id);
        on_token(id);
        if req.stop_ids.contains(&id) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        if out.output_ids.len() == req.max_new_tokens {
            break;
        }
        let step = model.forward_with(
            &mut [Sequence::new(&mut cache, &[id])],
            LogitRows::Last,
            runner,
        )?;
        last = step.logits;
    }
    Ok(out)
}
