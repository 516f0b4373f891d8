// Decode attention over quantized groups on tensor cores (sm_80+): mma.sync m16n8k16, f16
// operands, f32 accumulation. For the common KIVI layouts (per-channel keys of 2 or 4 bits,
// values of 2 or 4 bits, head_dim <= 128, G a multiple of 16, at most 8 query heads per kv head).
//
// One block per (split, kv head, sequence); each warp takes whole groups, staged into shared
// memory with 16-byte cp.async copies (double-buffered: the next group loads while this one is
// computed). The query heads of the GQA group are the rows of the A operands; the codes, which
// are small integers and exact in f16, are the B operands:
//   scores  S[h][t] = sum_c (q[h][c] * ks[c]) * code[c][t] + sum_c q[h][c] * kz[c]
//   output  O[h][c] = sum_t (p[h][t] * vs[t][cg]) * code[t][c] + sum_t p[h][t] * vz[t][cg]
// The scaled query and the scaled weights are f32 numbers split into two f16 parts (hi in rows
// 0..7, lo = x - hi in rows 8..15 of A), so the products keep about 22 bits; rows h and h + 8 of
// every result are added. Token and channel orders inside the mma tiles are permuted so that each
// lane reads few, contiguous bits:
//   QK: n-tile j, column n  <-> token NT * n + j          (NT = G / 8)
//   PV: k-step kk, k = 2t+i <-> token NT * (2t + i) + 2kk, k = 2t+8+i <-> the next token,
//       which is where the QK accumulators of n-tiles 2kk and 2kk+1 left the weights;
//       n-tile jj, column n <-> channel 8 * jj + n.
// The full-precision tokens (sinks, window, the new token) are read from their own storage by
// split 0 of the same kernel, with the CUDA-core body of attn.cuh; kv_decode_combine merges.
#pragma once
#include "attn.cuh"

#define MMA_NT (KV_G / 8)
#define MMA_KS (KV_HD / 16)
#define MMA_KK (KV_G / 16)
#define MMA_NJ (KV_HD / 8)
#define MMA_KC (KV_HD * KV_G * KV_KB / 8)
#define MMA_VC (KV_G * KV_HD * KV_VB / 8)
#define MMA_KS_OFF MMA_KC
#define MMA_KZ_OFF (MMA_KC + 2 * KV_HD)
#define MMA_VC_OFF (MMA_KC + 4 * KV_HD)
#define MMA_VS_OFF (MMA_VC_OFF + MMA_VC)
#define MMA_VZ_OFF (MMA_VS_OFF + 2 * KV_G * KV_NG)
#define MMA_STAGE (MMA_VZ_OFF + 2 * KV_G * KV_NG)
#define MMA_MERGE (KV_WARPS * 8 * KV_HD * 4)
// Query rows padded by 8 floats: the 8 rows read at once fall on different banks.
#define MMA_QROW (KV_HD + 8)
#define MMA_BUF (2 * KV_WARPS * MMA_STAGE > MMA_MERGE ? 2 * KV_WARPS * MMA_STAGE : MMA_MERGE)
// Must match mma_eligible() in src/cuda/cache.rs.
#define KV_MMA_OK                                                                                        \
    (!KV_KEY_PER_TOKEN && (KV_KB == 2 || KV_KB == 4) && (KV_VB == 2 || KV_VB == 4) && KV_HD % 16 == 0 && \
     KV_HD <= 128 && KV_G % 16 == 0 && KV_G <= 64 && KV_VG % 8 == 0 && KV_NQ <= 8 &&                    \
     8 * MMA_QROW * 4 + MMA_BUF <= 48000)

#if KV_MMA_OK
struct MmaShared {
    float qf[8][MMA_QROW];
    float wm[KV_WARPS][8], wl[KV_WARPS][8];
    int lo[8], hi[8];
    __align__(16) u8 buf[MMA_BUF];
};

// x0, x1 as f16 pairs: hi = f16(x), lo = f16(x - hi); the first value in the low half.
__device__ __forceinline__ void split_pair(float x0, float x1, u32& hi, u32& lo) {
    hi = f2h2(x0, x1);
    float h0 = h2f((u16)(hi & 0xffffu)), h1 = h2f((u16)(hi >> 16));
    lo = f2h2(x0 - h0, x1 - h1);
}

struct __align__(8) Pairf {
    float x, y;
};

// Two small integers at bits 0.. and 16.. as an f16 pair (exact): 1024 + x, minus 1024.
__device__ __forceinline__ u32 codes_h2(u32 x) {
    return sub_h2(x | 0x64006400u, 0x64006400u);
}

__device__ __forceinline__ void stage_copy(u8* dst, const u8* src, u32 n, u32 lane) {
    for (u32 off = lane * 16; off < n; off += 512) cp_async16(dst + off, src + off);
}

// Queues the copies of group u's codes, scales and zeros into a warp's staging buffer.
__device__ __forceinline__ void stage_group(const AttnParams& P, const u32* blocks, u32 kvh, u32 u, u8* buf, u32 lane) {
    u32 gi;
    const u8* blk = group_block(P.pages, blocks, u, kvh, &gi);
    stage_copy(buf, blk + KV_K_CODES + gi * MMA_KC, MMA_KC, lane);
    stage_copy(buf + MMA_KS_OFF, blk + KV_K_SCALE + gi * KV_HD * 2, 2 * KV_HD, lane);
    stage_copy(buf + MMA_KZ_OFF, blk + KV_K_ZERO + gi * KV_HD * 2, 2 * KV_HD, lane);
    stage_copy(buf + MMA_VC_OFF, blk + KV_V_CODES + gi * MMA_VC, MMA_VC, lane);
    stage_copy(buf + MMA_VS_OFF, blk + KV_V_SCALE + gi * KV_G * KV_NG * 2, 2 * KV_G * KV_NG, lane);
    stage_copy(buf + MMA_VZ_OFF, blk + KV_V_ZERO + gi * KV_G * KV_NG * 2, 2 * KV_G * KV_NG, lane);
}

struct MmaState {
    float m, l;  // row g's running maximum; this lane's part of the row's sum
    float acc[MMA_NJ][4];
    float zacc[KV_NG];  // this lane's part of the value zero terms of row g
};

__device__ __forceinline__ void mma_group(const AttnParams& P, const MmaShared& sh, MmaState& st, const u8* buf, u32 u,
                                          u32 nvec) {
    const u32 lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const u32 p0 = KV_SINKS + u * KV_G;
    const float* qrow = sh.qf[g];
    const u16* ksp = (const u16*)(buf + MMA_KS_OFF);
    const u16* kzp = (const u16*)(buf + MMA_KZ_OFF);

    // Scores: A = the query scaled by the group's key scales (hi/lo), B = key codes.
    float S[MMA_NT][4];
#pragma unroll
    for (int j = 0; j < MMA_NT; j++) S[j][0] = S[j][1] = S[j][2] = S[j][3] = 0.0f;
    float bias = 0.0f;
    // This lane's tokens NT*g .. NT*g+NT-1 sit in bits bit0.. of every key run.
    const u32 bit0 = MMA_NT * g * KV_KB, kwi = bit0 >> 5, ksh = bit0 & 31;
    const u32 kmask2 = KV_LEVELS_K | (KV_LEVELS_K << 16);
#pragma unroll
    for (int k = 0; k < MMA_KS; k++) {
        // Channels c0, c0+1 (K columns 2t, 2t+1) and c0+8, c0+9 (2t+8, 2t+9).
        const u32 c0 = 16 * k + 2 * t;
        const Pairf q01 = *(const Pairf*)(qrow + c0), q89 = *(const Pairf*)(qrow + c0 + 8);
        const u32 ks01 = *(const u32*)(ksp + c0), ks89 = *(const u32*)(ksp + c0 + 8);
        const u32 kz01 = *(const u32*)(kzp + c0), kz89 = *(const u32*)(kzp + c0 + 8);
        bias += q01.x * h2f((u16)kz01) + q01.y * h2f((u16)(kz01 >> 16)) + q89.x * h2f((u16)kz89) +
                q89.y * h2f((u16)(kz89 >> 16));
        u32 a0, a1, a2, a3;
        split_pair(q01.x * h2f((u16)ks01), q01.y * h2f((u16)(ks01 >> 16)), a0, a1);
        split_pair(q89.x * h2f((u16)ks89), q89.y * h2f((u16)(ks89 >> 16)), a2, a3);
        const u32 w0 = ((const u32*)(buf + c0 * KV_K_RUN))[kwi] >> ksh;
        const u32 w1 = ((const u32*)(buf + (c0 + 1) * KV_K_RUN))[kwi] >> ksh;
        const u32 w8 = ((const u32*)(buf + (c0 + 8) * KV_K_RUN))[kwi] >> ksh;
        const u32 w9 = ((const u32*)(buf + (c0 + 9) * KV_K_RUN))[kwi] >> ksh;
        // Channel pairs side by side: the low (high) 16 bits of each word in one register.
        const u32 lo01 = prmt(w0, w1, 0x5410), lo89 = prmt(w8, w9, 0x5410);
        const u32 hi01 = prmt(w0, w1, 0x7632), hi89 = prmt(w8, w9, 0x7632);
#pragma unroll
        for (int j = 0; j < MMA_NT; j++) {
            const u32 o = j * KV_KB;  // bit of token NT*g+j after the shift (below 32)
            const u32 x01 = o < 16 ? lo01 : hi01, x89 = o < 16 ? lo89 : hi89;
            u32 b0 = codes_h2((x01 >> (o & 15)) & kmask2);
            u32 b1 = codes_h2((x89 >> (o & 15)) & kmask2);
            mma16816(S[j], a0, a1, a2, a3, b0, b1);
        }
    }
    bias += __shfl_xor_sync(0xffffffffu, bias, 1);
    bias += __shfl_xor_sync(0xffffffffu, bias, 2);

    // Online softmax of row g over its 2 * NT scores in this lane and the 3 other lanes of the row.
    const bool rowok = g < nvec;
    const int lo = sh.lo[g], hi = sh.hi[g];
    float pp[MMA_NT][2];
    float bm = KV_NEG_INF;
#pragma unroll
    for (int j = 0; j < MMA_NT; j++) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int pos = (int)(p0 + MMA_NT * (2 * t + i) + j);
            float x = S[j][i] + S[j][i + 2] + bias;
            x = (rowok && pos >= lo && pos < hi) ? logit(P, x) : KV_NEG_INF;
            pp[j][i] = x;
            bm = fmaxf(bm, x);
        }
    }
    bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 1));
    bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 2));
    if (bm != KV_NEG_INF) {
        const float mn = fmaxf(st.m, bm);
        const float corr = exp_diff(st.m, mn);
        st.m = mn;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < MMA_NT; j++) {
#pragma unroll
            for (int i = 0; i < 2; i++) {
                pp[j][i] = exp_diff(pp[j][i], mn);
                sum += pp[j][i];
            }
        }
        st.l = st.l * corr + sum;
#pragma unroll
        for (int jj = 0; jj < MMA_NJ; jj++) {
#pragma unroll
            for (int r = 0; r < 4; r++) st.acc[jj][r] *= corr;
        }
#pragma unroll
        for (int cg = 0; cg < KV_NG; cg++) st.zacc[cg] *= corr;
    } else {
#pragma unroll
        for (int j = 0; j < MMA_NT; j++) pp[j][0] = pp[j][1] = 0.0f;
    }

    // Values: A = the weights scaled by the value scales (hi/lo), B = value codes.
    const u16* vsp = (const u16*)(buf + MMA_VS_OFF);
    const u16* vzp = (const u16*)(buf + MMA_VZ_OFF);
    const u8* vcp = buf + MMA_VC_OFF;
    const u32 vsh = g * KV_VB, vmask2 = KV_LEVELS_V | (KV_LEVELS_V << 16);
#pragma unroll
    for (int kk = 0; kk < MMA_KK; kk++) {
        const u32 ta0 = MMA_NT * (2 * t) + 2 * kk, ta1 = MMA_NT * (2 * t + 1) + 2 * kk;
        const u32 tb0 = ta0 + 1, tb1 = ta1 + 1;
        const float pa0 = pp[2 * kk][0], pa1 = pp[2 * kk][1], pb0 = pp[2 * kk + 1][0], pb1 = pp[2 * kk + 1][1];
        const u32* ra0 = (const u32*)(vcp + ta0 * KV_V_ROW);
        const u32* ra1 = (const u32*)(vcp + ta1 * KV_V_ROW);
        const u32* rb0 = (const u32*)(vcp + tb0 * KV_V_ROW);
        const u32* rb1 = (const u32*)(vcp + tb1 * KV_V_ROW);
#pragma unroll
        for (int cg = 0; cg < KV_NG; cg++) {
            st.zacc[cg] += pa0 * h2f(vzp[ta0 * KV_NG + cg]) + pa1 * h2f(vzp[ta1 * KV_NG + cg]) +
                           pb0 * h2f(vzp[tb0 * KV_NG + cg]) + pb1 * h2f(vzp[tb1 * KV_NG + cg]);
            u32 a0, a1, a2, a3;
            split_pair(pa0 * h2f(vsp[ta0 * KV_NG + cg]), pa1 * h2f(vsp[ta1 * KV_NG + cg]), a0, a1);
            split_pair(pb0 * h2f(vsp[tb0 * KV_NG + cg]), pb1 * h2f(vsp[tb1 * KV_NG + cg]), a2, a3);
#pragma unroll
            for (int jj = cg * (KV_VG / 8); jj < (cg + 1) * (KV_VG / 8); jj++) {
                // Channel 8jj+g: word wi, bit 16*o + g*VB; shifted by g*VB it is at bit 16*o.
                const u32 wi = (8 * jj * KV_VB) / 32, o = ((8 * jj * KV_VB) % 32) / 16;
                const u32 sel = o ? 0x7632 : 0x5410;
                u32 b0 = codes_h2(prmt(ra0[wi] >> vsh, ra1[wi] >> vsh, sel) & vmask2);
                u32 b1 = codes_h2(prmt(rb0[wi] >> vsh, rb1[wi] >> vsh, sel) & vmask2);
                mma16816(st.acc[jj], a0, a1, a2, a3, b0, b1);
            }
        }
    }
}

// grid (splits, kv heads, sequences). Split 0 is the full-precision tokens on CUDA cores (the
// body of kv_decode_attn with fp_only set); splits 1.. take `ups` quantized groups each on tensor
// cores. Both kinds of block share one shared-memory area.
#define MMA_SMEM (sizeof(AttnShared) > sizeof(MmaShared) ? sizeof(AttnShared) : sizeof(MmaShared))
extern "C" __global__ void __launch_bounds__(KV_THREADS) kv_decode_mma(const AttnParams P) {
#if __CUDA_ARCH__ >= 800
    __shared__ __align__(16) u8 smem[MMA_SMEM];
    if (blockIdx.x == 0) {
        attn_block_in(P, *(AttnShared*)smem);
        return;
    }
    MmaShared& sh = *(MmaShared*)smem;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const u32 kvh = blockIdx.y;
    const AttnItem it = P.items[blockIdx.z];
    const u32 h0 = kvh * P.ratio;
    const u32 nvec = P.ratio;  // one query row, every query head of the kv head (at most 8)
    const u32 total = it.len + it.n_chunk;

    for (u32 i = tid; i < 8 * KV_HD; i += KV_THREADS) {
        u32 v = i / KV_HD, c = i % KV_HD;
        float x = 0.0f;
        if (v < nvec) x = ld_elem(P.q + (i64)it.q_row0 * P.q_stride + (i64)(h0 + v) * KV_HD + c) * P.scale;
        sh.qf[v][c] = x;
    }
    if (tid < 8) {
        int lo = 0, hi = 0;
        if (tid < nvec) {
            int qpos = (int)it.q_pos0;
            lo = P.window > 0 ? max(0, qpos + 1 - (int)P.window) : 0;
            hi = P.causal ? min(qpos + 1, (int)total) : (int)total;
            hi = max(hi, lo);
        }
        sh.lo[tid] = lo;
        sh.hi[tid] = hi;
    }
    __syncthreads();
    int lo_min = 0x7fffffff, hi_max = 0;
    for (u32 v = 0; v < nvec; v++) {
        if (sh.hi[v] > sh.lo[v]) {
            lo_min = min(lo_min, sh.lo[v]);
            hi_max = max(hi_max, sh.hi[v]);
        }
    }

    MmaState st;
    st.m = KV_NEG_INF;
    st.l = 0.0f;
#pragma unroll
    for (int jj = 0; jj < MMA_NJ; jj++) st.acc[jj][0] = st.acc[jj][1] = st.acc[jj][2] = st.acc[jj][3] = 0.0f;
#pragma unroll
    for (int cg = 0; cg < KV_NG; cg++) st.zacc[cg] = 0.0f;

    const u32 n_groups = it.quantized / KV_G;
    const u32 gb = (blockIdx.x - 1) * P.ups;
    const u32 ge = min(n_groups, gb + P.ups);
    const u32* blocks = P.blocks + (u64)it.slot * KV_PPL;
    auto visible = [&](u32 u) {
        int first = KV_SINKS + u * KV_G;
        return !(first + KV_G - 1 < lo_min || first >= hi_max);
    };
    u32 u = gb + warp;
    while (u < ge && !visible(u)) u += KV_WARPS;
    // Staging buffer b of this warp.
#define MMA_BUF_OF(b) (sh.buf + ((b) * KV_WARPS + warp) * MMA_STAGE)
    if (u < ge) stage_group(P, blocks, kvh, u, MMA_BUF_OF(0), lane);
    cp_commit();
    u32 cur = 0;
    while (u < ge) {
        u32 nu = u + KV_WARPS;
        while (nu < ge && !visible(nu)) nu += KV_WARPS;
        if (nu < ge) stage_group(P, blocks, kvh, nu, MMA_BUF_OF(cur ^ 1), lane);
        cp_commit();
        cp_wait<1>();
        __syncwarp();
        mma_group(P, sh, st, MMA_BUF_OF(cur), u, nvec);
        __syncwarp();
        cur ^= 1;
        u = nu;
    }
    cp_wait<0>();

    // Row g's sums over its four lanes; rows g and g + 8 of the accumulators added.
    st.l += __shfl_xor_sync(0xffffffffu, st.l, 1);
    st.l += __shfl_xor_sync(0xffffffffu, st.l, 2);
#pragma unroll
    for (int cg = 0; cg < KV_NG; cg++) {
        st.zacc[cg] += __shfl_xor_sync(0xffffffffu, st.zacc[cg], 1);
        st.zacc[cg] += __shfl_xor_sync(0xffffffffu, st.zacc[cg], 2);
    }
    __syncthreads();  // the staging buffers become the merge area
    float* merge = (float*)sh.buf;  // [KV_WARPS][8][KV_HD]
    if (g < nvec) {
#pragma unroll
        for (int jj = 0; jj < MMA_NJ; jj++) {
#pragma unroll
            for (int i = 0; i < 2; i++) {
                u32 c = 8 * jj + 2 * t + i;
                merge[(warp * 8 + g) * KV_HD + c] = st.acc[jj][i] + st.acc[jj][i + 2] + st.zacc[c / KV_VG];
            }
        }
        if (t == 0) {
            sh.wm[warp][g] = st.m;
            sh.wl[warp][g] = st.l;
        }
    }
    __syncthreads();
    const u32 split = blockIdx.x;
    for (u32 i = tid; i < nvec * KV_HD; i += KV_THREADS) {
        u32 v = i / KV_HD, c = i % KV_HD;
        float m = KV_NEG_INF;
#pragma unroll
        for (int w = 0; w < KV_WARPS; w++) m = fmaxf(m, sh.wm[w][v]);
        float l = 0.0f, a = 0.0f;
#pragma unroll
        for (int w = 0; w < KV_WARPS; w++) {
            float f = exp_diff(sh.wm[w][v], m);
            l += sh.wl[w][v] * f;
            a += merge[(w * 8 + v) * KV_HD + c] * f;
        }
        float* dst = P.part + ((((u64)blockIdx.z * P.qt) * P.n_q_heads + h0 + v) * P.n_splits + split) * (KV_HD + 2);
        if (c == 0) {
            dst[0] = m;
            dst[1] = l;
        }
        dst[2 + c] = a;
    }
#endif
}
#endif
