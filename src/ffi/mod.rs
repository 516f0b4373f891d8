//! The stable C ABI: a thin layer over the safe core, exported from `libkivi.so` / `libkivi.a` and
//! described by the generated header `include/kivi.h`.
//!
//! Every export goes through one boundary (`boundary`, via the `ffi_fn!` macro): it checks
//! pointers before use, turns a core [`Error`] into a `kivi_status` and a thread-local message,
//! and catches panics (a panic becomes `KIVI_ERR_INTERNAL`, never an unwind into C). Output
//! arguments are written only after everything else succeeded, and the core's own rule (a call
//! that fails changes nothing) carries over.
//!
//! One file per family of exports: [`cache`] (params, create, free, clear), [`attention`]
//! (append, attend, decode), [`sequence`] (remove, truncate, copy, lengths), [`state`] (save and
//! restore), [`stats`] (memory), [`device`] (CUDA devices and streams), [`error`] (status
//! strings, last error, version); [`types`] holds the C structs and enums, `handle` what a
//! handle holds (a cache of either backend).

// In the header's order (cbindgen follows the declarations; blank lines keep rustfmt from sorting).
pub mod types;

pub(crate) mod handle;

pub mod error;

pub mod cache;

pub mod attention;

pub mod sequence;

pub mod state;

pub mod stats;

pub mod device;

pub use attention::*;
pub use cache::*;
pub use device::*;
pub use error::*;
pub use sequence::*;
pub use state::*;
pub use stats::*;
pub use types::*;

use crate::error::Error;
use handle::Backend;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{RwLockReadGuard, RwLockWriteGuard};
use types::kivi_status::*;

/// Why a call failed: its status and the message for `kivi_last_error_message()`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: kivi_status,
    pub message: String,
}

impl Failure {
    pub fn new(status: kivi_status, message: impl Into<String>) -> Failure {
        Failure { status, message: message.into() }
    }
}

/// The result type of an export's body.
pub(crate) type FfiResult<T = ()> = Result<T, Failure>;

/// The status of each core error. The match is exhaustive on purpose: a new core error must get
/// its own status here (a new number, never a reused one).
pub(crate) fn status_of(e: &Error) -> kivi_status {
    match e {
        Error::InvalidConfig(_) => KIVI_ERR_INVALID_CONFIG,
        Error::LayerOutOfRange { .. } => KIVI_ERR_LAYER_OUT_OF_RANGE,
        Error::UnknownSequence(_) => KIVI_ERR_UNKNOWN_SEQUENCE,
        Error::CapacityExhausted { .. } => KIVI_ERR_CAPACITY_EXHAUSTED,
        Error::TooManySequences { .. } => KIVI_ERR_TOO_MANY_SEQUENCES,
        Error::Shape { .. } => KIVI_ERR_SHAPE,
        Error::NonFinite { .. } => KIVI_ERR_NON_FINITE,
        Error::InvalidArgument(_) => KIVI_ERR_INVALID_ARGUMENT,
        Error::CorruptState(_) => KIVI_ERR_CORRUPT_STATE,
        Error::StateMismatch(_) => KIVI_ERR_STATE_MISMATCH,
        Error::BufferTooSmall { .. } => KIVI_ERR_BUFFER_TOO_SMALL,
        Error::BackendUnavailable(_) => KIVI_ERR_BACKEND_UNAVAILABLE,
        Error::SequenceFull { .. } => KIVI_ERR_SEQUENCE_FULL,
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure { status: status_of(&e), message: e.to_string() }
    }
}

/// Runs an export's body: catches panics, records the message of a failure for this thread, and
/// returns the status. `name` (the export's name) starts every message.
pub(crate) fn boundary(name: &'static str, body: impl FnOnce() -> FfiResult) -> kivi_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => KIVI_OK,
        Ok(Err(f)) => {
            error::set_last_error(&format!("{name}: {}", f.message));
            f.status
        }
        Err(payload) => {
            let what = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "unknown panic".to_string()
            };
            // Recording the message must not unwind either.
            let _ = catch_unwind(|| {
                error::set_last_error(&format!("{name}: internal error (a bug in kivi; please report it): {what}"))
            });
            KIVI_ERR_INTERNAL
        }
    }
}

/// Declares the body of an export: `ffi_fn!("kivi_x", { ...; Ok(()) })`.
macro_rules! ffi_fn {
    ($name:literal, $body:block) => {
        $crate::ffi::boundary($name, move || -> $crate::ffi::FfiResult { $body })
    };
}
pub(crate) use ffi_fn;

/// `p` as a reference, or `KIVI_ERR_NULL_POINTER` naming the argument.
///
/// # Safety
/// A non-NULL `p` must point to a valid `T` for `'a`.
pub(crate) unsafe fn nonnull<'a, T>(p: *const T, what: &str) -> FfiResult<&'a T> {
    p.as_ref().ok_or_else(|| Failure::new(KIVI_ERR_NULL_POINTER, format!("{what} is NULL")))
}

/// Fails with `KIVI_ERR_NULL_POINTER` when an output pointer is NULL.
pub(crate) fn check_out<T>(p: *mut T, what: &str) -> FfiResult {
    if p.is_null() {
        return Err(Failure::new(KIVI_ERR_NULL_POINTER, format!("{what} is NULL")));
    }
    Ok(())
}

const POISONED: &str = "the cache is unusable: an earlier call panicked while changing it (a bug in kivi); free it";

/// The cache behind a handle, for reading (several threads at once).
///
/// # Safety
/// A non-NULL `p` must come from `kivi_cache_create` and not have been freed.
pub(crate) unsafe fn read_cache<'a>(p: *const types::kivi_cache) -> FfiResult<RwLockReadGuard<'a, Backend>> {
    let c = nonnull(p, "cache")?;
    c.inner.read().map_err(|_| Failure::new(KIVI_ERR_INTERNAL, POISONED))
}

/// The cache behind a handle, for changing (one thread at a time; others wait).
///
/// # Safety
/// As [`read_cache`].
pub(crate) unsafe fn write_cache<'a>(p: *mut types::kivi_cache) -> FfiResult<RwLockWriteGuard<'a, Backend>> {
    let c = nonnull(p.cast_const(), "cache")?;
    c.inner.write().map_err(|_| Failure::new(KIVI_ERR_INTERNAL, POISONED))
}

/// Sizes of versioned structs beyond this are refused as garbage rather than read.
const MAX_STRUCT_SIZE: usize = 4096;

/// A struct of the C ABI whose first field is its `u32` size as the caller compiled it
/// (`struct_size`), so that fields can be added at its end without breaking callers built with an
/// older header.
pub(crate) trait Versioned: Copy {
    /// `sizeof` of each earlier layout of the struct, smallest first: a caller built with an
    /// older header passes one of them. Reading such a struct gives the fields past it their
    /// defaults; writing one leaves them out.
    const OLDER_SIZES: &'static [usize];
    /// The value of every field for a caller that does not know it.
    fn defaults() -> Self;
}

impl Versioned for types::kivi_params {
    /// Before `value_rounding`, before `max_seq_tokens`.
    const OLDER_SIZES: &'static [usize] = &[
        std::mem::offset_of!(types::kivi_params, value_rounding),
        std::mem::offset_of!(types::kivi_params, max_seq_tokens),
    ];
    fn defaults() -> Self {
        cache::default_params()
    }
}

impl Versioned for types::kivi_attn_options {
    const OLDER_SIZES: &'static [usize] = &[];
    fn defaults() -> Self {
        types::kivi_attn_options {
            struct_size: std::mem::size_of::<Self>() as u32,
            scale: 0.0,
            flags: 0,
            sliding_window: 0,
            softcap: 0.0,
        }
    }
}

impl Versioned for types::kivi_device_info {
    const OLDER_SIZES: &'static [usize] = &[];
    fn defaults() -> Self {
        // SAFETY: integers and a char array: all zeros is a valid value.
        unsafe { std::mem::zeroed() }
    }
}

impl Versioned for types::kivi_memory_stats {
    /// Before `table_bytes`.
    const OLDER_SIZES: &'static [usize] = &[std::mem::offset_of!(types::kivi_memory_stats, table_bytes)];
    fn defaults() -> Self {
        // SAFETY: integers only: all zeros is a valid value.
        unsafe { std::mem::zeroed() }
    }
}

impl Versioned for types::kivi_memory_plan {
    const OLDER_SIZES: &'static [usize] = &[];
    fn defaults() -> Self {
        Self::default()
    }
}

/// The error for a versioned struct of a size this library does not read or write (`lead`
/// names the struct and the size).
fn bad_size<T: Versioned>(lead: &str) -> Failure {
    let ours = std::mem::size_of::<T>();
    let older: Vec<String> = T::OLDER_SIZES.iter().map(|s| s.to_string()).collect();
    let also = if older.is_empty() { String::new() } else { format!(" (or {}, an older header's)", older.join(", ")) };
    Failure::new(
        KIVI_ERR_STRUCT_SIZE,
        format!(
            "{lead}, but this library (kivi {}) expects {ours}{also}: set it to sizeof the struct \
             and use the header that came with the library",
            env!("CARGO_PKG_VERSION")
        ),
    )
}

/// Reads a versioned struct. Accepts this library's size; an older layout's size, whose missing
/// fields take their defaults; or a larger one (a newer header) whose extra bytes are all zero.
///
/// # Safety
/// `p` is non-NULL and points to at least `struct_size` readable bytes, as the caller promised.
pub(crate) unsafe fn read_versioned<T: Versioned>(p: *const T, what: &str) -> FfiResult<T> {
    if p.is_null() {
        return Err(Failure::new(KIVI_ERR_NULL_POINTER, format!("{what} is NULL")));
    }
    let size = std::ptr::read_unaligned(p.cast::<u32>()) as usize;
    let ours = std::mem::size_of::<T>();
    if T::OLDER_SIZES.contains(&size) {
        let mut v = T::defaults();
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&mut v as *mut T).cast::<u8>(), size);
        return Ok(v);
    }
    if size < ours || size > MAX_STRUCT_SIZE {
        return Err(bad_size::<T>(&format!("{what}.struct_size is {size}")));
    }
    if size > ours {
        let tail = std::slice::from_raw_parts(p.cast::<u8>().add(ours), size - ours);
        if let Some(i) = tail.iter().position(|&b| b != 0) {
            return Err(Failure::new(
                KIVI_ERR_STRUCT_SIZE,
                format!(
                    "{what} is {size} bytes, {} more than this library knows, and byte {} of them is set: \
                     it asks for a feature of a newer kivi",
                    size - ours,
                    ours + i
                ),
            ));
        }
    }
    Ok(std::ptr::read_unaligned(p))
}

/// Writes a versioned struct into a caller buffer of `size` bytes: this library's fields, then
/// zeros up to `size`; or, for an older layout's size, the fields it has. Fails, writing
/// nothing, for any other size smaller than this library's struct.
///
/// # Safety
/// `dst` is non-NULL and points to `size` writable bytes.
pub(crate) unsafe fn write_versioned<T: Versioned>(dst: *mut T, size: usize, value: T, what: &str) -> FfiResult {
    let ours = std::mem::size_of::<T>();
    if T::OLDER_SIZES.contains(&size) {
        std::ptr::copy_nonoverlapping((&value as *const T).cast::<u8>(), dst.cast::<u8>(), size);
        return Ok(());
    }
    if size < ours || size > MAX_STRUCT_SIZE {
        return Err(bad_size::<T>(&format!("{what} size {size}")));
    }
    std::ptr::write_unaligned(dst, value);
    std::ptr::write_bytes(dst.cast::<u8>().add(ours), 0, size - ours);
    Ok(())
}

#[cfg(test)]
mod cuda_tests;

#[cfg(test)]
mod tests {
    use super::error::{kivi_last_error_message, kivi_status_str, STATUS_TEXT};
    use super::*;
    use std::ffi::CStr;

    fn last_error() -> String {
        unsafe { CStr::from_ptr(kivi_last_error_message()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn cpu_isa_names_the_active_instruction_set() {
        let name = unsafe { CStr::from_ptr(device::kivi_cpu_isa()) }.to_str().unwrap();
        let isa = crate::attention::Isa::from_name(name).unwrap_or_else(|| panic!("{name:?}"));
        assert!(crate::attention::available_isas().contains(&isa), "{name}");
        assert_eq!(isa, crate::attention::active_isa());
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = boundary("kivi_test", || panic!("boom {}", 7));
        assert_eq!(status, KIVI_ERR_INTERNAL);
        let msg = last_error();
        assert!(msg.starts_with("kivi_test: internal error") && msg.contains("boom 7"), "{msg}");
    }

    #[test]
    fn a_cache_poisoned_by_a_panic_refuses_later_calls() {
        let mut params = cache::default_params();
        params.head_dim = 64;
        let mut handle: *mut kivi_cache = std::ptr::null_mut();
        unsafe {
            assert_eq!(kivi_cache_create(&params, &mut handle), KIVI_OK);
            let status = boundary("kivi_test", || {
                let _guard = write_cache(handle)?;
                panic!("while changing the cache");
            });
            assert_eq!(status, KIVI_ERR_INTERNAL);
            let mut len = 0u32;
            assert_eq!(kivi_seq_len(handle, 0, &mut len), KIVI_ERR_INTERNAL);
            assert!(last_error().contains("unusable"), "{}", last_error());
            assert_eq!(kivi_cache_clear(handle), KIVI_ERR_INTERNAL);
            kivi_cache_free(handle);
        }
    }

    #[test]
    fn every_status_has_a_text_and_every_error_a_status() {
        for (s, text) in STATUS_TEXT {
            let c = unsafe { CStr::from_ptr(kivi_status_str(s as i32)) }.to_str().unwrap();
            assert_eq!(c, text.trim_end_matches('\0'));
            assert!(c.starts_with(&format!("{s:?}:")), "{c}");
        }
        let numbers: Vec<i32> = STATUS_TEXT.iter().map(|(s, _)| *s as i32).collect();
        assert_eq!(numbers, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 99], "status numbers are ABI");
        let e = Error::BufferTooSmall { needed: 2, given: 1 };
        assert_eq!(Failure::from(e).status, KIVI_ERR_BUFFER_TOO_SMALL);
    }

    /// A caller built with the header before `value_rounding` (or before `max_seq_tokens`)
    /// passes the smaller struct: it reads with the defaults of the fields it lacks, is written
    /// without them, and sizes between the layouts are refused.
    #[test]
    fn versioned_structs_accept_an_older_layout() {
        let older = std::mem::offset_of!(kivi_params, value_rounding);
        let mut p = cache::default_params();
        p.value_rounding = 77; // beyond the older struct: must not be read
        p.struct_size = older as u32;
        let read = unsafe { read_versioned(&p as *const kivi_params, "params") }.unwrap();
        assert_eq!(read.value_rounding, crate::config::Rounding::LeastSquares as i32);
        assert_eq!((read.head_dim, read.device, read.struct_size), (128, types::KIVI_DEVICE_CPU, older as u32));
        let cfg = cache::config_of(&read).unwrap();
        assert_eq!(cfg.value_rounding, crate::config::Rounding::LeastSquares);

        let mut buf = [0xABu8; std::mem::size_of::<kivi_params>()];
        let st = unsafe { cache::kivi_params_init(buf.as_mut_ptr().cast(), older) };
        assert_eq!(st, KIVI_OK);
        assert!(buf[older..].iter().all(|&b| b == 0xAB), "wrote past the older struct");
        let got = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<kivi_params>()) };
        assert_eq!((got.struct_size, got.head_dim, got.device), (older as u32, 128, types::KIVI_DEVICE_CPU));

        // Before `max_seq_tokens`: the rounding is read, the limit takes its default (none).
        let older2 = std::mem::offset_of!(kivi_params, max_seq_tokens);
        let mut p2 = cache::default_params();
        (p2.value_rounding, p2.max_seq_tokens, p2.struct_size) = (0, 77, older2 as u32);
        let read = unsafe { read_versioned(&p2 as *const kivi_params, "params") }.unwrap();
        assert_eq!((read.value_rounding, read.max_seq_tokens, read.struct_size), (0, 0, older2 as u32));
        assert_eq!(cache::config_of(&read).unwrap().max_seq_tokens, 0);

        for size in [older - 4, older + 2, older2 + 2, std::mem::size_of::<kivi_params>() - 1] {
            p.struct_size = size as u32;
            let e = unsafe { read_versioned(&p as *const kivi_params, "params") }.unwrap_err();
            assert_eq!(e.status, KIVI_ERR_STRUCT_SIZE, "size {size}");
            assert!(e.message.contains(&format!("{size}")) && e.message.contains(&format!("{older}")), "{}", e.message);
            let st = unsafe { cache::kivi_params_init(buf.as_mut_ptr().cast(), size) };
            assert_eq!(st, KIVI_ERR_STRUCT_SIZE, "size {size}");
        }
    }

    #[test]
    fn versioned_structs_accept_a_larger_zero_tail_and_refuse_the_rest() {
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Newer {
            p: kivi_params,
            extra: [u32; 2],
        }
        let mut n = Newer { p: cache::default_params(), extra: [0; 2] };
        n.p.struct_size = std::mem::size_of::<Newer>() as u32;
        let read = unsafe { read_versioned(&n.p as *const kivi_params, "params") }.unwrap();
        assert_eq!(read.head_dim, 128);
        n.extra[1] = 1;
        let e = unsafe { read_versioned(&n.p as *const kivi_params, "params") }.unwrap_err();
        assert_eq!(e.status, KIVI_ERR_STRUCT_SIZE);
        n.p.struct_size = 4;
        let e = unsafe { read_versioned(&n.p as *const kivi_params, "params") }.unwrap_err();
        assert_eq!(e.status, KIVI_ERR_STRUCT_SIZE);
    }
}
