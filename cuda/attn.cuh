// Fused attention over the cache, flash-decoding style: the context of every (sequence, kv head)
// is cut into splits; one block per (split, kv head, item) scores its part for all the query
// heads of the kv head's GQA group (and, in prefill, several query rows), so each page is read
// once per group of query vectors. A second kernel combines the splits' partial softmax states.
//
// The context of an item is a list of units: its quantized groups (G tokens each) first, then
// its full-precision tokens 32 at a time (sinks, the window ring, then the chunk being appended,
// read from the caller's key/value rows). A block's warps take the units of its split in turn,
// each warp keeping its own online softmax; the block merges its warps at the end.
//
// Quantized keys are scored with the scale folded into the query and the zero into one bias
// per group (per channel), or per (token, channel group) (per token); values fold their scale
// into the softmax weight and accumulate the zero term once per channel group. Codes are
// unpacked in registers; everything accumulates in f32.
#pragma once
#include "common.cuh"

#ifndef KV_NQ
#error "KV_NQ (query vectors per block) must be defined"
#endif
#if KV_NQ * KV_HD > 1024
#error "KV_NQ * KV_HD must be at most 1024"
#endif

#define KV_MAX_ITEMS 64
// Channels of the output each lane accumulates: lane * KV_CPL .. + KV_CPL.
#define KV_CPL ((KV_HD + 31) / 32)
// A lane's channels lie in one value group: fold the value scale into the weight.
#define KV_FOLD_V (KV_VG % KV_CPL == 0)

struct AttnItem {
    u32 slot;        // sequence slot
    u32 len;         // tokens stored (the past)
    u32 quantized;   // of those, quantized (whole groups)
    u32 chunk_row0;  // input key/value row of the chunk's first token
    u32 n_chunk;     // chunk tokens, at positions len.. (exact, from the input rows)
    u32 q_row0;      // first query and output row of the item
    u32 n_q;         // query rows of the item (at most qt)
    u32 q_pos0;      // position of the first query row
    // A launch that appends (write_new): 0, or 1 when the new tokens push group
    // quantized / G out of the window and the launch quantizes it into page flush_page
    // (flush_group), 2 when that group also starts the page, whose block-table entry the launch
    // then writes.
    u32 flush;
    u32 flush_page;
};

struct AttnParams {
    // This layer's page pool, windows and block tables ([max_seqs][KV_SEQ_PAGES]), written only
    // where write_new is set.
    u8* pages;
    elem_t* windows;
    u32* blocks;
    const elem_t* q;
    const elem_t* k;
    const elem_t* v;
    float* part;  // partial states [item][qt][n_q_heads][n_splits][KV_HD + 2]
    elem_t* out;
    // Not null: the launch combines its splits itself (kv_decode_mma, combine_last): one counter
    // per (item, blockIdx.y), zero between launches.
    u32* counts;
    i64 q_stride, kv_stride, out_stride;  // elements between consecutive rows
    float scale, softcap;
    u32 window, causal;
    u32 n_q_heads, ratio, hc, qt;     // query heads; per kv head; per block; query rows per block
    // fp_only: see attn_block, kv_decode_mma (2: kv_prefill_fp takes split 0) and fp_write (3).
    u32 ups, n_splits, n_items, fp_only;  // units per split
    // Nonzero: the launch is n_rows query rows of one sequence (a chunk of queries), n_items
    // items of qt rows, item z items[0] moved by z * qt rows (attn_item), so that one launch
    // takes any number of rows; 0: the items are items[0 .. n_items].
    u32 n_rows;
    // Nonzero: a launch of kv_decode_mma (a decode step, or a chunk of rows that fits in the
    // ring) that also appends each item's new tokens to its window (write_new_tokens) and
    // quantizes the group they push out (AttnItem.flush), so that no kv_window_write, kv_quantize
    // or kv_set_blocks is launched for them.
    u32 write_new;
    // kv_decode_mma (fp_only 1): its splits 0 .. fp_splits - 1 take the full-precision tokens,
    // fp_ups units (32 tokens) each, or all of them in split 0 when fp_ups is 0; the splits
    // after them take the quantized groups. (Launches of one wave split them, so that split 0
    // does not outlast the others.)
    u32 fp_splits, fp_ups;
    AttnItem items[KV_MAX_ITEMS];
};

// Item z of a launch (blockIdx.z of every attention kernel).
__device__ __forceinline__ AttnItem attn_item(const AttnParams& P, u32 z) {
    AttnItem it = P.items[P.n_rows ? 0 : z];
    if (P.n_rows) {
        const u32 r = z * P.qt;
        it.q_row0 += r;
        it.q_pos0 += r;
        it.n_q = min(P.qt, P.n_rows - r);
    }
    return it;
}

struct AttnShared {
    float qf[KV_NQ][KV_HD];  // queries times the softmax scale
#if KV_KEY_PER_TOKEN
    float qsum[KV_NQ][KV_NG];  // sums of each query over each channel group
#endif
    // Per warp: the query with the group's key scales folded in (per-channel keys), reused at
    // the end to merge the warps' accumulators.
    float wq[KV_WARPS][KV_NQ][KV_HD];
    float wp[KV_WARPS][KV_NQ][32];  // softmax weights of the current 32 tokens
    float wm[KV_WARPS][KV_NQ], wl[KV_WARPS][KV_NQ];
    int lo[KV_NQ], hi[KV_NQ];
    int lo_min, hi_max;
};

// Per-warp online softmax state.
struct WarpState {
    float m[KV_NQ], l[KV_NQ];
    float acc[KV_NQ][KV_CPL];
    float zacc[KV_NQ];  // value zero terms (one channel group per lane when folding)
};

__device__ __forceinline__ float logit(const AttnParams& P, float dot) {
    return P.softcap > 0.0f ? P.softcap * tanhf(dot / P.softcap) : dot;
}

// Turns the raw scores of the warp's 32 tokens (one per lane, at `pos`) into weights in
// sh.wp[warp], rescaling the state. Invalid lanes pass valid = false.
__device__ __forceinline__ void softmax_step(const AttnParams& P, AttnShared& sh, WarpState& st, u32 warp,
                                             const float (&s)[KV_NQ], u32 pos, bool valid, u32 nvec) {
    const u32 lane = threadIdx.x & 31;
#pragma unroll
    for (int v = 0; v < KV_NQ; v++) {
        bool vis = valid && (u32)v < nvec && (int)pos >= sh.lo[v] && (int)pos < sh.hi[v];
        float x = vis ? logit(P, s[v]) : KV_NEG_INF;
        float bm = warp_max(x);
        if (bm == KV_NEG_INF) {
            sh.wp[warp][v][lane] = 0.0f;
            continue;
        }
        float mn = fmaxf(st.m[v], bm);
        float corr = exp_diff(st.m[v], mn);
        st.m[v] = mn;
        float p = exp_diff(x, mn);
        st.l[v] = st.l[v] * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < KV_CPL; i++) st.acc[v][i] *= corr;
        st.zacc[v] *= corr;
        sh.wp[warp][v][lane] = p;
    }
    __syncwarp();
}

// Loads the weights of token tt of the current 32; false when all are zero (warp-uniform).
__device__ __forceinline__ bool weights_of(const AttnShared& sh, u32 warp, u32 tt, float (&p)[KV_NQ]) {
    bool any = false;
#pragma unroll
    for (int v = 0; v < KV_NQ; v++) {
        p[v] = sh.wp[warp][v][tt];
        any |= p[v] != 0.0f;
    }
    return any;
}

// One quantized group g of the item.
__device__ __forceinline__ void quant_unit(const AttnParams& P, AttnShared& sh, WarpState& st, u32 warp,
                                           const u32* blocks, u32 kvh, u32 g, u32 nvec) {
    const u32 lane = threadIdx.x & 31;
    u32 gi;
    const u8* blk = group_block(P.pages, blocks, g, kvh, &gi);
    const u32 p0 = KV_SINKS + g * KV_G;
#if !KV_KEY_PER_TOKEN
    // The group's key scales folded into the query; the zeros make one bias per query vector.
    float bias[KV_NQ];
    {
        const u8* ks = blk + KV_K_SCALE;
        const u8* kz = blk + KV_K_ZERO;
#pragma unroll
        for (int v = 0; v < KV_NQ; v++) {
            float b = 0.0f;
            for (u32 c = lane; c < KV_HD; c += 32) {
                float q = sh.qf[v][c];
                sh.wq[warp][v][c] = q * ld_param(ks, gi * KV_HD + c);
                b += q * ld_param(kz, gi * KV_HD + c);
            }
            bias[v] = warp_sum(b);
        }
        __syncwarp();
    }
    const u8* kc = blk + KV_K_CODES + (u64)gi * KV_HD * KV_K_RUN;
#endif
    for (u32 sub = 0; sub < KV_G; sub += 32) {
        const u32 t = sub + lane;
        const bool valid = t < KV_G;
        float s[KV_NQ];
#if !KV_KEY_PER_TOKEN
#pragma unroll
        for (int v = 0; v < KV_NQ; v++) s[v] = bias[v];
        if (valid) {
#pragma unroll 4
            for (u32 c = 0; c < KV_HD; c++) {
                float cf = code_f(key_code(kc, c, t));
#pragma unroll
                for (int v = 0; v < KV_NQ; v++) s[v] += sh.wq[warp][v][c] * cf;
            }
        }
#else
#pragma unroll
        for (int v = 0; v < KV_NQ; v++) s[v] = 0.0f;
        if (valid) {
            const u32 row = gi * KV_G + t;
            const u8* r = blk + KV_K_CODES + (u64)row * KV_K_RUN;
            for (u32 cg = 0; cg < KV_NG; cg++) {
                float d[KV_NQ];
#pragma unroll
                for (int v = 0; v < KV_NQ; v++) d[v] = 0.0f;
                for (u32 c = cg * KV_VG; c < (cg + 1) * KV_VG; c++) {
                    float cf = code_f(code_at<KV_KB>(r, c));
#pragma unroll
                    for (int v = 0; v < KV_NQ; v++) d[v] += sh.qf[v][c] * cf;
                }
                float ksc = ld_param(blk + KV_K_SCALE, row * KV_NG + cg);
                float kzr = ld_param(blk + KV_K_ZERO, row * KV_NG + cg);
#pragma unroll
                for (int v = 0; v < KV_NQ; v++) s[v] += ksc * d[v] + kzr * sh.qsum[v][cg];
            }
        }
#endif
        softmax_step(P, sh, st, warp, s, p0 + t, valid, nvec);
        const u32 ntok = min(32u, (u32)KV_G - sub);
        for (u32 tt = 0; tt < ntok; tt++) {
            float p[KV_NQ];
            if (!weights_of(sh, warp, tt, p)) continue;
            const u32 row = gi * KV_G + sub + tt;
            const u8* vr = blk + KV_V_CODES + (u64)row * KV_V_ROW;
#if KV_FOLD_V
            const u32 cg = min(lane * KV_CPL, (u32)KV_HD - 1) / KV_VG;
            const float vs = ld_param(blk + KV_V_SCALE, row * KV_NG + cg);
            const float vz = ld_param(blk + KV_V_ZERO, row * KV_NG + cg);
            float cf[KV_CPL];
#pragma unroll
            for (int i = 0; i < KV_CPL; i++) {
                u32 c = lane * KV_CPL + i;
                cf[i] = c < KV_HD ? code_f(code_at<KV_VB>(vr, c)) : 0.0f;
            }
#pragma unroll
            for (int v = 0; v < KV_NQ; v++) {
                float ps = p[v] * vs;
                st.zacc[v] += p[v] * vz;
#pragma unroll
                for (int i = 0; i < KV_CPL; i++) st.acc[v][i] += ps * cf[i];
            }
#else
#pragma unroll
            for (int i = 0; i < KV_CPL; i++) {
                u32 c = lane * KV_CPL + i;
                if (c >= KV_HD) continue;
                u32 cg = c / KV_VG;
                float x = code_f(code_at<KV_VB>(vr, c)) * ld_param(blk + KV_V_SCALE, row * KV_NG + cg) +
                          ld_param(blk + KV_V_ZERO, row * KV_NG + cg);
#pragma unroll
                for (int v = 0; v < KV_NQ; v++) st.acc[v][i] += p[v] * x;
            }
#endif
        }
        __syncwarp();
    }
}

// Position of full-precision token number f of the item: sinks, then the ring, then the chunk.
__device__ __forceinline__ u32 fp_pos(const AttnItem& it, u32 n_sink, u32 ws, u32 f) {
    if (f < n_sink) return f;
    f -= n_sink;
    if (f < it.len - ws) return ws + f;
    return it.len + (f - (it.len - ws));
}

// Key (or value) row of a full-precision position: in the window, or a chunk input row.
__device__ __forceinline__ const elem_t* fp_row(const AttnParams& P, const AttnItem& it, const elem_t* hw, u32 kvh,
                                                u32 pos, bool value) {
    if (pos < it.len) return hw + window_row(pos, value);
    const elem_t* base = value ? P.v : P.k;
    return base + (i64)(it.chunk_row0 + pos - it.len) * P.kv_stride + (i64)kvh * KV_HD;
}

// Channels of a key, and tokens of values, whose loads fp_unit issues together: 32 values a
// lane; 8 at 8 query vectors, whose accumulators take twice the registers (with 16,
// kv_decode_mma spills at KIVI-4 on sm_80). The loops over them are kept, so that the compiler
// hoists no more loads than that.
#define FPU_LOADS (KV_NQ <= 4 ? 32 : 8)
#define FPU_KC FPU_LOADS
#define FPU_VT (FPU_LOADS / KV_CPL > 0 ? FPU_LOADS / KV_CPL : 1)

// 32 full-precision tokens starting at fp token f0.
__device__ __forceinline__ void fp_unit(const AttnParams& P, AttnShared& sh, WarpState& st, u32 warp,
                                        const AttnItem& it, const elem_t* hw, u32 kvh, u32 n_sink, u32 ws, u32 n_fp,
                                        u32 f0, u32 nvec) {
    const u32 lane = threadIdx.x & 31;
    const u32 f = f0 + lane;
    const bool valid = f < n_fp;
    const u32 pos = valid ? fp_pos(it, n_sink, ws, f) : 0;
    float s[KV_NQ];
#pragma unroll
    for (int v = 0; v < KV_NQ; v++) s[v] = 0.0f;
    // The loads of FPU_KC channels of the key (FPU_VT tokens of the values) are issued before any
    // of them is used, so that the warp waits for memory once per batch rather than once per
    // few loads (the rows, one per lane for the keys, are rarely in L1).
    if (valid) {
        const elem_t* kr = fp_row(P, it, hw, kvh, pos, false);
#pragma unroll 1
        for (u32 c0 = 0; c0 < KV_HD; c0 += FPU_KC) {
            float x[FPU_KC];
#pragma unroll
            for (u32 j = 0; j < FPU_KC; j++) x[j] = c0 + j < KV_HD ? ld_elem(kr + c0 + j) : 0.0f;
#pragma unroll
            for (u32 j = 0; j < FPU_KC; j++) {
                if (c0 + j >= KV_HD) continue;
#pragma unroll
                for (int v = 0; v < KV_NQ; v++) s[v] += sh.qf[v][c0 + j] * x[j];
            }
        }
    }
    softmax_step(P, sh, st, warp, s, pos, valid, nvec);
    const u32 ntok = min(32u, n_fp - f0);
#pragma unroll 1
    for (u32 t0 = 0; t0 < ntok; t0 += FPU_VT) {
        float x[FPU_VT][KV_CPL];
#pragma unroll
        for (u32 j = 0; j < FPU_VT; j++) {
            const elem_t* vr =
                t0 + j < ntok ? fp_row(P, it, hw, kvh, fp_pos(it, n_sink, ws, f0 + t0 + j), true) : nullptr;
#pragma unroll
            for (int i = 0; i < KV_CPL; i++) {
                const u32 c = lane * KV_CPL + i;
                x[j][i] = vr != nullptr && c < KV_HD ? ld_elem(vr + c) : 0.0f;
            }
        }
#pragma unroll
        for (u32 j = 0; j < FPU_VT; j++) {
            float p[KV_NQ];
            if (t0 + j >= ntok || !weights_of(sh, warp, t0 + j, p)) continue;
#pragma unroll
            for (int i = 0; i < KV_CPL; i++) {
#pragma unroll
                for (int v = 0; v < KV_NQ; v++) st.acc[v][i] += p[v] * x[j][i];
            }
        }
    }
    __syncwarp();
}

// The body of one attention block: grid (split, kv head * head chunks, item).
__device__ __forceinline__ void attn_block_in(const AttnParams& P, AttnShared& sh) {
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 split = blockIdx.x;
    const u32 hchunks = (P.ratio + P.hc - 1) / P.hc;
    const u32 kvh = blockIdx.y / hchunks, hci = blockIdx.y % hchunks;
    const AttnItem it = attn_item(P, blockIdx.z);
    const u32 h0 = kvh * P.ratio + hci * P.hc;
    const u32 nh = min(P.hc, P.ratio - hci * P.hc);
    const u32 nvec = nh * it.n_q;  // query vector v: row v / nh, head h0 + v % nh
    const u32 total = it.len + it.n_chunk;

    for (u32 i = tid; i < KV_NQ * KV_HD; i += KV_THREADS) {
        u32 v = i / KV_HD, c = i % KV_HD;
        float x = 0.0f;
        if (v < nvec) {
            u32 row = it.q_row0 + v / nh, head = h0 + v % nh;
            x = ld_elem(P.q + (i64)row * P.q_stride + (i64)head * KV_HD + c) * P.scale;
        }
        sh.qf[v][c] = x;
    }
    if (tid < KV_NQ) {
        int lo = 0, hi = 0;
        if (tid < nvec) {
            int qpos = (int)(it.q_pos0 + tid / nh);
            lo = P.window > 0 ? max(0, qpos + 1 - (int)P.window) : 0;
            hi = P.causal ? min(qpos + 1, (int)total) : (int)total;
            hi = max(hi, lo);
        }
        sh.lo[tid] = lo;
        sh.hi[tid] = hi;
    }
    __syncthreads();
    if (tid == 0) {
        int lo_min = 0x7fffffff, hi_max = 0;
        for (u32 v = 0; v < nvec; v++) {
            if (sh.hi[v] > sh.lo[v]) {
                lo_min = min(lo_min, sh.lo[v]);
                hi_max = max(hi_max, sh.hi[v]);
            }
        }
        sh.lo_min = lo_min;
        sh.hi_max = hi_max;
    }
#if KV_KEY_PER_TOKEN
    for (u32 i = tid; i < KV_NQ * KV_NG; i += KV_THREADS) {
        u32 v = i / KV_NG, cg = i % KV_NG;
        float sum = 0.0f;
        for (u32 c = cg * KV_VG; c < (cg + 1) * KV_VG; c++) sum += sh.qf[v][c];
        sh.qsum[v][cg] = sum;
    }
#endif
    __syncthreads();

    WarpState st;
#pragma unroll
    for (int v = 0; v < KV_NQ; v++) {
        st.m[v] = KV_NEG_INF;
        st.l[v] = 0.0f;
        st.zacc[v] = 0.0f;
#pragma unroll
        for (int i = 0; i < KV_CPL; i++) st.acc[v][i] = 0.0f;
    }

    const u32 n_groups = it.quantized / KV_G;
    const u32 n_sink = min(it.len, (u32)KV_SINKS);
    const u32 ws = min((u32)KV_SINKS + it.quantized, it.len);
    const u32 n_fp = n_sink + (it.len - ws) + it.n_chunk;
    const u32 n_units = n_groups + (n_fp + 31) / 32;
    // fp_only: the quantized groups are the tensor-core blocks' (decode_mma.cuh); this block
    // (split 0 of kv_decode_mma, or one of its first fp_splits) does full-precision tokens.
    const u32 u_begin = P.fp_only ? n_groups + split * P.fp_ups : split * P.ups;
    const u32 u_end = !P.fp_only ? min(n_units, u_begin + P.ups)
                      : P.fp_ups ? min(n_units, u_begin + P.fp_ups)
                                 : n_units;
    const u32* blocks = P.blocks + (u64)it.slot * KV_SEQ_PAGES;
    const elem_t* hw = head_window(P.windows, it.slot, kvh);
    const int lo_min = sh.lo_min, hi_max = sh.hi_max;

    for (u32 u = u_begin + warp; u < u_end; u += KV_WARPS) {
        if (u < n_groups) {
            int first = KV_SINKS + u * KV_G, last = first + KV_G - 1;
            if (last < lo_min || first >= hi_max) continue;
            quant_unit(P, sh, st, warp, blocks, kvh, u, nvec);
        } else {
            u32 f0 = (u - n_groups) * 32;
            int first = fp_pos(it, n_sink, ws, f0);
            int last = fp_pos(it, n_sink, ws, min(f0 + 31, n_fp - 1));
            if (last < lo_min || first >= hi_max) continue;
            fp_unit(P, sh, st, warp, it, hw, kvh, n_sink, ws, n_fp, f0, nvec);
        }
    }

    // Merge the warps: each warp leaves its state in shared memory (wq is free now).
    __syncthreads();
#pragma unroll
    for (int v = 0; v < KV_NQ; v++) {
#pragma unroll
        for (int i = 0; i < KV_CPL; i++) {
            u32 c = lane * KV_CPL + i;
            if (c < KV_HD) sh.wq[warp][v][c] = st.acc[v][i] + (KV_FOLD_V ? st.zacc[v] : 0.0f);
        }
        if (lane == 0) {
            sh.wm[warp][v] = st.m[v];
            sh.wl[warp][v] = st.l[v];
        }
    }
    __syncthreads();
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
            a += sh.wq[w][v][c] * f;
        }
        u32 r = v / nh, head = h0 + v % nh;
        float* dst = P.part +
                     ((((u64)blockIdx.z * P.qt + r) * P.n_q_heads + head) * P.n_splits + split) * (KV_HD + 2);
        if (c == 0) {
            dst[0] = m;
            dst[1] = l;
        }
        dst[2 + c] = a;
    }
}

__device__ __forceinline__ void attn_block(const AttnParams& P) {
    __shared__ AttnShared sh;
    attn_block_in(P, sh);
}

// Merges the n_splits partial states of nvec vectors of item z (vector v: query row r0 + v / nh,
// head h0 + v % nh) into their output rows. CG: the states were written by other blocks of the
// running kernel (read through L2). ws: `floats` floats of shared memory, at least 2 * KV_NQ + nvec.
// Every load of a pass is independent of the others, so that a block waits for about three
// round trips to L2 whatever the splits and vectors: one warp per vector finds its maximum and
// sum in one pass (pairs merged online, then across the warp); the vectors' weights of a tile
// of splits go to shared memory; the threads, over (vector, channel), then sum the tile's
// states, all vectors' loads of a split issued together.
// (KV_COMBINE_TILE: at most that many splits a tile, for tests of the tiles.)
#ifndef KV_COMBINE_TILE
#define KV_COMBINE_TILE 0
#endif
template <bool CG>
__device__ __forceinline__ void combine_vectors(const AttnParams& P, const AttnItem& it, u32 z, u32 r0, u32 h0, u32 nh,
                                                u32 nvec, float* ws, u32 floats) {
    auto ld = [](const float* p) { return CG ? ld_cg(p) : *p; };
    constexpr u32 ROW = KV_HD + 2, PER = (KV_NQ * KV_HD + KV_THREADS - 1) / KV_THREADS;
    constexpr u32 UNR = PER >= 32 ? 1 : 32 / PER;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n = P.n_splits;
    float* wm = ws;            // [KV_NQ] each vector's maximum
    float* wl = ws + KV_NQ;    // [KV_NQ] and the inverse of its sum
    float* w = ws + 2 * KV_NQ;  // [nvec][tile] the weights of a tile's splits
    const u32 room = (floats - 2 * KV_NQ) / nvec, tile = KV_COMBINE_TILE ? min((u32)KV_COMBINE_TILE, room) : room;
    auto states = [&](u32 v) {
        return P.part + (((u64)z * P.qt + r0 + v / nh) * P.n_q_heads + h0 + v % nh) * n * ROW;
    };
    for (u32 v = warp; v < nvec; v += KV_WARPS) {
        const float* src = states(v);
        float m = KV_NEG_INF, l = 0.0f;
        for (u32 s = lane; s < n; s += 32) {
            const float ms = ld(src + s * ROW), ls = ld(src + s * ROW + 1), mm = fmaxf(m, ms);
            l = l * exp_diff(m, mm) + ls * exp_diff(ms, mm);
            m = mm;
        }
#pragma unroll
        for (u32 o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
            const float mm = fmaxf(m, m2);
            l = l * exp_diff(m, mm) + l2 * exp_diff(m2, mm);
            m = mm;
        }
        if (lane == 0) {
            wm[v] = m;
            wl[v] = l > 0.0f ? 1.0f / l : 0.0f;
        }
    }
    // This thread's outputs: (vector, channel) pairs tid + k * KV_THREADS for k < kn (the same
    // kn for every thread when KV_THREADS divides nvec * KV_HD, as it does at head_dim 128);
    // any others point at vector 0's states and are not stored.
    const u32 kn = (nvec * KV_HD + KV_THREADS - 1) / KV_THREADS;
    const float* base[PER];
    u32 wrow[PER];
    float acc[PER];
#pragma unroll
    for (u32 k = 0; k < PER; k++) {
        const u32 i = tid + k * KV_THREADS, v = i < nvec * KV_HD ? i / KV_HD : 0;
        base[k] = states(v) + 2 + i % KV_HD;
        wrow[k] = v * tile;
        acc[k] = 0.0f;
    }
    for (u32 s0 = 0; s0 < n; s0 += tile) {
        const u32 ns = min(tile, n - s0);
        __syncthreads();  // the maxima and sums written; the last tile's weights read
        // The weights, four loads in flight per thread before any store.
        for (u32 i0 = tid; i0 < nvec * ns; i0 += 4 * KV_THREADS) {
            float m[4];
#pragma unroll
            for (u32 j = 0; j < 4; j++) {
                const u32 i = min(i0 + j * KV_THREADS, nvec * ns - 1);
                m[j] = ld(states(i / ns) + (s0 + i % ns) * ROW);
            }
#pragma unroll
            for (u32 j = 0; j < 4; j++) {
                const u32 i = i0 + j * KV_THREADS, v = i / ns;
                if (i < nvec * ns) w[v * tile + i % ns] = exp_diff(m[j], wm[v]) * wl[v];
            }
        }
        __syncthreads();
        // The states, UNR splits of every output at a time (about 32 loads in flight; past the
        // tile's end nothing is loaded and the last weight is read in vain).
        for (u32 s = 0; s < ns; s += UNR) {
            float x[UNR][PER];
#pragma unroll
            for (u32 j = 0; j < UNR; j++) {
#pragma unroll
                for (u32 k = 0; k < PER; k++) {
                    x[j][k] = k < kn && s + j < ns ? ld(base[k] + (u64)(s0 + s + j) * ROW) : 0.0f;
                }
            }
#pragma unroll
            for (u32 j = 0; j < UNR; j++) {
#pragma unroll
                for (u32 k = 0; k < PER; k++) acc[k] += x[j][k] * w[wrow[k] + min(s + j, ns - 1)];
            }
        }
    }
#pragma unroll
    for (u32 k = 0; k < PER; k++) {
        const u32 i = tid + k * KV_THREADS, v = i / KV_HD, c = i % KV_HD;
        if (i < nvec * KV_HD) {
            P.out[(i64)(it.q_row0 + r0 + v / nh) * P.out_stride + (i64)(h0 + v % nh) * KV_HD + c] = to_elem(acc[k]);
        }
    }
}

// Combines the splits of one (item, query row, query head): grid (n_q_heads, qt, items).
__device__ __forceinline__ void combine_block(const AttnParams& P) {
    __shared__ float ws[2 * KV_NQ + 256];
    const AttnItem it = attn_item(P, blockIdx.z);
    const u32 r = blockIdx.y, head = blockIdx.x;
    if (r >= it.n_q) return;
    combine_vectors<false>(P, it, blockIdx.z, r, head, 1, 1, ws, 2 * KV_NQ + 256);
}

// A decode step's append, or a short chunk's, done by the attention launch (P.write_new;
// kv_decode_mma's split 0, the first block of kv head kvh, of the chunk's first rows): item z's
// n_chunk new tokens, rows chunk_row0.. of k and v, go into its window at positions len.., sinks
// or the ring slots of the tokens a ring's length before them. Those tokens are quantized (the
// host sets write_new only then: one token always fits, as a window holds at most a ring's
// length less one before an append), so nothing in the launch reads the slots, and the
// quantization of the group that leaves the window (flush_group, in the same block, or
// kv_quantize, queued after the launch) reads other slots.
__device__ __forceinline__ void write_new_tokens(const AttnParams& P, u32 kvh) {
    const AttnItem it = attn_item(P, blockIdx.z);
    elem_t* hw = head_window(P.windows, it.slot, kvh);
    for (u32 i = threadIdx.x; i < it.n_chunk * KV_HD; i += blockDim.x) {
        const u32 r = i / KV_HD, c = i % KV_HD;
        const i64 src = (i64)(it.chunk_row0 + r) * P.kv_stride + (i64)kvh * KV_HD + c;
        hw[window_row(it.len + r, false) + c] = P.k[src];
        hw[window_row(it.len + r, true) + c] = P.v[src];
    }
}

// The end of every block of a launch that combines its own splits (P.counts set; grid (splits,
// kv heads * head chunks, items), query heads h0 .. h0 + nh - 1 of item z): once the block's
// partial state is written, it counts itself in for its (item, blockIdx.y); the last of the
// n_splits blocks to do so merges them into the output rows, and sets the counter back to zero
// for the next launch (which the stream orders after this one). Saves the combine's launch.
__device__ __forceinline__ void combine_last(const AttnParams& P, u32 h0, u32 nh, float* ws, u32 floats) {
    __shared__ u32 last;
    fence_gpu();  // every thread's partial state before the count
    __syncthreads();
    if (threadIdx.x == 0) {
        fence_gpu();  // (and, cumulatively, what the barrier showed this thread)
        u32* count = P.counts + (u64)blockIdx.z * gridDim.y + blockIdx.y;
        last = atom_add_u32(count, 1u) == P.n_splits - 1;
        if (last) *count = 0u;
    }
    __syncthreads();
    if (!last) return;
    fence_gpu();  // the other blocks' states after their counts
    const AttnItem it = attn_item(P, blockIdx.z);
    combine_vectors<true>(P, it, blockIdx.z, 0, h0, nh, nh * it.n_q, ws, floats);
}
