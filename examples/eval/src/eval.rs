//! The evaluation protocol (llama.cpp's perplexity protocol, split into a
//! prefill half and a decoded half):
//!
//! - the token stream is cut into non-overlapping windows of `ctx` tokens,
//!   the first token of each set to BOS;
//! - the first half of each window is prefilled as one chunk. It attends only
//!   to itself at full precision, so its hidden states and keys/values are the
//!   same for every configuration: it runs once, with attention computed by
//!   the exact configuration's cache, and its keys/values are appended to
//!   every other configuration's cache;
//! - the second half is decoded one token at a time, every configuration and
//!   every window in lockstep: one step is a single batch of
//!   `configs × windows` rows through the model, so each weight matrix is
//!   read once per step for all of them; each row attends through its own
//!   configuration's cache;
//! - each decoded position's next-token distribution is scored: negative log
//!   likelihood of the true next token, KL divergence from the exact
//!   configuration's distribution for the same row, and top-1 agreement.

use crate::gguf::Result;
use crate::kv::KvStore;
use crate::llama_ref::{RefComparison, RefLogProbs};
use crate::model::Model;
use rayon::prelude::*;
use std::time::Instant;

/// One cache configuration under test.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheSpec {
    pub name: String,
    /// 0 = no quantization.
    pub key_bits: u8,
    pub value_bits: u8,
    pub group: usize,
    pub residual: usize,
    /// Keys quantized per token (the paper's baseline) instead of per channel.
    pub per_token_keys: bool,
    /// Values rounded min/max (the paper's) instead of by least squares (kivi's default).
    pub min_max_values: bool,
    /// The first tokens of each sequence kept at full precision (attention sinks); the library's
    /// default unless the name says `-s<n>`.
    pub sinks: usize,
}

/// The library's default number of sink tokens (what `kivi<bits>` means).
pub fn default_sinks() -> usize {
    kivi::CacheConfig::new(1, 1, 128).sinks as usize
}

impl CacheSpec {
    pub fn exact() -> Self {
        Self {
            name: "exact".into(),
            key_bits: 0,
            value_bits: 0,
            group: 32,
            residual: 0,
            per_token_keys: false,
            min_max_values: false,
            sinks: 0,
        }
    }

    pub fn kivi(bits: u8, residual: usize) -> Self {
        Self {
            name: String::new(),
            key_bits: bits,
            value_bits: bits,
            group: 32,
            residual,
            per_token_keys: false,
            min_max_values: false,
            sinks: default_sinks(),
        }
        .relabeled()
    }

    pub fn per_token(bits: u8) -> Self {
        Self {
            name: String::new(),
            key_bits: bits,
            value_bits: bits,
            group: 32,
            residual: 128,
            per_token_keys: true,
            min_max_values: false,
            sinks: default_sinks(),
        }
        .relabeled()
    }

    pub fn is_exact(&self) -> bool {
        self.key_bits == 0
    }

    /// The default set: exact, KIVI-8/4/2 (G=32, R=128, the library's defaults), KIVI-4/2
    /// without the sink token, with the paper's min/max values, and both (the paper's method),
    /// KIVI-2 with R=0, and per-token-key baselines at 4 and 2 bits.
    pub fn defaults() -> Vec<Self> {
        let no_sink = |mut c: Self| {
            c.sinks = 0;
            c.relabeled()
        };
        let mm = |mut c: Self| {
            c.min_max_values = true;
            c.relabeled()
        };
        vec![
            Self::exact(),
            Self::kivi(8, 128),
            Self::kivi(4, 128),
            no_sink(Self::kivi(4, 128)),
            mm(Self::kivi(4, 128)),
            no_sink(mm(Self::kivi(4, 128))),
            Self::kivi(2, 128),
            no_sink(Self::kivi(2, 128)),
            mm(Self::kivi(2, 128)),
            no_sink(mm(Self::kivi(2, 128))),
            Self::kivi(2, 0),
            Self::per_token(4),
            Self::per_token(2),
        ]
    }

    /// The spec named as [`CacheSpec::parse`] reads it:
    /// `kivi<bits>[-r<residual>][-s<sinks>][-mm]` (`ktok` for per-token keys), each part only
    /// where it differs from the default.
    fn relabeled(mut self) -> Self {
        let mut n = format!("{}{}", if self.per_token_keys { "ktok" } else { "kivi" }, self.key_bits);
        if self.residual != 128 {
            n += &format!("-r{}", self.residual);
        }
        if self.sinks != default_sinks() {
            n += &format!("-s{}", self.sinks);
        }
        if self.min_max_values {
            n += "-mm";
        }
        self.name = n;
        self
    }

    /// Parses a name as printed by this tool (`exact`, `kivi2`, `kivi2-r0`, `kivi2-mm`, `ktok4`,
    /// `kivi2-s4`, ...): `kivi<bits>[-r<residual>][-s<sinks>][-mm]` or the same with `ktok`.
    pub fn parse(s: &str) -> Result<Self> {
        if s == "exact" {
            return Ok(Self::exact());
        }
        let (rest, min_max_values) = match s.strip_suffix("-mm") {
            Some(r) => (r, true),
            None => (s, false),
        };
        let (rest, sinks) = match rest.split_once("-s") {
            Some((b, n)) => (b, n.parse::<usize>().map_err(|_| format!("bad sink count in `{s}`"))?),
            None => (rest, default_sinks()),
        };
        let (body, residual) = match rest.split_once("-r") {
            Some((b, r)) => (b, r.parse::<usize>().map_err(|_| format!("bad residual in `{s}`"))?),
            None => (rest, 128),
        };
        let (per_token, bits) = if let Some(b) = body.strip_prefix("kivi") {
            (false, b)
        } else if let Some(b) = body.strip_prefix("ktok") {
            (true, b)
        } else {
            return Err(format!("unknown configuration `{s}`").into());
        };
        let bits: u8 = bits.parse().map_err(|_| format!("bad bit width in `{s}`"))?;
        if ![2, 4, 8].contains(&bits) {
            return Err(format!("bit width must be 2, 4 or 8 in `{s}`").into());
        }
        let mut c = if per_token { Self::per_token(bits) } else { Self::kivi(bits, residual) };
        c.residual = residual;
        c.sinks = sinks;
        c.min_max_values = min_max_values;
        c.name = s.to_string();
        Ok(c)
    }
}

#[derive(Clone, Debug, Default)]
pub struct ConfigResult {
    pub name: String,
    pub bits_per_element: f64,
    pub ppl: f64,
    pub ppl_ratio: f64,
    pub kld: f64,
    pub top1: f64,
    pub kv_bytes: usize,
    pub nll_sum: f64,
    pub count: usize,
}

pub struct EvalOptions {
    pub ctx: usize,
    pub chunks: usize,
    pub progress: bool,
}

/// Cuts `tokens` into windows as llama.cpp's perplexity tool does.
pub fn windows(tokens: &[u32], ctx: usize, chunks: usize, bos: Option<u32>) -> Result<Vec<Vec<u32>>> {
    if ctx < 4 || !ctx.is_multiple_of(2) {
        return Err("ctx must be even and at least 4".into());
    }
    let n = (tokens.len() / ctx).min(chunks);
    if n == 0 {
        return Err(format!("text has {} tokens, fewer than one window of {ctx}", tokens.len()).into());
    }
    Ok((0..n)
        .map(|i| {
            let mut w = tokens[i * ctx..(i + 1) * ctx].to_vec();
            if let Some(b) = bos {
                w[0] = b;
            }
            w
        })
        .collect())
}

/// Runs the protocol. `stores[0]` must be the exact configuration; `specs`
/// names each store. Every store must hold at least `windows.len()`
/// sequences of `ctx` tokens.
pub fn evaluate(
    model: &Model,
    windows: &[Vec<u32>],
    specs: &[CacheSpec],
    stores: &mut [Box<dyn KvStore>],
    opts: &EvalOptions,
) -> Result<Vec<ConfigResult>> {
    Ok(evaluate_against(model, windows, specs, stores, opts, None)?.0)
}

/// [`evaluate`], also comparing the exact configuration's distributions with
/// llama.cpp's saved log-probs for the same windows.
pub fn evaluate_against(
    model: &Model,
    windows: &[Vec<u32>],
    specs: &[CacheSpec],
    stores: &mut [Box<dyn KvStore>],
    opts: &EvalOptions,
    reference: Option<&RefLogProbs>,
) -> Result<(Vec<ConfigResult>, Option<RefComparison>)> {
    assert_eq!(specs.len(), stores.len());
    if !specs[0].is_exact() {
        return Err("the first configuration must be the exact cache".into());
    }
    let ctx = opts.ctx;
    let first = ctx / 2;
    let nw = windows.len();
    let nc = stores.len();
    let cfg = &model.cfg;
    let qw = cfg.n_head * cfg.head_dim;
    let kvw = cfg.n_kv_head * cfg.head_dim;
    let vocab = cfg.vocab;
    let t0 = Instant::now();
    let mut cmp = RefComparison::default();
    if let Some(r) = reference {
        if r.n_ctx != ctx || r.n_vocab != vocab || r.n_chunk < nw {
            return Err(format!(
                "reference has ctx {} vocab {} chunks {}; this run: ctx {ctx} vocab {vocab} windows {nw}",
                r.n_ctx, r.n_vocab, r.n_chunk
            )
            .into());
        }
        for (w, win) in windows.iter().enumerate() {
            cmp.token_mismatches += (1..ctx).filter(|&j| r.tokens[w * ctx + j] != win[j]).count();
        }
    }

    // Prefill: once per window, attention through the exact cache.
    for (w, win) in windows.iter().enumerate() {
        let pos: Vec<usize> = (0..first).collect();
        let seq = w as u32;
        model.forward_hidden(&win[..first], &pos, |l, p, q, k, v, out| {
            let (exact, rest) = stores.split_first_mut().unwrap();
            exact.append_attend(l, seq, k, v, q, out, first, p)?;
            rest.par_iter_mut().try_for_each(|s| s.append(l, seq, k, v, first))
        })?;
        if opts.progress {
            eprintln!("[prefill] window {}/{} ({} tokens) {:.1}s", w + 1, nw, first, t0.elapsed().as_secs_f64());
        }
    }

    // Decode in lockstep: row r = c * nw + w.
    let rows = nc * nw;
    let mut nll = vec![0f64; nc];
    let mut kld = vec![0f64; nc];
    let mut agree = vec![0usize; nc];
    let mut count = 0usize;
    let steps = ctx - 1 - first;
    let td = Instant::now();
    let seqs: Vec<u32> = (0..nw as u32).collect();
    for (si, t) in (first..ctx - 1).enumerate() {
        let toks: Vec<u32> = (0..rows).map(|r| windows[r % nw][t]).collect();
        let pos = vec![t; rows];
        let hidden = model.forward_hidden(&toks, &pos, |l, p, q, k, v, out| {
            stores.par_iter_mut().zip(out.par_chunks_mut(nw * qw)).enumerate().try_for_each(
                |(c, (s, out_c))| -> Result<()> {
                    let r = c * nw..(c + 1) * nw;
                    s.decode(
                        l,
                        &seqs,
                        &k[r.start * kvw..r.end * kvw],
                        &v[r.start * kvw..r.end * kvw],
                        &q[r.start * qw..r.end * qw],
                        out_c,
                        p,
                    )
                },
            )
        })?;
        let logits = model.logits(&hidden, rows)?;
        let targets: Vec<u32> = (0..nw).map(|w| windows[w][t + 1]).collect();
        let sc = score_step(&logits, vocab, nc, nw, &targets);
        if let Some(r) = reference {
            for w in 0..nw {
                r.compare(w, t - first, &logits[w * vocab..(w + 1) * vocab], targets[w] as usize, &mut cmp);
            }
        }
        for c in 0..nc {
            nll[c] += sc.nll[c];
            kld[c] += sc.kld[c];
            agree[c] += sc.agree[c];
        }
        count += nw;
        if opts.progress && (si % 16 == 15 || si + 1 == steps) {
            let el = td.elapsed().as_secs_f64();
            let eta = el / (si + 1) as f64 * (steps - si - 1) as f64;
            let ppl_exact = (nll[0] / count as f64).exp();
            eprintln!(
                "[decode] step {}/{} elapsed {:.0}s eta {:.0}s  exact ppl so far {:.3}",
                si + 1,
                steps,
                el,
                eta,
                ppl_exact
            );
        }
    }

    let elems_per_token = cfg.n_layers * kvw * 2;
    let tokens_stored = nw * (ctx - 1);
    let ppl0 = (nll[0] / count as f64).exp();
    let cmp = reference.map(|_| {
        cmp.finish();
        cmp
    });
    let results = (0..nc)
        .map(|c| {
            let kv_bytes = stores[c].kv_bytes();
            let ppl = (nll[c] / count as f64).exp();
            ConfigResult {
                name: specs[c].name.clone(),
                bits_per_element: kv_bytes as f64 * 8.0 / (tokens_stored * elems_per_token) as f64,
                ppl,
                ppl_ratio: ppl / ppl0,
                kld: kld[c] / count as f64,
                top1: agree[c] as f64 / count as f64,
                kv_bytes,
                nll_sum: nll[c],
                count,
            }
        })
        .collect();
    Ok((results, cmp))
}

pub struct StepScore {
    pub nll: Vec<f64>,
    pub kld: Vec<f64>,
    pub agree: Vec<usize>,
}

/// Scores one decode step. `logits`: `nc*nw` rows, row `c*nw+w`; config 0 is
/// the reference.
pub fn score_step(logits: &[f32], vocab: usize, nc: usize, nw: usize, targets: &[u32]) -> StepScore {
    let rows = nc * nw;
    // log-sum-exp and argmax per row
    let stats: Vec<(f64, usize)> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let l = &logits[r * vocab..(r + 1) * vocab];
            let (mut am, mut mx) = (0usize, f32::NEG_INFINITY);
            for (i, &x) in l.iter().enumerate() {
                if x > mx {
                    mx = x;
                    am = i;
                }
            }
            let s: f64 = l.chunks(1024).map(|ch| ch.iter().map(|&x| (x - mx).exp()).sum::<f32>() as f64).sum();
            (mx as f64 + s.ln(), am)
        })
        .collect();
    let per_row: Vec<(f64, f64, usize)> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let (c, w) = (r / nw, r % nw);
            let l = &logits[r * vocab..(r + 1) * vocab];
            let nll = stats[r].0 - l[targets[w] as usize] as f64;
            let r0 = w;
            let agree = (stats[r].1 == stats[r0].1) as usize;
            let kl = if c == 0 {
                0.0
            } else {
                let l0 = &logits[r0 * vocab..(r0 + 1) * vocab];
                let (lse0, lse) = (stats[r0].0 as f32, stats[r].0 as f32);
                l0.chunks(1024)
                    .zip(l.chunks(1024))
                    .map(|(a, b)| {
                        a.iter()
                            .zip(b)
                            .map(|(&x0, &x)| {
                                let lp = x0 - lse0;
                                lp.exp() * (lp - (x - lse))
                            })
                            .sum::<f32>() as f64
                    })
                    .sum::<f64>()
                    .max(0.0)
            };
            (nll, kl, agree)
        })
        .collect();
    let mut s = StepScore { nll: vec![0.0; nc], kld: vec![0.0; nc], agree: vec![0; nc] };
    for (r, (n, k, a)) in per_row.into_iter().enumerate() {
        let c = r / nw;
        s.nll[c] += n;
        s.kld[c] += k;
        s.agree[c] += a;
    }
    s
}
