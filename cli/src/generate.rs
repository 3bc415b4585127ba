//! `expertmesh generate`: one prompt through the single-process engine.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use expertmesh_model::{
    config::generation_eos_ids, generate, ChatMessage, ChatTemplate, DetokenizeStream,
    FinishReason, GenerateRequest, Model, SamplingParams, TextTokenizer,
};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (Hugging Face layout).
    #[arg(long, default_value = "tests/fixtures/tiny-maverick")]
    model: PathBuf,
    /// Prompt text.
    #[arg(
        long,
        conflicts_with = "input_ids",
        required_unless_present = "input_ids"
    )]
    prompt: Option<String>,
    /// Treat the prompt as one user message rendered with the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Prompt as comma-separated token ids, used as given.
    #[arg(long, value_delimiter = ',')]
    input_ids: Option<Vec<u32>>,
    /// Number of tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 turns top-k off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past stop ids.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Write the prefill logits `[prompt positions, vocab]` (f32) to this safetensors file.
    #[arg(long)]
    dump_logits: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let started = Instant::now();
    let model = Model::load(&args.model)
        .with_context(|| format!("loading the model in {}", args.model.display()))?;
    let tokenizer = TextTokenizer::from_dir(&args.model)?;
    eprintln!(
        "loaded {} ({} layers, {} experts) in {} ms",
        args.model.display(),
        model.config().num_hidden_layers,
        model.config().num_local_experts,
        started.elapsed().as_millis()
    );
    let prompt = prompt_ids(&args, &model, &tokenizer)?;
    let stop_ids = if args.ignore_eos {
        Vec::new()
    } else {
        generation_eos_ids(&args.model)?.unwrap_or_else(|| model.config().eos_token_ids.clone())
    };
    let request = GenerateRequest {
        prompt: prompt.clone(),
        max_new_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        stop_ids: stop_ids.clone(),
        prompt_logits: args.dump_logits.is_some(),
    };

    let mut stream = DetokenizeStream::default();
    let mut stdout = std::io::stdout().lock();
    let decode_started = Instant::now();
    let out = generate(&model, &request, |id| {
        if args.json || stop_ids.contains(&id) {
            return;
        }
        if let Ok(Some(piece)) = stream.push(&tokenizer, id) {
            // A closed stdout only loses the echo; generation itself goes on.
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    })?;
    let elapsed = decode_started.elapsed();

    if let (Some(path), Some(logits)) = (&args.dump_logits, &out.prompt_logits) {
        dump_logits(path, logits, prompt.len())?;
    }
    let text_ids: Vec<u32> = match out.finish_reason {
        FinishReason::Stop => out.output_ids[..out.output_ids.len() - 1].to_vec(),
        FinishReason::Length => out.output_ids.clone(),
    };
    let text = tokenizer.decode(&text_ids)?;
    if args.json {
        let obj = serde_json::json!({
            "input_ids": prompt,
            "output_ids": out.output_ids,
            "text": text,
            "finish_reason": match out.finish_reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
            },
        });
        writeln!(stdout, "{obj}")?;
    } else {
        writeln!(stdout)?;
    }
    eprintln!(
        "{} prompt + {} new tokens in {:.1} ms",
        prompt.len(),
        out.output_ids.len(),
        elapsed.as_secs_f64() * 1e3
    );
    Ok(())
}

/// The prompt's token ids: given, templated, or plain text with BOS in front.
fn prompt_ids(args: &GenerateArgs, model: &Model, tokenizer: &TextTokenizer) -> Result<Vec<u32>> {
    if let Some(ids) = &args.input_ids {
        return Ok(ids.clone());
    }
    let Some(text) = &args.prompt else {
        bail!("give --prompt or --input-ids");
    };
    if args.chat {
        let template = ChatTemplate::from_dir(&args.model)?
            .with_context(|| format!("{} has no chat template", args.model.display()))?;
        let rendered = template.render(&[ChatMessage::new("user", text)], true)?;
        // The template already starts with BOS; no second one.
        return Ok(tokenizer.encode(&rendered, false)?);
    }
    let mut ids = tokenizer.encode(text, true)?;
    if let Some(bos) = model.config().bos_token_id {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

fn dump_logits(path: &Path, logits: &[f32], rows: usize) -> Result<()> {
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![rows, logits.len() / rows], &bytes)?;
    safetensors::serialize_to_file([("logits", view)], None::<HashMap<String, String>>, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
