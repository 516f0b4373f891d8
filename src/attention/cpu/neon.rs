//! aarch64 NEON vectors (4 lanes).

use super::simd::Simd;
use std::arch::aarch64::*;
use std::arch::asm;

#[derive(Clone, Copy)]
pub(crate) struct Neon;

#[inline(always)]
unsafe fn shifted(x: u32, shifts: [i32; 4], mask: u32) -> float32x4_t {
    let v = vshlq_u32(vdupq_n_u32(x), vld1q_s32(shifts.as_ptr()));
    vcvtq_f32_u32(vandq_u32(v, vdupq_n_u32(mask)))
}

impl Simd for Neon {
    const L: usize = 4;
    const ACC_REGS: usize = 16;
    type V = float32x4_t;

    /// Three pairwise adds give the 4 row sums (instead of 4 reductions).
    #[inline(always)]
    unsafe fn reduce_rows(rows: *const f32, out: *mut f32) {
        let r: [float32x4_t; 4] = std::array::from_fn(|i| vld1q_f32(rows.add(4 * i)));
        vst1q_f32(out, vpaddq_f32(vpaddq_f32(r[0], r[1]), vpaddq_f32(r[2], r[3])));
    }

    /// `prfm pldl1keep` (`std::arch`'s prefetch is not stable on aarch64 yet).
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        asm!("prfm pldl1keep, [{p}]", p = in(reg) p, options(readonly, nostack, preserves_flags));
    }
    #[inline(always)]
    unsafe fn zero() -> float32x4_t {
        vdupq_n_f32(0.0)
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> float32x4_t {
        vdupq_n_f32(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        vld1q_f32(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        vst1q_f32(p, v)
    }
    /// One `fcvtl` (base AdvSIMD; the f16 vector types of `std::arch` are not stable yet).
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> float32x4_t {
        let h = vld1_u16(p);
        let r: float32x4_t;
        asm!("fcvtl {r:v}.4s, {h:v}.4h", r = lateout(vreg) r, h = in(vreg) h, options(pure, nomem, nostack, preserves_flags));
        r
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> float32x4_t {
        let x = vmovl_u16(vld1_u16(p));
        vreinterpretq_f32_u32(vshlq_n_u32::<16>(x))
    }
    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vaddq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vmulq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vmaxq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn min(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vminq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn fma(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        vfmaq_f32(c, a, b)
    }
    #[inline(always)]
    unsafe fn hsum(v: float32x4_t) -> f32 {
        vaddvq_f32(v)
    }
    #[inline(always)]
    unsafe fn hmax(v: float32x4_t) -> f32 {
        vmaxvq_f32(v)
    }
    #[inline(always)]
    unsafe fn round(v: float32x4_t) -> float32x4_t {
        vrndnq_f32(v)
    }
    #[inline(always)]
    unsafe fn pow2i(n: float32x4_t) -> float32x4_t {
        let e = vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127));
        vreinterpretq_f32_s32(vshlq_n_s32::<23>(e))
    }
    #[inline(always)]
    unsafe fn codes<const B: u32>(p: *const u8) -> float32x4_t {
        match B {
            2 => shifted(*p as u32, [0, -2, -4, -6], 3),
            4 => shifted((p as *const u16).read_unaligned() as u32, [0, -4, -8, -12], 15),
            _ => shifted((p as *const u32).read_unaligned(), [0, -8, -16, -24], 255),
        }
    }

    type D = [float32x4_t; 2];
    #[inline(always)]
    unsafe fn deq_prep<const B: u32>(s: f32, z: f32) -> [float32x4_t; 2] {
        [vdupq_n_f32(s), vdupq_n_f32(z)]
    }
    #[inline(always)]
    unsafe fn codes_deq<const B: u32>(p: *const u8, d: [float32x4_t; 2]) -> float32x4_t {
        vfmaq_f32(d[1], Self::codes::<B>(p), d[0])
    }
}

backend!(Neon, "neon");
