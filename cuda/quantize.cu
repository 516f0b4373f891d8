// Appending to the cache: quantizing the groups that leave the full-precision window into their
// pages (quant.cuh: the CPU's numbers to the bit), writing new tokens into the window ring (or
// the sinks), and the small kernels that keep the device copy of the block tables current and
// undo quantization on truncation.
#include "quant.cuh"

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

// Groups g0 .. g0 + n_groups of one sequence leave the window; their tokens come from the ring
// or the input rows as TokenSource (quant.cuh) reads them, given len_old and chunk_row0.
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

// grid (total groups, kv heads), any block size.
extern "C" __global__ void kv_quantize(const QuantParams P) {
    u32 x = blockIdx.x, n = 0;
    while (n < P.n_items && x >= P.items[n].n_groups) x -= P.items[n++].n_groups;
    if (n >= P.n_items) return;
    const FlushItem it = P.items[n];
    const u32 g = it.g0 + x, h = blockIdx.y;
    const TokenSource src = {head_window(P.windows, it.slot, h), P.k, P.v, P.kv_stride, h, it.len_old, it.chunk_row0};
    quantize_group(src, P.pages, P.blocks[(u64)it.slot * KV_SEQ_PAGES + g / KV_GPP], g);
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
    elem_t* hw = head_window(P.windows, it.slot, h);
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
    elem_t* hw = head_window(P.windows, P.slot, h);
    for (u32 i = threadIdx.x; i < P.partial * KV_HD; i += blockDim.x) {
        u32 t = i / KV_HD, c = i % KV_HD;
        u32 ring = ((P.g * KV_G + t) % KV_RING) * KV_HD;
        u32 row = gi * KV_G + t;
#if KV_KEY_PER_TOKEN
        u32 kcode = code_at<KV_KB>(blk + KV_K_CODES + (u64)row * KV_K_RUN, c);
        elem_t key = dequant(blk, KV_K_SCALE, KV_K_ZERO, row * KV_NG + c / KV_VG, kcode);
#else
        u32 kcode = key_code(blk + KV_K_CODES + (u64)gi * KV_HD * KV_K_RUN, c, t);
        elem_t key = dequant(blk, KV_K_SCALE, KV_K_ZERO, gi * KV_HD + c, kcode);
#endif
        u32 vcode = code_at<KV_VB>(blk + KV_V_CODES + (u64)row * KV_V_ROW, c);
        hw[KV_W_RK + ring + c] = key;
        hw[KV_W_RV + ring + c] = dequant(blk, KV_V_SCALE, KV_V_ZERO, row * KV_NG + c / KV_VG, vcode);
    }
}
