//! Fused attention against the f64 reference over the dequantized cache, across settings.

mod common;
use common::*;
use kivi::{AttnOptions, Cache, CacheConfig, KeyMode, Rows, RowsMut};

#[test]
fn fused_matches_reference_across_settings() {
    let mut rng = Rng::fresh("fused_matches_reference_across_settings");
    let cases = [
        // (hd, nkv, nq, bits k, bits v, G, R, sinks, mode)
        (64, 2, 8, 2, 2, 32, 128, 0, KeyMode::PerChannel),
        (128, 1, 4, 4, 4, 32, 64, 0, KeyMode::PerChannel),
        (80, 2, 2, 8, 8, 16, 32, 4, KeyMode::PerChannel),
        (64, 1, 1, 2, 2, 8, 16, 1, KeyMode::PerChannel),
        (96, 2, 6, 2, 4, 32, 0, 0, KeyMode::PerChannel),
        (256, 1, 4, 2, 2, 32, 32, 2, KeyMode::PerToken),
        (128, 2, 4, 4, 2, 64, 128, 0, KeyMode::PerToken),
    ];
    for (hd, nkv, nq, kb, vb, g, r, s, mode) in cases {
        let mut cfg = CacheConfig::new(2, nkv, hd);
        cfg.key_bits = kb;
        cfg.value_bits = vb;
        cfg.group_size = g;
        cfg.residual = r;
        cfg.sinks = s;
        cfg.key_mode = mode;
        cfg.value_group = if hd % 32 == 0 { 32 } else { 16 };
        cfg.max_tokens = 2048;
        cfg.page_tokens = if g <= 16 { 4 * g } else { 0 };
        let mut cache = Cache::new(cfg.clone()).unwrap();
        let gen = KvGen::new(&mut rng, nkv as usize, hd as usize);
        let opts = AttnOptions::default();
        // A prefill chunk, then decode steps across several flushes.
        let chunks = [150usize, 1, 1, 37, 1, 64, 1, 1, 1, 200];
        for (i, &n) in chunks.iter().enumerate() {
            let k = gen.keys(&mut rng, n);
            let v = gen.values(&mut rng, n);
            let q = queries(&mut rng, n, nq as usize, hd as usize);
            let layer = (i % 2) as u32;
            append_attend_checked(&mut cache, layer, 3, &k, &v, &q, nq as usize, &opts, 1e-5);
        }
    }
}

fn cfg(nkv: u32, hd: u32, r: u32, g: u32, sinks: u32) -> CacheConfig {
    let mut c = CacheConfig::new(2, nkv, hd);
    (c.residual, c.group_size, c.sinks, c.max_tokens, c.max_seqs) = (r, g, sinks, 4096, 4);
    c
}

#[test]
fn options_windows_softcap_noncausal() {
    let mut rng = Rng::fresh("options_windows_softcap_noncausal");
    let variants = [
        AttnOptions { sliding_window: 1, ..Default::default() },
        AttnOptions { sliding_window: 45, ..Default::default() }, // cuts through groups
        AttnOptions { sliding_window: 200, ..Default::default() },
        AttnOptions { softcap: 5.0, scale: Some(0.3), ..Default::default() },
        AttnOptions { causal: false, ..Default::default() },
        AttnOptions { causal: false, sliding_window: 70, softcap: 30.0, ..Default::default() },
    ];
    for opts in variants {
        let mut cache = Cache::new(cfg(2, 64, 64, 32, 2)).unwrap();
        let gen = KvGen::new(&mut rng, 2, 64);
        for n in [100usize, 1, 1, 80, 1, 31, 1] {
            let (k, v, q) = (gen.keys(&mut rng, n), gen.values(&mut rng, n), queries(&mut rng, n, 8, 64));
            append_attend_checked(&mut cache, 0, 1, &k, &v, &q, 8, &opts, 1e-5);
        }
    }
}

/// Token-by-token decode across every boundary: R, R+1, R+G-1, R+G (the first flush), R+G+1,
/// and the next flushes, with and without sinks, R = 0 included.
#[test]
fn decode_across_window_and_group_edges() {
    let mut rng = Rng::fresh("decode_across_window_and_group_edges");
    for (r, g, sinks) in [(32u32, 16u32, 0u32), (64, 32, 3), (0, 8, 0), (0, 16, 5)] {
        let mut cache = Cache::new(cfg(1, 64, r, g, sinks)).unwrap();
        let gen = KvGen::new(&mut rng, 1, 64);
        let end = (sinks + r + 3 * g + 2) as usize;
        for pos in 0..end {
            let (k, v, q) = (gen.keys(&mut rng, 1), gen.values(&mut rng, 1), queries(&mut rng, 1, 4, 64));
            append_attend_checked(&mut cache, 1, 9, &k, &v, &q, 4, &AttnOptions::default(), 1e-5);
            assert_eq!(cache.seq_layer_len(9, 1).unwrap() as usize, pos + 1);
        }
    }
}

/// Prefill chunks whose end crosses a flush, and chunks longer than the whole window.
#[test]
fn chunks_spanning_flushes() {
    let mut rng = Rng::fresh("chunks_spanning_flushes");
    let (r, g) = (64u32, 32u32);
    for first in [95usize, 96, 97, 127, 128, 300] {
        let mut cache = Cache::new(cfg(2, 128, r, g, 0)).unwrap();
        let gen = KvGen::new(&mut rng, 2, 128);
        for n in [first, 33, 65, 1] {
            let (k, v, q) = (gen.keys(&mut rng, n), gen.values(&mut rng, n), queries(&mut rng, n, 2, 128));
            append_attend_checked(&mut cache, 0, 0, &k, &v, &q, 2, &AttnOptions::default(), 1e-5);
        }
    }
}

/// With R at least the sequence length nothing is quantized: the result is exact attention
/// over the original data.
#[test]
fn residual_covering_everything_is_exact() {
    let mut rng = Rng::fresh("residual_covering_everything_is_exact");
    let mut cache = Cache::new(cfg(2, 96, 512, 32, 0)).unwrap();
    let gen = KvGen::new(&mut rng, 2, 96);
    let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
    for n in [200usize, 1, 1, 150, 1] {
        let (k, v, q) = (gen.keys(&mut rng, n), gen.values(&mut rng, n), queries(&mut rng, n, 4, 96));
        let exact = kivi::Dequantized {
            len: all_k.len() / (2 * 96),
            n_kv_heads: 2,
            head_dim: 96,
            keys: all_k.iter().map(|&x: &f32| x as f64).collect(),
            values: all_v.iter().map(|&x: &f32| x as f64).collect(),
        };
        let want =
            kivi::attention::reference::attention(&exact, &k, &v, &q, 4, exact.len, &AttnOptions::default()).unwrap();
        let got = append_attend_checked(&mut cache, 0, 0, &k, &v, &q, 4, &AttnOptions::default(), 1e-5);
        assert!(rel_err(&got, &want) < 1e-5);
        all_k.extend_from_slice(&k);
        all_v.extend_from_slice(&v);
    }
    assert_eq!(cache.stats().quantized_tokens, 0);
}

/// f16 and bf16 windows and inputs.
#[test]
fn half_precision_dtypes() {
    use kivi::{bf16, f16, DType, Element};
    let mut rng = Rng::fresh("half_precision_dtypes");
    fn run<T: Element>(rng: &mut Rng, dtype: DType) {
        let mut c = cfg(2, 64, 32, 32, 1);
        c.dtype = dtype;
        let mut cache = Cache::new(c).unwrap();
        let gen = KvGen::new(rng, 2, 64);
        for n in [70usize, 1, 40, 1] {
            // Round the inputs to T so that the reference sees what the cache was given.
            let r = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| T::from_f32(v).to_f32()).collect() };
            let (k, v, q) = (r(gen.keys(rng, n)), r(gen.values(rng, n)), r(queries(rng, n, 4, 64)));
            let past = held(&cache, 0, 0);
            let want =
                kivi::attention::reference::attention(&past, &k, &v, &q, 4, past.len, &Default::default()).unwrap();
            let t = |x: &[f32]| -> Vec<T> { x.iter().map(|&v| T::from_f32(v)).collect() };
            let (kt, vt, qt) = (t(&k), t(&v), t(&q));
            let mut out = vec![T::from_f32(0.0); q.len()];
            cache
                .append_attend(
                    0,
                    0,
                    kivi::Rows::new(&kt, n).unwrap(),
                    kivi::Rows::new(&vt, n).unwrap(),
                    kivi::Rows::new(&qt, n).unwrap(),
                    kivi::RowsMut::new(&mut out, n).unwrap(),
                    &Default::default(),
                )
                .unwrap();
            let got: Vec<f32> = out.iter().map(|x| x.to_f32()).collect();
            // The output is rounded to T: allow its precision.
            let tol = if dtype == DType::BF16 { 8e-3 } else { 1e-3 };
            assert!(rel_err(&got, &want) < tol, "{dtype:?}: {}", rel_err(&got, &want));
        }
    }
    run::<f16>(&mut rng, DType::F16);
    run::<bf16>(&mut rng, DType::BF16);
    run::<f32>(&mut rng, DType::F16);
}

/// A batched decode step equals one append_attend per sequence, bit for bit, and the read-only
/// `attend` equals the reference; sequences do not disturb each other.
#[test]
fn batched_decode_and_independent_sequences() {
    let mut rng = Rng::fresh("batched_decode_and_independent_sequences");
    let mut c = cfg(2, 64, 32, 16, 0);
    c.max_seqs = 6;
    let mut batched = Cache::new(c.clone()).unwrap();
    let mut single = Cache::new(c).unwrap();
    let gen = KvGen::new(&mut rng, 2, 64);
    let seqs = [4u32, 11, 7];
    // Different prompt lengths.
    for (i, &s) in seqs.iter().enumerate() {
        let n = 20 + 37 * i;
        let (k, v) = (gen.keys(&mut rng, n), gen.values(&mut rng, n));
        for cache in [&mut batched, &mut single] {
            cache.append(0, s, Rows::new(&k, n).unwrap(), Rows::new(&v, n).unwrap()).unwrap();
        }
    }
    let before_7 = batched.dequantized(0, 7).unwrap();
    for step in 0..60 {
        let active: Vec<u32> = if step % 3 == 0 { vec![4, 11] } else { seqs.to_vec() };
        let n = active.len();
        let (k, v, q) = (gen.keys(&mut rng, n), gen.values(&mut rng, n), queries(&mut rng, n, 4, 64));
        let mut out = vec![0f32; q.len()];
        batched
            .decode(
                0,
                &active,
                Rows::new(&k, n).unwrap(),
                Rows::new(&v, n).unwrap(),
                Rows::new(&q, n).unwrap(),
                RowsMut::new(&mut out, n).unwrap(),
                &Default::default(),
            )
            .unwrap();
        for (i, &s) in active.iter().enumerate() {
            let row = |x: &[f32], w: usize| x[i * w..(i + 1) * w].to_vec();
            let one = append_attend_checked(
                &mut single,
                0,
                s,
                &row(&k, 128),
                &row(&v, 128),
                &row(&q, 256),
                4,
                &Default::default(),
                1e-5,
            );
            assert_eq!(one, out[i * 256..(i + 1) * 256], "step {step} sequence {s}");
        }
        if step == 0 {
            // Sequence 7 took no part: what it holds is unchanged.
            assert_eq!(batched.dequantized(0, 7).unwrap(), before_7);
        }
    }
    for &s in &seqs {
        assert_eq!(batched.dequantized(0, s).unwrap(), single.dequantized(0, s).unwrap());
        // Read-only attention for the last 3 tokens.
        let q = queries(&mut rng, 3, 4, 64);
        let past = batched.dequantized(0, s).unwrap();
        let want =
            kivi::attention::reference::attention(&past, &[], &[], &q, 4, past.len - 3, &Default::default()).unwrap();
        let mut out = vec![0f32; q.len()];
        batched
            .attend(0, s, Rows::new(&q, 3).unwrap(), RowsMut::new(&mut out, 3).unwrap(), &Default::default())
            .unwrap();
        assert!(rel_err(&out, &want) < 1e-5);
    }
}
