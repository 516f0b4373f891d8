//! Memory statistics: where the bytes of a cache go, and how that compares with an f16 cache.

use crate::cache::Cache;
use crate::layout::Layout;
use crate::seq::SeqTable;

/// Bytes held by a cache, counted over all layers and sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Sequences held.
    pub sequences: u64,
    /// Tokens held, summed over sequences and layers.
    pub tokens: u64,
    /// Of those, tokens held as quantized codes.
    pub quantized_tokens: u64,
    /// Bytes of codes in the pages in use (a page shared by forked sequences counts once).
    pub code_bytes: u64,
    /// Bytes of f16 scales and zeros in the pages in use.
    pub scale_bytes: u64,
    /// Bytes of full-precision tokens held (windows and sinks), in the cache's dtype.
    pub window_bytes: u64,
    /// Bytes an f16 cache of the same tokens would take (keys and values).
    pub f16_bytes: u64,
    /// Pages in use and in all, over all layers.
    pub pages_used: u64,
    pub pages_total: u64,
    /// Everything taken at creation: page pools and window slots, padding included.
    pub reserved_bytes: u64,
    /// The page tables, also taken at creation (not in `reserved_bytes`): a block table per
    /// (sequence, layer) with room for `max_seq_tokens` (or the whole pool when 0), and each
    /// layer's page reference counts, in host memory. A CUDA cache holds the block tables in
    /// device memory too.
    pub table_bytes: u64,
}

impl MemoryStats {
    /// Codes, scales and zeros, and full-precision tokens.
    pub fn used_bytes(&self) -> u64 {
        self.code_bytes + self.scale_bytes + self.window_bytes
    }

    /// How many times smaller than an f16 cache of the same tokens (0 when empty).
    pub fn compression(&self) -> f64 {
        if self.used_bytes() == 0 {
            0.0
        } else {
            self.f16_bytes as f64 / self.used_bytes() as f64
        }
    }
}

impl MemoryStats {
    /// The accounting shared by every backend: tokens and pages from the sequence table, bytes
    /// from the layout.
    pub(crate) fn count(lay: &Layout, seqs: &SeqTable) -> MemoryStats {
        let pages_used = seqs.pages.iter().map(|p| p.used_count() as u64).sum();
        let pages_total = seqs.pages.iter().map(|p| p.total() as u64).sum();
        let mut st = MemoryStats { pages_used, pages_total, ..MemoryStats::default() };
        let per_token_fp = (2 * lay.n_kv_heads * lay.head_dim) as u64;
        for slot in &seqs.slots {
            if slot.id.is_none() {
                continue;
            }
            st.sequences += 1;
            for ls in &slot.layers {
                st.tokens += ls.len as u64;
                st.quantized_tokens += ls.quantized as u64;
                st.window_bytes += (ls.len - ls.quantized) as u64 * per_token_fp * lay.dtype.size() as u64;
            }
        }
        st.f16_bytes = st.tokens * per_token_fp * 2;
        let (codes, params) = lay.quantized_token_bytes();
        let page_tokens = (lay.page_tokens * lay.n_kv_heads) as u64;
        st.code_bytes = st.pages_used * page_tokens * codes as u64;
        st.scale_bytes = st.pages_used * page_tokens * params as u64;
        st.reserved_bytes = lay.total_bytes() as u64;
        st.table_bytes = lay.table_bytes() as u64;
        st
    }
}

impl Cache {
    /// Where the cache's bytes go right now.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats::count(&self.lay, &self.seqs)
    }
}
