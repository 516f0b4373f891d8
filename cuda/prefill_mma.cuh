// Chunks of queries on tensor cores: the full-precision tokens of one sequence (its sinks, its
// window ring and the chunk being appended) against 64 query vectors per block (32 at head_dim
// 256), flash-attention style. The rows of a chunk (prompt prefill, `append_attend`, `attend`)
// are many, so a block stages each tile of 32 tokens' keys and values once (16-byte cp.async
// copies into shared memory, double-buffered) for 16 query vectors in each of its 4 warps (in
// each pair of them at head_dim 256, FP_CS), instead of once per 8 / hc rows as the CUDA-core
// body of split 0 (attn.cuh) reads them. kv_prefill_fp writes split 0 of the partial states
// (or the output, when it is the only split); the quantized groups are the other splits,
// kv_prefill_q's (the same loop on tiles dequantized into shared memory, below) or, with
// KIVI_CUDA_PREFILL_Q=0, kv_decode_mma's (fp_only = 2: its split 0 then does nothing), and the
// combine merges them.
//
// f16 and bf16 caches: the query (exact, the softmax scale applied to the f32 scores), the keys
// and the values (exact) are operands of the cache's type as they are; the weights are split
// into hi and lo parts of that type (about 22 bits in f16, 16 in bf16), two mmas each, so that
// the result matches the CUDA-core body's f32 arithmetic within the same tolerances.
//   scores  S[v][tok] = sum_c q[v][c] * k[tok][c]: A = the queries (rows: the warp's 16
//           vectors), B = the keys, read with ldmatrix from the tile's rows;
//   output  O[v][c] += sum_tok p[v][tok] * v[tok][c]: A = the weights, straight from the
//           scores' accumulators (the C layout of two n-tiles is the A layout of one k-step),
//           B = the values, read with ldmatrix.trans.
// Vector v of a block: row v / nh of the block's rows (64 / hc rows: a launch takes consecutive
// rows of one sequence, items of qt rows each), query head h0 + v % nh.
#pragma once
#include "attn.cuh"
#include "decode_mma.cuh"

// In the module that chunks of queries launch (decode_mma.cuh's layouts for 8 query vectors, 4
// above head_dim 128), for f16 and bf16 caches. Must match prefill_fp_layout() in
// src/cuda/kernels.rs.
#define KV_FP_MMA_OK (KV_MMA_OK && KV_NQ == (KV_HD <= 128 ? 8 : 4) && (KV_DTYPE == 1 || KV_DTYPE == 2))

#if KV_FP_MMA_OK
// The cache's 16-bit type on tensor cores, and the weights' hi and lo parts in it.
#if KV_DTYPE == 2
#define FP_MMA mma16816_bf16
__device__ __forceinline__ void fp_split(float x0, float x1, u32& hi, u32& lo) {
    hi = f2bf2(x0, x1);
    lo = f2bf2(x0 - bf2f((u16)(hi & 0xffffu)), x1 - bf2f((u16)(hi >> 16)));
}
#else
#define FP_MMA mma16816
#define fp_split split_pair
#endif
// Warps that share 16 query vectors, each taking FP_OC of their output channels: one up to
// head_dim 128; two above (head_dim 256), where a lane's accumulators of every channel would be
// 128 registers. The warps of a pair compute the same scores (the same instructions on the same
// operands, so the same weights and softmax state), each then its half of the values.
#define FP_CS (KV_HD > 128 ? 2 : 1)
#define FP_OC (KV_HD / FP_CS)
#define FP_VPB (64 / FP_CS)  // query vectors per block (16 per warp, or per pair of warps)
#define FP_T 32              // tokens per tile
// A staged row: head_dim halves and 16 bytes of padding, so that the 8 rows an ldmatrix phase
// reads start 4 banks apart and cover the 32 banks once.
#define FP_ROW (KV_HD + 8)

struct __align__(16) FpZero16 {
    u32 x, y, z, w;
};
struct __align__(8) FpFloat2 {
    float x, y;
};

struct FpShared {
    __align__(16) u16 k[2][FP_T][FP_ROW];
    __align__(16) u16 v[2][FP_T][FP_ROW];
};

// Queues the copies of tile i (fp tokens 32i .. 32i + 31) into buffer b; tokens past the last
// are zeros (their weights are 0, and 0 * 0 keeps the output finite).
__device__ __forceinline__ void fp_stage(const AttnParams& P, FpShared& sh, const AttnItem& it, const elem_t* hw,
                                         u32 kvh, u32 n_sink, u32 ws, u32 n_fp, u32 i, u32 b) {
    constexpr u32 PER_ROW = KV_HD / 8;  // 16-byte pieces of a row
    // A whole tile of the chunk's own rows (all of a prompt's but its last): their addresses step
    // by the rows' stride, with none of the per-token choice of sink, ring slot or chunk row
    // below, which took most of the tile loop's instructions at head_dim 256.
    const u32 f0 = FP_T * i, n_win = n_sink + (it.len - ws);  // fp tokens before the chunk's
    if (f0 >= n_win && f0 + FP_T <= n_fp) {
        const i64 row = (i64)(it.chunk_row0 + f0 - n_win) * P.kv_stride + (i64)kvh * KV_HD;
        const elem_t* k = P.k + row;
        const elem_t* v = P.v + row;
#pragma unroll
        for (u32 n = 0; n < (FP_T * PER_ROW + KV_THREADS - 1) / KV_THREADS; n++) {
            const u32 x = threadIdx.x + n * KV_THREADS, tok = x / PER_ROW, c = 8 * (x % PER_ROW);
            if (x < FP_T * PER_ROW) {
                const i64 o = (i64)tok * P.kv_stride + c;
                cp_async16(&sh.k[b][tok][c], k + o);
                cp_async16(&sh.v[b][tok][c], v + o);
            }
        }
        return;
    }
#ifndef KV_COST_PROBE  // (the static cost counts the tiles of a prompt: the path above)
    // Each piece of a token's key row with the same piece of its value row: one position.
    for (u32 x = threadIdx.x; x < FP_T * PER_ROW; x += KV_THREADS) {
        const u32 tok = x / PER_ROW, c = 8 * (x % PER_ROW);
        const u32 f = f0 + tok;
        if (f < n_fp) {
            const u32 pos = fp_pos(it, n_sink, ws, f);
            cp_async16(&sh.k[b][tok][c], fp_row(P, it, hw, kvh, pos, false) + c);
            cp_async16(&sh.v[b][tok][c], fp_row(P, it, hw, kvh, pos, true) + c);
        } else {
            *(FpZero16*)&sh.k[b][tok][c] = {0u, 0u, 0u, 0u};
            *(FpZero16*)&sh.v[b][tok][c] = {0u, 0u, 0u, 0u};
        }
    }
#endif
}

// What a block's rows are and what this lane holds of them: the block's FP_VPB query vectors
// (FP_VPB / hc rows of one sequence), the lane's two rows of its warp's 16 (vectors 16 w + g and
// 16 w + g + 8, w = warp / FP_CS), their ranges of positions, the queries as A operands, the
// online softmax state of those rows, and the warp's FP_OC output channels of them (from c0).
struct FpRows {
    AttnItem it;
    u32 kvh, h0, nh, row0, row_end;
    u32 row[2], head[2];
    bool ok[2];
    int lo[2], hi[2];
    // The positions some row of the block sees, and those every row sees (rows are in order of
    // position): tiles outside the first are skipped, tiles inside the second need no mask.
    int lo_min, hi_max, lo_max, hi_min;
    // k-step kk: rows g and g + 8, channels 16kk + 2t, + 1 and 16kk + 2t + 8, + 9.
    u32 qa[KV_HD / 16][4];
    u32 c0;
    float acc[FP_OC / 8][4];
    float m[2], l[2];
};

__device__ __forceinline__ void fp_rows(const AttnParams& P, FpRows& R) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const u32 hchunks = (P.ratio + P.hc - 1) / P.hc;
    R.kvh = blockIdx.y / hchunks;
    const u32 hci = blockIdx.y % hchunks;
    R.h0 = R.kvh * P.ratio + hci * P.hc;
    R.nh = min(P.hc, P.ratio - hci * P.hc);
    R.it = attn_item(P, 0);
    const AttnItem& it = R.it;
    const u32 n_rows = (P.n_items - 1) * P.qt + attn_item(P, P.n_items - 1).n_q;
    const u32 rpb = FP_VPB / P.hc;  // rows per block, the same for every head chunk
    R.row0 = blockIdx.x * rpb;
    R.row_end = min(R.row0 + rpb, n_rows);
    const u32 total = it.len + it.n_chunk;
    auto lo_of = [&](u32 r) { return P.window > 0 ? max(0, (int)(it.q_pos0 + r) + 1 - (int)P.window) : 0; };
    auto hi_of = [&](u32 r) { return P.causal ? min((int)(it.q_pos0 + r) + 1, (int)total) : (int)total; };
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const u32 v = 16 * (warp / FP_CS) + g + 8 * i;
        R.row[i] = R.row0 + v / R.nh;
        R.head[i] = R.h0 + v % R.nh;
        R.ok[i] = v < rpb * R.nh && R.row[i] < R.row_end;
        R.lo[i] = R.ok[i] ? lo_of(R.row[i]) : 0;
        R.hi[i] = R.ok[i] ? max(hi_of(R.row[i]), R.lo[i]) : 0;
    }
    R.lo_min = lo_of(R.row0);
    R.hi_max = max(hi_of(R.row_end - 1), R.lo_min);
    R.lo_max = lo_of(R.row_end - 1);
    R.hi_min = hi_of(R.row0);
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const elem_t* q =
            P.q + (i64)(it.q_row0 + (R.ok[i] ? R.row[i] : R.row0)) * P.q_stride + (i64)R.head[i] * KV_HD + 2 * t;
#pragma unroll
        for (int kk = 0; kk < KV_HD / 16; kk++) {
            R.qa[kk][i] = R.ok[i] ? *(const u32*)(q + 16 * kk) : 0u;
            R.qa[kk][2 + i] = R.ok[i] ? *(const u32*)(q + 16 * kk + 8) : 0u;
        }
    }
    R.c0 = FP_OC * (warp % FP_CS);
#pragma unroll
    for (int n = 0; n < FP_OC / 8; n++) R.acc[n][0] = R.acc[n][1] = R.acc[n][2] = R.acc[n][3] = 0.0f;
    R.m[0] = R.m[1] = KV_NEG_INF;
    R.l[0] = R.l[1] = 0.0f;
}

// One tile of 32 tokens staged in shared memory (keys k; values vt) for the lane's rows: scores
// on tensor cores, masked by position where edge (pos_of(f): the position of token f of the tile,
// INT_MAX past the last), the online softmax, the values. The keys, by KEYS:
//   0  exact in the cache's type (kv_prefill_fp);
//   1  hi parts in k, lo parts in klo (kv_prefill_q);
//   2  codes as exact f16 in k, the tile's per-channel scales and zeros in ksz (KV_HD each;
//      kv_prefill_q on f16 caches, one group per tile): the scale folded into the query, split
//      into exact f16 hi and lo products, and the zeros' term sum_c q[c] * z[c] from one more mma
//      per k-step, as the decode kernel does.
// Called with softcap a constant, so that the loop without a softcap has no tanh.
template <int KEYS, class PosOf>
__device__ __forceinline__ void fp_tile(const AttnParams& P, FpRows& R, const bool softcap, const u16 (*k)[FP_ROW],
                                        const u16 (*klo)[FP_ROW], const u16* ksz, const u16 (*vt)[FP_ROW],
                                        bool edge, PosOf pos_of) {
    const u32 lane = threadIdx.x & 31, t = lane & 3;
    const float sc = P.scale * MMA_LOG2E;
    // Scores: n-tile j holds tokens 8j .. 8j + 7 of the tile; lane 4g + t has rows g, g + 8,
    // tokens 8j + 2t, + 1.
    float S[FP_T / 8][4];
#if KV_DTYPE == 1
    if (KEYS == 2) {
#pragma unroll
        for (int j = 0; j < FP_T / 8; j++) S[j][0] = S[j][1] = S[j][2] = S[j][3] = 0.0f;
        float bz[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int kk = 0; kk < KV_HD / 16; kk++) {
            // This lane's channels of the k-step: 16kk + 2t, + 1 (a0, a1) and + 8, + 9 (a2, a3).
            const u32 sa = *(const u32*)&ksz[16 * kk + 2 * t], sb = *(const u32*)&ksz[16 * kk + 2 * t + 8];
            const u32 za = *(const u32*)&ksz[KV_HD + 16 * kk + 2 * t];
            const u32 zb = *(const u32*)&ksz[KV_HD + 16 * kk + 2 * t + 8];
            const u32 s4[4] = {sa, sa, sb, sb};
            u32 ah[4], al[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                ah[i] = mul_h2(R.qa[kk][i], s4[i]);
                al[i] = fms_h2(R.qa[kk][i], s4[i], ah[i]);  // exact: q * s has 22 bits
            }
            FP_MMA(bz, R.qa[kk][0], R.qa[kk][1], R.qa[kk][2], R.qa[kk][3], za, zb);
#pragma unroll
            for (int jp = 0; jp < FP_T / 16; jp++) {
                u32 b0, b1, b2, b3;
                ldsm_x4(&k[16 * jp + 8 * (lane >> 4) + (lane & 7)][16 * kk + 8 * ((lane >> 3) & 1)], b0, b1, b2, b3);
                FP_MMA(S[2 * jp], ah[0], ah[1], ah[2], ah[3], b0, b1);
                FP_MMA(S[2 * jp], al[0], al[1], al[2], al[3], b0, b1);
                FP_MMA(S[2 * jp + 1], ah[0], ah[1], ah[2], ah[3], b2, b3);
                FP_MMA(S[2 * jp + 1], al[0], al[1], al[2], al[3], b2, b3);
            }
        }
#pragma unroll
        for (int j = 0; j < FP_T / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) S[j][e] += bz[e];
    } else
#endif
#pragma unroll
    for (int j = 0; j < FP_T / 8; j++) {
        S[j][0] = S[j][1] = S[j][2] = S[j][3] = 0.0f;
#pragma unroll
        for (int part = 0; part < (KEYS == 1 ? 2 : 1); part++) {
            const u16 (*kp)[FP_ROW] = part == 0 ? k : klo;
#pragma unroll
            for (int k2 = 0; k2 < KV_HD / 32; k2++) {
                u32 b0, b1, b2, b3;
                ldsm_x4(&kp[8 * j + (lane & 7)][32 * k2 + 8 * (lane >> 3)], b0, b1, b2, b3);
                FP_MMA(S[j], R.qa[2 * k2][0], R.qa[2 * k2][1], R.qa[2 * k2][2], R.qa[2 * k2][3], b0, b1);
                FP_MMA(S[j], R.qa[2 * k2 + 1][0], R.qa[2 * k2 + 1][1], R.qa[2 * k2 + 1][2], R.qa[2 * k2 + 1][3], b2,
                       b3);
            }
            if (KV_HD % 32 != 0) {  // the last 16 channels (head_dim 16, 48, 80, 112)
                constexpr int kk = KV_HD / 16 - 1;
                u32 b0, b1;
                ldsm_x2(&kp[8 * j + (lane & 7)][16 * kk + 8 * ((lane >> 3) & 1)], b0, b1);
                FP_MMA(S[j], R.qa[kk][0], R.qa[kk][1], R.qa[kk][2], R.qa[kk][3], b0, b1);
            }
        }
    }
    float bm[2] = {KV_NEG_INF, KV_NEG_INF};
#pragma unroll
    for (int j = 0; j < FP_T / 8; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = e >> 1;
            float x = S[j][e] * sc;
            if (softcap) {
                const float cap = P.softcap * MMA_LOG2E;
                x = cap * tanhf(x / cap);
            }
#ifndef KV_COST_PROBE  // (the static cost counts the path of tiles inside every row's range)
            if (edge) {
                const int pos = pos_of(8 * j + 2 * t + (e & 1));
                x = pos >= R.lo[r] && pos < R.hi[r] ? x : KV_NEG_INF;
            }
#endif
            S[j][e] = x;
            bm[r] = fmaxf(bm[r], x);
        }
    }
    // A row's maximum moves only by more than MMA_RESCALE (see decode_mma.cuh); the four lanes
    // of a row then agree on its new maximum.
#ifndef KV_COST_PROBE  // (the static cost counts the path of tiles that do not rescale)
    if (__any_sync(0xffffffffu, bm[0] > R.m[0] + MMA_RESCALE || bm[1] > R.m[1] + MMA_RESCALE)) {
#else
    if (false) {
#endif
#pragma unroll
        for (int r = 0; r < 2; r++) {
            bm[r] = fmaxf(bm[r], __shfl_xor_sync(0xffffffffu, bm[r], 1));
            bm[r] = fmaxf(bm[r], __shfl_xor_sync(0xffffffffu, bm[r], 2));
            const bool grow = bm[r] > R.m[r] + MMA_RESCALE;
            const float corr = grow ? ex2(R.m[r] - bm[r]) : 1.0f;
            if (grow) R.m[r] = bm[r];
            R.l[r] *= corr;
#pragma unroll
            for (int n = 0; n < FP_OC / 8; n++) {
                R.acc[n][2 * r] *= corr;
                R.acc[n][2 * r + 1] *= corr;
            }
        }
    }
    const float mref[2] = {R.m[0] == KV_NEG_INF ? 0.0f : R.m[0], R.m[1] == KV_NEG_INF ? 0.0f : R.m[1]};
#pragma unroll
    for (int j = 0; j < FP_T / 8; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            S[j][e] = ex2(S[j][e] - mref[e >> 1]);
            R.l[e >> 1] += S[j][e];
        }
    }
    // Values: k-step kk is tokens 16kk .. 16kk + 15, n-tiles 2kk and 2kk + 1 of the scores; the
    // warp's channels c0 .. c0 + FP_OC - 1.
#pragma unroll
    for (int kk = 0; kk < FP_T / 16; kk++) {
        u32 ah[4], al[4];
        fp_split(S[2 * kk][0], S[2 * kk][1], ah[0], al[0]);
        fp_split(S[2 * kk][2], S[2 * kk][3], ah[1], al[1]);
        fp_split(S[2 * kk + 1][0], S[2 * kk + 1][1], ah[2], al[2]);
        fp_split(S[2 * kk + 1][2], S[2 * kk + 1][3], ah[3], al[3]);
#pragma unroll
        for (int n2 = 0; n2 < FP_OC / 16; n2++) {
            u32 b0, b1, b2, b3;
            ldsm_x4_t(&vt[16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)][R.c0 + 16 * n2 + 8 * (lane >> 4)], b0, b1, b2,
                      b3);
            FP_MMA(R.acc[2 * n2], ah[0], ah[1], ah[2], ah[3], b0, b1);
            FP_MMA(R.acc[2 * n2], al[0], al[1], al[2], al[3], b0, b1);
            FP_MMA(R.acc[2 * n2 + 1], ah[0], ah[1], ah[2], ah[3], b2, b3);
            FP_MMA(R.acc[2 * n2 + 1], al[0], al[1], al[2], al[3], b2, b3);
        }
    }
}

// Split `split` of each (item, row, head) of the lane's rows: rows g and g + 8 of the warp's
// vectors, each row's sum over its four lanes, the warp's channels (the maximum and sum from the
// first warp of a pair).
// With fp_only 3 (split 0 is the only split: no quantized groups, and the output rows allow it)
// the finished output instead, as the combine would write it.
__device__ __forceinline__ void fp_write(const AttnParams& P, FpRows& R, u32 split) {
    const u32 t = threadIdx.x & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        R.l[r] += __shfl_xor_sync(0xffffffffu, R.l[r], 1);
        R.l[r] += __shfl_xor_sync(0xffffffffu, R.l[r], 2);
        if (!R.ok[r]) continue;
        if (P.fp_only == 3) {
            const float inv = R.l[r] > 0.0f ? 1.0f / R.l[r] : 0.0f;
            elem_t* o =
                P.out + (i64)(R.it.q_row0 + R.row[r]) * P.out_stride + (i64)R.head[r] * KV_HD + R.c0 + 2 * t;
#pragma unroll
            for (int n = 0; n < FP_OC / 8; n++) {
                const float x0 = R.acc[n][2 * r] * inv, x1 = R.acc[n][2 * r + 1] * inv;
                *(u32*)(o + 8 * n) = KV_DTYPE == 2 ? f2bf2(x0, x1) : f2h2(x0, x1);
            }
            continue;
        }
        const u32 item = R.row[r] / P.qt, rr = R.row[r] % P.qt;
        float* dst =
            P.part + ((((u64)item * P.qt + rr) * P.n_q_heads + R.head[r]) * P.n_splits + split) * (KV_HD + 2);
        if (t == 0 && R.c0 == 0) {
            dst[0] = R.m[r] == KV_NEG_INF ? KV_NEG_INF : R.m[r] * MMA_LN2;  // natural units
            dst[1] = R.l[r];
        }
#pragma unroll
        for (int n = 0; n < FP_OC / 8; n++)
            *(FpFloat2*)&dst[2 + R.c0 + 8 * n + 2 * t] = {R.acc[n][2 * r], R.acc[n][2 * r + 1]};
    }
}

// Its shared memory passes 48 KB above head_dim 128 (67584 bytes at 256), and is then dynamic:
// KV_FP_DYN bytes, which the host computes (prefill_fp_dynamic_smem in src/cuda/kernels.rs) and
// launches with.
#ifndef KV_FP_DYN
#define KV_FP_DYN 0
#endif
#if KV_FP_DYN
static_assert(sizeof(FpShared) == KV_FP_DYN,
              "the host's size of kv_prefill_fp's dynamic shared memory (prefill_fp_dynamic_smem) is not the kernel's");
#else
static_assert(sizeof(FpShared) <= 48 * 1024, "kv_prefill_fp's shared memory passes 48 KB: the host must pass KV_FP_DYN");
#endif

// grid (row blocks, kv heads * head chunks, 1), KV_THREADS threads: split 0, the full-precision
// tokens.
extern "C" __global__ void __launch_bounds__(KV_THREADS) kv_prefill_fp(const AttnParams P) {
#if __CUDA_ARCH__ >= 800
#if KV_FP_DYN
    KV_DYNAMIC_SHARED(fp_smem, KV_FP_DYN);
    FpShared& sh = *reinterpret_cast<FpShared*>(fp_smem);
#else
    __shared__ FpShared sh;
#endif
    FpRows R;
    fp_rows(P, R);
    const AttnItem& it = R.it;
    const u32 n_sink = min(it.len, (u32)KV_SINKS);
    const u32 ws = min((u32)KV_SINKS + it.quantized, it.len);
    const u32 n_fp = n_sink + (it.len - ws) + it.n_chunk;
    const elem_t* hw = head_window(P.windows, it.slot, R.kvh);
    const u32 n_tiles = (n_fp + FP_T - 1) / FP_T;
    auto first_pos = [&](u32 i) { return (int)fp_pos(it, n_sink, ws, FP_T * i); };
    auto last_pos = [&](u32 i) { return (int)fp_pos(it, n_sink, ws, min(FP_T * i + FP_T - 1, n_fp - 1)); };
    u32 tb = 0, te = n_tiles;
    while (tb < te && last_pos(tb) < R.lo_min) tb++;
    while (te > tb && first_pos(te - 1) >= R.hi_max) te--;

    // The tiles; called with a constant, so that the loop without a softcap has no tanh.
    auto tiles = [&](const bool softcap) {
        if (tb < te) fp_stage(P, sh, it, hw, R.kvh, n_sink, ws, n_fp, tb, 0);
        cp_commit();
        for (u32 i = tb; i < te; i++) {
            const u32 b = (i - tb) & 1;
            if (i + 1 < te) fp_stage(P, sh, it, hw, R.kvh, n_sink, ws, n_fp, i + 1, b ^ 1);
            cp_commit();
            cp_wait<1>();
            __syncthreads();
            const u32 f0 = FP_T * i;
            const bool edge = f0 + FP_T > n_fp || first_pos(i) < R.lo_max || last_pos(i) >= R.hi_min;
            auto pos_of = [&](u32 x) {
                const u32 f = f0 + x;
                return f < n_fp ? (int)fp_pos(it, n_sink, ws, f) : 0x7fffffff;
            };
            fp_tile<0>(P, R, softcap, sh.k[b], sh.k[b], nullptr, sh.v[b], edge, pos_of);
            __syncthreads();  // the buffer is staged again next time round
        }
    };
    if (P.softcap > 0.0f) {
        tiles(true);
    } else {
        tiles(false);
    }
    cp_wait<0>();
    fp_write(P, R, 0);
#endif
}
// The quantized groups of a chunk of queries, the same way (kv_prefill_q): each tile of 32
// quantized tokens is dequantized once into shared memory for the block's FP_VPB query vectors,
// instead of being read by kv_decode_mma once for every 8 of them (4 at head_dim 256). The keys
// become hi and lo parts of the cache's type (code * scale + zero in f32, about 22 bits in f16,
// 16 in bf16: two mmas per product), or, for f16 caches with one group a tile, stay codes with
// the scales folded into the query (PQ_FOLD, below); the values one part (rounded once, as the
// tensor-core decode's are). The codes of the next tile are loaded into registers (its value
// scales and zeros into shared memory) while this one is computed. Split s + 1 of the partial
// states for blockIdx.z = s, `ups` groups each.
// f16 caches whose tiles lie in one group: the key codes staged as they are, their scales folded
// into the query (fp_tile's KEYS 2). -DKV_PQ_FOLD=0 keeps the keys' hi and lo parts there too,
// for comparison.
#ifndef KV_PQ_FOLD
#define KV_PQ_FOLD 1
#endif
#define PQ_FOLD (KV_PQ_FOLD && KV_DTYPE == 1 && KV_G >= FP_T)

struct PqShared {
    __align__(16) u16 k[FP_T][FP_ROW];
    __align__(16) u16 klo[PQ_FOLD ? 1 : FP_T][FP_ROW];
    __align__(16) u16 v[FP_T][FP_ROW];
    __align__(16) u16 ksz[PQ_FOLD ? 2 * KV_HD : 8];  // PQ_FOLD: the tile's key scales, then its zeros
    // The next tile's value scales, then its zeros (token x's of value group n at x * KV_NG + n),
    // copied in with cp.async while this tile is computed.
    __align__(16) u16 vsz[2 * FP_T * KV_NG];
};

// A thread's pieces of a tile: key pieces of two channels and 8 tokens, value pieces of one
// token and 8 channels.
#define PQ_KP (KV_HD / 2 * (FP_T / 8))
#define PQ_VP (FP_T * (KV_HD / 8))
#define PQ_KN ((PQ_KP + KV_THREADS - 1) / KV_THREADS)
#define PQ_VN ((PQ_VP + KV_THREADS - 1) / KV_THREADS)

// The bytes of those pieces, loaded a tile ahead: the two channels' codes (8 tokens each, in
// the low 16 bits at 2 bits; interleaved key codes, KV_K_ILV: already as pq_store reads them,
// see pq_key_octet), scales and zeros (f16 pairs); a token's codes of 8 channels. (The value
// scales and zeros go to shared memory: PqShared.vsz.)
struct PqRaw {
    u32 kc0[PQ_KN], kc1[PQ_KN], ks[PQ_KN], kz[PQ_KN];
    u32 vc[PQ_VN];
};
// 16-byte pieces of the tile's value scales (and as many of its zeros).
#define PQ_SP (FP_T * KV_NG * 2 / 16)

#if KV_K_ILV
// The codes of eight tokens (bytes b0 .. b0 + KB - 1 of their runs) of channels c and c + 1 (c
// even), from one group's interleaved key codes kg (common.cuh), as pq_store reads them: xa
// holds each channel's first 16 bits in one half (c's in the low one), xb its next 16 (4 bits).
__device__ __forceinline__ void pq_key_octet(const u8* kg, u32 c, u32 b0, u32& xa, u32& xb) {
    xb = 0u;
    if (KV_K_UNIT == 1) {
        // A byte per row; c and c + 1 at bytes s and 2 + s of their aligned four.
        const u32 s = (c >> 1) & 1u, sel = s | ((4 + s) << 4) | ((2 + s) << 8) | ((6 + s) << 12);
        const u8* p = kg + b0 * KV_HD + (c & ~3u);
        xa = prmt(__ldg((const u32*)p), __ldg((const u32*)(p + KV_HD)), sel);
        if (KV_KB == 4) xb = prmt(__ldg((const u32*)(p + 2 * KV_HD)), __ldg((const u32*)(p + 3 * KV_HD)), sel);
    } else if (KV_K_UNIT == 2) {
        // 16-bit units, c's and c + 1's side by side: one row at 2 bits, two at 4.
        const u8* p = kg + b0 / 2 * (2 * KV_HD) + 2 * c;
        xa = __ldg((const u32*)p);
        if (KV_KB == 4) xb = __ldg((const u32*)(p + 2 * KV_HD));
    } else {
        // 32-bit units (4 bits, G = 64): one row.
        const u32* p = (const u32*)(kg + b0 / 4 * (4 * KV_HD) + 4 * c);
        const u32 k0 = __ldg(p), k1 = __ldg(p + 1);
        xa = prmt(k0, k1, 0x5410);
        xb = prmt(k0, k1, 0x7632);
    }
}
#endif

// Tile i: quantized tokens t0 + 32i .. + 31 (of those before t_end). Pieces past t_end are
// loaded as zeros (codes, scales and zeros: their keys and values dequantize to 0). The value
// scales and zeros are queued as cp.async copies into sh.vsz (the caller commits and waits):
// loaded into registers, each thread's would be two 16-bit loads per piece, which its warp
// either waits for at once (to pack them into one register) or keeps in registers of their own
// across the tile (more than head_dim 256 leaves).
__device__ __forceinline__ void pq_load(const AttnParams& P, PqShared& sh, PqRaw& raw, const u32* bt, u32 kvh, u32 t0,
                                        u32 t_end, u32 i) {
    const u32 f0 = t0 + FP_T * i;
    // The tile's tokens lie in one group (G of 32 or 64) or two (G = 16: the second from token
    // 16 of the tile, when the tile reaches it).
    u32 gi0, gi1 = 0;
    const u8* blk0 = group_block(P.pages, bt, f0 / KV_G, kvh, &gi0);
    const u8* blk1 = KV_G < FP_T && f0 + KV_G < t_end ? group_block(P.pages, bt, f0 / KV_G + 1, kvh, &gi1) : blk0;
    const u32 tg0 = f0 % KV_G;
#pragma unroll
    for (int n = 0; n < PQ_KN; n++) {
        const u32 x = threadIdx.x + n * KV_THREADS, cp = x % (KV_HD / 2), o = x / (KV_HD / 2);
        raw.kc0[n] = raw.kc1[n] = raw.ks[n] = raw.kz[n] = 0u;
        if (x < PQ_KP && f0 + 8 * o < t_end) {
            // Octets never straddle a group (G is a multiple of 8).
            const bool second = KV_G < FP_T && 8 * o >= KV_G;
            const u8* blk = second ? blk1 : blk0;
            const u32 gi = second ? gi1 : gi0, tg = (tg0 + 8 * o) % KV_G;
#if KV_K_ILV
            pq_key_octet(blk + KV_K_CODES + gi * MMA_KC, 2 * cp, tg * KV_KB / 8, raw.kc0[n], raw.kc1[n]);
#else
            const u8* kc = blk + KV_K_CODES + gi * MMA_KC + 2 * cp * KV_K_RUN + tg * KV_KB / 8;
            if (KV_KB == 2) {
                raw.kc0[n] = __ldg((const u16*)kc);
                raw.kc1[n] = __ldg((const u16*)(kc + KV_K_RUN));
            } else {
                raw.kc0[n] = __ldg((const u32*)kc);
                raw.kc1[n] = __ldg((const u32*)(kc + KV_K_RUN));
            }
#endif
            raw.ks[n] = __ldg((const u32*)(blk + KV_K_SCALE + gi * KV_HD * 2) + cp);
            raw.kz[n] = __ldg((const u32*)(blk + KV_K_ZERO + gi * KV_HD * 2) + cp);
        }
    }
#pragma unroll
    for (int n = 0; n < PQ_VN; n++) {
        const u32 y = threadIdx.x + n * KV_THREADS, tk = y / (KV_HD / 8), co = y % (KV_HD / 8);
        raw.vc[n] = 0u;
        if (y < PQ_VP && f0 + tk < t_end) {
            const bool second = KV_G < FP_T && tk >= KV_G;
            const u8* blk = second ? blk1 : blk0;
            const u32 gi = second ? gi1 : gi0, tg = (tg0 + tk) % KV_G;
            const u8* vc = blk + KV_V_CODES + gi * MMA_VC + tg * KV_V_ROW + co * KV_VB;
            raw.vc[n] = KV_VB == 2 ? (u32)__ldg((const u16*)vc) : __ldg((const u32*)vc);
        }
    }
    // The tile's tokens' scales (then zeros) are one run of a page, or at G = 16 two: piece x
    // starts at token tk of the tile (pieces hold whole tokens, or parts of one, and never
    // straddle a group or t_end, which are multiples of 16 tokens).
#pragma unroll
    for (u32 x0 = 0; x0 < 2 * PQ_SP; x0 += KV_THREADS) {
        const u32 x = x0 + threadIdx.x, b = x % PQ_SP * 16, tk = b / (2 * KV_NG);
        if (x0 + KV_THREADS > 2 * PQ_SP && x >= 2 * PQ_SP) continue;
        u8* dst = (u8*)sh.vsz + x * 16;
        if (f0 + tk < t_end) {
            const bool second = KV_G < FP_T && tk >= KV_G;
            const u8* blk = (second ? blk1 : blk0) + (x < PQ_SP ? KV_V_SCALE : KV_V_ZERO);
            const u32 gi = second ? gi1 : gi0, tg = (tg0 + tk) % KV_G;
            cp_async16(dst, blk + (gi * KV_G + tg) * KV_NG * 2 + b % (2 * KV_NG));
        } else {
            *(FpZero16*)dst = {0u, 0u, 0u, 0u};
        }
    }
}

// Codes c0 (low half) and c1 (high half) of a u32, as f32.
__device__ __forceinline__ float pq_code_lo(u32 c) { return code_f(c & 0xffffu); }
__device__ __forceinline__ float pq_code_hi(u32 c) { return code_f(c >> 16); }

// Dequantizes the loaded tile into shared memory (tokens past t_end: zeros, from zeros).
__device__ __forceinline__ void pq_store(PqShared& sh, const PqRaw& raw) {
#pragma unroll
    for (int n = 0; n < PQ_KN; n++) {
        const u32 x = threadIdx.x + n * KV_THREADS, cp = x % (KV_HD / 2), o = x / (KV_HD / 2);
        if (x >= PQ_KP) continue;
#if !PQ_FOLD
        const float s0 = h2f((u16)(raw.ks[n] & 0xffffu)), s1 = h2f((u16)(raw.ks[n] >> 16));
        const float z0 = h2f((u16)(raw.kz[n] & 0xffffu)), z1 = h2f((u16)(raw.kz[n] >> 16));
#endif
        // Token j's codes of the two channels in the two halves of one word (interleaved key
        // codes: pq_key_octet loaded them so).
#if KV_K_ILV
        const u32 xa = raw.kc0[n], xb = raw.kc1[n];
#else
        const u32 xa = prmt(raw.kc0[n], raw.kc1[n], 0x5410), xb = prmt(raw.kc0[n], raw.kc1[n], 0x7632);
#endif
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const u32 c = KV_KB == 2 ? (xa >> (2 * j)) & 0x00030003u : ((j < 4 ? xa : xb) >> (4 * (j & 3))) & 0x000f000fu;
#if PQ_FOLD
            // The codes as exact f16 (1024 + code, less 1024).
            *(u32*)&sh.k[8 * o + j][2 * cp] = sub_h2(c | 0x64006400u, 0x64006400u);
#else
            u32 hi, lo;
            fp_split(fmaf(pq_code_lo(c), s0, z0), fmaf(pq_code_hi(c), s1, z1), hi, lo);
            *(u32*)&sh.k[8 * o + j][2 * cp] = hi;
            *(u32*)&sh.klo[8 * o + j][2 * cp] = lo;
#endif
        }
#if PQ_FOLD
        // The first octet's pieces hold the tile's (its group's) scales and zeros.
        if (o == 0) {
            *(u32*)&sh.ksz[2 * cp] = raw.ks[n];
            *(u32*)&sh.ksz[KV_HD + 2 * cp] = raw.kz[n];
        }
#endif
    }
#pragma unroll
    for (int n = 0; n < PQ_VN; n++) {
        const u32 y = threadIdx.x + n * KV_THREADS, tk = y / (KV_HD / 8), co = y % (KV_HD / 8);
        if (y >= PQ_VP) continue;
        u32 w[4];
        {
            const u32 si = tk * KV_NG + 8 * co / KV_VG;
            const u16 vs = sh.vsz[si], vz = sh.vsz[FP_T * KV_NG + si];
            // Channel pair p's codes in the two halves of one word: channel 2p + 1's moved up by
            // 16 - VB bits, each half then read at bit 2p * VB of its channels.
            const u32 xa = raw.vc[n] & 0xffffu, xb = raw.vc[n] >> 16;
            const u32 ya = xa | (xa << (16 - KV_VB)), yb = xb | (xb << (16 - KV_VB));
#if KV_DTYPE == 1
            const u32 magic = 0x64006400u, s2 = vs * 0x00010001u, z2 = vz * 0x00010001u;
#else
            const float s = h2f(vs), z = h2f(vz);
#endif
#pragma unroll
            for (int p = 0; p < 4; p++) {
                const u32 c = KV_VB == 2 ? (ya >> (4 * p)) & 0x00030003u
                                         : ((p < 2 ? ya : yb) >> (8 * (p & 1))) & 0x000f000fu;
#if KV_DTYPE == 1
                w[p] = fma_h2(sub_h2(c | magic, magic), s2, z2);
#else
                w[p] = f2bf2(fmaf(pq_code_lo(c), s, z), fmaf(pq_code_hi(c), s, z));
#endif
            }
        }
        *(FpZero16*)&sh.v[tk][8 * co] = {w[0], w[1], w[2], w[3]};
    }
}

// grid (row blocks, kv heads * head chunks, quantized splits), KV_THREADS threads. Registers
// for 2 blocks per multiprocessor (215 at f16 and head_dim 128, 255 at 256, no spills); left to
// itself ptxas chose 168 and spilled. KV_PQ_BLOCKS=3 asks for 3 (spills) for measuring one
// against the other.
#ifndef KV_PQ_BLOCKS
#define KV_PQ_BLOCKS 2
#endif
// Its shared memory passes 48 KB at head_dim 256 without PQ_FOLD (51728 bytes: bf16 caches), and
// is then dynamic: KV_PQ_DYN bytes, which the host computes (prefill_q_dynamic_smem in
// src/cuda/kernels.rs) and launches with.
#ifndef KV_PQ_DYN
#define KV_PQ_DYN 0
#endif
#if KV_PQ_DYN
static_assert(sizeof(PqShared) == KV_PQ_DYN,
              "the host's size of kv_prefill_q's dynamic shared memory (prefill_q_dynamic_smem) is not the kernel's");
#else
static_assert(sizeof(PqShared) <= 48 * 1024, "kv_prefill_q's shared memory passes 48 KB: the host must pass KV_PQ_DYN");
#endif
extern "C" __global__ void __launch_bounds__(KV_THREADS, KV_PQ_BLOCKS) kv_prefill_q(const AttnParams P) {
#if __CUDA_ARCH__ >= 800
#if KV_PQ_DYN
    KV_DYNAMIC_SHARED(pq_smem, KV_PQ_DYN);
    PqShared& sh = *reinterpret_cast<PqShared*>(pq_smem);
#else
    __shared__ PqShared sh;
#endif
    FpRows R;
    fp_rows(P, R);
    const AttnItem& it = R.it;
    // This split's quantized tokens, at positions KV_SINKS + t0 .. KV_SINKS + t_end - 1.
    const u32 t0 = blockIdx.z * P.ups * KV_G, t_end = min(t0 + P.ups * KV_G, it.quantized);
    const u32* bt = P.blocks + (u64)it.slot * KV_SEQ_PAGES;
    const int p0 = KV_SINKS + (int)t0;
    const u32 n_tiles = t_end > t0 ? (t_end - t0 + FP_T - 1) / FP_T : 0;
    const u32 tb = R.lo_min > p0 ? min(n_tiles, (u32)(R.lo_min - p0) / FP_T) : 0;
    const u32 te = R.hi_max > p0 ? min(n_tiles, (u32)(R.hi_max - p0 + FP_T - 1) / FP_T) : 0;
    auto tiles = [&](const bool softcap) {
        PqRaw raw;
        if (tb < te) {
            pq_load(P, sh, raw, bt, R.kvh, t0, t_end, tb);
            cp_commit();
            cp_wait<0>();
            __syncthreads();
        }
        for (u32 i = tb; i < te; i++) {
            pq_store(sh, raw);
            __syncthreads();
            // The next tile's loads (the last tile's again after the last: loads the warps
            // wait for at a branch's end, where the compiler joins their scoreboards, would
            // stop them at once).
            pq_load(P, sh, raw, bt, R.kvh, t0, t_end, i + 1 < te ? i + 1 : i);
            cp_commit();
            const u32 f0 = t0 + FP_T * i;
            const int first = KV_SINKS + (int)f0, last = KV_SINKS + (int)min(f0 + FP_T, t_end) - 1;
            const bool edge = f0 + FP_T > t_end || first < R.lo_max || last >= R.hi_min;
            auto pos_of = [&](u32 x) { return f0 + x < t_end ? first + (int)x : 0x7fffffff; };
            fp_tile<PQ_FOLD ? 2 : 1>(P, R, softcap, sh.k, sh.klo, sh.ksz, sh.v, edge, pos_of);
            cp_wait<0>();     // the next tile's value scales and zeros have landed
            __syncthreads();  // the tile is stored again next time round
        }
    };
    if (P.softcap > 0.0f) {
        tiles(true);
    } else {
        tiles(false);
    }
    fp_write(P, R, 1 + blockIdx.z);
#endif
}
#endif
