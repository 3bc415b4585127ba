//! What the load generator sends: synthetic prompts of drawn lengths (optionally after a
//! prefix shared by a group of requests: a long system prompt, a RAG context), the lengths
//! of a recorded trace, or prompts from a JSONL dataset (plain `{"prompt": ...}` lines or
//! ShareGPT conversations), as completion or chat requests, one by one or as multi-turn
//! conversations. Request i of a run is drawn from a generator seeded with (seed, i), so
//! the same seed sends the same sequence of requests.

use std::path::Path;

use expertmesh_model::sampling::{mix64, SplitMix64};
use serde_json::{json, Value};

/// A distribution of lengths: `fixed:N`, `uniform:A-B` or `normal:MEAN,SD` (clamped ≥ 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lengths {
    Fixed(usize),
    Uniform(usize, usize),
    Normal(f64, f64),
}

impl std::str::FromStr for Lengths {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not fixed:N, uniform:A-B or normal:MEAN,SD");
        let (kind, args) = s.split_once(':').unwrap_or(("fixed", s));
        match kind {
            "fixed" => args.parse().map(Self::Fixed).map_err(|_| bad()),
            "uniform" => {
                let (a, b) = args.split_once('-').ok_or_else(bad)?;
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || a == 0 {
                    return Err(bad());
                }
                Ok(Self::Uniform(a, b))
            }
            "normal" => {
                let (m, sd) = args.split_once(',').ok_or_else(bad)?;
                Ok(Self::Normal(
                    m.parse().map_err(|_| bad())?,
                    sd.parse().map_err(|_| bad())?,
                ))
            }
            _ => Err(bad()),
        }
    }
}

impl Lengths {
    pub fn draw(&self, rng: &mut SplitMix64) -> usize {
        match *self {
            Self::Fixed(n) => n.max(1),
            Self::Uniform(a, b) => a + (rng.next_u64() % (b - a + 1) as u64) as usize,
            Self::Normal(mean, sd) => {
                // Box-Muller.
                let (u1, u2) = (rng.next_f64().max(1e-12), rng.next_f64());
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                (mean + sd * z).round().max(1.0) as usize
            }
        }
    }
}

/// One prompt of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetPrompt {
    Text(String),
    /// Chat messages (role, content).
    Chat(Vec<(String, String)>),
}

/// Reads a JSONL dataset: `{"prompt": "..."}`, `{"messages": [...]}` or ShareGPT
/// `{"conversations": [{"from": "human", "value": ...}, ...]}` (the turns up to the first
/// human one). Errors name the line.
pub fn read_dataset(path: &Path) -> Result<Vec<DatasetPrompt>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| format!("{}:{}: {why}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        if let Some(p) = v.get("prompt").and_then(Value::as_str) {
            out.push(DatasetPrompt::Text(p.to_owned()));
        } else if let Some(turns) = v.get("conversations").and_then(Value::as_array) {
            let mut messages = Vec::new();
            for t in turns {
                let from = t.get("from").and_then(Value::as_str).unwrap_or("");
                let value = t
                    .get("value")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("a turn has no value"))?;
                let role = match from {
                    "human" | "user" => "user",
                    "gpt" | "assistant" | "chatgpt" => "assistant",
                    "system" => "system",
                    other => return Err(bad(&format!("unknown speaker `{other}`"))),
                };
                messages.push((role.to_owned(), value.to_owned()));
                if role == "user" {
                    break;
                }
            }
            if !messages.iter().any(|(r, _)| r == "user") {
                return Err(bad("the conversation has no human turn"));
            }
            out.push(DatasetPrompt::Chat(messages));
        } else if let Some(ms) = v.get("messages").and_then(Value::as_array) {
            let messages = ms
                .iter()
                .map(|m| {
                    Some((
                        m.get("role")?.as_str()?.to_owned(),
                        m.get("content")?.as_str()?.to_owned(),
                    ))
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("messages need string role and content"))?;
            out.push(DatasetPrompt::Chat(messages));
        } else {
            return Err(bad("expected `prompt`, `messages` or `conversations`"));
        }
    }
    if out.is_empty() {
        return Err(format!("{}: no prompts", path.display()));
    }
    Ok(out)
}

/// Synthetic prompts that begin alike: request i starts with the prefix of group
/// `i % groups`, `len` words (or token ids) long, then its own drawn part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedPrefix {
    pub len: usize,
    pub groups: u64,
}

/// One request of a recorded trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEntry {
    /// When it arrives, from the trace's first request.
    pub at: std::time::Duration,
    pub input_tokens: usize,
    pub output_tokens: usize,
}

/// Reads a trace to replay: JSONL of `timestamp` (ms) and `input_length` / `output_length`
/// (Mooncake's names; `input_tokens` / `output_tokens` too), in any order; times become
/// offsets from the first request. Errors name the line.
pub fn read_trace(path: &Path) -> Result<Vec<TraceEntry>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut entries: Vec<(f64, usize, usize)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| format!("{}:{}: {why}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let field = |names: &[&str]| names.iter().find_map(|n| v.get(*n).and_then(Value::as_f64));
        let at = field(&["timestamp"]).ok_or_else(|| bad("no timestamp"))?;
        let input =
            field(&["input_length", "input_tokens"]).ok_or_else(|| bad("no input_length"))?;
        let output =
            field(&["output_length", "output_tokens"]).ok_or_else(|| bad("no output_length"))?;
        if !(at.is_finite() && at >= 0.0 && input >= 0.0 && output >= 0.0) {
            return Err(bad("times and lengths are numbers ≥ 0"));
        }
        entries.push((at, input as usize, output as usize));
    }
    if entries.is_empty() {
        return Err(format!("{}: no requests", path.display()));
    }
    entries.sort_by(|a, b| a.0.total_cmp(&b.0));
    let first = entries[0].0;
    Ok(entries
        .into_iter()
        .map(|(at, input_tokens, output_tokens)| TraceEntry {
            at: std::time::Duration::from_secs_f64((at - first) / 1e3),
            input_tokens,
            output_tokens,
        })
        .collect())
}

/// How requests are built.
#[derive(Debug, Clone)]
pub struct Workload {
    pub model: Option<String>,
    pub chat: bool,
    pub stream: bool,
    pub prompt_lengths: Lengths,
    pub output_lengths: Lengths,
    /// Synthetic prompts as token ids below this (completions only); text otherwise.
    pub token_ids_below: Option<u32>,
    pub dataset: Option<Vec<DatasetPrompt>>,
    /// A prefix shared by groups of synthetic prompts.
    pub shared_prefix: Option<SharedPrefix>,
    /// A recorded trace to replay: request i has entry i's lengths (and arrives at its time
    /// under `Shape::Replay`).
    pub replay: Option<Vec<TraceEntry>>,
    /// User turns per conversation (chat): turn t > 0 sends the whole history, the answers
    /// the server gave included, and a new user message. 1: independent requests.
    pub turns: usize,
    pub seed: u64,
}

impl Workload {
    /// The body of turn `turn` of conversation `conversation`, after `history` (each earlier
    /// turn's user message and the answer it got): the conversation's first request, then
    /// the history and a new user message of drawn length.
    pub fn turn(
        &self,
        conversation: u64,
        turn: usize,
        history: &[(String, String)],
    ) -> (&'static str, Value) {
        let (path, mut body) = self.request(conversation);
        if turn == 0 {
            return (path, body);
        }
        let key = mix64(self.seed ^ mix64(conversation) ^ mix64(turn as u64 + 0x7a11));
        let mut rng = SplitMix64::new(key);
        let words: Vec<&str> = (0..self.prompt_lengths.draw(&mut rng))
            .map(|k| WORDS[(mix64(key ^ k as u64) % WORDS.len() as u64) as usize])
            .collect();
        let mut messages: Vec<Value> = history
            .iter()
            .flat_map(|(user, answer)| {
                [
                    json!({"role": "user", "content": user}),
                    json!({"role": "assistant", "content": answer}),
                ]
            })
            .collect();
        messages.push(json!({"role": "user", "content": words.join(" ")}));
        body["messages"] = Value::Array(messages);
        body.as_object_mut().map(|o| o.remove("prompt"));
        ("/v1/chat/completions", body)
    }

    /// The API path and JSON body of request `i`.
    pub fn request(&self, i: u64) -> (&'static str, Value) {
        let mut rng = SplitMix64::new(mix64(self.seed ^ mix64(i)));
        let mut max_tokens = self.output_lengths.draw(&mut rng);
        let mut prompt_len = self.prompt_lengths.draw(&mut rng);
        if let Some(e) = self.replay.as_ref().and_then(|t| t.get(i as usize)) {
            (prompt_len, max_tokens) = (e.input_tokens.max(1), e.output_tokens.max(1));
        }
        let chat_messages: Option<Vec<(String, String)>>;
        let mut prompt_value = Value::Null;
        match &self.dataset {
            Some(d) => match &d[(i % d.len() as u64) as usize] {
                DatasetPrompt::Text(t) if self.chat => {
                    chat_messages = Some(vec![("user".into(), t.clone())])
                }
                DatasetPrompt::Text(t) => {
                    chat_messages = None;
                    prompt_value = json!(t);
                }
                DatasetPrompt::Chat(m) => chat_messages = Some(m.clone()),
            },
            None => {
                // The group's prefix, drawn from the group alone.
                let (prefix_len, group) = self
                    .shared_prefix
                    .map_or((0, 0), |p| (p.len, i % p.groups.max(1)));
                let group_key = mix64(self.seed ^ mix64(group) ^ 0x5ba7ed);
                let words: Vec<&str> = (0..prefix_len)
                    .map(|k| mix64(group_key ^ k as u64))
                    .chain((0..prompt_len).map(|k| mix64(i ^ k as u64)))
                    .map(|h| WORDS[(h % WORDS.len() as u64) as usize])
                    .collect();
                let text = words.join(" ");
                match (self.chat, self.token_ids_below) {
                    (true, _) => chat_messages = Some(vec![("user".into(), text)]),
                    (false, Some(v)) => {
                        chat_messages = None;
                        let mut shared = SplitMix64::new(group_key);
                        let ids: Vec<u32> = (0..prefix_len)
                            .map(|_| (shared.next_u64() % u64::from(v)) as u32)
                            .chain((0..prompt_len).map(|_| (rng.next_u64() % u64::from(v)) as u32))
                            .collect();
                        prompt_value = json!(ids);
                    }
                    (false, None) => {
                        chat_messages = None;
                        prompt_value = json!(text);
                    }
                }
            }
        }
        let mut body =
            json!({"max_tokens": max_tokens, "temperature": 0, "seed": i, "stream": self.stream});
        if self.stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        if let Some(m) = &self.model {
            body["model"] = json!(m);
        }
        match chat_messages {
            Some(ms) if self.chat || self.dataset.is_some() => {
                body["messages"] = ms
                    .iter()
                    .map(|(r, c)| json!({"role": r, "content": c}))
                    .collect();
                ("/v1/chat/completions", body)
            }
            _ => {
                body["prompt"] = prompt_value;
                ("/v1/completions", body)
            }
        }
    }
}

const WORDS: [&str; 16] = [
    "expert",
    "worker",
    "token",
    "cluster",
    "route",
    "layer",
    "batch",
    "cache",
    "model",
    "shard",
    "attention",
    "router",
    "stream",
    "latency",
    "placement",
    "epoch",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_and_draw_in_range() {
        let mut rng = SplitMix64::new(1);
        assert_eq!("fixed:7".parse::<Lengths>().unwrap().draw(&mut rng), 7);
        assert_eq!("12".parse::<Lengths>(), Ok(Lengths::Fixed(12)));
        let u: Lengths = "uniform:3-9".parse().unwrap();
        assert!((0..200)
            .map(|_| u.draw(&mut rng))
            .all(|n| (3..=9).contains(&n)));
        let n: Lengths = "normal:100,10".parse().unwrap();
        let mean = (0..2000).map(|_| n.draw(&mut rng) as f64).sum::<f64>() / 2000.0;
        assert!((mean - 100.0).abs() < 2.0, "{mean}");
        for bad in ["uniform:9-3", "normal:5", "poisson:3", "fixed:x"] {
            assert!(bad.parse::<Lengths>().is_err(), "{bad}");
        }
    }

    #[test]
    fn datasets_parse_and_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("emlg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.jsonl");
        std::fs::write(&p, concat!(
            "{\"prompt\": \"hello\"}\n\n",
            "{\"conversations\": [{\"from\": \"system\", \"value\": \"be brief\"}, {\"from\": \"human\", \"value\": \"hi\"}, {\"from\": \"gpt\", \"value\": \"yo\"}]}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
        )).unwrap();
        let d = read_dataset(&p).unwrap();
        assert_eq!(d[0], DatasetPrompt::Text("hello".into()));
        assert_eq!(
            d[1],
            DatasetPrompt::Chat(vec![
                ("system".into(), "be brief".into()),
                ("user".into(), "hi".into())
            ])
        );
        assert_eq!(d.len(), 3);
        std::fs::write(&p, "{\"prompt\": \"ok\"}\n{\"nope\": 1}\n").unwrap();
        assert!(read_dataset(&p).unwrap_err().contains(":2:"));
        std::fs::write(&p, "not json\n").unwrap();
        assert!(read_dataset(&p).unwrap_err().contains(":1:"));
    }

    #[test]
    fn the_same_seed_sends_the_same_requests() {
        let w = Workload {
            model: None,
            chat: false,
            stream: true,
            prompt_lengths: Lengths::Uniform(4, 40),
            output_lengths: Lengths::Uniform(1, 9),
            token_ids_below: Some(500),
            dataset: None,
            shared_prefix: None,
            replay: None,
            turns: 1,
            seed: 3,
        };
        assert_eq!(w.request(5), w.request(5));
        assert_ne!(w.request(5), w.request(6));
        let (path, body) = w.request(1);
        assert_eq!(path, "/v1/completions");
        assert!(body["prompt"].as_array().unwrap().len() >= 4);
    }

    /// Shared prefixes: requests of one group begin with the same `len` ids (or words),
    /// other groups with others, and each goes on with its own part.
    #[test]
    fn shared_prefixes_are_shared_within_a_group_only() {
        for token_ids_below in [Some(500), None] {
            let w = Workload {
                model: None,
                chat: false,
                stream: false,
                prompt_lengths: Lengths::Fixed(6),
                output_lengths: Lengths::Fixed(1),
                token_ids_below,
                dataset: None,
                shared_prefix: Some(SharedPrefix { len: 40, groups: 2 }),
                replay: None,
                turns: 1,
                seed: 9,
            };
            let prompt = |i| -> Vec<String> {
                let p = &w.request(i).1["prompt"];
                match p.as_array() {
                    Some(ids) => ids.iter().map(|x| x.to_string()).collect(),
                    None => p.as_str().unwrap().split(' ').map(str::to_owned).collect(),
                }
            };
            let (a, b, c) = (prompt(0), prompt(2), prompt(1));
            assert_eq!(a.len(), 46);
            assert_eq!(a[..40], b[..40], "same group, same prefix");
            assert_ne!(a[40..], b[40..], "each its own part");
            assert_ne!(a[..40], c[..40], "another group");
        }
    }

    /// A trace replays in time order with its lengths; bad lines are named.
    #[test]
    fn traces_read_in_time_order_and_set_the_lengths() {
        let dir = std::env::temp_dir().join(format!("emlg-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.jsonl");
        std::fs::write(
            &p,
            concat!(
                "{\"timestamp\": 5000, \"input_length\": 7, \"output_length\": 2}\n",
                "{\"timestamp\": 1000, \"input_tokens\": 30, \"output_tokens\": 4, \"hash_ids\": [1]}\n",
            ),
        )
        .unwrap();
        let t = read_trace(&p).unwrap();
        assert_eq!(
            t,
            vec![
                TraceEntry {
                    at: std::time::Duration::ZERO,
                    input_tokens: 30,
                    output_tokens: 4
                },
                TraceEntry {
                    at: std::time::Duration::from_secs(4),
                    input_tokens: 7,
                    output_tokens: 2
                },
            ]
        );
        let w = Workload {
            model: None,
            chat: false,
            stream: false,
            prompt_lengths: Lengths::Fixed(3),
            output_lengths: Lengths::Fixed(9),
            token_ids_below: Some(100),
            dataset: None,
            shared_prefix: None,
            replay: Some(t),
            turns: 1,
            seed: 1,
        };
        let (_, body) = w.request(1);
        assert_eq!(
            (
                body["prompt"].as_array().unwrap().len(),
                body["max_tokens"].as_u64()
            ),
            (7, Some(2))
        );
        std::fs::write(&p, "{\"timestamp\": 1, \"input_length\": 3}\n").unwrap();
        assert!(read_trace(&p).unwrap_err().contains(":1: no output_length"));
    }
}
