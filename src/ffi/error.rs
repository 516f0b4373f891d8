//! Status strings, the calling thread's last error message, and the library's version.

use super::types::kivi_status::{self, *};
use std::cell::RefCell;
use std::ffi::{c_char, CString};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as this thread's last error (NUL bytes inside become spaces).
pub(crate) fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// Every status with its text (NUL-terminated, static).
pub(crate) const STATUS_TEXT: [(kivi_status, &str); 17] = [
    (KIVI_OK, "KIVI_OK: success\0"),
    (KIVI_ERR_NULL_POINTER, "KIVI_ERR_NULL_POINTER: a required pointer argument is NULL\0"),
    (KIVI_ERR_INVALID_CONFIG, "KIVI_ERR_INVALID_CONFIG: invalid cache parameters\0"),
    (KIVI_ERR_INVALID_ARGUMENT, "KIVI_ERR_INVALID_ARGUMENT: invalid argument\0"),
    (KIVI_ERR_SHAPE, "KIVI_ERR_SHAPE: rows, row length or stride do not match the cache\0"),
    (KIVI_ERR_NON_FINITE, "KIVI_ERR_NON_FINITE: NaN, infinity or out-of-range value in an input\0"),
    (KIVI_ERR_LAYER_OUT_OF_RANGE, "KIVI_ERR_LAYER_OUT_OF_RANGE: layer index out of range\0"),
    (KIVI_ERR_UNKNOWN_SEQUENCE, "KIVI_ERR_UNKNOWN_SEQUENCE: the cache does not hold this sequence\0"),
    (KIVI_ERR_CAPACITY_EXHAUSTED, "KIVI_ERR_CAPACITY_EXHAUSTED: no room left for these tokens\0"),
    (KIVI_ERR_TOO_MANY_SEQUENCES, "KIVI_ERR_TOO_MANY_SEQUENCES: every sequence slot is taken\0"),
    (KIVI_ERR_BUFFER_TOO_SMALL, "KIVI_ERR_BUFFER_TOO_SMALL: the buffer is too small\0"),
    (KIVI_ERR_CORRUPT_STATE, "KIVI_ERR_CORRUPT_STATE: the state blob is damaged or not a kivi state\0"),
    (KIVI_ERR_STATE_MISMATCH, "KIVI_ERR_STATE_MISMATCH: the state blob comes from a cache with other settings\0"),
    (KIVI_ERR_STRUCT_SIZE, "KIVI_ERR_STRUCT_SIZE: struct size does not match this library\0"),
    (KIVI_ERR_BACKEND_UNAVAILABLE, "KIVI_ERR_BACKEND_UNAVAILABLE: the requested device is not available\0"),
    (KIVI_ERR_SEQUENCE_FULL, "KIVI_ERR_SEQUENCE_FULL: the sequence would pass max_seq_tokens\0"),
    (KIVI_ERR_INTERNAL, "KIVI_ERR_INTERNAL: internal error in kivi\0"),
];

/// A static, NUL-terminated description of `status` (any number: unknown ones get a text too),
/// e.g. "KIVI_ERR_SHAPE: rows, row length or stride do not match the cache". The string is owned by
/// kivi and lives for ever; never free it. Safe to call from any thread at any time.
#[no_mangle]
pub extern "C" fn kivi_status_str(status: i32) -> *const c_char {
    let text = STATUS_TEXT.iter().find(|(s, _)| *s as i32 == status).map(|(_, t)| *t);
    text.unwrap_or("KIVI_ERR_UNKNOWN: not a kivi status\0").as_ptr().cast()
}

/// The full message of the last call on the calling thread that failed, e.g.
/// "kivi_append: layer 40 out of range: the cache has 32 layers (0..32)"; an empty string if no call
/// on this thread has failed. Successful calls leave it as it was. The string belongs to kivi and
/// stays valid until the next kivi call on this thread; copy it to keep it. Never NULL. Each thread
/// has its own, so this is safe to call from any thread.
#[no_mangle]
pub extern "C" fn kivi_last_error_message() -> *const c_char {
    static EMPTY: &[u8] = b"\0";
    std::panic::catch_unwind(|| LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(EMPTY.as_ptr().cast()))
        .unwrap_or(EMPTY.as_ptr().cast())
}

/// The library's version, "MAJOR.MINOR.PATCH", from the same source as the `KIVI_VERSION_*` macros
/// of the header; compare the two to detect a header/library mismatch. Static; never free it.
/// Safe to call from any thread.
#[no_mangle]
pub extern "C" fn kivi_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
