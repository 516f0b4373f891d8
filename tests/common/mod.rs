//! Shared test helpers: a seeded generator of keys with outlier channels, and a checker that
//! compares the fused attention with the f64 reference over the dequantized cache.
#![allow(dead_code)]

use kivi::attention::reference;
use kivi::{AttnOptions, Cache, Dequantized, Rows, RowsMut};

/// SplitMix64: small, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// A seed from the clock, printed so a failure can be replayed with `KIVI_SEED`.
    pub fn fresh(name: &str) -> Rng {
        let seed = std::env::var("KIVI_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        eprintln!("{name}: KIVI_SEED={seed}");
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// Generates token rows the way real models' keys look: most channels small, a few outlier
/// channels per head with a large offset and spread (fixed per stream, as in real models).
pub struct KvGen {
    pub n_kv_heads: usize,
    pub head_dim: usize,
    outliers: Vec<(usize, f32, f32)>,
}

impl KvGen {
    pub fn new(rng: &mut Rng, n_kv_heads: usize, head_dim: usize) -> KvGen {
        let mut outliers = Vec::new();
        for h in 0..n_kv_heads {
            for _ in 0..3 {
                let c = h * head_dim + rng.below(head_dim);
                outliers.push((c, 8.0 + 8.0 * rng.uniform() as f32, 3.0 + 5.0 * rng.uniform() as f32));
            }
        }
        KvGen { n_kv_heads, head_dim, outliers }
    }

    /// `n` rows of keys.
    pub fn keys(&self, rng: &mut Rng, n: usize) -> Vec<f32> {
        let row = self.n_kv_heads * self.head_dim;
        let mut k: Vec<f32> = (0..n * row).map(|_| rng.normal()).collect();
        for t in 0..n {
            for &(c, off, spread) in &self.outliers {
                k[t * row + c] = off + spread * rng.normal();
            }
        }
        k
    }

    /// `n` rows of values (no outliers, as in real models).
    pub fn values(&self, rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n * self.n_kv_heads * self.head_dim).map(|_| rng.normal()).collect()
    }
}

pub fn queries(rng: &mut Rng, n: usize, n_q_heads: usize, head_dim: usize) -> Vec<f32> {
    (0..n * n_q_heads * head_dim).map(|_| rng.normal()).collect()
}

/// max |a - b| / max |b|; infinite where a value is NaN (NaN would otherwise drop out of the
/// maximum and pass any tolerance).
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = |(x, y): (&f32, &f64)| {
        let d = (*x as f64 - y).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    };
    let num = a.iter().zip(b).map(diff).fold(0.0, f64::max);
    let den = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// What the cache holds for (layer, seq) before a call, or nothing for a new sequence.
pub fn held(cache: &Cache, layer: u32, seq: u32) -> Dequantized {
    if cache.contains(seq) {
        cache.dequantized(layer, seq).unwrap()
    } else {
        let c = cache.config();
        Dequantized {
            len: 0,
            n_kv_heads: c.n_kv_heads as usize,
            head_dim: c.head_dim as usize,
            keys: vec![],
            values: vec![],
        }
    }
}

/// The largest `scale * sum_c |q_c k_c|` over the chunk's queries and every key they may see
/// (the past and the chunk; masks ignored, so an upper bound): the magnitude that f32 rounding
/// of a logit is relative to. A logit's error of a few ulps of this shifts the softmax weights
/// by as much, relatively, so sharp attention (large logits) needs a looser tolerance in f32.
pub fn logit_magnitude(past: &Dequantized, k: &[f32], q: &[f32], n_q_heads: usize, opts: &AttnOptions) -> f64 {
    let (nkv, hd) = (past.n_kv_heads, past.head_dim);
    let scale = opts.scale.unwrap_or(1.0 / (hd as f32).sqrt()).abs() as f64;
    let n = k.len() / (nkv * hd);
    let key = |p: usize, h: usize, c: usize| {
        if p < past.len {
            past.key(p, h, c)
        } else {
            k[((p - past.len) * nkv + h) * hd + c] as f64
        }
    };
    let mut m = 0f64;
    for (i, qrow) in q.chunks_exact(hd).enumerate() {
        let h = i % n_q_heads / (n_q_heads / nkv);
        for p in 0..past.len + n {
            m = m.max((0..hd).map(|c| (qrow[c] as f64 * key(p, h, c)).abs()).sum());
        }
    }
    m * scale
}

/// Appends a chunk with attention and checks the output against the reference; returns the
/// fused output. `tol` bounds the relative error; for sharp attention it is raised to what f32
/// rounding of the logits allows (8 ulps of [`logit_magnitude`]).
#[allow(clippy::too_many_arguments)]
pub fn append_attend_checked(
    cache: &mut Cache,
    layer: u32,
    seq: u32,
    k: &[f32],
    v: &[f32],
    q: &[f32],
    n_q_heads: usize,
    opts: &AttnOptions,
    tol: f64,
) -> Vec<f32> {
    let c = cache.config().clone();
    let n = k.len() / (c.n_kv_heads * c.head_dim) as usize;
    let past = held(cache, layer, seq);
    let want = reference::attention(&past, k, v, q, n_q_heads, past.len, opts).unwrap();
    let mut out = vec![0f32; q.len()];
    cache
        .append_attend(
            layer,
            seq,
            Rows::new(k, n).unwrap(),
            Rows::new(v, n).unwrap(),
            Rows::new(q, n).unwrap(),
            RowsMut::new(&mut out, n).unwrap(),
            opts,
        )
        .unwrap();
    let e = rel_err(&out, &want);
    // The raised tolerance costs as much as the reference: only when the floor is not met.
    let tol =
        if e < tol { tol } else { tol.max(8.0 * f32::EPSILON as f64 * logit_magnitude(&past, k, q, n_q_heads, opts)) };
    assert!(
        e < tol,
        "fused attention differs from the reference by {e:e}, tolerance {tol:e} (layer {layer}, seq {seq}, past {}, chunk {n}, config {c:?}, opts {opts:?})",
        past.len
    );
    out
}
