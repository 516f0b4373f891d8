// Shared helpers of the kivi CUDA kernels: element types, f16 parameter reads, code unpacking,
// and the page / window addressing of src/layout.rs.
//
// Every kernel is compiled at run time with NVRTC for one cache configuration, which arrives as
// macros (-DKV_HD=128 ...): the layout is then made of constants. No CUDA header is included,
// so NVRTC needs nothing but itself; f16 and bf16 are handled as raw 16-bit patterns with PTX
// conversions (round to nearest even, like the `half` crate on the CPU), all in ptx.cuh.
//
// Configuration macros (all required):
//   KV_DTYPE     0 f32, 1 f16, 2 bf16: windows, and keys/values/queries/outputs of every call
//   KV_HD        head_dim              KV_NKV   kv heads
//   KV_KB, KV_VB key and value bits    KV_KEY_PER_TOKEN 0 (KIVI, per channel) or 1
//   KV_G         tokens per key group  KV_VG    channels per value group
//   KV_SINKS     sink tokens           KV_RING  residual + group (window ring length)
//   KV_GPP       groups per page       KV_SEQ_PAGES pages one sequence holds (block-table row)
//   KV_K_CODES, KV_K_SCALE, KV_K_ZERO, KV_V_CODES, KV_V_SCALE, KV_V_ZERO: offsets in a head block
//   KV_HEAD_BYTES, KV_PAGE_BYTES       KV_WIN_HEAD: elements of one head's window
//   KV_K_ILV     1: each group's key codes interleaved (per-channel keys; key_byte below)
// Attention kernels also take KV_NQ: query vectors (query heads x query rows) per block.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define KV_NG (KV_HD / KV_VG)
#define KV_LEVELS_K ((1u << KV_KB) - 1u)
#define KV_LEVELS_V ((1u << KV_VB) - 1u)
// Bytes of one packed key run (one channel of one group, or one token) and of one value row.
#if KV_KEY_PER_TOKEN
#define KV_K_RUN (KV_HD * KV_KB / 8)
#else
#define KV_K_RUN (KV_G * KV_KB / 8)
#endif
#define KV_V_ROW (KV_HD * KV_VB / 8)
#ifndef KV_K_ILV
#error "KV_K_ILV must be defined (src/cuda/kernels.rs)"
#endif
// Interleaved key codes (KV_K_ILV, src/layout.rs): a group's runs cut into units of KV_K_UNIT
// bytes (a tensor-core lane's share of a run where that is 2 or 4 bytes, else one byte), unit u
// of every channel side by side, so that the four channels c0 .. c0 + 3 (c0 a multiple of 4) a
// lane reads for one mma are one 32-, 64- or 128-bit word; with one-byte units the channels of
// each aligned four lie in the order c0, c0 + 2, c0 + 1, c0 + 3 (a lane's channel pairs then sit
// in the halves of that word where the mma wants them).
#define KV_K_UNIT (KV_K_RUN == 16 || KV_K_RUN == 32 ? KV_K_RUN / 8 : 1)
#define KV_WARPS 4
#define KV_THREADS (KV_WARPS * 32)
// A block's dynamic shared memory, `bytes` of it (what the launch passes), as the array `name`
// (the host simulator, cuda/host/sim.h, defines it as an array of that size).
#ifndef KV_DYNAMIC_SHARED
#define KV_DYNAMIC_SHARED(name, bytes) extern __shared__ __align__(16) u8 name[]
#endif
// Window parts inside one head's window: sink keys, sink values, ring keys, ring values.
#define KV_W_SK 0
#define KV_W_SV (KV_SINKS * KV_HD)
#define KV_W_RK (2 * KV_SINKS * KV_HD)
#define KV_W_RV (2 * KV_SINKS * KV_HD + KV_RING * KV_HD)

#include "ptx.cuh"

__device__ __forceinline__ float bf2f(u16 b) { return __uint_as_float(((u32)b) << 16); }

#if KV_DTYPE == 0
typedef float elem_t;
__device__ __forceinline__ float ld_elem(const elem_t* p) { return *p; }
__device__ __forceinline__ elem_t to_elem(float f) { return f; }
#elif KV_DTYPE == 1
typedef u16 elem_t;
__device__ __forceinline__ float ld_elem(const elem_t* p) { return h2f(*p); }
__device__ __forceinline__ elem_t to_elem(float f) { return f2h(f); }
#elif KV_DTYPE == 2
typedef u16 elem_t;
__device__ __forceinline__ float ld_elem(const elem_t* p) { return bf2f(*p); }
__device__ __forceinline__ elem_t to_elem(float f) { return f2bf(f); }
#else
#error "KV_DTYPE must be 0 (f32), 1 (f16) or 2 (bf16)"
#endif

// f16 number i of a parameter area (scales or zeros), as f32.
__device__ __forceinline__ float ld_param(const u8* area, u32 i) { return h2f(((const u16*)area)[i]); }

// An integer code 0..255 as f32 without the slow integer conversion: 2^23 + code, minus 2^23.
__device__ __forceinline__ float code_f(u32 c) { return __uint_as_float(0x4B000000u | c) - 8388608.0f; }

// Code i of a packed run of `bits`-bit codes (little-endian inside each byte).
template <int BITS>
__device__ __forceinline__ u32 code_at(const u8* run, u32 i) {
    u32 bit = i * BITS;
    return ((u32)__ldg(run + (bit >> 3)) >> (bit & 7)) & ((1u << BITS) - 1u);
}

// Offset, inside one group's key codes (keys per channel), of byte b of channel c's run. Must
// match Layout::device_key_byte in src/layout.rs.
__device__ __forceinline__ u32 key_byte(u32 c, u32 b) {
#if KV_K_ILV
    const u32 slot = KV_K_UNIT == 1 ? (c & ~3u) | ((c & 1u) << 1) | ((c >> 1) & 1u) : c;
    return b / KV_K_UNIT * (KV_HD * KV_K_UNIT) + slot * KV_K_UNIT + b % KV_K_UNIT;
#else
    return c * KV_K_RUN + b;
#endif
}

// Code t (a token of the group) of channel c among one group's key codes `codes`.
__device__ __forceinline__ u32 key_code(const u8* codes, u32 c, u32 t) {
    const u32 bit = t * KV_KB;
    return ((u32)__ldg(codes + key_byte(c, bit >> 3)) >> (bit & 7)) & KV_LEVELS_K;
}

// The head block of kv head h in the page holding quantized group g of a sequence, and the
// group's index inside that page. `blocks` is the sequence's block-table row.
__device__ __forceinline__ const u8* group_block(const u8* pages, const u32* blocks, u32 g, u32 h, u32* gi) {
    u32 page = blocks[g / KV_GPP];
    *gi = g % KV_GPP;
    return pages + (u64)page * KV_PAGE_BYTES + (u64)h * KV_HEAD_BYTES;
}

// The window of (slot, head) inside one layer's windows (to read, or to write).
__device__ __forceinline__ const elem_t* head_window(const elem_t* win_layer, u32 slot, u32 h) {
    return win_layer + ((u64)slot * KV_NKV + h) * KV_WIN_HEAD;
}
__device__ __forceinline__ elem_t* head_window(elem_t* win_layer, u32 slot, u32 h) {
    return win_layer + ((u64)slot * KV_NKV + h) * KV_WIN_HEAD;
}

// Offset (elements, inside a head window) of the key (or value) row of a full-precision
// position that is stored in the window: a sink or a ring token.
__device__ __forceinline__ u32 window_row(u32 pos, bool value) {
#if KV_SINKS > 0  // (without sinks the test would compare an unsigned value with zero)
    if (pos < KV_SINKS) return (value ? KV_W_SV : KV_W_SK) + pos * KV_HD;
#endif
    return (value ? KV_W_RV : KV_W_RK) + ((pos - KV_SINKS) % KV_RING) * KV_HD;
}

// Warp reductions.
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

#define KV_NEG_INF (-__int_as_float(0x7f800000))

// exp(a - b) that is 0 when a is -inf (also when both are).
__device__ __forceinline__ float exp_diff(float a, float b) { return a == KV_NEG_INF ? 0.0f : __expf(a - b); }

// Merges a partial softmax state (m2, l2) into (m, l): returns the factors to scale the
// accumulators of the first and the second state by.
__device__ __forceinline__ void merge_factors(float m, float m2, float* f1, float* f2, float* m_out) {
    float mm = fmaxf(m, m2);
    *f1 = exp_diff(m, mm);
    *f2 = exp_diff(m2, mm);
    *m_out = mm;
}
