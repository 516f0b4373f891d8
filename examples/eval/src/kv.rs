//! The KV store the forward pass talks to: a trait with the two calls the
//! model needs (append keys/values, append and attend), an exact reference
//! implementation in plain loops, and the kivi-backed implementation.

use crate::gguf::Result;

/// Shape and options of one layer's attention.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Multiplies q·k.
    pub scale: f32,
    /// A query at position p sees keys at positions p-window+1..=p; 0 = unlimited.
    pub window: usize,
}

/// A per-layer, per-sequence key/value store with causal attention.
/// Keys arrive after RoPE. Row layouts: keys/values `n_kv_head*head_dim` per
/// token, queries/outputs `n_head*head_dim` per token.
pub trait KvStore: Send {
    /// Appends `n` tokens of keys/values to `seq` at `layer`, then computes
    /// causal attention of the `n` queries (the new tokens, in order) over
    /// everything stored for `seq` at `layer`.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;

    /// One decode step for several sequences: row `i` of `k`, `v`, `q`, `out`
    /// belongs to `seqs[i]` (distinct ids), as `append_attend` with one token each.
    #[allow(clippy::too_many_arguments)]
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
        let kvw = p.n_kv_head * p.head_dim;
        let qw = p.n_head * p.head_dim;
        for (i, &s) in seqs.iter().enumerate() {
            self.append_attend(
                layer,
                s,
                &k[i * kvw..(i + 1) * kvw],
                &v[i * kvw..(i + 1) * kvw],
                &q[i * qw..(i + 1) * qw],
                &mut out[i * qw..(i + 1) * qw],
                1,
                p,
            )?;
        }
        Ok(())
    }

    /// Appends without attending.
    fn append(&mut self, layer: usize, seq: u32, k: &[f32], v: &[f32], n: usize) -> Result<()>;

    /// Forgets everything stored for `seq`.
    fn remove_seq(&mut self, seq: u32) -> Result<()>;

    /// Bytes the store holds right now (keys and values, all layers/sequences).
    fn kv_bytes(&self) -> usize;
}

/// Exact attention over f32 keys/values, written as plainly as possible; the
/// reference the tests compare against.
pub struct NaiveStore {
    n_layers: usize,
    // [layer][seq] -> flat rows
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
}

impl NaiveStore {
    pub fn new(n_layers: usize, max_seqs: usize) -> Self {
        Self { n_layers, k: vec![vec![Vec::new(); max_seqs]; n_layers], v: vec![vec![Vec::new(); max_seqs]; n_layers] }
    }
}

/// Causal attention of `n` queries (the last `n` positions) over `keys`/`vals`
/// holding `total` tokens.
#[allow(clippy::too_many_arguments)]
pub fn naive_attention(keys: &[f32], vals: &[f32], total: usize, q: &[f32], out: &mut [f32], n: usize, p: &AttnParams) {
    let hd = p.head_dim;
    let kvw = p.n_kv_head * hd;
    let qw = p.n_head * hd;
    let group = p.n_head / p.n_kv_head;
    let mut scores = vec![0f32; total];
    for i in 0..n {
        let pos = total - n + i;
        let lo = if p.window > 0 { (pos + 1).saturating_sub(p.window) } else { 0 };
        for h in 0..p.n_head {
            let kh = h / group;
            let qv = &q[i * qw + h * hd..i * qw + (h + 1) * hd];
            let mut mx = f32::NEG_INFINITY;
            for j in lo..=pos {
                let kr = &keys[j * kvw + kh * hd..j * kvw + (kh + 1) * hd];
                let s: f32 = qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * p.scale;
                scores[j] = s;
                mx = mx.max(s);
            }
            let mut den = 0f32;
            for s in &mut scores[lo..=pos] {
                *s = (*s - mx).exp();
                den += *s;
            }
            let o = &mut out[i * qw + h * hd..i * qw + (h + 1) * hd];
            o.fill(0.0);
            for j in lo..=pos {
                let w = scores[j] / den;
                let vr = &vals[j * kvw + kh * hd..j * kvw + (kh + 1) * hd];
                for (a, b) in o.iter_mut().zip(vr) {
                    *a += w * b;
                }
            }
        }
    }
}

impl KvStore for NaiveStore {
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
        self.append(layer, seq, k, v, n)?;
        let keys = &self.k[layer][seq as usize];
        let vals = &self.v[layer][seq as usize];
        let total = keys.len() / (p.n_kv_head * p.head_dim);
        naive_attention(keys, vals, total, q, out, n, p);
        Ok(())
    }

    fn append(&mut self, layer: usize, seq: u32, k: &[f32], v: &[f32], _n: usize) -> Result<()> {
        if layer >= self.n_layers || seq as usize >= self.k[layer].len() {
            return Err(format!("naive store: layer {layer} / seq {seq} out of range").into());
        }
        self.k[layer][seq as usize].extend_from_slice(k);
        self.v[layer][seq as usize].extend_from_slice(v);
        Ok(())
    }

    fn remove_seq(&mut self, seq: u32) -> Result<()> {
        for l in 0..self.n_layers {
            self.k[l][seq as usize].clear();
            self.v[l][seq as usize].clear();
        }
        Ok(())
    }

    fn kv_bytes(&self) -> usize {
        let mut n = 0;
        for l in 0..self.n_layers {
            for s in 0..self.k[l].len() {
                n += (self.k[l][s].len() + self.v[l][s].len()) * 4;
            }
        }
        n
    }
}
