//! The C ABI's types: the status enum, the element types, the structs engines fill in, and the
//! opaque cache handle.
//!
//! Rules that hold for every struct here: its first field is `struct_size`, the size of the struct
//! as the caller compiled it, so fields can be added at the end without breaking old callers.
//! Fields that C fills in and Rust reads are plain integers (never Rust enums), so any bit pattern
//! a caller writes is checked rather than trusted.

#![allow(non_camel_case_types)]

use super::handle::Backend;
use std::ffi::c_char;
use std::sync::RwLock;

/// The result of every fallible kivi call. The numbers are part of the ABI and never change; new
/// statuses get new numbers. `KIVI_OK` is 0; everything else is an error, and
/// `kivi_last_error_message()` then holds a sentence naming the offending value.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kivi_status {
    /// Success.
    KIVI_OK = 0,
    /// A pointer argument that must not be NULL was NULL.
    KIVI_ERR_NULL_POINTER = 1,
    /// A field of `kivi_params` is out of range or inconsistent with another one.
    KIVI_ERR_INVALID_CONFIG = 2,
    /// An argument out of range: a bad dtype or flag, an attention scale of 0, a sequence twice in
    /// one decode batch, an output that overlaps an input, ...
    KIVI_ERR_INVALID_ARGUMENT = 3,
    /// Rows, row lengths or strides that do not match what the cache expects (including zero or
    /// oversized dimensions).
    KIVI_ERR_SHAPE = 4,
    /// A NaN or infinity in an input, or a key or value beyond the f16 range.
    KIVI_ERR_NON_FINITE = 5,
    /// A layer index at or past the number of layers.
    KIVI_ERR_LAYER_OUT_OF_RANGE = 6,
    /// A sequence id that the cache does not hold.
    KIVI_ERR_UNKNOWN_SEQUENCE = 7,
    /// A layer's page pool has no room for the tokens being added (`max_tokens`).
    KIVI_ERR_CAPACITY_EXHAUSTED = 8,
    /// Every sequence slot is taken (`max_seqs`).
    KIVI_ERR_TOO_MANY_SEQUENCES = 9,
    /// A caller buffer smaller than what the call writes.
    KIVI_ERR_BUFFER_TOO_SMALL = 10,
    /// A state blob that is truncated, damaged or not a kivi state.
    KIVI_ERR_CORRUPT_STATE = 11,
    /// A state blob written by a cache of other dimensions or settings.
    KIVI_ERR_STATE_MISMATCH = 12,
    /// A struct whose `struct_size` (or size argument) is not one this library knows.
    KIVI_ERR_STRUCT_SIZE = 13,
    /// The device asked for (e.g. a GPU) is not available in this build or on this machine.
    KIVI_ERR_BACKEND_UNAVAILABLE = 14,
    /// A sequence would grow past `max_seq_tokens` (the pool may still have room for others).
    KIVI_ERR_SEQUENCE_FULL = 15,
    /// A bug inside kivi (a Rust panic, caught at the boundary). A cache that was being changed
    /// when it happened refuses every later call with this status; free it.
    KIVI_ERR_INTERNAL = 99,
}

/// Element type of keys, values, queries and outputs (and of the cache's full-precision windows).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kivi_dtype {
    /// IEEE binary32 (`float`).
    KIVI_DTYPE_F32 = 0,
    /// IEEE binary16 (`_Float16`, `__fp16`, `uint16_t` bits).
    KIVI_DTYPE_F16 = 1,
    /// bfloat16 (`uint16_t` bits: the top half of a `float`).
    KIVI_DTYPE_BF16 = 2,
}

/// How keys are grouped for quantization.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kivi_key_mode {
    /// KIVI: a key group is `group_size` consecutive tokens of one channel (the default).
    KIVI_KEY_PER_CHANNEL = 0,
    /// The paper's baseline: keys grouped like values, `value_group` channels of one token.
    KIVI_KEY_PER_TOKEN = 1,
}

/// How the scale and zero of a group are chosen (`kivi_params.value_rounding`). The stored format
/// is the same either way.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kivi_rounding {
    /// The paper's: the grid spans the group's minimum to its maximum.
    KIVI_ROUNDING_MIN_MAX = 0,
    /// Of the min/max grid and four narrower ones (each refitted by least squares), the one with
    /// the smallest squared error over the group (the default for values).
    KIVI_ROUNDING_LEAST_SQUARES = 1,
}

/// The CPU: the value of `kivi_params.device` that every build supports. (The header defines it as
/// a parenthesized macro, written by `build/header.rs`, since cbindgen would write a bare `-1`.)
pub const KIVI_DEVICE_CPU: i32 = -1;

/// `kivi_attn_options.flags` bit: every query sees every key of its sequence (encoders, and
/// prefix-LM prompts). Without it attention is causal.
pub const KIVI_ATTN_NON_CAUSAL: u32 = 1;

/// What a cache is: the model's shape, the quantization settings and the capacity. Fill it with
/// `kivi_params_init()`, change the fields you need, and pass it to `kivi_cache_create()`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kivi_params {
    /// `sizeof(kivi_params)` as the caller compiled it; `kivi_params_init()` sets it.
    pub struct_size: u32,
    /// Transformer layers the cache holds. Default: 1.
    pub n_layers: u32,
    /// Key/value heads per layer; query heads may be any multiple of it (GQA/MQA). Default: 1.
    pub n_kv_heads: u32,
    /// Channels per head: a multiple of 8 and of `value_group`, at most 1024. Default: 128.
    pub head_dim: u32,
    /// A `kivi_dtype`: how the full-precision windows (recent tokens and sinks) are stored. Inputs
    /// and outputs may be of any dtype whatever this is. Default: `KIVI_DTYPE_F32`.
    pub dtype: i32,
    /// Bits per key code: 2, 4 or 8. Default: 2.
    pub key_bits: u32,
    /// Bits per value code: 2, 4 or 8. Default: 2.
    pub value_bits: u32,
    /// A `kivi_key_mode`. Default: `KIVI_KEY_PER_CHANNEL`.
    pub key_mode: i32,
    /// G, tokens per key group: a multiple of 8 up to 256. Tokens leave the full-precision window
    /// G at a time. Default: 32.
    pub group_size: u32,
    /// Channels per value group; divides `head_dim`. Default: 32.
    pub value_group: u32,
    /// R, the most recent tokens kept at full precision: a multiple of G, 0 allowed. Default: 128.
    pub residual: u32,
    /// The first tokens of every sequence kept at full precision for ever (attention sinks).
    /// Default: 1 (the first token, BOS in most models, on which attention sinks put much of the
    /// weight); 0 is the paper's method.
    pub sinks: u32,
    /// Quantized tokens the cache can hold per layer, over all sequences; all memory is taken at
    /// creation. Default: 4096.
    pub max_tokens: u32,
    /// Sequences alive at once. Default: 1.
    pub max_seqs: u32,
    /// Tokens per page: 0 (one group per page) or a multiple of G up to 65536. Default: 0.
    /// On a CPU cache 256 decodes about 1.2 to 1.35 times faster from a few thousand tokens on
    /// (each KV head's groups are then contiguous in memory), for one spare page per sequence in
    /// each layer's pool (`max_seqs` x 256 tokens); CPU engines should set it. A CUDA cache is
    /// tuned for one group per page (a group is staged in one copy). A saved state loads only
    /// into a cache with the same page size.
    pub page_tokens: u32,
    /// Threads one attention or append call may use (appends spread the quantization of flushed
    /// groups over KV heads); 1 = only the calling thread. A CUDA cache needs 1.
    /// Default: 1.
    pub n_threads: u32,
    /// Where the cache lives: `KIVI_DEVICE_CPU` (-1), or the ordinal (0, 1, ...) of a CUDA
    /// device, whose cache lives in device memory and takes device pointers in `kivi_rows` (see
    /// `kivi_cuda_device_info()` and `kivi_cache_set_stream()`). A CUDA device that is missing or
    /// unusable (no driver, no NVRTC, too old) gives `KIVI_ERR_BACKEND_UNAVAILABLE`; a CUDA
    /// cache needs `n_threads` 1. Default: -1.
    pub device: i32,
    /// A `kivi_rounding`: how value groups choose their scale and zero. On a real model least
    /// squares took KIVI-2's extra perplexity from 9.1% to 5.5% (README); `KIVI_ROUNDING_MIN_MAX`
    /// is the paper's rounding. Keys always take min/max. It does not change the stored format,
    /// and a saved state loads whatever it is. Default: `KIVI_ROUNDING_LEAST_SQUARES`.
    pub value_rounding: i32,
    /// Tokens one sequence may hold (the model's context length), or 0 for no limit but the
    /// pool (`max_tokens`). An append or decode step that would take a sequence past it fails
    /// with `KIVI_ERR_SEQUENCE_FULL`. Each sequence's page list in each layer is sized for this
    /// many tokens at creation (in device memory too for a CUDA cache): 4 bytes per page, so
    /// `max_seqs` x `n_layers` x 4 x (`max_seq_tokens`, or `max_tokens` when 0) / page tokens
    /// bytes. An engine serving many sequences from a large pool should set it. Default: 0.
    pub max_seq_tokens: u32,
}

/// Options of one attention call. Zero in a field means its default, so
/// `kivi_attn_options o = {0}; o.struct_size = sizeof o;` asks for plain causal attention; a NULL
/// options pointer means the same.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct kivi_attn_options {
    /// `sizeof(kivi_attn_options)` as the caller compiled it.
    pub struct_size: u32,
    /// Multiplies `q . k`; 0 means `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// `KIVI_ATTN_*` bits; 0: causal.
    pub flags: u32,
    /// If non-zero, a query at position p sees only keys at positions p-W+1 ..= p (Mistral,
    /// Gemma local layers).
    pub sliding_window: u32,
    /// If non-zero, logits become `softcap * tanh(logit / softcap)` (Gemma 2).
    pub softcap: f32,
}

/// Read-only rows (tokens) of keys, values or queries: row t starts at element `t * stride` of
/// `data` and holds `row_len` elements of type `dtype`, heads one after another (head h at
/// elements `h * head_dim ..`). The caller keeps ownership.
///
/// CPU cache: `data` is host memory, read during the call only. CUDA cache (`device` >= 0):
/// `data` is a device pointer (e.g. from `cudaMalloc`, or an offset into a fused QKV tensor) on
/// the cache's device, never read by the host; the device reads it when the cache's stream
/// reaches the call's work, so it must stay valid (not freed, not overwritten) until then.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kivi_rows {
    /// Element 0 of row 0; aligned for `dtype`. Never NULL. A device pointer for a CUDA cache.
    pub data: *const std::ffi::c_void,
    /// A `kivi_dtype`. A CUDA cache takes only its own dtype (`kivi_params.dtype`); a CPU cache
    /// takes any.
    pub dtype: i32,
    /// Rows (tokens); at least 1.
    pub n_rows: u32,
    /// Elements per row: `n_kv_heads * head_dim` for keys and values, `n_q_heads * head_dim` for
    /// queries.
    pub row_len: u32,
    /// Elements (not bytes) from the start of one row to the start of the next; 0 means `row_len`
    /// (packed rows).
    pub stride: usize,
}

/// Writable rows (attention outputs), laid out as `kivi_rows`. kivi writes the `row_len`
/// elements of each row and nothing else (not the gaps between strided rows), and only when the
/// call succeeds. Its span (from the first element of the first row to the last element of the
/// last row) must not overlap the span of any input of the same call (`KIVI_ERR_INVALID_ARGUMENT`).
///
/// CUDA cache: `data` is a device pointer, written by the device when the cache's stream reaches
/// the call's work (not by the time the call returns); read it on that stream or after it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kivi_rows_mut {
    /// Element 0 of row 0; aligned for `dtype`. Never NULL. A device pointer for a CUDA cache.
    pub data: *mut std::ffi::c_void,
    /// A `kivi_dtype`; the same as the inputs of the call.
    pub dtype: i32,
    /// Rows; the same as the queries.
    pub n_rows: u32,
    /// Elements per row; the same as the queries.
    pub row_len: u32,
    /// Elements from the start of one row to the start of the next; 0 means `row_len`.
    pub stride: usize,
}

/// Where a cache's bytes go, counted over all layers and sequences. Filled by
/// `kivi_cache_stats()`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct kivi_memory_stats {
    /// `sizeof(kivi_memory_stats)` as the caller compiled it (kivi sets it).
    pub struct_size: u32,
    /// Sequences held.
    pub sequences: u32,
    /// Tokens held, summed over sequences and layers.
    pub tokens: u64,
    /// Of those, tokens held as quantized codes (the rest are at full precision).
    pub quantized_tokens: u64,
    /// Bytes of codes in the pages in use (a page shared by forked sequences counts once).
    pub code_bytes: u64,
    /// Bytes of f16 scales and zeros in the pages in use.
    pub scale_bytes: u64,
    /// Bytes of full-precision tokens held (windows and sinks), in the cache's dtype.
    pub window_bytes: u64,
    /// `code_bytes + scale_bytes + window_bytes`.
    pub used_bytes: u64,
    /// Bytes an f16 cache of the same tokens would take (keys and values).
    pub f16_bytes: u64,
    /// Pages in use, over all layers.
    pub pages_used: u64,
    /// Pages in all, over all layers.
    pub pages_total: u64,
    /// Everything taken at creation (page pools and window slots, padding included).
    pub reserved_bytes: u64,
    /// The page tables, also taken at creation (not in `reserved_bytes`): a block table per
    /// (sequence, layer) with room for `max_seq_tokens` (or the whole pool when 0), and each
    /// layer's page reference counts, in host memory. A CUDA cache holds the block tables in
    /// device memory too.
    pub table_bytes: u64,
}

/// What a cache of some parameters will take, known before it is made. Filled by
/// `kivi_params_memory()`; `reserved_bytes`, `table_bytes` and `pages_total` are what
/// `kivi_cache_stats()` then reports.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct kivi_memory_plan {
    /// `sizeof(kivi_memory_plan)` as the caller compiled it (kivi sets it).
    pub struct_size: u32,
    /// The device the cache would live on: `params->device`.
    pub device: i32,
    /// What the cache takes of that device's memory, all at creation: host memory for a CPU
    /// cache (`reserved_bytes + table_bytes`); for a CUDA cache its one device allocation (pages,
    /// windows and block tables, each 256-byte aligned, and a 32 MiB scratch area for
    /// attention with 64 KiB of counters), its host memory then being `table_bytes`.
    /// `kivi_params_fit_tokens()` fits this to a budget.
    pub bytes: u64,
    /// Page pools and full-precision window slots, padding included.
    pub reserved_bytes: u64,
    /// The page tables: block tables and each layer's page reference counts.
    pub table_bytes: u64,
    /// Pages over all layers.
    pub pages_total: u64,
}

/// What `kivi_cuda_device_info()` found: a CUDA device and the libraries kivi runs it with.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kivi_device_info {
    /// `sizeof(kivi_device_info)` as the caller compiled it (kivi sets it).
    pub struct_size: u32,
    /// The device described: the ordinal asked for, the `kivi_params.device` that creates a cache
    /// on it.
    pub device: i32,
    /// CUDA devices this process sees (after `CUDA_VISIBLE_DEVICES`).
    pub n_devices: u32,
    /// Compute capability, major (e.g. 9 for sm_90); kivi needs 7.0 or newer.
    pub compute_capability_major: u32,
    /// Compute capability, minor.
    pub compute_capability_minor: u32,
    /// Streaming multiprocessors.
    pub n_multiprocessors: u32,
    /// Device memory, in bytes.
    pub total_memory: u64,
    /// The newest CUDA version the driver supports, as `cuDriverGetVersion()` gives it:
    /// 1000 * major + 10 * minor (13000 for CUDA 13.0).
    pub driver_version: u32,
    /// Major version of NVRTC, which compiles kivi's kernels for the device at run time.
    pub nvrtc_version_major: u32,
    /// Minor version of NVRTC.
    pub nvrtc_version_minor: u32,
    /// The device's name, NUL-terminated (cut at 255 bytes).
    pub name: [c_char; 256],
}

/// A KIVI cache for every layer of one model, on the CPU or on a CUDA device: opaque; create it
/// with `kivi_cache_create()` and free it with `kivi_cache_free()`.
pub struct kivi_cache {
    pub(crate) inner: RwLock<Backend>,
}
