"""A small ctypes binding of kivi's C ABI (include/kivi.h): no build step, only the shared library.

The library is found through the KIVI_LIB environment variable (a path to libkivi.so), or in the
repository's target/release or target/debug directory.

    from kivi import Cache
    with Cache(n_layers=2, n_kv_heads=2, head_dim=64, max_tokens=4096) as cache:
        out = cache.append_attend(layer, seq, keys, values, queries)   # numpy float32 arrays

Rows are 2-D arrays (tokens x elements, elements contiguous): numpy arrays or PyTorch tensors
for a CPU cache, PyTorch CUDA tensors for a CUDA cache (`Cache(..., device=0)`), whose calls are
queued on the stream given to `set_stream` (a torch.cuda.Stream, or a raw handle) and return
without waiting; outputs are new tensors of the queries' type.
"""

import ctypes as C
import os
from pathlib import Path

import numpy as np

# --- the library -----------------------------------------------------------------------------


def _find_library():
    env = os.environ.get("KIVI_LIB")
    if env:
        return env
    root = Path(__file__).resolve().parents[2]
    for profile in ("release", "debug"):
        p = root / "target" / profile / "libkivi.so"
        if p.exists():
            return str(p)
    raise OSError("libkivi.so not found: build it with `cargo build --release` or set KIVI_LIB")


lib = C.CDLL(_find_library())

# --- the ABI's types (kivi.h) ----------------------------------------------------------------

KIVI_OK = 0
STATUS_NAMES = {
    0: "KIVI_OK", 1: "KIVI_ERR_NULL_POINTER", 2: "KIVI_ERR_INVALID_CONFIG", 3: "KIVI_ERR_INVALID_ARGUMENT",
    4: "KIVI_ERR_SHAPE", 5: "KIVI_ERR_NON_FINITE", 6: "KIVI_ERR_LAYER_OUT_OF_RANGE",
    7: "KIVI_ERR_UNKNOWN_SEQUENCE", 8: "KIVI_ERR_CAPACITY_EXHAUSTED", 9: "KIVI_ERR_TOO_MANY_SEQUENCES",
    10: "KIVI_ERR_BUFFER_TOO_SMALL", 11: "KIVI_ERR_CORRUPT_STATE", 12: "KIVI_ERR_STATE_MISMATCH",
    13: "KIVI_ERR_STRUCT_SIZE", 14: "KIVI_ERR_BACKEND_UNAVAILABLE", 15: "KIVI_ERR_SEQUENCE_FULL",
    99: "KIVI_ERR_INTERNAL",
}
DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}  # bf16 (2) has no numpy dtype
TORCH_DTYPES = {"torch.float32": 0, "torch.float16": 1, "torch.bfloat16": 2}
KIVI_DEVICE_CPU = -1
KIVI_ROUNDING_MIN_MAX, KIVI_ROUNDING_LEAST_SQUARES = 0, 1
KIVI_ATTN_NON_CAUSAL = 1


class Params(C.Structure):
    _fields_ = [(name, C.c_uint32) for name in ("struct_size", "n_layers", "n_kv_heads", "head_dim")] + [
        ("dtype", C.c_int32), ("key_bits", C.c_uint32), ("value_bits", C.c_uint32), ("key_mode", C.c_int32),
    ] + [(name, C.c_uint32) for name in ("group_size", "value_group", "residual", "sinks", "max_tokens",
                                         "max_seqs", "page_tokens", "n_threads")] + [
        ("device", C.c_int32), ("value_rounding", C.c_int32), ("max_seq_tokens", C.c_uint32)]


class AttnOptions(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("scale", C.c_float), ("flags", C.c_uint32),
                ("sliding_window", C.c_uint32), ("softcap", C.c_float)]


class DeviceInfo(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("device", C.c_int32), ("n_devices", C.c_uint32),
                ("compute_capability_major", C.c_uint32), ("compute_capability_minor", C.c_uint32),
                ("n_multiprocessors", C.c_uint32), ("total_memory", C.c_uint64), ("driver_version", C.c_uint32),
                ("nvrtc_version_major", C.c_uint32), ("nvrtc_version_minor", C.c_uint32),
                ("name", C.c_char * 256)]


class Rows(C.Structure):
    _fields_ = [("data", C.c_void_p), ("dtype", C.c_int32), ("n_rows", C.c_uint32), ("row_len", C.c_uint32),
                ("stride", C.c_size_t)]


class MemoryStats(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("sequences", C.c_uint32)] + [
        (name, C.c_uint64) for name in ("tokens", "quantized_tokens", "code_bytes", "scale_bytes", "window_bytes",
                                        "used_bytes", "f16_bytes", "pages_used", "pages_total", "reserved_bytes",
                                        "table_bytes")]


class MemoryPlan(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("device", C.c_int32)] + [
        (name, C.c_uint64) for name in ("bytes", "reserved_bytes", "table_bytes", "pages_total")]


P, U32, SZ = C.POINTER, C.c_uint32, C.c_size_t
_SIGNATURES = {
    "kivi_params_init": [P(Params), SZ],
    "kivi_cache_create": [P(Params), P(C.c_void_p)],
    "kivi_append": [C.c_void_p, U32, U32, P(Rows), P(Rows)],
    "kivi_append_attend": [C.c_void_p, U32, U32, P(Rows), P(Rows), P(Rows), P(Rows), P(AttnOptions)],
    "kivi_attend": [C.c_void_p, U32, U32, P(Rows), P(Rows), P(AttnOptions)],
    "kivi_decode": [C.c_void_p, U32, P(U32), U32, P(Rows), P(Rows), P(Rows), P(Rows), P(AttnOptions)],
    "kivi_cache_clear": [C.c_void_p],
    "kivi_cache_params": [C.c_void_p, P(Params), SZ],
    "kivi_seq_len": [C.c_void_p, U32, P(U32)],
    "kivi_seq_layer_len": [C.c_void_p, U32, U32, P(U32)],
    "kivi_seq_ids": [C.c_void_p, P(U32), SZ, P(SZ)],
    "kivi_seq_remove": [C.c_void_p, U32],
    "kivi_seq_keep": [C.c_void_p, U32],
    "kivi_seq_truncate": [C.c_void_p, U32, U32],
    "kivi_seq_copy": [C.c_void_p, U32, U32, U32],
    "kivi_state_size": [C.c_void_p, P(SZ)],
    "kivi_state_save": [C.c_void_p, C.c_char_p, SZ, P(SZ)],
    "kivi_state_load": [C.c_void_p, C.c_char_p, SZ],
    "kivi_seq_state_size": [C.c_void_p, U32, P(SZ)],
    "kivi_seq_state_save": [C.c_void_p, U32, C.c_char_p, SZ, P(SZ)],
    "kivi_seq_state_load": [C.c_void_p, U32, C.c_char_p, SZ],
    "kivi_cache_stats": [C.c_void_p, P(MemoryStats), SZ],
    "kivi_params_memory": [P(Params), P(MemoryPlan), SZ],
    "kivi_params_fit_tokens": [P(Params), C.c_uint64, P(U32)],
    "kivi_cuda_device_info": [C.c_int32, P(DeviceInfo), SZ],
    "kivi_cache_set_stream": [C.c_void_p, C.c_void_p],
    "kivi_cache_stream": [C.c_void_p, P(C.c_void_p)],
    "kivi_cache_prepare": [C.c_void_p, C.c_uint32],
}
for _name, _args in _SIGNATURES.items():
    getattr(lib, _name).argtypes = _args
    getattr(lib, _name).restype = C.c_int32
lib.kivi_cache_free.argtypes, lib.kivi_cache_free.restype = [C.c_void_p], None
for _name in ("kivi_version", "kivi_last_error_message", "kivi_cpu_isa"):
    getattr(lib, _name).argtypes, getattr(lib, _name).restype = [], C.c_char_p
lib.kivi_status_str.argtypes, lib.kivi_status_str.restype = [C.c_int32], C.c_char_p


class KiviError(Exception):
    """A kivi call that returned a status other than KIVI_OK; `.status` is its number."""

    def __init__(self, status, message):
        super().__init__(f"{STATUS_NAMES.get(status, status)}: {message}")
        self.status = status


def _check(status):
    if status != KIVI_OK:
        raise KiviError(status, lib.kivi_last_error_message().decode())


def version():
    return lib.kivi_version().decode()


def cpu_isa():
    """The instruction set of the CPU kernels: "avx512", "avx2", "neon" or "scalar"."""
    return lib.kivi_cpu_isa().decode()


def _is_torch(a):
    return hasattr(a, "data_ptr") and hasattr(a, "is_cuda")


def _rows(a, device=KIVI_DEVICE_CPU):
    """A 2-D array (tokens x elements; rows may be strided, elements contiguous) as kivi_rows:
    numpy or a CPU tensor for a CPU cache, a CUDA tensor on the cache's device for a CUDA cache."""
    if _is_torch(a):
        on = a.get_device() if a.is_cuda else KIVI_DEVICE_CPU
        if on != device:
            where = "the CPU" if device == KIVI_DEVICE_CPU else f"CUDA device {device}"
            raise ValueError(f"a tensor on {a.device} for a cache on {where}")
        if a.dim() != 2 or a.stride(1) != 1:
            raise ValueError("rows must be a 2-D tensor with contiguous elements")
        if str(a.dtype) not in TORCH_DTYPES:
            raise TypeError(f"dtype {a.dtype} is not float32, float16 or bfloat16")
        return Rows(a.data_ptr(), TORCH_DTYPES[str(a.dtype)], a.shape[0], a.shape[1], a.stride(0))
    if device != KIVI_DEVICE_CPU:
        raise ValueError(f"a numpy array (host memory) for a cache on CUDA device {device}: pass CUDA tensors")
    if a.ndim != 2 or a.strides[1] != a.itemsize or a.strides[0] % a.itemsize:
        raise ValueError("rows must be a 2-D array with contiguous elements")
    if a.dtype not in DTYPES:
        raise TypeError(f"dtype {a.dtype} is not float32 or float16")
    return Rows(a.ctypes.data, DTYPES[a.dtype], a.shape[0], a.shape[1], a.strides[0] // a.itemsize)


def _empty_like(q):
    if _is_torch(q):
        import torch

        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return np.empty_like(q, order="C")


def device_info(device=0):
    """What kivi finds on CUDA device `device` (a dict), or KiviError (KIVI_ERR_BACKEND_UNAVAILABLE)
    saying why it cannot use it."""
    info = DeviceInfo()
    _check(lib.kivi_cuda_device_info(device, C.byref(info), C.sizeof(info)))
    return {name: (getattr(info, name).decode() if name == "name" else getattr(info, name))
            for name, _ in DeviceInfo._fields_ if name != "struct_size"}


def _options(scale=0.0, causal=True, sliding_window=0, softcap=0.0):
    o = AttnOptions(C.sizeof(AttnOptions), scale, 0 if causal else KIVI_ATTN_NON_CAUSAL, sliding_window, softcap)
    return C.byref(o)


def _params(fields):
    p = Params()
    _check(lib.kivi_params_init(C.byref(p), C.sizeof(p)))
    for k, v in fields.items():
        if not hasattr(p, k) or k == "struct_size":
            raise AttributeError(f"kivi_params has no field {k}")
        setattr(p, k, v)
    return p


def memory_plan(**fields):
    """What a Cache(**fields) would take, without making it: a dict of kivi_memory_plan's fields
    (bytes: the memory of its device, host or CUDA)."""
    p, m = _params(fields), MemoryPlan()
    _check(lib.kivi_params_memory(C.byref(p), C.byref(m), C.sizeof(m)))
    return {name: getattr(m, name) for name, _ in MemoryPlan._fields_ if name != "struct_size"}


def fit_max_tokens(budget_bytes, **fields):
    """The largest max_tokens with which Cache(**fields) takes at most budget_bytes of its device's memory."""
    p, n = _params(fields), C.c_uint32()
    _check(lib.kivi_params_fit_tokens(C.byref(p), budget_bytes, C.byref(n)))
    return n.value


class Cache:
    """A kivi cache. Keyword arguments set kivi_params fields (n_layers, n_kv_heads, head_dim, key_bits, ...)."""

    def __init__(self, **fields):
        p = _params(fields)
        self.params = p
        self._h = C.c_void_p()
        _check(lib.kivi_cache_create(C.byref(p), C.byref(self._h)))

    def close(self):
        if self._h:
            lib.kivi_cache_free(self._h)
            self._h = C.c_void_p()

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def config(self):
        """The parameters the cache was created with (kivi_cache_params), as a dict."""
        p = Params()
        _check(lib.kivi_cache_params(self._h, C.byref(p), C.sizeof(p)))
        return {name: getattr(p, name) for name, _ in Params._fields_ if name != "struct_size"}

    def clear(self):
        """Removes every sequence; the memory stays with the cache."""
        _check(lib.kivi_cache_clear(self._h))

    def _r(self, a):
        return C.byref(_rows(a, self.params.device))

    def set_stream(self, stream):
        """The CUDA stream later calls queue on: a torch.cuda.Stream, a raw handle, or None (the
        default stream). Tensors given to the cache must be ready on that stream."""
        handle = getattr(stream, "cuda_stream", stream) or 0
        _check(lib.kivi_cache_set_stream(self._h, C.c_void_p(handle)))
        self._stream = stream

    def prepare(self, n_q_heads):
        """Compiles the attention kernels for `n_q_heads` query heads now (a CUDA cache; a CPU
        cache checks the number only), rather than in the first call that needs them."""
        _check(lib.kivi_cache_prepare(self._h, n_q_heads))

    def append(self, layer, seq, keys, values):
        _check(lib.kivi_append(self._h, layer, seq, self._r(keys), self._r(values)))

    def append_attend(self, layer, seq, keys, values, queries, **opts):
        out = _empty_like(queries)
        _check(lib.kivi_append_attend(self._h, layer, seq, self._r(keys), self._r(values), self._r(queries),
                                      self._r(out), _options(**opts)))
        return out

    def attend(self, layer, seq, queries, **opts):
        out = _empty_like(queries)
        _check(lib.kivi_attend(self._h, layer, seq, self._r(queries), self._r(out), _options(**opts)))
        return out

    def decode(self, layer, seqs, keys, values, queries, **opts):
        ids = (U32 * len(seqs))(*seqs)
        out = _empty_like(queries)
        _check(lib.kivi_decode(self._h, layer, ids, len(seqs), self._r(keys), self._r(values), self._r(queries),
                               self._r(out), _options(**opts)))
        return out

    def seq_len(self, seq):
        n = U32()
        _check(lib.kivi_seq_len(self._h, seq, C.byref(n)))
        return n.value

    def seq_layer_len(self, seq, layer):
        """Tokens sequence seq holds in one layer (layers fill one after another within a step)."""
        n = U32()
        _check(lib.kivi_seq_layer_len(self._h, seq, layer, C.byref(n)))
        return n.value

    def seq_ids(self):
        """The ids of the sequences the cache holds, in slot order."""
        n = SZ()
        _check(lib.kivi_seq_ids(self._h, None, 0, C.byref(n)))
        ids = (U32 * n.value)()
        _check(lib.kivi_seq_ids(self._h, ids, n.value, C.byref(n)))
        return list(ids[: n.value])

    def seq_keep(self, seq):
        """Removes every sequence but seq."""
        _check(lib.kivi_seq_keep(self._h, seq))

    def seq_truncate(self, seq, n_tokens):
        _check(lib.kivi_seq_truncate(self._h, seq, n_tokens))

    def seq_copy(self, src, dst, n_tokens=0xFFFFFFFF):
        _check(lib.kivi_seq_copy(self._h, src, dst, n_tokens))

    def seq_remove(self, seq):
        _check(lib.kivi_seq_remove(self._h, seq))

    def save(self):
        size = SZ()
        _check(lib.kivi_state_size(self._h, C.byref(size)))
        buf, written = C.create_string_buffer(size.value), SZ()
        _check(lib.kivi_state_save(self._h, buf, size.value, C.byref(written)))
        return buf.raw[: written.value]

    def load(self, blob):
        """Replaces the whole cache with a blob of save(), from a cache of any capacity and page size it fits."""
        _check(lib.kivi_state_load(self._h, blob, len(blob)))

    def save_seq(self, seq):
        """One sequence as bytes (kivi_seq_state_save)."""
        size = SZ()
        _check(lib.kivi_seq_state_size(self._h, seq, C.byref(size)))
        buf, written = C.create_string_buffer(size.value), SZ()
        _check(lib.kivi_seq_state_save(self._h, seq, buf, size.value, C.byref(written)))
        return buf.raw[: written.value]

    def load_seq(self, seq, blob):
        """Loads a blob of save_seq() as sequence seq, replacing it if it exists."""
        _check(lib.kivi_seq_state_load(self._h, seq, blob, len(blob)))

    def stats(self):
        s = MemoryStats()
        _check(lib.kivi_cache_stats(self._h, C.byref(s), C.sizeof(s)))
        return {name: getattr(s, name) for name, _ in MemoryStats._fields_ if name != "struct_size"}
