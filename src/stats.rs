//! Memory statistics: where the bytes of a cache go, and how that compares with an f16 cache;
//! and what a configuration will take, before a cache is made.

use crate::cache::Cache;
use crate::config::CacheConfig;
use crate::cuda::cache::DeviceAlloc;
use crate::error::{Error, Result};
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

/// The memory a cache of a configuration takes at creation, known before making it
/// ([`CacheConfig::memory_plan`]): what its [`MemoryStats`] will report, and the device memory of
/// a CUDA cache. Nothing grows after creation, so these are all the cache will ever take (beside
/// a few kilobytes of bookkeeping and, on a CPU, each thread's scratch memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Page pools and full-precision window slots, padding included
    /// ([`MemoryStats::reserved_bytes`]).
    pub reserved_bytes: u64,
    /// The page tables ([`MemoryStats::table_bytes`]).
    pub table_bytes: u64,
    /// Pages over all layers ([`MemoryStats::pages_total`]).
    pub pages_total: u64,
    /// The one device allocation of a CUDA cache ([`crate::cuda::CudaCache::device_bytes`]):
    /// pages, windows and block tables, each 256-byte aligned, and a 32 MiB scratch area for
    /// attention (and 64 KiB of its counters). Its host memory is then `table_bytes`.
    pub cuda_device_bytes: u64,
}

impl MemoryPlan {
    fn of(lay: &Layout) -> MemoryPlan {
        let clamp = |n: u128| u64::try_from(n).unwrap_or(u64::MAX);
        MemoryPlan {
            reserved_bytes: clamp(lay.total_bytes()),
            table_bytes: clamp(lay.table_bytes()),
            pages_total: clamp(lay.n_layers as u128 * lay.pages_per_layer as u128),
            cuda_device_bytes: clamp(DeviceAlloc::of(lay).bytes),
        }
    }

    /// The host memory of a CPU cache ([`crate::Cache`]): `reserved_bytes + table_bytes`.
    pub fn cpu_bytes(&self) -> u64 {
        self.reserved_bytes.saturating_add(self.table_bytes)
    }
}

impl CacheConfig {
    /// What a cache of this configuration will take (on the CPU or on a CUDA device), without
    /// making it or touching a device. [`Error::InvalidConfig`] for a bad field, as
    /// [`crate::Cache::new`] would give.
    pub fn memory_plan(&self) -> Result<MemoryPlan> {
        self.validate()?;
        Ok(MemoryPlan::of(&Layout::new(self)))
    }

    /// The largest `max_tokens` for which a cache of this configuration (every other field as it
    /// is) takes at most `budget` bytes as `bytes` counts them: [`MemoryPlan::cpu_bytes`] for a
    /// CPU cache, the plan's `cuda_device_bytes` for a CUDA cache. The pools then end on a whole
    /// page. An engine sizes its cache to the memory it has this way.
    ///
    /// ```
    /// use kivi::{CacheConfig, MemoryPlan};
    /// let mut cfg = CacheConfig::new(32, 8, 128);
    /// cfg.max_seqs = 4;
    /// cfg.max_tokens = cfg.max_tokens_within(2 << 30, MemoryPlan::cpu_bytes).unwrap();
    /// assert!(cfg.memory_plan().unwrap().cpu_bytes() <= 2 << 30);
    /// ```
    ///
    /// Errors: [`Error::InvalidConfig`] for a bad field other than `max_tokens`;
    /// [`Error::InvalidArgument`] when even one token does not fit (the message gives what one
    /// token takes: mostly the full-precision windows of `max_seqs` sequences).
    pub fn max_tokens_within(&self, budget: u64, bytes: impl Fn(&MemoryPlan) -> u64) -> Result<u32> {
        // The other fields are checked with `least` below; past what the machine can address
        // (the only other refusal), nothing fits.
        let at = |m: u32| CacheConfig { max_tokens: m, ..self.clone() }.memory_plan().ok().map(|p| bytes(&p));
        let least = CacheConfig { max_tokens: 1, ..self.clone() }.memory_plan()?;
        if bytes(&least) > budget {
            return Err(Error::InvalidArgument(format!(
                "a budget of {budget} bytes holds no token: with max_tokens 1 this configuration \
                 takes {} bytes (full-precision windows for {} sequences in each of {} layers{})",
                bytes(&least),
                self.max_seqs,
                self.n_layers,
                if bytes(&least) == least.cuda_device_bytes { ", a 32 MiB scratch area and its counters" } else { "" }
            )));
        }
        // The bytes grow with max_tokens: the largest that fits, by bisection.
        let (mut lo, mut hi) = (1u32, u32::MAX);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if at(mid).is_some_and(|b| b <= budget) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Ok(lo)
    }
}
