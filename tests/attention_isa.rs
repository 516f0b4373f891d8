//! Every CPU attention path this machine can run (scalar, AVX2, AVX-512, NEON) against the f64
//! reference, across shapes, bit widths, boundaries, options, threads and batched decode.

mod common;
use common::*;
use kivi::attention::{available_isas, force_isa, force_shared_key_permute, reference, Isa};
use kivi::{AttnOptions, Cache, CacheConfig, DType, KeyMode, Rows, RowsMut};
use std::sync::Mutex;

/// The instruction set is a process-wide setting: tests that force it run one at a time.
static ISA_LOCK: Mutex<()> = Mutex::new(());

fn for_each_isa(mut f: impl FnMut(Isa)) {
    let _g = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for isa in available_isas() {
        assert!(force_isa(Some(isa)));
        // AVX2 unpacks 2-bit key codes shared by query vectors one of two ways, chosen by the
        // CPU's maker: both run here, whatever this machine's.
        let ways: &[Option<bool>] = if isa == Isa::Avx2 { &[Some(true), Some(false)] } else { &[None] };
        for &way in ways {
            force_shared_key_permute(way);
            f(isa);
        }
    }
    force_shared_key_permute(None);
    force_isa(None);
}

/// NEON is part of the aarch64 base, so on aarch64 the tests below always run the NEON kernels,
/// not only the scalar path (CI runs them under qemu-user: `scripts/test-aarch64.sh`).
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_is_available_on_aarch64() {
    let isas = available_isas();
    assert!(isas.contains(&Isa::Neon), "NEON not detected: {isas:?}");
}

/// Command lines name instruction sets (`--isa` of the bench and of kivi-eval): every name maps
/// back to its set, and nothing else is a name.
#[test]
fn isa_names_round_trip() {
    let all = Isa::ALL;
    for isa in all {
        assert_eq!(Isa::from_name(isa.name()), Some(isa));
    }
    let names: std::collections::HashSet<_> = all.iter().map(|i| i.name()).collect();
    assert_eq!(names.len(), all.len());
    for bad in ["", "AVX2", "avx", "avx512f", "sse2", "neon ", "scalar\0"] {
        assert_eq!(Isa::from_name(bad), None, "{bad:?}");
    }
}

#[derive(Clone, Debug)]
struct Case {
    hd: u32,
    nkv: u32,
    nq: usize,
    kb: u8,
    vb: u8,
    g: u32,
    r: u32,
    sinks: u32,
    mode: KeyMode,
    vg: u32,
    page: u32,
    dtype: DType,
    threads: u32,
    opts: AttnOptions,
    chunks: Vec<usize>,
}

fn base(hd: u32, nkv: u32, nq: usize) -> Case {
    Case {
        hd,
        nkv,
        nq,
        kb: 2,
        vb: 2,
        g: 32,
        r: 128,
        sinks: 0,
        mode: KeyMode::PerChannel,
        vg: 32,
        page: 0,
        dtype: DType::F32,
        threads: 1,
        opts: AttnOptions::default(),
        // A prefill, then single decode steps across R, R + G and further group edges, then
        // chunks that end on and across group boundaries.
        chunks: [vec![100], vec![1; 70], vec![31, 1, 32, 33, 1, 64, 95]].concat(),
    }
}

fn run(c: &Case, seed: u64) {
    for_each_isa(|isa| {
        let mut rng = Rng::new(seed);
        let mut cfg = CacheConfig::new(2, c.nkv, c.hd);
        cfg.key_bits = c.kb;
        cfg.value_bits = c.vb;
        cfg.group_size = c.g;
        cfg.residual = c.r;
        cfg.sinks = c.sinks;
        cfg.key_mode = c.mode;
        cfg.value_group = c.vg;
        cfg.page_tokens = c.page;
        cfg.dtype = c.dtype;
        cfg.n_threads = c.threads;
        cfg.max_tokens = 4096;
        let mut cache = Cache::new(cfg).unwrap();
        let gen = KvGen::new(&mut rng, c.nkv as usize, c.hd as usize);
        for (i, &n) in c.chunks.iter().enumerate() {
            let k = gen.keys(&mut rng, n);
            let v = gen.values(&mut rng, n);
            let q = queries(&mut rng, n, c.nq, c.hd as usize);
            let layer = (i % 2) as u32;
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                append_attend_checked(&mut cache, layer, 5, &k, &v, &q, c.nq, &c.opts, 1e-5);
            }));
            if res.is_err() {
                panic!("instruction set {isa:?}, chunk {i}, case {c:?}");
            }
        }
    });
}

/// Random configurations, beyond the lists below: head sizes 8-256, GQA ratios 1-16, every bit
/// width, group sizes that are not powers of two, windows, sinks, pages, value groups that are
/// not multiples of a vector, dtypes, threads and options, each with a random run of chunks
/// (prefills, single tokens, chunks that end on and across group edges). A fresh seed every
/// run (printed; `KIVI_SEED` replays it), `KIVI_TEST_CONFIGS=N` for more than the default.
#[test]
fn random_configurations() {
    let mut rng = Rng::fresh("random_configurations");
    let n: usize = std::env::var("KIVI_TEST_CONFIGS").map_or(12, |s| s.parse().expect("KIVI_TEST_CONFIGS=N"));
    for _ in 0..n {
        let hd = [8u32, 16, 24, 32, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256][rng.below(14)];
        let nkv = 1 + rng.below(3) as u32;
        let ratio = [1usize, 2, 3, 4, 5, 6, 8, 12, 16][rng.below(9)];
        // At most 4096 query channels a token (32 heads of 128, 16 of 256): the reference's time
        // grows with them, and one draw of 48 heads of 192 took 112 s of a 60-draw run's 476 s
        // on x86-64 (a wide draw held this test over half an hour under qemu-user). Fewer KV
        // heads, not a smaller ratio or head, so that every ratio still meets every head size.
        let nkv = nkv.min((4096 / (ratio * hd as usize)).max(1) as u32);
        let mut c = base(hd, nkv, nkv as usize * ratio);
        (c.kb, c.vb) = ([2, 4, 8][rng.below(3)], [2, 4, 8][rng.below(3)]);
        c.g = [8, 16, 24, 32, 48, 64, 128][rng.below(7)];
        c.r = c.g * rng.below(5) as u32;
        if c.r > 256 {
            c.r = c.g;
        }
        c.sinks = rng.below(6) as u32;
        c.mode = if rng.below(5) == 0 { KeyMode::PerToken } else { KeyMode::PerChannel };
        let divisors: Vec<u32> = (1..=hd).filter(|d| hd % d == 0).collect();
        c.vg = divisors[rng.below(divisors.len())];
        c.page = [0, 1, 2, 4][rng.below(4)] * c.g;
        c.dtype = [DType::F32, DType::F16, DType::BF16][rng.below(3)];
        c.threads = 1 + rng.below(3) as u32;
        c.opts.causal = rng.below(8) != 0;
        if rng.below(4) == 0 {
            c.opts.sliding_window = 1 + rng.below(200) as u32;
        }
        if rng.below(4) == 0 {
            c.opts.softcap = 30.0;
        }
        if rng.below(4) == 0 {
            c.opts.scale = Some(0.05 + rng.below(10) as f32 * 0.03);
        }
        let g = c.g as usize;
        let mut chunks = vec![1 + rng.below(300)];
        while chunks.iter().sum::<usize>() < 1200 {
            chunks.push(match rng.below(6) {
                0 => 1 + rng.below(100),
                1 => g - 1,
                2 => g,
                3 => g + 1,
                _ => 1,
            });
        }
        c.chunks = chunks;
        run(&c, rng.next_u64());
    }
}

#[test]
fn head_dims_and_gqa_ratios() {
    let mut rng = Rng::fresh("head_dims_and_gqa_ratios");
    for (hd, nkv, nq) in [(64, 2, 2), (64, 1, 8), (80, 2, 8), (96, 1, 4), (128, 2, 8), (256, 1, 4), (128, 1, 12)] {
        let mut c = base(hd, nkv, nq);
        if hd == 80 {
            c.vg = 16;
        }
        run(&c, rng.next_u64());
    }
}

#[test]
fn bit_widths() {
    let mut rng = Rng::fresh("bit_widths");
    for (kb, vb) in [(2, 2), (4, 4), (8, 8), (2, 4), (4, 2), (8, 2)] {
        let mut c = base(128, 2, 8);
        c.kb = kb;
        c.vb = vb;
        run(&c, rng.next_u64());
    }
}

#[test]
fn groups_pages_sinks_and_windows() {
    let mut rng = Rng::fresh("groups_pages_sinks_and_windows");
    let mut cases = Vec::new();
    // Small groups (8 and 16 tokens: narrower vectors or the scalar path), no residual.
    for (g, r) in [(8, 16), (16, 0), (64, 64)] {
        let mut c = base(64, 2, 4);
        c.g = g;
        c.r = r;
        c.vg = 16;
        cases.push(c);
    }
    // Multi-group pages and sinks.
    let mut c = base(128, 2, 8);
    c.page = 128;
    c.sinks = 4;
    cases.push(c);
    let mut c = base(64, 1, 4);
    c.sinks = 1;
    c.g = 16;
    c.vg = 16;
    c.page = 64;
    cases.push(c);
    // Sliding windows cutting through groups, softcap, non-causal.
    for (w, cap, causal) in [(45, 0.0, true), (100, 30.0, true), (0, 20.0, true), (0, 0.0, false)] {
        let mut c = base(128, 2, 8);
        c.sinks = if w == 100 { 2 } else { 0 };
        c.opts = AttnOptions { scale: None, causal, sliding_window: w, softcap: cap };
        cases.push(c);
    }
    // Odd value groups.
    let mut c = base(64, 1, 2);
    c.vg = 8;
    cases.push(c);
    for c in cases {
        run(&c, rng.next_u64());
    }
}

/// Keys per token (the paper's baseline): rows dequantized like values, every bit width, channel
/// groups of one and several vector tiles, one to eight query vectors, pages, sinks, windows.
#[test]
fn per_token_keys() {
    let mut rng = Rng::fresh("per_token_keys");
    let mut cases = Vec::new();
    for (kb, vb, vg) in [(2, 2, 32), (4, 2, 16), (8, 4, 64), (2, 8, 128), (4, 4, 32)] {
        let mut c = base(128, 2, 8);
        c.mode = KeyMode::PerToken;
        (c.kb, c.vb, c.vg) = (kb, vb, vg);
        cases.push(c);
    }
    for (hd, nkv, nq, g, vg) in [(64, 1, 1, 16, 16), (96, 1, 3, 32, 32), (256, 1, 4, 64, 32), (80, 2, 4, 16, 16)] {
        let mut c = base(hd, nkv, nq);
        c.mode = KeyMode::PerToken;
        (c.g, c.vg) = (g, vg);
        cases.push(c);
    }
    let mut c = base(128, 2, 8);
    c.mode = KeyMode::PerToken;
    c.page = 128;
    c.sinks = 3;
    c.dtype = DType::F16;
    c.opts = AttnOptions { scale: None, causal: true, sliding_window: 77, softcap: 25.0 };
    cases.push(c);
    for c in cases {
        run(&c, rng.next_u64());
    }
}

#[test]
fn window_dtypes() {
    let mut rng = Rng::fresh("window_dtypes");
    for dt in [DType::F16, DType::BF16] {
        let mut c = base(128, 2, 8);
        c.dtype = dt;
        c.sinks = 3;
        run(&c, rng.next_u64());
    }
}

#[test]
fn threads_and_split_contexts() {
    let mut rng = Rng::fresh("threads_and_split_contexts");
    // One KV head with two or three threads: the context is split and the partial softmax
    // states are combined. Three KV heads on two threads: split too.
    for (nkv, nq, threads) in [(1, 4, 2), (1, 1, 3), (3, 6, 2), (2, 16, 2), (4, 8, 4)] {
        let mut c = base(64, nkv, nq);
        c.threads = threads;
        c.chunks = vec![700, 1, 1, 300, 1, 33, 1];
        run(&c, rng.next_u64());
        let mut c = base(64, nkv, nq);
        c.threads = threads;
        c.opts.sliding_window = 500;
        c.chunks = vec![900, 1, 40, 1];
        run(&c, rng.next_u64());
    }
}

/// Batched decode over many sequences (each one token) against the reference, per sequence.
#[test]
fn batched_decode() {
    let mut rng0 = Rng::fresh("batched_decode");
    let seed = rng0.next_u64();
    for threads in [1, 2] {
        for_each_isa(|isa| {
            let mut rng = Rng::new(seed);
            let (nkv, hd, nq, nseq) = (2u32, 64u32, 8usize, 5usize);
            let mut cfg = CacheConfig::new(1, nkv, hd);
            cfg.max_seqs = nseq as u32;
            cfg.max_tokens = 8192;
            cfg.n_threads = threads;
            cfg.residual = 32;
            let mut cache = Cache::new(cfg).unwrap();
            let gen = KvGen::new(&mut rng, nkv as usize, hd as usize);
            // Prompts of different lengths.
            for s in 0..nseq - 1 {
                let n = 50 + 97 * s;
                let (k, v) = (gen.keys(&mut rng, n), gen.values(&mut rng, n));
                cache.append(0, s as u32, Rows::new(&k, n).unwrap(), Rows::new(&v, n).unwrap()).unwrap();
            }
            // Decode steps; the last sequence starts in the first step.
            let ids: Vec<u32> = (0..nseq as u32).collect();
            let row = (nkv * hd) as usize;
            for step in 0..40 {
                let (k, v) = (gen.keys(&mut rng, nseq), gen.values(&mut rng, nseq));
                let q = queries(&mut rng, nseq, nq, hd as usize);
                let past: Vec<_> = ids.iter().map(|&s| held(&cache, 0, s)).collect();
                let mut out = vec![0f32; q.len()];
                cache
                    .decode(
                        0,
                        &ids,
                        Rows::new(&k, nseq).unwrap(),
                        Rows::new(&v, nseq).unwrap(),
                        Rows::new(&q, nseq).unwrap(),
                        RowsMut::new(&mut out, nseq).unwrap(),
                        &AttnOptions::default(),
                    )
                    .unwrap();
                for s in 0..nseq {
                    let qs = &q[s * nq * hd as usize..(s + 1) * nq * hd as usize];
                    let want = reference::attention(
                        &past[s],
                        &k[s * row..(s + 1) * row],
                        &v[s * row..(s + 1) * row],
                        qs,
                        nq,
                        past[s].len,
                        &AttnOptions::default(),
                    )
                    .unwrap();
                    let e = rel_err(&out[s * nq * hd as usize..(s + 1) * nq * hd as usize], &want);
                    assert!(e < 1e-5, "{isa:?} threads {threads} step {step} seq {s}: error {e:e}");
                }
            }
        });
    }
}

/// Attention for tokens already stored puts each query's causal end inside the window, and
/// sliding windows put a query's start inside the sinks (each query row a step further), with
/// quantized groups between sinks and window: queries of the last stored tokens, every
/// instruction set, against the reference, at the lengths around the first flushes.
#[test]
fn stored_queries_with_sinks_and_windows() {
    let mut rng0 = Rng::fresh("stored_queries_with_sinks_and_windows");
    let seed = rng0.next_u64();
    let (nkv, hd, nq) = (2u32, 64u32, 4usize);
    for_each_isa(|isa| {
        let mut rng = Rng::new(seed);
        for (sinks, window) in [(1u32, 0u32), (3, 0), (3, 58), (5, 61)] {
            let mut cfg = CacheConfig::new(1, nkv, hd);
            (cfg.sinks, cfg.residual, cfg.group_size, cfg.value_group) = (sinks, 32, 16, 16);
            cfg.max_tokens = 1024;
            let mut cache = Cache::new(cfg).unwrap();
            let gen = KvGen::new(&mut rng, nkv as usize, hd as usize);
            let opts = AttnOptions { sliding_window: window, ..Default::default() };
            // Past S + R + G the first group is quantized; the sliding windows still reach the
            // sinks from the queries of the first lengths.
            for n in [40usize, 8, 1, 1, 1, 6, 1, 1, 1, 1, 1, 40] {
                let (k, v) = (gen.keys(&mut rng, n), gen.values(&mut rng, n));
                cache.append(0, 0, Rows::new(&k, n).unwrap(), Rows::new(&v, n).unwrap()).unwrap();
                let past = cache.dequantized(0, 0).unwrap();
                let nrows = 5.min(past.len);
                let q = queries(&mut rng, nrows, nq, hd as usize);
                let want = reference::attention(&past, &[], &[], &q, nq, past.len - nrows, &opts).unwrap();
                let mut out = vec![0f32; q.len()];
                cache
                    .attend(0, 0, Rows::new(&q, nrows).unwrap(), RowsMut::new(&mut out, nrows).unwrap(), &opts)
                    .unwrap();
                let e = rel_err(&out, &want);
                assert!(e < 1e-5, "{isa:?}: sinks {sinks}, window {window}, length {}: error {e:e}", past.len);
            }
        }
    });
}

/// f16 queries and outputs: the same attention, rounded to f16 at the end.
#[test]
fn f16_queries_and_outputs() {
    let mut rng0 = Rng::fresh("f16_queries_and_outputs");
    let seed = rng0.next_u64();
    for_each_isa(|isa| {
        let mut rng = Rng::new(seed);
        let (nkv, hd, nq) = (2u32, 128u32, 8usize);
        let mut cfg = CacheConfig::new(1, nkv, hd);
        cfg.dtype = DType::F16;
        cfg.max_tokens = 4096;
        let mut cache = Cache::new(cfg).unwrap();
        let gen = KvGen::new(&mut rng, nkv as usize, hd as usize);
        let n = 600;
        let (k, v) = (gen.keys(&mut rng, n), gen.values(&mut rng, n));
        let h = |x: &[f32]| x.iter().map(|&y| half::f16::from_f32(y)).collect::<Vec<_>>();
        cache.append(0, 1, Rows::new(&h(&k), n).unwrap(), Rows::new(&h(&v), n).unwrap()).unwrap();
        let q = queries(&mut rng, 3, nq, hd as usize);
        let qh = h(&q);
        let qf: Vec<f32> = qh.iter().map(|x| x.to_f32()).collect();
        let mut out = vec![half::f16::ZERO; q.len()];
        cache
            .attend(0, 1, Rows::new(&qh, 3).unwrap(), RowsMut::new(&mut out, 3).unwrap(), &AttnOptions::default())
            .unwrap();
        let d = cache.dequantized(0, 1).unwrap();
        let past = kivi::Dequantized {
            len: n - 3,
            keys: d.keys[..(n - 3) * row(&d)].to_vec(),
            values: d.values[..(n - 3) * row(&d)].to_vec(),
            ..d.clone()
        };
        let ck: Vec<f32> = d.keys[(n - 3) * row(&d)..].iter().map(|&x| x as f32).collect();
        let cv: Vec<f32> = d.values[(n - 3) * row(&d)..].iter().map(|&x| x as f32).collect();
        let want = reference::attention(&past, &ck, &cv, &qf, nq, n - 3, &AttnOptions::default()).unwrap();
        let got: Vec<f32> = out.iter().map(|x| x.to_f32()).collect();
        let e = rel_err(&got, &want);
        assert!(e < 2e-3, "{isa:?}: error {e:e}");
    });
}

fn row(d: &kivi::Dequantized) -> usize {
    d.n_kv_heads * d.head_dim
}

/// The dense f16 baseline of the benchmark against the reference.
#[test]
fn dense_baseline_matches_reference() {
    let mut rng0 = Rng::fresh("dense_baseline_matches_reference");
    let seed = rng0.next_u64();
    for_each_isa(|isa| {
        if isa == Isa::Scalar {
            return;
        }
        for threads in [1, 2] {
            let mut rng = Rng::new(seed);
            let (nkv, hd, nq, nseq, len) = (2usize, 128usize, 8usize, 3usize, 777usize);
            let mut d = kivi::attention::DenseF16Cache::new(nseq, nkv, hd, len + 1, threads);
            let gen = KvGen::new(&mut rng, nkv, hd);
            let mut data = Vec::new();
            for s in 0..nseq {
                let (k, v) = (gen.keys(&mut rng, len), gen.values(&mut rng, len));
                d.append(s, &k, &v);
                data.push((k, v));
            }
            let q = queries(&mut rng, nseq, nq, hd);
            let mut out = vec![0f32; q.len()];
            d.attend(0, nseq, &q, &mut out);
            for (s, (k, v)) in data.iter().enumerate() {
                let r = |x: &[f32]| x.iter().map(|&y| half::f16::from_f32(y).to_f64()).collect::<Vec<f64>>();
                let past = kivi::Dequantized { len, n_kv_heads: nkv, head_dim: hd, keys: r(k), values: r(v) };
                let qs = &q[s * nq * hd..(s + 1) * nq * hd];
                let want = reference::attention(&past, &[], &[], qs, nq, len - 1, &AttnOptions::default()).unwrap();
                let e = rel_err(&out[s * nq * hd..(s + 1) * nq * hd], &want);
                assert!(e < 1e-5, "{isa:?} threads {threads} seq {s}: error {e:e}");
            }
        }
    });
}
