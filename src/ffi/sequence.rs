//! Sequence operations: lengths, ids, remove, keep, truncate (rollback), copy (fork).
//!
//! A sequence is created by its first append and identified by a `uint32_t` the engine chooses.
//!
//! On a CUDA cache, lengths, ids, remove and keep touch only the host's bookkeeping; truncate and
//! copy also queue device work on the cache's stream (and return without waiting for it).

use super::types::kivi_cache;
use super::types::kivi_status::{self, *};
use super::{check_out, ffi_fn, read_cache, write_cache, Failure};

/// The number of tokens `seq` holds: the most any layer holds (layers differ only while a
/// forward pass is part-way through its layers).
///
/// - `cache`: not NULL. `out_len`: not NULL; written only on success.
///
/// Errors: `KIVI_ERR_UNKNOWN_SEQUENCE` if the cache does not hold `seq`.
/// Thread safety: reads the cache; runs alongside other reading calls.
///
/// # Safety
/// `cache` is a live handle; `out_len` is writable.
#[no_mangle]
pub unsafe extern "C" fn kivi_seq_len(cache: *const kivi_cache, seq: u32, out_len: *mut u32) -> kivi_status {
    ffi_fn!("kivi_seq_len", {
        let c = read_cache(cache)?;
        check_out(out_len, "out_len")?;
        *out_len = c.seq_len(seq)?;
        Ok(())
    })
}

/// The number of tokens `seq` holds in `layer`.
///
/// - `cache`: not NULL. `out_len`: not NULL; written only on success.
///
/// Errors: `KIVI_ERR_UNKNOWN_SEQUENCE`, `KIVI_ERR_LAYER_OUT_OF_RANGE`.
/// Thread safety: reads the cache; runs alongside other reading calls.
///
/// # Safety
/// `cache` is a live handle; `out_len` is writable.
#[no_mangle]
pub unsafe extern "C" fn kivi_seq_layer_len(
    cache: *const kivi_cache,
    seq: u32,
    layer: u32,
    out_len: *mut u32,
) -> kivi_status {
    ffi_fn!("kivi_seq_layer_len", {
        let c = read_cache(cache)?;
        check_out(out_len, "out_len")?;
        *out_len = c.seq_layer_len(seq, layer)?;
        Ok(())
    })
}

/// The ids of the sequences the cache holds, in slot order.
///
/// - `cache`: not NULL. `out_n`: not NULL; receives the number of sequences.
/// - `ids`: caller-owned array with room for `capacity` ids, or NULL with `capacity` 0 to ask
///   for the count alone.
///
/// Errors: `KIVI_ERR_BUFFER_TOO_SMALL` when `capacity` is smaller than the count. Like every
/// output, `*out_n` and `ids` are written only on success.
/// Thread safety: reads the cache; runs alongside other reading calls.
///
/// # Safety
/// `cache` is a live handle; `ids` (if not NULL) has room for `capacity` ids; `out_n` is writable.
#[no_mangle]
pub unsafe extern "C" fn kivi_seq_ids(
    cache: *const kivi_cache,
    ids: *mut u32,
    capacity: usize,
    out_n: *mut usize,
) -> kivi_status {
    ffi_fn!("kivi_seq_ids", {
        let c = read_cache(cache)?;
        check_out(out_n, "out_n")?;
        let all = c.seq_ids();
        if ids.is_null() {
            if capacity != 0 {
                return Err(Failure::new(KIVI_ERR_NULL_POINTER, format!("ids is NULL but capacity is {capacity}")));
            }
        } else if all.len() > capacity {
            return Err(Failure::new(
                KIVI_ERR_BUFFER_TOO_SMALL,
                format!("the cache holds {} sequences, room for {capacity} given", all.len()),
            ));
        } else {
            std::ptr::copy_nonoverlapping(all.as_ptr(), ids, all.len());
        }
        *out_n = all.len();
        Ok(())
    })
}

/// Removes `seq`, releasing its pages and its slot.
///
/// - `cache`: not NULL.
///
/// Errors: `KIVI_ERR_UNKNOWN_SEQUENCE` (cache unchanged).
/// Thread safety: changes the cache; concurrent calls on the same cache are serialized by kivi.
///
/// # Safety
/// `cache` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn kivi_seq_remove(cache: *mut kivi_cache, seq: u32) -> kivi_status {
    ffi_fn!("kivi_seq_remove", {
        write_cache(cache)?.seq_remove(seq)?;
        Ok(())
    })
}

/// Removes every sequence but `seq`.
///
/// - `cache`: not NULL.
///
/// Errors: `KIVI_ERR_UNKNOWN_SEQUENCE` (cache unchanged).
/// Thread safety: changes the cache; concurrent calls on the same cache are serialized by kivi.
///
/// # Safety
/// `cache` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn kivi_seq_keep(cache: *mut kivi_cache, seq: u32) -> kivi_status {
    ffi_fn!("kivi_seq_keep", {
        write_cache(cache)?.seq_keep(seq)?;
        Ok(())
    })
}

/// Keeps only the first `n_tokens` tokens of `seq` in every layer (layers holding fewer are left
/// alone): a rollback, e.g. of rejected speculative tokens.
///
/// Precision: tokens that had been quantized stay quantized. If the cut falls inside a quantized
/// key group, that group's kept tokens go back to the full-precision window holding their
/// dequantized values, and are quantized again with the tokens that follow them.
///
/// CUDA cache: a cut inside a quantized group queues that group's dequantization on the
/// cache's stream; the call does not wait for it.
///
/// - `cache`: not NULL.
///
/// Errors: `KIVI_ERR_UNKNOWN_SEQUENCE` (cache unchanged).
/// Thread safety: changes the cache; concurrent calls on the same cache are serialized by kivi.
///
/// # Safety
/// `cache` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn kivi_seq_truncate(cache: *mut kivi_cache, seq: u32, n_tokens: u32) -> kivi_status {
    ffi_fn!("kivi_seq_truncate", {
        write_cache(cache)?.seq_truncate(seq, n_tokens)?;
        Ok(())
    })
}

/// Makes `dst` a copy of the first `n_tokens` tokens of `src` (all of `src` if it holds fewer;
/// pass `UINT32_MAX` for all), replacing whatever `dst` held: a fork, e.g. for beam search or
/// parallel sampling from one prompt. Quantized pages are shared until one side changes them
/// (copy-on-write), so forking a long prompt costs only the full-precision windows.
///
/// - `cache`: not NULL. `src` must exist; `src != dst`; `dst` takes a free slot if new.
///
/// CUDA cache: the windows and block tables are copied on the device, queued on the cache's
/// stream; the call does not wait for them.
///
/// Errors: `KIVI_ERR_UNKNOWN_SEQUENCE`, `KIVI_ERR_INVALID_ARGUMENT` (`src == dst`),
/// `KIVI_ERR_TOO_MANY_SEQUENCES` (cache unchanged).
/// Thread safety: changes the cache; concurrent calls on the same cache are serialized by kivi.
///
/// # Safety
/// `cache` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn kivi_seq_copy(cache: *mut kivi_cache, src: u32, dst: u32, n_tokens: u32) -> kivi_status {
    ffi_fn!("kivi_seq_copy", {
        write_cache(cache)?.seq_copy(src, dst, n_tokens)?;
        Ok(())
    })
}
