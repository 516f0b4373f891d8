// Quantizing a group of tokens that leaves the full-precision window into its page, shared by
// kv_quantize (quantize.cu) and the decode step on tensor cores (kv_decode_mma, which quantizes
// the group its new token pushes out of the window in the same launch).
//
// The numbers are the CPU's to the bit (src/quant.rs): per group, zero = f16(min) and
// scale = f16(max((max - zero) / (2^b - 1), 0)) measured from the stored zero (min/max rounding;
// values with KV_V_LSQ take least-squares rounding, lsq_params below), then
// code = clamp(round((x - zero) / scale), 0, 2^b - 1) with the f16-rounded scale and zero (code 0
// when the scale is 0), computed in f32 with IEEE division.
#pragma once
#include "common.cuh"

// Where the tokens of a group come from: token p from the window ring (or the sinks) when
// p < len_old (it was stored before this append), else from input row chunk_row0 + (p - len_old)
// of k or v (kv head h).
struct TokenSource {
    const elem_t* hw;  // the (sequence, kv head)'s window
    const elem_t* k;
    const elem_t* v;
    i64 kv_stride;
    u32 h, len_old, chunk_row0;

    __device__ __forceinline__ float elem(u32 pos, u32 c, bool value) const {
        if (pos < len_old) return ld_elem(hw + window_row(pos, value) + c);
        const elem_t* base = value ? v : k;
        return ld_elem(base + (i64)(chunk_row0 + pos - len_old) * kv_stride + (i64)h * KV_HD + c);
    }
};

__device__ __forceinline__ u32 encode(float x, float s, float z, u32 levels) {
    if (s == 0.0f) return 0;
    float c = roundf((x - z) / s);
    c = fminf(fmaxf(c, 0.0f), (float)levels);
    return (u32)c;
}

// Sum of f(i) over i < n in 8 interleaved lanes (element i into lane i % 8, each lane in order,
// the lanes added 0 to 7), with operations that are never fused: GroupParams::least_squares's order.
// The lanes are indexed by constants (an unrolled inner loop), so they stay in registers.
template <class F>
__device__ __forceinline__ float lanes_sum(u32 n, F f) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (u32 i0 = 0; i0 < n; i0 += 8) {
#pragma unroll
        for (u32 j = 0; j < 8; j++)
            if (i0 + j < n) acc[j] = __fadd_rn(acc[j], f(i0 + j));
    }
    float t = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; j++) t = __fadd_rn(t, acc[j]);
    return t;
}

// Sum of squared reconstruction errors of the n elements x(i) under an f16 scale and zero.
template <class X>
__device__ __forceinline__ float squared_error(u32 n, X x, float s, float z, u32 levels) {
    return lanes_sum(n, [&](u32 i) {
        const float v = x(i);
        const float d = __fsub_rn(v, __fadd_rn(__fmul_rn((float)encode(v, s, z, levels), s), z));
        return __fmul_rn(d, d);
    });
}

// Least-squares rounding (GroupParams::least_squares, src/quant.rs): of the min/max grid and
// the grids refitted by least squares to the codes of spans (hi - lo) / f, the one with the
// smallest squared error, strictly better replacing. Writes the f16 scale and zero.
template <class X>
__device__ __forceinline__ void lsq_params(u32 n, X x, float lo, float hi, u32 levels, u16* sh, u16* zh) {
    if (!(hi > lo) || h2f(*sh) == 0.0f) return;
    // LSQ_SPANS of src/quant.rs, defined at the top of the source by src/cuda/kernels.rs.
    const float spans[KV_LSQ_N] = KV_LSQ_SPANS;
    const float fn = (float)n, lv = (float)levels, range = __fsub_rn(hi, lo);
    const float sy = lanes_sum(n, [&](u32 i) { return __fsub_rn(x(i), lo); });
    float best = squared_error(n, x, h2f(*sh), h2f(*zh), levels);
#pragma unroll 1
    for (int k = 0; k < KV_LSQ_N; k++) {
        const float iscale = __fdiv_rn(__fmul_rn(lv, spans[k]), range);
        // The sums of l, l^2 and l y (y = x - lo, l its code) in one pass, each in lanes_sum's order.
        float al[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        float all[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        float aly[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (u32 i0 = 0; i0 < n; i0 += 8) {
#pragma unroll
            for (u32 j = 0; j < 8; j++) {
                if (i0 + j >= n) continue;
                const float y = __fsub_rn(x(i0 + j), lo);
                const float l = roundf(fminf(__fmul_rn(y, iscale), lv));
                al[j] = __fadd_rn(al[j], l);
                all[j] = __fadd_rn(all[j], __fmul_rn(l, l));
                aly[j] = __fadd_rn(aly[j], __fmul_rn(l, y));
            }
        }
        float sl = 0.0f, sll = 0.0f, sly = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            sl = __fadd_rn(sl, al[j]);
            sll = __fadd_rn(sll, all[j]);
            sly = __fadd_rn(sly, aly[j]);
        }
        const float det = __fsub_rn(__fmul_rn(fn, sll), __fmul_rn(sl, sl));
        if (!(det > 0.0f)) continue;
        const float s = __fdiv_rn(__fsub_rn(__fmul_rn(fn, sly), __fmul_rn(sl, sy)), det);
        if (!(s > 0.0f)) continue;
        const u16 cs = f2h(s), cz = f2h(__fadd_rn(lo, __fdiv_rn(__fsub_rn(sy, __fmul_rn(s, sl)), fn)));
        const float fs = h2f(cs), fz = h2f(cz);
        // Not zero, nor an f16 infinity (exponent bits all set).
        if (!(fs > 0.0f) || (cs & 0x7c00u) == 0x7c00u || (cz & 0x7c00u) == 0x7c00u) continue;
        const float e = squared_error(n, x, fs, fz, levels);
        if (e < best) {
            best = e;
            *sh = cs;
            *zh = cz;
        }
    }
}

// Quantizes groups of channels of each token row (values, and keys per token) of one group of
// tokens: parameters first (one thread per (token, channel group)), then the packed bytes (one
// thread per byte, so no two threads share a byte whatever the group width).
template <int BITS>
__device__ void quantize_rows(const TokenSource& src, u32 p0, u8* codes, u8* scales, u8* zeros, u32 gi, bool value) {
    const u32 levels = (1u << BITS) - 1u;
    for (u32 i = threadIdx.x; i < KV_G * KV_NG; i += blockDim.x) {
        u32 t = i / KV_NG, cg = i % KV_NG;
        float lo = __int_as_float(0x7f800000), hi = -__int_as_float(0x7f800000);
        for (u32 c = cg * KV_VG; c < (cg + 1) * KV_VG; c++) {
            float x = src.elem(p0 + t, c, value);
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
        }
        u32 row = gi * KV_G + t;
        u16 zh = f2h(lo);
        u16 sh = f2h(fmaxf((hi - h2f(zh)) / (float)levels, 0.0f));
        if (KV_V_LSQ && value) {
            auto x = [&](u32 i) { return src.elem(p0 + t, cg * KV_VG + i, true); };
            lsq_params(KV_VG, x, lo, hi, levels, &sh, &zh);
        }
        ((u16*)scales)[row * KV_NG + cg] = sh;
        ((u16*)zeros)[row * KV_NG + cg] = zh;
    }
    __syncthreads();
    const u32 row_bytes = KV_HD * BITS / 8;
    for (u32 i = threadIdx.x; i < KV_G * row_bytes; i += blockDim.x) {
        u32 t = i / row_bytes, j = i % row_bytes;
        u32 row = gi * KV_G + t;
        u32 b = 0;
#pragma unroll
        for (u32 k = 0; k < 8 / BITS; k++) {
            u32 c = j * (8 / BITS) + k;
            u32 pi = row * KV_NG + c / KV_VG;
            float s = h2f(((const u16*)scales)[pi]), z = h2f(((const u16*)zeros)[pi]);
            b |= encode(src.elem(p0 + t, c, value), s, z, levels) << (k * BITS);
        }
        codes[(u64)row * row_bytes + j] = (u8)b;
    }
}

// Quantizes quantized group g of a sequence (tokens p0 .. p0 + G - 1, p0 = KV_SINKS + g * G), kv
// head src.h, into its place in page `page` of the layer's pool `pages`: keys per channel (or
// per token), then values per token. Called by every thread of a block (any size), with the same
// arguments.
__device__ __forceinline__ void quantize_group(const TokenSource& src, u8* pages, u32 page, u32 g) {
    u8* blk = pages + (u64)page * KV_PAGE_BYTES + (u64)src.h * KV_HEAD_BYTES;
    const u32 gi = g % KV_GPP, p0 = KV_SINKS + g * KV_G;
#if KV_KEY_PER_TOKEN
    quantize_rows<KV_KB>(src, p0, blk + KV_K_CODES, blk + KV_K_SCALE, blk + KV_K_ZERO, gi, false);
#else
    // Per channel: one thread per channel finds the range of its G tokens and packs its run.
    for (u32 c = threadIdx.x; c < KV_HD; c += blockDim.x) {
        float lo = __int_as_float(0x7f800000), hi = -__int_as_float(0x7f800000);
        for (u32 t = 0; t < KV_G; t++) {
            float x = src.elem(p0 + t, c, false);
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
        }
        const u16 zh = f2h(lo);
        const u16 sh = f2h(fmaxf((hi - h2f(zh)) / (float)KV_LEVELS_K, 0.0f));
        ((u16*)(blk + KV_K_SCALE))[gi * KV_HD + c] = sh;
        ((u16*)(blk + KV_K_ZERO))[gi * KV_HD + c] = zh;
        float s = h2f(sh), z = h2f(zh);
        u8* codes = blk + KV_K_CODES + (u64)gi * KV_HD * KV_K_RUN;
        for (u32 j = 0; j < KV_K_RUN; j++) {
            u32 b = 0;
#pragma unroll
            for (u32 k = 0; k < 8 / KV_KB; k++) {
                u32 t = j * (8 / KV_KB) + k;
                b |= encode(src.elem(p0 + t, c, false), s, z, KV_LEVELS_K) << (k * KV_KB);
            }
            codes[key_byte(c, j)] = (u8)b;
        }
    }
#endif
    __syncthreads();
    quantize_rows<KV_VB>(src, p0, blk + KV_V_CODES, blk + KV_V_SCALE, blk + KV_V_ZERO, gi, true);
}
