// Attention over quantized groups on tensor cores (sm_80+): mma.sync m16n8k16, f16 operands, f32
// accumulation. For the common KIVI layouts (per-channel keys of 2 or 4 bits, values of 2 or 4
// bits, head_dim <= 128, G of 16, 32 or 64). A block takes at most 8 query vectors: decode
// steps launch it with one query row per item, chunks of queries (prefill, attend) with 8 / hc
// rows per item, and GQA groups of more than 8 query heads take several blocks per kv head
// (hc = 8 heads each).
//
// One block per (split, kv head, item); each warp takes whole groups, staged into shared
// memory with 16-byte cp.async copies (double-buffered: the next group loads while this one is
// computed; with the transposed products the loop runs in two stages, the scores of one group
// beside the values of the one before: MMA_PIPE). The query heads of the GQA group are the rows
// of the A operands:
//   scores  S[h][t] = sum_c (q[h][c] * ks[c]) * code[c][t] + sum_c q[h][c] * kz[c]
//   output  O[h][c] = sum_t p[h][t] * f16(code[t][c] * vs[t][cg]) + sum_t p[h][t] * vz[t][cg]
// (the common layouts, MMA_VLANE: the zero points' sum is one more mma per k-step; other head
// sizes dequantize f16(code * vs + vz)). A operands that are not exact in f16 (the scaled query,
// the weights) are split into two f16 parts, hi in rows 0..7 and lo in rows 8..15, so the
// products keep about 22 bits; rows h and h + 8 of every result are added. Key codes are B
// operands as they are (small integers, exact); values are B operands scaled in f16 (rounded
// once, about 2^-12 relative: keys are kept exact because their outlier channels would make that
// rounding cost about 1e-3 of the output, values cost up to about 7e-4). The loop is bound by
// instructions, not bytes, on H100/H200-class GPUs, so each step is chosen for its instruction
// count (scripts/sass_mix.py measures it): codes become f16 with one LOP3 (mask and exponent)
// and no shifts, bytes are picked with prmt, the query's hi/lo products and the key zero points'
// bias come from f16x2 arithmetic and one more mma, value codes take their scale in one fma and
// their zero points one more mma, scores are in log2 units so that a weight is one ex2,
// positions are masked only in groups at the edge of some row's range, and the accumulators are
// rescaled only when a row's maximum grows by more than 2^11.
// Each group's key codes are interleaved on the device (KV_K_ILV, common.cuh), so that a lane's
// codes of four channels in one k-step are one load (key_bits). Token and channel orders inside
// the mma tiles are permuted so that each lane reads few, contiguous bits:
//   QK: n-tile j, column n  <-> token NT * n + j          (NT = G / 8)
//   PV: k-step kk, k = 2t+i <-> token NT * (2t + i) + 2kk, k = 2t+8+i <-> the next token,
//       which is where the QK accumulators of n-tiles 2kk and 2kk+1 left the weights;
//       n-tile jj, column n <-> channel NJ * n + jj (MMA_VLANE: each lane's channels are
//       adjacent) or 8 * jj + n (other head sizes).
// Blocks of at most 4 query vectors (decode at GQA ratios up to 4) compute both products
// transposed instead, codes as A and the queries' parts as the 8 columns of B, with the same
// tokens and channels in each lane (MMA_T, mma_group_t).
// The full-precision tokens (sinks, window, the new token) are read from their own storage by
// split 0 of the same kernel, with the CUDA-core body of attn.cuh; kv_decode_combine merges.
#pragma once
#include "attn.cuh"
#include "quant.cuh"

#define MMA_NT (KV_G / 8)
#define MMA_KS (KV_HD / 16)
#define MMA_KK (KV_G / 16)
#define MMA_NJ (KV_HD / 8)
#define MMA_KC (KV_HD * KV_G * KV_KB / 8)
#define MMA_VC (KV_G * KV_HD * KV_VB / 8)
// Value columns per lane (the common layouts): lane g's B operands are channels NJ*g .. NJ*g +
// NJ - 1 of a token, MMA_VLB contiguous bits read with one 16-, 32-, 64- or 128-bit load, all in
// one value group. The lanes of one t read tokens 2NT*t .. 2NT*t + 2NT - 1 (MMA_VBLK bytes of
// codes), staged MMA_VPAD bytes apart so that the four t fall on different banks.
#define MMA_VLB (MMA_NJ * KV_VB)
#define MMA_VLANE ((MMA_VLB == 16 || MMA_VLB == 32 || MMA_VLB == 64 || MMA_VLB == 128) && KV_VG % MMA_NJ == 0)
// Lanes t >= 2 load each pair of value scales and zeros second token first (value_lane), taking
// bank conflicts away: not where the pair's tokens (NT rows of KV_NG halves) are a multiple of 32
// words apart, which puts them on the same bank (head_dim 256, G = 64 and value groups of 32:
// there the second pointer would only spill registers). -DKV_MMA_VSWAP=0 turns it off (for
// comparison).
#ifndef KV_MMA_VSWAP
#define KV_MMA_VSWAP (MMA_NT * KV_NG / 2 % 32 != 0)
#endif
#define MMA_VBLK (KV_G / 4 * KV_V_ROW)
#define MMA_VPAD (MMA_VLANE ? 32 : 0)
// Interleaved key codes (KV_K_ILV, common.cuh) are staged as MMA_KROWS rows of units (MMA_KROW
// bytes: one unit of every channel), each followed by KV_MMA_KPAD bytes of padding, a multiple of
// 16 that mma_key_pad() in src/cuda/kernels.rs chooses: one that puts the rows 16 bytes per unit
// byte apart modulo 128, so that the lanes of one shared-memory wavefront (each reading its own
// row) fall on different banks, unless the shared memory would then not fit.
#if KV_K_ILV
#ifndef KV_MMA_KPAD
#error "KV_MMA_KPAD must be defined (src/cuda/kernels.rs)"
#endif
#define MMA_KROW (KV_HD * KV_K_UNIT)
#define MMA_KROWS (KV_K_RUN / KV_K_UNIT)
#define MMA_KPAD KV_MMA_KPAD
#else
#define MMA_KROW MMA_KC
#define MMA_KROWS 1
#define MMA_KPAD 0
#endif
#define MMA_KPADS (MMA_KROWS * MMA_KPAD)
#define MMA_KS_OFF (MMA_KC + MMA_KPADS)
#define MMA_KZ_OFF (MMA_KS_OFF + 2 * KV_HD)
#define MMA_VC_OFF (MMA_KS_OFF + 4 * KV_HD)
#define MMA_VS_OFF (MMA_VC_OFF + MMA_VC + 4 * MMA_VPAD)
#define MMA_VZ_OFF (MMA_VS_OFF + 2 * KV_G * KV_NG)
#define MMA_STAGE (MMA_VZ_OFF + 2 * KV_G * KV_NG)
// The merge area: a row of floats per warp and query vector, 4 floats longer than head_dim so
// that the rows' stores fall on different banks.
#define MMA_MROW (KV_HD + 4)
#define MMA_MERGE (KV_WARPS * 8 * MMA_MROW * 4)
// Query rows padded by 16 words: the rows read at once by a quarter warp fall on different banks.
#define MMA_QROW (KV_HD + 16)
// Staging buffers per warp: two (one group in flight while one is computed), unless
// KV_MMA_STAGES asks for more and they fit in the 48 KB of static shared memory (with dynamic
// shared memory, KV_MMA_DYN, always two: the host sized it so). Three took the same time on an
// H200: the loop is bound by issuing its instructions, not by waiting for its groups
// (BENCHMARKS.md).
#ifndef KV_MMA_STAGES
#define KV_MMA_STAGES 2
#endif
#define MMA_STAGES (!KV_MMA_DYN && 8 * MMA_QROW * 4 + KV_MMA_STAGES * KV_WARPS * MMA_STAGE + 256 <= 48000 ? KV_MMA_STAGES : 2)
#define MMA_BUF_FOR(s) ((s) * KV_WARPS * MMA_STAGE > MMA_MERGE ? (s) * KV_WARPS * MMA_STAGE : MMA_MERGE)
#define MMA_BUF MMA_BUF_FOR(MMA_STAGES)
// Transposed products (MMA_T) for blocks of at most 4 query vectors (decode at GQA ratios up to
// 4) in the common layouts: the key and value codes are the A operands, 16 tokens or channels a
// tile, and the 8 columns of B are the hi and lo parts of 4 query vectors, so that no mma row is
// left empty (untransposed, 4 vectors fill 8 of the 16 rows): per group at G = 32, head_dim
// 128, 42 mmas instead of 82, half the accumulators, and 4 scores a lane instead of 8.
// KV_MMA_T=0 keeps the untransposed products (scripts/gpu-sweep.sh times both) up to head_dim
// 128; larger heads have only the transposed ones (the untransposed accumulators would not fit
// in registers).
#ifndef KV_MMA_T
#define KV_MMA_T 1
#endif
#define MMA_T ((KV_MMA_T || KV_HD > 128) && KV_NQ <= 4 && MMA_VLANE)
// Must match mma_layout() in src/cuda/kernels.rs. G is 16, 32 or 64: a lane's NT key codes of a
// channel then never straddle two 32-bit words of its run (with G = 48 they would). Up to head_dim
// 128 (any products) or 256 (the transposed products only); the shared memory is static where it
// fits in 48 KB, else dynamic (head_dim 256; 4-bit keys at 128, whose staged codes are padded):
// KV_MMA_DYN, the bytes the host launches with.
#ifndef KV_MMA_DYN
#define KV_MMA_DYN 0
#endif
#define KV_MMA_OK                                                                                        \
    (!KV_KEY_PER_TOKEN && (KV_KB == 2 || KV_KB == 4) && (KV_VB == 2 || KV_VB == 4) && KV_HD % 16 == 0 && \
     (KV_HD <= 128 || (KV_HD <= 256 && KV_NQ <= 4 && MMA_VLANE)) &&                                     \
     (KV_G == 16 || KV_G == 32 || KV_G == 64) && KV_VG % 8 == 0 && KV_NQ <= 8 &&                         \
     (8 * MMA_QROW * 4 + MMA_BUF_FOR(2) <= 48000 || KV_MMA_DYN))

// Scores are kept in log2 units (the query is scaled by log2(e) once), so every weight is one
// ex2 of a difference. A row's running maximum moves only when a score passes it by more than
// MMA_RESCALE: weights then stay below 2^11 (exact in the f16 hi/lo split, far from f32
// overflow), and the accumulators are rescaled only when some row of the warp moves, not after
// every group.
#define MMA_LOG2E 1.4426950408889634f
#define MMA_LN2 0.6931471805599453f
#define MMA_RESCALE 11.0f

// x0, x1 as f16 pairs: hi = f16(x), lo = f16(x - hi); the first value in the low half.
__device__ __forceinline__ void split_pair(float x0, float x1, u32& hi, u32& lo) {
    hi = f2h2(x0, x1);
    float h0 = h2f((u16)(hi & 0xffffu)), h1 = h2f((u16)(hi >> 16));
    lo = f2h2(x0 - h0, x1 - h1);
}

#if KV_MMA_OK
struct MmaShared {
    // The scaled queries as f16 pairs: qhl[v][c] = hi of channels (c, c+1), qhl[v][c + 1] = lo,
    // for even c (hi = f16(x), lo = f16(x - hi)). MMA_T: the columns of mma_group_t's B, in
    // words c .. c + 3 for c a multiple of 4 (see the kernel).
    u32 qhl[8][MMA_QROW];
    float wm[KV_WARPS][8], wl[KV_WARPS][8];
    int lo[8], hi[8];
    u32 magic;  // 0x64006400
    __align__(16) u8 buf[MMA_BUF];
};

struct __align__(8) Pairu {
    u32 hi, lo;
};
struct __align__(8) Wordu2 {
    u32 x, y;
};
struct __align__(16) Quadu {
    u32 x, y, z, w;
};
struct __align__(16) Floats4 {
    float x, y, z, w;
};

// Queues the copy of N bytes (a multiple of 16) from src to dst, 16 per lane at a time; dst and
// src already point at this lane's first 16 bytes. N is known at compile time, so the copies
// need no loop and their addresses are the same two base registers plus constant offsets.
template <u32 N>
__device__ __forceinline__ void stage_part(u8* dst, const u8* src, u32 lane) {
#pragma unroll
    for (u32 off = 0; off < N; off += 512) {
        if (off + 512 <= N || lane * 16 < N - off) cp_async16(dst + off, src + off);
    }
}

// The same with padding: each block of ROW bytes followed by PAD bytes (key codes: rows of
// MMA_KROW bytes and MMA_KPAD of padding; value codes: blocks of MMA_VBLK and MMA_VPAD).
template <u32 N, u32 ROW, u32 PAD>
__device__ __forceinline__ void stage_padded(u8* dst, const u8* src, u32 lane) {
#pragma unroll
    for (u32 off = 0; off < N; off += 512) {
        const u32 b = off + lane * 16;
        if (off + 512 <= N || b < N) cp_async16(dst + off + b / ROW * PAD, src + off);
    }
}

// Whether a group's parts lie in the page in the staging buffer's order with no gaps (one group
// per page, the default) and the value codes start and end on a 512-byte boundary of it (and
// interleaved key codes end on one, in rows that a 512-byte step holds whole or lies inside): the
// group is then staged as one run of 512-byte steps, each inside one part.
#define MMA_FLAT                                                                                       \
    (KV_GPP == 1 && KV_K_CODES == 0 && KV_K_SCALE == MMA_KC && KV_K_ZERO == MMA_KC + 2 * KV_HD &&     \
     KV_V_CODES == MMA_KC + 4 * KV_HD && KV_V_SCALE == KV_V_CODES + MMA_VC &&                         \
     KV_V_ZERO == KV_V_SCALE + 2 * KV_G * KV_NG && KV_V_CODES % 512 == 0 && MMA_VC % 512 == 0 &&        \
     512 % MMA_VBLK == 0 && (!KV_K_ILV || (MMA_KC % 512 == 0 && (512 % MMA_KROW == 0 || MMA_KROW % 512 == 0))))
#define MMA_FLAT_BYTES (KV_V_ZERO + 2 * KV_G * KV_NG)

// Parts of a group to stage: its keys (codes, scales, zeros: the bytes before MMA_VC_OFF of a
// staging buffer), its values (the bytes from MMA_VC_OFF on), or both.
#define MMA_KEYS 1u
#define MMA_VALUES 2u

// This lane's padding inside a 512-byte step of key codes (kpad) and of value codes (vpad): the
// rows or blocks before its 16 bytes in the step, times their padding.
struct StagePad {
    u32 kpad, vpad;
};
__device__ __forceinline__ StagePad stage_pad(u32 lane) {
    return {MMA_KROW < 512 ? lane * 16 / MMA_KROW * MMA_KPAD : 0u, lane * 16 / MMA_VBLK * MMA_VPAD};
}

// Queues the copies of group u's codes, scales and zeros (PARTS of them), in page `page`, into a
// warp's staging buffer, padded as the buffer's layout says (sp: stage_pad(lane)).
template <u32 PARTS = MMA_KEYS | MMA_VALUES>
__device__ __forceinline__ void stage_group(const AttnParams& P, u32 page, u32 kvh, u32 u, u8* buf, u32 lane,
                                            const StagePad& sp) {
    const u32 gi = u % KV_GPP;
    const u8* blk = P.pages + (u64)page * KV_PAGE_BYTES + (u64)kvh * KV_HEAD_BYTES + lane * 16;
    u8* d = buf + lane * 16;
#if MMA_FLAT
#pragma unroll
    for (u32 off = 0; off < MMA_FLAT_BYTES; off += 512) {
        // (Offsets in the page. KV_V_CODES is a multiple of 512: no step holds both keys and
        // values; nor, when they are padded, key codes and key scales.)
        if (!(PARTS & (off < KV_V_CODES ? MMA_KEYS : MMA_VALUES))) continue;
        // Padding before this step: whole rows or value blocks before it, then this lane's share.
        const bool vc = off >= KV_V_CODES && off < KV_V_CODES + MMA_VC;
        const u32 pad = off < MMA_KC       ? off / MMA_KROW * MMA_KPAD + sp.kpad
                        : off < KV_V_CODES ? MMA_KPADS
                        : vc               ? MMA_KPADS + (off - KV_V_CODES) / MMA_VBLK * MMA_VPAD + sp.vpad
                                           : MMA_KPADS + 4 * MMA_VPAD;
        if (off + 512 <= MMA_FLAT_BYTES || lane * 16 < MMA_FLAT_BYTES - off) cp_async16(d + off + pad, blk + off);
    }
    (void)gi;
#else
    if (PARTS & MMA_KEYS) {
        stage_padded<MMA_KC, MMA_KROW, MMA_KPAD>(d, blk + KV_K_CODES + gi * MMA_KC, lane);
        stage_part<2 * KV_HD>(d + MMA_KS_OFF, blk + KV_K_SCALE + gi * KV_HD * 2, lane);
        stage_part<2 * KV_HD>(d + MMA_KZ_OFF, blk + KV_K_ZERO + gi * KV_HD * 2, lane);
    }
    if (PARTS & MMA_VALUES) {
        stage_padded<MMA_VC, MMA_VBLK, MMA_VPAD>(d + MMA_VC_OFF, blk + KV_V_CODES + gi * MMA_VC, lane);
        stage_part<2 * KV_G * KV_NG>(d + MMA_VS_OFF, blk + KV_V_SCALE + gi * KV_G * KV_NG * 2, lane);
        stage_part<2 * KV_G * KV_NG>(d + MMA_VZ_OFF, blk + KV_V_ZERO + gi * KV_G * KV_NG * 2, lane);
    }
    (void)sp;
#endif
}

struct MmaState {
    // Row g's (MMA_T: query vector t's) running maximum (log2 units); this lane's part of its sum.
    float m, l;
    // MMA_T: m-tile mj of the transposed output, rows g and g + 8 = channels NJ * g + 2mj and
    // the next, columns 2t, 2t + 1 = the hi and lo parts of vector t.
    float acc[MMA_T ? MMA_NJ / 2 : MMA_NJ][4];
#if MMA_VLANE
    // The value zero points' part of the output, sum_t p[h][t] * vz[t][n] for value group n
    // (columns n >= KV_NG unused; MMA_T: rows g < KV_NG, columns of the vectors): one more mma
    // per k-step (see the values).
    float zacc[4];
#endif
};

// Bit offset o of a code inside a 16-bit half: read as 1024 + code * 2^KP(o) (exact in f16: the
// code lies in the mantissa) after a right shift by KSH(o), a shift of 8 when the code would
// otherwise reach past the mantissa's 10 bits.
#define MMA_KSH(o) (((o) & 15) + KV_KB > 10 ? 8 : 0)
#define MMA_KP(o) (((o) & 15) - MMA_KSH(o))
// Whether some n-tile's codes are read scaled (KP > 0): those tiles need the bias correction.
#define MMA_SCALED_TILES (MMA_NT > 1)

// Where this lane's key bits lie in every channel's run: tokens NT * g .. NT * g + NT - 1 from bit
// NT * g * KB. Runs one after another: in word kwi at bit ksh; ksel picks them with one prmt when
// they are one or two whole bytes (bytes kb and kb + 1 of the first word to bytes 0 and 1, of the
// second to 2 and 3). Interleaved (KV_K_ILV): in the unit row kwi bytes into the staged codes, at
// bit ksh of the unit.
struct KeyLane {
    u32 kwi, ksh, ksel;
};
__device__ __forceinline__ KeyLane key_lane(u32 g) {
    const u32 bit0 = MMA_NT * g * KV_KB;
#if KV_K_ILV
    return {(bit0 >> 3) / KV_K_UNIT * (MMA_KROW + MMA_KPAD), bit0 & 7, 0u};
#else
    const u32 ksh = bit0 & 31, kb = ksh >> 3;
    return {bit0 >> 5, ksh,
            MMA_NT * KV_KB == 8 ? kb | ((kb + 4) << 8) : kb | ((kb + 1) << 4) | ((kb + 4) << 8) | ((kb + 5) << 12)};
#endif
}

// This lane's bits of channels c0 .. c0 + 3, channel pairs side by side: c0's in the low half of
// lo01, c0 + 1's in its high half (the low 16 bits, then the high 16 in hi01, when they take a
// whole word), c0 + 2 and c0 + 3 in lo89 (hi89).
struct KeyBits {
    u32 lo01, lo89, hi01, hi89;
};
__device__ __forceinline__ KeyBits key_bits(const u8* buf, u32 c0, const KeyLane& kl) {
#if KV_K_ILV
    // One load: unit kl of channels c0 .. c0 + 3 (c0 a multiple of 4). One-byte units lie in the
    // order c0, c0 + 2, c0 + 1, c0 + 3: the pairs' bits are then at bits 0 and 16, or 8 and 24.
    const u8* p = buf + kl.kwi + c0 * KV_K_UNIT;
    KeyBits b = {0u, 0u, 0u, 0u};
    if (KV_K_UNIT == 1) {
        const u32 w = MMA_NT * KV_KB >= 8 ? *(const u32*)p : *(const u32*)p >> kl.ksh;
        b.lo01 = w;
        b.lo89 = w >> 8;
    } else if (KV_K_UNIT == 2) {
        const Wordu2 w = *(const Wordu2*)p;
        b.lo01 = w.x;
        b.lo89 = w.y;
    } else {
        const Quadu w = *(const Quadu*)p;
        b.lo01 = prmt(w.x, w.y, 0x5410);
        b.lo89 = prmt(w.z, w.w, 0x5410);
        b.hi01 = prmt(w.x, w.y, 0x7632);
        b.hi89 = prmt(w.z, w.w, 0x7632);
    }
    return b;
#else
    const u32 w0 = ((const u32*)(buf + c0 * KV_K_RUN))[kl.kwi];
    const u32 w1 = ((const u32*)(buf + (c0 + 1) * KV_K_RUN))[kl.kwi];
    const u32 w8 = ((const u32*)(buf + (c0 + 2) * KV_K_RUN))[kl.kwi];
    const u32 w9 = ((const u32*)(buf + (c0 + 3) * KV_K_RUN))[kl.kwi];
    KeyBits b = {0u, 0u, 0u, 0u};
    if (MMA_NT * KV_KB == 8 || MMA_NT * KV_KB == 16) {
        b.lo01 = prmt(w0, w1, kl.ksel);
        b.lo89 = prmt(w8, w9, kl.ksel);
    } else {
        b.lo01 = prmt(w0 >> kl.ksh, w1 >> kl.ksh, 0x5410);
        b.lo89 = prmt(w8 >> kl.ksh, w9 >> kl.ksh, 0x5410);
        if (MMA_NT * KV_KB > 16) {
            b.hi01 = prmt(w0 >> kl.ksh, w1 >> kl.ksh, 0x7632);
            b.hi89 = prmt(w8 >> kl.ksh, w9 >> kl.ksh, 0x7632);
        }
    }
    return b;
#endif
}

// The f16 pair of the lane's token j (0 .. NT - 1) of a channel pair, from its lo and hi bits:
// 1024 + code * 2^KP, or the code itself where KP is 0 (see mma_group).
__device__ __forceinline__ u32 key_operand(u32 lo, u32 hi, u32 j, u32 magic) {
    const u32 o = j * KV_KB;  // bit of the token after the shift (below 32)
    const u32 kmask2 = KV_LEVELS_K | (KV_LEVELS_K << 16);
    const u32 b = (((o < 16 ? lo : hi) >> MMA_KSH(o)) & (kmask2 << MMA_KP(o))) | magic;
    return MMA_KP(o) == 0 ? sub_h2(b, magic) : b;
}

// Bit offset of n-tile jj's value codes in their byte (MMA_VLANE): its accumulators hold
// 2^MMA_VP(jj) times its channels' sums (mma_values), scaled back once, when the warps merge.
#define MMA_VP(jj) (((jj) * KV_VB) % 8)

#if MMA_VLANE
// Multiplies n-tile jj's accumulators by 2^(dir * MMA_VP(jj)) (dir 1 or -1; exact in f32).
__device__ __forceinline__ void mma_scale_values(MmaState& st, int dir) {
#pragma unroll
    for (int jj = 0; jj < MMA_NJ; jj++) {
        const float f = dir > 0 ? (float)(1u << MMA_VP(jj)) : 1.0f / (float)(1u << MMA_VP(jj));
#if MMA_T
        // n-tile jj is row half jj % 2 of m-tile jj / 2.
        st.acc[jj / 2][2 * (jj % 2)] *= f;
        st.acc[jj / 2][2 * (jj % 2) + 1] *= f;
#else
#pragma unroll
        for (int r = 0; r < 4; r++) st.acc[jj][r] *= f;
#endif
    }
}
#endif

#if MMA_VLANE
// What lane 4g + t reads of a group's values (MMA_VLANE): vcp, its channels' codes of token r0 =
// 2 NT t, its first token (voff: its first byte in the word, when it reads 16 bits); vz1, vz2,
// the zero points of value group g (an index inside the row for every lane: columns past KV_NG
// are unused) of tokens r0 and r0 + NT, in the order this lane loads them (below); sa[kk],
// sb[kk], the value scales of the tokens of b0 (NT * 2t + 2kk and NT * (2t + 1) + 2kk) and of b1
// (the next ones) in k-step kk, as f16 pairs, for this lane's value group; fold: whether every
// scale of the group is below 64 in magnitude (the path of mma_values). Offsets from vcp, vz1
// and vz2 are constants, so that every load takes its address as an immediate.
//
// Lane t's scales and zeros of token r lie (2 NT t + r) * KV_NG halves into their arrays, so at
// G = 32 and 4 value groups a token lanes t and t + 2 would read the same bank, 32 words apart,
// in every load (a 2-way conflict on each of a group's 16 loads): lanes t >= 2 load each pair's
// second token first (NT rows, 8 words, further on), which puts the four t on four banks, and
// the prmt that packs the pair puts the halves back in order. Where the four t are 32 words
// apart (head_dim 256 at G = 32) it halves a 4-way conflict (scripts/value_banks.py counts them).
//
// value_pair_sel: that prmt's selector for this lane (first token in the low half), from its t,
// recomputed rather than held across the loop.
__device__ __forceinline__ u32 value_pair_sel() {
    return KV_MMA_VSWAP && (threadIdx.x & 2u) ? 0x1054u : 0x5410u;
}
struct ValueLane {
    const u8* vcp;
    const u16 *vz1, *vz2;
    u32 voff;
    u32 sa[MMA_KK], sb[MMA_KK];
    bool fold;
};
__device__ __forceinline__ void value_lane(const u8* buf, u32 g, u32 t, ValueLane& vl) {
    vl.vcp = buf + MMA_VC_OFF + t * (MMA_VBLK + MMA_VPAD) + (MMA_VLB == 16 ? (g >> 1) * 4 : g * (MMA_VLB / 8));
    const u32 r0 = 2 * MMA_NT * t;
    // Halves: where this lane's first and second token of a pair lie from token r0.
    const u32 swap = KV_MMA_VSWAP ? t & 2u : 0u, o1 = swap ? MMA_NT * KV_NG : 0u, o2 = MMA_NT * KV_NG - o1;
    const u16* vsp = (const u16*)(buf + MMA_VS_OFF) + (r0 * KV_NG + MMA_NJ * g / KV_VG);
    const u16* vzp = (const u16*)(buf + MMA_VZ_OFF) + (r0 * KV_NG + (g < KV_NG ? g : KV_NG - 1));
    vl.vz1 = vzp + o1;
    vl.vz2 = vzp + o2;
    vl.voff = MMA_VLB == 16 ? 2 * (g & 1) : 0;
    const u16 *vs1 = vsp + o1, *vs2 = vsp + o2;
    u32 big = 0u;
#pragma unroll
    for (int kk = 0; kk < MMA_KK; kk++) {
        vl.sa[kk] = prmt(vs1[2 * kk * KV_NG], vs2[2 * kk * KV_NG], value_pair_sel());
        vl.sb[kk] = prmt(vs1[(2 * kk + 1) * KV_NG], vs2[(2 * kk + 1) * KV_NG], value_pair_sel());
        // Bit 15 of a half set when |vs| >= 64 (0x5400), infinities and NaN included.
        big |= ((vl.sa[kk] & 0x7fff7fffu) + 0x2c002c00u) | ((vl.sb[kk] & 0x7fff7fffu) + 0x2c002c00u);
    }
    vl.fold = !__any_sync(0xffffffffu, big & 0x80008000u);
}

// The B operand (A, transposed) of the codes at bit p of the bytes x of two tokens, with their
// scales s (and n = -1024 * s when FOLD): see mma_values.
template <bool FOLD>
__device__ __forceinline__ u32 value_operand(u32 x, int p, u32 s, u32 n, u32 magic) {
    const u32 vm = (KV_LEVELS_V << p) * 0x00010001u;
    if (FOLD) return fma_h2((x & vm) | magic, s, n);
    // 2^(10 - p) in both halves: the code's lowest bit at 1.
    const u32 e = magic - (((u32)p << 10) * 0x00010001u);
    return mul_h2(sub_h2((x & vm) | e, e), s);
}
#endif

#if MMA_VLANE
// The zero points of k-step kk's tokens (za: those of b0, zb: of b1) as f16 pairs, and, when
// FOLD, -1024 times their scales (na, nb).
struct ValueStep {
    u32 za, zb, na, nb;
};
template <bool FOLD>
__device__ __forceinline__ ValueStep value_step(const ValueLane& vl, int kk, u32 magic) {
    return {prmt(vl.vz1[2 * kk * KV_NG], vl.vz2[2 * kk * KV_NG], value_pair_sel()),
            prmt(vl.vz1[(2 * kk + 1) * KV_NG], vl.vz2[(2 * kk + 1) * KV_NG], value_pair_sel()),
            FOLD ? mul_h2(magic ^ 0x80008000u, vl.sa[kk]) : 0u, FOLD ? mul_h2(magic ^ 0x80008000u, vl.sb[kk]) : 0u};
}

// f(jj0, xa, xb) for each byte of this lane's value codes in k-step kk: xa holds that byte of
// b0's two tokens (one in each half), xb of b1's; jj0 is the n-tile of the byte's bit 0.
template <class F>
__device__ __forceinline__ void value_bytes(const ValueLane& vl, int kk, F&& f) {
    const u32 ia0 = 2 * kk, ia1 = MMA_NT + 2 * kk;
#pragma unroll
    for (int w = 0; w < (MMA_VLB + 31) / 32; w++) {
        const u32 xa0 = ((const u32*)(vl.vcp + ia0 * KV_V_ROW))[w], xa1 = ((const u32*)(vl.vcp + ia1 * KV_V_ROW))[w];
        const u32 xb0 = ((const u32*)(vl.vcp + (ia0 + 1) * KV_V_ROW))[w];
        const u32 xb1 = ((const u32*)(vl.vcp + (ia1 + 1) * KV_V_ROW))[w];
#pragma unroll
        for (int by = 0; by < (MMA_VLB < 32 ? MMA_VLB : 32) / 8; by++) {
            const u32 sel = (by + vl.voff) | ((by + vl.voff + 4) << 8);
            f((32 * w + 8 * by) / KV_VB, prmt(xa0, xa1, sel), prmt(xb0, xb1, sel));
        }
    }
}
#endif

#if MMA_VLANE
// The values' mmas of one group (see mma_group). A code at bit p of its byte is read as the f16
// 1024 + code * 2^p (one LOP3: a mask and the exponent of 1024), and with vs < 64 one fma makes
// the B operand (1024 + code * 2^p) * vs - 1024 * vs = 2^p * code * vs: the product is exact,
// 1024 * vs exact in f16, and the result rounded once (at most 3 * 64 * 64 at 2 bits, 15 * 16 *
// 64 at 4: no overflow). FOLD is that path, for groups whose value scales are all below 64 in
// magnitude; the others (FOLD false) take code * vs exactly (an exponent 2^(10 - p) in the
// LOP3, subtracted after), added to the accumulators while they hold true sums, so that no
// scale the cache can store overflows there.
template <bool FOLD>
__device__ __forceinline__ void mma_values(MmaState& st, const float (&pp)[MMA_NT][2], const ValueLane& vl, u32 magic) {
    // The exact path adds true sums: the accumulators are scaled to them and back (exact in f32).
    if (!FOLD) mma_scale_values(st, -1);
#pragma unroll
    for (int kk = 0; kk < MMA_KK; kk++) {
        u32 a0, a1, a2, a3;
        split_pair(pp[2 * kk][0], pp[2 * kk][1], a0, a1);
        split_pair(pp[2 * kk + 1][0], pp[2 * kk + 1][1], a2, a3);
        const ValueStep vs = value_step<FOLD>(vl, kk, magic);
        mma16816(st.zacc, a0, a1, a2, a3, vs.za, vs.zb);
        value_bytes(vl, kk, [&](int jj0, u32 xa, u32 xb) {
#pragma unroll
            for (int p = 0; p < 8; p += KV_VB) {
                const u32 b0 = value_operand<FOLD>(xa, p, vl.sa[kk], vs.na, magic);
                const u32 b1 = value_operand<FOLD>(xb, p, vl.sb[kk], vs.nb, magic);
                mma16816(st.acc[jj0 + p / KV_VB], a0, a1, a2, a3, b0, b1);
            }
        });
    }
    if (!FOLD) mma_scale_values(st, 1);
}
#endif

#if MMA_T
// The values' mmas of one group, transposed (see mma_group_t): A = the value codes times their
// scales, exactly the B operands of mma_values (n-tile jj even: rows g of m-tile jj / 2, odd:
// rows g + 8), B = the weights wb[kk] (hi, lo of each vector), A = the zero points (row g:
// value group g) for zacc. FOLD as in mma_values.
template <bool FOLD>
__device__ __forceinline__ void mma_values_t(MmaState& st, const u32 (&wb)[MMA_KK][2], const ValueLane& vl, u32 magic) {
    if (!FOLD) mma_scale_values(st, -1);
#pragma unroll
    for (int kk = 0; kk < MMA_KK; kk++) {
        const ValueStep vs = value_step<FOLD>(vl, kk, magic);
        mma16816(st.zacc, vs.za, 0u, vs.zb, 0u, wb[kk][0], wb[kk][1]);
        value_bytes(vl, kk, [&](int jj0, u32 xa, u32 xb) {
            // Two n-tiles of the untransposed layout (bit offsets p and p + VB) make one m-tile.
#pragma unroll
            for (int p = 0; p < 8; p += 2 * KV_VB) {
                const u32 a0 = value_operand<FOLD>(xa, p, vl.sa[kk], vs.na, magic);
                const u32 a1 = value_operand<FOLD>(xa, p + KV_VB, vl.sa[kk], vs.na, magic);
                const u32 a2 = value_operand<FOLD>(xb, p, vl.sb[kk], vs.nb, magic);
                const u32 a3 = value_operand<FOLD>(xb, p + KV_VB, vl.sb[kk], vs.nb, magic);
                mma16816(st.acc[(jj0 + p / KV_VB) / 2], a0, a1, a2, a3, wb[kk][0], wb[kk][1]);
            }
        });
    }
    if (!FOLD) mma_scale_values(st, 1);
}

// One group with the transposed products, for at most 4 query vectors: lane 4g + t keeps
// vector t's scores of its tokens NT * g .. NT * g + NT - 1 (those of mma_group) and its output
// channels NJ * g .. NJ * g + NJ - 1.
//   scores  S^T[tok][n] = sum_c code[c][tok] * (q * ks)[n][c]: A = key codes, m-tile mt rows g
//           and g + 8 = tokens NT * g + 2mt and the next (the lane's bits, as in mma_group), B
//           column n = the hi (n even) or lo (n odd) part of vector n / 2's q * ks;
//   output  O^T[c][n] = sum_tok code[tok][c] * vs * p[n][tok]: A = the value operands of
//           mma_values, B = the weights, moved from the scores' C layout (token rows) to the
//           B layout (token columns) by one movmatrix per 8 tokens.
// The bias terms of mma_group (1024 * sum(q * ks) and sum q * kz) come from one mma per k-step
// whose A rows are B's columns (k < 8) next to the raw query's parts (k >= 8), against B
// columns of 1024 and of kz; they are gathered from lanes 4n, 4n + 1 (column n) into vector
// t's lanes by shuffles.
// The three parts, apart so that the pipelined loop (MMA_PIPE) can put the scores of one group
// beside the values of the one before: mma_scores_t (reads the group's keys), mma_weights_t
// (the softmax; no shared memory), mma_values_t (reads its values).
struct ScoresT {
    float S[MMA_KK][4];  // m-tile mt: rows g, g + 8 = the lane's tokens 2mt, 2mt + 1
    float C[4];          // the bias mma's accumulators
};

// The query's parts this lane reads in k-step k of mma_scores_t (column g of B, the four words from
// channel c0 = 16k + 4t: y01, y89, x01, x89). By default they are loaded from shared memory in
// every group: 8 128-bit loads a group at head_dim 128, 32 of its 113 shared-memory wavefronts at
// KIVI-2 (scripts/sass_mix.py). KV_MMA_QREG=N loads those of the first N k-steps once and holds
// them in registers across the pipelined loop instead (MMA_PIPE, the default; the loop of one group
// an iteration still loads them each group), 4 N more a thread (the default uses 155 of the 168
// that 3 blocks per multiprocessor allow): all 8 at head_dim 128 fit only at 2 blocks
// (-DKV_MMA_BLOCKS=2; with the key codes in the CPU's order 185 registers at KIVI-2 and 194 at
// KIVI-4), 4 fit at 3; the NVRTC test checks that neither spills. Only up to
// head_dim 128 (at 256 they would spill). Variants for a GPU that finds the loop waiting on shared
// memory: scripts/gpu-check.sh times them against the default.
#ifndef KV_MMA_QREG
#define KV_MMA_QREG 0
#endif
#define MMA_QREG (MMA_KS > 8 ? 0 : KV_MMA_QREG < MMA_KS ? KV_MMA_QREG : MMA_KS)
struct QueryParts {
    Quadu q[MMA_QREG > 0 ? MMA_QREG : 1];
    const u32* qrow;
    __device__ __forceinline__ explicit QueryParts(const MmaShared& sh) {
        const u32 g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
        qrow = sh.qhl[g];
#pragma unroll
        for (int k = 0; k < MMA_QREG; k++) q[k] = *(const Quadu*)(qrow + 16 * k + 4 * t);
        (void)t;
    }
    __device__ __forceinline__ Quadu at(int k, u32 c0) const {
        return k < MMA_QREG ? q[k] : *(const Quadu*)(qrow + c0);
    }
};

__device__ __forceinline__ void mma_scores_t(const MmaShared& sh, const QueryParts& qp, const u8* buf, ScoresT& sc) {
    const u32 lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const u16* ksp = (const u16*)(buf + MMA_KS_OFF);
    const u16* kzp = (const u16*)(buf + MMA_KZ_OFF);
#pragma unroll
    for (int mt = 0; mt < MMA_KK; mt++) sc.S[mt][0] = sc.S[mt][1] = sc.S[mt][2] = sc.S[mt][3] = 0.0f;
    sc.C[0] = sc.C[1] = sc.C[2] = sc.C[3] = 0.0f;
    const KeyLane kl = key_lane(g);
    const u32 magic = sh.magic;
    // B of the bias mma: column 0 = (1024, 0), column 1 = (0, kz of channels c0, c0 + 1),
    // column 2 = (0, kz of c0 + 2, c0 + 3); the others unused.
    const u32 zb0 = g == 0 ? magic : 0u, zkeep = g == 0 ? 0u : 0xffffffffu;
    const u16* kzq = kzp + (g == 2 ? 2 : 0);
    // Each k-step's operands are loaded one k-step ahead, so that no k-step waits for its own
    // shared-memory loads.
    Quadu qq = qp.at(0, 4 * t);
    Wordu2 ks = *(const Wordu2*)(ksp + 4 * t);
    u32 kz = *(const u32*)(kzq + 4 * t);
    KeyBits kb = key_bits(buf, 4 * t, kl);
#pragma unroll
    for (int k = 0; k < MMA_KS; k++) {
        const u32 c1 = 16 * (k + 1) + 4 * t;
        Quadu nqq = qq;
        Wordu2 nks = ks;
        u32 nkz = kz;
        KeyBits nkb = kb;
        if (k + 1 < MMA_KS) {
            nqq = qp.at(k + 1, c1);
            nks = *(const Wordu2*)(ksp + c1);
            nkz = *(const u32*)(kzq + c1);
            nkb = key_bits(buf, c1, kl);
        }
        // Column g's parts: x = qh (n even) or ql (n odd), y = 0 or qh, for channels (c0, c0 + 1)
        // and (c0 + 2, c0 + 3), in sh.qhl as y01, y89, x01, x89.
        // hi = f16(qh * ks) and lo = f16(ql * ks + (qh * ks - hi)) as one expression:
        // fma(x, ks, fms(y, ks, y * ks)); each takes the place of its y, so that (b0, b1, x01,
        // x89) is the bias mma's A without moves.
        const u32 b0 = fma_h2(qq.z, ks.x, fms_h2(qq.x, ks.x, mul_h2(qq.x, ks.x)));
        const u32 b1 = fma_h2(qq.w, ks.y, fms_h2(qq.y, ks.y, mul_h2(qq.y, ks.y)));
        // Rows g: b0 (k < 8), x01 (k >= 8); rows g + 8: b1, x89.
        mma16816(sc.C, b0, b1, qq.z, qq.w, zb0, kz & zkeep);
#pragma unroll
        for (int mt = 0; mt < MMA_KK; mt++) {
            const u32 j = 2 * mt;  // rows g: token j of the lane, rows g + 8: token j + 1
            mma16816(sc.S[mt], key_operand(kb.lo01, kb.hi01, j, magic), key_operand(kb.lo01, kb.hi01, j + 1, magic),
                     key_operand(kb.lo89, kb.hi89, j, magic), key_operand(kb.lo89, kb.hi89, j + 1, magic), b0, b1);
        }
        qq = nqq;
        ks = nks;
        kz = nkz;
        kb = nkb;
    }
}

// The softmax of group u's scores: the weights as the values' B operands (wb), the running
// maximum moved and the accumulators rescaled where some vector's maximum grows, the weights'
// sum added to st.l.
template <bool SOFTCAP, bool EDGE>
__device__ __forceinline__ void mma_weights_t(const AttnParams& P, const MmaShared& sh, MmaState& st, const ScoresT& sc,
                                              u32 u, u32 nvec, u32 (&wb)[MMA_KK][2]) {
    const u32 lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const u32 p0 = KV_SINKS + u * KV_G;
    // Column g's 1024 * sum(q * ks): C[g][0] + C[g + 8][0] in lane 4g; its sum q * kz: C[g][1]
    // (lane 4g) + C[g + 8][2] (lane 4g + 1). Vector t's: columns 2t and 2t + 1, gathered in lane
    // 8t.
    float cb = sc.C[0] + sc.C[2], cz = t == 0 ? sc.C[1] : t == 1 ? sc.C[2] : 0.0f;
    cz += __shfl_xor_sync(0xffffffffu, cz, 1);
    cb += __shfl_xor_sync(0xffffffffu, cb, 4);
    cz += __shfl_xor_sync(0xffffffffu, cz, 4);
    cb = __shfl_sync(0xffffffffu, cb, 8 * t);
    const float bias = __shfl_sync(0xffffffffu, cz, 8 * t);

    // Vector t's scores of tokens NT * g + j, j = 2mt + i (hi and lo columns added).
    float pp[MMA_NT];
    float bm = KV_NEG_INF;
#pragma unroll
    for (int mt = 0; mt < MMA_KK; mt++) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int j = 2 * mt + i;
            const u32 o = j * KV_KB;
            const float f = 1.0f / (float)(1u << MMA_KP(o));
            float x = MMA_KP(o) == 0 ? sc.S[mt][2 * i] + sc.S[mt][2 * i + 1]
                                     : ((sc.S[mt][2 * i] + sc.S[mt][2 * i + 1]) - cb) * f;
            x += bias;
            if (SOFTCAP) {
                const float cap = P.softcap * MMA_LOG2E;
                x = cap * tanhf(x / cap);
            }
            if (EDGE) {
                const int pos = (int)(p0 + MMA_NT * g + j);
                x = (t < nvec && pos >= sh.lo[t] && pos < sh.hi[t]) ? x : KV_NEG_INF;
            }
            pp[j] = x;
            bm = fmaxf(bm, x);
        }
    }
#ifndef KV_COST_PROBE  // (the static cost counts the path of groups that do not rescale)
    if (__any_sync(0xffffffffu, bm > st.m + MMA_RESCALE)) {
        // Vector t's maximum over the 8 lanes that hold its scores.
        bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 4));
        bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 8));
        bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 16));
        const bool grow = bm > st.m + MMA_RESCALE;
        const float corr = grow ? ex2(st.m - bm) : 1.0f;
        if (grow) st.m = bm;
        st.l *= corr;
#pragma unroll
        for (int mj = 0; mj < MMA_NJ / 2; mj++) {
#pragma unroll
            for (int r = 0; r < 4; r++) st.acc[mj][r] *= corr;
        }
#pragma unroll
        for (int r = 0; r < 4; r++) st.zacc[r] *= corr;
    }
#endif
    const float mref = st.m == KV_NEG_INF ? 0.0f : st.m;
    float sum = 0.0f;
    // Each weight as its f16 hi and lo parts side by side (C layout: row g = the token, columns
    // 2t, 2t + 1), then transposed into the B layout of the values (row = column g, tokens).
#pragma unroll
    for (int j = 0; j < MMA_NT; j++) {
        const float x = ex2(pp[j] - mref);
        sum += x;
        const float hi = h2f(f2h(x));
        wb[j / 2][j % 2] = movmatrix_t(f2h2(hi, x - hi));
    }
    st.l += sum;
}

template <bool SOFTCAP, bool EDGE>
__device__ __forceinline__ void mma_group_t(const AttnParams& P, const MmaShared& sh, MmaState& st, const u8* buf, u32 u,
                                            u32 nvec) {
    const u32 lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    ScoresT sc;
    mma_scores_t(sh, QueryParts(sh), buf, sc);
    // The values' pointers and scales, as in mma_group.
    ValueLane vl;
    value_lane(buf, g, t, vl);
    u32 wb[MMA_KK][2];
    mma_weights_t<SOFTCAP, EDGE>(P, sh, st, sc, u, nvec, wb);
    if (vl.fold) {
        mma_values_t<true>(st, wb, vl, sh.magic);
    }
#ifndef KV_COST_PROBE
    else {
        mma_values_t<false>(st, wb, vl, sh.magic);
    }
#endif
}
#endif

// EDGE: some query row sees only part of the group (the edge of a sliding window or of the
// causal range, or a row that sees nothing): scores are masked per position. Groups inside
// every row's range skip that.
template <bool SOFTCAP, bool EDGE>
__device__ __forceinline__ void mma_group(const AttnParams& P, const MmaShared& sh, MmaState& st, const u8* buf, u32 u,
                                          u32 nvec) {
    const u32 lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const u32 p0 = KV_SINKS + u * KV_G;
    const u32* qrow = sh.qhl[g];
    const u16* ksp = (const u16*)(buf + MMA_KS_OFF);
    const u16* kzp = (const u16*)(buf + MMA_KZ_OFF);

    // Scores: A = the query scaled by the group's key scales, B = key codes. The A operand is
    // the f16 pair hi + lo of q * ks, found with f16 arithmetic from the query's own hi + lo:
    // hi = f16(qh * ks), lo = f16(ql * ks + (qh * ks - hi)), the bracket exact (an fma); about
    // 22 bits, like an f32 product split in two. The zero points give one bias per query row,
    // sum_c q[c] * kz[c], from one more mma per k-step: A = the query (hi/lo rows), B = kz (Cz).
    // A code at bit offset p > 0 of its half is read in place as 1024 + code * 2^p (one LOP3, no
    // shift, no subtraction): tile j then holds 1024 * sum(A) + 2^p * S, and the first part, the
    // same for every column, comes from one more mma per k-step with B = 1024 (Cb). Tiles at
    // offset 0 subtract the 1024 exactly instead.
    float S[MMA_NT][4];
#pragma unroll
    for (int j = 0; j < MMA_NT; j++) S[j][0] = S[j][1] = S[j][2] = S[j][3] = 0.0f;
    float Cb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float Cz[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const KeyLane kl = key_lane(g);
    // 1024 in both halves, read from shared memory so that it stays a register operand and
    // (a & imm) | magic is one LOP3 (which takes one immediate).
    const u32 magic = sh.magic;
#pragma unroll
    for (int k = 0; k < MMA_KS; k++) {
        // Channels c0, c0+1 (K columns 2t, 2t+1) and c0+2, c0+3 (2t+8, 2t+9): four adjacent
        // channels, so the query's hi/lo pairs, the scales and the zeros each take one load.
        const u32 c0 = 16 * k + 4 * t;
        const Quadu qq = *(const Quadu*)(qrow + c0);
        const Pairu q01 = {qq.x, qq.y}, q89 = {qq.z, qq.w};
        const Wordu2 ks = *(const Wordu2*)(ksp + c0), kz = *(const Wordu2*)(kzp + c0);
        const u32 ks01 = ks.x, ks89 = ks.y, kz01 = kz.x, kz89 = kz.y;
        mma16816(Cz, q01.hi, q01.lo, q89.hi, q89.lo, kz01, kz89);
        const u32 a0 = mul_h2(q01.hi, ks01), a2 = mul_h2(q89.hi, ks89);
        const u32 a1 = fma_h2(q01.lo, ks01, fms_h2(q01.hi, ks01, a0));
        const u32 a3 = fma_h2(q89.lo, ks89, fms_h2(q89.hi, ks89, a2));
        const KeyBits kb = key_bits(buf, c0, kl);
#pragma unroll
        for (int j = 0; j < MMA_NT; j++) {
            const u32 b0 = key_operand(kb.lo01, kb.hi01, j, magic), b1 = key_operand(kb.lo89, kb.hi89, j, magic);
            mma16816(S[j], a0, a1, a2, a3, b0, b1);
        }
        if (MMA_SCALED_TILES) mma16816(Cb, a0, a1, a2, a3, magic, magic);
    }
    const float bias = Cz[0] + Cz[2];

#if MMA_VLANE
    // The values' pointers and scales (see the values below), read before the softmax, so that
    // the loads and the vote on the path overlap the scores' mmas.
    ValueLane vl;
    value_lane(buf, g, t, vl);
#endif

    // Online softmax of row g over its 2 * NT scores in this lane and the 3 other lanes of the row.
    float pp[MMA_NT][2];
    float bm = KV_NEG_INF;
#pragma unroll
    for (int j = 0; j < MMA_NT; j++) {
        const u32 o = j * KV_KB;
        const float f = 1.0f / (float)(1u << MMA_KP(o));
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float x = MMA_KP(o) == 0 ? S[j][i] + S[j][i + 2] : ((S[j][i] - Cb[i]) + (S[j][i + 2] - Cb[i + 2])) * f;
            x += bias;
            if (SOFTCAP) {
                const float cap = P.softcap * MMA_LOG2E;  // the cap in log2 units
                x = cap * tanhf(x / cap);
            }
            if (EDGE) {
                const int pos = (int)(p0 + MMA_NT * (2 * t + i) + j);
                x = (g < nvec && pos >= sh.lo[g] && pos < sh.hi[g]) ? x : KV_NEG_INF;
            }
            pp[j][i] = x;
            bm = fmaxf(bm, x);
        }
    }
    // Some row's maximum moves when some lane of it sees a score past st.m + MMA_RESCALE (the
    // four lanes of a row agree on st.m): the vote needs no shuffles, and the row's maximum
    // itself is gathered only in the rare groups where it moves.
#ifndef KV_COST_PROBE  // (the static cost counts the path of groups that do not rescale)
    if (__any_sync(0xffffffffu, bm > st.m + MMA_RESCALE)) {
        bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 1));
        bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 2));
        // The four lanes of a row agree on bm and st.m, so on whether the row's maximum moves.
        const bool grow = bm > st.m + MMA_RESCALE;
        const float corr = grow ? ex2(st.m - bm) : 1.0f;  // 0 while the row had no score
        if (grow) st.m = bm;
        st.l *= corr;
#pragma unroll
        for (int jj = 0; jj < MMA_NJ; jj++) {
#pragma unroll
            for (int r = 0; r < 4; r++) st.acc[jj][r] *= corr;
        }
#if MMA_VLANE
#pragma unroll
        for (int r = 0; r < 4; r++) st.zacc[r] *= corr;
#endif
    }
#endif
    // A row that has seen no score yet has only -inf scores here: their weights are 0.
    const float mref = st.m == KV_NEG_INF ? 0.0f : st.m;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < MMA_NT; j++) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            pp[j][i] = ex2(pp[j][i] - mref);
            sum += pp[j][i];
        }
    }
    st.l += sum;

#if MMA_VLANE
    // Values: A = the weights (hi/lo), B = the value codes times their scales (2^p * code * vs,
    // rounded to f16 once: mma_values), two tokens per register; the zero points are a B operand
    // of their own, one more mma per k-step into zacc (B column n = value group n), added to every
    // channel of the group at the end. Lane g reads its channels' bits of a token with one load,
    // and a prmt puts one byte of two tokens side by side.
    if (vl.fold) {
        mma_values<true>(st, pp, vl, magic);
    }
#ifndef KV_COST_PROBE  // (the static cost counts the path of groups whose value scales are below 64)
    else {
        mma_values<false>(st, pp, vl, magic);
    }
#endif
#else
    // Values (any layout): A = the weights (hi/lo), B = the values dequantized to f16 (code * scale + zero,
    // rounded once), two tokens per register. Lane g reads channel 8jj+g: the byte holding it is
    // picked from two tokens' words by one prmt, its code kept by a mask and made an exact f16 by
    // an exponent that puts the code's lowest bit at 1 (2^E + code, minus 2^E).
    const u8* vcp = buf + MMA_VC_OFF;
    const u16* vsp = (const u16*)(buf + MMA_VS_OFF);
    const u16* vzp = (const u16*)(buf + MMA_VZ_OFF);
    const u32 vpos = (g * KV_VB) & 7;             // bit of channel 8jj+g inside its byte
    const u32 vbyte = (g * KV_VB) >> 3;           // its byte inside the 8 channels' bits of n-tile jj
    const u32 vmask = (KV_LEVELS_V << vpos) * 0x00010001u;
    const u32 vmagic = ((25u - vpos) << 10) * 0x00010001u;  // 2^(10 - vpos) in both halves
#pragma unroll
    for (int kk = 0; kk < MMA_KK; kk++) {
        const u32 ta0 = MMA_NT * (2 * t) + 2 * kk, ta1 = MMA_NT * (2 * t + 1) + 2 * kk;
        const u32 tb0 = ta0 + 1, tb1 = ta1 + 1;
        u32 a0, a1, a2, a3;
        split_pair(pp[2 * kk][0], pp[2 * kk][1], a0, a1);
        split_pair(pp[2 * kk + 1][0], pp[2 * kk + 1][1], a2, a3);
        const u8* ra0 = vcp + ta0 * KV_V_ROW;
        const u8* ra1 = vcp + ta1 * KV_V_ROW;
        const u8* rb0 = vcp + tb0 * KV_V_ROW;
        const u8* rb1 = vcp + tb1 * KV_V_ROW;
#pragma unroll
        for (int cg = 0; cg < KV_NG; cg++) {
            // (scale, zero) of the two tokens of b0 and of b1, as f16 pairs.
            const u32 sa = (u32)vsp[ta0 * KV_NG + cg] | ((u32)vsp[ta1 * KV_NG + cg] << 16);
            const u32 za = (u32)vzp[ta0 * KV_NG + cg] | ((u32)vzp[ta1 * KV_NG + cg] << 16);
            const u32 sb = (u32)vsp[tb0 * KV_NG + cg] | ((u32)vsp[tb1 * KV_NG + cg] << 16);
            const u32 zb = (u32)vzp[tb0 * KV_NG + cg] | ((u32)vzp[tb1 * KV_NG + cg] << 16);
#pragma unroll
            for (int jj = cg * (KV_VG / 8); jj < (cg + 1) * (KV_VG / 8); jj++) {
                // Byte of channel 8jj+g in a token's row, as (word, byte in the word).
                const u32 byte = jj * KV_VB + vbyte, wi = byte >> 2, bw = byte & 3;
                const u32 sel = bw | ((bw + 4) << 8);
                const u32 xa = prmt(((const u32*)ra0)[wi], ((const u32*)ra1)[wi], sel);
                const u32 xb = prmt(((const u32*)rb0)[wi], ((const u32*)rb1)[wi], sel);
                const u32 b0 = fma_h2(sub_h2((xa & vmask) | vmagic, vmagic), sa, za);
                const u32 b1 = fma_h2(sub_h2((xb & vmask) | vmagic, vmagic), sb, zb);
                mma16816(st.acc[jj], a0, a1, a2, a3, b0, b1);
            }
        }
    }
#endif
}

#if MMA_T
#define MMA_GROUP mma_group_t
#else
#define MMA_GROUP mma_group
#endif

// A warp's walk over its groups gb + warp, gb + warp + 4, ... below ge, skipping those no query
// row sees (some row sees positions lo_min .. hi_max - 1).
struct GroupWalk {
    const u32* blocks;
    u32 ge;
    int lo_min, hi_max;
    // The first group that begins at or past hi_max, or ge if that is before it: some row sees
    // every group from the walk's first up to it (their last positions are past lo_min, like the
    // first's), and none after.
    u32 gend;
    __device__ __forceinline__ GroupWalk(const u32* blocks_, u32 ge_, int lo_min_, int hi_max_)
        : blocks(blocks_),
          ge(ge_),
          lo_min(lo_min_),
          hi_max(hi_max_),
          gend(min(ge_, hi_max_ > KV_SINKS ? (u32)(hi_max_ - KV_SINKS + KV_G - 1) / KV_G : 0u)) {}
    // Whether some row sees group u.
    __device__ __forceinline__ bool seen(u32 u) const {
        const int first = KV_SINKS + u * KV_G;
        return first + KV_G - 1 >= lo_min && first < hi_max;
    }
    // The first group from u on that some row sees (ge if none): the walk's first.
    __device__ __forceinline__ u32 next(u32 u) const {
        while (u < ge && !seen(u)) u += KV_WARPS;
        return min(u, ge);
    }
    // The group d steps of the walk after u, a group of the walk or ge (then ge): after its first
    // group the walk takes every KV_WARPS-th group below gend.
    __device__ __forceinline__ u32 ahead(u32 u, u32 d) const {
        const u32 a = u + d * KV_WARPS;
        return a < gend ? a : ge;
    }
    // The one after u.
    __device__ __forceinline__ u32 after(u32 u) const { return ahead(u, 1); }
    // Its page (0 for ge).
    __device__ __forceinline__ u32 page(u32 u) const { return u < ge ? blocks[u / KV_GPP] : 0u; }
};

// Whether group u lies at the edge of some row's range (every row sees lo_max .. hi_min - 1):
// its scores are then masked per position.
__device__ __forceinline__ bool mma_edge(u32 u, int lo_max, int hi_min) {
    const int first = KV_SINKS + u * KV_G;
    return first < lo_max || first + KV_G > hi_min;
}

// The loop of the transposed products in two stages (KV_MMA_PIPE, the default): each iteration
// computes the weights of one group and then, in one run of straight-line code, the scores of
// the next group beside the values of this one, so that the two products' chains of dependent
// mmas and their dequantization interleave (the loop waits between instructions more than it
// issues them: BENCHMARKS.md). A group's keys and values are staged apart into the warp's two
// buffers: the keys of the group after next go where this group's keys were as soon as its
// scores are done (an iteration earlier), its values where the last group's values were, so that
// two buffers still give every copy an iteration to land. KV_MMA_PIPE=0 keeps one group per
// iteration (mma_groups below).
#ifndef KV_MMA_PIPE
#define KV_MMA_PIPE 1
#endif
#define MMA_PIPE (KV_MMA_PIPE && MMA_T && MMA_STAGES == 2)

// Groups are prefetched into L2 (KV_MMA_PREFETCH = d > 0) d steps of the walk before their keys
// are staged. Without it a group's cp.async copies are issued about one iteration before the loop
// waits for them, and a multiprocessor's 12 warps have about a group each in flight: 36 KB at
// KIVI-2, head_dim 128, G = 32, which at the bandwidth the loop aims at (about 30 GB/s per
// multiprocessor on an H100 or H200) covers about a microsecond of memory latency; from L2 the
// copies take a fraction of that. Each lane asks for 128-byte lines of the group's bytes
// (MMA_PF_BYTES from the start of its KV head in the page), one instruction a lane per 4 KB. By
// default (d = 2) only in the two-stage loop (MMA_PIPE: decode at up to 4 query heads per KV
// head) and where a group takes at most 4 KB (one instruction): larger groups have more bytes in
// flight already (60 KB at KIVI-4), the second instruction's registers spilled at head_dim 256,
// and the loop of one group an iteration (8 query vectors) took 24 instructions more a group for
// it where the two-stage loop takes 9 (scripts/sass_mix.py). Only where a page holds one group
// (the default), whose bytes in it are one range. -DKV_MMA_PREFETCH=0 and =2 set it for every
// layout and loop (scripts/gpu-check.sh times both against the default).
#define MMA_PF_BYTES (KV_V_ZERO + 2 * KV_G * KV_NG)
#ifndef KV_MMA_PREFETCH
#define KV_MMA_PREFETCH (MMA_PIPE && MMA_PF_BYTES <= 4096 ? 2 : 0)
#endif
#define MMA_PREFETCH (KV_GPP == 1 ? KV_MMA_PREFETCH : 0)

// This lane's lines of a group: lines lane, lane + 32, ... of its bytes, from `at`, the first in
// page 0 of the pool (a group's bytes begin on a 128-byte line where the pool does and the KV
// head's bytes are a multiple of 128, as in the common layouts; elsewhere the line of the last
// few bytes may be left out).
struct PrefetchLane {
    const u8* at;
    u32 off;
    __device__ __forceinline__ PrefetchLane(const AttnParams& P, u32 kvh, u32 lane)
        : at(P.pages + (u64)kvh * KV_HEAD_BYTES + 128 * lane), off(128 * lane) {}
};

// Prefetches group u (below ge; none for ge) in page `page` into L2.
__device__ __forceinline__ void prefetch_group(u32 page, u32 u, u32 ge, const PrefetchLane& pl) {
    if (!MMA_PREFETCH || u >= ge) return;
    const u8* p = pl.at + (u64)page * KV_PAGE_BYTES;
#pragma unroll
    for (u32 i = 0; i < (MMA_PF_BYTES + 4095) / 4096; i++) {
        if (pl.off + 4096 * i < MMA_PF_BYTES) prefetch_l2(p + 4096 * i);
    }
}

#if MMA_PIPE
template <bool SOFTCAP>
__device__ __forceinline__ void mma_groups(const AttnParams& P, MmaShared& sh, MmaState& st, const u32* blocks, u32 kvh,
                                           u32 gb, u32 ge, int lo_min, int hi_max, int lo_max, int hi_min, u32 nvec) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const GroupWalk w(blocks, ge, lo_min, hi_max);
    const StagePad sp = stage_pad(lane);
    // u0: the group whose weights and values come next, in buffer cur; u1: the one whose scores
    // come with them, in buffer oth; u2 (in cur) and u3 (in oth) after them. Commit groups, most
    // recent last: at the top of each iteration ..., K(u1) V(u0), V(u1), K(u2).
    u8* cur = sh.buf + warp * MMA_STAGE;
    u8* oth = sh.buf + (KV_WARPS + warp) * MMA_STAGE;
    u32 u0 = w.next(gb + warp), u1 = w.after(u0), u2 = w.after(u1), u3 = w.after(u2);
    const u32 p1 = w.page(u1);
    u32 p2 = w.page(u2);
    if (u0 < ge) stage_group(P, w.page(u0), kvh, u0, cur, lane, sp);
    cp_commit();
    if (u1 < ge) stage_group<MMA_KEYS>(P, p1, kvh, u1, oth, lane, sp);
    cp_commit();
    cp_wait<1>();
    __syncwarp();
    const QueryParts qp(sh);
    ScoresT sc;
    mma_scores_t(sh, qp, cur, sc);
    __syncwarp();  // u0's keys are read: u2's may take their place
    if (u1 < ge) stage_group<MMA_VALUES>(P, p1, kvh, u1, oth, lane, sp);
    cp_commit();
    if (u2 < ge) stage_group<MMA_KEYS>(P, p2, kvh, u2, cur, lane, sp);
    cp_commit();
    // The groups from u3 on whose keys the next iterations stage, into L2 (MMA_PREFETCH), and
    // their pages, which the staging takes from here (pr[d]: the page of the group d steps after
    // u3, w.ahead(u3, d)).
    const PrefetchLane pl(P, kvh, lane);
    u32 pr[MMA_PREFETCH > 0 ? MMA_PREFETCH : 1];
#pragma unroll
    for (int d = 0; d < (int)MMA_PREFETCH; d++) {
        const u32 uf = w.ahead(u3, d);
        pr[d] = w.page(uf);
        prefetch_group(pr[d], uf, ge, pl);
    }
    while (u0 < ge) {
        // The page of the group MMA_PREFETCH steps after u3 (u3's own without prefetching), read
        // here and used at the end of the iteration: the iteration's work hides the global load.
        // (Read at the end of the last one, the load was waited for at the top of this one,
        // where the compiler moves the loop's variables into place.)
        const u32 uf = w.ahead(u3, MMA_PREFETCH), pf = w.page(uf);
        const u32 p3 = MMA_PREFETCH ? pr[0] : pf;
        cp_wait<2>();  // u1's keys and u0's values have landed
        __syncwarp();
        ValueLane vl;
        value_lane(cur, g, t, vl);
        u32 wb[MMA_KK][2];
#ifndef KV_COST_PROBE  // (the static cost counts the path of groups inside every row's range)
        if (mma_edge(u0, lo_max, hi_min)) {
            mma_weights_t<SOFTCAP, true>(P, sh, st, sc, u0, nvec, wb);
        } else
#endif
        {
            mma_weights_t<SOFTCAP, false>(P, sh, st, sc, u0, nvec, wb);
        }
        // u1's scores beside u0's values, one block of code for each path of the values.
#ifdef KV_COST_PROBE  // (and the path of groups followed by another, with value scales below 64)
        mma_scores_t(sh, qp, oth, sc);
        mma_values_t<true>(st, wb, vl, sh.magic);
#else
        if (u1 < ge) {
            if (vl.fold) {
                mma_scores_t(sh, qp, oth, sc);
                mma_values_t<true>(st, wb, vl, sh.magic);
            } else {
                mma_scores_t(sh, qp, oth, sc);
                mma_values_t<false>(st, wb, vl, sh.magic);
            }
        } else if (vl.fold) {
            mma_values_t<true>(st, wb, vl, sh.magic);
        } else {
            mma_values_t<false>(st, wb, vl, sh.magic);
        }
#endif
        __syncwarp();  // u0's values and u1's keys are read
        if (u2 < ge) stage_group<MMA_VALUES>(P, p2, kvh, u2, cur, lane, sp);
        cp_commit();
        if (u3 < ge) stage_group<MMA_KEYS>(P, p3, kvh, u3, oth, lane, sp);
        cp_commit();
        if (MMA_PREFETCH) {
            const int last = MMA_PREFETCH > 0 ? (int)MMA_PREFETCH - 1 : 0;
            prefetch_group(pf, uf, ge, pl);
#pragma unroll
            for (int d = 0; d < last; d++) pr[d] = pr[d + 1];
            pr[last] = pf;
        }
        u0 = u1;
        u1 = u2;
        u2 = u3;
        u3 = w.after(u3);
        p2 = p3;
        u8* const b = cur;
        cur = oth;
        oth = b;
    }
}
#else
// This warp's groups gb + warp, gb + warp + 4, ... below ge that some query row sees, each
// staged MMA_STAGES - 1 groups ahead of the one computed (cp.async into a ring of MMA_STAGES
// buffers per warp), and the page of the one after that read from the block table meanwhile, so
// that staging does not wait for it. Some row sees positions lo_min .. hi_max - 1; every row
// sees lo_max .. hi_min - 1.
template <bool SOFTCAP>
__device__ __forceinline__ void mma_groups(const AttnParams& P, MmaShared& sh, MmaState& st, const u32* blocks, u32 kvh,
                                           u32 gb, u32 ge, int lo_min, int hi_max, int lo_max, int hi_min, u32 nvec) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const GroupWalk w(blocks, ge, lo_min, hi_max);
    // Staging buffer b of this warp.
#define MMA_BUF_OF(b) (sh.buf + ((b) * KV_WARPS + warp) * MMA_STAGE)
    const StagePad sp = stage_pad(lane);
    // us[0]: the group computed next; us[1 ..]: the ones staged after it, in buffers cur + 1 ...
    u32 us[MMA_STAGES - 1];
#pragma unroll
    for (int i = 0; i < MMA_STAGES - 1; i++) {
        us[i] = i == 0 ? w.next(gb + warp) : w.after(us[i - 1]);
        if (us[i] < ge) stage_group(P, w.page(us[i]), kvh, us[i], MMA_BUF_OF(i), lane, sp);
        cp_commit();
    }
    u32 nu = w.after(us[MMA_STAGES - 2]), nu_page = w.page(nu);
    // The pages of the MMA_PREFETCH groups after nu (pr[d]: that of w.ahead(nu, d + 1)), read an
    // iteration or more before they are staged; all but the last of those groups prefetched into
    // L2 here, and then, in each iteration, the group MMA_PREFETCH steps after the one it stages
    // (nu is staged at the top of the first).
    const PrefetchLane pl(P, kvh, lane);
    u32 pr[MMA_PREFETCH > 0 ? MMA_PREFETCH : 1];
#pragma unroll
    for (int d = 0; d < (int)MMA_PREFETCH; d++) {
        const u32 uf = w.ahead(nu, d + 1);
        pr[d] = w.page(uf);
        if (d + 1 < (int)MMA_PREFETCH) prefetch_group(pr[d], uf, ge, pl);
    }
    u32 cur = 0;
    while (us[0] < ge) {
        // nu goes into the buffer of the group computed last time round.
        const u32 nb = cur == 0 ? MMA_STAGES - 1 : cur - 1;
        if (nu < ge) stage_group(P, nu_page, kvh, nu, MMA_BUF_OF(nb), lane, sp);
        cp_commit();
        const u32 nnu = w.after(nu);
        u32 nnu_page;
        if (MMA_PREFETCH) {
            const int last = MMA_PREFETCH > 0 ? (int)MMA_PREFETCH - 1 : 0;
            prefetch_group(pr[last], w.ahead(nu, MMA_PREFETCH), ge, pl);
            nnu_page = pr[0];
#pragma unroll
            for (int d = 0; d < last; d++) pr[d] = pr[d + 1];
            pr[last] = w.page(w.ahead(nu, MMA_PREFETCH + 1));
        } else {
            nnu_page = w.page(nnu);
        }
        cp_wait<MMA_STAGES - 1>();
        __syncwarp();
        const u32 u = us[0];
#ifndef KV_COST_PROBE  // (the static cost counts the path of groups inside every row's range)
        if (mma_edge(u, lo_max, hi_min)) {
            MMA_GROUP<SOFTCAP, true>(P, sh, st, MMA_BUF_OF(cur), u, nvec);
        } else
#endif
        {
            MMA_GROUP<SOFTCAP, false>(P, sh, st, MMA_BUF_OF(cur), u, nvec);
        }
        __syncwarp();
        cur = cur == MMA_STAGES - 1 ? 0 : cur + 1;
#pragma unroll
        for (int i = 0; i < MMA_STAGES - 2; i++) us[i] = us[i + 1];
        us[MMA_STAGES - 2] = nu;
        nu = nnu;
        nu_page = nnu_page;
    }
#undef MMA_BUF_OF
}
#endif

// The group that a decode step's new token (or a short chunk's) pushes out of the window
// (AttnItem.flush), quantized into its page in the same launch by the block that wrote the new
// tokens, after its attention. Its tokens are in the ring or among the new ones (read from their
// input rows), and nothing in the launch writes the ring slots it reads (write_new_tokens writes
// other slots); no block of the launch reads what it writes: attention reads the groups before
// it, and the block-table entries of their pages (kv head 0's block writes the entry of a page
// the group starts).
__device__ __forceinline__ void flush_group(const AttnParams& P, u32 kvh) {
    const AttnItem it = attn_item(P, blockIdx.z);
    if (!it.flush) return;
    const u32 g = it.quantized / KV_G;
    if (it.flush == 2 && kvh == 0 && threadIdx.x == 0) P.blocks[(u64)it.slot * KV_SEQ_PAGES + g / KV_GPP] = it.flush_page;
    const TokenSource src = {head_window(P.windows, it.slot, kvh), P.k, P.v, P.kv_stride, kvh, it.len, it.chunk_row0};
    quantize_group(src, P.pages, it.flush_page, g);
}

// grid (splits, kv heads * head chunks, items). Splits 0 .. fp_splits - 1 are the full-precision
// tokens on CUDA cores (the body of kv_decode_attn with fp_only set; one split, or fp_ups units
// each in launches of one wave); the splits after them take `ups` quantized groups each on
// tensor cores. Both kinds of block share one shared-memory area: static, or dynamic where it
// passes 48 KB (KV_MMA_DYN bytes, all of MmaShared, which the host computes: mma_smem in
// src/cuda/kernels.rs).
#define MMA_SMEM (sizeof(AttnShared) > sizeof(MmaShared) ? sizeof(AttnShared) : sizeof(MmaShared))
#if KV_MMA_DYN
static_assert(sizeof(MmaShared) == KV_MMA_DYN && sizeof(AttnShared) <= KV_MMA_DYN,
              "the host's size of kv_decode_mma's dynamic shared memory (mma_smem) is not the kernel's");
#endif
// Blocks per multiprocessor the registers are budgeted for: three (168 registers), unless
// KV_MMA_BLOCKS says otherwise. Four (128 registers, no spills at the benchmark's shapes) took
// 3-7% longer on an H200 (scripts/gpu-sweep.sh; BENCHMARKS.md). The host asks the driver how
// many fit (cuOccupancyMaxActiveBlocksPerMultiprocessor) when it splits the context.
#ifndef KV_MMA_BLOCKS
#define KV_MMA_BLOCKS 3
#endif
extern "C" __global__ void __launch_bounds__(KV_THREADS, KV_MMA_BLOCKS) kv_decode_mma(const AttnParams P) {
#if __CUDA_ARCH__ >= 800
#if KV_MMA_DYN
    KV_DYNAMIC_SHARED(smem, KV_MMA_DYN);
#else
    __shared__ __align__(16) u8 smem[MMA_SMEM];
#endif
    // blockIdx.y: kv head and chunk of its query heads (more than 8 heads per kv head take
    // several blocks, each reading the kv head's groups).
    const u32 hchunks = (P.ratio + P.hc - 1) / P.hc;
    const u32 kvh = blockIdx.y / hchunks, hci = blockIdx.y % hchunks;
    const u32 h0 = kvh * P.ratio + hci * P.hc, nh = min(P.hc, P.ratio - hci * P.hc);
    if (blockIdx.x < P.fp_splits) {
        // fp_only 2: kv_prefill_fp (prefill_mma.cuh) does the full-precision tokens.
        if (P.fp_only != 2) attn_block_in(P, *(AttnShared*)smem);
        // (A chunk's rows are several items of one sequence: the first appends.)
        if (P.write_new && blockIdx.x == 0 && hci == 0 && (P.n_rows == 0 || blockIdx.z == 0)) {
            write_new_tokens(P, kvh);
            flush_group(P, kvh);
        }
        if (P.counts) combine_last(P, h0, nh, (float*)smem, MMA_SMEM / 4);
        return;
    }
    MmaShared& sh = *(MmaShared*)smem;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const AttnItem it = attn_item(P, blockIdx.z);
    // Query vector v: row v / nh of the item, head h0 + v % nh; at most 8 vectors (decode: one
    // row; chunks of queries: 8 / hc rows per item).
    const u32 nvec = nh * it.n_q;
    const u32 total = it.len + it.n_chunk;

    for (u32 i = tid; i < 4 * KV_HD; i += KV_THREADS) {
        u32 v = i / (KV_HD / 2), c = 2 * (i % (KV_HD / 2));
        float x0 = 0.0f, x1 = 0.0f;
        if (!MMA_T && v < nvec) {
            const elem_t* q = P.q + (i64)(it.q_row0 + v / nh) * P.q_stride + (i64)(h0 + v % nh) * KV_HD + c;
            x0 = ld_elem(q) * (P.scale * MMA_LOG2E);
            x1 = ld_elem(q + 1) * (P.scale * MMA_LOG2E);
        }
#if MMA_T
        // Column n of the transposed scores' B: vector n / 2's hi (n even) or lo part, as x and y
        // of mma_group_t (x = qh, y = 0 for even n; x = ql, y = qh for odd n).
        if (v / 2 < nvec) {
            const elem_t* q = P.q + (i64)(it.q_row0 + v / 2 / nh) * P.q_stride + (i64)(h0 + v / 2 % nh) * KV_HD + c;
            x0 = ld_elem(q) * (P.scale * MMA_LOG2E);
            x1 = ld_elem(q + 1) * (P.scale * MMA_LOG2E);
        }
        // Channels c, c + 1 in the four words from c & ~3: y01, y89, x01, x89.
        u32 qh, ql;
        split_pair(x0, x1, qh, ql);
        const u32 w = (c & ~3u) + (c & 2u) / 2;
        sh.qhl[v][w + 2] = v % 2 ? ql : qh;
        sh.qhl[v][w] = v % 2 ? qh : 0u;
#else
        split_pair(x0, x1, sh.qhl[v][c], sh.qhl[v][c + 1]);
#endif
    }
    if (tid == 0) sh.magic = 0x64006400u;
    if (tid < 8) {
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
    int lo_min = 0x7fffffff, hi_max = 0, lo_max = 0, hi_min = 0x7fffffff;
    for (u32 v = 0; v < nvec; v++) {
        if (sh.hi[v] > sh.lo[v]) {
            lo_min = min(lo_min, sh.lo[v]);
            hi_max = max(hi_max, sh.hi[v]);
        }
        lo_max = max(lo_max, sh.lo[v]);
        hi_min = min(hi_min, sh.hi[v]);
    }

    MmaState st;
    st.m = KV_NEG_INF;
    st.l = 0.0f;
#pragma unroll
    for (int jj = 0; jj < (MMA_T ? MMA_NJ / 2 : MMA_NJ); jj++) st.acc[jj][0] = st.acc[jj][1] = st.acc[jj][2] = st.acc[jj][3] = 0.0f;
#if MMA_VLANE
    st.zacc[0] = st.zacc[1] = st.zacc[2] = st.zacc[3] = 0.0f;
#endif

    const u32 n_groups = it.quantized / KV_G;
    const u32 gb = (blockIdx.x - P.fp_splits) * P.ups;
    const u32 ge = min(n_groups, gb + P.ups);
    const u32* blocks = P.blocks + (u64)it.slot * KV_SEQ_PAGES;
    // The softcap's tanh stays out of the loop that does not need it.
    if (P.softcap > 0.0f) {
        mma_groups<true>(P, sh, st, blocks, kvh, gb, ge, lo_min, hi_max, lo_max, hi_min, nvec);
    } else {
        mma_groups<false>(P, sh, st, blocks, kvh, gb, ge, lo_min, hi_max, lo_max, hi_min, nvec);
    }
    cp_wait<0>();

#if MMA_T
    // Vector t's sum over its 8 lanes; its output channels NJ * g .. NJ * g + NJ - 1 here, the hi
    // and lo columns added, plus the zero points' part of their value group (row NJ * g / VG of
    // zacc, in lane 4 * (NJ * g / VG) + t).
    st.l += __shfl_xor_sync(0xffffffffu, st.l, 4);
    st.l += __shfl_xor_sync(0xffffffffu, st.l, 8);
    st.l += __shfl_xor_sync(0xffffffffu, st.l, 16);
    const float zs = __shfl_sync(0xffffffffu, st.zacc[0] + st.zacc[1], 4 * (MMA_NJ * g / KV_VG) + t);
    __syncthreads();  // the staging buffers become the merge area
    float* merge = (float*)sh.buf;  // [KV_WARPS][8][MMA_MROW]
    if (t < nvec) {
        // 16 bytes at a time: a quarter warp's stores then cover all 32 banks once.
#pragma unroll
        for (int j4 = 0; j4 < MMA_NJ; j4 += 4) {
            float x[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int jj = j4 + i;
                const float f = 1.0f / (float)(1u << MMA_VP(jj));
                x[i] = (st.acc[jj / 2][2 * (jj % 2)] + st.acc[jj / 2][2 * (jj % 2) + 1]) * f + zs;
            }
            *(Floats4*)&merge[(warp * 8 + t) * MMA_MROW + MMA_NJ * g + j4] = {x[0], x[1], x[2], x[3]};
        }
        if (g == 0) {
            sh.wm[warp][t] = st.m * MMA_LN2;  // natural units, like the other splits
            sh.wl[warp][t] = st.l;
        }
    }
#else
    // Row g's sums over its four lanes; rows g and g + 8 of the accumulators added.
    st.l += __shfl_xor_sync(0xffffffffu, st.l, 1);
    st.l += __shfl_xor_sync(0xffffffffu, st.l, 2);
    // The zero points' part of this lane's channels: column 2t + i of n-tile jj is channel
    // NJ * (2t + i) + jj, in value group NJ * (2t + i) / VG whatever jj, whose sum lane 4g + n / 2
    // holds in column n % 2 of zacc (rows g and g + 8 added).
    float zs[2] = {0.0f, 0.0f};
#if MMA_VLANE
    {
        const float z0 = st.zacc[0] + st.zacc[2], z1 = st.zacc[1] + st.zacc[3];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const u32 n = MMA_NJ * (2 * t + i) / KV_VG;
            const float x0 = __shfl_sync(0xffffffffu, z0, (lane & ~3u) | (n >> 1));
            const float x1 = __shfl_sync(0xffffffffu, z1, (lane & ~3u) | (n >> 1));
            zs[i] = n & 1 ? x1 : x0;
        }
    }
#endif
    __syncthreads();  // the staging buffers become the merge area
    float* merge = (float*)sh.buf;  // [KV_WARPS][8][MMA_MROW]
    if (g < nvec) {
#pragma unroll
        for (int jj = 0; jj < MMA_NJ; jj++) {
#pragma unroll
            for (int i = 0; i < 2; i++) {
                // The channel of n-tile jj, column 2t + i (see the values' layouts).
                u32 c = MMA_VLANE ? MMA_NJ * (2 * t + i) + jj : 8 * jj + 2 * t + i;
                // (n-tile jj's accumulators hold 2^MMA_VP(jj) times its sums: mma_values)
                const float f = MMA_VLANE ? 1.0f / (float)(1u << MMA_VP(jj)) : 1.0f;
                merge[(warp * 8 + g) * MMA_MROW + c] = (st.acc[jj][i] + st.acc[jj][i + 2]) * f + zs[i];
            }
        }
        if (t == 0) {
            sh.wm[warp][g] = st.m * MMA_LN2;  // natural units, like the other splits
            sh.wl[warp][g] = st.l;
        }
    }
#endif
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
            a += merge[(w * 8 + v) * MMA_MROW + c] * f;
        }
        const u32 r = v / nh, head = h0 + v % nh;
        float* dst = P.part + ((((u64)blockIdx.z * P.qt + r) * P.n_q_heads + head) * P.n_splits + split) * (KV_HD + 2);
        if (c == 0) {
            dst[0] = m;
            dst[1] = l;
        }
        dst[2 + c] = a;
    }
    if (P.counts) combine_last(P, h0, nh, (float*)smem, MMA_SMEM / 4);
#endif
}
#endif
