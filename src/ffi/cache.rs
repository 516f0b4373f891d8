//! Cache lifecycle: default parameters, create, free, clear, and reading the parameters back.

use super::handle::{Backend, Gpu};
use super::types::kivi_status;
use super::types::{kivi_cache, kivi_params, KIVI_DEVICE_CPU};
use super::{check_out, ffi_fn, read_cache, read_versioned, write_cache, write_versioned, Failure, FfiResult};
use crate::cache::Cache;
use crate::config::{CacheConfig, DType, KeyMode, Rounding};
use crate::cuda::CudaCache;
use crate::error::Error;
use std::sync::RwLock;

/// The defaults, as `kivi_params_init()` writes them.
pub(crate) fn default_params() -> kivi_params {
    params_of(&CacheConfig::new(1, 1, 128))
}

fn params_of(c: &CacheConfig) -> kivi_params {
    kivi_params {
        struct_size: std::mem::size_of::<kivi_params>() as u32,
        n_layers: c.n_layers,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        dtype: c.dtype as i32,
        key_bits: c.key_bits as u32,
        value_bits: c.value_bits as u32,
        key_mode: c.key_mode as i32,
        group_size: c.group_size,
        value_group: c.value_group,
        residual: c.residual,
        sinks: c.sinks,
        max_tokens: c.max_tokens,
        max_seqs: c.max_seqs,
        page_tokens: c.page_tokens,
        n_threads: c.n_threads,
        device: KIVI_DEVICE_CPU,
        value_rounding: c.value_rounding as i32,
        max_seq_tokens: c.max_seq_tokens,
    }
}

/// Checks the fields that are not plain numbers and builds the core's configuration.
pub(crate) fn config_of(p: &kivi_params) -> FfiResult<CacheConfig> {
    let bad = |m: String| Failure::from(Error::InvalidConfig(m));
    let dtype = u32::try_from(p.dtype)
        .ok()
        .and_then(DType::from_u32)
        .ok_or_else(|| bad(format!("dtype {} is not a kivi_dtype (0 f32, 1 f16, 2 bf16)", p.dtype)))?;
    let key_mode = u32::try_from(p.key_mode)
        .ok()
        .and_then(KeyMode::from_u32)
        .ok_or_else(|| bad(format!("key_mode {} is not a kivi_key_mode (0 per channel, 1 per token)", p.key_mode)))?;
    let value_rounding = u32::try_from(p.value_rounding).ok().and_then(Rounding::from_u32).ok_or_else(|| {
        bad(format!("value_rounding {} is not a kivi_rounding (0 min/max, 1 least squares)", p.value_rounding))
    })?;
    let bits = |name: &str, b: u32| u8::try_from(b).map_err(|_| bad(format!("{name} {b} is not 2, 4 or 8")));
    if p.device < KIVI_DEVICE_CPU {
        return Err(bad(format!(
            "device {} is neither KIVI_DEVICE_CPU (-1) nor a CUDA device ordinal (0 and up)",
            p.device
        )));
    }
    if p.device != KIVI_DEVICE_CPU && p.n_threads != 1 {
        return Err(bad(format!(
            "n_threads {}: a CUDA cache (device {}) runs on the device and takes no host threads; set n_threads to 1",
            p.n_threads, p.device
        )));
    }
    let cfg = CacheConfig {
        n_layers: p.n_layers,
        n_kv_heads: p.n_kv_heads,
        head_dim: p.head_dim,
        dtype,
        key_bits: bits("key_bits", p.key_bits)?,
        value_bits: bits("value_bits", p.value_bits)?,
        key_mode,
        group_size: p.group_size,
        value_group: p.value_group,
        value_rounding,
        residual: p.residual,
        sinks: p.sinks,
        max_tokens: p.max_tokens,
        max_seqs: p.max_seqs,
        max_seq_tokens: p.max_seq_tokens,
        page_tokens: p.page_tokens,
        n_threads: p.n_threads,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Fills `*params` with the defaults (a KIVI-2 cache: 2-bit keys per channel and 2-bit values,
/// G = 32, value groups of 32 channels, R = 128, one sink token, f32 windows, 1 layer, 1 KV
/// head, head_dim 128, 4096 tokens, 1 sequence, 1 thread, CPU) and sets `params->struct_size`
/// to `struct_size`.
///
/// - `params`: caller-owned, not NULL; written only on success.
/// - `struct_size`: `sizeof(kivi_params)`: this library's (bytes past it are zeroed), or an
///   earlier header's (the fields it lacks are not written); any other smaller size fails with
///   `KIVI_ERR_STRUCT_SIZE`.
///
/// Thread safety: touches nothing but `*params`.
///
/// ```c
/// kivi_params p;
/// kivi_params_init(&p, sizeof p);
/// p.n_layers = 32; p.n_kv_heads = 8; p.head_dim = 128;
/// ```
///
/// # Safety
/// `params` points to `struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kivi_params_init(params: *mut kivi_params, struct_size: usize) -> kivi_status {
    ffi_fn!("kivi_params_init", {
        check_out(params, "params")?;
        let mut p = default_params();
        p.struct_size = struct_size.min(u32::MAX as usize) as u32;
        write_versioned(params, struct_size, p, "params")
    })
}

/// Creates a cache, taking all of its memory now (page pools for `max_tokens` quantized tokens
/// per layer, and one full-precision window per sequence slot and layer); nothing grows later.
///
/// - `params`: read during the call only; not NULL; `params->struct_size` must be
///   `sizeof(kivi_params)` (an earlier header's size gives the fields it lacks their defaults).
///   `params->device` chooses the backend: `KIVI_DEVICE_CPU`, or a CUDA device ordinal.
/// - `out_cache`: not NULL; on success receives a new cache that the caller owns and must release
///   with `kivi_cache_free()`; on failure it is left untouched.
///
/// CUDA cache: its memory is one device allocation (zeroed), in the device's primary context
/// (the CUDA runtime's), which kivi makes current on the calling thread, here and in every later
/// call on the cache. The call loads the CUDA driver and NVRTC if this process has not yet,
/// compiles the append kernels for the device (the attention kernels are compiled by the first
/// call that needs them; `KIVI_CUDA_CACHE_DIR` keeps them for later processes), and waits for
/// the device before it returns. Its stream is the default stream until
/// `kivi_cache_set_stream()`.
///
/// Errors: `KIVI_ERR_INVALID_CONFIG` (the message names the field; also when a CPU cache's
/// memory cannot be allocated, or a CUDA cache does not fit in the device's free memory: the
/// message gives the bytes), `KIVI_ERR_STRUCT_SIZE`, `KIVI_ERR_BACKEND_UNAVAILABLE`
/// (the message says what is missing: the driver, the device, NVRTC, ...),
/// `KIVI_ERR_NULL_POINTER`.
///
/// Thread safety: any thread; caches are independent of each other.
///
/// # Safety
/// `params` points to a `kivi_params` of `params->struct_size` bytes; `out_cache` is writable.
#[no_mangle]
pub unsafe extern "C" fn kivi_cache_create(params: *const kivi_params, out_cache: *mut *mut kivi_cache) -> kivi_status {
    ffi_fn!("kivi_cache_create", {
        let p = read_versioned(params, "params")?;
        check_out(out_cache, "out_cache")?;
        let cfg = config_of(&p)?;
        let cache = if p.device == KIVI_DEVICE_CPU {
            Backend::Cpu(Cache::new(cfg)?)
        } else {
            Backend::Cuda(Gpu::new(CudaCache::new(cfg, p.device as u32).map_err(|e| on_device(e, p.device))?))
        };
        let handle = Box::into_raw(Box::new(kivi_cache { inner: RwLock::new(cache) }));
        *out_cache = handle;
        Ok(())
    })
}

/// A CUDA error, its message saying which device was asked for.
fn on_device(e: Error, device: i32) -> Error {
    match e {
        Error::BackendUnavailable(m) => Error::BackendUnavailable(format!("device {device}: {m}")),
        e => e,
    }
}

/// Frees a cache and all of its memory. NULL is accepted and does nothing.
///
/// Ownership: takes back the cache; the handle is invalid afterwards (do not free it twice).
/// Thread safety: no other call on this cache may be running or start after it.
///
/// CUDA cache: freeing the device memory (`cuMemFree`) first waits for the device to finish the
/// work queued on it, so the cache may be freed while its work is still queued; the free is then
/// as slow as a device synchronisation.
///
/// # Safety
/// `cache` is NULL or a handle from `kivi_cache_create()` that has not been freed.
#[no_mangle]
pub unsafe extern "C" fn kivi_cache_free(cache: *mut kivi_cache) {
    if !cache.is_null() {
        let _ = std::panic::catch_unwind(|| drop(Box::from_raw(cache)));
    }
}

/// Removes every sequence (the memory stays reserved for reuse).
///
/// - `cache`: not NULL.
///
/// CUDA cache: changes only the host's bookkeeping (no device work); later calls reuse the
/// memory with work queued after whatever is queued before.
///
/// Thread safety: changes the cache; calls on one cache from several threads are serialized
/// by kivi (a call that changes the cache waits for all others to finish).
///
/// # Safety
/// `cache` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn kivi_cache_clear(cache: *mut kivi_cache) -> kivi_status {
    ffi_fn!("kivi_cache_clear", {
        write_cache(cache)?.clear();
        Ok(())
    })
}

/// Writes the parameters the cache was created with into `*params` (struct_size set to
/// `struct_size`), `device` included.
///
/// - `cache`: not NULL. `params`: caller-owned, not NULL, written only on success.
/// - `struct_size`: `sizeof(kivi_params)` (or an earlier header's: the fields it lacks are not
///   written).
///
/// Thread safety: reads the cache; any number of reading calls may run at once.
///
/// # Safety
/// `cache` is NULL or a live handle; `params` points to `struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kivi_cache_params(
    cache: *const kivi_cache,
    params: *mut kivi_params,
    struct_size: usize,
) -> kivi_status {
    ffi_fn!("kivi_cache_params", {
        let c = read_cache(cache)?;
        check_out(params, "params")?;
        let mut p = params_of(c.config());
        p.device = c.device();
        p.struct_size = struct_size.min(u32::MAX as usize) as u32;
        write_versioned(params, struct_size, p, "params")
    })
}
