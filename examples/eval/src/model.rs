//! The transformer forward pass for Gemma 3 and Llama-family GGUF models.
//! Weights are dequantized to f32 at load time and multiplied with batched
//! GEMMs (candle-core), so one weight read serves every row of a step.
//! Attention is delegated to a caller-supplied function: the model computes
//! post-RoPE queries/keys and values, the caller decides which KV store sees them.

use crate::gguf::{Gguf, Result};
use crate::kv::AttnParams;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Gemma 3: QK-norm, sandwich norms, GELU FFN, scaled embeddings,
    /// interleaved sliding-window and global layers, NeoX RoPE.
    Gemma3,
    /// Llama 2/3, Mistral: pre-norm, SiLU-gated FFN, interleaved-pair RoPE.
    Llama,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub eps: f32,
    /// RoPE base of global (full-attention) layers.
    pub rope_base: f32,
    /// RoPE base of sliding-window layers.
    pub rope_base_swa: f32,
    /// Position multiplier of global layers (1/linear scaling factor).
    pub rope_scale: f32,
    /// Sliding window (0 = none).
    pub sliding_window: usize,
    /// Every `swa_pattern`-th layer is global (Gemma 3: 6); 0 = every layer
    /// uses the window (Mistral).
    pub swa_pattern: usize,
    pub attn_scale: f32,
}

impl ModelConfig {
    pub fn is_swa(&self, layer: usize) -> bool {
        self.sliding_window > 0 && (self.swa_pattern == 0 || !(layer + 1).is_multiple_of(self.swa_pattern))
    }

    pub fn attn_params(&self, layer: usize) -> AttnParams {
        AttnParams {
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            scale: self.attn_scale,
            window: if self.is_swa(layer) { self.sliding_window } else { 0 },
        }
    }
}

/// A dense f32 weight `[n_out, n_in]`, applied as `x · Wᵀ`.
pub struct Linear {
    wt: Tensor,
    pub n_out: usize,
    pub n_in: usize,
}

impl Linear {
    pub fn from_tensor(w: Tensor) -> Result<Self> {
        let (n_out, n_in) = w.dims2()?;
        Ok(Self { wt: w.t()?, n_out, n_in })
    }

    /// `x`: `m` rows of `n_in`; returns `m` rows of `n_out`.
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        debug_assert_eq!(x.len(), m * self.n_in);
        let xt = Tensor::from_slice(x, (m, self.n_in), &Device::Cpu)?;
        Ok(xt.matmul(&self.wt)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

pub struct Layer {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<Vec<f32>>,
}

pub struct Model {
    pub cfg: ModelConfig,
    embed: Tensor,
    output: Linear,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// Per-dimension RoPE frequency divisors (Llama 3.1 `rope_freqs`).
    rope_freqs: Option<Vec<f32>>,
}

impl Model {
    pub fn load(g: &mut Gguf) -> Result<Self> {
        let arch_name = g.string("general.architecture")?.to_string();
        let arch = match arch_name.as_str() {
            "gemma3" => Arch::Gemma3,
            "llama" | "mistral" => Arch::Llama,
            other => return Err(format!("unsupported architecture `{other}`").into()),
        };
        let a = arch_name.as_str();
        let key = |k: &str| format!("{a}.{k}");
        let n_layers = g.u32(&key("block_count"))? as usize;
        let hidden = g.u32(&key("embedding_length"))? as usize;
        let n_head = g.u32(&key("attention.head_count"))? as usize;
        let n_kv_head = g.u32_or(&key("attention.head_count_kv"), n_head as u32) as usize;
        let head_dim = g.u32_or(&key("attention.key_length"), (hidden / n_head) as u32) as usize;
        let ffn = g.u32(&key("feed_forward_length"))? as usize;
        let vocab = g.shape("token_embd.weight")?[0];
        let eps = g.f32_or(&key("attention.layer_norm_rms_epsilon"), 1e-5);
        let rope_base = g.f32_or(&key("rope.freq_base"), 10000.0);
        let scaling = g.f32_or(&key("rope.scaling.factor"), 1.0);
        let rope_scale = if scaling > 0.0 { 1.0 / scaling } else { 1.0 };
        let (sliding_window, swa_pattern, rope_base_swa, attn_scale) = match arch {
            Arch::Gemma3 => (
                g.u32_or(&key("attention.sliding_window"), 0) as usize,
                g.u32_or(&key("attention.sliding_window_pattern"), 6) as usize,
                g.f32_or(&key("rope.freq_base_swa"), 10000.0),
                // query_pre_attn_scalar = head_dim for the released Gemma 3 sizes but 27B
                if n_layers == 62 { 1.0 / ((hidden / n_head) as f32).sqrt() } else { 1.0 / (head_dim as f32).sqrt() },
            ),
            Arch::Llama => {
                // Mistral's sliding window is all layers; 0 or absent means none.
                let w = g.u32_or(&key("attention.sliding_window"), 0) as usize;
                (w, 0, rope_base, 1.0 / (head_dim as f32).sqrt())
            }
        };
        let cfg = ModelConfig {
            arch,
            n_layers,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            ffn,
            vocab,
            eps,
            rope_base,
            rope_base_swa,
            rope_scale,
            sliding_window,
            swa_pattern,
            attn_scale,
        };
        let embed = g.tensor_f32("token_embd.weight")?;
        let output = if g.has_tensor("output.weight") {
            Linear::from_tensor(g.tensor_f32("output.weight")?)?
        } else {
            Linear::from_tensor(embed.clone())?
        };
        let output_norm = g.vec_f32("output_norm.weight")?;
        let rope_freqs = if g.has_tensor("rope_freqs.weight") { Some(g.vec_f32("rope_freqs.weight")?) } else { None };
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            let lin = |g: &mut Gguf, s: &str| -> Result<Linear> { Linear::from_tensor(g.tensor_f32(&n(s))?) };
            let opt = |g: &mut Gguf, s: &str| -> Result<Option<Vec<f32>>> {
                if g.has_tensor(&n(s)) {
                    Ok(Some(g.vec_f32(&n(s))?))
                } else {
                    Ok(None)
                }
            };
            layers.push(Layer {
                attn_norm: g.vec_f32(&n("attn_norm"))?,
                wq: lin(g, "attn_q")?,
                wk: lin(g, "attn_k")?,
                wv: lin(g, "attn_v")?,
                wo: lin(g, "attn_output")?,
                q_norm: opt(g, "attn_q_norm")?,
                k_norm: opt(g, "attn_k_norm")?,
                post_attn_norm: opt(g, "post_attention_norm")?,
                ffn_norm: g.vec_f32(&n("ffn_norm"))?,
                gate: lin(g, "ffn_gate")?,
                up: lin(g, "ffn_up")?,
                down: lin(g, "ffn_down")?,
                post_ffn_norm: opt(g, "post_ffw_norm")?,
            });
        }
        Ok(Self { cfg, embed, output, output_norm, layers, rope_freqs })
    }

    /// Embeds `tokens` (scaled by sqrt(hidden) for Gemma).
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let ids = Tensor::from_slice(tokens, tokens.len(), &Device::Cpu)?;
        let mut x = self.embed.index_select(&ids, 0)?.flatten_all()?.to_vec1::<f32>()?;
        if self.cfg.arch == Arch::Gemma3 {
            let s = (self.cfg.hidden as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= s);
        }
        Ok(x)
    }

    /// Runs the stack on `tokens` at `positions` (one row each). For every
    /// layer, `attend(layer, params, q, k, v, out)` receives post-RoPE queries
    /// and keys and the values of all rows and must fill `out`. Returns the
    /// final-normed hidden states (`rows × hidden`).
    pub fn forward_hidden<F>(&self, tokens: &[u32], positions: &[usize], mut attend: F) -> Result<Vec<f32>>
    where
        F: FnMut(usize, &AttnParams, &[f32], &[f32], &[f32], &mut [f32]) -> Result<()>,
    {
        let c = &self.cfg;
        let m = tokens.len();
        assert_eq!(positions.len(), m);
        let h = c.hidden;
        let hd = c.head_dim;
        let gemma = c.arch == Arch::Gemma3;
        let mut x = self.embed(tokens)?;
        let mut attn_out = vec![0f32; m * c.n_head * hd];
        for (l, layer) in self.layers.iter().enumerate() {
            let cur = rms_norm_rows(&x, h, &layer.attn_norm, c.eps);
            let mut q = layer.wq.forward(&cur, m)?;
            let mut k = layer.wk.forward(&cur, m)?;
            let v = layer.wv.forward(&cur, m)?;
            if let Some(w) = &layer.q_norm {
                rms_norm_inplace(&mut q, hd, w, c.eps);
            }
            if let Some(w) = &layer.k_norm {
                rms_norm_inplace(&mut k, hd, w, c.eps);
            }
            let swa = c.is_swa(l);
            let (base, scale) = if swa { (c.rope_base_swa, 1.0) } else { (c.rope_base, c.rope_scale) };
            let rope = Rope { head_dim: hd, base, scale, neox: gemma, freqs: self.rope_freqs.as_deref() };
            rope.apply(&mut q, c.n_head, positions);
            rope.apply(&mut k, c.n_kv_head, positions);
            let params = c.attn_params(l);
            attend(l, &params, &q, &k, &v, &mut attn_out)?;
            let mut o = layer.wo.forward(&attn_out, m)?;
            if let Some(w) = &layer.post_attn_norm {
                rms_norm_inplace(&mut o, h, w, c.eps);
            }
            add_inplace(&mut x, &o);
            let cur = rms_norm_rows(&x, h, &layer.ffn_norm, c.eps);
            let mut g = layer.gate.forward(&cur, m)?;
            let u = layer.up.forward(&cur, m)?;
            g.par_chunks_mut(4096).zip(u.par_chunks(4096)).for_each(|(g, u)| {
                for (a, b) in g.iter_mut().zip(u) {
                    *a = if gemma { gelu(*a) } else { silu(*a) } * b;
                }
            });
            let mut d = layer.down.forward(&g, m)?;
            if let Some(w) = &layer.post_ffn_norm {
                rms_norm_inplace(&mut d, h, w, c.eps);
            }
            add_inplace(&mut x, &d);
        }
        Ok(rms_norm_rows(&x, h, &self.output_norm, c.eps))
    }

    /// Output projection of final hidden states: `rows × vocab` logits.
    pub fn logits(&self, hidden: &[f32], m: usize) -> Result<Vec<f32>> {
        self.output.forward(hidden, m)
    }

    pub fn forward<F>(&self, tokens: &[u32], positions: &[usize], attend: F) -> Result<Vec<f32>>
    where
        F: FnMut(usize, &AttnParams, &[f32], &[f32], &[f32], &mut [f32]) -> Result<()>,
    {
        let hid = self.forward_hidden(tokens, positions, attend)?;
        self.logits(&hid, tokens.len())
    }
}

fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

pub fn rms_norm_inplace(x: &mut [f32], n: usize, w: &[f32], eps: f32) {
    for row in x.chunks_mut(n) {
        let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w.iter().cycle()) {
            *v = *v * r * g;
        }
    }
}

fn rms_norm_rows(x: &[f32], n: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let mut y = x.to_vec();
    rms_norm_inplace(&mut y, n, w, eps);
    y
}

/// GELU, tanh approximation (as Gemma and llama.cpp use it).
pub fn gelu(x: f32) -> f32 {
    const S: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (S * x * (1.0 + 0.044715 * x * x)).tanh())
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Rotary position embedding. `neox`: rotate pairs (i, i+d/2); otherwise
/// adjacent pairs (2i, 2i+1) as llama.cpp stores Llama weights.
pub struct Rope<'a> {
    pub head_dim: usize,
    pub base: f32,
    pub scale: f32,
    pub neox: bool,
    pub freqs: Option<&'a [f32]>,
}

impl Rope<'_> {
    pub fn apply(&self, x: &mut [f32], n_heads: usize, positions: &[usize]) {
        let hd = self.head_dim;
        let half = hd / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| {
                let f = (self.base as f64).powf(-2.0 * i as f64 / hd as f64);
                f / self.freqs.map_or(1.0, |ff| ff[i] as f64)
            })
            .collect();
        for (r, &pos) in positions.iter().enumerate() {
            let p = pos as f64 * self.scale as f64;
            let cs: Vec<(f32, f32)> = inv
                .iter()
                .map(|f| {
                    let t = p * f;
                    (t.cos() as f32, t.sin() as f32)
                })
                .collect();
            for hh in 0..n_heads {
                let v = &mut x[(r * n_heads + hh) * hd..(r * n_heads + hh + 1) * hd];
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (a, b) = if self.neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                    let (x0, x1) = (v[a], v[b]);
                    v[a] = x0 * c - x1 * s;
                    v[b] = x0 * s + x1 * c;
                }
            }
        }
    }
}
