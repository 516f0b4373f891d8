// Chunks of queries on tensor cores: the full-precision tokens of one sequence (its sinks, its
// window ring and the chunk being appended) against 64 query vectors per block, flash-attention
// style. The rows of a chunk (prompt prefill, `append_attend`, `attend`) are many, so a block
// stages each tile of 32 tokens' keys and values once (16-byte cp.async copies into shared
// memory, double-buffered) for 16 query vectors in each of its 4 warps, instead of once per
// 8 / hc rows as the CUDA-core body of split 0 (attn.cuh) reads them. It writes split 0 of the
// partial states; the quantized groups are the other splits (kv_decode_mma with fp_only = 2,
// whose split 0 then does nothing), and the combine merges them as before.
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
// Vector v of a block: row v / nh of the block's rows (64 / hc rows: all items of a launch are
// consecutive rows of one sequence, qt rows each), query head h0 + v % nh.
#pragma once
#include "attn.cuh"
#include "decode_mma.cuh"

// In the module that chunks of queries launch (8 query vectors, decode_mma.cuh's layouts), for
// f16 and bf16 caches. Must match prefill_fp_layout() in src/cuda/kernels.rs.
#define KV_FP_MMA_OK (KV_MMA_OK && KV_NQ == 8 && (KV_DTYPE == 1 || KV_DTYPE == 2))

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
#define FP_VPB 64  // query vectors per block (16 per warp)
#define FP_T 32    // tokens per tile
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
    // Each piece of a token's key row with the same piece of its value row: one position.
    for (u32 x = threadIdx.x; x < FP_T * PER_ROW; x += KV_THREADS) {
        const u32 tok = x / PER_ROW, c = 8 * (x % PER_ROW);
        const u32 f = FP_T * i + tok;
        if (f < n_fp) {
            const u32 pos = fp_pos(it, n_sink, ws, f);
            cp_async16(&sh.k[b][tok][c], fp_row(P, it, hw, kvh, pos, false) + c);
            cp_async16(&sh.v[b][tok][c], fp_row(P, it, hw, kvh, pos, true) + c);
        } else {
            *(FpZero16*)&sh.k[b][tok][c] = {0u, 0u, 0u, 0u};
            *(FpZero16*)&sh.v[b][tok][c] = {0u, 0u, 0u, 0u};
        }
    }
}

// grid (row blocks, kv heads * head chunks, 1), KV_THREADS threads.
extern "C" __global__ void __launch_bounds__(KV_THREADS) kv_prefill_fp(const AttnParams P) {
#if __CUDA_ARCH__ >= 800
    __shared__ FpShared sh;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const u32 hchunks = (P.ratio + P.hc - 1) / P.hc;
    const u32 kvh = blockIdx.y / hchunks, hci = blockIdx.y % hchunks;
    const u32 h0 = kvh * P.ratio + hci * P.hc, nh = min(P.hc, P.ratio - hci * P.hc);
    const AttnItem it = attn_item(P, 0);
    const u32 n_rows = (P.n_items - 1) * P.qt + attn_item(P, P.n_items - 1).n_q;
    const u32 rpb = FP_VPB / P.hc;  // rows per block, the same for every head chunk
    const u32 row0 = blockIdx.x * rpb, row_end = min(row0 + rpb, n_rows);
    const u32 total = it.len + it.n_chunk;
    const u32 n_sink = min(it.len, (u32)KV_SINKS);
    const u32 ws = min((u32)KV_SINKS + it.quantized, it.len);
    const u32 n_fp = n_sink + (it.len - ws) + it.n_chunk;
    const elem_t* hw = head_window(P.windows, it.slot, kvh);
    auto lo_of = [&](u32 r) { return P.window > 0 ? max(0, (int)(it.q_pos0 + r) + 1 - (int)P.window) : 0; };
    auto hi_of = [&](u32 r) { return P.causal ? min((int)(it.q_pos0 + r) + 1, (int)total) : (int)total; };

    // This lane's rows of the warp's tile: vectors 16 warp + g and 16 warp + g + 8.
    u32 row[2], head[2];
    bool ok[2];
    int lo[2], hi[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const u32 v = 16 * warp + g + 8 * i;
        row[i] = row0 + v / nh;
        head[i] = h0 + v % nh;
        ok[i] = v < rpb * nh && row[i] < row_end;
        lo[i] = ok[i] ? lo_of(row[i]) : 0;
        hi[i] = ok[i] ? max(hi_of(row[i]), lo[i]) : 0;
    }
    // The queries as A operands, k-step kk: rows g and g + 8, channels 16kk + 2t, + 1 and
    // 16kk + 2t + 8, + 9.
    u32 qa[KV_HD / 16][4];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const elem_t* q = P.q + (i64)(it.q_row0 + (ok[i] ? row[i] : row0)) * P.q_stride + (i64)head[i] * KV_HD + 2 * t;
#pragma unroll
        for (int kk = 0; kk < KV_HD / 16; kk++) {
            qa[kk][i] = ok[i] ? *(const u32*)(q + 16 * kk) : 0u;
            qa[kk][2 + i] = ok[i] ? *(const u32*)(q + 16 * kk + 8) : 0u;
        }
    }

    // The positions some row of the block sees, and those every row sees (rows are in order of
    // position): tiles outside the first are skipped, tiles inside the second need no mask.
    const int lo_min = lo_of(row0), hi_max = max(hi_of(row_end - 1), lo_min);
    const int lo_max = lo_of(row_end - 1), hi_min = hi_of(row0);
    const u32 n_tiles = (n_fp + FP_T - 1) / FP_T;
    auto first_pos = [&](u32 i) { return (int)fp_pos(it, n_sink, ws, FP_T * i); };
    auto last_pos = [&](u32 i) { return (int)fp_pos(it, n_sink, ws, min(FP_T * i + FP_T - 1, n_fp - 1)); };
    u32 tb = 0, te = n_tiles;
    while (tb < te && last_pos(tb) < lo_min) tb++;
    while (te > tb && first_pos(te - 1) >= hi_max) te--;

    float acc[KV_HD / 8][4];
#pragma unroll
    for (int n = 0; n < KV_HD / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    float m[2] = {KV_NEG_INF, KV_NEG_INF}, l[2] = {0.0f, 0.0f};
    const float sc = P.scale * MMA_LOG2E;

    // The tiles; called with a constant, so that the loop without a softcap has no tanh.
    auto tiles = [&](const bool softcap) {
        if (tb < te) fp_stage(P, sh, it, hw, kvh, n_sink, ws, n_fp, tb, 0);
        cp_commit();
        for (u32 i = tb; i < te; i++) {
            const u32 b = (i - tb) & 1;
            if (i + 1 < te) fp_stage(P, sh, it, hw, kvh, n_sink, ws, n_fp, i + 1, b ^ 1);
            cp_commit();
            cp_wait<1>();
            __syncthreads();
            // Scores: n-tile j holds tokens 8j .. 8j + 7 of the tile; lane 4g + t has rows g, g + 8,
            // tokens 8j + 2t, + 1.
            float S[FP_T / 8][4];
    #pragma unroll
            for (int j = 0; j < FP_T / 8; j++) {
                S[j][0] = S[j][1] = S[j][2] = S[j][3] = 0.0f;
    #pragma unroll
                for (int k2 = 0; k2 < KV_HD / 32; k2++) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(&sh.k[b][8 * j + (lane & 7)][32 * k2 + 8 * (lane >> 3)], b0, b1, b2, b3);
                    FP_MMA(S[j], qa[2 * k2][0], qa[2 * k2][1], qa[2 * k2][2], qa[2 * k2][3], b0, b1);
                    FP_MMA(S[j], qa[2 * k2 + 1][0], qa[2 * k2 + 1][1], qa[2 * k2 + 1][2], qa[2 * k2 + 1][3], b2, b3);
                }
                if (KV_HD % 32 != 0) {  // the last 16 channels (head_dim 16, 48, 80, 112)
                    constexpr int kk = KV_HD / 16 - 1;
                    u32 b0, b1;
                    ldsm_x2(&sh.k[b][8 * j + (lane & 7)][16 * kk + 8 * ((lane >> 3) & 1)], b0, b1);
                    FP_MMA(S[j], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b0, b1);
                }
            }
            const u32 f0 = FP_T * i;
            const bool edge = f0 + FP_T > n_fp || first_pos(i) < lo_max || last_pos(i) >= hi_min;
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
                    if (edge) {
                        const u32 f = f0 + 8 * j + 2 * t + (e & 1);
                        const int pos = f < n_fp ? (int)fp_pos(it, n_sink, ws, f) : 0x7fffffff;
                        x = pos >= lo[r] && pos < hi[r] ? x : KV_NEG_INF;
                    }
                    S[j][e] = x;
                    bm[r] = fmaxf(bm[r], x);
                }
            }
            // A row's maximum moves only by more than MMA_RESCALE (see decode_mma.cuh); the four
            // lanes of a row then agree on its new maximum.
            if (__any_sync(0xffffffffu, bm[0] > m[0] + MMA_RESCALE || bm[1] > m[1] + MMA_RESCALE)) {
    #pragma unroll
                for (int r = 0; r < 2; r++) {
                    bm[r] = fmaxf(bm[r], __shfl_xor_sync(0xffffffffu, bm[r], 1));
                    bm[r] = fmaxf(bm[r], __shfl_xor_sync(0xffffffffu, bm[r], 2));
                    const bool grow = bm[r] > m[r] + MMA_RESCALE;
                    const float corr = grow ? ex2(m[r] - bm[r]) : 1.0f;
                    if (grow) m[r] = bm[r];
                    l[r] *= corr;
    #pragma unroll
                    for (int n = 0; n < KV_HD / 8; n++) {
                        acc[n][2 * r] *= corr;
                        acc[n][2 * r + 1] *= corr;
                    }
                }
            }
            const float mref[2] = {m[0] == KV_NEG_INF ? 0.0f : m[0], m[1] == KV_NEG_INF ? 0.0f : m[1]};
    #pragma unroll
            for (int j = 0; j < FP_T / 8; j++) {
    #pragma unroll
                for (int e = 0; e < 4; e++) {
                    S[j][e] = ex2(S[j][e] - mref[e >> 1]);
                    l[e >> 1] += S[j][e];
                }
            }
            // Values: k-step kk is tokens 16kk .. 16kk + 15, n-tiles 2kk and 2kk + 1 of the scores.
    #pragma unroll
            for (int kk = 0; kk < FP_T / 16; kk++) {
                u32 ah[4], al[4];
                fp_split(S[2 * kk][0], S[2 * kk][1], ah[0], al[0]);
                fp_split(S[2 * kk][2], S[2 * kk][3], ah[1], al[1]);
                fp_split(S[2 * kk + 1][0], S[2 * kk + 1][1], ah[2], al[2]);
                fp_split(S[2 * kk + 1][2], S[2 * kk + 1][3], ah[3], al[3]);
    #pragma unroll
                for (int n2 = 0; n2 < KV_HD / 16; n2++) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4_t(&sh.v[b][16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)][16 * n2 + 8 * (lane >> 4)], b0, b1, b2,
                              b3);
                    FP_MMA(acc[2 * n2], ah[0], ah[1], ah[2], ah[3], b0, b1);
                    FP_MMA(acc[2 * n2], al[0], al[1], al[2], al[3], b0, b1);
                    FP_MMA(acc[2 * n2 + 1], ah[0], ah[1], ah[2], ah[3], b2, b3);
                    FP_MMA(acc[2 * n2 + 1], al[0], al[1], al[2], al[3], b2, b3);
                }
            }
            __syncthreads();  // the buffer is staged again next time round
        }
    };
    if (P.softcap > 0.0f) {
        tiles(true);
    } else {
        tiles(false);
    }
    cp_wait<0>();

    // Split 0 of each (item, row, head): rows g and g + 8 of the warp's vectors, the row's sum
    // over its four lanes.
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (!ok[r]) continue;
        const u32 item = row[r] / P.qt, rr = row[r] % P.qt;
        float* dst = P.part + ((((u64)item * P.qt + rr) * P.n_q_heads + head[r]) * P.n_splits) * (KV_HD + 2);
        if (t == 0) {
            dst[0] = m[r] == KV_NEG_INF ? KV_NEG_INF : m[r] * MMA_LN2;  // natural units
            dst[1] = l[r];
        }
#pragma unroll
        for (int n = 0; n < KV_HD / 8; n++) *(FpFloat2*)&dst[2 + 8 * n + 2 * t] = {acc[n][2 * r], acc[n][2 * r + 1]};
    }
#endif
}
#endif
