//! Tiny synthetic models written as GGUF files, and an independent
//! whole-sequence reference forward pass to check the harness's model against.
#![allow(dead_code)]

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Deterministic pseudo-random numbers in [-1, 1).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

#[derive(Clone, Debug)]
pub struct TinySpec {
    pub gemma: bool,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub window: usize,
    pub rope_base: f32,
    pub eps: f32,
    pub tied: bool,
}

impl TinySpec {
    pub fn gemma3() -> Self {
        Self {
            gemma: true,
            n_layers: 6,
            hidden: 64,
            n_head: 4,
            n_kv_head: 1,
            head_dim: 32,
            ffn: 96,
            window: 12,
            rope_base: 1_000_000.0,
            eps: 1e-6,
            tied: true,
        }
    }

    pub fn llama() -> Self {
        Self {
            gemma: false,
            n_layers: 3,
            hidden: 128,
            n_head: 4,
            n_kv_head: 2,
            head_dim: 32,
            ffn: 160,
            window: 0,
            rope_base: 10000.0,
            eps: 1e-5,
            tied: false,
        }
    }
}

/// Weights by GGUF tensor name, `[out, in]` row-major.
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A small SentencePiece-style vocabulary: control tokens, byte tokens and
/// pieces over lowercase letters, with scores favouring longer pieces.
pub fn spm_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut toks = vec!["<pad>".to_string(), "<eos>".into(), "<bos>".into(), "<unk>".into()];
    let mut types = vec![3, 3, 3, 2];
    for b in 0..256 {
        toks.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = [
        "\u{2581}",
        "a",
        "b",
        "c",
        "d",
        "e",
        "h",
        "i",
        "l",
        "n",
        "o",
        "r",
        "s",
        "t",
        "w",
        "\u{2581}t",
        "th",
        "\u{2581}th",
        "he",
        "\u{2581}the",
        "ll",
        "llo",
        "\u{2581}w",
        "or",
        "\u{2581}wor",
        "ld",
        "\u{2581}world",
        "\u{2581}he",
        "\u{2581}hello",
        "in",
        "\u{2581}a",
        "an",
        "\u{2581}an",
        "\u{2581}and",
    ];
    for p in pieces {
        toks.push(p.to_string());
        types.push(1);
    }
    toks.push("\n\n".into());
    types.push(4);
    let scores = toks
        .iter()
        .enumerate()
        .map(|(i, t)| if types[i] == 1 { t.chars().count() as f32 - i as f32 * 1e-3 } else { 0.0 })
        .collect();
    (toks, scores, types)
}

/// Writes a tiny model of `spec` to `path`, returning its weights.
pub fn write_tiny(spec: &TinySpec, path: &Path, seed: u64) -> Weights {
    let (toks, scores, types) = spm_vocab();
    let vocab = toks.len();
    let mut rng = Rng::new(seed);
    let mut w: Weights = BTreeMap::new();
    let (h, hd) = (spec.hidden, spec.head_dim);
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let v = rng.vec(n, scale).into_iter().map(|x| x + offset).collect();
        w.insert(name, (shape, v));
    };
    add("token_embd.weight".into(), vec![vocab, h], if spec.gemma { 0.2 } else { 1.0 }, 0.0, &mut rng);
    add("output_norm.weight".into(), vec![h], 0.2, 1.0, &mut rng);
    if !spec.tied {
        add("output.weight".into(), vec![vocab, h], 0.3, 0.0, &mut rng);
    }
    for l in 0..spec.n_layers {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        let s_in = 1.0 / (h as f32).sqrt();
        add(n("attn_norm"), vec![h], 0.2, 1.0, &mut rng);
        add(n("attn_q"), vec![spec.n_head * hd, h], 2.0 * s_in, 0.0, &mut rng);
        add(n("attn_k"), vec![spec.n_kv_head * hd, h], 2.0 * s_in, 0.0, &mut rng);
        add(n("attn_v"), vec![spec.n_kv_head * hd, h], s_in, 0.0, &mut rng);
        add(n("attn_output"), vec![h, spec.n_head * hd], 1.0 / ((spec.n_head * hd) as f32).sqrt(), 0.0, &mut rng);
        add(n("ffn_norm"), vec![h], 0.2, 1.0, &mut rng);
        add(n("ffn_gate"), vec![spec.ffn, h], s_in, 0.0, &mut rng);
        add(n("ffn_up"), vec![spec.ffn, h], s_in, 0.0, &mut rng);
        add(n("ffn_down"), vec![h, spec.ffn], 1.0 / (spec.ffn as f32).sqrt(), 0.0, &mut rng);
        if spec.gemma {
            add(n("attn_q_norm"), vec![hd], 0.2, 1.0, &mut rng);
            add(n("attn_k_norm"), vec![hd], 0.2, 1.0, &mut rng);
            add(n("post_attention_norm"), vec![h], 0.2, 1.0, &mut rng);
            add(n("post_ffw_norm"), vec![h], 0.2, 1.0, &mut rng);
        }
    }
    let arch = if spec.gemma { "gemma3" } else { "llama" };
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), Value::U32(spec.n_layers as u32)),
        (format!("{arch}.embedding_length"), Value::U32(h as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(spec.ffn as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(spec.n_head as u32)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(spec.n_kv_head as u32)),
        (format!("{arch}.attention.key_length"), Value::U32(hd as u32)),
        (format!("{arch}.attention.value_length"), Value::U32(hd as u32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(spec.eps)),
        (format!("{arch}.rope.freq_base"), Value::F32(spec.rope_base)),
        (format!("{arch}.context_length"), Value::U32(4096)),
        (format!("{arch}.rope.dimension_count"), Value::U32(hd as u32)),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(toks.iter().map(|t| Value::String(t.clone())).collect())),
        ("tokenizer.ggml.scores".into(), Value::Array(scores.iter().map(|&s| Value::F32(s)).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.iter().map(|&t| Value::I32(t)).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(3)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(!spec.gemma)),
    ];
    if spec.window > 0 {
        meta.push((format!("{arch}.attention.sliding_window"), Value::U32(spec.window as u32)));
    }
    let qts: Vec<(String, QTensor)> = w
        .iter()
        .map(|(name, (shape, data))| {
            let t = Tensor::from_slice(data, shape.as_slice(), &Device::Cpu).unwrap();
            (name.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let mut f = std::fs::File::create(path).unwrap();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
    w
}

fn get<'a>(w: &'a Weights, n: &str) -> &'a [f32] {
    &w.get(n).unwrap_or_else(|| panic!("{n}")).1
}

fn matvec(m: &[f32], x: &[f32], n_out: usize) -> Vec<f32> {
    let n_in = x.len();
    (0..n_out).map(|o| (0..n_in).map(|i| m[o * n_in + i] as f64 * x[i] as f64).sum::<f64>() as f32).collect()
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps as f64).sqrt();
    x.iter().zip(w).map(|(v, g)| (*v as f64 * r * *g as f64) as f32).collect()
}

/// Rotates one head: NeoX halves for Gemma, adjacent pairs for Llama.
fn rope_head(v: &mut [f32], pos: usize, base: f64, neox: bool) {
    let d = v.len();
    for i in 0..d / 2 {
        let theta = pos as f64 / base.powf(2.0 * i as f64 / d as f64);
        let (s, c) = theta.sin_cos();
        let (a, b) = if neox { (i, i + d / 2) } else { (2 * i, 2 * i + 1) };
        let (x0, x1) = (v[a] as f64, v[b] as f64);
        v[a] = (x0 * c - x1 * s) as f32;
        v[b] = (x0 * s + x1 * c) as f32;
    }
}

/// Logits at every position of `tokens`, computed over the whole sequence at once.
pub fn reference_logits(spec: &TinySpec, w: &Weights, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (h, hd, nh, nkv) = (spec.hidden, spec.head_dim, spec.n_head, spec.n_kv_head);
    let emb = get(w, "token_embd.weight");
    let n = tokens.len();
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| {
            let row = &emb[t as usize * h..(t as usize + 1) * h];
            let s = if spec.gemma { (h as f32).sqrt() } else { 1.0 };
            row.iter().map(|v| v * s).collect()
        })
        .collect();
    for l in 0..spec.n_layers {
        let g = |s: &str| get(w, &format!("blk.{l}.{s}.weight"));
        // Gemma 3: every 6th layer is global, the others use the window and base 10000.
        let swa = spec.window > 0 && (!spec.gemma || (l + 1) % 6 != 0);
        let base = if spec.gemma && swa { 10000.0 } else { spec.rope_base as f64 };
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (p, x) in xs.iter().enumerate() {
            let c = rmsnorm(x, g("attn_norm"), spec.eps);
            let mut q = matvec(g("attn_q"), &c, nh * hd);
            let mut k = matvec(g("attn_k"), &c, nkv * hd);
            let v = matvec(g("attn_v"), &c, nkv * hd);
            for hh in 0..nh {
                let head = &mut q[hh * hd..(hh + 1) * hd];
                if spec.gemma {
                    let nq = rmsnorm(head, g("attn_q_norm"), spec.eps);
                    head.copy_from_slice(&nq);
                }
                rope_head(head, p, base, spec.gemma);
            }
            for hh in 0..nkv {
                let head = &mut k[hh * hd..(hh + 1) * hd];
                if spec.gemma {
                    let nk = rmsnorm(head, g("attn_k_norm"), spec.eps);
                    head.copy_from_slice(&nk);
                }
                rope_head(head, p, base, spec.gemma);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let scale = 1.0 / (hd as f64).sqrt();
        for p in 0..n {
            let mut att = vec![0f32; nh * hd];
            for hh in 0..nh {
                let kh = hh / (nh / nkv);
                let lo = if swa { (p + 1).saturating_sub(spec.window) } else { 0 };
                let sc: Vec<f64> = (lo..=p)
                    .map(|j| {
                        (0..hd).map(|d| qs[p][hh * hd + d] as f64 * ks[j][kh * hd + d] as f64).sum::<f64>() * scale
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let den: f64 = sc.iter().map(|s| (s - mx).exp()).sum();
                for (jj, j) in (lo..=p).enumerate() {
                    let wgt = (sc[jj] - mx).exp() / den;
                    for d in 0..hd {
                        att[hh * hd + d] += (wgt * vs[j][kh * hd + d] as f64) as f32;
                    }
                }
            }
            let mut o = matvec(g("attn_output"), &att, h);
            if spec.gemma {
                o = rmsnorm(&o, g("post_attention_norm"), spec.eps);
            }
            let x1: Vec<f32> = xs[p].iter().zip(&o).map(|(a, b)| a + b).collect();
            let c = rmsnorm(&x1, g("ffn_norm"), spec.eps);
            let gate = matvec(g("ffn_gate"), &c, spec.ffn);
            let up = matvec(g("ffn_up"), &c, spec.ffn);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(&a, &b)| {
                    let a = a as f64;
                    let f = if spec.gemma {
                        0.5 * a * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (a + 0.044715 * a * a * a)).tanh())
                    } else {
                        a / (1.0 + (-a).exp())
                    };
                    (f * b as f64) as f32
                })
                .collect();
            let mut d = matvec(g("ffn_down"), &act, h);
            if spec.gemma {
                d = rmsnorm(&d, g("post_ffw_norm"), spec.eps);
            }
            xs[p] = x1.iter().zip(&d).map(|(a, b)| a + b).collect();
        }
    }
    let out = if spec.tied { get(w, "token_embd.weight") } else { get(w, "output.weight") };
    let vocab = out.len() / h;
    xs.iter().map(|x| matvec(out, &rmsnorm(x, get(w, "output_norm.weight"), spec.eps), vocab)).collect()
}
