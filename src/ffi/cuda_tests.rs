//! The exports on a CUDA cache handle, without a GPU: a handle around an emulated CUDA cache
//! (`kivi_cache::emulated`: device pointers are host pointers, kernels are Rust ports) is driven
//! through the extern "C" functions next to a CPU handle fed the same calls. Outputs must agree
//! within the emulator tests' tolerance (1e-3 relative plus a rounding step of the output type),
//! lengths, ids, statistics and state blobs exactly; state blobs move between the two; every
//! error leaves the handle as it was.

use super::*;
use crate::config::DType;
use crate::rows::Element;
use crate::testing::{rel_err, Rng};
use half::{bf16, f16};
use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};

fn last_error() -> String {
    unsafe { CStr::from_ptr(kivi_last_error_message()) }.to_string_lossy().into_owned()
}

/// A failed call: its status, and a message that names the function and contains `says`.
#[track_caller]
fn fails(status: kivi_status, want: kivi_status, func: &str, says: &str) {
    assert_eq!(status, want, "{}", last_error());
    let m = last_error();
    assert!(m.starts_with(&format!("{func}: ")) && m.contains(says), "{m:?} does not say {says:?}");
}

const LAYERS: u32 = 2;
const KV: usize = 2;
const HD: usize = 32;
const QH: usize = 4;
const KVROW: usize = KV * HD;
const QROW: usize = QH * HD;

fn params(dtype: DType) -> kivi_params {
    let mut p = cache::default_params();
    p.n_layers = LAYERS;
    p.n_kv_heads = KV as u32;
    p.head_dim = HD as u32;
    p.dtype = dtype as i32;
    p.group_size = 8;
    p.value_group = 16;
    p.residual = 16;
    p.sinks = 1;
    p.max_tokens = 256;
    p.max_seqs = 6;
    p
}

fn cpu_handle(p: &kivi_params) -> *mut kivi_cache {
    let mut h = null_mut();
    assert_eq!(unsafe { kivi_cache_create(p, &mut h) }, KIVI_OK, "{}", last_error());
    h
}

fn cuda_handle(p: &kivi_params) -> *mut kivi_cache {
    kivi_cache::emulated(cache::config_of(p).unwrap())
}

fn rows<T: Element>(v: &[T], n: usize, len: usize) -> kivi_rows {
    kivi_rows { data: v.as_ptr().cast(), dtype: T::DTYPE as i32, n_rows: n as u32, row_len: len as u32, stride: 0 }
}

fn rows_mut<T: Element>(v: &mut [T], n: usize, len: usize) -> kivi_rows_mut {
    kivi_rows_mut {
        data: v.as_mut_ptr().cast(),
        dtype: T::DTYPE as i32,
        n_rows: n as u32,
        row_len: len as u32,
        stride: 0,
    }
}

fn blob(h: *const kivi_cache) -> Vec<u8> {
    let mut size = 0;
    assert_eq!(unsafe { kivi_state_size(h, &mut size) }, KIVI_OK, "{}", last_error());
    let mut b = vec![0u8; size];
    let mut written = 0;
    assert_eq!(unsafe { kivi_state_save(h, b.as_mut_ptr(), size, &mut written) }, KIVI_OK, "{}", last_error());
    assert_eq!(written, size, "kivi_state_size is what kivi_state_save writes");
    b
}

fn seq_blob(h: *const kivi_cache, seq: u32) -> Vec<u8> {
    let mut size = 0;
    assert_eq!(unsafe { kivi_seq_state_size(h, seq, &mut size) }, KIVI_OK, "{}", last_error());
    let mut b = vec![0u8; size];
    let mut written = 0;
    let st = unsafe { kivi_seq_state_save(h, seq, b.as_mut_ptr(), size, &mut written) };
    assert_eq!(st, KIVI_OK, "{}", last_error());
    assert_eq!(written, size, "kivi_seq_state_size is what kivi_seq_state_save writes");
    b
}

fn ids(h: *const kivi_cache) -> Vec<u32> {
    let mut n = 0;
    let mut v = vec![0u32; 8];
    assert_eq!(unsafe { kivi_seq_ids(h, v.as_mut_ptr(), v.len(), &mut n) }, KIVI_OK, "{}", last_error());
    v.truncate(n);
    v
}

fn stats(h: *const kivi_cache) -> kivi_memory_stats {
    let mut s = kivi_memory_stats::default();
    assert_eq!(unsafe { kivi_cache_stats(h, &mut s, std::mem::size_of_val(&s)) }, KIVI_OK);
    s
}

/// A CPU handle and a CUDA handle fed the same calls.
struct Pair<T: Element> {
    cpu: *mut kivi_cache,
    gpu: *mut kivi_cache,
    rng: Rng,
    tol: f64,
    compared: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Element> Drop for Pair<T> {
    fn drop(&mut self) {
        unsafe {
            kivi_cache_free(self.cpu);
            kivi_cache_free(self.gpu);
        }
    }
}

impl<T: Element + Default> Pair<T> {
    fn new() -> Self {
        let p = params(T::DTYPE);
        Pair::of(cpu_handle(&p), cuda_handle(&p), 11)
    }

    /// A pair of existing handles (freed with it).
    fn of(cpu: *mut kivi_cache, gpu: *mut kivi_cache, seed: u64) -> Self {
        let ulp = match T::DTYPE {
            DType::F32 => 0.0,
            DType::F16 => 1.0 / 1024.0,
            DType::BF16 => 1.0 / 128.0,
        };
        Pair { cpu, gpu, rng: Rng(seed), tol: 1e-3 + ulp, compared: 0, _t: Default::default() }
    }

    fn kvq(&mut self, n: usize) -> (Vec<T>, Vec<T>, Vec<T>) {
        (self.rng.rows(n * KVROW, true, HD), self.rng.rows(n * KVROW, false, HD), self.rng.rows(n * QROW, false, HD))
    }

    #[track_caller]
    fn compare(&mut self, what: &str, got: &[T], want: &[T]) {
        let e = rel_err(got, want);
        assert!(e <= self.tol, "{what}: relative error {e:e} > {:e}", self.tol);
        assert!(want.iter().any(|x| x.to_f32() != 0.0), "{what}: the CPU wrote nothing");
        self.compared += 1;
    }

    fn append_attend(&mut self, layer: u32, seq: u32, n: usize) {
        let (k, v, q) = self.kvq(n);
        let (mut a, mut b) = (vec![T::default(); q.len()], vec![T::default(); q.len()]);
        for (h, out) in [(self.cpu, &mut a), (self.gpu, &mut b)] {
            let (kr, vr, qr, o) = (rows(&k, n, KVROW), rows(&v, n, KVROW), rows(&q, n, QROW), rows_mut(out, n, QROW));
            let st = unsafe { kivi_append_attend(h, layer, seq, &kr, &vr, &qr, &o, null()) };
            assert_eq!(st, KIVI_OK, "{}", last_error());
        }
        self.compare(&format!("append_attend(layer {layer}, seq {seq}, {n})"), &b, &a);
    }

    fn append(&mut self, layer: u32, seq: u32, n: usize) {
        let (k, v, _) = self.kvq(n);
        for h in [self.cpu, self.gpu] {
            let st = unsafe { kivi_append(h, layer, seq, &rows(&k, n, KVROW), &rows(&v, n, KVROW)) };
            assert_eq!(st, KIVI_OK, "{}", last_error());
        }
    }

    fn decode(&mut self, layer: u32, seqs: &[u32]) {
        let n = seqs.len();
        let (k, v, q) = self.kvq(n);
        let (mut a, mut b) = (vec![T::default(); q.len()], vec![T::default(); q.len()]);
        for (h, out) in [(self.cpu, &mut a), (self.gpu, &mut b)] {
            let (kr, vr, qr, o) = (rows(&k, n, KVROW), rows(&v, n, KVROW), rows(&q, n, QROW), rows_mut(out, n, QROW));
            let st = unsafe { kivi_decode(h, layer, seqs.as_ptr(), n as u32, &kr, &vr, &qr, &o, null()) };
            assert_eq!(st, KIVI_OK, "{}", last_error());
        }
        self.compare(&format!("decode(layer {layer}, {seqs:?})"), &b, &a);
    }

    fn attend(&mut self, layer: u32, seq: u32, n: usize, opts: Option<&kivi_attn_options>) -> (Vec<T>, Vec<T>) {
        let q: Vec<T> = self.rng.rows(n * QROW, false, HD);
        let (mut a, mut b) = (vec![T::default(); q.len()], vec![T::default(); q.len()]);
        let opts = opts.map_or(null(), |o| o as *const _);
        for (h, out) in [(self.cpu, &mut a), (self.gpu, &mut b)] {
            let st = unsafe { kivi_attend(h, layer, seq, &rows(&q, n, QROW), &rows_mut(out, n, QROW), opts) };
            assert_eq!(st, KIVI_OK, "{}", last_error());
        }
        self.compare(&format!("attend(layer {layer}, seq {seq}, {n})"), &b, &a);
        (a, b)
    }

    /// Both handles hold the same: ids, lengths, statistics, state blobs, parameters.
    fn same(&self, when: &str) {
        let ids = ids(self.cpu);
        assert_eq!(ids, super::cuda_tests::ids(self.gpu), "{when}: ids");
        for &seq in &ids {
            let (mut a, mut b) = (0u32, 0u32);
            unsafe {
                assert_eq!(kivi_seq_len(self.cpu, seq, &mut a), KIVI_OK);
                assert_eq!(kivi_seq_len(self.gpu, seq, &mut b), KIVI_OK);
            }
            assert_eq!(a, b, "{when}: length of {seq}");
            for layer in 0..LAYERS {
                unsafe {
                    assert_eq!(kivi_seq_layer_len(self.cpu, seq, layer, &mut a), KIVI_OK);
                    assert_eq!(kivi_seq_layer_len(self.gpu, seq, layer, &mut b), KIVI_OK);
                }
                assert_eq!(a, b, "{when}: length of {seq} in layer {layer}");
            }
            assert!(seq_blob(self.cpu, seq) == seq_blob(self.gpu, seq), "{when}: blobs of sequence {seq} differ");
        }
        assert_eq!(stats(self.cpu), stats(self.gpu), "{when}: stats");
        assert!(blob(self.cpu) == blob(self.gpu), "{when}: state blobs differ");
        let (mut a, mut b) = (cache::default_params(), cache::default_params());
        let size = std::mem::size_of::<kivi_params>();
        unsafe {
            assert_eq!(kivi_cache_params(self.cpu, &mut a, size), KIVI_OK);
            assert_eq!(kivi_cache_params(self.gpu, &mut b, size), KIVI_OK);
        }
        assert_eq!((a.device, b.device), (-1, 0), "the device is reported back");
        assert_eq!(kivi_params { device: -1, ..b }, a, "{when}: parameters");
    }

    /// Sequence operations on both handles, with the same status.
    fn seq_op(&self, what: &str, op: impl Fn(*mut kivi_cache) -> kivi_status) {
        let (a, b) = (op(self.cpu), op(self.gpu));
        assert_eq!(a, b, "{what}: CPU {a:?}, CUDA {b:?} ({})", last_error());
    }
}

/// Prefill chunks across flushes, appends, batched decode steps across more flushes, attend
/// with every option, forks, truncation inside a quantized group, remove, keep and clear.
fn scenario<T: Element + Default>() {
    let mut p = Pair::<T>::new();
    for layer in 0..LAYERS {
        p.append_attend(layer, 0, 41);
        p.append_attend(layer, 1, 5);
        p.append(layer, 2, 19);
    }
    p.same("after prefill");
    for step in 0..12 {
        for layer in 0..LAYERS {
            p.decode(layer, if step % 4 == 3 { &[2, 0] } else { &[0, 1, 2] });
        }
    }
    p.same("after decode");
    let sw = kivi_attn_options {
        struct_size: std::mem::size_of::<kivi_attn_options>() as u32,
        scale: 0.3,
        flags: KIVI_ATTN_NON_CAUSAL,
        sliding_window: 20,
        softcap: 5.0,
    };
    for layer in 0..LAYERS {
        p.attend(layer, 0, 3, None);
        p.attend(layer, 1, 1, Some(&sw));
    }
    p.seq_op("copy", |h| unsafe { kivi_seq_copy(h, 0, 3, 20) });
    p.seq_op("copy all", |h| unsafe { kivi_seq_copy(h, 0, 4, u32::MAX) });
    p.seq_op("truncate inside a group", |h| unsafe { kivi_seq_truncate(h, 0, 14) });
    p.same("after fork and truncate");
    for _ in 0..10 {
        for layer in 0..LAYERS {
            p.decode(layer, &[3, 0, 4, 1]);
        }
    }
    p.same("after decoding the forks");
    p.seq_op("remove", |h| unsafe { kivi_seq_remove(h, 2) });
    p.seq_op("remove again", |h| unsafe { kivi_seq_remove(h, 2) });
    for layer in 0..LAYERS {
        p.decode(layer, &[5, 0]);
        p.attend(layer, 5, 1, None);
    }
    p.same("after remove");
    p.seq_op("keep", |h| unsafe { kivi_seq_keep(h, 4) });
    p.same("after keep");
    assert_eq!(ids(p.gpu), [4]);
    p.seq_op("clear", |h| unsafe { kivi_cache_clear(h) });
    p.same("after clear");
    assert!(ids(p.gpu).is_empty());
    assert!(p.compared >= 50, "{} comparisons", p.compared);
}

#[test]
fn cuda_handle_matches_cpu_handle_f32() {
    scenario::<f32>();
}

#[test]
fn cuda_handle_matches_cpu_handle_f16() {
    scenario::<f16>();
}

#[test]
fn cuda_handle_matches_cpu_handle_bf16() {
    scenario::<bf16>();
}

#[test]
fn state_blobs_move_between_cpu_and_cuda_handles() {
    let mut p = Pair::<f16>::new();
    for layer in 0..LAYERS {
        p.append_attend(layer, 0, 45);
        p.append_attend(layer, 1, 30);
    }
    for _ in 0..3 {
        for layer in 0..LAYERS {
            p.decode(layer, &[0, 1]);
        }
    }
    let par = params(DType::F16);
    // A CUDA blob into a fresh CPU handle, a CPU blob into a fresh CUDA handle: both now hold
    // what the pair holds.
    let (cpu2, gpu2) = (cpu_handle(&par), cuda_handle(&par));
    let (from_gpu, from_cpu) = (blob(p.gpu), blob(p.cpu));
    unsafe {
        assert_eq!(kivi_state_load(cpu2, from_gpu.as_ptr(), from_gpu.len()), KIVI_OK, "{}", last_error());
        assert_eq!(kivi_state_load(gpu2, from_cpu.as_ptr(), from_cpu.len()), KIVI_OK, "{}", last_error());
    }
    assert!(blob(cpu2) == from_cpu && blob(gpu2) == from_cpu);
    // One more decode step on all four: the loaded ones answer as the originals.
    let mut swapped = Pair::<f16>::of(cpu2, gpu2, 99);
    p.rng = Rng(99);
    for layer in 0..LAYERS {
        p.decode(layer, &[1, 0]);
        swapped.decode(layer, &[1, 0]);
    }
    let (a, b) = p.attend(0, 1, 2, None);
    let (c, d) = swapped.attend(0, 1, 2, None);
    assert!(a == c, "a CPU handle loaded from a CUDA blob answers differently");
    assert!(b == d, "a CUDA handle loaded from a CPU blob answers differently");
    swapped.same("after loading");

    // One sequence: CUDA -> CPU as sequence 9, CPU -> CUDA as sequence 7.
    let (s_gpu, s_cpu) = (seq_blob(p.gpu, 0), seq_blob(p.cpu, 0));
    unsafe {
        assert_eq!(kivi_seq_state_load(p.cpu, 9, s_gpu.as_ptr(), s_gpu.len()), KIVI_OK, "{}", last_error());
        assert_eq!(kivi_seq_state_load(p.gpu, 9, s_cpu.as_ptr(), s_cpu.len()), KIVI_OK, "{}", last_error());
    }
    p.same("after loading a sequence");
    p.rng = Rng(6);
    let (a, b) = p.attend(1, 9, 2, None);
    p.rng = Rng(6);
    let (c, d) = p.attend(1, 0, 2, None);
    assert!(a == c && b == d, "a loaded sequence answers as the one it was saved from");
}

/// Every error on a CUDA handle: its status, a message naming the function and the problem, no
/// output written, and the handle exactly as before.
#[test]
fn cuda_handle_errors_leave_it_unchanged() {
    let mut p = Pair::<f32>::new();
    for layer in 0..LAYERS {
        p.append_attend(layer, 0, 30);
        p.append(layer, 1, 9);
    }
    let g = p.gpu;
    let before = blob(g);
    let unchanged = |what: &str| {
        assert!(blob(g) == before, "{what}: the CUDA cache changed after a failed call");
        assert_eq!(ids(g), [0, 1], "{what}");
    };
    let (k, v, q): (Vec<f32>, Vec<f32>, Vec<f32>) = p.kvq(600);
    let sentinel = -7.5f32;
    let mut out = vec![sentinel; 4 * QROW];
    let untouched = |out: &[f32], what: &str| assert!(out.iter().all(|&x| x == sentinel), "{what}: out written");
    let (k1, v1, q1) = (rows(&k, 1, KVROW), rows(&v, 1, KVROW), rows(&q, 1, QROW));
    unsafe {
        fails(kivi_append(g, 99, 0, &k1, &v1), KIVI_ERR_LAYER_OUT_OF_RANGE, "kivi_append", "layer 99");
        unchanged("bad layer");
        let bad = rows(&k, 1, KVROW - 8);
        fails(kivi_append(g, 0, 0, &bad, &v1), KIVI_ERR_SHAPE, "kivi_append", "keys");
        unchanged("bad row length");
        fails(kivi_append(g, 0, 0, &rows(&k, 2, KVROW), &v1), KIVI_ERR_SHAPE, "kivi_append", "values");
        unchanged("row counts differ");
        let strided = kivi_rows { stride: 2 * KVROW, ..rows(&v, 2, KVROW) };
        fails(kivi_append(g, 0, 0, &rows(&k, 2, KVROW), &strided), KIVI_ERR_SHAPE, "kivi_append", "stride");
        unchanged("strides differ");
        // The CPU converts rows of another dtype; the CUDA kernels take the cache's own.
        let h: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
        let hv: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        let (hk, hv) = (rows(&h, 1, KVROW), rows(&hv, 1, KVROW));
        fails(kivi_append(g, 0, 0, &hk, &hv), KIVI_ERR_INVALID_ARGUMENT, "kivi_append", "dtype");
        unchanged("rows of another dtype");
        assert_eq!(kivi_append(p.cpu, 0, 5, &hk, &hv), KIVI_OK, "the CPU takes them");
        assert_eq!(kivi_seq_remove(p.cpu, 5), KIVI_OK);
        let mut k_null = k1;
        k_null.data = null();
        fails(kivi_append(g, 0, 0, &k_null, &v1), KIVI_ERR_NULL_POINTER, "kivi_append", "keys.data");
        fails(
            kivi_append(g, 0, 0, &rows(&k, 600, KVROW), &rows(&v, 600, KVROW)),
            KIVI_ERR_CAPACITY_EXHAUSTED,
            "kivi_append",
            "",
        );
        unchanged("capacity");
        for seq in 10..14 {
            assert_eq!(kivi_append(g, 0, seq, &k1, &v1), KIVI_OK);
        }
        let full = blob(g);
        fails(kivi_append(g, 0, 20, &k1, &v1), KIVI_ERR_TOO_MANY_SEQUENCES, "kivi_append", "20");
        assert!(blob(g) == full, "too many sequences: the CUDA cache changed");
        for seq in 10..14 {
            assert_eq!(kivi_seq_remove(g, seq), KIVI_OK);
        }
        unchanged("sequences added and removed");

        // Attention: the output is not written either.
        let o1 = rows_mut(&mut out, 1, QROW);
        fails(
            kivi_append_attend(g, 2, 0, &k1, &v1, &q1, &o1, null()),
            KIVI_ERR_LAYER_OUT_OF_RANGE,
            "kivi_append_attend",
            "layer 2",
        );
        let q_bad = rows(&q, 1, QROW - HD);
        let o_bad = rows_mut(&mut out, 1, QROW - HD);
        fails(
            kivi_append_attend(g, 0, 0, &k1, &v1, &q_bad, &o_bad, null()),
            KIVI_ERR_SHAPE,
            "kivi_append_attend",
            "queries",
        );
        let nan = kivi_attn_options {
            struct_size: std::mem::size_of::<kivi_attn_options>() as u32,
            scale: f32::NAN,
            flags: 0,
            sliding_window: 0,
            softcap: 0.0,
        };
        let o1 = rows_mut(&mut out, 1, QROW);
        fails(
            kivi_append_attend(g, 0, 0, &k1, &v1, &q1, &o1, &nan),
            KIVI_ERR_INVALID_ARGUMENT,
            "kivi_append_attend",
            "scale",
        );
        let overlap = kivi_rows_mut { data: q.as_ptr() as *mut c_void, ..o1 };
        fails(
            kivi_append_attend(g, 0, 0, &k1, &v1, &q1, &overlap, null()),
            KIVI_ERR_INVALID_ARGUMENT,
            "kivi_append_attend",
            "overlaps",
        );
        fails(kivi_attend(g, 0, 7, &q1, &o1, null()), KIVI_ERR_UNKNOWN_SEQUENCE, "kivi_attend", "7");
        let (q20, o20) = (rows(&q, 20, QROW), rows_mut(&mut out, 1, QROW));
        fails(kivi_attend(g, 0, 1, &q20, &o20, null()), KIVI_ERR_SHAPE, "kivi_attend", "output");
        untouched(&out, "attend");
        unchanged("attention");

        let (k2, v2, q2, o2) = (rows(&k, 2, KVROW), rows(&v, 2, KVROW), rows(&q, 2, QROW), rows_mut(&mut out, 2, QROW));
        fails(
            kivi_decode(g, 0, [1u32, 1].as_ptr(), 2, &k2, &v2, &q2, &o2, null()),
            KIVI_ERR_INVALID_ARGUMENT,
            "kivi_decode",
            "twice",
        );
        fails(
            kivi_decode(g, 0, [1u32, 0, 3].as_ptr(), 3, &k2, &v2, &q2, &o2, null()),
            KIVI_ERR_SHAPE,
            "kivi_decode",
            "3 sequences",
        );
        fails(
            kivi_decode(g, 5, [1u32, 0].as_ptr(), 2, &k2, &v2, &q2, &o2, null()),
            KIVI_ERR_LAYER_OUT_OF_RANGE,
            "kivi_decode",
            "layer 5",
        );
        untouched(&out, "decode");
        unchanged("decode");

        fails(kivi_seq_copy(g, 1, 1, 3), KIVI_ERR_INVALID_ARGUMENT, "kivi_seq_copy", "1");
        fails(kivi_seq_truncate(g, 4, 3), KIVI_ERR_UNKNOWN_SEQUENCE, "kivi_seq_truncate", "4");
        fails(kivi_seq_keep(g, 4), KIVI_ERR_UNKNOWN_SEQUENCE, "kivi_seq_keep", "4");
        let mut len = 77u32;
        fails(kivi_seq_layer_len(g, 0, 2, &mut len), KIVI_ERR_LAYER_OUT_OF_RANGE, "kivi_seq_layer_len", "2");
        assert_eq!(len, 77);
        unchanged("sequence operations");

        // State: a buffer too small is not written; damaged and foreign blobs are refused.
        let mut small = vec![0xEEu8; before.len() - 1];
        let mut written = 5usize;
        fails(
            kivi_state_save(g, small.as_mut_ptr(), small.len(), &mut written),
            KIVI_ERR_BUFFER_TOO_SMALL,
            "kivi_state_save",
            "",
        );
        assert!(small.iter().all(|&b| b == 0xEE) && written == 5);
        let mut damaged = before.clone();
        damaged[100] ^= 1;
        fails(kivi_state_load(g, damaged.as_ptr(), damaged.len()), KIVI_ERR_CORRUPT_STATE, "kivi_state_load", "");
        let other = cpu_handle(&kivi_params { residual: 24, ..params(DType::F32) });
        let foreign = blob(other);
        kivi_cache_free(other);
        fails(kivi_state_load(g, foreign.as_ptr(), foreign.len()), KIVI_ERR_STATE_MISMATCH, "kivi_state_load", "");
        let seq0 = seq_blob(g, 0);
        fails(
            kivi_seq_state_load(g, 3, seq0.as_ptr(), seq0.len() - 4),
            KIVI_ERR_CORRUPT_STATE,
            "kivi_seq_state_load",
            "",
        );
        unchanged("state");
    }
    // Still in step with the CPU handle after all that.
    p.decode(0, &[0, 1]);
    p.same("after the errors");
}

/// `kivi_cache_prepare` on both backends: a valid number of query heads is accepted (the
/// emulated device has nothing to compile), a bad one named in the error, and the cache is
/// unchanged: its blob and its later calls are the CPU cache's.
#[test]
fn prepare_checks_the_query_heads() {
    let par = params(DType::F32);
    let (cpu, gpu) = (cpu_handle(&par), cuda_handle(&par));
    let k = vec![0.5f32; 3 * KVROW];
    unsafe {
        for h in [cpu, gpu] {
            assert_eq!(kivi_append(h, 0, 1, &rows(&k, 3, KVROW), &rows(&k, 3, KVROW)), KIVI_OK, "{}", last_error());
            let before = blob(h);
            for bad in [0, KV as u32 + 1] {
                fails(
                    kivi_cache_prepare(h, bad),
                    KIVI_ERR_INVALID_ARGUMENT,
                    "kivi_cache_prepare",
                    &format!("n_q_heads {bad} "),
                );
            }
            assert_eq!(kivi_cache_prepare(h, QH as u32), KIVI_OK, "{}", last_error());
            assert!(blob(h) == before, "prepare changed the cache");
        }
        fails(kivi_cache_prepare(null_mut(), QH as u32), KIVI_ERR_NULL_POINTER, "kivi_cache_prepare", "cache");
        assert!(blob(cpu) == blob(gpu));
        kivi_cache_free(cpu);
        kivi_cache_free(gpu);
    }
}

#[test]
fn streams() {
    let par = params(DType::F32);
    let (cpu, gpu) = (cpu_handle(&par), cuda_handle(&par));
    let mut s: *mut c_void = 0x55 as *mut c_void;
    unsafe {
        fails(
            kivi_cache_set_stream(cpu, 0x10 as *mut c_void),
            KIVI_ERR_INVALID_ARGUMENT,
            "kivi_cache_set_stream",
            "CPU cache",
        );
        assert_eq!(kivi_cache_set_stream(cpu, null_mut()), KIVI_OK);
        assert_eq!(kivi_cache_stream(cpu, &mut s), KIVI_OK);
        assert!(s.is_null());
        fails(kivi_cache_stream(cpu, null_mut()), KIVI_ERR_NULL_POINTER, "kivi_cache_stream", "out_stream");
        fails(kivi_cache_set_stream(null_mut(), null_mut()), KIVI_ERR_NULL_POINTER, "kivi_cache_set_stream", "cache");
        assert_eq!(kivi_cache_stream(gpu, &mut s), KIVI_OK);
        assert!(s.is_null(), "a new cache uses the default stream");
        assert_eq!(kivi_cache_set_stream(gpu, 0x1234 as *mut c_void), KIVI_OK);
        assert_eq!(kivi_cache_stream(gpu, &mut s), KIVI_OK);
        assert_eq!(s as usize, 0x1234);
        let gs = gpu;
        let read = || match &*read_cache(gs).unwrap() {
            handle::Backend::Cuda(g) => g.stream(),
            handle::Backend::Cpu(_) => unreachable!(),
        };
        assert_eq!(read() as usize, 0x1234, "the calls get the stream that was set");
        assert_eq!(kivi_cache_set_stream(gpu, null_mut()), KIVI_OK);
        assert!(read().is_null());
        kivi_cache_free(cpu);
        kivi_cache_free(gpu);
    }
}

#[test]
fn cuda_parameters_and_device_info() {
    let mut h: *mut kivi_cache = 0x99 as *mut kivi_cache;
    let sentinel = h;
    unsafe {
        let p = kivi_params { device: -2, ..params(DType::F32) };
        fails(kivi_cache_create(&p, &mut h), KIVI_ERR_INVALID_CONFIG, "kivi_cache_create", "device -2");
        let p = kivi_params { device: 0, n_threads: 4, ..params(DType::F32) };
        fails(kivi_cache_create(&p, &mut h), KIVI_ERR_INVALID_CONFIG, "kivi_cache_create", "n_threads 4");
        assert_eq!(h, sentinel);

        let mut info: kivi_device_info = std::mem::zeroed();
        let size = std::mem::size_of::<kivi_device_info>();
        fails(kivi_cuda_device_info(-1, &mut info, size), KIVI_ERR_INVALID_ARGUMENT, "kivi_cuda_device_info", "-1");
        fails(kivi_cuda_device_info(0, null_mut(), size), KIVI_ERR_NULL_POINTER, "kivi_cuda_device_info", "out");
        fails(kivi_cuda_device_info(0, &mut info, 8), KIVI_ERR_STRUCT_SIZE, "kivi_cuda_device_info", "struct_size 8");
        assert_eq!(info.struct_size, 0, "written by a failed call");
        let st = kivi_cuda_device_info(0, &mut info, size);
        let p = kivi_params { device: 0, ..params(DType::F32) };
        match crate::cuda::device_info(0) {
            Ok(want) => {
                assert_eq!(st, KIVI_OK, "{}", last_error());
                let name = CStr::from_ptr(info.name.as_ptr()).to_str().unwrap();
                assert_eq!(name, want.name);
                assert_eq!((info.struct_size as usize, info.device, info.n_devices), (size, 0, want.count));
                assert_eq!((info.compute_capability_major, info.compute_capability_minor), want.capability);
                assert_eq!(kivi_cache_create(&p, &mut h), KIVI_OK, "{}", last_error());
                let mut back = cache::default_params();
                assert_eq!(kivi_cache_params(h, &mut back, std::mem::size_of::<kivi_params>()), KIVI_OK);
                assert_eq!(back.device, 0);
                kivi_cache_free(h);
            }
            Err(e) => {
                // No CUDA here: the reason, and nothing written.
                fails(
                    st,
                    KIVI_ERR_BACKEND_UNAVAILABLE,
                    "kivi_cuda_device_info",
                    &format!("device 0: {}", {
                        let Error::BackendUnavailable(m) = e else { panic!("{e}") };
                        m
                    }),
                );
                assert_eq!(info.struct_size, 0, "written by a failed call");
                fails(kivi_cache_create(&p, &mut h), KIVI_ERR_BACKEND_UNAVAILABLE, "kivi_cache_create", "device 0: ");
                assert_eq!(h, sentinel);
            }
        }
    }
}
