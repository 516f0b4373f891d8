//! Quantization formats: asymmetric rounding to 2, 4 or 8 bits with an f16 scale and zero per
//! group, and the packing of codes (see `layout` for where groups are stored).
//!
//! Min/max rounding (the paper's, [`Rounding::MinMax`]), for a group with minimum `min` and
//! maximum `max`: `zero = min` rounded to f16, `scale = (max - zero) / (2^b - 1)` rounded to f16
//! (the paper's `(max - min) / (2^b - 1)`, measured from the zero actually stored). Least-squares
//! rounding ([`Rounding::LeastSquares`], see [`GroupParams::least_squares`]) chooses another scale
//! and zero. Either way `code = round((x - zero) / scale)` clamped to `0..=2^b-1`, computed with
//! the f16-rounded scale and zero so that codes are the nearest points of the grid that
//! dequantization uses: `x' = code * scale + zero`. A constant group has scale 0 and dequantizes
//! to its value (rounded to f16) exactly, with no division by zero.
//!
//! The CUDA backend's quantizer (`cuda/quant.cuh`) computes the same numbers to the bit: every
//! sum below is taken in the order written here, in f32, without fused multiply-adds.

use half::f16;

use crate::config::Rounding;

/// Largest finite f16: quantized data must stay within it, since zeros are stored as f16.
pub const F16_LIMIT: f32 = 65504.0;

/// The scale and zero of one group, as stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupParams {
    pub scale: f16,
    pub zero: f16,
}

impl GroupParams {
    /// Parameters for a group whose elements lie in `min..=max`.
    pub fn from_range(min: f32, max: f32, bits: u32) -> GroupParams {
        let levels = ((1u32 << bits) - 1) as f32;
        let zero = f16::from_f32(min);
        // The grid starts at the rounded zero, so it must reach `max` from there.
        let scale = f16::from_f32(((max - zero.to_f32()) / levels).max(0.0));
        GroupParams { scale, zero }
    }

    /// The code of `x` in this group.
    #[inline]
    pub fn encode(&self, x: f32, bits: u32) -> u8 {
        let s = self.scale.to_f32();
        if s == 0.0 {
            return 0;
        }
        let max_code = ((1u32 << bits) - 1) as f32;
        let c = ((x - self.zero.to_f32()) / s).round();
        c.clamp(0.0, max_code) as u8
    }

    /// The value that `code` stands for.
    #[inline]
    pub fn decode(&self, code: u32) -> f32 {
        code as f32 * self.scale.to_f32() + self.zero.to_f32()
    }

    /// Parameters for the group `xs`, whose elements lie in `lo..=hi`, by `rounding`.
    pub fn choose(xs: &[f32], lo: f32, hi: f32, bits: u32, rounding: Rounding) -> GroupParams {
        match rounding {
            Rounding::MinMax => GroupParams::from_range(lo, hi, bits),
            Rounding::LeastSquares => GroupParams::least_squares(xs, lo, hi, bits),
        }
    }

    /// [`Rounding::LeastSquares`]: of the min/max grid and the grids refitted to the codes of
    /// narrower spans, the one whose codes reconstruct `xs` (elements in `lo..=hi`) with the
    /// smallest sum of squared errors.
    ///
    /// For each factor `f` of [`LSQ_SPANS`], with `y = x - lo` and `iscale = (2^b - 1) f / (hi -
    /// lo)`: codes `l = min(round(y iscale), 2^b - 1)`, then the scale `s` and offset `o`
    /// minimizing `sum (y - l s - o)^2` (closed form; skipped unless `s > 0`), stored as
    /// `scale = f16(s)`, `zero = f16(lo + o)`. Each candidate is scored by the codes it really gives (nearest grid
    /// points, clamped) and replaces the best so far only when strictly better, so the result is
    /// never worse than min/max. The sums run in 8 interleaved lanes (element `i` into lane
    /// `i % 8`, each lane in order, the lanes added 0 to 7), which vectorizes; the CUDA quantizer
    /// sums the same way.
    pub fn least_squares(xs: &[f32], lo: f32, hi: f32, bits: u32) -> GroupParams {
        let mm = GroupParams::from_range(lo, hi, bits);
        if hi <= lo || mm.scale.to_f32() == 0.0 {
            return mm;
        }
        let levels = ((1u32 << bits) - 1) as f32;
        let n = xs.len() as f32;
        let range = hi - lo;
        let iscales = LSQ_SPANS.map(|f| levels * f / range);
        // Every candidate's sums in one pass, then every candidate's error in one: the
        // candidates are independent, and one at a time would wait on each one's reductions.
        let (sy, sums) = code_sums(xs, lo, &iscales, levels);
        let mut cands = [Some(mm); NC];
        for (c, [sl, sll, sly]) in cands[1..].iter_mut().zip(sums) {
            *c = None;
            let det = n * sll - sl * sl;
            if det <= 0.0 {
                continue;
            }
            let s = (n * sly - sl * sy) / det;
            if s <= 0.0 {
                continue;
            }
            let p = GroupParams { scale: f16::from_f32(s), zero: f16::from_f32(lo + (sy - s * sl) / n) };
            if p.scale.to_f32() > 0.0 && p.scale.is_finite() && p.zero.is_finite() {
                *c = Some(p);
            }
        }
        let errs = squared_errors(xs, &cands, bits);
        let (mut best, mut best_err) = (mm, errs[0]);
        for (c, e) in cands.into_iter().zip(errs).skip(1) {
            if let Some(p) = c {
                if e < best_err {
                    best = p;
                    best_err = e;
                }
            }
        }
        best
    }

    /// `sum (x - decode(encode(x)))^2` over `xs`, in lanes as [`GroupParams::least_squares`] says.
    pub fn squared_error(&self, xs: &[f32], bits: u32) -> f32 {
        let (s, z) = (self.scale.to_f32(), self.zero.to_f32());
        let max_code = ((1u32 << bits) - 1) as f32;
        let [e] = lanes_sums(xs, |x| {
            // As `encode` (clamping before rounding gives the same code), then `decode`.
            let c = if s == 0.0 { 0.0 } else { round_nonneg(min(max((x - z) / s, 0.0), max_code)) as f32 };
            let d = x - (c * s + z);
            [d * d]
        });
        e
    }
}

/// Number of candidate grids of least-squares rounding: min/max and [`LSQ_SPANS`].
const NC: usize = 1 + LSQ_SPANS.len();

/// `sum (x - lo)` and, for each `iscale`, the sums of `l`, `l^2` and `l (x - lo)` over `xs` for
/// the codes `l = min(round((x - lo) * iscale), levels)`, in lanes as
/// [`GroupParams::least_squares`] says.
#[inline(always)]
fn code_sums(xs: &[f32], lo: f32, iscales: &[f32; NC - 1], levels: f32) -> (f32, [[f32; 3]; NC - 1]) {
    #[cfg(target_arch = "x86_64")]
    if xs.len() % 8 == 0 && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { avx2::code_sums(xs, lo, iscales, levels) };
    }
    let [sy] = lanes_sums(xs, |x| [x - lo]);
    let sums = iscales.map(|iscale| {
        lanes_sums(xs, |x| {
            let l = round_nonneg(min((x - lo) * iscale, levels)) as f32;
            [l, l * l, l * (x - lo)]
        })
    });
    (sy, sums)
}

/// [`GroupParams::squared_error`] of each candidate (`None`: skipped, `f32::INFINITY`).
#[inline(always)]
fn squared_errors(xs: &[f32], cands: &[Option<GroupParams>; NC], bits: u32) -> [f32; NC] {
    #[cfg(target_arch = "x86_64")]
    if xs.len() % 8 == 0 && std::is_x86_feature_detected!("avx2") {
        let max_code = ((1u32 << bits) - 1) as f32;
        // A skipped candidate is scored on a dummy grid and its result dropped.
        let sz = cands.map(|c| c.map_or((1.0, 0.0), |p| (p.scale.to_f32(), p.zero.to_f32())));
        if sz.iter().all(|&(s, _)| s != 0.0) {
            // SAFETY: the CPU has AVX2.
            let e = unsafe { avx2::squared_errors(xs, &sz, max_code) };
            return std::array::from_fn(|k| if cands[k].is_some() { e[k] } else { f32::INFINITY });
        }
    }
    cands.map(|c| c.map_or(f32::INFINITY, |p| p.squared_error(xs, bits)))
}

/// The two passes of least-squares rounding with the 8 lanes in one AVX2 register and every
/// candidate at once: the same operations in the same order as the portable code, so the same
/// numbers to the bit (the portable code does not vectorize well, and this runs for every value
/// group that leaves the window).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `round_nonneg` in every lane, as f32.
    #[inline(always)]
    unsafe fn round_nonneg(v: __m256) -> __m256 {
        let half = _mm256_set1_ps(0.5);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm256_add_ps(v, half));
        let over = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_sub_ps(t, half), v);
        _mm256_sub_ps(t, _mm256_and_ps(over, _mm256_set1_ps(1.0)))
    }

    /// The lanes added in order.
    #[inline(always)]
    unsafe fn total(v: __m256) -> f32 {
        let mut a = [0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), v);
        a.iter().fold(0.0, |t, &x| t + x)
    }

    /// `super::code_sums` for `xs.len()` a multiple of 8.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn code_sums(
        xs: &[f32],
        lo: f32,
        iscales: &[f32; super::NC - 1],
        levels: f32,
    ) -> (f32, [[f32; 3]; super::NC - 1]) {
        let (lo, levels) = (_mm256_set1_ps(lo), _mm256_set1_ps(levels));
        let iscales = iscales.map(|i| _mm256_set1_ps(i));
        let mut sy = _mm256_setzero_ps();
        let mut acc = [[_mm256_setzero_ps(); 3]; super::NC - 1];
        for ch in xs.chunks_exact(8) {
            let y = _mm256_sub_ps(_mm256_loadu_ps(ch.as_ptr()), lo);
            sy = _mm256_add_ps(sy, y);
            for (a, &is) in acc.iter_mut().zip(&iscales) {
                let terms = code_terms(y, is, levels);
                for k in 0..3 {
                    a[k] = _mm256_add_ps(a[k], terms[k]);
                }
            }
        }
        (total(sy), acc.map(|a| a.map(|v| total(v))))
    }

    /// `GroupParams::squared_error` on each grid `(scale, zero)` (scales not zero) for
    /// `xs.len()` a multiple of 8.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn squared_errors(
        xs: &[f32],
        grids: &[(f32, f32); super::NC],
        max_code: f32,
    ) -> [f32; super::NC] {
        let mc = _mm256_set1_ps(max_code);
        let g = grids.map(|(s, z)| (_mm256_set1_ps(s), _mm256_set1_ps(z)));
        let mut e = [_mm256_setzero_ps(); super::NC];
        for ch in xs.chunks_exact(8) {
            let x = _mm256_loadu_ps(ch.as_ptr());
            for (e, &(sv, zv)) in e.iter_mut().zip(&g) {
                *e = _mm256_add_ps(*e, squared_diff(x, sv, zv, mc));
            }
        }
        e.map(|v| total(v))
    }

    /// The code `l = round(min(y iscale, levels))` of `y = x - lo` (`min(a, b)` is `a < b ? a :
    /// b`, as minps is), with `l^2` and `l y`: the terms of the sums of least squares.
    #[inline(always)]
    unsafe fn code_terms(y: __m256, iscale: __m256, levels: __m256) -> [__m256; 3] {
        let l = round_nonneg(_mm256_min_ps(_mm256_mul_ps(y, iscale), levels));
        [l, _mm256_mul_ps(l, l), _mm256_mul_ps(l, y)]
    }

    /// `(x - decode(encode(x)))^2` on the grid `(s, z)`, `s` not 0, as `squared_error` computes it
    /// (`max(a, b)` is `a > b ? a : b`, as maxps is).
    #[inline(always)]
    unsafe fn squared_diff(x: __m256, s: __m256, z: __m256, max_code: __m256) -> __m256 {
        let q = _mm256_max_ps(_mm256_div_ps(_mm256_sub_ps(x, z), s), _mm256_setzero_ps());
        let c = round_nonneg(_mm256_min_ps(q, max_code));
        let d = _mm256_sub_ps(x, _mm256_add_ps(_mm256_mul_ps(c, s), z));
        _mm256_mul_ps(d, d)
    }

    /// Largest group [`group_params`] takes.
    pub(super) const MAX_GROUP: usize = 256;

    /// The parameters `super::slice_params` chooses for each consecutive group of `n` elements of
    /// `xs` (`params.len()` a multiple of 8, `n` a multiple of 8 up to [`MAX_GROUP`]), eight groups
    /// at a time, one per lane. Each lane repeats the scalar operations of its group in their
    /// order: the running minimum and maximum element by element, every sum in the order of
    /// `lanes_sums` (element `i` into partial sum `i % 8`, the partial sums added 0 to 7), the
    /// candidates' parameters with the same roundings to f16 (F16C rounds to nearest even, as
    /// `half` does), and the same strict comparison to keep the best; so the same bits.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn group_params(xs: &[f32], n: usize, bits: u32, lsq: bool, params: &mut [super::GroupParams]) {
        assert!(n % 8 == 0 && n <= MAX_GROUP && params.len() % 8 == 0 && xs.len() == params.len() * n);
        // Element `i` of the eight groups, one group per lane.
        let mut t = [_mm256_setzero_ps(); MAX_GROUP];
        for (x8, p8) in xs.chunks_exact(8 * n).zip(params.chunks_exact_mut(8)) {
            for i0 in (0..n).step_by(8) {
                let mut rows = [_mm256_setzero_ps(); 8];
                for (g, r) in rows.iter_mut().enumerate() {
                    *r = _mm256_loadu_ps(x8[g * n + i0..].as_ptr());
                }
                t[i0..i0 + 8].copy_from_slice(&transpose8(rows));
            }
            let (scale, zero) = params8(&t[..n], bits, lsq);
            let (mut s, mut z) = ([0u16; 8], [0u16; 8]);
            _mm_storeu_si128(s.as_mut_ptr().cast(), to_f16(scale));
            _mm_storeu_si128(z.as_mut_ptr().cast(), to_f16(zero));
            for (g, p) in p8.iter_mut().enumerate() {
                *p = super::GroupParams { scale: half::f16::from_bits(s[g]), zero: half::f16::from_bits(z[g]) };
            }
        }
    }

    /// Rows `r[g]` as columns: lane `g` of result `i` is lane `i` of `r[g]`.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let [a, b, c, d, e, f, g, h] = r;
        let (ab0, ab1) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
        let (cd0, cd1) = (_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
        let (ef0, ef1) = (_mm256_unpacklo_ps(e, f), _mm256_unpackhi_ps(e, f));
        let (gh0, gh1) = (_mm256_unpacklo_ps(g, h), _mm256_unpackhi_ps(g, h));
        // Lanes 0, 1, 2, 3 of a to d, then of e to h, in each 128-bit half (4 to 7 in the upper).
        let lo4 = [
            _mm256_shuffle_ps::<0x44>(ab0, cd0),
            _mm256_shuffle_ps::<0xee>(ab0, cd0),
            _mm256_shuffle_ps::<0x44>(ab1, cd1),
            _mm256_shuffle_ps::<0xee>(ab1, cd1),
        ];
        let hi4 = [
            _mm256_shuffle_ps::<0x44>(ef0, gh0),
            _mm256_shuffle_ps::<0xee>(ef0, gh0),
            _mm256_shuffle_ps::<0x44>(ef1, gh1),
            _mm256_shuffle_ps::<0xee>(ef1, gh1),
        ];
        let mut out = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            out[i] = _mm256_permute2f128_ps::<0x20>(lo4[i], hi4[i]);
            out[i + 4] = _mm256_permute2f128_ps::<0x31>(lo4[i], hi4[i]);
        }
        out
    }

    /// Every lane rounded to f16.
    #[inline(always)]
    unsafe fn to_f16(v: __m256) -> __m128i {
        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)
    }

    /// Every lane rounded to f16 and back.
    #[inline(always)]
    unsafe fn round_f16(v: __m256) -> __m256 {
        _mm256_cvtph_ps(to_f16(v))
    }

    /// Lanes that are neither infinite nor NaN.
    #[inline(always)]
    unsafe fn finite(v: __m256) -> __m256 {
        let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
        _mm256_cmp_ps::<_CMP_LT_OQ>(abs, _mm256_set1_ps(f32::INFINITY))
    }

    /// `a` where `m` is set, else `b`.
    #[inline(always)]
    unsafe fn select(m: __m256, a: __m256, b: __m256) -> __m256 {
        _mm256_blendv_ps(b, a, m)
    }

    /// The sum of `y = x - lo` over the group in `t`, then for each span's `iscale` the sums of
    /// `l`, `l^2` and `l y` (`l = round(min(y iscale, levels))`), in the order of `lanes_sums`.
    #[inline(always)]
    unsafe fn code_sums8(
        t: &[__m256],
        lo: __m256,
        iscales: &[__m256; super::NC - 1],
        levels: __m256,
    ) -> (__m256, [[__m256; 3]; super::NC - 1]) {
        let mut sy = _mm256_setzero_ps();
        for j in 0..8 {
            let mut a = _mm256_setzero_ps();
            for x in t.iter().skip(j).step_by(8) {
                a = _mm256_add_ps(a, _mm256_sub_ps(*x, lo));
            }
            sy = _mm256_add_ps(sy, a);
        }
        // Loops, not closures: a closure is not compiled with AVX2 unless it is inlined.
        let mut sums = [[_mm256_setzero_ps(); 3]; super::NC - 1];
        for (s, &is) in sums.iter_mut().zip(iscales) {
            for j in 0..8 {
                let mut a = [_mm256_setzero_ps(); 3];
                for x in t.iter().skip(j).step_by(8) {
                    let terms = code_terms(_mm256_sub_ps(*x, lo), is, levels);
                    for k in 0..3 {
                        a[k] = _mm256_add_ps(a[k], terms[k]);
                    }
                }
                for k in 0..3 {
                    s[k] = _mm256_add_ps(s[k], a[k]);
                }
            }
        }
        (sy, sums)
    }

    /// `GroupParams::squared_error` of the grid `(s, z)` (no lane's scale 0) over the group in
    /// `t`, in the order of `lanes_sums`.
    #[inline(always)]
    unsafe fn squared_error8(t: &[__m256], s: __m256, z: __m256, max_code: __m256) -> __m256 {
        let mut e = _mm256_setzero_ps();
        for j in 0..8 {
            let mut a = _mm256_setzero_ps();
            for x in t.iter().skip(j).step_by(8) {
                a = _mm256_add_ps(a, squared_diff(*x, s, z, max_code));
            }
            e = _mm256_add_ps(e, a);
        }
        e
    }

    /// `slice_params` of the eight groups in `t` (lane `g` of `t[i]`: element `i` of group `g`):
    /// their scales and zeros, as f32.
    #[inline(always)]
    unsafe fn params8(t: &[__m256], bits: u32, lsq: bool) -> (__m256, __m256) {
        let (mut lo, mut hi) = (_mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(f32::NEG_INFINITY));
        for &x in t {
            // minps and maxps are `x < lo ? x : lo` and `x > hi ? x : hi`, as the scalar loop.
            lo = _mm256_min_ps(x, lo);
            hi = _mm256_max_ps(x, hi);
        }
        // `GroupParams::from_range`. `f32::max(v, 0.0)` is maxps here: `v` is never -0.0 or NaN.
        let levels = _mm256_set1_ps(((1u32 << bits) - 1) as f32);
        let zero = round_f16(lo);
        let scale = round_f16(_mm256_max_ps(_mm256_div_ps(_mm256_sub_ps(hi, zero), levels), _mm256_setzero_ps()));
        // `GroupParams::least_squares` where the range is not empty and min/max's scale not 0.
        let zeros = _mm256_setzero_ps();
        let active = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(hi, lo), _mm256_cmp_ps::<_CMP_NEQ_UQ>(scale, zeros));
        if !lsq || _mm256_movemask_ps(active) == 0 {
            return (scale, zero);
        }
        let nf = _mm256_set1_ps(t.len() as f32);
        let range = _mm256_sub_ps(hi, lo);
        let mut iscales = [zeros; super::NC - 1];
        for (is, f) in iscales.iter_mut().zip(super::LSQ_SPANS) {
            *is = _mm256_div_ps(_mm256_mul_ps(levels, _mm256_set1_ps(f)), range);
        }
        let (sy, sums) = code_sums8(t, lo, &iscales, levels);
        let (mut best_s, mut best_z) = (scale, zero);
        let mut best_e = squared_error8(t, scale, zero, levels);
        for [sl, sll, sly] in sums {
            let det = _mm256_sub_ps(_mm256_mul_ps(nf, sll), _mm256_mul_ps(sl, sl));
            let s = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(nf, sly), _mm256_mul_ps(sl, sy)), det);
            let cs = round_f16(s);
            let off = _mm256_div_ps(_mm256_sub_ps(sy, _mm256_mul_ps(s, sl)), nf);
            let cz = round_f16(_mm256_add_ps(lo, off));
            let mut ok = _mm256_and_ps(active, _mm256_cmp_ps::<_CMP_GT_OQ>(det, zeros));
            ok = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_GT_OQ>(s, zeros));
            ok = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_GT_OQ>(cs, zeros));
            ok = _mm256_and_ps(ok, _mm256_and_ps(finite(cs), finite(cz)));
            if _mm256_movemask_ps(ok) == 0 {
                continue;
            }
            // Lanes without a candidate are scored on a dummy grid and their result dropped.
            let e = squared_error8(t, select(ok, cs, _mm256_set1_ps(1.0)), select(ok, cz, zeros), levels);
            let better = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_LT_OQ>(e, best_e));
            best_s = select(better, cs, best_s);
            best_z = select(better, cz, best_z);
            best_e = select(better, e, best_e);
        }
        (best_s, best_z)
    }
}

/// Spans [`GroupParams::least_squares`] tries, as divisors of the group's range.
pub const LSQ_SPANS: [f32; 5] = [1.0, 1.1, 1.2, 1.3, 1.4];

/// The `K` sums of `f(x)` over `xs`, each in 8 interleaved lanes: element `i` into lane `i % 8`,
/// each lane in order, then the lanes added in order. A fixed order that vectorizes and that the
/// CUDA code repeats.
#[inline(always)]
fn lanes_sums<const K: usize>(xs: &[f32], f: impl Fn(f32) -> [f32; K]) -> [f32; K] {
    let mut acc = [[0f32; 8]; K];
    let mut chunks = xs.chunks_exact(8);
    for ch in &mut chunks {
        for (j, &x) in ch.iter().enumerate() {
            let v = f(x);
            for k in 0..K {
                acc[k][j] += v[k];
            }
        }
    }
    for (j, &x) in chunks.remainder().iter().enumerate() {
        let v = f(x);
        for (a, v) in acc.iter_mut().zip(v) {
            a[j] += v;
        }
    }
    acc.map(|a| a.iter().fold(0.0, |t, &x| t + x))
}

/// Reads code `i` of a packed run of `bits`-bit codes.
#[inline(always)]
pub fn code_at(run: &[u8], i: usize, bits: u32) -> u32 {
    let bit = i * bits as usize;
    ((run[bit / 8] >> (bit % 8)) as u32) & ((1u32 << bits) - 1)
}

/// Writes code `i` of a packed run (the run must be zeroed or hold an older code there).
#[inline(always)]
pub fn set_code(run: &mut [u8], i: usize, bits: u32, code: u8) {
    let bit = i * bits as usize;
    let mask = (((1u32 << bits) - 1) << (bit % 8)) as u8;
    let b = &mut run[bit / 8];
    *b = (*b & !mask) | ((code << (bit % 8)) & mask);
}

/// Quantizes `n` elements given by `get` into one group with min/max rounding: returns its
/// parameters and writes the packed codes into `run` at code positions `first..first + n`.
pub fn quantize_group(n: usize, get: impl Fn(usize) -> f32, bits: u32, run: &mut [u8], first: usize) -> GroupParams {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for i in 0..n {
        let x = get(i);
        lo = lo.min(x);
        hi = hi.max(x);
    }
    let p = GroupParams::from_range(lo, hi, bits);
    for i in 0..n {
        set_code(run, first + i, bits, p.encode(get(i), bits));
    }
    p
}

/// [`quantize_group`] for elements already in a slice, by `rounding` (with min/max, the same codes
/// as `quantize_group`), faster: no libm call for the rounding, and whole bytes of codes written
/// at once when the group starts and ends on byte boundaries.
pub fn quantize_slice(xs: &[f32], bits: u32, rounding: Rounding, run: &mut [u8], first: usize) -> GroupParams {
    let p = slice_params(xs, bits, rounding);
    encode_slice(xs, p, bits, run, first);
    p
}

/// [`quantize_slice`] of each of the consecutive groups of `group` elements of `xs` (`xs.len() =
/// params.len() * group`): group `i`'s parameters go to `params[i]` and its codes to `run` at code
/// positions `i * group..(i + 1) * group`. The same parameters and codes to the bit, found faster:
/// on AVX2, with `group` a multiple of 8 up to 256, eight groups at a time, one per vector lane,
/// so that the range, every candidate grid of least-squares rounding and the choice among them
/// vectorize without horizontal sums or scalar f16 conversions.
pub fn quantize_groups(
    xs: &[f32],
    group: usize,
    bits: u32,
    rounding: Rounding,
    run: &mut [u8],
    params: &mut [GroupParams],
) {
    assert!(group > 0 && xs.len() == params.len() * group, "{} elements in groups of {group}", xs.len());
    // Groups whose parameters the vector code finds.
    #[cfg(target_arch = "x86_64")]
    let done = if group % 8 == 0
        && group <= avx2::MAX_GROUP
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("f16c")
    {
        let done = params.len() / 8 * 8;
        let lsq = rounding == Rounding::LeastSquares;
        // SAFETY: the CPU has AVX2 and F16C; the lengths are as `group_params` needs them.
        unsafe { avx2::group_params(&xs[..done * group], group, bits, lsq, &mut params[..done]) };
        done
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (g, p) in xs[done * group..].chunks_exact(group).zip(&mut params[done..]) {
        *p = slice_params(g, bits, rounding);
    }
    for (i, (g, p)) in xs.chunks_exact(group).zip(params.iter()).enumerate() {
        encode_slice(g, *p, bits, run, i * group);
    }
}

/// The parameters [`quantize_slice`] chooses for `xs`.
#[inline(always)]
fn slice_params(xs: &[f32], bits: u32, rounding: Rounding) -> GroupParams {
    // Comparisons rather than `f32::min` (whose NaN rule blocks vectorization; data is finite).
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &x in xs {
        lo = if x < lo { x } else { lo };
        hi = if x > hi { x } else { hi };
    }
    GroupParams::choose(xs, lo, hi, bits, rounding)
}

/// Writes the codes of `xs` on the grid `p` into `run` at code positions `first..first +
/// xs.len()`.
#[inline(always)]
fn encode_slice(xs: &[f32], p: GroupParams, bits: u32, run: &mut [u8], first: usize) {
    let per_byte = (8 / bits) as usize;
    if first % per_byte != 0 || xs.len() % per_byte != 0 {
        for (i, &x) in xs.iter().enumerate() {
            set_code(run, first + i, bits, p.encode(x, bits));
        }
        return;
    }
    let (s, z) = (p.scale.to_f32(), p.zero.to_f32());
    let max_code = ((1u32 << bits) - 1) as f32;
    let bytes = &mut run[first / per_byte..(first + xs.len()) / per_byte];
    // Codes in blocks (a plain loop the compiler vectorizes), then packed.
    let mut codes = [0u32; 64];
    for (xb, bb) in xs.chunks(64).zip(bytes.chunks_mut(64 / per_byte)) {
        if s != 0.0 {
            for (c, &x) in codes.iter_mut().zip(xb) {
                // As `encode`: clamping before rounding gives the same code.
                *c = round_nonneg(((x - z) / s).max(0.0).min(max_code));
            }
        }
        for (b, cs) in bb.iter_mut().zip(codes.chunks_exact(per_byte)) {
            *b = cs.iter().enumerate().fold(0u32, |v, (j, &c)| v | c << (j as u32 * bits)) as u8;
        }
    }
}

/// Columns [`quantize_columns`] handles at once: one AVX-512 register, two AVX2 ones.
const COLS: usize = 16;

/// Min/max quantization of `cols` groups at once, one per column of the row-major `xs` (`n =
/// xs.len() / cols` rows; element `t` of group `j` is `xs[t * cols + j]`): the parameters and
/// codes that [`quantize_slice`] with [`Rounding::MinMax`] gives each column, to the bit, but
/// computed across columns, which vectorizes (per-channel keys arrive as token rows). Group `j`'s
/// packed codes fill `codes[j * run..(j + 1) * run]` (`run = n * bits / 8`, whole bytes) and its
/// parameters go to `params[j]`.
pub fn quantize_columns(xs: &[f32], cols: usize, bits: u32, codes: &mut [u8], params: &mut [GroupParams]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { quantize_columns_avx2(xs, cols, bits, codes, params) };
    }
    quantize_columns_body(xs, cols, bits, codes, params)
}

/// [`quantize_columns`] compiled for AVX2 (the same operations, so the same numbers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_columns_avx2(xs: &[f32], cols: usize, bits: u32, codes: &mut [u8], params: &mut [GroupParams]) {
    quantize_columns_body(xs, cols, bits, codes, params)
}

#[inline(always)]
fn quantize_columns_body(xs: &[f32], cols: usize, bits: u32, codes: &mut [u8], params: &mut [GroupParams]) {
    let n = xs.len() / cols;
    let per_byte = (8 / bits) as usize;
    let run = n / per_byte;
    assert!(xs.len() == n * cols && n % per_byte == 0, "{} elements in {cols} columns", xs.len());
    assert!(codes.len() == cols * run && params.len() == cols);
    let max_code = ((1u32 << bits) - 1) as f32;
    for j0 in (0..cols).step_by(COLS) {
        let w = COLS.min(cols - j0);
        // Row `t` of this block of columns; a narrower last block repeats its first column.
        let row = |t: usize| -> [f32; COLS] {
            let r = &xs[t * cols + j0..t * cols + j0 + w];
            std::array::from_fn(|j| r[if j < w { j } else { 0 }])
        };
        let (mut lo, mut hi) = ([f32::INFINITY; COLS], [f32::NEG_INFINITY; COLS]);
        for t in 0..n {
            let r = row(t);
            for j in 0..COLS {
                lo[j] = min(r[j], lo[j]);
                hi[j] = max(r[j], hi[j]);
            }
        }
        let p: [GroupParams; COLS] = std::array::from_fn(|j| GroupParams::from_range(lo[j], hi[j], bits));
        let (s, z) = (p.map(|p| p.scale.to_f32()), p.map(|p| p.zero.to_f32()));
        // A zero scale must give code 0, as in `quantize_slice`. Dividing by 1 there does: f16
        // rounds a scale to 0 only below 2^-25, so every element is within `levels * 2^-25`
        // above the zero (or below it) and rounds to 0.
        let div = s.map(|s| if s != 0.0 { s } else { 1.0 });
        for k in 0..run {
            let mut byte = [0u32; COLS];
            for q in 0..per_byte {
                let r = row(k * per_byte + q);
                for j in 0..COLS {
                    // As `quantize_slice`: clamping before rounding gives the same code.
                    let c = round_nonneg(min(max((r[j] - z[j]) / div[j], 0.0), max_code));
                    byte[j] |= c << (q as u32 * bits);
                }
            }
            for j in 0..w {
                codes[(j0 + j) * run + k] = byte[j] as u8;
            }
        }
        params[j0..j0 + w].copy_from_slice(&p[..w]);
    }
}

/// `a.min(b)` for numbers (not NaN), as a comparison, which vectorizes.
#[inline(always)]
fn min(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

/// `a.max(b)` for numbers (not NaN), as a comparison, which vectorizes.
#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// `v.round()` (halves away from zero) for `0 <= v < 2^23`, without a libm call: `v + 0.5`
/// truncated, less one when the addition rounded up past an integer.
#[inline(always)]
fn round_nonneg(v: f32) -> u32 {
    debug_assert!((0.0..8388608.0).contains(&v));
    // SAFETY: v + 0.5 is finite and within i32 (callers clamp to 0..=255); the unchecked
    // conversion is the one the compiler vectorizes (`as` saturates, and does not).
    let t: i32 = unsafe { (v + 0.5).to_int_unchecked() };
    (if t as f32 - 0.5 > v { t - 1 } else { t }) as u32
}

/// Reads f16 number `i` of a little-endian byte area.
#[inline(always)]
pub fn read_f16(bytes: &[u8], i: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]))
}

/// Writes f16 number `i` of a little-endian byte area.
#[inline(always)]
pub fn write_f16(bytes: &mut [u8], i: usize, v: f16) {
    bytes[2 * i..2 * i + 2].copy_from_slice(&v.to_bits().to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform numbers in [0, 1) from a fixed seed (xorshift).
    fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    #[test]
    fn packing_round_trips_every_position() {
        for bits in [2u32, 4, 8] {
            let n = 64;
            let mut run = vec![0u8; n * bits as usize / 8];
            let codes: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
            for (i, &c) in codes.iter().enumerate() {
                set_code(&mut run, i, bits, c);
            }
            for (i, &c) in codes.iter().enumerate() {
                assert_eq!(code_at(&run, i, bits), c as u32, "bits {bits} index {i}");
            }
            // Overwriting one code leaves its neighbours alone.
            set_code(&mut run, 5, bits, 1);
            assert_eq!(code_at(&run, 5, bits), 1);
            assert_eq!(code_at(&run, 4, bits), codes[4] as u32);
            assert_eq!(code_at(&run, 6, bits), codes[6] as u32);
        }
    }

    #[test]
    fn quantize_slice_matches_quantize_group() {
        let mut next = uniform(0x1234_5678_9abc_def0);
        for bits in [2u32, 4, 8] {
            for n in [8usize, 32, 64, 256] {
                for trial in 0..50 {
                    let mut xs: Vec<f32> = (0..n).map(|_| next() * 8.0 - 3.0).collect();
                    if trial == 0 {
                        xs.iter_mut().for_each(|x| *x = 1.5);
                    }
                    if trial == 1 {
                        // Halfway points of the grid and their neighbours.
                        let lv = ((1u32 << bits) - 1) as f32;
                        for (i, x) in xs.iter_mut().enumerate() {
                            let h = (i % (lv as usize)) as f32 + 0.5;
                            *x = h / lv * 4.0 + [0.0, 1e-7, -1e-7][i % 3];
                        }
                    }
                    let mut a = vec![0u8; (n + 16) * bits as usize / 8];
                    let mut b = a.clone();
                    let first = [0usize, 8, 16][trial % 3];
                    let pa = quantize_group(n, |i| xs[i], bits, &mut a, first);
                    let pb = quantize_slice(&xs, bits, Rounding::MinMax, &mut b, first);
                    assert_eq!(pa, pb);
                    assert_eq!(a, b, "bits {bits} n {n} trial {trial}");
                }
            }
        }
        for v in [0.0f32, 0.49999997, 0.5, 0.50000006, 1.4999999, 1.5, 2.5, 254.5, 255.0] {
            assert_eq!(round_nonneg(v), v.round() as u32, "{v}");
        }
    }

    /// Every column of `quantize_columns` is `quantize_slice` (min/max) of that column, to the
    /// bit: widths below, at and past a block of columns, constant columns, an outlier, halfway
    /// points of the grid, zeros that f16 rounds above the whole column, and scales it rounds to 0.
    #[test]
    fn quantize_columns_matches_quantize_slice_per_column() {
        let mut next = uniform(0x0bad_5eed_1234_5678);
        for bits in [2u32, 4, 8] {
            for (n, cols) in [(8usize, 8usize), (32, 16), (32, 24), (64, 40), (256, 16), (32, 128)] {
                for trial in 0..6 {
                    let mut xs: Vec<f32> = (0..n * cols).map(|_| next() * 8.0 - 3.0).collect();
                    for j in 0..cols {
                        let col = (0..n).map(|t| t * cols + j);
                        match (j + trial) % 6 {
                            0 => col.for_each(|i| xs[i] = 1.5),
                            1 => col.for_each(|i| xs[i] = xs[i] * 1e-4 - 34.5625),
                            2 => xs[(j * 7 % n) * cols + j] *= 40.0,
                            3 => {
                                let lv = ((1u32 << bits) - 1) as f32;
                                col.enumerate().for_each(|(t, i)| xs[i] = ((t as f32 % lv) + 0.5) / lv * 4.0)
                            }
                            // One f32 step wide: a subnormal f16 scale at 2 bits, 0 at 8.
                            4 => col.enumerate().for_each(|(t, i)| xs[i] = 1.0 + f32::EPSILON * (t % 2) as f32),
                            _ => {}
                        }
                    }
                    let run = n * bits as usize / 8;
                    let mut codes = vec![0xa5u8; cols * run];
                    let mut params = vec![GroupParams::from_range(9.0, 9.0, bits); cols];
                    quantize_columns(&xs, cols, bits, &mut codes, &mut params);
                    for j in 0..cols {
                        let col: Vec<f32> = (0..n).map(|t| xs[t * cols + j]).collect();
                        let mut want = vec![0u8; run];
                        let p = quantize_slice(&col, bits, Rounding::MinMax, &mut want, 0);
                        assert_eq!(params[j], p, "bits {bits} n {n} cols {cols} column {j}");
                        assert_eq!(codes[j * run..(j + 1) * run], want, "bits {bits} n {n} cols {cols} column {j}");
                    }
                }
            }
        }
    }

    /// Every group of `quantize_groups` is `quantize_slice` of that group, to the bit, with both
    /// roundings: counts of groups below, at and past a block of eight, group sizes that are and
    /// are not multiples of 8, and groups that take each branch of least squares: constant,
    /// one f32 step wide (a scale f16 rounds to 0 or to a subnormal), halfway points of the
    /// grid, an outlier, signed zeros, values near the f16 limit and zeros f16 rounds past them.
    #[test]
    fn quantize_groups_matches_quantize_slice_per_group() {
        let mut next = uniform(0x5eed_0f9a_0c12_3456);
        for bits in [2u32, 4, 8] {
            for rounding in [Rounding::LeastSquares, Rounding::MinMax] {
                for (group, n_groups) in
                    [(32usize, 8usize), (32, 17), (8, 9), (16, 7), (64, 24), (256, 8), (24, 16), (4, 11)]
                {
                    let mut xs: Vec<f32> = (0..group * n_groups).map(|_| next() * 8.0 - 3.0).collect();
                    for (g, x) in xs.chunks_exact_mut(group).enumerate() {
                        let lv = ((1u32 << bits) - 1) as f32;
                        match (g + bits as usize) % 9 {
                            0 => x.iter_mut().for_each(|x| *x = 1.5),
                            1 => x.iter_mut().enumerate().for_each(|(i, x)| *x = 1.0 + f32::EPSILON * (i % 2) as f32),
                            2 => x.iter_mut().enumerate().for_each(|(i, x)| *x = ((i as f32 % lv) + 0.5) / lv * 4.0),
                            3 => x[g % group] *= 40.0,
                            4 => x.iter_mut().enumerate().for_each(|(i, x)| *x = [0.0, -0.0][i % 2]),
                            5 => x.iter_mut().for_each(|x| *x = *x * 8000.0 + 30000.0),
                            6 => x.iter_mut().for_each(|x| *x = *x * 1e-4 - 34.5625),
                            7 => x.iter_mut().for_each(|x| *x = (*x * 0.3).exp()),
                            _ => {}
                        }
                    }
                    let mut codes = vec![0xa5u8; xs.len() * bits as usize / 8 + 1];
                    let mut params = vec![GroupParams::from_range(9.0, 9.0, bits); n_groups];
                    quantize_groups(&xs, group, bits, rounding, &mut codes, &mut params);
                    let mut want = vec![0xa5u8; codes.len()];
                    for (g, x) in xs.chunks_exact(group).enumerate() {
                        let p = quantize_slice(x, bits, rounding, &mut want, g * group);
                        let what = format!("bits {bits} {rounding:?} group {group} of {n_groups}: group {g}");
                        assert_eq!(params[g].scale.to_bits(), p.scale.to_bits(), "{what}");
                        assert_eq!(params[g].zero.to_bits(), p.zero.to_bits(), "{what}");
                    }
                    assert_eq!(codes, want, "bits {bits} {rounding:?} group {group} of {n_groups}");
                }
            }
        }
    }

    #[test]
    fn two_bit_layout_is_little_endian() {
        let mut run = [0u8; 1];
        set_code(&mut run, 0, 2, 1);
        set_code(&mut run, 3, 2, 2);
        assert_eq!(run[0], 0b1000_0001);
    }
}
