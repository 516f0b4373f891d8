//! Builds the KV store for a configuration.

use crate::eval::CacheSpec;
use crate::gguf::Result;
use crate::kv::{KvStore, NaiveStore};
use crate::model::ModelConfig;

/// A store for `spec` holding `max_seqs` sequences of up to `max_tokens`.
/// `naive`: the exact configuration uses the plain reference attention.
pub fn make(
    spec: &CacheSpec,
    cfg: &ModelConfig,
    max_seqs: usize,
    max_tokens: usize,
    naive: bool,
) -> Result<Box<dyn KvStore>> {
    let _ = max_tokens;
    if spec.is_exact() && naive {
        return Ok(Box::new(NaiveStore::new(cfg.n_layers, max_seqs)));
    }
    if spec.is_exact() {
        return Ok(Box::new(NaiveStore::new(cfg.n_layers, max_seqs)));
    }
    Err(format!("configuration `{}` needs the kivi cache", spec.name).into())
}
