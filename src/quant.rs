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
//! The CUDA backend's quantizer (`cuda/quantize.cu`) computes the same numbers to the bit: every
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
                // `min(a, b)` is `a < b ? a : b`, as minps is.
                let l = round_nonneg(_mm256_min_ps(_mm256_mul_ps(y, is), levels));
                a[0] = _mm256_add_ps(a[0], l);
                a[1] = _mm256_add_ps(a[1], _mm256_mul_ps(l, l));
                a[2] = _mm256_add_ps(a[2], _mm256_mul_ps(l, y));
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
                // `max(a, b)` is `a > b ? a : b`, as maxps is.
                let q = _mm256_max_ps(_mm256_div_ps(_mm256_sub_ps(x, zv), sv), _mm256_setzero_ps());
                let c = round_nonneg(_mm256_min_ps(q, mc));
                let d = _mm256_sub_ps(x, _mm256_add_ps(_mm256_mul_ps(c, sv), zv));
                *e = _mm256_add_ps(*e, _mm256_mul_ps(d, d));
            }
        }
        e.map(|v| total(v))
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
    // Comparisons rather than `f32::min` (whose NaN rule blocks vectorization; data is finite).
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &x in xs {
        lo = if x < lo { x } else { lo };
        hi = if x > hi { x } else { hi };
    }
    let p = GroupParams::choose(xs, lo, hi, bits, rounding);
    let per_byte = (8 / bits) as usize;
    if first % per_byte != 0 || xs.len() % per_byte != 0 {
        for (i, &x) in xs.iter().enumerate() {
            set_code(run, first + i, bits, p.encode(x, bits));
        }
        return p;
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
    p
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

    #[test]
    fn two_bit_layout_is_little_endian() {
        let mut run = [0u8; 1];
        set_code(&mut run, 0, 2, 1);
        set_code(&mut run, 3, 2, 2);
        assert_eq!(run[0], 0b1000_0001);
    }
}
