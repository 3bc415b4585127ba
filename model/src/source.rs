//! Where a model comes from, as every command names it: a Hugging Face directory, or
//! `synthetic:bench` for the Maverick-shaped random benchmark model built in memory (so
//! clusters can be load-tested without real weights). Every process of a cluster opens the
//! same source and checks the same fingerprint.

use std::path::PathBuf;

use crate::checkpoint::{SafetensorsCheckpoint, WeightSource};
use crate::config::TextConfig;
use crate::error::{ModelError, Result};
use crate::grammar::Grammars;
use crate::synthetic::SyntheticSpec;
use crate::vision::{ProcessorConfig, VisionConfig};

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Dir(PathBuf),
    Synthetic(SyntheticSpec),
}

impl std::str::FromStr for ModelSource {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.strip_prefix("synthetic:") {
            Some("bench") => Ok(Self::Synthetic(SyntheticSpec::bench_maverick())),
            Some(other) => Err(ModelError::InvalidField {
                file: "--model".into(),
                field: "synthetic".into(),
                reason: format!("unknown synthetic model `{other}` (known: bench)"),
            }),
            None => Ok(Self::Dir(PathBuf::from(s))),
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(p) => write!(f, "{}", p.display()),
            Self::Synthetic(_) => write!(f, "synthetic:bench"),
        }
    }
}

impl ModelSource {
    /// The vision tower's config, for a multimodal model (`None`: text only).
    pub fn vision_config(&self) -> Result<Option<VisionConfig>> {
        match self {
            Self::Dir(d) => VisionConfig::from_dir(d, self.config()?.hidden_size),
            Self::Synthetic(_) => Ok(None),
        }
    }

    /// How images become tiles (the processor's config, or the class defaults).
    /// The grammar compiler for structured outputs: none for a model without a tokenizer.
    pub fn grammars(&self) -> Result<Option<Grammars>> {
        match self {
            Self::Dir(d) if d.join("tokenizer.json").exists() => {
                let config = self.config()?;
                Grammars::from_dir(d, config.vocab_size, &config.eos_token_ids).map(Some)
            }
            _ => Ok(None),
        }
    }

    pub fn processor_config(&self) -> Result<ProcessorConfig> {
        match self {
            Self::Dir(d) => ProcessorConfig::from_dir(d),
            Self::Synthetic(_) => Ok(ProcessorConfig::default()),
        }
    }

    pub fn config(&self) -> Result<TextConfig> {
        match self {
            Self::Dir(d) => TextConfig::from_dir(d),
            Self::Synthetic(s) => s.config(),
        }
    }

    /// Opens the weights: maps the checkpoint, or builds the synthetic model.
    pub fn weights(&self) -> Result<Box<dyn WeightSource>> {
        match self {
            Self::Dir(d) => Ok(Box::new(SafetensorsCheckpoint::open(d)?)),
            Self::Synthetic(s) => Ok(Box::new(s.build()?.1)),
        }
    }

    /// A short identity of the model: FNV-1a over `config.json` and the shard index (or
    /// the synthetic spec). Workers of one cluster must agree on it.
    pub fn fingerprint(&self) -> Result<String> {
        let mut h = Fnv::default();
        match self {
            Self::Dir(d) => {
                for name in ["config.json", "model.safetensors.index.json"] {
                    let path = d.join(name);
                    match std::fs::read(&path) {
                        Ok(bytes) => h.write(&bytes),
                        Err(e) if name == "config.json" => return Err(ModelError::io(path, e)),
                        Err(_) => {}
                    }
                }
            }
            Self::Synthetic(s) => h.write(format!("{s:?}").as_bytes()),
        }
        Ok(format!("{:016x}", h.0))
    }
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
