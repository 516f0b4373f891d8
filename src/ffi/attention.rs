//! Appends and attention: append, append-and-attend for a chunk, attend, batched decode.
//!
//! Shapes, for a cache of `n_kv_heads` heads of `head_dim` channels: keys and values are rows
//! (one per token) of `n_kv_heads * head_dim` elements; queries and outputs are rows of
//! `n_q_heads * head_dim` elements, where `n_q_heads` is any multiple of `n_kv_heads` (query
//! head h uses KV head `h / (n_q_heads / n_kv_heads)`, as in GQA/MQA). Keys carry their rotary
//! embedding already. All tensors of one call share one dtype.
//!
//! For a CUDA cache the rows are device pointers, checked here as for the CPU (dtype, NULL,
//! alignment, overlap) and by the cache (shapes), then handed over as [`DevRows`]; the work is
//! queued on the handle's stream.

use super::handle::{Backend, Gpu};
use super::types::kivi_status::{self, *};
use super::types::{kivi_attn_options, kivi_cache, kivi_rows, kivi_rows_mut, KIVI_ATTN_NON_CAUSAL};
use super::{ffi_fn, nonnull, read_cache, read_versioned, write_cache, Failure, FfiResult};
use crate::attention::AttnOptions;
use crate::config::DType;
use crate::cuda::DevRows;
use crate::rows::{Element, Rows, RowsMut};
use half::{bf16, f16};
use std::ops::Range;

/// A `kivi_rows` or `kivi_rows_mut`, checked: its dtype and the elements it spans.
struct Span {
    dtype: DType,
    rows: usize,
    row_len: usize,
    stride: usize,
    elems: usize,
    bytes: Range<usize>,
}

fn span(data: usize, dtype: i32, n_rows: u32, row_len: u32, stride: usize, what: &str) -> FfiResult<Span> {
    let shape = |m: String| Failure::new(KIVI_ERR_SHAPE, format!("{what}: {m}"));
    if data == 0 {
        return Err(Failure::new(KIVI_ERR_NULL_POINTER, format!("{what}.data is NULL")));
    }
    let dtype = u32::try_from(dtype).ok().and_then(DType::from_u32).ok_or_else(|| {
        Failure::new(
            KIVI_ERR_INVALID_ARGUMENT,
            format!("{what}.dtype {dtype} is not a kivi_dtype (0 f32, 1 f16, 2 bf16)"),
        )
    })?;
    let (rows, row_len) = (n_rows as usize, row_len as usize);
    if rows == 0 || row_len == 0 {
        return Err(shape(format!("{rows} rows of {row_len} elements: both must be at least 1")));
    }
    let stride = if stride == 0 { row_len } else { stride };
    if stride < row_len {
        return Err(shape(format!("stride {stride} is shorter than the row length {row_len}")));
    }
    let size = dtype.size();
    let too_big = || shape(format!("{rows} rows {stride} elements apart do not fit in the address space"));
    let elems = (rows - 1).checked_mul(stride).and_then(|e| e.checked_add(row_len)).ok_or_else(too_big)?;
    let nbytes = elems.checked_mul(size).filter(|&b| b <= isize::MAX as usize).ok_or_else(too_big)?;
    let end = data.checked_add(nbytes).ok_or_else(too_big)?;
    if data % size != 0 {
        return Err(Failure::new(
            KIVI_ERR_INVALID_ARGUMENT,
            format!("{what}.data {data:#x} is not aligned to its element size {size}"),
        ));
    }
    Ok(Span { dtype, rows, row_len, stride, elems, bytes: data..end })
}

fn span_of(r: &kivi_rows, what: &str) -> FfiResult<Span> {
    span(r.data as usize, r.dtype, r.n_rows, r.row_len, r.stride, what)
}

fn span_of_mut(r: &kivi_rows_mut, what: &str) -> FfiResult<Span> {
    span(r.data as usize, r.dtype, r.n_rows, r.row_len, r.stride, what)
}

/// Fails unless every span has the first one's dtype and the output overlaps none of the inputs.
fn check_together(inputs: &[(&Span, &str)], out: Option<&Span>) -> FfiResult<DType> {
    let (first, first_name) = inputs[0];
    for (s, name) in inputs.iter().chain(out.map(|o| (o, "out")).as_ref()) {
        if s.dtype != first.dtype {
            return Err(Failure::new(
                KIVI_ERR_INVALID_ARGUMENT,
                format!("{name}.dtype {:?} differs from {first_name}.dtype {:?}", s.dtype, first.dtype),
            ));
        }
    }
    if let Some(o) = out {
        for (s, name) in inputs {
            if s.bytes.start < o.bytes.end && o.bytes.start < s.bytes.end {
                return Err(Failure::new(
                    KIVI_ERR_INVALID_ARGUMENT,
                    format!("out overlaps {name}: outputs must not share memory with inputs"),
                ));
            }
        }
    }
    Ok(first.dtype)
}

/// # Safety
/// The span comes from a `kivi_rows` whose memory the caller promises readable for the call.
unsafe fn rows<'a, T: Element>(s: &Span) -> FfiResult<Rows<'a, T>> {
    let data = std::slice::from_raw_parts(s.bytes.start as *const T, s.elems);
    Ok(Rows::strided(data, s.rows, s.row_len, s.stride)?)
}

/// # Safety
/// As [`rows`], writable, and overlapping no other span of the call.
unsafe fn rows_mut<'a, T: Element>(s: &Span) -> FfiResult<RowsMut<'a, T>> {
    let data = std::slice::from_raw_parts_mut(s.bytes.start as *mut T, s.elems);
    Ok(RowsMut::strided(data, s.rows, s.row_len, s.stride)?)
}

/// The span as device rows (a CUDA cache's inputs and outputs).
fn dev_rows(s: &Span) -> DevRows {
    DevRows::strided(s.bytes.start as u64, s.rows, s.row_len, s.stride)
}

/// Fails unless the rows (all of one dtype, `dt`) are in the CUDA cache's own dtype: its kernels
/// read and write that type only, where the CPU converts.
fn cuda_dtype(dt: DType, g: &Gpu) -> FfiResult {
    let own = g.cache.config().dtype;
    if dt != own {
        return Err(Failure::new(
            KIVI_ERR_INVALID_ARGUMENT,
            format!(
                "the rows are {dt:?} but the cache is {own:?} (kivi_params.dtype): a CUDA cache takes keys, values, \
                 queries and outputs in its own dtype only"
            ),
        ));
    }
    Ok(())
}

/// Runs `$body` with `$T` bound to the Rust element type of `$dt`.
macro_rules! with_elem {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
        }
    };
}

/// Options from a possibly-NULL pointer.
unsafe fn options(p: *const kivi_attn_options) -> FfiResult<AttnOptions> {
    if p.is_null() {
        return Ok(AttnOptions::default());
    }
    let o = read_versioned(p, "opts")?;
    if o.flags & !KIVI_ATTN_NON_CAUSAL != 0 {
        return Err(Failure::new(
            KIVI_ERR_INVALID_ARGUMENT,
            format!("opts.flags {:#x} has bits this library does not know", o.flags),
        ));
    }
    Ok(AttnOptions {
        scale: if o.scale == 0.0 { None } else { Some(o.scale) },
        causal: o.flags & KIVI_ATTN_NON_CAUSAL == 0,
        sliding_window: o.sliding_window,
        softcap: o.softcap,
    })
}

/// Appends `keys->n_rows` tokens' keys and values to sequence `seq` of `layer`, creating the sequence if the
/// cache does not hold it yet (it then takes a free slot). Use it when the engine computes the
/// attention itself (e.g. a prefill with full-precision flash attention, as in the KIVI paper).
///
/// - `cache`: not NULL.
/// - `layer`: `0 .. n_layers`. `seq`: any id the engine chooses.
/// - `keys`, `values`: not NULL, nor their `data`; `n_rows` tokens of `n_kv_heads * head_dim`
///   elements each, the same `n_rows` and dtype; read during the call only (CPU cache). Values
///   must be finite and within the f16 range.
///
/// CUDA cache: `keys->data` and `values->data` are device pointers in the cache's dtype, with
/// the same stride; the work is queued on the cache's stream and the call returns without
/// waiting for it, so the rows must stay valid until the stream reaches it. The values are not
/// checked for NaN or range there (the host never reads them).
///
/// Errors: `KIVI_ERR_LAYER_OUT_OF_RANGE`, `KIVI_ERR_SHAPE`, `KIVI_ERR_NON_FINITE`,
/// `KIVI_ERR_CAPACITY_EXHAUSTED` (the layer's pool is full), `KIVI_ERR_SEQUENCE_FULL` (the
/// sequence would pass `max_seq_tokens`), `KIVI_ERR_TOO_MANY_SEQUENCES`,
/// `KIVI_ERR_INVALID_ARGUMENT` (a CUDA cache given rows of another dtype), ... On any error the
/// cache is unchanged.
///
/// Thread safety: changes the cache; concurrent calls on the same cache are serialized by kivi.
///
/// # Safety
/// `cache` is a live handle; each `data` points to the memory its struct describes.
#[no_mangle]
pub unsafe extern "C" fn kivi_append(
    cache: *mut kivi_cache,
    layer: u32,
    seq: u32,
    keys: *const kivi_rows,
    values: *const kivi_rows,
) -> kivi_status {
    ffi_fn!("kivi_append", {
        let (k, v) = (span_of(nonnull(keys, "keys")?, "keys")?, span_of(nonnull(values, "values")?, "values")?);
        let dt = check_together(&[(&k, "keys"), (&v, "values")], None)?;
        match &mut *write_cache(cache)? {
            Backend::Cpu(c) => with_elem!(dt, T => c.append::<T>(layer, seq, rows(&k)?, rows(&v)?)?),
            Backend::Cuda(g) => {
                cuda_dtype(dt, g)?;
                g.cache.append(layer, seq, dev_rows(&k), dev_rows(&v), g.stream())?
            }
        }
        Ok(())
    })
}

/// Appends a chunk of `keys->n_rows` tokens' keys and values to `seq` in `layer` and computes attention for
/// the chunk's queries into `out`: what a prefill chunk (or a decode step of one sequence) does
/// in each layer. Query i sits at position `len + i` (`len` = tokens `seq` held in `layer`
/// before the call); it sees the chunk's own keys and values exactly (causally, unless
/// `KIVI_ATTN_NON_CAUSAL`) and everything stored earlier as the cache holds it (quantized or in
/// the full-precision window). Like flash-attn's `flash_attn_with_kvcache`.
///
/// - `cache`: not NULL. `layer`: `0 .. n_layers`. `seq`: created if new.
/// - `keys`, `values`: as `kivi_append()`.
/// - `queries`: not NULL; as many rows as `keys`, each `n_q_heads * head_dim` elements.
/// - `out`: not NULL; same shape and dtype as `queries` (its stride may differ); written only on
///   success; must not overlap any input.
/// - `opts`: NULL for defaults (causal, scale `1/sqrt(head_dim)`).
///
/// CUDA cache: every `data` is a device pointer, all in the cache's dtype, keys and values with
/// one stride; the attention and the append are queued on the cache's stream, the call returns
/// without waiting, and `out` is written when the stream gets there. Every option works as on
/// the CPU. Chunks of 8 rows or more of an f16 or bf16 cache attend to their own tokens and to
/// the quantized past on tensor cores, 64 query vectors per block, when the rows allow it: keys
/// and values 16-byte aligned with a stride of a multiple of 8 elements, queries 4-byte aligned
/// with an even stride (as cudaMalloc'd buffers and views of a fused QKV buffer at head
/// boundaries are); other rows take a slower path, with the same results. The attention of a
/// prompt with nothing quantized before it is one kernel launch when `out` is also 4-byte
/// aligned with an even stride. A chunk of fewer than 8 rows (draft tokens to verify, say) on
/// tensor cores is one kernel launch, appending included, as a `kivi_decode()` step, when its
/// tokens fit in the full-precision window's ring beside the tokens it holds (at most
/// `residual + group_size` tokens there after the append); a chunk that does not fit queues its
/// append after the attention.
///
/// Errors: as `kivi_append()`, plus `KIVI_ERR_INVALID_ARGUMENT` for bad options. On any error
/// the cache and `out` are unchanged.
///
/// Thread safety: changes the cache; concurrent calls on the same cache are serialized by kivi.
///
/// # Safety
/// `cache` is a live handle; each `data` points to the memory its struct describes.
#[no_mangle]
pub unsafe extern "C" fn kivi_append_attend(
    cache: *mut kivi_cache,
    layer: u32,
    seq: u32,
    keys: *const kivi_rows,
    values: *const kivi_rows,
    queries: *const kivi_rows,
    out: *const kivi_rows_mut,
    opts: *const kivi_attn_options,
) -> kivi_status {
    ffi_fn!("kivi_append_attend", {
        let k = span_of(nonnull(keys, "keys")?, "keys")?;
        let v = span_of(nonnull(values, "values")?, "values")?;
        let q = span_of(nonnull(queries, "queries")?, "queries")?;
        let o = span_of_mut(nonnull(out, "out")?, "out")?;
        let dt = check_together(&[(&k, "keys"), (&v, "values"), (&q, "queries")], Some(&o))?;
        let opts = options(opts)?;
        match &mut *write_cache(cache)? {
            Backend::Cpu(c) => with_elem!(dt, T => c.append_attend::<T>(
                layer, seq, rows(&k)?, rows(&v)?, rows(&q)?, rows_mut(&o)?, &opts)?),
            Backend::Cuda(g) => {
                cuda_dtype(dt, g)?;
                let (k, v, q, o) = (dev_rows(&k), dev_rows(&v), dev_rows(&q), dev_rows(&o));
                g.cache.append_attend(layer, seq, k, v, q, o, &opts, g.stream())?
            }
        }
        Ok(())
    })
}

/// Attention for queries of the last `queries->n_rows` tokens already stored in `seq` (appended
/// with `kivi_append()`), everything as the cache holds it. Changes nothing in the cache.
///
/// - `cache`: not NULL. `layer`: `0 .. n_layers`. `seq`: must exist and hold at least
///   `queries->n_rows` tokens in `layer`.
/// - `queries`, `out`, `opts`: as `kivi_append_attend()`.
///
/// CUDA cache: device pointers, queued on the cache's stream, as `kivi_append_attend()`.
///
/// Thread safety: reads the cache; any number of reading calls (`kivi_attend`, lengths, stats,
/// save) may run at once on one CPU cache, while calls that change it wait. On a CUDA cache
/// `kivi_attend` calls are serialized like changing calls (they share the cache's scratch
/// memory on the device).
///
/// # Safety
/// `cache` is a live handle; each `data` points to the memory its struct describes.
#[no_mangle]
pub unsafe extern "C" fn kivi_attend(
    cache: *const kivi_cache,
    layer: u32,
    seq: u32,
    queries: *const kivi_rows,
    out: *const kivi_rows_mut,
    opts: *const kivi_attn_options,
) -> kivi_status {
    ffi_fn!("kivi_attend", {
        let q = span_of(nonnull(queries, "queries")?, "queries")?;
        let o = span_of_mut(nonnull(out, "out")?, "out")?;
        let dt = check_together(&[(&q, "queries")], Some(&o))?;
        let opts = options(opts)?;
        let c = read_cache(cache)?;
        if let Backend::Cpu(c) = &*c {
            with_elem!(dt, T => c.attend::<T>(layer, seq, rows(&q)?, rows_mut(&o)?, &opts)?);
            return Ok(());
        }
        drop(c);
        // A CUDA cache: attention calls share the scratch area, so one at a time.
        if let Backend::Cuda(g) = &*write_cache(cache.cast_mut())? {
            cuda_dtype(dt, g)?;
            g.cache.attend(layer, seq, dev_rows(&q), dev_rows(&o), &opts, g.stream())?;
        }
        Ok(())
    })
}

/// One decode step of `n_seqs` sequences in one call, for one layer: row i of `keys`, `values`,
/// `queries` and `out` belongs to `seqs[i]`, which gets its token appended and the attention of
/// its query computed (as `kivi_append_attend()` with one token). New ids create sequences.
///
/// - `cache`: not NULL. `layer`: `0 .. n_layers`.
/// - `seqs`: not NULL; `n_seqs` distinct ids (at least 1); read during the call only.
/// - `keys`, `values`: `n_seqs` rows of `n_kv_heads * head_dim`.
/// - `queries`, `out`: `n_seqs` rows of `n_q_heads * head_dim`; `out` written only on success.
/// - `opts`: NULL for defaults.
///
/// CUDA cache: `seqs` is host memory (read during the call only); the rows are device pointers,
/// as for `kivi_append_attend()`. On tensor cores (sm_80 and later, the common layouts) a call
/// queues one kernel per 64 sequences, which attends, merges its splits, writes the new tokens
/// into the windows and quantizes the keys and values that leave a window into their page (a
/// new page's block-table entry too). Only a step whose leaving group goes into a page that a
/// fork (`kivi_seq_copy()`) still shares queues more: the page's copy and the quantization, after
/// the attention kernel. Otherwise a combine kernel, the quantization and the window writes
/// follow the attention kernel. All on the cache's stream; the call returns without waiting.
///
/// Errors: as `kivi_append_attend()`; `KIVI_ERR_INVALID_ARGUMENT` for a repeated id. Capacity
/// is checked for the whole batch first: on any error no sequence has changed.
///
/// Thread safety: changes the cache; concurrent calls on the same cache are serialized by kivi.
///
/// # Safety
/// `cache` is a live handle; `seqs` points to `n_seqs` ids; each `data` points to the memory its
/// struct describes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kivi_decode(
    cache: *mut kivi_cache,
    layer: u32,
    seqs: *const u32,
    n_seqs: u32,
    keys: *const kivi_rows,
    values: *const kivi_rows,
    queries: *const kivi_rows,
    out: *const kivi_rows_mut,
    opts: *const kivi_attn_options,
) -> kivi_status {
    ffi_fn!("kivi_decode", {
        if seqs.is_null() {
            return Err(Failure::new(KIVI_ERR_NULL_POINTER, "seqs is NULL"));
        }
        if n_seqs == 0 {
            return Err(Failure::new(KIVI_ERR_SHAPE, "n_seqs is 0: a decode step needs at least one sequence"));
        }
        let k = span_of(nonnull(keys, "keys")?, "keys")?;
        if k.rows != n_seqs as usize {
            return Err(Failure::new(KIVI_ERR_SHAPE, format!("{} rows of keys for {n_seqs} sequences", k.rows)));
        }
        let ids = std::slice::from_raw_parts(seqs, n_seqs as usize);
        let v = span_of(nonnull(values, "values")?, "values")?;
        let q = span_of(nonnull(queries, "queries")?, "queries")?;
        let o = span_of_mut(nonnull(out, "out")?, "out")?;
        let dt = check_together(&[(&k, "keys"), (&v, "values"), (&q, "queries")], Some(&o))?;
        let ids_bytes = seqs as usize..seqs as usize + 4 * ids.len();
        if ids_bytes.start < o.bytes.end && o.bytes.start < ids_bytes.end {
            return Err(Failure::new(
                KIVI_ERR_INVALID_ARGUMENT,
                "out overlaps seqs: outputs must not share memory with inputs",
            ));
        }
        let opts = options(opts)?;
        match &mut *write_cache(cache)? {
            Backend::Cpu(c) => with_elem!(dt, T => c.decode::<T>(
                layer, ids, rows(&k)?, rows(&v)?, rows(&q)?, rows_mut(&o)?, &opts)?),
            Backend::Cuda(g) => {
                cuda_dtype(dt, g)?;
                let (k, v, q, o) = (dev_rows(&k), dev_rows(&v), dev_rows(&q), dev_rows(&o));
                g.cache.decode(layer, ids, k, v, q, o, &opts, g.stream())?
            }
        }
        Ok(())
    })
}
