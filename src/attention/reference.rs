//! Reference attention for tests: the cache dequantized exactly, then textbook attention in f64.

use super::AttnOptions;
use crate::error::{Error, Result};

/// What a cache holds for one (layer, sequence), dequantized exactly (f16 scale and zero times
/// the code, in f64). Row-major `[position][kv head][channel]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dequantized {
    pub len: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub keys: Vec<f64>,
    pub values: Vec<f64>,
}

impl Dequantized {
    /// Key of position `pos`, head `h`, channel `c`.
    pub fn key(&self, pos: usize, h: usize, c: usize) -> f64 {
        self.keys[(pos * self.n_kv_heads + h) * self.head_dim + c]
    }

    /// Value of position `pos`, head `h`, channel `c`.
    pub fn value(&self, pos: usize, h: usize, c: usize) -> f64 {
        self.values[(pos * self.n_kv_heads + h) * self.head_dim + c]
    }
}

/// Textbook attention: the `past` tokens followed by a `chunk` of exact keys and values (rows of
/// `n_kv_heads * head_dim`, possibly empty), for queries (rows of `n_q_heads * head_dim`) at
/// positions `q_pos0..`. Returns rows of `n_q_heads * head_dim` in f64.
pub fn attention(
    past: &Dequantized,
    chunk_keys: &[f32],
    chunk_values: &[f32],
    queries: &[f32],
    n_q_heads: usize,
    q_pos0: usize,
    opts: &AttnOptions,
) -> Result<Vec<f64>> {
    let (nkv, hd) = (past.n_kv_heads, past.head_dim);
    let row = nkv * hd;
    if chunk_keys.len() % row != 0 || chunk_keys.len() != chunk_values.len() {
        return Err(Error::InvalidArgument("chunk keys and values must be whole, equal rows".into()));
    }
    if n_q_heads == 0 || n_q_heads % nkv != 0 || queries.len() % (n_q_heads * hd) != 0 {
        return Err(Error::InvalidArgument(format!("{n_q_heads} query heads do not fit {nkv} kv heads")));
    }
    let o = opts.resolve(hd)?;
    let total = past.len + chunk_keys.len() / row;
    let k = |p: usize, h: usize, c: usize| {
        if p < past.len {
            past.key(p, h, c)
        } else {
            chunk_keys[(p - past.len) * row + h * hd + c] as f64
        }
    };
    let v = |p: usize, h: usize, c: usize| {
        if p < past.len {
            past.value(p, h, c)
        } else {
            chunk_values[(p - past.len) * row + h * hd + c] as f64
        }
    };
    let nrows = queries.len() / (n_q_heads * hd);
    let mut out = vec![0f64; queries.len()];
    for i in 0..nrows {
        let qpos = q_pos0 + i;
        for qh in 0..n_q_heads {
            let h = qh / (n_q_heads / nkv);
            let q = &queries[(i * n_q_heads + qh) * hd..(i * n_q_heads + qh + 1) * hd];
            let mut logits = Vec::new();
            for p in 0..total {
                let visible = (!o.causal || p <= qpos) && (o.window == 0 || p + o.window > qpos);
                if visible {
                    let dot: f64 = (0..hd).map(|c| q[c] as f64 * k(p, h, c)).sum();
                    let mut x = dot * o.scale as f64;
                    if o.softcap > 0.0 {
                        let cap = o.softcap as f64;
                        x = cap * (x / cap).tanh();
                    }
                    logits.push((p, x));
                }
            }
            let m = logits.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|x| (x.1 - m).exp()).sum();
            let o_row = &mut out[(i * n_q_heads + qh) * hd..(i * n_q_heads + qh + 1) * hd];
            for &(p, x) in &logits {
                let w = (x - m).exp() / z;
                for (c, oc) in o_row.iter_mut().enumerate() {
                    *oc += w * v(p, h, c);
                }
            }
        }
    }
    Ok(out)
}
