//! Configuration: the model's shape, the quantization settings and the capacity of a cache.

use crate::error::{Error, Result};

/// The element type of full-precision data: what the engine hands over and what the
/// full-precision windows (recent tokens and sinks) store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The dtype with this numeric value (`DType::F16 as u32` and so on).
    pub fn from_u32(v: u32) -> Option<DType> {
        match v {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::BF16),
            _ => None,
        }
    }
}

/// How keys are grouped for quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum KeyMode {
    /// KIVI: a group is `group_size` consecutive tokens of one channel (keys have outlier channels).
    PerChannel = 0,
    /// The paper's baseline: keys grouped like values, `value_group` consecutive channels of one token.
    PerToken = 1,
}

impl KeyMode {
    /// The mode with this numeric value.
    pub fn from_u32(v: u32) -> Option<KeyMode> {
        match v {
            0 => Some(KeyMode::PerChannel),
            1 => Some(KeyMode::PerToken),
            _ => None,
        }
    }
}

/// How the scale and zero of a group are chosen when it is quantized. The stored format is the
/// same either way (codes, an f16 scale and an f16 zero per group), so it changes nothing at
/// attention time and is not part of a saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Rounding {
    /// The paper's: the grid spans the group's minimum to its maximum.
    MinMax = 0,
    /// Of the min/max grid and narrower ones (spans of 1/1.1 to 1/1.4 of the range, each
    /// refitted by least squares to the codes it gives), the one with the smallest squared error
    /// over the group. Extreme elements may be clipped to their nearest level. It pays where
    /// errors average out, as in values (an output is a weighted sum of them); for keys, whose
    /// extremes decide the attention scores, it measured worse than min/max.
    LeastSquares = 1,
}

impl Rounding {
    /// The rounding with this numeric value.
    pub fn from_u32(v: u32) -> Option<Rounding> {
        match v {
            0 => Some(Rounding::MinMax),
            1 => Some(Rounding::LeastSquares),
            _ => None,
        }
    }
}

/// Everything fixed when a cache is created. Build one with [`CacheConfig::new`] (KIVI-2 defaults),
/// change the fields you need, and pass it to [`crate::Cache::new`], which validates it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheConfig {
    /// Number of transformer layers the cache holds.
    pub n_layers: u32,
    /// Key/value heads per layer (query heads may be any multiple of this: GQA/MQA).
    pub n_kv_heads: u32,
    /// Channels per head. A multiple of 8 and of `value_group`.
    pub head_dim: u32,
    /// Element type of full-precision data (windows and sinks).
    pub dtype: DType,
    /// Bits per key code: 2, 4 or 8.
    pub key_bits: u8,
    /// Bits per value code: 2, 4 or 8.
    pub value_bits: u8,
    /// Key grouping: per channel (KIVI) or per token (baseline).
    pub key_mode: KeyMode,
    /// G: tokens per key group. Tokens leave the full-precision window `group_size` at a time.
    /// A multiple of 8, at most 256.
    pub group_size: u32,
    /// Channels per value group (and per key group in [`KeyMode::PerToken`]); divides `head_dim`.
    pub value_group: u32,
    /// How value groups are rounded. Keys always take min/max rounding (the paper's), which keeps
    /// each channel's extremes.
    pub value_rounding: Rounding,
    /// R: the most recent tokens kept at full precision; a multiple of `group_size`, 0 allowed.
    pub residual: u32,
    /// S: the first tokens of every sequence kept at full precision for ever (attention sinks).
    /// Default 1: the first token (BOS in most models), on which most heads put much of their
    /// weight (an attention sink), so its quantization error would reach the output almost
    /// undamped. 0 is the paper's method.
    pub sinks: u32,
    /// Token budget across all sequences: the page pool holds this many quantized tokens per layer.
    pub max_tokens: u32,
    /// Sequences alive at once; each holds one full-precision window per layer.
    pub max_seqs: u32,
    /// Tokens one sequence may hold (the model's context length), or 0 for no limit but the
    /// pool. Every (sequence, layer) has a block table with room for the pages of this many
    /// tokens, taken at creation (on the device too for a CUDA cache): 4 bytes per page of
    /// `max_seq_tokens` (or of `max_tokens` when 0) times `max_seqs` times `n_layers`. An engine
    /// serving many sequences from a large pool should set it.
    pub max_seq_tokens: u32,
    /// Tokens per page: a multiple of `group_size` up to 65536, or 0 for one group per page. On
    /// a CPU cache 256 decodes about 1.2 to 1.35 times faster from a few thousand tokens on (each
    /// KV head's groups are then contiguous in memory), for one spare page per sequence in each
    /// layer's pool; CPU engines should set it. CUDA caches are tuned for one group per page.
    /// Saved states load into caches of any page size (the pages are regrouped).
    pub page_tokens: u32,
    /// Threads one attention or append call may use (the engine's choice; 1 = the calling thread
    /// only). Appends spread the quantization of flushed groups over the KV heads.
    pub n_threads: u32,
}

impl CacheConfig {
    /// A KIVI-2 configuration for a model of this shape: 2-bit keys per channel and 2-bit values,
    /// G = 32, value groups of 32 channels rounded by least squares, R = 128, one sink token, f32
    /// windows, 4096 tokens, one sequence of any length, one group per page.
    pub fn new(n_layers: u32, n_kv_heads: u32, head_dim: u32) -> CacheConfig {
        CacheConfig {
            n_layers,
            n_kv_heads,
            head_dim,
            dtype: DType::F32,
            key_bits: 2,
            value_bits: 2,
            key_mode: KeyMode::PerChannel,
            group_size: 32,
            value_group: 32,
            value_rounding: Rounding::LeastSquares,
            residual: 128,
            sinks: 1,
            max_tokens: 4096,
            max_seqs: 1,
            max_seq_tokens: 0,
            page_tokens: 0,
            n_threads: 1,
        }
    }

    /// Tokens per page after the default (0: one group) is applied.
    pub fn effective_page_tokens(&self) -> u32 {
        if self.page_tokens == 0 {
            self.group_size
        } else {
            self.page_tokens
        }
    }

    /// Checks that attention calls with `n_q_heads` query heads fit this cache: a positive
    /// multiple of its kv heads (`Error::InvalidArgument` naming the number otherwise).
    pub fn check_q_heads(&self, n_q_heads: u32) -> Result<()> {
        if n_q_heads == 0 || n_q_heads % self.n_kv_heads != 0 {
            return Err(Error::InvalidArgument(format!(
                "n_q_heads {n_q_heads} is not a positive multiple of the cache's {} kv heads",
                self.n_kv_heads
            )));
        }
        Ok(())
    }

    /// Checks every field; the error names the first bad value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.n_layers == 0 {
            return bad("n_layers 0: a cache needs at least one layer".into());
        }
        if self.n_kv_heads == 0 {
            return bad("n_kv_heads 0: a layer needs at least one key/value head".into());
        }
        if self.head_dim == 0 || self.head_dim % 8 != 0 || self.head_dim > 1024 {
            return bad(format!("head_dim {} is not a multiple of 8 in 8..=1024", self.head_dim));
        }
        for (name, b) in [("key_bits", self.key_bits), ("value_bits", self.value_bits)] {
            if !matches!(b, 2 | 4 | 8) {
                return bad(format!("{name} {b} is not 2, 4 or 8"));
            }
        }
        if self.group_size == 0 || self.group_size % 8 != 0 || self.group_size > 256 {
            return bad(format!("group_size {} is not a multiple of 8 in 8..=256", self.group_size));
        }
        if self.value_group == 0 || self.head_dim % self.value_group != 0 {
            return bad(format!(
                "head_dim {} is not a multiple of the value group {}",
                self.head_dim, self.value_group
            ));
        }
        if self.residual % self.group_size != 0 {
            return bad(format!("residual {} is not a multiple of the group size {}", self.residual, self.group_size));
        }
        if self.page_tokens % self.group_size != 0 || self.page_tokens > 1 << 16 {
            return bad(format!(
                "page_tokens {} is not 0 or a multiple of the group size {} up to 65536",
                self.page_tokens, self.group_size
            ));
        }
        if self.n_threads == 0 || self.n_threads > 256 {
            return bad(format!("n_threads {} is not in 1..=256", self.n_threads));
        }
        if self.max_seqs == 0 {
            return bad("max_seqs 0: a cache needs room for at least one sequence".into());
        }
        if self.max_tokens == 0 {
            return bad("max_tokens 0: a cache needs room for at least one token".into());
        }
        if self.residual > 1 << 20 || self.sinks > 1 << 20 {
            return bad(format!(
                "residual {} or sinks {} above the limit of {} tokens",
                self.residual,
                self.sinks,
                1 << 20
            ));
        }
        let total = crate::layout::Layout::new(self).total_bytes();
        if total > isize::MAX as u128 {
            return bad(format!("the cache would take {total} bytes, more than this machine can address"));
        }
        Ok(())
    }

    /// Average bits per element of a quantized token, scales and zeros included (windows excluded).
    pub fn bits_per_element(&self) -> f64 {
        let key_scale = match self.key_mode {
            KeyMode::PerChannel => 32.0 / self.group_size as f64,
            KeyMode::PerToken => 32.0 / self.value_group as f64,
        };
        let value_scale = 32.0 / self.value_group as f64;
        (self.key_bits as f64 + key_scale + self.value_bits as f64 + value_scale) / 2.0
    }
}
