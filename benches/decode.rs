//! Decode attention on the CPU: KIVI-2, KIVI-4 and a dense f16 flash attention (same kernels,
//! threads and work split) side by side, one query token per sequence.
//!
//! `cargo bench --bench decode` prints a table (medians, and the fastest repetition after `|`),
//! the cost of appending (the median over blocks of one-token appends), then one JSON line per
//! (case, format). Each format holds `L` layers and successive calls rotate through them, so the
//! data of a call is not left in the last-level cache by the previous one (as in a model).
//! Windows are f16, G = 32, R = 128, one sink.
//!
//! Options: `--threads N` (default 2), `--quick` (fewer repetitions), `--reps N`,
//! `--isa scalar|avx2|avx512|neon`, `--only CASE:CTX`, `--formats 2,4,16`, `--page-tokens N`
//! (default 256), `--per-token-keys` (the KIVI paper's baseline quantization for the kivi caches).

use std::time::Instant;

use kivi::attention::{force_isa, DenseF16Cache, Isa};
use kivi::{Cache, CacheConfig, DType, KeyMode, Rows, RowsMut};

/// xorshift64*: fast test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }

    fn fill(&mut self, v: &mut [f32]) {
        v.iter_mut().for_each(|x| *x = self.next());
    }

    /// Keys with a few outlier channels per head, as real keys have.
    fn keys(&mut self, v: &mut [f32], hd: usize) {
        self.fill(v);
        for (i, x) in v.iter_mut().enumerate() {
            if i % hd == 7 || i % hd == 45 {
                *x = *x * 3.0 + 10.0;
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    ctx: usize,
    hd: usize,
    nkv: usize,
    nq: usize,
    seqs: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Layers each format holds; calls rotate through them so that, as in a model, the KV data of
/// one call is not still in the last-level cache from the previous call (at least 64 MB of
/// KIVI-2 data, at most 16 layers).
fn layers(c: &Case) -> usize {
    (64e6 / bytes_read(c, 2)).ceil().clamp(1.0, 16.0) as usize
}

/// How the kivi caches are built: threads, tokens per page, key quantization.
#[derive(Clone, Copy)]
struct Setup {
    threads: u32,
    page_tokens: u32,
    key_mode: KeyMode,
}

fn kivi_cache(c: &Case, bits: u8, setup: Setup, extra: usize, rng: &mut Rng) -> Cache {
    let nl = layers(c);
    let mut cfg = CacheConfig::new(nl as u32, c.nkv as u32, c.hd as u32);
    cfg.key_bits = bits;
    cfg.value_bits = bits;
    cfg.dtype = DType::F16;
    cfg.max_seqs = c.seqs as u32;
    cfg.max_tokens = (c.seqs * (c.ctx + extra)) as u32;
    cfg.n_threads = setup.threads;
    cfg.page_tokens = setup.page_tokens;
    cfg.key_mode = setup.key_mode;
    let mut cache = Cache::new(cfg).unwrap();
    let row = c.nkv * c.hd;
    let chunk = 1024;
    let (mut k, mut v) = (vec![0f32; chunk * row], vec![0f32; chunk * row]);
    for l in 0..nl as u32 {
        for s in 0..c.seqs as u32 {
            let mut done = 0;
            while done < c.ctx {
                let n = chunk.min(c.ctx - done);
                rng.keys(&mut k[..n * row], c.hd);
                rng.fill(&mut v[..n * row]);
                let (kr, vr) = (Rows::new(&k[..n * row], n).unwrap(), Rows::new(&v[..n * row], n).unwrap());
                cache.append(l, s, kr, vr).unwrap();
                done += n;
            }
        }
    }
    cache
}

/// The dense baseline: sequence `layer * seqs + s` holds sequence `s` of layer `layer`.
fn dense_cache(c: &Case, threads: usize, extra: usize, rng: &mut Rng) -> DenseF16Cache {
    let n = layers(c) * c.seqs;
    let mut d = DenseF16Cache::new(n, c.nkv, c.hd, c.ctx + extra, threads);
    let row = c.nkv * c.hd;
    let chunk = 1024;
    let (mut k, mut v) = (vec![0f32; chunk * row], vec![0f32; chunk * row]);
    for s in 0..n {
        let mut done = 0;
        while done < c.ctx {
            let n = chunk.min(c.ctx - done);
            rng.keys(&mut k[..n * row], c.hd);
            rng.fill(&mut v[..n * row]);
            d.append(s, &k[..n * row], &v[..n * row]);
            done += n;
        }
    }
    d
}

/// Bytes one decode step reads per sequence: quantized tokens (codes, scales, zeros), or f16.
fn bytes_read(c: &Case, bits: u32) -> f64 {
    let per_token_head = if bits == 16 {
        (c.hd * 2 * 2) as f64
    } else {
        // Codes of keys and values, f16 scale + zero per key group (32 tokens) and per value
        // group (32 channels). The full-precision window (at most 160 tokens) is left out.
        (c.hd * 2 * bits as usize / 8) as f64 + (c.hd * 4) as f64 / 32.0 + (c.hd / 32 * 4) as f64
    };
    per_token_head * (c.ctx * c.nkv * c.seqs) as f64
}

struct Row {
    case: Case,
    bits: u32,
    threads: usize,
    ms: f64,
    min: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let threads: usize = arg("--threads").map_or(2, |s| s.parse().expect("--threads N"));
    let quick = args.iter().any(|a| a == "--quick");
    // Tokens per page: 256 keeps each KV head's consecutive groups together in memory (8 groups
    // of 32), which streams from DRAM about 1.4x faster than one group per page (0).
    let page_tokens: u32 = arg("--page-tokens").map_or(256, |s| s.parse().expect("--page-tokens N"));
    let key_mode = if args.iter().any(|a| a == "--per-token-keys") { KeyMode::PerToken } else { KeyMode::PerChannel };
    let setup = Setup { threads: threads as u32, page_tokens, key_mode };
    if let Some(name) = arg("--isa") {
        let isa = Isa::from_name(&name).unwrap_or_else(|| panic!("--isa {name}: not scalar, avx2, avx512 or neon"));
        assert!(force_isa(Some(isa)), "{isa:?} is not available on this machine");
    }
    let cases = [
        Case { name: "gqa4-hs128", ctx: 512, hd: 128, nkv: 8, nq: 32, seqs: 1 },
        Case { name: "gqa4-hs128", ctx: 4096, hd: 128, nkv: 8, nq: 32, seqs: 1 },
        Case { name: "gqa4-hs128", ctx: 16384, hd: 128, nkv: 8, nq: 32, seqs: 1 },
        Case { name: "gqa4-hs128", ctx: 65536, hd: 128, nkv: 8, nq: 32, seqs: 1 },
        Case { name: "gemma3-hs256", ctx: 16384, hd: 256, nkv: 1, nq: 4, seqs: 1 },
        Case { name: "mha-hs128", ctx: 8192, hd: 128, nkv: 32, nq: 32, seqs: 1 },
        Case { name: "batch16-gqa4-hs128", ctx: 4096, hd: 128, nkv: 8, nq: 32, seqs: 16 },
    ];
    println!(
        "CPU decode attention, {threads} thread(s), instruction set {:?}, {page_tokens} tokens per page, keys {:?}",
        kivi::attention::active_isa(),
        key_mode
    );
    println!(
        "{:<20} {:>2} {:>6} {:>4} {:>3} {:>3} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} | {:>6} {:>6} {:>6}",
        "case",
        "L",
        "ctx",
        "hd",
        "kv",
        "q",
        "kivi2 ms",
        "kivi4 ms",
        "f16 ms",
        "f16/kivi2",
        "f16/kivi4",
        "k2 GB/s",
        "k2 min",
        "k4 min",
        "f16 min"
    );
    let mut rows = Vec::new();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // `--only NAME:CTX` runs one case (for profiling), `--reps N` overrides the repetitions.
    let only = arg("--only");
    let reps_arg: Option<usize> = arg("--reps").map(|s| s.parse().expect("--reps N"));
    // `--formats 2,4,16` picks the formats timed (the table shows 0 for the others; no JSON line).
    let mut formats: Vec<u32> = arg("--formats")
        .map_or(vec![2, 4, 16], |s| s.split(',').map(|x| x.parse().expect("--formats 2,4,16")).collect());
    if kivi::attention::active_isa() == Isa::Scalar {
        // The dense baseline has vector kernels only.
        formats.retain(|&f| f != 16);
    }
    for c in cases {
        if only.as_ref().is_some_and(|o| *o != format!("{}:{}", c.name, c.ctx)) {
            continue;
        }
        let reps = {
            let r = (2_000_000 / (c.ctx * c.seqs * c.nkv / 8)).clamp(15, 200);
            if quick {
                (r / 4).max(5)
            } else {
                r
            }
        };
        let reps = reps_arg.unwrap_or(reps);
        let extra = reps + 64;
        let mut k2 = kivi_cache(&c, 2, setup, extra, &mut rng);
        let mut k4 = kivi_cache(&c, 4, setup, extra, &mut rng);
        let mut d = dense_cache(&c, threads, extra, &mut rng);
        let row = c.nkv * c.hd;
        let qrow = c.nq * c.hd;
        let mut q = vec![0f32; c.seqs * qrow];
        let mut out = vec![0f32; c.seqs * qrow];
        let (mut kn, mut vn) = (vec![0f32; c.seqs * row], vec![0f32; c.seqs * row]);
        let ids: Vec<u32> = (0..c.seqs as u32).collect();
        let mut t = [Vec::new(), Vec::new(), Vec::new()];
        let nl = layers(&c);
        for rep in 0..reps + 3 {
            let layer = rep % nl;
            rng.fill(&mut q);
            rng.keys(&mut kn, c.hd);
            rng.fill(&mut vn);
            for (which, times) in t.iter_mut().enumerate() {
                if !formats.contains(&[2, 4, 16][which]) {
                    times.push(0.0);
                    continue;
                }
                let t0 = Instant::now();
                if c.seqs == 1 {
                    match which {
                        0 | 1 => {
                            let cache = if which == 0 { &k2 } else { &k4 };
                            let qr = Rows::new(&q, 1).unwrap();
                            let o = RowsMut::new(&mut out, 1).unwrap();
                            cache.attend(layer as u32, 0, qr, o, &Default::default()).unwrap();
                        }
                        _ => d.attend(layer, 1, &q, &mut out),
                    }
                } else {
                    // A batched decode step: append one token to each sequence, then attention.
                    let n = c.seqs;
                    match which {
                        0 | 1 => {
                            let cache = if which == 0 { &mut k2 } else { &mut k4 };
                            cache
                                .decode(
                                    layer as u32,
                                    &ids,
                                    Rows::new(&kn, n).unwrap(),
                                    Rows::new(&vn, n).unwrap(),
                                    Rows::new(&q, n).unwrap(),
                                    RowsMut::new(&mut out, n).unwrap(),
                                    &Default::default(),
                                )
                                .unwrap();
                        }
                        _ => d.decode(layer * n, &kn, &vn, &q, &mut out),
                    }
                }
                let dt = t0.elapsed().as_secs_f64() * 1e3;
                if rep >= 3 {
                    times.push(dt);
                }
            }
        }
        let mins: Vec<f64> = t.iter().map(|v| v.iter().copied().fold(f64::INFINITY, f64::min)).collect();
        let ms: Vec<f64> = t.iter_mut().map(|v| median(v)).collect();
        println!(
            "{:<20} {:>2} {:>6} {:>4} {:>3} {:>3} {:>9.3} {:>9.3} {:>9.3} {:>8.2}x {:>8.2}x {:>7.1} | {:>6.3} {:>6.3} {:>6.3}",
            c.name,
            nl,
            c.ctx,
            c.hd,
            c.nkv,
            c.nq,
            ms[0],
            ms[1],
            ms[2],
            ms[2] / ms[0],
            ms[2] / ms[1],
            bytes_read(&c, 2) / ms[0] / 1e6,
            mins[0],
            mins[1],
            mins[2],
        );
        for (i, bits) in [2, 4, 16].into_iter().enumerate() {
            if formats.contains(&bits) {
                rows.push(Row { case: c, bits, threads, ms: ms[i], min: mins[i] });
            }
        }
    }

    // Appending: time per token (flushes included) against the attention time of one step.
    println!();
    println!("{:<20} {:>6} {:>14} {:>16} {:>9}", "append", "bits", "us per token", "attn ms (16384)", "share");
    for bits in [2u8, 4] {
        // Only when this run timed the 16384-token attention step of these bits.
        let Some(attn) = rows
            .iter()
            .find(|r| r.case.ctx == 16384 && r.case.seqs == 1 && r.case.hd == 128 && r.bits == bits as u32)
            .map(|r| r.ms)
        else {
            continue;
        };
        let c = cases[1];
        // Blocks of `n_app` one-token appends (flushes included), timed one by one: the median.
        let (n_app, blocks) = if quick { (512, 1) } else { (2048, 9) };
        let mut cache = kivi_cache(&c, bits, setup, n_app * blocks + 64, &mut rng);
        let row = c.nkv * c.hd;
        let (mut kn, mut vn) = (vec![0f32; n_app * row], vec![0f32; n_app * row]);
        rng.keys(&mut kn, c.hd);
        rng.fill(&mut vn);
        let mut times: Vec<f64> = (0..blocks)
            .map(|_| {
                let t0 = Instant::now();
                for i in 0..n_app {
                    let (k1, v1) = (&kn[i * row..(i + 1) * row], &vn[i * row..(i + 1) * row]);
                    cache.append(0, 0, Rows::new(k1, 1).unwrap(), Rows::new(v1, 1).unwrap()).unwrap();
                }
                t0.elapsed().as_secs_f64() * 1e6 / n_app as f64
            })
            .collect();
        let us = median(&mut times);
        println!("{:<20} {:>6} {:>14.2} {:>16.3} {:>8.1}%", c.name, bits, us, attn, us / 1e3 / attn * 100.0);
    }

    println!();
    for r in &rows {
        let c = r.case;
        println!(
            "{{\"case\":\"{}\",\"bits\":{},\"ctx\":{},\"head_dim\":{},\"kv_heads\":{},\"q_heads\":{},\"threads\":{},\"ms_median\":{:.4},\"gbytes_per_s\":{:.2},\"ms_min\":{:.4}}}",
            c.name,
            r.bits,
            c.ctx,
            c.hd,
            c.nkv,
            c.nq,
            r.threads,
            r.ms,
            bytes_read(&c, r.bits) / r.ms / 1e6,
            r.min
        );
    }
}
