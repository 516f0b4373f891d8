// Appending to the cache: quantizing the groups that leave the full-precision window into their
// pages, writing new tokens into the window ring (or the sinks), and the small kernels that keep
// the device copy of the block tables current and undo quantization on truncation.
//
// The numbers are the CPU's to the bit (src/quant.rs): per group, zero = f16(min) and
// scale = f16(max((max - zero) / (2^b - 1), 0)) measured from the stored zero (min/max rounding;
// values with KV_V_LSQ take least-squares rounding, lsq_params below), then
// code = clamp(round((x - zero) / scale), 0, 2^b - 1) with the f16-rounded scale and zero (code 0
// when the scale is 0), computed in f32 with IEEE division.
#include "common.cuh"

#define KV_MAX_ITEMS 64
#define KV_MAX_SET 480

// Block-table entries to set: pairs (index into the whole table area, page).
struct SetBlocksParams {
    u32* blocks;
    u32 n, pad;
    u32 pairs[2 * KV_MAX_SET];
};

extern "C" __global__ void kv_set_blocks(const SetBlocksParams P) {
    for (u32 i = threadIdx.x; i < P.n; i += blockDim.x) P.blocks[P.pairs[2 * i]] = P.pairs[2 * i + 1];
}

// Groups g0 .. g0 + n_groups of one sequence leave the window. Token p of a group comes from the
// ring when p < len_old (it was stored before this append) and from input row
// chunk_row0 + (p - len_old) otherwise.
struct FlushItem {
    u32 slot, g0, n_groups, len_old, chunk_row0, pad;
};

struct QuantParams {
    u8* pages;              // this layer's page pool
    const elem_t* windows;  // this layer's windows
    const u32* blocks;      // this layer's block tables (already holding the groups' pages)
    const elem_t* k;
    const elem_t* v;
    i64 kv_stride;
    u32 n_items, total_groups;
    FlushItem items[KV_MAX_ITEMS];
};

__device__ __forceinline__ float token_elem(const QuantParams& P, const FlushItem& it, const elem_t* hw, u32 h,
                                            u32 pos, u32 c, bool value) {
    if (pos < it.len_old) return ld_elem(hw + window_row(pos, value) + c);
    const elem_t* base = value ? P.v : P.k;
    return ld_elem(base + (i64)(it.chunk_row0 + pos - it.len_old) * P.kv_stride + (i64)h * KV_HD + c);
}

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
__device__ void quantize_rows(const QuantParams& P, const FlushItem& it, const elem_t* hw, u32 h, u32 p0, u8* codes,
                              u8* scales, u8* zeros, u32 gi, bool value) {
    const u32 levels = (1u << BITS) - 1u;
    for (u32 i = threadIdx.x; i < KV_G * KV_NG; i += blockDim.x) {
        u32 t = i / KV_NG, cg = i % KV_NG;
        float lo = __int_as_float(0x7f800000), hi = -__int_as_float(0x7f800000);
        for (u32 c = cg * KV_VG; c < (cg + 1) * KV_VG; c++) {
            float x = token_elem(P, it, hw, h, p0 + t, c, value);
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
        }
        u32 row = gi * KV_G + t;
        u16 zh = f2h(lo);
        u16 sh = f2h(fmaxf((hi - h2f(zh)) / (float)levels, 0.0f));
        if (KV_V_LSQ && value) {
            auto x = [&](u32 i) { return token_elem(P, it, hw, h, p0 + t, cg * KV_VG + i, true); };
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
            b |= encode(token_elem(P, it, hw, h, p0 + t, c, value), s, z, levels) << (k * BITS);
        }
        codes[(u64)row * row_bytes + j] = (u8)b;
    }
}

// grid (total groups, kv heads), any block size.
extern "C" __global__ void kv_quantize(const QuantParams P) {
    u32 x = blockIdx.x, n = 0;
    while (n < P.n_items && x >= P.items[n].n_groups) x -= P.items[n++].n_groups;
    if (n >= P.n_items) return;
    const FlushItem it = P.items[n];
    const u32 g = it.g0 + x, h = blockIdx.y;
    const u32 page = P.blocks[(u64)it.slot * KV_SEQ_PAGES + g / KV_GPP];
    const u32 gi = g % KV_GPP;
    u8* blk = P.pages + (u64)page * KV_PAGE_BYTES + (u64)h * KV_HEAD_BYTES;
    const elem_t* hw = head_window(P.windows, it.slot, h);
    const u32 p0 = KV_SINKS + g * KV_G;

#if KV_KEY_PER_TOKEN
    quantize_rows<KV_KB>(P, it, hw, h, p0, blk + KV_K_CODES, blk + KV_K_SCALE, blk + KV_K_ZERO, gi, false);
#else
    // Per channel: one thread per channel finds the range of its G tokens and packs its run.
    for (u32 c = threadIdx.x; c < KV_HD; c += blockDim.x) {
        float lo = __int_as_float(0x7f800000), hi = -__int_as_float(0x7f800000);
        for (u32 t = 0; t < KV_G; t++) {
            float x = token_elem(P, it, hw, h, p0 + t, c, false);
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
        }
        const u16 zh = f2h(lo);
        const u16 sh = f2h(fmaxf((hi - h2f(zh)) / (float)KV_LEVELS_K, 0.0f));
        ((u16*)(blk + KV_K_SCALE))[gi * KV_HD + c] = sh;
        ((u16*)(blk + KV_K_ZERO))[gi * KV_HD + c] = zh;
        float s = h2f(sh), z = h2f(zh);
        u8* run = blk + KV_K_CODES + (u64)(gi * KV_HD + c) * KV_K_RUN;
        for (u32 j = 0; j < KV_K_RUN; j++) {
            u32 b = 0;
#pragma unroll
            for (u32 k = 0; k < 8 / KV_KB; k++) {
                u32 t = j * (8 / KV_KB) + k;
                b |= encode(token_elem(P, it, hw, h, p0 + t, c, false), s, z, KV_LEVELS_K) << (k * KV_KB);
            }
            run[j] = (u8)b;
        }
    }
#endif
    __syncthreads();
    quantize_rows<KV_VB>(P, it, hw, h, p0, blk + KV_V_CODES, blk + KV_V_SCALE, blk + KV_V_ZERO, gi, true);
}

// Input rows row0 .. row0 + n go to positions pos0 .. pos0 + n of a sequence's window.
struct WriteItem {
    u32 slot, pos0, n, row0;
};

struct WriteParams {
    elem_t* windows;  // this layer's windows
    const elem_t* k;
    const elem_t* v;
    i64 kv_stride;
    u32 n_items, total;
    WriteItem items[KV_MAX_ITEMS];
};

// grid (total tokens, kv heads), any block size.
extern "C" __global__ void kv_window_write(const WriteParams P) {
    u32 x = blockIdx.x, n = 0;
    while (n < P.n_items && x >= P.items[n].n) x -= P.items[n++].n;
    if (n >= P.n_items) return;
    const WriteItem it = P.items[n];
    const u32 h = blockIdx.y, pos = it.pos0 + x;
    elem_t* hw = P.windows + ((u64)it.slot * KV_NKV + h) * KV_WIN_HEAD;
    const i64 src = (i64)(it.row0 + x) * P.kv_stride + (i64)h * KV_HD;
    elem_t* kd = hw + window_row(pos, false);
    elem_t* vd = hw + window_row(pos, true);
    for (u32 c = threadIdx.x; c < KV_HD; c += blockDim.x) {
        kd[c] = P.k[src + c];
        vd[c] = P.v[src + c];
    }
}

// Truncation inside a quantized group: the first `partial` tokens of group g return to the ring
// holding their dequantized values (f64 code * scale + zero, then f32, then the window type, as
// the CPU does).
struct UnquantParams {
    elem_t* windows;  // this layer's windows
    const u8* pages;  // this layer's page pool
    const u32* blocks;
    u32 slot, g, partial, pad;
};

__device__ __forceinline__ elem_t dequant(const u8* blk, u32 scale_off, u32 zero_off, u32 pi, u32 code) {
    double s = (double)ld_param(blk + scale_off, pi), z = (double)ld_param(blk + zero_off, pi);
    return to_elem((float)((double)code * s + z));
}

// grid (kv heads), any block size.
extern "C" __global__ void kv_unquantize(const UnquantParams P) {
    const u32 h = blockIdx.x;
    u32 gi;
    const u8* blk = group_block(P.pages, P.blocks + (u64)P.slot * KV_SEQ_PAGES, P.g, h, &gi);
    elem_t* hw = P.windows + ((u64)P.slot * KV_NKV + h) * KV_WIN_HEAD;
    for (u32 i = threadIdx.x; i < P.partial * KV_HD; i += blockDim.x) {
        u32 t = i / KV_HD, c = i % KV_HD;
        u32 ring = ((P.g * KV_G + t) % KV_RING) * KV_HD;
        u32 row = gi * KV_G + t;
#if KV_KEY_PER_TOKEN
        u32 kcode = code_at<KV_KB>(blk + KV_K_CODES + (u64)row * KV_K_RUN, c);
        elem_t key = dequant(blk, KV_K_SCALE, KV_K_ZERO, row * KV_NG + c / KV_VG, kcode);
#else
        u32 kcode = code_at<KV_KB>(blk + KV_K_CODES + (u64)(gi * KV_HD + c) * KV_K_RUN, t);
        elem_t key = dequant(blk, KV_K_SCALE, KV_K_ZERO, gi * KV_HD + c, kcode);
#endif
        u32 vcode = code_at<KV_VB>(blk + KV_V_CODES + (u64)row * KV_V_ROW, c);
        hw[KV_W_RK + ring + c] = key;
        hw[KV_W_RV + ring + c] = dequant(blk, KV_V_SCALE, KV_V_ZERO, row * KV_NG + c / KV_VG, vcode);
    }
}
