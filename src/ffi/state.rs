//! Save and restore: the whole cache, or one sequence, to and from a caller buffer.
//!
//! A state blob is self-describing and checked on load (a damaged blob gives
//! `KIVI_ERR_CORRUPT_STATE`, one from a cache with other settings `KIVI_ERR_STATE_MISMATCH`);
//! loading it replaces what it covers. Ask for the size first, allocate, then save.
//!
//! The format is the same for both backends: a blob saved from a CPU cache loads into a CUDA
//! cache of the same parameters and the other way round, and both write the same bytes for the
//! same contents. A CUDA cache saves through a host copy
//! of what it saves (waiting for its stream), and loads with synchronous copies to the device
//! (waiting for the whole device before and after).

use super::handle::Backend;
use super::types::kivi_cache;
use super::types::kivi_status::{self, *};
use super::{check_out, ffi_fn, read_cache, write_cache, Failure, FfiResult};
use crate::error::Error;

/// The caller buffer `buf` of `size` bytes, or the NULL error.
unsafe fn buffer<'a>(buf: *const u8, size: usize) -> FfiResult<&'a [u8]> {
    if buf.is_null() {
        return Err(Failure::new(KIVI_ERR_NULL_POINTER, "buf is NULL"));
    }
    Ok(std::slice::from_raw_parts(buf, size))
}

unsafe fn buffer_mut<'a>(buf: *mut u8, size: usize, needed: usize) -> FfiResult<&'a mut [u8]> {
    if buf.is_null() {
        return Err(Failure::new(KIVI_ERR_NULL_POINTER, "buf is NULL"));
    }
    if size < needed {
        return Err(Error::BufferTooSmall { needed, given: size }.into());
    }
    Ok(std::slice::from_raw_parts_mut(buf, size))
}

/// Copies a blob a CUDA cache saved into the caller's buffer.
fn put(blob: &[u8], b: &mut [u8]) -> FfiResult<usize> {
    if blob.len() > b.len() {
        return Err(Error::BufferTooSmall { needed: blob.len(), given: b.len() }.into());
    }
    b[..blob.len()].copy_from_slice(blob);
    Ok(blob.len())
}

/// The bytes `kivi_state_save()` needs for the whole cache as it is now.
///
/// - `cache`, `out_size`: not NULL; `*out_size` written only on success.
///
/// CUDA cache: found on the host; no device work, no waiting.
///
/// Thread safety: reads the cache; runs alongside other reading calls (the size holds until a
/// call changes the cache).
///
/// # Safety
/// `cache` is a live handle; `out_size` is writable.
#[no_mangle]
pub unsafe extern "C" fn kivi_state_size(cache: *const kivi_cache, out_size: *mut usize) -> kivi_status {
    ffi_fn!("kivi_state_size", {
        let c = read_cache(cache)?;
        check_out(out_size, "out_size")?;
        *out_size = c.state_size();
        Ok(())
    })
}

/// Saves the whole cache (every sequence, with its quantized pages and windows) into `buf`.
///
/// - `cache`: not NULL.
/// - `buf`: caller-owned, not NULL, `buf_size` bytes, at least `kivi_state_size()`; any
///   alignment. Written only on success.
/// - `out_written`: not NULL; receives the bytes written, on success.
///
/// CUDA cache: copies the pages in use (as far as the last one reaches) and the windows to host
/// memory on the cache's stream and waits for the stream (so for everything queued on it
/// before), then writes the blob; that host copy lasts for the time of the call.
///
/// Errors: `KIVI_ERR_BUFFER_TOO_SMALL` (nothing written).
/// Thread safety: reads the cache; runs alongside other reading calls.
///
/// # Safety
/// `cache` is a live handle; `buf` points to `buf_size` writable bytes; `out_written` is writable.
#[no_mangle]
pub unsafe extern "C" fn kivi_state_save(
    cache: *const kivi_cache,
    buf: *mut u8,
    buf_size: usize,
    out_written: *mut usize,
) -> kivi_status {
    ffi_fn!("kivi_state_save", {
        let c = read_cache(cache)?;
        check_out(out_written, "out_written")?;
        let b = buffer_mut(buf, buf_size, c.state_size())?;
        *out_written = match &*c {
            Backend::Cpu(c) => c.save_state(b)?,
            Backend::Cuda(g) => put(&g.cache.save_state_vec(g.stream())?, b)?,
        };
        Ok(())
    })
}

/// Replaces the whole cache's contents with a state saved by `kivi_state_save()` from a cache
/// with the same dimensions and quantization settings, on either backend. Capacity
/// (`max_tokens`, `max_seqs`, `max_seq_tokens`), `page_tokens` and `n_threads` may differ when
/// the saved sequences fit: pages are regrouped into this cache's page size, and forked
/// sequences keep sharing their common pages.
///
/// - `cache`: not NULL. `buf`: not NULL, `buf_size` bytes, read during the call only.
///
/// CUDA cache: waits for all work on the device (every stream: the copies to the device are
/// synchronous, outside the cache's stream), loads, and waits again. The blob is staged in host
/// memory about as large as the pages it holds.
///
/// Errors: `KIVI_ERR_CORRUPT_STATE`, `KIVI_ERR_STATE_MISMATCH` (other settings, more sequences
/// than `max_seqs`, more pages than the pool holds, or a sequence longer than
/// `max_seq_tokens`; the message names the values); on any error the cache is unchanged.
/// Thread safety: changes the cache; concurrent calls on the same cache are serialized by kivi.
///
/// # Safety
/// `cache` is a live handle; `buf` points to `buf_size` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn kivi_state_load(cache: *mut kivi_cache, buf: *const u8, buf_size: usize) -> kivi_status {
    ffi_fn!("kivi_state_load", {
        let b = buffer(buf, buf_size)?;
        match &mut *write_cache(cache)? {
            Backend::Cpu(c) => c.load_state(b)?,
            Backend::Cuda(g) => g.cache.load_state(b)?,
        }
        Ok(())
    })
}

/// The bytes `kivi_seq_state_save()` needs for sequence `seq` as it is now.
///
/// - `cache`, `out_size`: not NULL; `*out_size` written only on success.
///
/// CUDA cache: found on the host; no device work, no waiting.
///
/// Errors: `KIVI_ERR_UNKNOWN_SEQUENCE`.
/// Thread safety: reads the cache; runs alongside other reading calls.
///
/// # Safety
/// `cache` is a live handle; `out_size` is writable.
#[no_mangle]
pub unsafe extern "C" fn kivi_seq_state_size(cache: *const kivi_cache, seq: u32, out_size: *mut usize) -> kivi_status {
    ffi_fn!("kivi_seq_state_size", {
        let c = read_cache(cache)?;
        check_out(out_size, "out_size")?;
        *out_size = c.seq_state_size(seq)?;
        Ok(())
    })
}

/// Saves one sequence (all layers) into `buf`, e.g. to park a conversation and resume it later
/// or in another cache.
///
/// - `cache`: not NULL. `buf`: not NULL, `buf_size` bytes, at least `kivi_seq_state_size()`;
///   written only on success. `out_written`: not NULL.
///
/// CUDA cache: copies the sequence to host memory on the cache's stream and waits for the
/// stream, as `kivi_state_save()`.
///
/// Errors: `KIVI_ERR_UNKNOWN_SEQUENCE`, `KIVI_ERR_BUFFER_TOO_SMALL`.
/// Thread safety: reads the cache; runs alongside other reading calls.
///
/// # Safety
/// `cache` is a live handle; `buf` points to `buf_size` writable bytes; `out_written` is writable.
#[no_mangle]
pub unsafe extern "C" fn kivi_seq_state_save(
    cache: *const kivi_cache,
    seq: u32,
    buf: *mut u8,
    buf_size: usize,
    out_written: *mut usize,
) -> kivi_status {
    ffi_fn!("kivi_seq_state_save", {
        let c = read_cache(cache)?;
        check_out(out_written, "out_written")?;
        let b = buffer_mut(buf, buf_size, c.seq_state_size(seq)?)?;
        *out_written = match &*c {
            Backend::Cpu(c) => c.save_seq_state(seq, b)?,
            Backend::Cuda(g) => put(&g.cache.save_seq_state_vec(seq, g.stream())?, b)?,
        };
        Ok(())
    })
}

/// Loads a sequence saved by `kivi_seq_state_save()` (from a cache with the same dimensions and
/// quantization settings, on either backend; capacity and `page_tokens` may differ) as sequence
/// `seq`, replacing what `seq` held or creating it.
///
/// - `cache`: not NULL. `buf`: not NULL, `buf_size` bytes, read during the call only.
///
/// CUDA cache: waits for the device before and after, as `kivi_state_load()`.
///
/// Errors: `KIVI_ERR_CORRUPT_STATE`, `KIVI_ERR_STATE_MISMATCH` (other settings, or a sequence
/// longer than `max_seq_tokens`), `KIVI_ERR_CAPACITY_EXHAUSTED`, `KIVI_ERR_TOO_MANY_SEQUENCES`;
/// on any error the cache is unchanged.
/// Thread safety: changes the cache; concurrent calls on the same cache are serialized by kivi.
///
/// # Safety
/// `cache` is a live handle; `buf` points to `buf_size` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn kivi_seq_state_load(
    cache: *mut kivi_cache,
    seq: u32,
    buf: *const u8,
    buf_size: usize,
) -> kivi_status {
    ffi_fn!("kivi_seq_state_load", {
        let b = buffer(buf, buf_size)?;
        match &mut *write_cache(cache)? {
            Backend::Cpu(c) => c.load_seq_state(seq, b)?,
            Backend::Cuda(g) => g.cache.load_seq_state(seq, b)?,
        }
        Ok(())
    })
}
