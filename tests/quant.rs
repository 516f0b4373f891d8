//! The quantizer: round-trip bounds, constant groups, and what the cache stores.

mod common;
use common::*;
use kivi::quant::{code_at, quantize_group, GroupParams};
use kivi::{Cache, CacheConfig, KeyMode, Rows};

/// |x - x'| allowed for a group with this range: half a step, plus the f16 rounding of the
/// scale (times the largest code) and of the zero.
fn bound(lo: f32, hi: f32, bits: u32) -> f64 {
    let levels = ((1u32 << bits) - 1) as f64;
    let (lo, hi) = (lo as f64, hi as f64);
    let step = (hi - lo) / levels;
    0.5 * step + (lo.abs() + hi.abs()) * 2f64.powi(-11) + levels * step * 2f64.powi(-11) + 1e-7
}

#[test]
fn round_trip_within_half_a_step() {
    let mut rng = Rng::fresh("round_trip_within_half_a_step");
    for bits in [2u32, 4, 8] {
        for trial in 0..200 {
            let n = 8 + rng.below(120);
            let (off, spread) = ((rng.normal() * 20.0), (rng.uniform() as f32 * 10.0).max(1e-3));
            let x: Vec<f32> = (0..n).map(|_| off + spread * rng.normal()).collect();
            let mut run = vec![0u8; (n * bits as usize).div_ceil(8)];
            let p = quantize_group(n, |i| x[i], bits, &mut run, 0);
            let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let b = bound(lo, hi, bits);
            for (i, &xi) in x.iter().enumerate() {
                let c = code_at(&run, i, bits);
                assert!(c < 1 << bits);
                let d = p.decode(c) as f64;
                assert!((xi as f64 - d).abs() <= b, "bits {bits} trial {trial}: {xi} -> {d}, bound {b}");
            }
            // The grid spans the group: its ends are within f16 rounding of the extremes.
            let top = p.decode((1 << bits) - 1) as f64;
            assert!((top - hi as f64).abs() <= b, "grid top {top} far from max {hi}");
        }
    }
}

#[test]
fn constant_groups_have_zero_scale_and_no_nan() {
    for v in [0.0f32, 1.5, -3.25, 1e-8, 60000.0] {
        for bits in [2u32, 4, 8] {
            let mut run = vec![0xFFu8; 32];
            let p = quantize_group(32, |_| v, bits, &mut run, 0);
            assert_eq!(p.scale.to_f32(), 0.0);
            for i in 0..32 {
                let d = p.decode(code_at(&run, i, bits));
                assert!(d.is_finite());
                assert_eq!(d, half::f16::from_f32(v).to_f32(), "constant {v} bits {bits}");
            }
        }
    }
    // A scale that would be NaN for an empty range is never produced.
    let p = GroupParams::from_range(2.0, 2.0, 2);
    assert_eq!(p.encode(2.0, 2), 0);
}

/// What the cache holds matches the input: sinks and the newest `residual` tokens exactly, and
/// quantized tokens within the bound of their group (per channel for keys, per token for
/// values).
#[test]
fn cache_holds_exact_window_and_bounded_groups() {
    let mut rng = Rng::fresh("cache_holds_exact_window_and_bounded_groups");
    for (kb, vb, mode, sinks) in
        [(2u8, 2u8, KeyMode::PerChannel, 0u32), (4, 2, KeyMode::PerToken, 3), (8, 8, KeyMode::PerChannel, 1)]
    {
        let (nkv, hd, g, r, vg) = (2usize, 64usize, 32usize, 64usize, 32usize);
        let mut cfg = CacheConfig::new(1, nkv as u32, hd as u32);
        (cfg.key_bits, cfg.value_bits, cfg.key_mode, cfg.sinks, cfg.residual) = (kb, vb, mode, sinks, r as u32);
        let mut cache = Cache::new(cfg).unwrap();
        let gen = KvGen::new(&mut rng, nkv, hd);
        let n = 300;
        let k = gen.keys(&mut rng, n);
        let v = gen.values(&mut rng, n);
        let row = nkv * hd;
        let mut len = 0;
        for step in [1usize, 5, 90, 1, 33, 64, 1, 105] {
            let (kk, vv) = (&k[len * row..(len + step) * row], &v[len * row..(len + step) * row]);
            cache.append(0, 0, Rows::new(kk, step).unwrap(), Rows::new(vv, step).unwrap()).unwrap();
            len += step;
            let d = cache.dequantized(0, 0).unwrap();
            assert_eq!(d.len, len);
            let s = sinks as usize;
            // Flushed tokens: whole groups, leaving between R and R+G-1 in the window.
            let q = if len >= s + r + g { (len - s - r) / g * g } else { 0 };
            for p in 0..len {
                for h in 0..nkv {
                    for c in 0..hd {
                        let (xk, xv) = (k[p * row + h * hd + c] as f64, v[p * row + h * hd + c] as f64);
                        let (dk, dv) = (d.key(p, h, c), d.value(p, h, c));
                        if p < s || p >= s + q {
                            assert_eq!((dk, dv), (xk, xv), "position {p} should be exact (len {len})");
                            continue;
                        }
                        let gs = s + (p - s) / g * g;
                        let kr: Vec<f32> = match mode {
                            KeyMode::PerChannel => (gs..gs + g).map(|t| k[t * row + h * hd + c]).collect(),
                            KeyMode::PerToken => {
                                (c / vg * vg..c / vg * vg + vg).map(|cc| k[p * row + h * hd + cc]).collect()
                            }
                        };
                        let vr: Vec<f32> = (c / vg * vg..c / vg * vg + vg).map(|cc| v[p * row + h * hd + cc]).collect();
                        let mm = |x: &[f32]| {
                            (
                                x.iter().copied().fold(f32::INFINITY, f32::min),
                                x.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                            )
                        };
                        let ((kl, kh), (vl, vh)) = (mm(&kr), mm(&vr));
                        assert!((dk - xk).abs() <= bound(kl, kh, kb as u32), "key at {p} head {h} channel {c}");
                        assert!((dv - xv).abs() <= bound(vl, vh, vb as u32), "value at {p} head {h} channel {c}");
                        assert_ne!(dk, xk + 1e9); // keep the comparison honest about NaN
                        assert!(dk.is_finite() && dv.is_finite());
                    }
                }
            }
        }
    }
}
