//! Attention over the cache: the options engines pass, and one module per backend.
//!
//! - `cpu`: the fused attention that reads packed codes directly (key scales folded into the
//!   query and key zeros into one bias per group; values dequantized in registers), with an
//!   online softmax in f32: AVX-512, AVX2 and NEON kernels chosen at run time, a scalar
//!   fallback, and the cache's own threads.
//! - [`reference`](mod@reference): textbook attention in f64 over the dequantized cache, for tests.

pub(crate) mod cpu;
pub mod reference;

pub(crate) use cpu::MAX_HEAD_DIM;

#[doc(hidden)]
pub use cpu::dense::DenseF16Cache;
#[doc(hidden)]
pub use cpu::{active_isa, available_isas, force_isa, force_shared_key_permute, Isa};

use crate::error::{Error, Result};

/// Options of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnOptions {
    /// Multiplies `q . k`; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Each query sees only keys at its own position or before (default true).
    pub causal: bool,
    /// If non-zero, a query at position `p` sees only keys at positions `p - W + 1 ..= p`
    /// (Mistral, Gemma local layers).
    pub sliding_window: u32,
    /// If non-zero, logits become `softcap * tanh(logit / softcap)` (Gemma 2).
    pub softcap: f32,
}

impl Default for AttnOptions {
    fn default() -> Self {
        AttnOptions { scale: None, causal: true, sliding_window: 0, softcap: 0.0 }
    }
}

/// Options checked and filled in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolved {
    pub scale: f32,
    pub causal: bool,
    pub window: usize,
    pub softcap: f32,
}

impl AttnOptions {
    pub(crate) fn resolve(&self, head_dim: usize) -> Result<Resolved> {
        let scale = self.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
        if !scale.is_finite() || scale == 0.0 {
            return Err(Error::InvalidArgument(format!("attention scale {scale} is not a finite non-zero number")));
        }
        if !self.softcap.is_finite() || self.softcap < 0.0 {
            return Err(Error::InvalidArgument(format!("softcap {} is not a finite number >= 0", self.softcap)));
        }
        Ok(Resolved { scale, causal: self.causal, window: self.sliding_window as usize, softcap: self.softcap })
    }
}

impl Resolved {
    /// Positions a query at `qpos` may see, among `0..total`.
    #[inline]
    pub fn visible(&self, qpos: usize, total: usize) -> (usize, usize) {
        let lo = if self.window > 0 { (qpos + 1).saturating_sub(self.window) } else { 0 };
        let hi = if self.causal { (qpos + 1).min(total) } else { total };
        (lo, hi.max(lo))
    }

    /// A raw `q . k` turned into a logit.
    #[inline(always)]
    pub fn logit(&self, dot: f32) -> f32 {
        let x = dot * self.scale;
        if self.softcap > 0.0 {
            self.softcap * (x / self.softcap).tanh()
        } else {
            x
        }
    }
}
