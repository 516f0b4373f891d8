//! Memory statistics, and what a cache of some parameters will take before it is made.

use super::cache::config_of;
use super::types::kivi_status;
use super::types::{kivi_cache, kivi_memory_plan, kivi_memory_stats, kivi_params, KIVI_DEVICE_CPU};
use super::{check_out, ffi_fn, read_cache, read_versioned, write_versioned};
use crate::stats::MemoryPlan;

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
/// larger by the block tables (part of `table_bytes`) and a 32 MiB scratch area for attention
/// (with 64 KiB of counters).
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

/// What `plan` counts for a cache on `device`: host memory on the CPU, device memory on CUDA.
fn device_bytes(plan: &MemoryPlan, device: i32) -> u64 {
    if device == KIVI_DEVICE_CPU {
        plan.cpu_bytes()
    } else {
        plan.cuda_device_bytes
    }
}

/// What a cache of these parameters would take, without making it: the memory of its device
/// (`out->bytes`), its page pools and windows, page tables and pages. Needs no device: for a
/// CUDA `params->device` it neither loads the driver nor checks that the device exists.
///
/// - `params`: read during the call only; not NULL; `params->struct_size` as for
///   `kivi_cache_create()`.
/// - `out`: caller-owned, not NULL; written only on success (`out->struct_size` set to
///   `struct_size`).
/// - `struct_size`: `sizeof(kivi_memory_plan)`.
///
/// Errors: `KIVI_ERR_INVALID_CONFIG` for a bad field (as `kivi_cache_create()` would give),
/// `KIVI_ERR_STRUCT_SIZE`, `KIVI_ERR_NULL_POINTER`.
///
/// Thread safety: touches nothing but `*out`.
///
/// # Safety
/// `params` points to a `kivi_params` of `params->struct_size` bytes; `out` points to
/// `struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kivi_params_memory(
    params: *const kivi_params,
    out: *mut kivi_memory_plan,
    struct_size: usize,
) -> kivi_status {
    ffi_fn!("kivi_params_memory", {
        let p = read_versioned(params, "params")?;
        check_out(out, "out")?;
        let plan = config_of(&p)?.memory_plan()?;
        let m = kivi_memory_plan {
            struct_size: struct_size.min(u32::MAX as usize) as u32,
            device: p.device,
            bytes: device_bytes(&plan, p.device),
            reserved_bytes: plan.reserved_bytes,
            table_bytes: plan.table_bytes,
            pages_total: plan.pages_total,
        };
        write_versioned(out, struct_size, m, "plan")
    })
}

/// The largest `max_tokens` with which a cache of these parameters (every other field as set)
/// takes at most `budget_bytes` of its device's memory (`kivi_memory_plan.bytes`: host memory
/// for a CPU cache, device memory for a CUDA cache); the pools then end on a whole page. An
/// engine sizes its cache to the memory it has this way:
///
/// ```c
/// kivi_params_fit_tokens(&p, (uint64_t)6 << 30, &p.max_tokens);
/// ```
///
/// - `params`: read during the call only; not NULL; its `max_tokens` is ignored.
/// - `out_max_tokens`: not NULL (it may point to `params->max_tokens`); written only on
///   success.
///
/// Needs no device. Errors: `KIVI_ERR_INVALID_ARGUMENT` when not even one token fits (the
/// message gives what one token takes: the windows of `max_seqs` sequences, and on CUDA the
/// scratch area), `KIVI_ERR_INVALID_CONFIG` for a bad field, `KIVI_ERR_STRUCT_SIZE`,
/// `KIVI_ERR_NULL_POINTER`.
///
/// Thread safety: touches nothing but `*out_max_tokens`.
///
/// # Safety
/// `params` points to a `kivi_params` of `params->struct_size` bytes; `out_max_tokens` is
/// writable.
#[no_mangle]
pub unsafe extern "C" fn kivi_params_fit_tokens(
    params: *const kivi_params,
    budget_bytes: u64,
    out_max_tokens: *mut u32,
) -> kivi_status {
    ffi_fn!("kivi_params_fit_tokens", {
        let mut p = read_versioned(params, "params")?;
        check_out(out_max_tokens, "out_max_tokens")?;
        // The field the call chooses cannot be the one that makes the parameters bad.
        p.max_tokens = 1;
        let cfg = config_of(&p)?;
        let device = p.device;
        *out_max_tokens = cfg.max_tokens_within(budget_bytes, |plan| device_bytes(plan, device))?;
        Ok(())
    })
}
