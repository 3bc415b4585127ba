//! Structured outputs: a grammar (a JSON schema, a regular expression, a list of choices, a
//! Lark grammar) as a per-token mask, through llguidance — the engine vLLM, SGLang and
//! llama.cpp use.
//!
//! [`Grammars`] is built once per model from its `tokenizer.json`: every token's bytes (the
//! byte-level alphabet undone, special tokens marked as llguidance expects) in a token trie
//! of the model's vocabulary size (ids past the tokenizer's have no bytes and are never
//! allowed). [`Grammars::compile`] turns a [`GrammarSpec`] into a [`Constraint`], or a
//! [`ModelError::Grammar`] naming what is wrong with it; llguidance's fuel limits bound
//! what compiling and each step may cost. A constraint gives the mask of the next token
//! ([`Constraint::mask`]), takes the token sampled ([`Constraint::consume`]) and says when
//! the grammar is complete ([`Constraint::is_done`]): the text then ends.

use std::path::Path;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::tokenizer::TextTokenizer;

/// Bytes of a grammar's text at most (a schema, a regex, a Lark grammar).
pub const GRAMMAR_BYTES_MAX: usize = 256 << 10;

/// What the output must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "text", rename_all = "snake_case")]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A JSON schema, as JSON text.
    JsonSchema(String),
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

impl GrammarSpec {
    fn top_level(&self) -> Result<TopLevelGrammar> {
        let bad = |reason: String| ModelError::Grammar { reason };
        let size = match self {
            Self::JsonObject => 0,
            Self::JsonSchema(t) | Self::Regex(t) | Self::Lark(t) => t.len(),
            Self::Choice(c) => c.iter().map(String::len).sum(),
        };
        if size > GRAMMAR_BYTES_MAX {
            return Err(bad(format!("{size} bytes (at most {GRAMMAR_BYTES_MAX})")));
        }
        Ok(match self {
            Self::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            Self::JsonSchema(text) => TopLevelGrammar::from_json_schema(compact(
                serde_json::from_str(text)
                    .map_err(|e| bad(format!("the schema is not JSON: {e}")))?,
            )),
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Choice(choices) => {
                if choices.is_empty() {
                    return Err(bad("no choices".into()));
                }
                // Lark string literals take JSON's escapes.
                let alternatives: Vec<String> = choices
                    .iter()
                    .map(|c| serde_json::to_string(c).expect("strings serialize"))
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            Self::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        })
    }
}

/// JSON as OpenAI writes it: `", "` and `": "` between items, no other whitespace (unless
/// the schema sets llguidance's own `x-guidance` options). Flexible whitespace lets a model
/// fill its budget with blanks before the object closes.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert(serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

/// The token environment llguidance works in: the trie of the vocabulary's bytes, and the
/// model's tokenizer for text.
struct Env {
    trie: TokTrie,
    tokenizer: TextTokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode(text, false).unwrap_or_default()
        })
    }
}

/// Compiles grammars for one model.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// From the model directory's `tokenizer.json`, for a vocabulary of `vocab` ids whose
    /// end ids are `eos` (the first is the one a complete grammar allows).
    pub fn from_dir(dir: &Path, vocab: usize, eos: &[u32]) -> Result<Self> {
        Self::with_tokenizer(dir, TextTokenizer::from_dir(dir)?, vocab, eos)
    }

    /// `from_dir` with the model's tokenizer already loaded (the gateway has it).
    pub fn with_tokenizer(
        dir: &Path,
        tokenizer: TextTokenizer,
        vocab: usize,
        eos: &[u32],
    ) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bad = |reason: String| ModelError::Tokenizer {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| bad(format!("token bytes: {e}")))?;
        if words.len() > vocab {
            return Err(bad(format!(
                "{} tokens for a vocabulary of {vocab}",
                words.len()
            )));
        }
        // Ids the tokenizer does not know: named specials, which no grammar allows.
        while words.len() < vocab {
            let mut name = format!(".<[{}]>", words.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        let first = eos.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(vocab as u32, first);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| bad(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// A fresh constraint for one sequence; a grammar llguidance cannot compile is a
    /// [`ModelError::Grammar`] with its reason.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint> {
        let grammar = spec.top_level()?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| ModelError::Grammar {
                reason: e.to_string(),
            })?;
        Ok(Constraint {
            matcher: Box::new(Matcher::new(Ok(parser))),
        })
    }
}

/// Which tokens may come next.
#[derive(Debug, Clone)]
pub struct TokenMask(SimpleVob);

impl TokenMask {
    pub fn allows(&self, id: u32) -> bool {
        (id as usize) < self.0.len() && self.0.is_allowed(id)
    }

    /// How many tokens it allows.
    pub fn count(&self) -> usize {
        self.0.num_set()
    }
}

/// One sequence's progress through its grammar.
#[derive(Clone)]
pub struct Constraint {
    /// Boxed: a matcher is over a kilobyte, and constraints move between threads.
    matcher: Box<Matcher>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("done", &self.is_done())
            .finish()
    }
}

impl Constraint {
    fn failed(&self, what: &str, e: impl std::fmt::Display) -> ModelError {
        ModelError::Grammar {
            reason: format!("{what}: {e}"),
        }
    }

    /// The tokens allowed next (only the end ids once the grammar is complete).
    pub fn mask(&mut self) -> Result<TokenMask> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| self.failed("computing the mask", e))?;
        if mask.is_zero() {
            return Err(self.failed("the grammar", "allows no token"));
        }
        Ok(TokenMask(mask))
    }

    /// Moves past the token sampled.
    pub fn consume(&mut self, id: u32) -> Result<()> {
        self.matcher
            .consume_token(id)
            .map_err(|e| self.failed(&format!("token {id}"), e))
    }

    /// Whether the grammar is complete and nothing can follow: the text ends here.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SplitMix64;

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-maverick")
    }

    /// Walks a grammar with random allowed tokens (any model's worst case) until it is
    /// complete; the text it produced.
    fn walk(grammars: &Grammars, spec: &GrammarSpec, seed: u64, eos: u32) -> String {
        let tokenizer = TextTokenizer::from_dir(&fixture()).unwrap();
        let mut c = grammars.compile(spec).unwrap();
        let mut rng = SplitMix64::new(seed);
        let mut ids = Vec::new();
        for _ in 0..400 {
            let mask = c.mask().unwrap();
            let allowed: Vec<u32> = (0..768).filter(|&i| mask.allows(i)).collect();
            assert_eq!(allowed.len(), mask.count());
            let id = allowed[(rng.next_u64() % allowed.len() as u64) as usize];
            c.consume(id).unwrap();
            if id == eos || c.is_done() {
                ids.extend((id != eos).then_some(id));
                return tokenizer.decode(&ids).unwrap();
            }
            ids.push(id);
        }
        panic!("the grammar did not end: {:?}", tokenizer.decode(&ids));
    }

    #[test]
    fn random_walks_stay_in_the_grammar() {
        let eos = 698;
        let grammars = Grammars::from_dir(&fixture(), 768, &[eos]).unwrap();
        let schema = r#"{"type": "object", "required": ["n", "b"], "additionalProperties": false,
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                           "b": {"enum": ["x", "y"]}}}"#;
        let choices = vec!["alpha".to_string(), "be\"ta".to_string()];
        let pattern = regex::Regex::new("^[a-c]{2}[0-9]$").unwrap();
        for seed in 0..4 {
            let text = walk(
                &grammars,
                &GrammarSpec::JsonSchema(schema.into()),
                seed,
                eos,
            );
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(v["n"].as_u64().unwrap() <= 99, "{text}");
            assert!(v["b"] == "x" || v["b"] == "y", "{text}");
            let text = walk(
                &grammars,
                &GrammarSpec::Regex("[a-c]{2}[0-9]".into()),
                seed,
                eos,
            );
            assert!(pattern.is_match(&text), "{text}");
            let text = walk(&grammars, &GrammarSpec::Choice(choices.clone()), seed, eos);
            assert!(choices.contains(&text), "{text}");
        }
        // Ids past the tokenizer's are never allowed.
        let mut c = grammars.compile(&GrammarSpec::JsonObject).unwrap();
        let mask = c.mask().unwrap();
        assert!((716..768).all(|id| !mask.allows(id)));
    }

    #[test]
    fn grammars_that_do_not_compile_are_typed_errors() {
        let grammars = Grammars::from_dir(&fixture(), 768, &[698]).unwrap();
        let bad = [
            GrammarSpec::JsonSchema("{not json".into()),
            GrammarSpec::JsonSchema(r#"{"type": "nonsense"}"#.into()),
            GrammarSpec::Regex("(".into()),
            GrammarSpec::Choice(Vec::new()),
            GrammarSpec::Lark("start: undefined_rule".into()),
            GrammarSpec::Regex("a".repeat(GRAMMAR_BYTES_MAX + 1)),
        ];
        for spec in bad {
            match grammars.compile(&spec) {
                Err(ModelError::Grammar { .. }) => {}
                other => panic!("{spec:?}: {other:?}"),
            }
        }
    }
}
