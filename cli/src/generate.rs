//! `expertmesh generate`: one prompt through the single-process engine.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use expertmesh_attention_worker::DispatchConfig;
use expertmesh_dispatch::{Transport, WireDType};
use expertmesh_model::vision::preprocess;
use expertmesh_model::{
    config::generation_eos_ids, generate, generate_with, ChatMessage, ChatTemplate,
    DetokenizeStream, FinishReason, GenerateOutput, GenerateRequest, ImageLimits, ImageTokens,
    Model, Pixels, ProcessorConfig, SamplingParams, TextConfig, TextTokenizer, VisionConfig,
};
use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::attention_service_client::AttentionServiceClient;
use std::time::Duration;

use crate::cluster::{ClusterSpec, LocalCluster};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (Hugging Face layout).
    #[arg(long, default_value = crate::DEFAULT_MODEL)]
    model: PathBuf,
    /// Where to compute: cpu, or cuda[:N] (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: expertmesh_model::Device,
    /// How products over the bf16 weights compute: f32 (the reference's numbers) or bf16
    /// (activations rounded to bf16, as llama.cpp does: tensor cores on a GPU, VDPBF16PS on
    /// a CPU with AVX512-BF16; on the CPU, the dense products only).
    #[arg(long, default_value = "f32")]
    gemm: expertmesh_model::GemmPrecision,
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
    /// An image file (PNG, JPEG, WebP, GIF) for the chat message, before the prompt's
    /// text; repeat for several, in order.
    #[arg(long = "image", requires = "chat")]
    images: Vec<PathBuf>,
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
    /// Run through a temporary local cluster: a coordinator and this many expert-worker
    /// processes; this process does the attention side.
    #[arg(long, conflicts_with = "attention_worker")]
    expert_workers: Option<usize>,
    /// Send the request to a running attention worker (`up` prints its address).
    #[arg(long)]
    attention_worker: Option<String>,
    /// Activation dtype on the wire with --expert-workers: f32 (exact), bf16 or fp8 (exact
    /// for FP8 experts).
    #[arg(long, default_value = "f32")]
    wire_dtype: WireDType,
    /// How routed rows reach the expert workers with --expert-workers: tcp (framed messages
    /// over plain TCP), or grpc (streams to the same ports).
    #[arg(long, default_value = "tcp")]
    dispatch: Transport,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    args.device.check()?;
    let config = TextConfig::from_dir(&args.model)
        .with_context(|| format!("loading the model in {}", args.model.display()))?;
    let tokenizer = TextTokenizer::from_dir(&args.model)?;
    let images = read_images(&args)?;
    let prompt = prompt_ids(&args, &config, &tokenizer, &images)?;
    let stop_ids = if args.ignore_eos {
        Vec::new()
    } else {
        generation_eos_ids(&args.model)?.unwrap_or_else(|| config.eos_token_ids.clone())
    };
    let request = GenerateRequest {
        prompt: prompt.clone(),
        max_new_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            min_tokens: 0,
        },
        stop_ids: stop_ids.clone(),
        prompt_logits: args.dump_logits.is_some(),
        images: images.iter().map(|i| i.pixels.clone()).collect(),
        ..Default::default()
    };
    let encoded: Vec<Vec<u8>> = images.into_iter().map(|i| i.bytes).collect();

    let mut stream = DetokenizeStream::default();
    let mut stdout = std::io::stdout().lock();
    let decode_started = Instant::now();
    let on_token = |id: u32| {
        if args.json || stop_ids.contains(&id) {
            return;
        }
        if let Ok(Some(piece)) = stream.push(&tokenizer, id) {
            // A closed stdout only loses the echo; generation itself goes on.
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    };
    let out = match (&args.expert_workers, &args.attention_worker) {
        (Some(n), _) => through_cluster(&args, *n, &request, on_token)?,
        (None, Some(addr)) => through_attention_worker(addr, &request, &encoded, on_token)?,
        (None, None) => {
            let mut model = Model::load(&args.model)?;
            model.to_device_with(args.device, args.gemm)?;
            generate(&model, &request, on_token)?
        }
    };
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

/// Runs the attention side here against a temporary cluster of `n` expert workers.
fn through_cluster(
    args: &GenerateArgs,
    n: usize,
    request: &GenerateRequest,
    on_token: impl FnMut(u32),
) -> Result<GenerateOutput> {
    if n == 0 {
        bail!("--expert-workers must be at least 1");
    }
    let model_arg = args.model.display().to_string();
    let cluster = LocalCluster::start(&ClusterSpec::expert_workers(&model_arg, n))?;
    let runtime = tokio::runtime::Runtime::new()?;
    if !matches!(args.dispatch, Transport::Grpc | Transport::Tcp) {
        bail!("generate --expert-workers dispatches over grpc or tcp");
    }
    let dispatch = DispatchConfig {
        wire_dtype: args.wire_dtype,
        transport: args.dispatch,
        ..DispatchConfig::default()
    };
    let (model, experts) = runtime.block_on(cluster.attach(&model_arg, dispatch))?;
    let out = generate_with(&model, request, &experts, on_token)?;
    drop(cluster);
    Ok(out)
}

/// Sends the request to a running attention worker and follows its token stream.
fn through_attention_worker(
    address: &str,
    request: &GenerateRequest,
    images: &[Vec<u8>],
    mut on_token: impl FnMut(u32),
) -> Result<GenerateOutput> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let endpoint = expertmesh_proto::endpoint(address, Duration::from_secs(5))?;
        let channel = expertmesh_proto::tls::connect_channel(
            endpoint,
            address,
            expertmesh_proto::tls::PeerRole::AttentionWorker,
        )
        .await
        .with_context(|| format!("connecting to the attention worker at {address}"))?;
        let mut client = AttentionServiceClient::new(channel)
            .max_decoding_message_size(expertmesh_proto::MAX_MESSAGE_BYTES);
        let mut events = client
            .generate(pb::GenerateRequest {
                input_ids: request.prompt.clone(),
                max_tokens: request.max_new_tokens as u32,
                temperature: request.sampling.temperature,
                top_p: request.sampling.top_p,
                top_k: request.sampling.top_k as u32,
                seed: request.sampling.seed,
                stop_ids: request.stop_ids.clone(),
                prompt_logits: request.prompt_logits,
                images: images.to_vec(),
                min_tokens: request.sampling.min_tokens as u32,
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        let mut output_ids = Vec::new();
        let mut prompt_logits = None;
        loop {
            let event = events
                .message()
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .context("the attention worker ended the stream without finishing")?;
            match event.event {
                Some(pb::generate_event::Event::Token(t)) => {
                    output_ids.push(t.id);
                    on_token(t.id);
                }
                Some(pb::generate_event::Event::PromptLogprobs(_)) => {}
                Some(pb::generate_event::Event::PromptLogits(t)) => {
                    prompt_logits = Some(
                        t.data
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect(),
                    );
                }
                Some(pb::generate_event::Event::Finished(f)) => {
                    let finish_reason = if f.reason == pb::FinishReason::Stop as i32 {
                        FinishReason::Stop
                    } else {
                        FinishReason::Length
                    };
                    return Ok(GenerateOutput {
                        output_ids,
                        finish_reason,
                        prompt_logits,
                        logprobs: Vec::new(),
                        prompt_logprobs: None,
                    });
                }
                None => bail!("an empty event from the attention worker"),
            }
        }
    })
}

/// One `--image`: its file's bytes (sent as they are to an attention worker) and its tiles.
struct Image {
    bytes: Vec<u8>,
    pixels: Pixels,
}

fn read_images(args: &GenerateArgs) -> Result<Vec<Image>> {
    if args.images.is_empty() {
        return Ok(Vec::new());
    }
    let processor = ProcessorConfig::from_dir(&args.model)?;
    let limits = ImageLimits::default();
    if args.images.len() > limits.images_max {
        bail!(
            "{} images, more than the limit of {}",
            args.images.len(),
            limits.images_max
        );
    }
    args.images
        .iter()
        .map(|path| {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let pixels = preprocess(&bytes, &processor, &limits)
                .with_context(|| format!("{}", path.display()))?;
            Ok(Image { bytes, pixels })
        })
        .collect()
}

/// The prompt's token ids: given, templated (the images first, then the text, in one user
/// message, each image's placeholder expanded), or plain text with BOS in front.
fn prompt_ids(
    args: &GenerateArgs,
    config: &TextConfig,
    tokenizer: &TextTokenizer,
    images: &[Image],
) -> Result<Vec<u32>> {
    if let Some(ids) = &args.input_ids {
        return Ok(ids.clone());
    }
    let Some(text) = &args.prompt else {
        bail!("give --prompt or --input-ids");
    };
    if args.chat {
        let template = ChatTemplate::from_dir(&args.model)?
            .with_context(|| format!("{} has no chat template", args.model.display()))?;
        if images.is_empty() {
            let rendered = template.render(&[ChatMessage::new("user", text)], true)?;
            // The template already starts with BOS; no second one.
            return Ok(tokenizer.encode(&rendered, false)?);
        }
        let mut parts: Vec<serde_json::Value> = images
            .iter()
            .map(|_| serde_json::json!({"type": "image"}))
            .collect();
        parts.push(serde_json::json!({"type": "text", "text": text}));
        let message = ChatMessage {
            content: serde_json::Value::Array(parts),
            ..ChatMessage::new("user", "")
        };
        let rendered = template.render(&[message], true)?;
        let vision = VisionConfig::from_dir(&args.model, config.hidden_size)?
            .with_context(|| format!("{} has no vision tower", args.model.display()))?;
        let grids: Vec<(usize, usize)> = images.iter().map(|i| i.pixels.grid).collect();
        return Ok(ImageTokens::from_tokenizer(tokenizer)?.expand(
            &tokenizer.encode(&rendered, false)?,
            &grids,
            vision.tokens_per_tile(),
        )?);
    }
    let mut ids = tokenizer.encode(text, true)?;
    if let Some(bos) = config.bos_token_id {
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
