//! Where the work runs: the instruction set of the CPU kernels, whether the CUDA backend can run
//! on a device, and the stream a CUDA cache queues its work on (set like `cublasSetStream`).
//!
//! A CUDA cache is created by `kivi_cache_create()` with `kivi_params.device` set to the device's
//! ordinal. Its calls then take device pointers in `kivi_rows` and queue their work on the
//! cache's stream without waiting for it; see `kivi_cache_set_stream()` for which calls wait.

use super::handle::Backend;
use super::types::kivi_status::{self, *};
use super::types::{kivi_cache, kivi_device_info};
use super::{check_out, ffi_fn, read_cache, write_cache, write_versioned, Failure};
use crate::error::Error;
use std::ffi::{c_char, c_void};

/// The instruction set the CPU attention kernels of this process run on: "avx512", "avx2",
/// "neon" or "scalar", the best this CPU has (detected at the first call). A cache whose
/// `head_dim`, key group or value group is not a multiple of the vector width (16 floats for
/// AVX-512, 8 for AVX2, 4 for NEON) runs the widest of them that fits, or the scalar code. For an
/// engine's log line and for bug reports: decode speed differs several-fold between them.
///
/// Returns a static NUL-terminated string owned by kivi, never NULL; never free it. Thread
/// safety: any thread, any time; it touches no cache.
#[no_mangle]
pub extern "C" fn kivi_cpu_isa() -> *const c_char {
    std::panic::catch_unwind(crate::attention::active_isa).map_or(c"scalar", |isa| isa.c_name()).as_ptr()
}

/// Whether the CUDA backend can run on CUDA device `device` (0, 1, ...), and what it found: the
/// device, the driver and NVRTC (loaded now if this process has not yet). `KIVI_OK` means that
/// `kivi_cache_create()` with `params.device = device` can make a cache there (given the memory).
///
/// - `out`: caller-owned, not NULL; written only on success (`out->struct_size` set to
///   `struct_size`).
/// - `struct_size`: `sizeof(kivi_device_info)`.
///
/// Errors: `KIVI_ERR_BACKEND_UNAVAILABLE` when the backend cannot run there, with the reason in
/// `kivi_last_error_message()` (no driver, no such device, no NVRTC, compute capability below
/// 7.0, ...); `KIVI_ERR_INVALID_ARGUMENT` for a negative `device`; `KIVI_ERR_STRUCT_SIZE`;
/// `KIVI_ERR_NULL_POINTER`.
///
/// Thread safety: any thread, any time; it touches no cache.
///
/// ```c
/// kivi_device_info info;
/// if (kivi_cuda_device_info(0, &info, sizeof info) == KIVI_OK)
///     printf("%s, sm_%u%u\n", info.name, info.compute_capability_major, info.compute_capability_minor);
/// else
///     printf("no CUDA: %s\n", kivi_last_error_message());
/// ```
///
/// # Safety
/// `out` points to `struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kivi_cuda_device_info(
    device: i32,
    out: *mut kivi_device_info,
    struct_size: usize,
) -> kivi_status {
    ffi_fn!("kivi_cuda_device_info", {
        check_out(out, "out")?;
        if device < 0 {
            return Err(Failure::new(
                KIVI_ERR_INVALID_ARGUMENT,
                format!("device {device}: CUDA devices are numbered from 0 (KIVI_DEVICE_CPU is the CPU)"),
            ));
        }
        let ours = std::mem::size_of::<kivi_device_info>();
        if struct_size < ours {
            // Checked before looking for the device, so the answer does not depend on the machine.
            return Err(Failure::new(
                KIVI_ERR_STRUCT_SIZE,
                format!(
                    "struct_size {struct_size}, but this library (kivi {}) expects {ours}: pass sizeof(kivi_device_info)",
                    env!("CARGO_PKG_VERSION")
                ),
            ));
        }
        let i = crate::cuda::device_info(device as u32).map_err(|e| match e {
            Error::BackendUnavailable(m) => Error::BackendUnavailable(format!("device {device}: {m}")),
            e => e,
        })?;
        let mut name = [0 as std::ffi::c_char; 256];
        for (d, &s) in name.iter_mut().zip(i.name.as_bytes().iter().take(255)) {
            *d = s as std::ffi::c_char;
        }
        let info = kivi_device_info {
            struct_size: struct_size.min(u32::MAX as usize) as u32,
            device,
            n_devices: i.count,
            compute_capability_major: i.capability.0,
            compute_capability_minor: i.capability.1,
            n_multiprocessors: i.multiprocessors,
            total_memory: i.total_memory,
            driver_version: i.driver_version,
            nvrtc_version_major: i.nvrtc_version.0,
            nvrtc_version_minor: i.nvrtc_version.1,
            name,
        };
        write_versioned(out, struct_size, info, "device info")
    })
}

/// Sets the CUDA stream (`CUstream`, or `cudaStream_t`: the same handle) on which every later call
/// on `cache` queues its device work, like `cublasSetStream()`. NULL is the default stream, and
/// the stream of a new cache.
///
/// - `cache`: not NULL.
/// - `stream`: NULL, `CU_STREAM_LEGACY`, `CU_STREAM_PER_THREAD`, or a live stream of the cache's
///   device created in its primary context (the CUDA runtime's, where `cudaStreamCreate` makes
///   them); kivi does not take it over: the caller destroys it, after the cache's last call on
///   it has been queued and has run. A CPU cache accepts only NULL.
///
/// How a CUDA cache's calls run:
/// - Queued, not waited for: `kivi_append`, `kivi_append_attend`, `kivi_attend`, `kivi_decode`,
///   `kivi_seq_truncate`, `kivi_seq_copy` return once their work is queued on the stream. Their
///   input rows must stay valid, and their outputs are written, when the stream reaches that
///   work: order the engine's own work on the same stream (or with events). A failure found by
///   the device (a bad pointer) shows in a later call that waits, or in the engine's own
///   synchronisation. The first call that needs a kernel compiles it with NVRTC (once per
///   process and cache layout; `KIVI_CUDA_CACHE_DIR` keeps them for later processes), unless
///   `kivi_cache_prepare()` did.
/// - Host only, no device work, no waiting: lengths, ids, `kivi_seq_remove`, `kivi_seq_keep`,
///   `kivi_cache_clear`, `kivi_cache_params`, `kivi_cache_stats`, `kivi_state_size`,
///   `kivi_seq_state_size`, this function and `kivi_cache_stream`.
/// - Waiting: `kivi_state_save` and `kivi_seq_state_save` wait for the stream (they copy to the
///   host); `kivi_state_load` and `kivi_seq_state_load` wait for the whole device before and
///   after their copies; `kivi_cache_create` waits for the device; `kivi_cache_free` waits for
///   the device (`cuMemFree` does), so a cache may be freed with work still queued.
///
/// CUDA graphs: the queued calls neither synchronise nor wait for the host, so their work can be
/// captured from the stream into a graph. Call `kivi_cache_prepare()` first (or make one call of
/// each kind outside a capture): the first call that needs a kernel compiles and loads it. A captured call is its work as it
/// was planned when queued (the sequences' lengths and pages, the groups leaving the window, the
/// split of the context), and the cache's host state moves on as if it had run: launch the
/// graph once, where the call's work would have run, and never again. Capture each step anew, or
/// capture it and update an instantiated graph with it (`cudaGraphExecUpdate`), which succeeds
/// while a step launches the same kernels as the one before: a `kivi_decode()` step on tensor
/// cores is one kernel per 64 sequences, whether or not groups leave the windows, unless a
/// group goes into a page a fork shares (`kivi_decode()` says).
///
/// The cache's work must reach the device in the order of the calls. Changing the stream with
/// work still queued on the old one is the caller's to order (e.g. an event recorded on the old
/// stream that the new one waits for); so is calling on one cache from several threads with
/// different streams of their own.
///
/// Errors: `KIVI_ERR_INVALID_ARGUMENT` for a stream on a CPU cache, or a stream of another
/// context or device (the stream is unchanged); `KIVI_ERR_NULL_POINTER`.
///
/// Thread safety: changes the cache; waits for calls in progress on it, which finish queuing on
/// the previous stream.
///
/// ```c
/// cudaStream_t s;
/// cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
/// kivi_cache_set_stream(cache, s);
/// ```
///
/// # Safety
/// `cache` is a live handle; `stream` is NULL, a special stream handle, or a live `CUstream`.
#[no_mangle]
pub unsafe extern "C" fn kivi_cache_set_stream(cache: *mut kivi_cache, stream: *mut c_void) -> kivi_status {
    ffi_fn!("kivi_cache_set_stream", {
        match &mut *write_cache(cache)? {
            Backend::Cpu(_) if !stream.is_null() => {
                return Err(Failure::new(
                    KIVI_ERR_INVALID_ARGUMENT,
                    format!("stream {stream:p} given to a CPU cache (device -1), which has no streams: pass NULL"),
                ))
            }
            Backend::Cpu(_) => {}
            Backend::Cuda(g) => {
                g.check_stream(stream as usize)?;
                g.stream = stream as usize;
            }
        }
        Ok(())
    })
}

/// Compiles and loads now the kernels that `cache`'s attention calls with `n_q_heads` query
/// heads use, which the first call that needs one would otherwise do. On a CUDA cache these are
/// its attention modules (decode steps and chunks of queries; the append kernels are loaded by
/// `kivi_cache_create()`), compiled with NVRTC side by side, a few seconds each, once per
/// process and cache layout (`KIVI_CUDA_CACHE_DIR` keeps them for later processes). Call it when
/// the model loads, so that the first step does not wait for the compiler, and before capturing
/// calls into a CUDA graph, which may then begin with the first call of each kind. A CPU cache
/// has nothing to prepare: it checks `n_q_heads` only.
///
/// - `cache`: not NULL.
/// - `n_q_heads`: the query heads the attention calls pass, a positive multiple of the cache's
///   `n_kv_heads`.
///
/// Errors: `KIVI_ERR_INVALID_ARGUMENT` for `n_q_heads`; `KIVI_ERR_BACKEND_UNAVAILABLE` where a
/// kernel cannot be compiled or loaded; `KIVI_ERR_NULL_POINTER`. The cache is unchanged either
/// way (a call made later compiles what this one could not).
///
/// Thread safety: reads the cache; runs alongside other reading calls (the kernels are
/// compiled once, whichever call gets there first).
///
/// ```c
/// kivi_cache_prepare(cache, 32);  // Llama-3-8B: 32 query heads over 8 KV heads
/// ```
///
/// # Safety
/// `cache` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn kivi_cache_prepare(cache: *const kivi_cache, n_q_heads: u32) -> kivi_status {
    ffi_fn!("kivi_cache_prepare", {
        match &*read_cache(cache)? {
            Backend::Cpu(c) => c.config().check_q_heads(n_q_heads)?,
            Backend::Cuda(g) => g.cache.prepare_attention(n_q_heads)?,
        }
        Ok(())
    })
}

/// The stream `kivi_cache_set_stream()` set on `cache` (NULL: the default stream; always NULL
/// for a CPU cache).
///
/// - `cache`, `out_stream`: not NULL; `*out_stream` written only on success.
///
/// Thread safety: reads the cache; runs alongside other reading calls.
///
/// # Safety
/// `cache` is a live handle; `out_stream` is writable.
#[no_mangle]
pub unsafe extern "C" fn kivi_cache_stream(cache: *const kivi_cache, out_stream: *mut *mut c_void) -> kivi_status {
    ffi_fn!("kivi_cache_stream", {
        let c = read_cache(cache)?;
        check_out(out_stream, "out_stream")?;
        *out_stream = match &*c {
            Backend::Cpu(_) => std::ptr::null_mut(),
            Backend::Cuda(g) => g.stream(),
        };
        Ok(())
    })
}
