//! Reads the log-probabilities llama.cpp's perplexity tool saves with
//! `--kl-divergence-base FILE`, so the harness's exact run can be compared
//! with an independent implementation token by token.
//!
//! File layout: `_logits_`, n_ctx (u32), n_vocab (i32), n_chunk (i32), the
//! evaluated tokens (n_ctx*n_chunk i32, before the BOS substitution), then for
//! each chunk and each scored position (n_ctx-1-n_ctx/2 of them) a record of
//! `2*((n_vocab+1)/2)+4` u16: f32 scale, f32 min log-prob, then every token's
//! log-prob as `min + scale*q`.

use crate::gguf::Result;
use std::path::Path;

pub struct RefLogProbs {
    pub n_ctx: usize,
    pub n_vocab: usize,
    pub n_chunk: usize,
    pub tokens: Vec<u32>,
    data: Vec<u16>,
    nv: usize,
}

/// Agreement of the harness's exact run with the reference.
#[derive(Clone, Debug, Default)]
pub struct RefComparison {
    pub count: usize,
    /// Perplexity from the reference's log-probs over the same tokens.
    pub ppl_ref: f64,
    /// Perplexity of the harness's exact configuration.
    pub ppl: f64,
    /// Mean KL(reference || harness).
    pub kld: f64,
    pub kld_max: f64,
    /// Fraction of positions where both pick the same top token.
    pub top1: f64,
    /// Tokens of the reference's stream that differ from the harness's.
    pub token_mismatches: usize,
    pub(crate) nll: f64,
    pub(crate) nll_ref: f64,
    pub(crate) same: usize,
}

impl RefLogProbs {
    pub fn read(path: &Path) -> Result<Self> {
        let b = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if b.len() < 20 || &b[..8] != b"_logits_" {
            return Err(format!("{} is not a llama.cpp log-probability file", path.display()).into());
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
        let (n_ctx, n_vocab, n_chunk) = (u32_at(8), u32_at(12), u32_at(16));
        let nt = n_ctx * n_chunk;
        let tokens: Vec<u32> = (0..nt).map(|i| u32_at(20 + 4 * i) as u32).collect();
        let nv = 2 * n_vocab.div_ceil(2) + 4;
        let off = 20 + 4 * nt;
        let want = n_chunk * (n_ctx - 1 - n_ctx / 2) * nv * 2;
        if b.len() < off + want {
            return Err(format!("{}: truncated ({} of {} bytes)", path.display(), b.len(), off + want).into());
        }
        let data = b[off..off + want].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        Ok(Self { n_ctx, n_vocab, n_chunk, tokens, data, nv })
    }

    /// Log-probs of scored position `i` (0 = position n_ctx/2) of `chunk`.
    pub fn log_probs(&self, chunk: usize, i: usize) -> (f32, f32, &[u16]) {
        let per = self.n_ctx - 1 - self.n_ctx / 2;
        let r = &self.data[(chunk * per + i) * self.nv..(chunk * per + i + 1) * self.nv];
        let f = |j: usize| f32::from_bits(r[j] as u32 | (r[j + 1] as u32) << 16);
        (f(0), f(2), &r[4..4 + self.n_vocab])
    }

    /// Accumulates one position, as llama.cpp's `--kl-divergence` does.
    pub(crate) fn compare(&self, chunk: usize, i: usize, logits: &[f32], target: usize, acc: &mut RefComparison) {
        let (scale, min_lp, q) = self.log_probs(chunk, i);
        let (mut mx, mut imax) = (f32::NEG_INFINITY, 0);
        for (j, &x) in logits.iter().enumerate() {
            if x > mx {
                mx = x;
                imax = j;
            }
        }
        let lse = mx as f64 + logits.iter().map(|&x| ((x - mx) as f64).exp()).sum::<f64>().ln();
        acc.nll += lse - logits[target] as f64;
        acc.nll_ref += -(scale as f64 * q[target] as f64 + min_lp as f64);
        let (mut kl, mut best, mut ibest) = (0f64, f32::NEG_INFINITY, 0);
        for (j, (&qq, &x)) in q.iter().zip(logits).enumerate() {
            let lp = scale * qq as f32 + min_lp;
            if lp > best {
                best = lp;
                ibest = j;
            }
            if lp > -16.0 {
                kl += (lp as f64).exp() * (lp as f64 - (x as f64 - lse));
            }
        }
        acc.kld += kl;
        acc.kld_max = acc.kld_max.max(kl);
        acc.same += (ibest == imax) as usize;
        acc.count += 1;
    }
}

impl RefComparison {
    pub(crate) fn finish(&mut self) {
        let n = self.count.max(1) as f64;
        self.ppl = (self.nll / n).exp();
        self.ppl_ref = (self.nll_ref / n).exp();
        self.kld /= n;
        self.top1 = self.same as f64 / n;
    }
}
