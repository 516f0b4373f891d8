//! The vector operations the fused kernels are written with, one implementation per instruction
//! set (`x86.rs`, `neon.rs`). Kernels are generic over [`Simd`] and marked `#[inline(always)]`;
//! each instruction set instantiates them inside one `#[target_feature]` entry point, so the
//! whole kernel is compiled for that instruction set.
//!
//! Every method is `unsafe`: it may only run on a machine that has the instruction set (checked
//! once at run time), and pointer arguments must be valid for `L` elements (or the bytes of `L`
//! codes).

/// One instruction set's `L`-lane f32 vectors.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    /// f32 lanes per vector.
    const L: usize;
    /// Vector registers an accumulator tile may occupy without spilling.
    const ACC_REGS: usize;
    type V: Copy;

    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `L` f16 numbers, widened.
    unsafe fn load_f16(p: *const u16) -> Self::V;
    /// `L` bf16 numbers, widened.
    unsafe fn load_bf16(p: *const u16) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn hsum(v: Self::V) -> f32;
    unsafe fn hmax(v: Self::V) -> f32;
    /// Rounds to the nearest integer (ties to even).
    unsafe fn round(v: Self::V) -> Self::V;
    /// `2^n` for integral `n` in `-127..=127` (`2^-127` gives exactly 0).
    unsafe fn pow2i(n: Self::V) -> Self::V;
    /// `L` consecutive `B`-bit codes (little-endian packed, starting at bit 0 of `p`) as f32.
    unsafe fn codes<const B: u32>(p: *const u8) -> Self::V;
    /// [`Simd::codes`] for key codes that several query vectors share: the instruction set's
    /// cheapest unpacking when its cost is spread over them (the same as `codes` by default).
    #[inline(always)]
    unsafe fn codes_shared<const B: u32>(p: *const u8) -> Self::V {
        Self::codes::<B>(p)
    }
    /// Whether [`Simd::codes_shared`] is the faster unpacking on this CPU (the kernels ask once
    /// per call; false where it is `codes` anyway).
    #[inline(always)]
    fn shared_codes_pay() -> bool {
        false
    }
    /// What [`Simd::codes_deq`] needs to dequantize `B`-bit codes with scale `s` and zero `z`
    /// (a lookup table where codes index one, else the two vectors).
    type D: Copy;
    unsafe fn deq_prep<const B: u32>(s: f32, z: f32) -> Self::D;
    /// `L` codes as [`Simd::codes`] reads them, dequantized: `code * s + z`.
    unsafe fn codes_deq<const B: u32>(p: *const u8, d: Self::D) -> Self::V;
    /// [`Simd::codes`] of the `2 L` codes at `p`: two vectors from one read where the
    /// instruction set allows it.
    #[inline(always)]
    unsafe fn codes2<const B: u32>(p: *const u8) -> [Self::V; 2] {
        twice::<Self, B>(p, |p| Self::codes::<B>(p))
    }
    /// [`Simd::codes_shared`] of the `2 L` codes at `p`: two vectors from one read where the
    /// instruction set allows it.
    #[inline(always)]
    unsafe fn codes_shared2<const B: u32>(p: *const u8) -> [Self::V; 2] {
        twice::<Self, B>(p, |p| Self::codes_shared::<B>(p))
    }
    /// [`Simd::codes_deq`] of the `2 L` codes at `p`, all dequantized by `d`.
    #[inline(always)]
    unsafe fn codes_deq2<const B: u32>(p: *const u8, d: Self::D) -> [Self::V; 2] {
        twice::<Self, B>(p, |p| Self::codes_deq::<B>(p, d))
    }
    /// `out[r] = ` the sum of row `r`, for the `L` rows of `L` floats at `rows`.
    #[inline(always)]
    unsafe fn reduce_rows(rows: *const f32, out: *mut f32) {
        for r in 0..Self::L {
            *out.add(r) = Self::hsum(Self::load(rows.add(r * Self::L)));
        }
    }
    /// Hints that the cache line at `p` will be read soon.
    #[inline(always)]
    unsafe fn prefetch(_p: *const u8) {}
}

/// `e^x` to about 2 ulp (Cephes `expf`); inputs at or below -88 give 0, inputs must be <= 88.
#[inline(always)]
pub(crate) unsafe fn exp<S: Simd>(x: S::V) -> S::V {
    let x = S::max(S::min(x, S::splat(88.0)), S::splat(-88.0));
    let fx = S::max(S::round(S::mul(x, S::splat(std::f32::consts::LOG2_E))), S::splat(-127.0));
    let x = S::fma(fx, S::splat(-0.693_359_4), x);
    let x = S::fma(fx, S::splat(2.121_944_4e-4), x);
    let mut y = S::splat(1.987_569_1e-4);
    y = S::fma(y, x, S::splat(1.398_2e-3));
    y = S::fma(y, x, S::splat(8.333_452e-3));
    y = S::fma(y, x, S::splat(4.166_579_6e-2));
    y = S::fma(y, x, S::splat(1.666_666_5e-1));
    y = S::fma(y, x, S::splat(0.5));
    let x2 = S::mul(x, x);
    y = S::fma(y, x2, x);
    y = S::add(y, S::splat(1.0));
    S::mul(y, S::pow2i(fx))
}

/// `read` of the `L` codes at `p` and of the `L` after them: the two-vector reads
/// ([`Simd::codes2`] and the like) where an instruction set has no single read for them (the
/// defaults, and the other widths of the overrides).
#[inline(always)]
pub(crate) unsafe fn twice<S: Simd, const B: u32>(p: *const u8, read: impl Fn(*const u8) -> S::V) -> [S::V; 2] {
    [read(p), read(p.add(S::L * B as usize / 8))]
}
