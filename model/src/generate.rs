//! The single-sequence generation loop: prefill the prompt, then decode one token at a
//! time with the KV cache until a stop id or the token budget.

use crate::error::Result;
use crate::model::{LogitRows, Model, Sequence};
use crate::moe::ExpertRunner;
use crate::sampling::{Sampler, SamplingParams};
use crate::vision::Pixels;

/// What to generate.
#[derive(Debug, Clone)]
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
    let sampling = req.sampling.validate()?;
    let mut cache = model.new_cache();
    model.check_tokens(&cache, &req.prompt, req.max_new_tokens)?;
    let sampler = Sampler::new(sampling);
    let mut output_ids = Vec::new();
    let mut prompt_logits = None;
    if req.max_new_tokens == 0 && !req.prompt_logits {
        return Ok(GenerateOutput {
            output_ids,
            finish_reason: FinishReason::Length,
            prompt_logits,
        });
    }
    let rows = if req.prompt_logits {
        LogitRows::All
    } else {
        LogitRows::Last
    };
    let images = model.encode_images(&req.images)?;
    model.check_image_rows(&req.prompt, &images)?;
    let mut prompt = Sequence::new(&mut cache, &req.prompt);
    prompt.patches = &images.rows;
    let mut out = model.forward_with(&mut [prompt], rows, runner)?;
    let mut last = out.row(out.rows - 1).to_vec();
    if req.prompt_logits {
        prompt_logits = Some(std::mem::take(&mut out.logits));
    }
    let mut finish_reason = FinishReason::Length;
    while output_ids.len() < req.max_new_tokens {
        let id = sampler.next(
            &last,
            req.prompt.len() + output_ids.len(),
            output_ids.len(),
            &req.stop_ids,
        );
        output_ids.push(id);
        on_token(id);
        if req.stop_ids.contains(&id) {
            finish_reason = FinishReason::Stop;
            break;
        }
        if output_ids.len() == req.max_new_tokens {
            break;
        }
        let step = model.forward_with(
            &mut [Sequence::new(&mut cache, &[id])],
            LogitRows::Last,
            runner,
        )?;
        last = step.logits;
    }
    Ok(GenerateOutput {
        output_ids,
        finish_reason,
        prompt_logits,
    })
}
