//! The continuous-batching engine against the single-request engine: concurrent requests
//! of mixed lengths, chunked prefill and preemption by recompute each give exactly the
//! tokens (and logprobs, penalties and biases applied) a request gives alone, and the batch
//! really is shared.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use expertmesh_attention_worker::{Engine, Event, SchedulerConfig};
use expertmesh_model::{
    generate, Adjust, FinishReason, GenerateRequest, LocalExperts, Model, SamplingParams,
    TokenLogprobs,
};

fn model() -> Arc<Model> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-maverick");
    Arc::new(Model::load(&dir).unwrap())
}

/// 32 requests: prompt lengths 1 to 94, 3 to 17 new tokens; greedy, or sampled with
/// penalties and a bias; a quarter each with logprobs and the prompt's logprobs.
fn requests() -> Vec<GenerateRequest> {
    (0..32)
        .map(|i| {
            let adjusted = i % 4 >= 2;
            GenerateRequest {
                prompt: (0..1 + (i * 29) % 94)
                    .map(|j| ((j * 7 + i * 13) % 690) as u32)
                    .collect(),
                max_new_tokens: 3 + i % 15,
                sampling: SamplingParams {
                    temperature: if adjusted { 0.8 } else { 0.0 },
                    seed: i as u64,
                    ..SamplingParams::default()
                },
                adjust: if adjusted {
                    Adjust {
                        repetition_penalty: 1.3,
                        presence_penalty: 0.2,
                        frequency_penalty: 0.5,
                        logit_bias: vec![(5, 3.0)],
                        resumed: 0,
                    }
                } else {
                    Adjust::default()
                },
                logprobs: (i % 2 == 1).then_some(3),
                prompt_logprobs: (i % 4 == 1 || i % 4 == 3).then_some(2),
                ..Default::default()
            }
        })
        .collect()
}

/// What one request's stream gave.
#[derive(Debug, Default, PartialEq)]
struct Output {
    ids: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    prompt_logprobs: Option<Vec<TokenLogprobs>>,
}

fn collect(mut rx: tokio::sync::mpsc::Receiver<Event>) -> (Output, FinishReason) {
    let mut out = Output::default();
    loop {
        match rx.blocking_recv().expect("the stream ends with Finished") {
            Event::Token(id, lp) => {
                out.ids.push(id);
                out.logprobs.extend(lp);
            }
            Event::PromptLogprobs(lps) => {
                assert!(out.ids.is_empty(), "the prompt's logprobs come first");
                out.prompt_logprobs = Some(lps);
            }
            Event::Finished(reason) => return (out, reason),
            Event::PromptLogits(_) => {}
            Event::Failed(f) => panic!("request failed: {}", f.message),
        }
    }
}

/// KV blocks held by sequences (the prefix cache's own count as free: they are evicted on
/// demand).
fn held_by_sequences(stats: &expertmesh_attention_worker::EngineStats) -> u64 {
    stats.kv_blocks_used.load(Ordering::Relaxed)
}

fn run_concurrently(
    config: SchedulerConfig,
) -> (Vec<Output>, Arc<expertmesh_attention_worker::EngineStats>) {
    let model = model();
    let engine = Engine::spawn(model.clone(), LocalExperts(model), config);
    let streams: Vec<_> = requests()
        .into_iter()
        .map(|r| engine.submit(r).unwrap())
        .collect();
    let outputs = streams.into_iter().map(|rx| collect(rx).0).collect();
    (outputs, engine.stats().clone())
}

fn alone() -> Vec<Output> {
    let model = model();
    requests()
        .iter()
        .map(|r| {
            let out = generate(&model, r, |_| {}).unwrap();
            Output {
                ids: out.output_ids,
                logprobs: out.logprobs,
                prompt_logprobs: out.prompt_logprobs,
            }
        })
        .collect()
}

#[test]
fn concurrent_requests_equal_their_runs_alone_and_share_steps() {
    let expected = alone();
    let config = SchedulerConfig {
        token_budget: 64,
        ..SchedulerConfig::default()
    };
    let (got, stats) = run_concurrently(config);
    assert_eq!(got, expected);
    // Alone, each request takes at least one step per generated token.
    let alone_steps: usize = requests().iter().map(|r| r.max_new_tokens).sum();
    let steps = stats.steps.load(Ordering::Relaxed) as usize;
    assert!(
        steps * 4 < alone_steps,
        "{steps} shared steps vs {alone_steps} alone"
    );
    // The last stream ends just before its sequence is retired; give the engine a moment.
    let give_up = Instant::now() + Duration::from_secs(5);
    while held_by_sequences(&stats) != 0 {
        assert!(Instant::now() < give_up, "blocks leaked");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn preemption_by_recompute_changes_nothing() {
    let expected = alone();
    // Room for a handful of sequences only: the rest wait, and some get preempted.
    let config = SchedulerConfig {
        token_budget: 48,
        kv_blocks: 4 * 24,
        block_tokens: 4,
        ..SchedulerConfig::default()
    };
    let (got, stats) = run_concurrently(config);
    assert_eq!(got, expected);
    assert!(
        stats.preemptions.load(Ordering::Relaxed) > 0,
        "no preemption happened"
    );
}

#[test]
fn a_dropped_stream_cancels_its_request() {
    let model = model();
    let engine = Engine::spawn(
        model.clone(),
        LocalExperts(model),
        SchedulerConfig::default(),
    );
    let rx = engine
        .submit(GenerateRequest {
            prompt: vec![697, 318],
            max_new_tokens: 4000,
            sampling: SamplingParams::default(),
            stop_ids: Vec::new(),
            prompt_logits: false,
            images: Vec::new(),
            ..Default::default()
        })
        .unwrap();
    let give_up = Instant::now() + Duration::from_secs(10);
    while engine.stats().running.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < give_up);
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(rx);
    while engine.stats().running.load(Ordering::Relaxed) != 0
        || held_by_sequences(engine.stats()) != 0
    {
        assert!(Instant::now() < give_up, "the request kept running");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(engine.stats().tokens_generated.load(Ordering::Relaxed) < 4000);
}

/// Image requests among text requests, with prefill chunks that split their images and
/// preemption by recompute: each gets the fixture's greedy ids, the vision rows computed
/// once, before submission, and sliced per chunk by the engine.
#[test]
fn image_requests_survive_chunked_prefill_and_preemption() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-maverick");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "image")
        .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let (prompt, greedy) = (ids(&case["input_ids"]), ids(&case["greedy_new_ids"]));
    let model = model();
    let pixels = expertmesh_model::vision::preprocess(
        &std::fs::read(dir.join("test-image.png")).unwrap(),
        &expertmesh_model::ProcessorConfig::from_dir(&dir).unwrap(),
        &expertmesh_model::ImageLimits::default(),
    )
    .unwrap();
    let rows = model.encode_images(&[pixels]).unwrap();
    let config = SchedulerConfig {
        token_budget: 24,
        kv_blocks: 4 * 24,
        block_tokens: 4,
        ..SchedulerConfig::default()
    };
    let engine = Engine::spawn(model.clone(), LocalExperts(model), config);
    let mut image_streams = Vec::new();
    let mut text_streams = Vec::new();
    for (i, text) in requests().into_iter().enumerate() {
        text_streams.push(engine.submit(text).unwrap());
        if i % 4 == 0 {
            let request = GenerateRequest {
                prompt: prompt.clone(),
                max_new_tokens: greedy.len(),
                sampling: SamplingParams::default(),
                stop_ids: Vec::new(),
                prompt_logits: false,
                images: Vec::new(),
                ..Default::default()
            };
            let prepared = expertmesh_attention_worker::Prepared {
                images: rows.clone(),
                constraint: None,
            };
            image_streams.push(engine.submit_with(request, prepared).unwrap());
        }
    }
    for rx in image_streams {
        assert_eq!(collect(rx).0.ids, greedy);
    }
    let expected = alone();
    for (rx, want) in text_streams.into_iter().zip(expected) {
        assert_eq!(collect(rx).0, want);
    }
    assert!(
        engine.stats().preemptions.load(Ordering::Relaxed) > 0,
        "no preemption happened"
    );
    // The image request again, alone: its blocks come from the prefix cache, patches
    // included, and give the same ids. With other vision rows for the same ids, only the
    // blocks before the first patch are the same prefix.
    let hits = || engine.stats().prefix_hit_tokens.load(Ordering::Relaxed) as usize;
    let image_request = || GenerateRequest {
        prompt: prompt.clone(),
        max_new_tokens: greedy.len(),
        ..Default::default()
    };
    // (Twice: the small pool may have evicted the earlier ones' blocks.)
    let mut before = 0;
    for _ in 0..2 {
        before = hits();
        let prepared = expertmesh_attention_worker::Prepared {
            images: rows.clone(),
            constraint: None,
        };
        let again = collect(engine.submit_with(image_request(), prepared).unwrap()).0;
        assert_eq!(again.ids, greedy);
    }
    let bt = config.block_tokens;
    assert_eq!(
        hits() - before,
        (prompt.len() - 1) / bt * bt,
        "the whole prompt cached"
    );
    let patch = model_patch_id(&dir);
    let first_patch = prompt.iter().position(|&t| t == patch).unwrap();
    let mut other = rows.clone();
    other.rows.iter_mut().for_each(|v| *v *= 0.5);
    let before = hits();
    let prepared = expertmesh_attention_worker::Prepared {
        images: other,
        constraint: None,
    };
    collect(engine.submit_with(image_request(), prepared).unwrap());
    assert_eq!(
        hits() - before,
        first_patch / bt * bt,
        "text before the image only"
    );
}

/// The `<|patch|>` id of the fixture's vision config.
fn model_patch_id(dir: &Path) -> u32 {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["image_token_index"]
        .as_u64()
        .or_else(|| config["vision_config"]["image_token_id"].as_u64())
        .expect("the fixture names its patch token") as u32
}

/// A request with a grammar samples only what it allows, the mask computed beside the
/// forward pass, and ends when the grammar is complete; a request resumed after some of
/// its tokens (a migration) ends the same way from where it was.
#[test]
fn grammars_constrain_what_is_sampled() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-maverick");
    let model = model();
    let grammars = expertmesh_model::Grammars::from_dir(&dir, 768, &[698]).unwrap();
    let tokenizer = expertmesh_model::TextTokenizer::from_dir(&dir).unwrap();
    let spec = expertmesh_model::GrammarSpec::Regex("(ab|cd)[0-9]{3}".into());
    let engine = Engine::spawn(
        model.clone(),
        LocalExperts(model),
        SchedulerConfig::default(),
    );
    let run = |prompt: Vec<u32>, resumed: &[u32]| {
        let mut constraint = grammars.compile(&spec).unwrap();
        for &id in resumed {
            constraint.consume(id).unwrap();
        }
        let request = GenerateRequest {
            prompt: [&prompt[..], resumed].concat(),
            max_new_tokens: 40,
            sampling: SamplingParams {
                temperature: 1.0,
                seed: 5,
                ..SamplingParams::default()
            },
            stop_ids: vec![698],
            adjust: Adjust {
                resumed: resumed.len(),
                ..Adjust::default()
            },
            ..Default::default()
        };
        let prepared = expertmesh_attention_worker::Prepared {
            constraint: Some(constraint),
            ..Default::default()
        };
        collect(engine.submit_with(request, prepared).unwrap())
    };
    let prompt: Vec<u32> = (1..20).collect();
    let (whole, reason) = run(prompt.clone(), &[]);
    assert_eq!(reason, FinishReason::Stop);
    let text = tokenizer.decode(&whole.ids).unwrap();
    let re = regex::Regex::new("^(ab|cd)[0-9]{3}$").unwrap();
    assert!(
        re.is_match(text.trim_end_matches("<|end_of_text|>")),
        "{text:?}"
    );
    let (rest, _) = run(prompt, &whole.ids[..1]);
    assert_eq!(
        rest.ids,
        whole.ids[1..],
        "resumed after a token, the same draws"
    );
}

/// The choices of one request (`n`): the prompt is prefilled once and its cache shared
/// (full blocks shared, the partial one copied), yet each choice gives exactly what it
/// gives alone; a choice that arrives after another has started decoding forks it too, and
/// every block comes back.
#[test]
fn choices_share_their_prompt_and_still_equal_their_runs_alone() {
    let model = model();
    let prompt: Vec<u32> = (0..45).map(|j| (j * 11 + 3) % 690).collect();
    let choice = |seed: u64, group: Option<u64>| GenerateRequest {
        prompt: prompt.clone(),
        max_new_tokens: 12,
        sampling: SamplingParams {
            temperature: 1.0,
            seed,
            ..SamplingParams::default()
        },
        logprobs: Some(2),
        prompt_group: group,
        ..Default::default()
    };
    let alone: Vec<Output> = (0..4)
        .map(|seed| {
            let out = generate(&model, &choice(seed, None), |_| {}).unwrap();
            Output {
                ids: out.output_ids,
                logprobs: out.logprobs,
                prompt_logprobs: None,
            }
        })
        .collect();
    // Forks alone (the prefix cache would serve the late choices too, and the count of
    // tokens run below is the forks').
    let config = SchedulerConfig {
        token_budget: 16,
        block_tokens: 4,
        prefix_cache: false,
        ..SchedulerConfig::default()
    };
    let engine = Engine::spawn(model.clone(), LocalExperts(model), config);
    let streams: Vec<_> = (0..3)
        .map(|seed| engine.submit(choice(seed, Some(77))).unwrap())
        .collect();
    let mut got: Vec<Output> = streams.into_iter().map(|rx| collect(rx).0).collect();
    // A late choice: the first three are done, so it prefills alone (nothing to fork).
    got.push(collect(engine.submit(choice(3, Some(77))).unwrap()).0);
    assert_eq!(got, alone);
    // A choice that comes while another is decoding forks from the prompt it kept, if that
    // one's chunked layers still hold the prompt's last chunk (8 positions here: a timing
    // matter, so either way; `KvCache::fork`'s unit test pins both cases).
    let long = GenerateRequest {
        max_new_tokens: 200,
        ..choice(0, Some(78))
    };
    let mut first = engine.submit(long).unwrap();
    let Event::Token(id, _) = first.blocking_recv().unwrap() else {
        panic!("a token first")
    };
    let second = collect(engine.submit(choice(1, Some(78))).unwrap()).0;
    assert_eq!(second, alone[1]);
    let (rest, _) = collect(first);
    assert_eq!([&[id][..], &rest.ids[..11]].concat(), alone[0].ids);
    let stats = engine.stats();
    let forks = stats.forks.load(Ordering::Relaxed);
    assert!(forks == 2 || forks == 3, "{forks} forks");
    // One prefill of 45 tokens for the three, one for the late one, one for the long one
    // (and one for its sibling if it did not fork), and the decode steps.
    let forwarded = stats.tokens_forwarded.load(Ordering::Relaxed);
    let prefills = 6 - forks;
    assert_eq!(
        forwarded,
        prefills * 45 + 4 * 11 + 199 + 11,
        "tokens run through the model"
    );
    let give_up = Instant::now() + Duration::from_secs(5);
    while held_by_sequences(stats) != 0 {
        assert!(Instant::now() < give_up, "blocks leaked");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Prefix caching: prompts that begin like earlier ones (the same prompt again, prefixes
/// ending inside and across blocks and the fixture's 8-token chunks, a follow-up turn that
/// resends the first turn's answer) take the cached blocks, and give exactly the tokens and
/// logprobs they give computed from scratch. A pool too small to keep everything evicts,
/// and still nothing changes.
#[test]
fn cached_prefixes_change_nothing() {
    let model = model();
    let base: Vec<u32> = (0..100).map(|j| ((j * 11 + 5) % 690) as u32).collect();
    let mut prompts: Vec<Vec<u32>> = vec![base.clone(), base.clone()];
    for (cut, tail) in [(15, 1), (16, 2), (17, 3), (33, 4), (64, 5), (99, 6)] {
        prompts.push([&base[..cut], &[600 + tail, 601, 602][..]].concat());
    }
    let request = |prompt: Vec<u32>, i: usize| GenerateRequest {
        prompt,
        max_new_tokens: 6,
        sampling: SamplingParams {
            temperature: if i.is_multiple_of(2) { 0.0 } else { 0.7 },
            seed: i as u64,
            ..SamplingParams::default()
        },
        logprobs: Some(3),
        ..Default::default()
    };
    // The follow-up turn: the first prompt, its answer, more text.
    let first = generate(&model, &request(base.clone(), 0), |_| {}).unwrap();
    prompts.push([&base[..], &first.output_ids[..], &[5, 6, 7, 8, 9][..]].concat());
    // Unrelated prompts between them, for the small pool to run out.
    let fillers: Vec<Vec<u32>> = (0..prompts.len())
        .map(|i| {
            (0..90)
                .map(|j| ((j * 13 + i * 31 + 1) % 690) as u32)
                .collect()
        })
        .collect();
    let expect = |prompts: &[Vec<u32>]| -> Vec<Output> {
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let out = generate(&model, &request(p.clone(), i), |_| {}).unwrap();
                Output {
                    ids: out.output_ids,
                    logprobs: out.logprobs,
                    prompt_logprobs: None,
                }
            })
            .collect()
    };
    let interleaved: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&fillers)
        .flat_map(|(p, f)| [p.clone(), f.clone()])
        .collect();
    let big_pool = SchedulerConfig::default().kv_blocks;
    for (kv_blocks, prompts) in [(big_pool, prompts), (4 * 16, interleaved)] {
        let expected = expect(&prompts);
        let config = SchedulerConfig {
            kv_blocks,
            block_tokens: 8,
            token_budget: 40,
            ..SchedulerConfig::default()
        };
        let engine = Engine::spawn(model.clone(), LocalExperts(model.clone()), config);
        // One at a time, so that each finds the ones before it cached.
        for (i, (p, want)) in prompts.iter().zip(&expected).enumerate() {
            let got = collect(engine.submit(request(p.clone(), i)).unwrap()).0;
            assert_eq!(&got, want, "prompt {i} (pool of {kv_blocks} blocks)");
        }
        let stats = engine.stats();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (hit, queried) = (
            get(&stats.prefix_hit_tokens),
            get(&stats.prefix_queried_tokens),
        );
        let evicted = get(&stats.prefix_evicted_blocks);
        eprintln!(
            "pool {kv_blocks}: {hit} of {queried} prompt tokens cached, {evicted} blocks evicted"
        );
        if kv_blocks != big_pool {
            assert!(evicted > 0, "a small pool evicts");
            assert!(hit > 0);
        } else {
            // The same prompt again: 96 of its 100 tokens (12 blocks of 8, one token left
            // to compute); the cuts: 8, 16, 16, 32, 64, 96; the follow-up: the first turn's
            // 100 + 6 tokens, less the partial block (104).
            assert_eq!(hit, 96 + 8 + 16 + 16 + 32 + 64 + 96 + 104);
            assert_eq!(evicted, 0);
        }
    }
}
