//! Memory statistics.

use super::types::kivi_status;
use super::types::{kivi_cache, kivi_memory_stats};
use super::{check_out, ffi_fn, read_cache, write_versioned};

/// Where the cache's bytes go right now: codes, scales and zeros, full-precision windows, what
/// an f16 cache of the same tokens would take, pages, and the memory reserved at creation.
///
/// - `cache`: not NULL.
/// - `out`: caller-owned, not NULL; written only on success (`out->struct_size` set to
///   `struct_size`).
/// - `struct_size`: `sizeof(kivi_memory_stats)`.
///
/// CUDA cache: the same accounting (bytes of device memory), found on the host: no device work,
/// no waiting. `reserved_bytes` counts pages and windows as on the CPU; the device allocation is
/// larger by the block tables (part of `table_bytes`) and a 32 MiB scratch area for attention.
///
/// Thread safety: reads the cache; runs alongside other reading calls.
///
/// # Safety
/// `cache` is a live handle; `out` points to `struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kivi_cache_stats(
    cache: *const kivi_cache,
    out: *mut kivi_memory_stats,
    struct_size: usize,
) -> kivi_status {
    ffi_fn!("kivi_cache_stats", {
        let c = read_cache(cache)?;
        check_out(out, "out")?;
        let s = c.stats();
        let st = kivi_memory_stats {
            struct_size: struct_size.min(u32::MAX as usize) as u32,
            sequences: s.sequences as u32,
            tokens: s.tokens,
            quantized_tokens: s.quantized_tokens,
            code_bytes: s.code_bytes,
            scale_bytes: s.scale_bytes,
            window_bytes: s.window_bytes,
            used_bytes: s.used_bytes(),
            f16_bytes: s.f16_bytes,
            pages_used: s.pages_used,
            pages_total: s.pages_total,
            reserved_bytes: s.reserved_bytes,
            table_bytes: s.table_bytes,
        };
        write_versioned(out, struct_size, st, "stats")
    })
}
