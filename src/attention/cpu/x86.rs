//! x86-64 vectors: AVX-512 (16 lanes) and AVX2 + FMA + F16C (8 lanes).

use super::simd::{twice, Simd};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// How the AVX2 key loop unpacks 2-bit codes that several query vectors share: 0 as suits the
/// CPU ([`shuffles_share_fma_pipes`]), 1 through a permute, 2 masked and converted.
static SHARED_PERMUTE: AtomicU8 = AtomicU8::new(0);

/// Forces one way of unpacking shared 2-bit key codes on AVX2 (`None`: as suits the CPU), so
/// that tests run both on any machine.
pub(crate) fn force_shared_permute(on: Option<bool>) {
    SHARED_PERMUTE.store(on.map_or(0, |p| if p { 1 } else { 2 }), Ordering::Relaxed);
}

/// Whether this is an AMD (or Hygon) core, whose FP shuffles share a pipe with the FMAs: a
/// permute per 8 key codes then slows the FMA-bound key loop (measured on Zen 3: BENCHMARKS.md),
/// where Intel cores run it on a port of its own.
fn shuffles_share_fma_pipes() -> bool {
    static AMD: OnceLock<bool> = OnceLock::new();
    *AMD.get_or_init(|| {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let r = unsafe { __cpuid(0) };
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&r.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine"
    })
}

/// AVX-512 F/BW/VL with FMA and F16C.
#[derive(Clone, Copy)]
pub(crate) struct Avx512;

/// AVX2 with FMA and F16C.
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

/// The 8 bytes of 16 4-bit codes: bytes 0-3 in lanes 0-7, bytes 4-7 in lanes 8-15 (one load and
/// one permute; two broadcasts and an insert compile to five instructions).
#[inline(always)]
unsafe fn nibbles16(p: *const u8) -> __m512i {
    let v = _mm512_castsi128_si512(_mm_loadl_epi64(p as *const __m128i));
    _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), v)
}

/// 8 two-bit codes (one u16), code `i` shifted to the bottom of lane `i`; the bits above it are
/// the following codes.
#[inline(always)]
unsafe fn crumbs8(p: *const u8) -> __m256i {
    let x = _mm256_set1_epi32((p as *const u16).read_unaligned() as i32);
    _mm256_srlv_epi32(x, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14))
}

/// [`crumbs8`] of the 16 two-bit codes at `p` (one u32): codes 0-7, then 8-15. One broadcast
/// load where two u16 reads cost a load, a move and a broadcast each.
#[inline(always)]
unsafe fn crumbs16(p: *const u8) -> [__m256i; 2] {
    let x = _mm256_set1_epi32((p as *const i32).read_unaligned());
    [
        _mm256_srlv_epi32(x, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
        _mm256_srlv_epi32(x, _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30)),
    ]
}

impl Simd for Avx512 {
    const L: usize = 16;
    const ACC_REGS: usize = 16;
    type V = __m512;

    /// A transposing tree: 16 row sums in about 46 instructions instead of 16 reductions.
    #[inline(always)]
    unsafe fn reduce_rows(rows: *const f32, out: *mut f32) {
        let v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(rows.add(16 * i)));
        // 128-bit blocks of w[i]: halves of v[i] (0, 1), halves of v[i + 8] (2, 3).
        let w: [__m512; 8] = std::array::from_fn(|i| {
            let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(v[i], v[i + 8]);
            let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(v[i], v[i + 8]);
            _mm512_add_ps(lo, hi)
        });
        // Blocks of x[i]: quarters of v[i], v[i + 8], v[i + 4], v[i + 12].
        let x: [__m512; 4] = std::array::from_fn(|i| {
            let lo = _mm512_shuffle_f32x4::<0b10_00_10_00>(w[i], w[i + 4]);
            let hi = _mm512_shuffle_f32x4::<0b11_01_11_01>(w[i], w[i + 4]);
            _mm512_add_ps(lo, hi)
        });
        let y01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
        let y23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
        let r =
            _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(y01, y23), _mm512_shuffle_ps::<0b11_10_11_10>(y01, y23));
        // Blocks of r: sums of rows 0-3, 8-11, 4-7, 12-15.
        _mm512_storeu_ps(out, _mm512_shuffle_f32x4::<0b11_01_10_00>(r, r));
    }

    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        let x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x))
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn min(a: __m512, b: __m512) -> __m512 {
        _mm512_min_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn hsum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline(always)]
    unsafe fn hmax(v: __m512) -> f32 {
        _mm512_reduce_max_ps(v)
    }
    #[inline(always)]
    unsafe fn round(v: __m512) -> __m512 {
        _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
    }
    #[inline(always)]
    unsafe fn pow2i(n: __m512) -> __m512 {
        let e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
    }
    #[inline(always)]
    unsafe fn codes<const B: u32>(p: *const u8) -> __m512 {
        match B {
            2 => {
                // 16 codes in one u32: shift each lane's code to the bottom; the permute reads the
                // low 4 bits of each lane, so a table of (i & 3) both masks and converts.
                let x = _mm512_set1_epi32((p as *const i32).read_unaligned());
                let sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let t = _mm512_setr_ps(0., 1., 2., 3., 0., 1., 2., 3., 0., 1., 2., 3., 0., 1., 2., 3.);
                _mm512_permutexvar_ps(_mm512_srlv_epi32(x, sh), t)
            }
            4 => {
                let x = nibbles16(p);
                let sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
                let t = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
                _mm512_permutexvar_ps(_mm512_srlv_epi32(x, sh), t)
            }
            _ => _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))),
        }
    }

    /// For 2 and 4 bits, the 4 or 16 dequantized values: the permute that converts codes then
    /// dequantizes them too, one table per token and value group instead of one FMA per vector.
    type D = [__m512; 2];
    #[inline(always)]
    unsafe fn deq_prep<const B: u32>(s: f32, z: f32) -> [__m512; 2] {
        let (s, z) = (_mm512_set1_ps(s), _mm512_set1_ps(z));
        match B {
            2 => {
                let i = _mm512_setr_ps(0., 1., 2., 3., 0., 1., 2., 3., 0., 1., 2., 3., 0., 1., 2., 3.);
                [_mm512_fmadd_ps(i, s, z), z]
            }
            4 => {
                let i = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
                [_mm512_fmadd_ps(i, s, z), z]
            }
            _ => [s, z],
        }
    }
    #[inline(always)]
    unsafe fn codes_deq<const B: u32>(p: *const u8, d: [__m512; 2]) -> __m512 {
        match B {
            2 => {
                let x = _mm512_set1_epi32((p as *const i32).read_unaligned());
                let sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                _mm512_permutexvar_ps(_mm512_srlv_epi32(x, sh), d[0])
            }
            4 => {
                let x = nibbles16(p);
                let sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
                _mm512_permutexvar_ps(_mm512_srlv_epi32(x, sh), d[0])
            }
            _ => _mm512_fmadd_ps(Self::codes::<B>(p), d[0], d[1]),
        }
    }
}

impl Simd for Avx2 {
    const L: usize = 8;
    const ACC_REGS: usize = 8;
    type V = __m256;

    /// A transposing tree: 8 row sums from 6 horizontal adds, 2 lane swaps and one add instead
    /// of 8 reductions.
    #[inline(always)]
    unsafe fn reduce_rows(rows: *const f32, out: *mut f32) {
        let v: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(rows.add(8 * i)));
        // Pair sums of rows 2i and 2i + 1, by 128-bit half.
        let w: [__m256; 4] = std::array::from_fn(|i| _mm256_hadd_ps(v[2 * i], v[2 * i + 1]));
        // Per half: quarter sums of rows 0-3 (x0) and 4-7 (x1).
        let x0 = _mm256_hadd_ps(w[0], w[1]);
        let x1 = _mm256_hadd_ps(w[2], w[3]);
        let lo = _mm256_permute2f128_ps::<0x20>(x0, x1);
        let hi = _mm256_permute2f128_ps::<0x31>(x0, x1);
        _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
    }

    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        let x = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x))
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn min(a: __m256, b: __m256) -> __m256 {
        _mm256_min_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }
    #[inline(always)]
    unsafe fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_max_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }
    #[inline(always)]
    unsafe fn round(v: __m256) -> __m256 {
        _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
    }
    #[inline(always)]
    unsafe fn pow2i(n: __m256) -> __m256 {
        let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
    }
    #[inline(always)]
    unsafe fn codes<const B: u32>(p: *const u8) -> __m256 {
        match B {
            2 => _mm256_cvtepi32_ps(_mm256_and_si256(crumbs8(p), _mm256_set1_epi32(3))),
            4 => {
                let x = _mm256_set1_epi32((p as *const i32).read_unaligned());
                let sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(x, sh), _mm256_set1_epi32(15)))
            }
            _ => _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))),
        }
    }

    /// 2-bit codes through a permute of a table of (i & 3), which reads the low 3 bits of each
    /// lane: one instruction where `codes` takes an and and a conversion, but on the shuffle
    /// port that value dequantization also uses.
    #[inline(always)]
    unsafe fn codes_shared<const B: u32>(p: *const u8) -> __m256 {
        match B {
            2 => {
                let t = _mm256_setr_ps(0., 1., 2., 3., 0., 1., 2., 3.);
                _mm256_permutevar8x32_ps(t, crumbs8(p))
            }
            _ => Self::codes::<B>(p),
        }
    }

    /// On Intel cores (the permute measured 1.08 times faster there); not on AMD's, whose
    /// shuffle pipe is also an FMA pipe (with the and and the conversion KIVI-2 decode took 0.95
    /// of the time on a Zen 3: BENCHMARKS.md).
    #[inline(always)]
    fn shared_codes_pay() -> bool {
        match SHARED_PERMUTE.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => !shuffles_share_fma_pipes(),
        }
    }

    #[inline(always)]
    unsafe fn codes2<const B: u32>(p: *const u8) -> [__m256; 2] {
        match B {
            2 => crumbs16(p).map(|i| _mm256_cvtepi32_ps(_mm256_and_si256(i, _mm256_set1_epi32(3)))),
            _ => twice::<Self, B>(p, |p| Self::codes::<B>(p)),
        }
    }

    #[inline(always)]
    unsafe fn codes_shared2<const B: u32>(p: *const u8) -> [__m256; 2] {
        match B {
            2 => {
                let t = _mm256_setr_ps(0., 1., 2., 3., 0., 1., 2., 3.);
                crumbs16(p).map(|i| _mm256_permutevar8x32_ps(t, i))
            }
            _ => twice::<Self, B>(p, |p| Self::codes_shared::<B>(p)),
        }
    }

    /// For 2 bits, the 4 dequantized values (an 8-lane permute reads 3 index bits); else the
    /// scale and zero.
    type D = [__m256; 2];
    #[inline(always)]
    unsafe fn deq_prep<const B: u32>(s: f32, z: f32) -> [__m256; 2] {
        let (s, z) = (_mm256_set1_ps(s), _mm256_set1_ps(z));
        match B {
            2 => [_mm256_fmadd_ps(_mm256_setr_ps(0., 1., 2., 3., 0., 1., 2., 3.), s, z), z],
            _ => [s, z],
        }
    }
    #[inline(always)]
    unsafe fn codes_deq<const B: u32>(p: *const u8, d: [__m256; 2]) -> __m256 {
        match B {
            2 => _mm256_permutevar8x32_ps(d[0], crumbs8(p)),
            _ => _mm256_fmadd_ps(Self::codes::<B>(p), d[0], d[1]),
        }
    }
    #[inline(always)]
    unsafe fn codes_deq2<const B: u32>(p: *const u8, d: [__m256; 2]) -> [__m256; 2] {
        match B {
            2 => crumbs16(p).map(|i| _mm256_permutevar8x32_ps(d[0], i)),
            _ => twice::<Self, B>(p, |p| Self::codes_deq::<B>(p, d)),
        }
    }
}

backend!(Avx512, "avx512f,avx512bw,avx512vl,avx2,fma,f16c");
backend!(Avx2, "avx2,fma,f16c");
