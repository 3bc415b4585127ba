//! The backend seam: what the gateway needs of the cluster ([`Cluster`]: its state and its
//! workers' load), which attention worker takes a request (the one that was sent its
//! longest prefix unless it is overloaded ([`crate::affinity`]), else the most free KV
//! blocks, lowest id on ties; none that already failed it), one lazily connected channel
//! per worker address (pinged: a worker that dies silently is noticed within
//! `expertmesh_proto::KEEPALIVE_INTERVAL` + `KEEPALIVE_TIMEOUT`, and its streams migrate),
//! and the `Generate` call that starts (or resumes) a request's token stream (its trace
//! context in the call's metadata).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use expertmesh_coordinator::{ClusterView, Coordinator, Member, Role};
use expertmesh_model::GrammarSpec;
use expertmesh_proto::v1 as pb;
use expertmesh_proto::v1::attention_service_client::AttentionServiceClient;
use tonic::transport::Channel;

use crate::affinity::{self, Candidate, PrefixRoutes};
use crate::error::ApiError;
use crate::request::ValidRequest;
use crate::stream::Break;

/// How long a worker that failed a request is passed over for new ones.
const SUSPECT_FOR: Duration = Duration::from_secs(10);

/// One choice's start (or restart) beyond what its request says.
#[derive(Debug, Clone, Copy)]
pub struct Resume<'a> {
    /// The choice's seed (`response::choice_seed`).
    pub seed: u64,
    /// The tokens it already generated.
    pub generated: &'a [u32],
    /// Whether the prompt's logprobs are still wanted.
    pub prompt_logprobs: bool,
    /// The key the request's choices share (`n` > 1; 0: none): a worker that serves
    /// several prefills their prompt once.
    pub group: u64,
    /// The worker to prefer (the one the request's first choice went to), if usable.
    pub prefer: Option<&'a str>,
}

/// Why a request could not be started.
#[derive(Debug)]
pub enum StartFailure {
    /// No attention worker can take it (none usable, or all of them failed it).
    NoWorker(ApiError),
    /// The worker at this address refused or failed it.
    Worker(String, Break),
}

/// What the gateway needs of the cluster: its state and its workers' load.
pub trait Cluster: Send + Sync + 'static {
    fn view(&self) -> Arc<ClusterView>;
    fn loads(&self) -> HashMap<u64, pb::WorkerLoad>;
}

impl Cluster for Coordinator {
    fn view(&self) -> Arc<ClusterView> {
        Coordinator::view(self)
    }
    fn loads(&self) -> HashMap<u64, pb::WorkerLoad> {
        Coordinator::loads(self)
    }
}

/// The live attention workers that can serve now (not draining): all of them when the
/// expert placement is servable, else those that hold every routed expert themselves
/// (`--dispatch local`).
fn usable_workers(view: &ClusterView) -> impl Iterator<Item = &Member> {
    let placed = view.unservable.is_none();
    view.members.iter().filter(move |m| {
        m.role == Role::AttentionWorker && m.alive && !m.draining && (placed || m.holds_experts)
    })
}

/// The attention workers, as the gateway reaches them.
pub struct Backend {
    pub cluster: Arc<dyn Cluster>,
    /// One channel per worker address (connected on first use).
    channels: Mutex<HashMap<String, Channel>>,
    /// Workers that failed a request lately, and when: new requests go elsewhere while
    /// another worker can take them, until [`SUSPECT_FOR`] has passed (the cluster declares
    /// a dead worker dead only after a lease).
    suspects: Mutex<HashMap<String, Instant>>,
    /// Where prompts went lately (prefix-aware routing).
    routes: Mutex<PrefixRoutes>,
    /// Ids that end generation (sent with every request).
    pub stop_ids: Vec<u32>,
}

impl Backend {
    pub fn new(cluster: Arc<dyn Cluster>, stop_ids: Vec<u32>) -> Self {
        Self {
            cluster,
            channels: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashMap::new()),
            routes: Mutex::default(),
            stop_ids,
        }
    }

    /// Why the cluster cannot take requests now, if it cannot (`/health`).
    pub fn unavailable(&self) -> Option<String> {
        let view = self.cluster.view();
        if usable_workers(&view).next().is_some() {
            return None;
        }
        Some(
            view.unservable
                .clone()
                .unwrap_or_else(|| "no attention worker has registered".into()),
        )
    }

    /// The ids that end `job`: the model's end ids (unless it ignores them) and its own
    /// `stop_token_ids`.
    pub fn stop_ids_of(&self, job: &ValidRequest) -> Vec<u32> {
        let r = &job.request;
        let model: &[u32] = if r.ignore_eos { &[] } else { &self.stop_ids };
        model.iter().chain(&r.stop_token_ids).copied().collect()
    }

    /// Marks the worker at `address` as having just failed a request.
    pub fn suspect(&self, address: &str) {
        let mut suspects = self.suspects.lock().expect("suspects lock");
        suspects.retain(|_, since| since.elapsed() < SUSPECT_FOR);
        suspects.insert(address.to_owned(), Instant::now());
    }

    /// The attention worker for a prompt named by `chain` (`affinity::chain`), among those
    /// not in `avoid`: the one sent its longest prefix unless it is overloaded, else the
    /// one with the most free KV blocks (lowest id on ties); a suspect only when nothing
    /// else is left.
    fn pick_worker(&self, avoid: &[String], chain: &[u64]) -> Result<String, ApiError> {
        let view = self.cluster.view();
        if let Some(reason) = &view.unservable {
            if usable_workers(&view).next().is_none() {
                return Err(ApiError::Unavailable(format!(
                    "the cluster cannot serve: {reason}"
                )));
            }
        }
        let loads = self.cluster.loads();
        let suspects = self.suspects.lock().expect("suspects lock");
        let trusted = |m: &Member| {
            suspects
                .get(&m.address)
                .is_none_or(|since| since.elapsed() >= SUSPECT_FOR)
        };
        let candidates: Vec<Candidate<'_>> = usable_workers(&view)
            .filter(|m| !avoid.contains(&m.address) && trusted(m))
            .map(|m| Candidate {
                address: &m.address,
                load: loads.get(&m.id).map_or(0, |l| l.running + l.waiting),
            })
            .collect();
        let routes = self.routes.lock().expect("routes lock");
        if let Some(holder) = routes.holder(chain, &candidates) {
            return Ok(holder.to_owned());
        }
        usable_workers(&view)
            .filter(|m| !avoid.contains(&m.address))
            .max_by_key(|m| {
                (
                    trusted(m),
                    loads.get(&m.id).map_or(0, |l| l.free_kv_blocks),
                    std::cmp::Reverse(m.id),
                )
            })
            .map(|m| m.address.clone())
            .ok_or_else(|| ApiError::Unavailable("no attention worker is available".into()))
    }

    /// Whether the worker at `address` can take requests now and is not a suspect.
    fn usable(&self, address: &str) -> bool {
        let view = self.cluster.view();
        let fresh = self
            .suspects
            .lock()
            .expect("suspects lock")
            .get(address)
            .is_none_or(|since| since.elapsed() >= SUSPECT_FOR);
        fresh && usable_workers(&view).any(|m| m.address == address)
    }

    fn channel(&self, address: &str) -> Result<Channel, ApiError> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let endpoint = expertmesh_proto::watched_endpoint(address, Duration::from_secs(3))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let c = expertmesh_proto::tls::channel(
            endpoint,
            address,
            expertmesh_proto::tls::PeerRole::AttentionWorker,
        );
        channels.insert(address.to_owned(), c.clone());
        Ok(c)
    }

    /// Starts one choice of `job` on an attention worker not in `avoid`, resumed after the
    /// tokens it already generated (its prompt followed by them, the rest of its budget):
    /// the worker's address and its stream of token events.
    pub async fn generate(
        &self,
        job: &ValidRequest,
        choice: Resume<'_>,
        avoid: &[String],
    ) -> Result<(String, tonic::Streaming<pb::GenerateEvent>), StartFailure> {
        let generated = choice.generated;
        let input_ids = [&job.prompt[..], generated].concat();
        let chain = affinity::chain(&input_ids);
        let address = match choice.prefer {
            Some(p) if !avoid.iter().any(|a| a == p) && self.usable(p) => p.to_owned(),
            _ => self
                .pick_worker(avoid, &chain)
                .map_err(StartFailure::NoWorker)?,
        };
        self.routes
            .lock()
            .expect("routes lock")
            .record(&chain, &address);
        let channel = self.channel(&address).map_err(StartFailure::NoWorker)?;
        let r = &job.request;
        let request = pb::GenerateRequest {
            input_ids,
            max_tokens: job.max_tokens.saturating_sub(generated.len()) as u32,
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k as u32,
            seed: choice.seed,
            stop_ids: self.stop_ids_of(job),
            prompt_logits: false,
            images: job.images.clone(),
            min_tokens: r.min_tokens.saturating_sub(generated.len()) as u32,
            // best_of ranks choices by their tokens' logprobs.
            logprobs: r
                .logprobs
                .or((r.best_of > r.n).then_some(0))
                .map(|k| k as u32),
            prompt_logprobs: choice
                .prompt_logprobs
                .then_some(r.logprobs.unwrap_or(0) as u32),
            repetition_penalty: r.adjust.repetition_penalty,
            presence_penalty: r.adjust.presence_penalty,
            frequency_penalty: r.adjust.frequency_penalty,
            logit_bias: r
                .adjust
                .logit_bias
                .iter()
                .map(|&(id, bias)| pb::LogitBias { id, bias })
                .collect(),
            resumed_tokens: generated.len() as u32,
            grammar: r.grammar.as_ref().map(|(g, _)| grammar_message(g)),
            prompt_group: choice.group,
        };
        let mut client = AttentionServiceClient::new(channel)
            .max_decoding_message_size(expertmesh_proto::MAX_MESSAGE_BYTES);
        let mut request = tonic::Request::new(request);
        if let Some(t) = job.trace {
            if let Ok(v) = t.to_string().parse() {
                request
                    .metadata_mut()
                    .insert(expertmesh_proto::trace::TRACEPARENT, v);
            }
        }
        match client.generate(request).await {
            Ok(r) => Ok((address, r.into_inner())),
            Err(s) => Err(StartFailure::Worker(address, Break::Status(s))),
        }
    }
}

/// A grammar as the wire carries it.
fn grammar_message(g: &GrammarSpec) -> pb::Grammar {
    use pb::grammar::Kind;
    let kind = match g {
        GrammarSpec::JsonObject => Kind::JsonObject(true),
        GrammarSpec::JsonSchema(s) => Kind::JsonSchema(s.clone()),
        GrammarSpec::Regex(r) => Kind::Regex(r.clone()),
        GrammarSpec::Choice(c) => Kind::Choice(pb::Choices { items: c.clone() }),
        GrammarSpec::Lark(l) => Kind::Lark(l.clone()),
    };
    pb::Grammar { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed cluster state.
    struct Fixed(ClusterView);

    impl Cluster for Fixed {
        fn view(&self) -> Arc<ClusterView> {
            Arc::new(self.0.clone())
        }
        fn loads(&self) -> HashMap<u64, pb::WorkerLoad> {
            HashMap::new()
        }
    }

    fn attention(id: u64, alive: bool, holds_experts: bool) -> Member {
        Member {
            id,
            role: Role::AttentionWorker,
            address: format!("a{id}:1"),
            pid: 0,
            alive,
            capacity: None,
            draining: false,
            holds_experts,
            weightless: false,
            backup: 0,
        }
    }

    #[test]
    fn workers_that_hold_their_experts_serve_without_a_placement() {
        let none = "no expert worker has registered";
        type Case = (
            &'static str,
            Option<&'static str>,
            Vec<Member>,
            Result<&'static str, ()>,
        );
        let cases: [Case; 5] = [
            ("placed", None, vec![attention(1, true, false)], Ok("a1:1")),
            (
                "not placed",
                Some(none),
                vec![attention(1, true, false)],
                Err(()),
            ),
            (
                "self-contained",
                Some(none),
                vec![attention(1, true, true)],
                Ok("a1:1"),
            ),
            (
                "only the self-contained one",
                Some(none),
                vec![attention(1, true, false), attention(2, true, true)],
                Ok("a2:1"),
            ),
            ("dead", Some(none), vec![attention(1, false, true)], Err(())),
        ];
        for (name, unservable, members, want) in cases {
            let view = ClusterView {
                members,
                unservable: unservable.map(str::to_owned),
                ..ClusterView::default()
            };
            let backend = Backend::new(Arc::new(Fixed(view)), Vec::new());
            let got = backend.pick_worker(&[], &[]);
            match want {
                Ok(address) => {
                    assert_eq!(got.unwrap(), address, "{name}");
                    assert_eq!(backend.unavailable(), None, "{name}");
                }
                Err(()) => {
                    assert!(got.is_err(), "{name}");
                    assert!(backend.unavailable().is_some(), "{name}");
                }
            }
        }
    }

    /// A worker that just failed a request is passed over for new ones while another can
    /// take them, and still taken when it is the only one.
    #[test]
    fn suspects_are_the_last_choice() {
        let view = ClusterView {
            members: vec![attention(1, true, false), attention(2, true, false)],
            ..ClusterView::default()
        };
        let backend = Backend::new(Arc::new(Fixed(view)), Vec::new());
        assert_eq!(backend.pick_worker(&[], &[]).unwrap(), "a1:1");
        backend.suspect("a1:1");
        assert_eq!(backend.pick_worker(&[], &[]).unwrap(), "a2:1");
        backend.suspect("a2:1");
        assert!(backend.pick_worker(&[], &[]).is_ok());
        assert_eq!(backend.pick_worker(&["a2:1".into()], &[]).unwrap(), "a1:1");
    }
}
