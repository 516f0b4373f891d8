//! Builds the KV store for a configuration: kivi caches, or the plain
//! reference for checking the model alone.

use crate::eval::CacheSpec;
use crate::gguf::Result;
use crate::kv::{AttnParams, KvStore, NaiveStore};
use crate::model::ModelConfig;
use kivi::{AttnOptions, Cache, CacheConfig, DType, KeyMode, Rounding, Rows, RowsMut};

/// Element type the caches keep full-precision tokens in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowType {
    F32,
    F16,
}

impl WindowType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            _ => Err(format!("--dtype must be f32 or f16, not `{s}`").into()),
        }
    }
}

/// The kivi configuration for `spec`. The exact configuration is a kivi
/// cache whose full-precision window holds the whole context, so nothing is
/// ever quantized.
pub fn kivi_config(
    spec: &CacheSpec,
    cfg: &ModelConfig,
    max_seqs: usize,
    max_tokens: usize,
    dtype: WindowType,
    n_threads: usize,
) -> CacheConfig {
    let mut c = CacheConfig::new(cfg.n_layers as u32, cfg.n_kv_head as u32, cfg.head_dim as u32);
    c.dtype = match dtype {
        WindowType::F32 => DType::F32,
        WindowType::F16 => DType::F16,
    };
    c.group_size = spec.group as u32;
    c.value_group = spec.group.min(cfg.head_dim) as u32;
    if spec.is_exact() {
        c.key_bits = 8;
        c.value_bits = 8;
        c.residual = max_tokens.div_ceil(spec.group).max(1) as u32 * spec.group as u32;
    } else {
        c.key_bits = spec.key_bits;
        c.value_bits = spec.value_bits;
        c.residual = spec.residual as u32;
        c.sinks = spec.sinks as u32;
    }
    c.key_mode = if spec.per_token_keys { KeyMode::PerToken } else { KeyMode::PerChannel };
    c.value_rounding = if spec.min_max_values { Rounding::MinMax } else { Rounding::LeastSquares };
    c.max_seqs = max_seqs as u32;
    c.max_tokens = (max_seqs * max_tokens) as u32;
    c.n_threads = n_threads as u32;
    c
}

/// A store for `spec` holding `max_seqs` sequences of up to `max_tokens`.
/// `naive`: the exact configuration uses the plain reference attention.
pub fn make(
    spec: &CacheSpec,
    cfg: &ModelConfig,
    max_seqs: usize,
    max_tokens: usize,
    dtype: WindowType,
    naive: bool,
) -> Result<Box<dyn KvStore>> {
    if spec.is_exact() && naive {
        return Ok(Box::new(NaiveStore::new(cfg.n_layers, max_seqs)));
    }
    // The exact cache runs the prefill alone: let it use every core there.
    let threads = if spec.is_exact() { rayon::current_num_threads() } else { 1 };
    let kc = kivi_config(spec, cfg, max_seqs, max_tokens, dtype, threads);
    let cache = Cache::new(kc.clone()).map_err(|e| format!("configuration `{}`: {e}", spec.name))?;
    Ok(Box::new(KiviStore { cache, cfg: kc }))
}

/// A kivi cache behind the [`KvStore`] trait.
pub struct KiviStore {
    pub cache: Cache,
    pub cfg: CacheConfig,
}

fn opts(p: &AttnParams) -> AttnOptions {
    AttnOptions { scale: Some(p.scale), causal: true, sliding_window: p.window as u32, softcap: 0.0 }
}

impl KvStore for KiviStore {
    fn append_attend(
        &mut self,
        layer: usize,
        seq: u32,
        k: &[f32],
        v: &[f32],
        q: &[f32],
        out: &mut [f32],
        n: usize,
        p: &AttnParams,
    ) -> Result<()> {
        self.cache.append_attend(
            layer as u32,
            seq,
            Rows::new(k, n)?,
            Rows::new(v, n)?,
            Rows::new(q, n)?,
            RowsMut::new(out, n)?,
            &opts(p),
        )?;
        Ok(())
    }

    fn decode(
        &mut self,
        layer: usize,
        seqs: &[u32],
        k: &[f32],
        v: &[f32],
        q: &[f32],
        out: &mut [f32],
        p: &AttnParams,
    ) -> Result<()> {
        let n = seqs.len();
        self.cache.decode(
            layer as u32,
            seqs,
            Rows::new(k, n)?,
            Rows::new(v, n)?,
            Rows::new(q, n)?,
            RowsMut::new(out, n)?,
            &opts(p),
        )?;
        Ok(())
    }

    fn append(&mut self, layer: usize, seq: u32, k: &[f32], v: &[f32], n: usize) -> Result<()> {
        self.cache.append(layer as u32, seq, Rows::new(k, n)?, Rows::new(v, n)?)?;
        Ok(())
    }

    fn remove_seq(&mut self, seq: u32) -> Result<()> {
        self.cache.seq_remove(seq)?;
        Ok(())
    }

    fn kv_bytes(&self) -> usize {
        self.cache.stats().used_bytes() as usize
    }
}
