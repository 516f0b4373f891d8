//! The parameters of the CUDA kernels, as the host fills them in: field for field the structs
//! of `cuda/*.cu` and `cuda/*.cuh` (`#[repr(C)]`, passed by value as the kernel's one argument).

/// Work items (sequences, chunks) one launch takes: `KV_MAX_ITEMS` of `cuda/attn.cuh` and
/// `cuda/quantize.cu`; more are launched in several calls.
pub(super) const MAX_ITEMS: usize = 64;
/// Block-table entries one `kv_set_blocks` launch writes (`KV_MAX_SET`).
pub(super) const MAX_SET: usize = 480;
/// The scratch area of attention (the split-K partial results), near the end of the cache's
/// allocation.
pub(super) const SCRATCH_BYTES: usize = 32 << 20;
/// The counters of launches that combine their own splits (`AttnParams.counts`), at the end of
/// the cache's allocation: one per (item, kv head and chunk of its query heads), zero between
/// launches.
pub(super) const COUNTS_BYTES: usize = 64 << 10;

/// One sequence (or chunk of its queries) of an attention launch (`AttnItem`, `cuda/attn.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct AttnItem {
    pub(super) slot: u32,
    pub(super) len: u32,
    pub(super) quantized: u32,
    pub(super) chunk_row0: u32,
    pub(super) n_chunk: u32,
    pub(super) q_row0: u32,
    pub(super) n_q: u32,
    pub(super) q_pos0: u32,
    /// A launch that appends (`write_new`): 0, or 1 when the new tokens push group
    /// `quantized / G` out of the window and the launch quantizes it into page `flush_page`
    /// (`flush_group`, `cuda/decode_mma.cuh`), 2 when that group also starts the page, whose
    /// block-table entry the launch then writes.
    pub(super) flush: u32,
    pub(super) flush_page: u32,
}

/// An attention launch: decode, prefill, tensor-core decode and combine (`AttnParams`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct AttnParams {
    pub(super) pages: u64,
    pub(super) windows: u64,
    pub(super) blocks: u64,
    pub(super) q: u64,
    pub(super) k: u64,
    pub(super) v: u64,
    pub(super) part: u64,
    pub(super) out: u64,
    /// Not 0: `kv_decode_mma` combines its splits itself (`combine_last`, `cuda/attn.cuh`) with
    /// these counters, and no combine is launched.
    pub(super) counts: u64,
    pub(super) q_stride: i64,
    pub(super) kv_stride: i64,
    pub(super) out_stride: i64,
    pub(super) scale: f32,
    pub(super) softcap: f32,
    pub(super) window: u32,
    pub(super) causal: u32,
    pub(super) n_q_heads: u32,
    pub(super) ratio: u32,
    pub(super) hc: u32,
    pub(super) qt: u32,
    pub(super) ups: u32,
    pub(super) n_splits: u32,
    pub(super) n_items: u32,
    pub(super) fp_only: u32,
    /// Nonzero: the launch is `n_rows` query rows of one sequence, `n_items` items of `qt` rows,
    /// item `z` being `items[0]` moved by `z * qt` rows ([`AttnParams::item`]); 0: the items
    /// are `items[..n_items]`.
    pub(super) n_rows: u32,
    /// Nonzero: a `kv_decode_mma` launch (a decode step, or a chunk of rows that fits in the
    /// ring) also appends each item's new tokens (its rows `chunk_row0..` of `k` and `v`) to its
    /// window at positions `len..` (`write_new_tokens`) and quantizes the group they push out of
    /// the window (`AttnItem::flush`), and no `kv_window_write`, `kv_quantize` or
    /// `kv_set_blocks` is launched for them.
    pub(super) write_new: u32,
    /// `kv_decode_mma` with `fp_only` 1: its splits `0..fp_splits` take the full-precision
    /// tokens, `fp_ups` units of 32 each (all in split 0 when `fp_ups` is 0); its quantized
    /// splits come after them.
    pub(super) fp_splits: u32,
    pub(super) fp_ups: u32,
    pub(super) items: [AttnItem; MAX_ITEMS],
}

impl AttnParams {
    /// Item `z` of the launch (`attn_item` of `cuda/attn.cuh`).
    pub(super) fn item(&self, z: usize) -> AttnItem {
        if self.n_rows == 0 {
            return self.items[z];
        }
        let r = z as u32 * self.qt;
        let it = self.items[0];
        AttnItem { q_row0: it.q_row0 + r, q_pos0: it.q_pos0 + r, n_q: self.qt.min(self.n_rows - r), ..it }
    }
}

/// Block-table entries to write, as (index, page) pairs (`SetBlocksParams`, `cuda/quantize.cu`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SetBlocksParams {
    pub(super) blocks: u64,
    pub(super) n: u32,
    pub(super) pad: u32,
    pub(super) pairs: [u32; 2 * MAX_SET],
}

/// Groups of one sequence that leave its window and are quantized (`FlushItem`).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct FlushItem {
    pub(super) slot: u32,
    pub(super) g0: u32,
    pub(super) n_groups: u32,
    pub(super) len_old: u32,
    pub(super) chunk_row0: u32,
    pub(super) pad: u32,
}

/// A quantization launch over the flushed groups of several sequences (`QuantParams`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct QuantParams {
    pub(super) pages: u64,
    pub(super) windows: u64,
    pub(super) blocks: u64,
    pub(super) k: u64,
    pub(super) v: u64,
    pub(super) kv_stride: i64,
    pub(super) n_items: u32,
    pub(super) total_groups: u32,
    pub(super) items: [FlushItem; MAX_ITEMS],
}

/// Input rows of one sequence written into its full-precision window (`WriteItem`).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct WriteItem {
    pub(super) slot: u32,
    pub(super) pos0: u32,
    pub(super) n: u32,
    pub(super) row0: u32,
}

/// A window-write launch (`WriteParams`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct WriteParams {
    pub(super) windows: u64,
    pub(super) k: u64,
    pub(super) v: u64,
    pub(super) kv_stride: i64,
    pub(super) n_items: u32,
    pub(super) total: u32,
    pub(super) items: [WriteItem; MAX_ITEMS],
}

/// The group a truncation cuts, dequantized back into the window (`UnquantParams`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UnquantParams {
    pub(super) windows: u64,
    pub(super) pages: u64,
    pub(super) blocks: u64,
    pub(super) slot: u32,
    pub(super) g: u32,
    pub(super) partial: u32,
    pub(super) pad: u32,
}
