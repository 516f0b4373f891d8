//! The CUDA cache against the CPU cache, on the operations and configurations of the GPU check
//! (examples/gpu_check.rs), without a GPU: with the kernels emulated in Rust (`emu.rs`) and with
//! the kernels' own CUDA code run by the host simulator (`sim.rs`). Outputs agree within 1e-3
//! (plus a rounding step of the output type); contents, pages and windows are identical.

use half::{bf16, f16};

use super::*;
use crate::attention::AttnOptions;
use crate::cache::Cache;
use crate::config::{DType, KeyMode};
use crate::rows::{Element, Rows, RowsMut};
use crate::testing::Rng;

struct Pair<T: Element> {
    cpu: Cache,
    gpu: CudaCache,
    rng: Rng,
    nqh: usize,
    opts: AttnOptions,
    tol: f64,
    calls: usize,
    /// Values are drawn times this (large values: large value scales).
    vscale: f32,
    /// Keys are drawn times this (large keys: scores far above the earlier tokens').
    kscale: f32,
    _t: std::marker::PhantomData<T>,
}

/// How the CUDA cache of a test runs its kernels: the Rust emulation, or their own code in
/// the host simulator.
type Backend = fn(CacheConfig) -> Result<CudaCache>;
const EMU: Backend = CudaCache::emulated;
const SIM: Backend = CudaCache::simulated;

fn ptr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

impl<T: Element + Default> Pair<T> {
    fn new(mk: Backend, cfg: CacheConfig, nqh: usize, opts: AttnOptions) -> Self {
        let ulp = match T::DTYPE {
            DType::F32 => 0.0,
            DType::F16 => 1.0 / 1024.0,
            DType::BF16 => 1.0 / 128.0,
        };
        Pair {
            cpu: Cache::new(cfg.clone()).unwrap(),
            gpu: mk(cfg).unwrap(),
            rng: Rng(7),
            nqh,
            opts,
            tol: 1e-3 + ulp,
            calls: 0,
            vscale: 1.0,
            kscale: 1.0,
            _t: Default::default(),
        }
    }
    fn dims(&self) -> (usize, usize) {
        (self.cpu.lay.n_kv_heads, self.cpu.lay.head_dim)
    }
    fn compare(&mut self, what: &str, got: &[T], want: &[T]) {
        self.calls += 1;
        let e = crate::testing::rel_err(got, want);
        assert!(e <= self.tol, "{what}: relative error {e:e} (config {:?})", self.cpu.config());
    }
    fn data(&mut self, n: usize) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (nkv, hd) = self.dims();
        let k: Vec<T> = self.rng.rows(n * nkv * hd, true, hd);
        let k = k.iter().map(|x| T::from_f32(x.to_f32() * self.kscale)).collect();
        let v: Vec<T> = self.rng.rows(n * nkv * hd, false, hd);
        let v = v.iter().map(|x| T::from_f32(x.to_f32() * self.vscale)).collect();
        let q = self.rng.rows(n * self.nqh * hd, false, hd);
        (k, v, q)
    }
    fn append_attend(&mut self, layer: u32, seq: u32, n: usize) {
        let (nkv, hd) = self.dims();
        let (k, v, q) = self.data(n);
        let (mut a, mut b) = (vec![T::default(); q.len()], vec![T::default(); q.len()]);
        let (rk, rv, rq) = (Rows::new(&k, n).unwrap(), Rows::new(&v, n).unwrap(), Rows::new(&q, n).unwrap());
        let r = self.cpu.append_attend(layer, seq, rk, rv, rq, RowsMut::new(&mut a, n).unwrap(), &self.opts);
        let g = self.gpu.append_attend(
            layer,
            seq,
            DevRows::new(ptr(&k), n, nkv * hd),
            DevRows::new(ptr(&v), n, nkv * hd),
            DevRows::new(ptr(&q), n, self.nqh * hd),
            DevRows::new(b.as_mut_ptr() as u64, n, self.nqh * hd),
            &self.opts,
            std::ptr::null_mut(),
        );
        assert_eq!(r, g);
        self.compare(&format!("append_attend({layer}, {seq}, {n})"), &b, &a);
    }
    fn append(&mut self, layer: u32, seq: u32, n: usize) {
        let (nkv, hd) = self.dims();
        let (k, v, _) = self.data(n);
        let r = self.cpu.append(layer, seq, Rows::new(&k, n).unwrap(), Rows::new(&v, n).unwrap());
        let g = self.gpu.append(
            layer,
            seq,
            DevRows::new(ptr(&k), n, nkv * hd),
            DevRows::new(ptr(&v), n, nkv * hd),
            std::ptr::null_mut(),
        );
        assert_eq!(r, g);
    }
    fn decode(&mut self, layer: u32, seqs: &[u32]) {
        let (nkv, hd) = self.dims();
        let n = seqs.len();
        let (k, v, q) = self.data(n);
        let (mut a, mut b) = (vec![T::default(); q.len()], vec![T::default(); q.len()]);
        let (rk, rv, rq) = (Rows::new(&k, n).unwrap(), Rows::new(&v, n).unwrap(), Rows::new(&q, n).unwrap());
        let r = self.cpu.decode(layer, seqs, rk, rv, rq, RowsMut::new(&mut a, n).unwrap(), &self.opts);
        let g = self.gpu.decode(
            layer,
            seqs,
            DevRows::new(ptr(&k), n, nkv * hd),
            DevRows::new(ptr(&v), n, nkv * hd),
            DevRows::new(ptr(&q), n, self.nqh * hd),
            DevRows::new(b.as_mut_ptr() as u64, n, self.nqh * hd),
            &self.opts,
            std::ptr::null_mut(),
        );
        assert_eq!(r, g);
        self.compare(&format!("decode({layer}, {seqs:?})"), &b, &a);
    }
    fn attend(&mut self, layer: u32, seq: u32, n: usize) {
        let hd = self.dims().1;
        let q: Vec<T> = self.rng.rows(n * self.nqh * hd, false, hd);
        let (mut a, mut b) = (vec![T::default(); q.len()], vec![T::default(); q.len()]);
        let r = self.cpu.attend(layer, seq, Rows::new(&q, n).unwrap(), RowsMut::new(&mut a, n).unwrap(), &self.opts);
        let g = self.gpu.attend(
            layer,
            seq,
            DevRows::new(ptr(&q), n, self.nqh * hd),
            DevRows::new(b.as_mut_ptr() as u64, n, self.nqh * hd),
            &self.opts,
            std::ptr::null_mut(),
        );
        assert_eq!(r, g);
        self.compare(&format!("attend({layer}, {seq}, {n})"), &b, &a);
    }
    fn state(&self, when: &str) {
        let host = self.gpu.to_host(std::ptr::null_mut()).unwrap();
        assert_eq!(host.seq_ids(), self.cpu.seq_ids(), "{when}");
        assert_eq!(self.gpu.stats(), self.cpu.stats(), "{when}");
        for seq in self.cpu.seq_ids() {
            for layer in 0..self.cpu.config().n_layers {
                let (a, b) = (host.dequantized(layer, seq).unwrap(), self.cpu.dequantized(layer, seq).unwrap());
                assert!(a == b, "{when}: contents of seq {seq} layer {layer} differ ({:?})", self.cpu.config());
            }
        }
        // Pages and windows byte for byte: the same pages are allocated in the same order.
        assert!(host.windows.bytes() == self.cpu.windows.bytes(), "{when}: windows differ");
        for l in 0..self.cpu.lay.n_layers {
            assert!(host.pools[l].bytes() == self.cpu.pools[l].bytes(), "{when}: pages of layer {l} differ");
        }
    }
}

fn scenario<T: Element + Default>(mk: Backend, cfg: CacheConfig, nqh: usize, opts: AttnOptions) -> usize {
    let mut p = Pair::<T>::new(mk, cfg.clone(), nqh, opts);
    let (g, ring, s) = (cfg.group_size as usize, (cfg.residual + cfg.group_size) as usize, cfg.sinks as usize);
    for layer in 0..cfg.n_layers {
        p.append_attend(layer, 0, s + ring + 2 * g + 5);
        p.append_attend(layer, 1, 3);
        p.append_attend(layer, 1, g + 1);
        p.append(layer, 2, 2 * g + 7);
    }
    p.state("after prefill");
    for step in 0..g + 3 {
        for layer in 0..cfg.n_layers {
            let seqs: &[u32] = if step % 5 == 4 { &[2, 0] } else { &[0, 1, 2] };
            p.decode(layer, seqs);
        }
    }
    p.state("after decode");
    assert_eq!(
        p.cpu.seq_copy(0, 3, (s + g + 3) as u32),
        p.gpu.seq_copy(0, 3, (s + g + 3) as u32, std::ptr::null_mut())
    );
    assert_eq!(p.cpu.seq_copy(0, 4, u32::MAX), p.gpu.seq_copy(0, 4, u32::MAX, std::ptr::null_mut()));
    for _ in 0..g + 2 {
        for layer in 0..cfg.n_layers {
            p.decode(layer, &[3, 0, 4]);
        }
    }
    p.state("after fork");
    let cut = (s + g / 2 + 1) as u32;
    assert_eq!(p.cpu.seq_truncate(1, cut), p.gpu.seq_truncate(1, cut, std::ptr::null_mut()));
    p.state("after truncate");
    for layer in 0..cfg.n_layers {
        for _ in 0..3 {
            p.decode(layer, &[1]);
        }
        p.append_attend(layer, 1, g + 5);
        p.attend(layer, 0, 5);
        p.attend(layer, 3, 1);
    }
    p.state("after appends past the cut");
    assert_eq!(p.cpu.seq_remove(2), p.gpu.seq_remove(2));
    for layer in 0..cfg.n_layers {
        p.decode(layer, &[5, 0]);
        p.decode(layer, &[5, 0]);
    }
    p.state("after remove");
    // State blobs: the CUDA cache saves exactly what the CPU cache saves, and loads it back.
    let blob = p.gpu.save_state_vec(std::ptr::null_mut()).unwrap();
    assert!(blob == p.cpu.save_state_vec(), "whole-cache blobs differ");
    let mut fresh = mk(cfg.clone()).unwrap();
    fresh.load_state(&blob).unwrap();
    assert!(fresh.save_state_vec(std::ptr::null_mut()).unwrap() == blob);
    // Sequence blobs too, although the CUDA cache writes them through a host copy of another
    // capacity.
    let sblob = p.gpu.save_seq_state_vec(3, std::ptr::null_mut()).unwrap();
    assert!(sblob == p.cpu.save_seq_state_vec(3).unwrap(), "sequence blobs differ");
    let mut cpu2 = Cache::new(cfg.clone()).unwrap();
    cpu2.load_seq_state(9, &sblob).unwrap();
    for layer in 0..cfg.n_layers {
        assert!(cpu2.dequantized(layer, 9).unwrap() == p.cpu.dequantized(layer, 3).unwrap());
    }
    fresh.load_seq_state(9, &p.cpu.save_seq_state_vec(3).unwrap()).unwrap();
    let fh = fresh.to_host(std::ptr::null_mut()).unwrap();
    for layer in 0..cfg.n_layers {
        assert!(fh.dequantized(layer, 9).unwrap() == p.cpu.dequantized(layer, 3).unwrap());
    }
    assert!(fresh.load_state(&blob[..blob.len() - 1]).is_err());
    // Blobs of a CPU cache with another page size (as CPU engines configure it) load into the
    // CUDA cache, and the CUDA cache's blobs into it.
    let other = CacheConfig { page_tokens: if cfg.page_tokens == 0 { 4 * cfg.group_size } else { 0 }, ..cfg.clone() };
    let mut cpu_other = Cache::new(other).unwrap();
    cpu_other.load_state(&blob).unwrap();
    let mut gpu_other = mk(cfg.clone()).unwrap();
    gpu_other.load_state(&cpu_other.save_state_vec()).unwrap();
    gpu_other.load_seq_state(9, &cpu_other.save_seq_state_vec(3).unwrap()).unwrap();
    gpu_other.seq_from_host(&cpu_other, 3, 10).unwrap();
    let gh = gpu_other.to_host(std::ptr::null_mut()).unwrap();
    for seq in p.cpu.seq_ids() {
        for layer in 0..cfg.n_layers {
            let want = p.cpu.dequantized(layer, seq).unwrap();
            assert!(cpu_other.dequantized(layer, seq).unwrap() == want, "seq {seq} layer {layer}");
            assert!(gh.dequantized(layer, seq).unwrap() == want, "seq {seq} layer {layer}");
        }
    }
    for layer in 0..cfg.n_layers {
        assert!(gh.dequantized(layer, 9).unwrap() == p.cpu.dequantized(layer, 3).unwrap());
        assert!(gh.dequantized(layer, 10).unwrap() == p.cpu.dequantized(layer, 3).unwrap());
    }
    // One sequence out to the host and back in, under another id.
    let one = p.gpu.seq_to_host(0, std::ptr::null_mut()).unwrap();
    assert_eq!(one.seq_ids(), vec![0]);
    for layer in 0..cfg.n_layers {
        assert!(one.dequantized(layer, 0).unwrap() == p.cpu.dequantized(layer, 0).unwrap());
    }
    p.gpu.seq_from_host(&one, 0, 6).unwrap();
    assert_eq!(p.cpu.seq_copy(0, 6, u32::MAX), Ok(()));
    for layer in 0..cfg.n_layers {
        p.decode(layer, &[6, 0]);
    }
    let host = p.gpu.to_host(std::ptr::null_mut()).unwrap();
    for layer in 0..cfg.n_layers {
        assert!(host.dequantized(layer, 6).unwrap() == p.cpu.dequantized(layer, 6).unwrap());
    }
    // Round trip through the host.
    let host = p.gpu.to_host(std::ptr::null_mut()).unwrap();
    let mut back = mk(cfg.clone()).unwrap();
    back.upload(&host).unwrap();
    let again = back.to_host(std::ptr::null_mut()).unwrap();
    assert!(again.windows.bytes() == host.windows.bytes());
    assert_eq!(again.seq_ids(), host.seq_ids());
    p.calls
}

#[allow(clippy::too_many_arguments)]
fn cfg(
    hd: u32,
    nkv: u32,
    bits: (u8, u8),
    g: u32,
    r: u32,
    sinks: u32,
    mode: KeyMode,
    dt: DType,
    pt: u32,
) -> CacheConfig {
    let mut c = CacheConfig::new(2, nkv, hd);
    c.key_bits = bits.0;
    c.value_bits = bits.1;
    c.group_size = g;
    c.residual = r;
    c.sinks = sinks;
    c.key_mode = mode;
    c.value_group = if hd % 32 == 0 {
        32
    } else if hd % 16 == 0 {
        16
    } else {
        hd / 2
    };
    c.dtype = dt;
    c.max_tokens = 2048;
    c.max_seqs = 8;
    // Block tables half a pool long: their row length differs from the pool's page count.
    c.max_seq_tokens = 1024;
    c.page_tokens = pt;
    c
}

/// The scenario over configurations that reach every branch of the kernels.
fn every_configuration(mk: Backend) {
    use DType::*;
    use KeyMode::*;
    let d = AttnOptions::default();
    let nc = AttnOptions { causal: false, ..d };
    let sw = AttnOptions { sliding_window: 50, ..d };
    let sc = AttnOptions { softcap: 30.0, scale: Some(0.2), ..d };
    let mut calls = 0;
    calls += scenario::<f32>(mk, cfg(64, 2, (2, 2), 32, 128, 0, PerChannel, F32, 0), 8, d);
    calls += scenario::<bf16>(mk, cfg(80, 2, (8, 8), 16, 32, 4, PerChannel, BF16, 64), 2, sw);
    calls += scenario::<f32>(mk, cfg(8, 2, (2, 2), 8, 0, 0, PerToken, F32, 0), 4, d);
    if cfg!(debug_assertions) {
        return; // the rest takes minutes unoptimised; CI runs the tests optimised
    }
    // Values rounded min/max (the paper's) rather than by least squares, as everywhere else.
    let mm = CacheConfig {
        value_rounding: crate::config::Rounding::MinMax,
        ..cfg(128, 1, (4, 4), 32, 64, 0, PerChannel, F16, 0)
    };
    calls += scenario::<f16>(mk, mm, 4, d);
    calls += scenario::<f32>(mk, cfg(64, 1, (2, 2), 8, 16, 1, PerChannel, F32, 32), 1, d);
    calls += scenario::<f16>(mk, cfg(96, 2, (2, 4), 32, 0, 0, PerChannel, F16, 0), 6, nc);
    calls += scenario::<f32>(mk, cfg(256, 1, (2, 2), 32, 32, 2, PerToken, F32, 0), 4, sc);
    calls += scenario::<f16>(mk, cfg(128, 2, (4, 2), 64, 128, 0, PerToken, F16, 128), 4, d);
    calls += scenario::<f16>(mk, cfg(128, 2, (2, 2), 32, 128, 0, PerChannel, F16, 128), 32, sc);
    // Tensor-core decode with sliding windows, softcap, sinks, bf16 and f32 windows.
    calls += scenario::<f16>(mk, cfg(64, 2, (2, 2), 32, 64, 0, PerChannel, F16, 0), 8, sw);
    calls += scenario::<bf16>(mk, cfg(128, 1, (2, 4), 16, 32, 0, PerChannel, BF16, 64), 8, sc);
    calls += scenario::<f32>(mk, cfg(64, 2, (4, 2), 16, 32, 3, PerChannel, F32, 64), 4, nc);
    // The transposed tensor-core decode with 1 and 3 query heads per kv head (columns of the
    // products left unused).
    calls += scenario::<f32>(mk, cfg(128, 2, (2, 4), 64, 64, 2, PerChannel, F32, 0), 2, d);
    calls += scenario::<f16>(mk, cfg(64, 1, (2, 2), 32, 96, 0, PerChannel, F16, 64), 3, sw);
    // G = 48: a multiple of 16 that is not a power of two (the CUDA-core kernel: a lane's key
    // codes would straddle words in the tensor-core one).
    let g48 = CacheConfig { value_group: 40, ..cfg(80, 1, (4, 2), 48, 48, 3, PerChannel, F32, 192) };
    calls += scenario::<f32>(mk, g48, 4, sc);
    assert!(calls > 500);
}

/// Contexts long enough for many splits, over the group sizes and bit widths of the
/// tensor-core path.
fn long_contexts(mk: Backend, n: usize) {
    for (bits, g) in [(2u8, 32u32), (4, 32), (4, 64), (2, 16), (2, 64)] {
        let mut c = cfg(64, 2, (bits, bits), g, 64, 0, KeyMode::PerChannel, DType::F16, 0);
        c.n_layers = 1;
        (c.max_tokens, c.max_seq_tokens) = (8192, 0);
        let mut p = Pair::<f16>::new(mk, c, 8, AttnOptions::default());
        p.append(0, 0, n);
        p.append(0, 1, n / 3);
        for _ in 0..3 {
            p.decode(0, &[0, 1]);
        }
        p.state("after long decode");
    }
}

/// One decode launch over many sequences of different lengths.
fn batched_decode(mk: Backend, n: u32, steps: usize) {
    let mut c = cfg(64, 2, (2, 2), 32, 64, 0, KeyMode::PerChannel, DType::F32, 0);
    c.n_layers = 1;
    c.max_seqs = n;
    c.max_tokens = n * 400;
    let mut p = Pair::<f32>::new(mk, c.clone(), 8, AttnOptions::default());
    for seq in 0..n {
        p.append_attend(0, seq, 1 + (seq as usize * 37) % if cfg!(debug_assertions) { 100 } else { 300 });
    }
    let all: Vec<u32> = (0..n).collect();
    for _ in 0..steps {
        p.decode(0, &all);
    }
    p.state("after batched decode");
}

#[test]
fn emulated_kernels_match_the_cpu_cache() {
    every_configuration(EMU);
}

#[test]
fn emulated_long_contexts_use_many_splits() {
    long_contexts(EMU, if cfg!(debug_assertions) { 1200 } else { 3000 });
}

#[test]
fn emulated_batched_decode_of_many_sequences() {
    batched_decode(EMU, if cfg!(debug_assertions) { 66 } else { 70 }, 34);
}

// The same with the kernels' own CUDA code, run by the host simulator (sim.rs).

#[test]
fn simulated_kernels_match_the_cpu_cache() {
    every_configuration(SIM);
}

#[test]
fn simulated_long_contexts_use_many_splits() {
    long_contexts(SIM, if cfg!(debug_assertions) { 600 } else { 3000 });
}

/// head_dim 256 (Gemma) decodes on tensor cores, its shared memory dynamic (`KV_MMA_DYN`): the
/// transposed products with 32 value channels per lane (64 bits of codes at 2 bits, 128 at 4),
/// GQA ratios 2, 4 and 8 (two blocks per kv head), softcap and sliding windows, sinks, f16,
/// bf16 and f32 windows, through the whole scenario (forks, truncation, state blobs), then a
/// context of many splits. Chunks of queries take it too (4 query vectors per block; their
/// full-precision tokens on `kv_prefill_fp` in f16 and bf16 caches, on its CUDA-core split in
/// f32 ones), and layouts whose shared memory would pass 99 KB (4 bits at G = 64) keep the
/// CUDA-core kernel.
#[test]
fn simulated_head_dim_256_decodes_on_tensor_cores() {
    use crate::cuda::kernels::{tensor_core_chunk_tokens, tensor_core_chunks, tensor_core_decode};
    use KeyMode::PerChannel;
    let d = AttnOptions::default();
    let sc = AttnOptions { softcap: 50.0, scale: Some(0.0625), ..d };
    let sw = AttnOptions { sliding_window: 40, ..d };
    let cases = [
        (cfg(256, 2, (2, 2), 32, 64, 1, PerChannel, DType::F16, 0), 8, sc),
        // value groups of 64 channels: two lanes' channels in each
        (CacheConfig { value_group: 64, ..cfg(256, 1, (4, 4), 32, 32, 0, PerChannel, DType::BF16, 64) }, 8, sw),
        (cfg(256, 2, (2, 4), 16, 32, 2, PerChannel, DType::F32, 0), 2, d),
        (cfg(256, 1, (2, 2), 64, 64, 0, PerChannel, DType::F16, 0), 2, sw),
    ];
    for (c, nqh, opts) in cases {
        let what = format!("{} query heads, {c:?}", nqh);
        let n = nqh as u32;
        assert!(tensor_core_decode(&c, n) && tensor_core_chunks(&c, n), "{what}");
        assert_eq!(tensor_core_chunk_tokens(&c, n), c.dtype != DType::F32, "{what}");
        let before = sim::launches_of("kv_decode_mma");
        match c.dtype {
            DType::BF16 => scenario::<bf16>(SIM, c.clone(), nqh, opts),
            DType::F16 => scenario::<f16>(SIM, c.clone(), nqh, opts),
            DType::F32 => scenario::<f32>(SIM, c.clone(), nqh, opts),
        };
        assert!(sim::launches_of("kv_decode_mma") > before, "{what}: no decode on tensor cores");
    }
    let big = cfg(256, 1, (4, 4), 64, 64, 0, PerChannel, DType::F16, 0);
    assert!(!tensor_core_decode(&big, 4) && !tensor_core_chunks(&big, 4));
    // Many splits, several groups per warp.
    let mut c = cfg(256, 1, (2, 2), 32, 64, 0, PerChannel, DType::F16, 0);
    c.n_layers = 1;
    (c.max_tokens, c.max_seq_tokens) = (4096, 0);
    let mut p = Pair::<f16>::new(SIM, c, 4, d);
    p.append(0, 0, if cfg!(debug_assertions) { 700 } else { 2500 });
    for _ in 0..3 {
        p.decode(0, &[0]);
    }
    p.state("after long decode");
}

/// `module_specs` names exactly the modules a cache loads (what `gpu_check precompile` compiles
/// ahead of the GPU check): appends, decode steps, short and long chunks and `attend`, on tensor
/// cores at head_dim 64, 128 and 256 and GQA 1 to 12, and on CUDA cores (8-bit codes).
#[test]
fn module_specs_name_the_modules_a_cache_loads() {
    use KeyMode::PerChannel;
    for (hd, nqh, bits) in [(128, 16, (2, 2)), (128, 4, (4, 4)), (256, 4, (2, 2)), (64, 24, (2, 4)), (128, 8, (8, 8))] {
        let mut c = cfg(hd, 2, bits, 32, 32, 1, PerChannel, DType::F16, 0);
        c.n_layers = 1;
        sim::take_modules();
        let mut p = Pair::<f16>::new(SIM, c.clone(), nqh, AttnOptions::default());
        p.append(0, 0, 100);
        p.append_attend(0, 0, 2);
        p.append_attend(0, 0, 20);
        p.decode(0, &[0]);
        p.attend(0, 0, 3);
        let mut used = sim::take_modules();
        let mut named = module_specs(&c, nqh as u32, true).unwrap();
        let key = |m: &(Family, Spec)| format!("{m:?}");
        used.sort_by_key(key);
        named.sort_by_key(key);
        assert_eq!(used, named, "head_dim {hd}, {nqh} query heads, {bits:?} bits");
    }
    assert!(module_specs(&cfg(128, 2, (2, 2), 32, 32, 1, PerChannel, DType::F16, 0), 3, true).is_err());
}

/// A cache compiles every module with the extra NVRTC options of its creation (`KIVI_NVRTC_OPTS`
/// then), whenever it compiles it: caches made under different options are the variants that
/// `gpu_check variants` times side by side, and their chunks' modules are compiled at their
/// first chunk, after the options have changed for the next variant.
#[test]
fn a_cache_compiles_its_modules_with_the_options_it_was_made_with() {
    // An option the simulator does not compile (not a macro): the modules are the default's.
    let opt = "--ptxas-options=-v";
    let mut c = cfg(128, 2, (2, 2), 32, 32, 1, KeyMode::PerChannel, DType::F16, 0);
    c.n_layers = 1;
    let nqh = 8;
    let mut p = Pair::<f16>::new(SIM, c.clone(), nqh, AttnOptions::default());
    // As if KIVI_NVRTC_OPTS had held it when the cache was made (Spec::new reads it there).
    p.gpu.quant_spec = p.gpu.quant_spec.clone().with_option(opt);
    sim::take_modules();
    p.append(0, 0, 100);
    p.append_attend(0, 0, 20);
    p.decode(0, &[0]);
    p.attend(0, 0, 3);
    let key = |m: &(Family, Spec)| format!("{m:?}");
    let mut used = sim::take_modules();
    used.sort_by_key(key);
    let mut want: Vec<_> =
        module_specs(&c, nqh as u32, true).unwrap().into_iter().map(|(f, s)| (f, s.with_option(opt))).collect();
    want.sort_by_key(key);
    assert_eq!(used, want);
    // prepare_attention's list, which it compiles on a GPU.
    let mut listed = p.gpu.attention_modules(nqh);
    listed.sort_by_key(key);
    want.retain(|(f, _)| *f != Family::Quantize);
    assert_eq!(listed, want);
}

/// Chunks of queries (append_attend, attend) over a quantized past take the tensor-core kernel,
/// 8 / ratio query rows per block (GQA groups of more than 8 heads: several blocks per kv head),
/// and so does decode: every ratio, chunk sizes around the rows per block and the group size,
/// causal and sliding-window masks that cut through groups.
#[test]
fn simulated_chunks_of_queries_use_tensor_cores() {
    for (hd, nqh, opts) in [
        (128, 8, AttnOptions::default()), // ratio 4: 2 rows per block
        (128, 2, AttnOptions { sliding_window: 70, ..Default::default() }), // ratio 1: 8 rows
        (128, 16, AttnOptions { causal: false, ..Default::default() }), // ratio 8: 1 row
        (128, 6, AttnOptions { softcap: 30.0, ..Default::default() }), // ratio 3: 2 rows, 6 vectors
        (128, 24, AttnOptions::default()), // ratio 12: 2 blocks per kv head
        // head_dim 256: 4 query vectors per block
        (256, 2, AttnOptions { sliding_window: 70, ..Default::default() }), // ratio 1: 4 rows
        (256, 4, AttnOptions::default()),                                   // ratio 2: 2 rows
        (256, 6, AttnOptions { softcap: 30.0, ..Default::default() }),      // ratio 3: 1 row, 3 vectors
        (256, 16, AttnOptions { causal: false, ..Default::default() }),     // ratio 8: 2 blocks per kv head
    ] {
        let mut c = cfg(hd, 2, (2, 2), 32, 32, 0, KeyMode::PerChannel, DType::F16, 0);
        c.n_layers = 1;
        assert!(crate::cuda::kernels::tensor_core_chunks(&c, nqh as u32), "head_dim {hd}, {nqh} query heads");
        let mut p = Pair::<f16>::new(SIM, c, nqh, opts);
        // The quantized groups: kv_decode_mma, or kv_prefill_q for chunks of 8 rows or more.
        let launches = || sim::launches_of("kv_decode_mma") + sim::launches_of("kv_prefill_q");
        let before = launches();
        p.append(0, 0, 200);
        for n in [1, 2, 3, 9, 31, 33] {
            p.append_attend(0, 0, n);
        }
        p.attend(0, 0, 17);
        assert_eq!(launches() - before, 7, "head_dim {hd}, {nqh} query heads: every chunk on tensor cores");
        p.decode(0, &[0]);
        assert_eq!(launches() - before, 8, "head_dim {hd}, {nqh} query heads: decode on tensor cores");
        p.state("after chunks");
    }
}

/// The full-precision tokens of chunks of at least 8 query rows (f16 and bf16 caches) take
/// `kv_prefill_fp`, 64 query vectors per block (64 / heads-per-block rows): prompts with no past,
/// chunks over a past of quantized groups, sinks and a window ring that has wrapped, queries of
/// stored tokens only; row counts around the rows per block, calls in several launches (7 items
/// each here), GQA ratios 1, 3, 4, 8 and 12 (two blocks of heads per kv head, the second
/// partial), causal, non-causal, sliding-window and softcapped scores, head_dim 128 and 80, and
/// head_dim 256 (32 query vectors per block, two warps for each 16, half of the output channels
/// each; dynamic shared memory). Chunks of fewer rows stay with split 0 of `kv_decode_mma`.
#[test]
fn simulated_chunk_tokens_use_tensor_cores() {
    for (nqh, opts, sinks, hd) in [
        // ratio 4: 16 rows per block; the prompt's 4th block sees from position 31, the last of
        // the first tile
        (8, AttnOptions { sliding_window: 18, ..Default::default() }, 0, 128),
        (2, AttnOptions { sliding_window: 70, ..Default::default() }, 2, 128), // ratio 1: 64 rows
        (6, AttnOptions { softcap: 30.0, ..Default::default() }, 0, 128),      // ratio 3: 21 rows
        (16, AttnOptions { causal: false, ..Default::default() }, 1, 128),     // ratio 8: 8 rows
        (24, AttnOptions { sliding_window: 100, ..Default::default() }, 0, 128), // ratio 12: 8 rows
        // head_dim 80: the last 16 channels of a key tile read on their own
        (8, AttnOptions::default(), 0, 80),
        // head_dim 256: ratio 2, 16 rows per block; ratio 3, 10 rows (30 vectors of 32); ratio
        // 8, two blocks of 4 heads per kv head, 8 rows
        (4, AttnOptions { sliding_window: 40, ..Default::default() }, 1, 256),
        (6, AttnOptions { softcap: 30.0, ..Default::default() }, 0, 256),
        (16, AttnOptions { causal: false, ..Default::default() }, 0, 256),
    ] {
        chunk_tokens_case::<f16>(nqh, opts, sinks, hd);
    }
    // bf16: bf16 operands, the weights' hi and lo parts in bf16.
    chunk_tokens_case::<bf16>(8, AttnOptions::default(), 1, 128);
    chunk_tokens_case::<bf16>(4, AttnOptions::default(), 0, 256);
}

fn chunk_tokens_case<T: Element + Default>(nqh: usize, opts: AttnOptions, sinks: u32, hd: u32) {
    let mut c = cfg(hd, 2, (2, 2), 32, 32, sinks, KeyMode::PerChannel, T::DTYPE, 0);
    c.n_layers = 1;
    assert!(crate::cuda::kernels::tensor_core_chunk_tokens(&c, nqh as u32), "{nqh} query heads");
    let mut p = Pair::<T>::new(SIM, c, nqh, opts);
    let fp = || sim::launches_of("kv_prefill_fp");
    let before = fp();
    // At most 7 items of qt rows per launch, the launches of a call alike in size: a call of n
    // rows launches kv_prefill_fp in those of its launches with 8 rows or more.
    attention::ROW_ITEMS.set(7);
    let nq = crate::cuda::kernels::mma_max_nq(hd as usize);
    let qt = nq / (nqh / 2).min(nq);
    let launches = |n: usize| {
        let items = n.div_ceil(qt);
        let per = qt * items.div_ceil(items.div_ceil(7));
        (0..n).step_by(per).filter(|r0| (n - r0).min(per) >= 8).count()
    };
    // A prompt: the chunk alone, its rows cut at no block's edge. kv_prefill_fp writes its output
    // (nothing to combine, no scratch: one launch).
    let combines = || sim::launches_of("kv_decode_combine");
    let c0 = combines();
    p.append_attend(0, 0, 53);
    assert_eq!(fp() - before, 1, "{nqh} query heads: a prompt");
    assert_eq!(combines(), c0, "{nqh} query heads: a prompt's combine");
    // Still nothing quantized: one launch again.
    p.append_attend(0, 0, 8);
    assert_eq!(fp() - before, 2, "{nqh} query heads: a second chunk");
    p.append(0, 0, 150);
    // Over quantized groups, sinks and the ring, in several launches. The 21 rows' keys are
    // large: their scores pass the earlier tiles' maxima by far (the accumulators are rescaled).
    for n in [21, 64, 140] {
        p.kscale = if n == 21 { 8.0 } else { 1.0 };
        p.append_attend(0, 0, n);
    }
    p.attend(0, 0, 40);
    let want: usize = 2 + [21, 64, 140, 40].into_iter().map(launches).sum::<usize>();
    assert_eq!(fp() - before, want, "{nqh} query heads: every chunk of 8 rows or more");
    // 7 rows: split 0 of kv_decode_mma.
    p.append_attend(0, 0, 7);
    assert_eq!(fp() - before, want, "{nqh} query heads: 7 rows");
    p.state("after chunks");
    attention::ROW_ITEMS.set(usize::MAX);
}

/// The quantized groups of chunks of at least 8 query rows (f16 and bf16 caches) take
/// `kv_prefill_q`, 64 query vectors per block, each tile of 32 tokens dequantized once into
/// shared memory: G of 16, 32 and 64 (tiles of two groups, of one, of half of one), 2- and
/// 4-bit keys and values in every pairing, several groups per page, head_dim 128, 80 and 64, and
/// 256 (32 query vectors per block; bf16's shared memory dynamic), sinks, GQA ratios 1, 2, 3, 4,
/// 8 and 12, splits whose first token is not at a tile's edge (G = 16, an odd number of groups
/// per split), sliding windows that start inside the quantized tokens, softcapped and non-causal
/// scores, queries of stored tokens (quantized ones among them), several launches per call.
#[test]
fn simulated_chunks_over_quantized_groups_use_tensor_cores() {
    let f16c = |hd, bits, g, pt, sinks| {
        let mut c = cfg(hd, 2, bits, g, g.max(32), sinks, KeyMode::PerChannel, DType::F16, pt);
        c.n_layers = 1;
        c
    };
    let d = AttnOptions::default();
    for (c, nqh, opts, past) in [
        (f16c(128, (2, 2), 32, 0, 0), 8, d, 300),
        // 37 groups of 16: two splits of 19 and 18 groups, the second from token 304
        (f16c(128, (4, 2), 16, 64, 1), 2, AttnOptions { sliding_window: 400, ..d }, 600),
        (f16c(80, (2, 4), 64, 0, 0), 6, AttnOptions { softcap: 30.0, ..d }, 300),
        (f16c(64, (4, 4), 32, 128, 2), 24, AttnOptions { causal: false, ..d }, 200),
        // head_dim 256: ratio 2 (16 rows per block), ratio 3 at G = 16 (10 rows of 3 heads)
        (f16c(256, (2, 2), 32, 0, 1), 4, AttnOptions { sliding_window: 250, ..d }, 300),
        (f16c(256, (4, 2), 16, 0, 0), 6, AttnOptions { softcap: 30.0, ..d }, 200),
    ] {
        chunks_over_groups_case::<f16>(c, nqh, opts, past);
    }
    for (hd, bits, nqh) in [(128, (2, 2), 8), (256, (4, 4), 16)] {
        let mut c = cfg(hd, 2, bits, 32, 32, 1, KeyMode::PerChannel, DType::BF16, 0);
        c.n_layers = 1;
        chunks_over_groups_case::<bf16>(c, nqh, AttnOptions { sliding_window: 150, ..d }, 300);
    }
}

fn chunks_over_groups_case<T: Element + Default>(c: CacheConfig, nqh: usize, opts: AttnOptions, past: usize) {
    let what = format!("{nqh} query heads, config {c:?}");
    assert!(crate::cuda::kernels::tensor_core_chunk_tokens(&c, nqh as u32), "{what}");
    let nq = crate::cuda::kernels::mma_max_nq(c.head_dim as usize);
    let mut p = Pair::<T>::new(SIM, c, nqh, opts);
    let q = || sim::launches_of("kv_prefill_q");
    let mma = || sim::launches_of("kv_decode_mma");
    p.append(0, 0, past);
    let q0 = q();
    // The keys of some chunks large: their scores pass the quantized tiles' maxima by far.
    for (n, ks) in [(8, 1.0), (40, 4.0), (70, 1.0)] {
        p.kscale = ks;
        p.append_attend(0, 0, n);
    }
    p.kscale = 1.0;
    // Queries of stored tokens, the first rows of them at positions of quantized tokens: their
    // blocks stop before the last tiles.
    p.attend(0, 0, 100);
    assert_eq!(q() - q0, 4, "{what}: every chunk's groups on kv_prefill_q");
    // 45 rows in launches of 16 (items of nq / heads-per-block rows): 16, 16 and 13.
    attention::ROW_ITEMS.set(16 / (nq / (nqh / 2).min(nq)));
    p.append_attend(0, 0, 45);
    attention::ROW_ITEMS.set(usize::MAX);
    assert_eq!(q() - q0, 7, "{what}: three launches");
    // Fewer than 8 rows: kv_decode_mma.
    let mma0 = mma();
    p.append_attend(0, 0, 7);
    assert_eq!(mma() - mma0, 1, "{what}: 7 rows");
    p.state("after chunks");
}

/// Without a full-precision window (R = 0) a sequence's last tokens can all be quantized, and
/// queries of stored tokens in fewer than 8 rows (`attend`: `kv_decode_mma`) then have rows that
/// end inside a quantized group. A block's walk must take the group its last row ends in, as a
/// warp's first group (`GroupWalk::seen`: sequences of 2 groups) and as a later one
/// (`GroupWalk::gend` rounds up: 30 groups, in splits of more than the 4 warps' first groups):
/// at 2, 4 and 8 query heads per kv head (blocks of 4, 2 and 1 rows; the two-stage loop and the
/// one-group loop), with and without a sink, the window empty and then holding 3 tokens.
#[test]
fn simulated_rows_that_end_inside_a_group() {
    for (nqh, sinks, groups) in [(4, 1, 2), (8, 0, 2), (8, 1, 30), (16, 1, 2), (16, 0, 30), (4, 0, 30)] {
        let mut c = cfg(64, 2, (2, 2), 32, 0, sinks, KeyMode::PerChannel, DType::F16, 0);
        c.n_layers = 1;
        let what = format!("{nqh} query heads, {sinks} sinks, {groups} groups");
        let mma = sim::launches_of("kv_decode_mma");
        let mut p = Pair::<f16>::new(SIM, c, nqh, AttnOptions::default());
        p.append(0, 0, sinks as usize + 32 * groups);
        for n in [1, 2, 3, 7] {
            p.attend(0, 0, n);
        }
        p.append(0, 0, 3);
        for n in [4, 5, 7] {
            p.attend(0, 0, n);
        }
        assert_eq!(sim::launches_of("kv_decode_mma") - mma, 7, "{what}: every call on tensor cores");
    }
}

/// What `kv_prefill_fp` asks of its rows: queries 4-byte aligned with an even stride, the chunk's
/// keys and values 16-byte aligned with a stride of whole 16 bytes; other rows, and f32 caches,
/// keep the CUDA-core path (whose loads take any alignment).
#[test]
fn chunk_tokens_on_tensor_cores_need_aligned_rows() {
    let c = cfg(128, 2, (2, 2), 32, 32, 0, KeyMode::PerChannel, DType::F16, 0);
    let gpu = CudaCache::simulated(c.clone()).unwrap();
    let q = |ptr: u64, stride: usize| DevRows::strided(ptr, 8, 8 * 128, stride);
    let kv = |ptr: u64, stride: usize| DevRows::strided(ptr, 8, 2 * 128, stride);
    let ok = |qr: DevRows, k: Option<DevRows>| gpu.prefill_fp(8, &qr, k.as_ref(), k.as_ref()).unwrap();
    assert!(ok(q(1 << 12, 1024), Some(kv(1 << 12, 256))));
    assert!(ok(q(1 << 12, 1024), None));
    assert!(ok(q(4100, 1026), Some(kv(4096 + 16, 264))));
    assert!(!ok(q(4098, 1024), None), "queries 2 bytes off");
    assert!(!ok(q(1 << 12, 1025), None), "an odd query stride");
    assert!(!ok(q(1 << 12, 1024), Some(kv(4096 + 8, 256))), "keys 8 bytes off");
    assert!(!ok(q(1 << 12, 1024), Some(kv(1 << 12, 260))), "a key stride of 520 bytes");
    for (dt, ok) in [(DType::F32, false), (DType::BF16, true)] {
        let mut c = c.clone();
        c.dtype = dt;
        let gpu = CudaCache::simulated(c).unwrap();
        assert_eq!(gpu.prefill_fp(8, &q(1 << 12, 1024), None, None).unwrap(), ok, "{dt:?}");
    }
}

/// A prompt with nothing quantized yet: `kv_prefill_fp` writes the output itself where the output
/// rows are 4-byte aligned with an even stride, in one launch, and through the combine where not
/// (an output at an odd element of a fused buffer), in launches the scratch area bounds (5 items
/// of 2 rows here), with the same results.
#[test]
fn prompt_outputs_at_any_alignment() {
    let c = cfg(128, 2, (2, 2), 32, 32, 0, KeyMode::PerChannel, DType::F16, 0);
    let (n, nqh, hd) = (40, 8, 128);
    let mut rng = Rng(11);
    let k: Vec<f16> = rng.rows(n * 2 * hd, true, hd);
    let v: Vec<f16> = rng.rows(n * 2 * hd, false, hd);
    let q: Vec<f16> = rng.rows(n * nqh * hd, false, hd);
    let mut outs = Vec::new();
    attention::ROW_ITEMS.set(5);
    for shift in [0usize, 1] {
        let mut gpu = CudaCache::simulated(c.clone()).unwrap();
        let mut out = vec![f16::ZERO; n * nqh * hd + 1];
        let (combines, fp) = (sim::launches_of("kv_decode_combine"), sim::launches_of("kv_prefill_fp"));
        gpu.append_attend(
            0,
            0,
            DevRows::new(ptr(&k), n, 2 * hd),
            DevRows::new(ptr(&v), n, 2 * hd),
            DevRows::new(ptr(&q), n, nqh * hd),
            DevRows::new(out.as_mut_ptr() as u64 + 2 * shift as u64, n, nqh * hd),
            &AttnOptions::default(),
            std::ptr::null_mut(),
        )
        .unwrap();
        let (launches, combined) = [(1, 0), (4, 4)][shift];
        assert_eq!(sim::launches_of("kv_prefill_fp") - fp, launches, "output {shift} elements in");
        assert_eq!(sim::launches_of("kv_decode_combine") - combines, combined, "output {shift} elements in");
        outs.push(out[shift..shift + n * nqh * hd].to_vec());
    }
    attention::ROW_ITEMS.set(usize::MAX);
    let e = crate::testing::rel_err(&outs[1], &outs[0]);
    assert!(e <= 1e-6, "direct and combined outputs differ: {e:e}");
    assert!(outs[0].iter().any(|x| x.to_f32() != 0.0));
}

/// Prompts whose queries, keys and values are views of one fused buffer (a QKV projection's
/// output: rows of nq + 2 * nkv heads), as engines pass them: `kv_prefill_fp` steps through whole
/// tiles of the chunk's rows by their stride, and stages the last, partial tile and the window's
/// tokens one by one; head_dim 128 and 256, a prompt into an empty sequence, then a chunk over
/// the window and quantized groups, against the CPU cache given the same rows.
#[test]
fn prompts_from_fused_qkv_rows() {
    for (hd, nqh) in [(128usize, 8usize), (256, 4)] {
        let c = cfg(hd as u32, 2, (2, 2), 32, 32, 1, KeyMode::PerChannel, DType::F16, 0);
        let mut cpu = Cache::new(c.clone()).unwrap();
        let mut gpu = CudaCache::simulated(c).unwrap();
        let mut rng = Rng(21);
        let fp = sim::launches_of("kv_prefill_fp");
        for n in [70, 150] {
            // Each row: queries, then keys, then values.
            let (qw, kw) = (nqh * hd, 2 * hd);
            let stride = qw + 2 * kw;
            let mut qkv: Vec<f16> = rng.rows(n * stride, false, hd);
            let keys: Vec<f16> = rng.rows(n * kw, true, hd);
            for r in 0..n {
                qkv[r * stride + qw..r * stride + qw + kw].copy_from_slice(&keys[r * kw..(r + 1) * kw]);
            }
            let view = |off: usize, w: usize| Rows::strided(&qkv[off..], n, w, stride).unwrap();
            let mut want = vec![f16::ZERO; n * qw];
            let opts = AttnOptions::default();
            let out = RowsMut::new(&mut want, n).unwrap();
            cpu.append_attend(0, 0, view(qw, kw), view(qw + kw, kw), view(0, qw), out, &opts).unwrap();
            let mut got = vec![f16::ZERO; n * qw];
            let base = ptr(&qkv);
            let dev = |off: usize, w: usize| DevRows::strided(base + 2 * off as u64, n, w, stride);
            let out = DevRows::new(got.as_mut_ptr() as u64, n, qw);
            let null = std::ptr::null_mut();
            gpu.append_attend(0, 0, dev(qw, kw), dev(qw + kw, kw), dev(0, qw), out, &opts, null).unwrap();
            let e = crate::testing::rel_err(&got, &want);
            assert!(e <= 1e-3 + 1.0 / 1024.0, "head_dim {hd}, {n} rows: relative error {e:e}");
        }
        assert_eq!(sim::launches_of("kv_prefill_fp") - fp, 2, "head_dim {hd}");
    }
}

/// Value scales of 64 and more (value ranges past 192 at 2 bits, 960 at 4) take the tensor-core
/// decode's exact value path (`mma_values` without FOLD, its accumulators scaled in f32); the
/// warps here take groups of both kinds, some with large and small values mixed, into the same
/// accumulators, and scales on both sides of 64 (a threshold 10% looser or tighter would give
/// infinities or be correct but slower).
#[test]
fn simulated_large_value_scales() {
    // The value multiplier that gives scales around 64: ranges of about 4.1 standard deviations
    // per 32 channels, over 3 or 15 levels.
    for (bits, around_64) in [(2u8, 48.0), (4, 235.0)] {
        let mut c = cfg(128, 2, (bits, bits), 32, 32, 0, KeyMode::PerChannel, DType::F16, 0);
        c.n_layers = 1;
        let mut p = Pair::<f16>::new(SIM, c, 8, AttnOptions::default());
        // Decode steps on kv_decode_mma, the chunk of 9 rows on kv_prefill_q.
        let launches = || sim::launches_of("kv_decode_mma") + sim::launches_of("kv_prefill_q");
        let before = launches();
        p.append(0, 0, 96);
        p.vscale = 400.0;
        p.append(0, 0, 40);
        // Scales below 64, up to 3 * 64 * 40 in an f16 operand at 2 bits.
        p.vscale = 20.0;
        p.append(0, 0, 50);
        p.vscale = around_64;
        p.append(0, 0, 64);
        p.vscale = 1.0;
        p.append(0, 0, 70);
        for _ in 0..3 {
            p.decode(0, &[0]);
        }
        p.vscale = 400.0;
        p.append_attend(0, 0, 9);
        p.decode(0, &[0]);
        assert_eq!(launches() - before, 5, "{bits} bits: not on tensor cores");
        p.state("after large values");
    }
}

/// The simulator's portable fiber switch (ucontext, used on targets other than x86-64) runs the
/// same kernels to the same results.
#[test]
fn simulated_kernels_on_ucontext_fibers() {
    sim::with_ucontext(|| batched_decode(SIM, 10, 3));
    assert!(sim::launches_of("ucontext") > 0, "no launch took the ucontext modules");
}

/// A simulated cache whose device keeps each group's key codes in the CPU's order, as
/// `KIVI_CUDA_KEY_INTERLEAVE=0` makes it: its kernels and its host copies both see that order.
fn simulated_cpu_key_order(cfg: CacheConfig) -> Result<CudaCache> {
    let mut c = CudaCache::simulated(cfg)?;
    c.lay.k_interleave = false;
    c.quant_spec = Spec::new(&c.lay, 1);
    Ok(c)
}

/// Key codes on the device in either order, against the CPU cache through the whole scenario
/// (decode and chunks on tensor cores, forks, a cut inside a group, state blobs, which move the
/// pages between the orders): interleaved (the default), in every unit size a tensor-core lane
/// reads (a byte at G = 32 and 2 bits and at G = 16 and 4 bits, half a byte at G = 16 and 2 bits,
/// 16 bits at G = 32 and 4 bits and at G = 64 and 2 bits, 32 bits at G = 64 and 4 bits), with
/// the transposed and the untransposed products, staged as one run (head_dim 128, G = 32) or part
/// by part (the others), head_dim 128 at G = 64 with dynamic shared memory; and in the CPU's
/// order.
#[test]
fn simulated_key_codes_in_either_order() {
    use KeyMode::PerChannel;
    let d = AttnOptions::default();
    for (hd, kb, g, r, nqh, page) in [
        (64, 2, 32, 32, 4, 0),
        (64, 4, 16, 32, 8, 0),
        (64, 2, 16, 32, 4, 64),
        (128, 4, 32, 32, 4, 0),
        (64, 2, 64, 64, 8, 0),
        (128, 4, 64, 64, 4, 128),
    ] {
        let c = cfg(hd, 2, (kb, 2), g, r, 1, PerChannel, DType::F16, page);
        assert!(Layout::new(&c).k_interleave);
        for (mk, order) in [(SIM, "interleaved"), (simulated_cpu_key_order as Backend, "the CPU's")] {
            let what = format!("key codes in {order} order, {nqh} query heads, {c:?}");
            let (mma, pq) = (sim::launches_of("kv_decode_mma"), sim::launches_of("kv_prefill_q"));
            scenario::<f16>(mk, c.clone(), nqh, d);
            assert!(sim::launches_of("kv_decode_mma") > mma, "{what}: no decode on tensor cores");
            // A long prompt in chunks: the later ones over quantized groups.
            let mut p = Pair::<f16>::new(mk, c.clone(), nqh, d);
            for n in [r + 3 * g + 5, 2 * g + 3, g + 9] {
                p.append_attend(0, 0, n as usize);
            }
            p.decode(0, &[0]);
            p.state("after the chunks");
            assert!(sim::launches_of("kv_prefill_q") > pq, "{what}: no chunk over quantized groups");
        }
    }
}

/// Groups prefetched into L2 ahead of their staging (`KV_MMA_PREFETCH`). The simulator fails a
/// block whose warp prefetches a line that it does not then copy with a cp.async of a later
/// commit group (a wrong page, KV head or group, a group past the warp's last or one no row
/// sees, a prefetch no earlier than the copy), and counts the lines that served: by default in
/// the two-stage loop where a group takes at most 4 KB (head_dim 64), with a sliding window (the
/// walk begins past the first groups), further ahead; in the loop of one group an iteration (8
/// query vectors a block, and `KV_MMA_PIPE=0`) and at head_dim 128 and 4 bits (5 KB, two lines
/// for some lanes: 8 sequences, so that blocks take several groups a warp) only when asked for;
/// none when turned off.
#[test]
fn simulated_prefetches_into_l2() {
    use KeyMode::PerChannel;
    let n = if cfg!(debug_assertions) { 600 } else { 1500 };
    let d = AttnOptions::default();
    let sw = AttnOptions { sliding_window: n as u32 * 2 / 3, ..d };
    let small = cfg(64, 2, (2, 2), 32, 64, 0, PerChannel, DType::F16, 0);
    let kivi4 = cfg(128, 1, (4, 4), 32, 64, 0, PerChannel, DType::F16, 0);
    type Defines = &'static [(&'static str, u64)];
    const ON: Defines = &[("KV_MMA_PREFETCH", 2)];
    // (configuration, query heads, options, macros, sequences, whether lines are prefetched)
    let cases: [(&CacheConfig, usize, AttnOptions, Defines, u32, bool); 10] = [
        (&small, 8, d, &[], 2, true),
        (&small, 8, sw, &[], 2, true),
        (&small, 8, d, &[("KV_MMA_PREFETCH", 3)], 2, true),
        (&small, 16, d, &[], 2, false),
        (&small, 16, d, ON, 2, true),
        (&small, 8, d, &[("KV_MMA_PIPE", 0)], 2, false),
        (&small, 8, d, &[("KV_MMA_PIPE", 0), ("KV_MMA_PREFETCH", 3)], 2, true),
        (&kivi4, 4, d, &[], 8, false),
        (&kivi4, 4, d, ON, 8, true),
        (&small, 8, d, &[("KV_MMA_PREFETCH", 0)], 2, false),
    ];
    for (c, nqh, opts, defines, seqs, on) in cases {
        let mut c = c.clone();
        c.n_layers = 1;
        c.max_seqs = seqs;
        (c.max_tokens, c.max_seq_tokens) = (seqs * n as u32, 0);
        let what = format!("head_dim {}, KIVI-{}, {nqh} query heads, {opts:?}, {defines:?}", c.head_dim, c.key_bits);
        let (mma, lines) = (sim::launches_of("kv_decode_mma"), sim::launches_of("prefetches"));
        sim::with_defines(defines, || {
            let mut p = Pair::<f16>::new(SIM, c, nqh, opts);
            let all: Vec<u32> = (0..seqs).collect();
            for &s in &all {
                p.append(0, s, n - n / 3 * (s as usize % 3));
            }
            for _ in 0..3 {
                p.decode(0, &all);
            }
            p.state("after the decode steps");
        });
        assert!(sim::launches_of("kv_decode_mma") > mma, "{what}: no decode on tensor cores");
        let used = sim::launches_of("prefetches") - lines;
        assert_eq!(used > 0, on, "{what}: {used} prefetched lines used");
    }
}

/// The tensor-core decode's variants that `scripts/gpu-sweep.sh` and `gpu_check variants` time
/// (3 staging buffers per warp, registers for 4 blocks per multiprocessor, the untransposed
/// products at 4 query heads per kv head, the transposed loop one group per iteration instead
/// of two stages, every lane loading its value scales and zeros in one order, the query's parts
/// of some k-steps held in registers across the loop and of all of them) against the CPU cache,
/// over long contexts (many groups per warp, so that the ring of buffers turns).
#[test]
fn simulated_tensor_core_variants() {
    let variants = [
        ("KV_MMA_STAGES", 3),
        ("KV_MMA_BLOCKS", 4),
        ("KV_MMA_T", 0),
        ("KV_MMA_PIPE", 0),
        ("KV_MMA_VSWAP", 0),
        ("KV_COMBINE_TILE", 2),
        ("KV_MMA_QREG", 2),
        ("KV_MMA_QREG", 8),
    ];
    for (name, value) in variants {
        let before = sim::launches_of("kv_decode_mma");
        sim::with_defines(&[(name, value)], || long_contexts(SIM, if cfg!(debug_assertions) { 600 } else { 2000 }));
        assert!(sim::launches_of("kv_decode_mma") > before, "{name}={value}: the tensor-core path never ran");
    }
}

/// Decode on tensor cores is one launch per step: the last block of each (item, kv head and
/// chunk of its query heads) merges the splits, and sets its counter back for the next step, so
/// no kv_decode_combine is launched; and the launch appends the new tokens to the windows and
/// quantizes the groups that leave them, so no kv_window_write, kv_quantize or kv_set_blocks is
/// launched. Sequences of different lengths (different split counts in one launch), one that a
/// decode step creates (its first token a sink), one whose keys leave the window in a step (into
/// a new page), steps one after another (the counters must be zero again), GQA ratios 4 (the
/// transposed loop) and 12 (two blocks per kv head: only the first quantizes), and the same with
/// the combine as a kernel of its own (`KIVI_CUDA_FUSED_COMBINE=0`); both also with the
/// splits merged one at a time (`KV_COMBINE_TILE`: two tiles here).
#[test]
fn simulated_decode_combines_its_own_splits() {
    for (nqh, tile) in [(8, 0), (24, 0), (8, 1), (24, 1)] {
        for fused in [true, false] {
            sim::with_defines(&[("KV_COMBINE_TILE", tile)], || decode_combines_its_own_splits(nqh, fused));
        }
    }
}

fn decode_combines_its_own_splits(nqh: usize, fused: bool) {
    let mut c = cfg(128, 2, (2, 2), 32, 32, 1, KeyMode::PerChannel, DType::F16, 0);
    c.n_layers = 1;
    c.max_seqs = 4;
    let mut p = Pair::<f16>::new(SIM, c, nqh, AttnOptions::default());
    p.gpu.fused_combine = fused;
    // Windows of 43, 62 (two steps from leaving: 64 = R + G) and 41 tokens.
    for (seq, n) in [(0, 1900), (1, 703), (2, 170)] {
        p.append(0, seq, n);
    }
    let launches = |name| sim::launches_of(name);
    let (combines, mma, writes, quants, sets) = (
        launches("kv_decode_combine"),
        launches("kv_decode_mma"),
        launches("kv_window_write"),
        launches("kv_quantize"),
        launches("kv_set_blocks"),
    );
    for _ in 0..3 {
        p.decode(0, &[0, 1, 2]);
    }
    p.decode(0, &[2, 3, 0]);
    assert_eq!(launches("kv_decode_mma") - mma, 4, "{nqh} query heads: not on tensor cores");
    let launched = launches("kv_decode_combine") - combines;
    assert_eq!(launched, if fused { 0 } else { 4 }, "{nqh} query heads, fused {fused}: combines launched");
    assert_eq!(launches("kv_window_write") - writes, 0, "{nqh} query heads: window writes launched");
    // Sequence 1's group leaves the window in the attention launch, into a new page.
    assert_eq!(launches("kv_quantize") - quants, 0, "{nqh} query heads: quantization launched");
    assert_eq!(launches("kv_set_blocks") - sets, 0, "{nqh} query heads: block tables set apart");
    p.state("after decode");
}

/// A decode step of one sequence is a launch of under one wave, whose window (R = 128 and 256:
/// 5 to 10 units of 32 full-precision tokens) takes 2 or 3 splits of one unit per warp: the
/// same results as the CPU cache, through a step whose keys leave the window (the first split
/// appends and quantizes, the others read the window beside it), with the splits merged in the
/// launch and by the combine kernel, and a short chunk of queries in one launch (two row items;
/// at R = 256 the wave holds fewer splits than one unit per warp takes, and they share the
/// units evenly).
#[test]
fn simulated_full_precision_tokens_in_several_splits() {
    for (r, fused) in [(128, true), (256, true), (128, false)] {
        let mut c = cfg(128, 2, (2, 2), 32, r, 1, KeyMode::PerChannel, DType::F16, 0);
        c.n_layers = 1;
        c.max_seqs = 2;
        let mut p = Pair::<f16>::new(SIM, c, 8, AttnOptions::default());
        p.gpu.fused_combine = fused;
        // Windows of r + 27 tokens: a group leaves them at the fifth step.
        p.append(0, 0, 700 + r as usize);
        attention::FP_SPLITS.set(0);
        let mma = sim::launches_of("kv_decode_mma");
        for _ in 0..5 {
            p.decode(0, &[0]);
        }
        p.append_attend(0, 0, 3);
        p.decode(0, &[0]);
        assert_eq!(sim::launches_of("kv_decode_mma") - mma, 7, "R = {r}: not on tensor cores");
        let want = (1 + r as usize + 31).div_ceil(32).div_ceil(4);
        assert_eq!(attention::FP_SPLITS.get(), want, "R = {r}: full-precision splits");
        p.state("after decode");
    }
}

/// A decode step on tensor cores quantizes the groups its tokens push out of the windows in its
/// own launch: into a page that already holds a group (two groups per page here) and into a new
/// page, whose block-table entry it writes; no kv_quantize or kv_set_blocks is launched. A group
/// whose page a fork shares needs a copy of the page first: that step queues the copy and the
/// quantization after the attention launch instead. A short chunk of queries (one launch of the
/// tensor-core kernel, two items of rows here) appends its tokens and quantizes the group it
/// pushes out in the same way when the tokens fit in the ring; a chunk that would overwrite a
/// token still in the window is appended after the launch. Pages and windows match the CPU
/// cache's byte for byte after each part.
#[test]
fn simulated_appends_in_the_attention_launch() {
    // G = 16, R = 16 (a ring of 32), 1 sink, two groups per page.
    let mut c = cfg(64, 2, (2, 4), 16, 16, 1, KeyMode::PerChannel, DType::F16, 32);
    c.n_layers = 1;
    c.max_seqs = 4;
    let mut p = Pair::<f16>::new(SIM, c, 4, AttnOptions::default());
    let launches = |name| sim::launches_of(name);
    let counts = || (launches("kv_decode_mma"), launches("kv_quantize"), launches("kv_set_blocks"));
    // Sequence 0: 3 groups (pages A: 0, 1; B: 2) and 20 tokens in its window, 12 steps from
    // leaving; sequence 1: 1 group (page C) and 23 tokens, 9 steps from leaving.
    p.append(0, 0, 69);
    p.append(0, 1, 40);
    p.state("after prefill");
    let (mma, quants, sets) = counts();
    // Sequence 1's group 1 joins page C at step 9, sequence 0's group 3 page B at step 12.
    for _ in 0..12 {
        p.decode(0, &[0, 1]);
    }
    p.state("after groups into pages that hold one");
    assert_eq!(counts(), (mma + 12, quants, sets), "(mma, kv_quantize, kv_set_blocks) launches");
    // Sequence 1's group 2 starts a page at step 25, sequence 0's group 4 at step 28.
    for _ in 0..16 {
        p.decode(0, &[1, 0]);
    }
    p.state("after groups that start pages");
    assert_eq!(counts(), (mma + 28, quants, sets), "(mma, kv_quantize, kv_set_blocks) launches");
    // A fork shares sequence 0's last page, which holds group 4: its group 5, 16 steps on, needs
    // a private copy in both sequences.
    assert_eq!(p.cpu.seq_copy(0, 2, u32::MAX), p.gpu.seq_copy(0, 2, u32::MAX, std::ptr::null_mut()));
    for _ in 0..16 {
        p.decode(0, &[0, 2, 1]);
    }
    p.state("after copy-on-write");
    let (m, q, _) = counts();
    assert_eq!((m, q), (mma + 44, quants + 1), "(mma, kv_quantize) launches");
    // Sequence 3: chunks of rows appended to it; then the (mma, kv_quantize, kv_set_blocks,
    // kv_window_write) launches since it was made, and its pages and windows.
    p.append(0, 3, 17);
    let base = (counts(), launches("kv_window_write"));
    let chunks = |p: &mut Pair<f16>, ns: &[usize], want: (usize, usize, usize, usize), what: &str| {
        for &n in ns {
            p.append_attend(0, 3, n);
        }
        let (((m, q, s), w), (m1, q1, s1)) = (base, counts());
        assert_eq!((m1 - m, q1 - q, s1 - s, launches("kv_window_write") - w), want, "{what}");
        p.state(what);
    };
    // 16 tokens in its window: 3 chunks of 5 fit (31 tokens), a 4th would overwrite the oldest
    // (its group 0 leaves, into a new page, after the launch).
    chunks(&mut p, &[5, 5, 5], (3, 0, 0, 0), "chunks that fit");
    chunks(&mut p, &[5], (4, 1, 1, 1), "a chunk that does not");
    // 20 tokens left; 25, 30, then 32: group 1 into group 0's page. 16 left; 21, 26, 31, 32:
    // group 2 into a new page. All in the attention launches.
    chunks(&mut p, &[5, 5, 2, 5, 5, 5, 1], (11, 1, 1, 1), "chunks that fill the ring");
    // 16 left; 21, 26, 31, then 2 more would overwrite the oldest by one: appended after the
    // launch (group 3 into group 2's page).
    chunks(&mut p, &[5, 5, 5, 2], (15, 2, 1, 2), "a chunk one token over");
}

#[test]
fn simulated_batched_decode_of_many_sequences() {
    batched_decode(SIM, 66, if cfg!(debug_assertions) { 3 } else { 34 });
    assert!(sim::launches_of("kv_decode_mma") > 0, "the tensor-core path never ran");
}

/// A seed for the random tests: `KIVI_SEED` when set, else the clock; printed (with a failure).
fn fresh_seed(what: &str) -> Rng {
    let seed: u64 = std::env::var("KIVI_SEED").map_or_else(
        |_| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
        |s| s.parse().expect("KIVI_SEED=S"),
    );
    eprintln!("{what}: KIVI_SEED={seed}");
    Rng(seed)
}

/// How many random configurations a test draws: `KIVI_TEST_CONFIGS`, else `default_n`.
fn n_configs(default_n: u64) -> u64 {
    std::env::var("KIVI_TEST_CONFIGS").map_or(default_n, |s| s.parse().expect("KIVI_TEST_CONFIGS=N"))
}

/// A random valid configuration, query heads and options: head sizes 8-256, GQA ratios 1-16,
/// every bit width, group sizes that are not powers of two, value groups of any divisor of the
/// head size, sinks, windows, pages, dtypes, roundings and options.
fn draw(r: &mut Rng) -> (CacheConfig, usize, AttnOptions) {
    let mut pick = |k: usize| (r.next() % k as u64) as usize;
    let hd = [8u32, 16, 24, 32, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256][pick(14)];
    let nkv = 1 + pick(3) as u32;
    let ratio = [1usize, 2, 3, 4, 5, 6, 8, 12, 16][pick(9)];
    let bits = [2u8, 4, 8];
    let (kb, vb) = (bits[pick(3)], bits[pick(3)]);
    let g = [8u32, 16, 24, 32, 48, 64, 128][pick(7)];
    let res = match g * pick(5) as u32 {
        x if x > 256 => g,
        x => x,
    };
    let sinks = pick(6) as u32;
    let mode = if pick(5) == 0 { KeyMode::PerToken } else { KeyMode::PerChannel };
    let dt = [DType::F32, DType::F16, DType::BF16][pick(3)];
    let pt = [0u32, 1, 2, 4][pick(4)] * g;
    let mut c = cfg(hd, nkv, (kb, vb), g, res, sinks, mode, dt, pt);
    let divisors: Vec<u32> = (1..=hd).filter(|d| hd % d == 0).collect();
    c.value_group = divisors[pick(divisors.len())];
    if pick(3) == 0 {
        c.value_rounding = crate::config::Rounding::MinMax;
    }
    c.max_tokens = 4096;
    let mut o = AttnOptions { causal: pick(8) != 0, ..Default::default() };
    if pick(4) == 0 {
        o.sliding_window = 1 + pick(200) as u32;
    }
    if pick(4) == 0 {
        o.softcap = 30.0;
    }
    if pick(4) == 0 {
        o.scale = Some(0.05 + pick(10) as f32 * 0.03);
    }
    c.validate().expect("the draws make valid configurations");
    (c, nkv as usize * ratio, o)
}

/// The scenario on random configurations ([`draw`]). A fresh seed every run (printed; `KIVI_SEED`
/// replays it), `KIVI_TEST_CONFIGS=N` for more configurations than the default.
fn random_configurations(mk: Backend, default_n: u64) {
    let n = n_configs(default_n);
    let mut r = fresh_seed("random configurations");
    let mut calls = 0;
    for i in 0..n {
        let (c, nqh, o) = draw(&mut r);
        eprintln!("random configuration {i}: {nqh} query heads, {o:?}, {c:?}");
        calls += match c.dtype {
            DType::F32 => scenario::<f32>(mk, c, nqh, o),
            DType::F16 => scenario::<f16>(mk, c, nqh, o),
            DType::BF16 => scenario::<bf16>(mk, c, nqh, o),
        };
    }
    assert!(calls as u64 > 40 * n);
}

/// Random operations on a small pool, the same on both caches: chunks, appends, batched decode
/// steps of random sets of sequences, attend, truncations, forks, removals, keep and clear,
/// sequence blobs, with capacity, sequence slots and sequence limits running out. Both return
/// the same result for every call (errors included), the same outputs, and hold the same
/// contents, pages and windows every few operations.
fn random_operations<T: Element + Default>(
    mk: Backend,
    c: CacheConfig,
    nqh: usize,
    o: AttnOptions,
    r: &mut Rng,
    ops: usize,
) {
    let mut p = Pair::<T>::new(mk, c.clone(), nqh, o);
    let g = c.group_size as usize;
    let layers = c.n_layers;
    for step in 0..ops {
        let mut pick = |k: usize| (r.next() % k as u64) as usize;
        let seq = pick(6) as u32;
        let n = [1, g - 1, g, g + 1, 1 + pick(3 * g)][pick(5)].max(1);
        match pick(12) {
            0..=2 => (0..layers).for_each(|l| p.append_attend(l, seq, n)),
            3 => (0..layers).for_each(|l| p.append(l, seq, n)),
            4..=6 => {
                let mut seqs: Vec<u32> = (0..6).filter(|_| pick(2) == 0).collect();
                if seqs.is_empty() {
                    seqs.push(seq);
                }
                (0..layers).for_each(|l| p.decode(l, &seqs));
            }
            7 => (0..layers).for_each(|l| p.attend(l, seq, 1 + pick(g))),
            8 => {
                let len = p.cpu.seq_len(seq).unwrap_or(0) as usize;
                let cut = pick(len + 3) as u32;
                assert_eq!(p.cpu.seq_truncate(seq, cut), p.gpu.seq_truncate(seq, cut, std::ptr::null_mut()));
            }
            9 => {
                let (dst, k) = (pick(6) as u32, [u32::MAX, pick(300) as u32][pick(2)]);
                assert_eq!(p.cpu.seq_copy(seq, dst, k), p.gpu.seq_copy(seq, dst, k, std::ptr::null_mut()));
            }
            10 => match pick(8) {
                0 => assert_eq!(p.cpu.seq_keep(seq), p.gpu.seq_keep(seq)),
                1 => {
                    p.cpu.clear();
                    p.gpu.clear();
                }
                2 | 3 => {
                    if let Ok(blob) = p.cpu.save_seq_state_vec(seq) {
                        assert!(blob == p.gpu.save_seq_state_vec(seq, std::ptr::null_mut()).unwrap());
                        let to = pick(6) as u32;
                        assert_eq!(p.cpu.load_seq_state(to, &blob), p.gpu.load_seq_state(to, &blob));
                    }
                }
                _ => assert_eq!(p.cpu.seq_remove(seq), p.gpu.seq_remove(seq)),
            },
            _ => (0..layers).for_each(|l| p.append_attend(l, seq, 1)),
        }
        if step % 8 == 7 {
            p.state(&format!("after operation {step}"));
        }
    }
    p.state("at the end");
}

fn random_operation_runs(mk: Backend, default_n: u64) {
    let mut r = fresh_seed("random operations");
    for i in 0..n_configs(default_n) {
        let (mut c, nqh, o) = draw(&mut r);
        // A small pool, few slots and (sometimes) a sequence limit, so that they run out.
        c.max_tokens = 200 + (r.next() % 1200) as u32;
        c.max_seqs = 2 + (r.next() % 3) as u32;
        c.max_seq_tokens = [0, 150, 400][(r.next() % 3) as usize];
        eprintln!("random operations {i}: {nqh} query heads, {o:?}, {c:?}");
        match c.dtype {
            DType::F32 => random_operations::<f32>(mk, c, nqh, o, &mut r, 80),
            DType::F16 => random_operations::<f16>(mk, c, nqh, o, &mut r, 80),
            DType::BF16 => random_operations::<bf16>(mk, c, nqh, o, &mut r, 80),
        }
    }
}

#[test]
fn emulated_random_operations() {
    random_operation_runs(EMU, if cfg!(debug_assertions) { 1 } else { 12 });
}

#[test]
fn simulated_random_operations() {
    random_operation_runs(SIM, if cfg!(debug_assertions) { 1 } else { 6 });
}

#[test]
fn emulated_random_configurations() {
    random_configurations(EMU, if cfg!(debug_assertions) { 2 } else { 24 });
}

#[test]
fn simulated_random_configurations() {
    random_configurations(SIM, if cfg!(debug_assertions) { 1 } else { 16 });
}

/// Long contexts (many groups per split, several splits) on random configurations: group sizes
/// that are not powers of two, 8-bit codes and per-token keys (the CUDA-core kernel), sliding
/// windows that start anywhere, pages of one or two groups.
fn random_long_contexts(mk: Backend, default_n: u64) {
    let mut r = fresh_seed("random long contexts");
    for i in 0..n_configs(default_n) {
        let mut pick = |k: usize| (r.next() % k as u64) as usize;
        let hd = [16u32, 32, 48, 64, 80, 128][pick(6)];
        let nkv = 1 + pick(2) as u32;
        let ratio = [1usize, 2, 4, 8, 12][pick(5)];
        let bits = [2u8, 4, 8];
        let (kb, vb) = (bits[pick(3)], bits[pick(3)]);
        let g = [8u32, 16, 24, 32, 48, 64, 128][pick(7)];
        let mode = if pick(4) == 0 { KeyMode::PerToken } else { KeyMode::PerChannel };
        let mut c =
            cfg(hd, nkv, (kb, vb), g, g * pick(3) as u32, pick(3) as u32, mode, DType::F16, [0u32, 2][pick(2)] * g);
        c.n_layers = 1;
        (c.max_tokens, c.max_seq_tokens) = (8192, 0);
        let o =
            AttnOptions { sliding_window: if pick(3) == 0 { 1 + pick(3000) as u32 } else { 0 }, ..Default::default() };
        let nqh = nkv as usize * ratio;
        eprintln!("random long context {i}: {nqh} query heads, {o:?}, {c:?}");
        let mut p = Pair::<f16>::new(mk, c, nqh, o);
        let len = 1000 + pick(3000);
        p.append(0, 0, len);
        p.append(0, 1, len / 3);
        for _ in 0..3 {
            p.decode(0, &[0, 1]);
        }
        p.append_attend(0, 1, 1 + pick(60));
        p.attend(0, 0, 1 + pick(20));
        p.state("after long decode");
    }
}

#[test]
fn emulated_random_long_contexts() {
    random_long_contexts(EMU, if cfg!(debug_assertions) { 1 } else { 6 });
}

#[test]
fn simulated_random_long_contexts() {
    random_long_contexts(SIM, if cfg!(debug_assertions) { 1 } else { 3 });
}

/// The tensor-core kernel's split of the context: every group in exactly one split, within the
/// scratch area's room; the full-precision tokens in split 0 and blocks of quantized groups for
/// four waves of the device, unless that would leave a block fewer than 16 groups, and no more
/// splits than that takes; where that is under two waves, one unit of full-precision tokens per
/// warp (splits of 4 units) and as many quantized splits as one wave holds beside them, of at
/// least 8 groups.
#[test]
fn splits_fill_the_device() {
    use super::attention::{mma_splits, MmaSplit};
    let mut r = fresh_seed("splits_fill_the_device");
    let mut shapes = vec![
        (1020, 6, 128, 528, 31),
        (4092, 5, 512, 528, 30),
        (124, 6, 8, 528, 2000),
        (0, 5, 16, 396, 8),
        (15, 1, 1, 4, 9),
        // Decode of one sequence, 8 kv heads, 396 slots: 4096, 32768 and 131072 tokens, and
        // a sequence with nothing quantized yet.
        (124, 6, 8, 396, 2000),
        (1020, 6, 8, 396, 2000),
        (4092, 5, 8, 396, 2000),
        (0, 5, 8, 396, 2000),
        // Full-precision splits bounded by the wave and by the scratch area.
        (20, 11, 60, 150, 500),
        (20, 11, 1, 500, 2),
    ];
    for _ in 0..2000 {
        let g = (r.next() % 20000) as usize;
        let bps = 1 + (r.next() % 1024) as usize;
        let slots = 4 + (r.next() % 1000) as usize;
        shapes.push((g, (r.next() % 8) as usize, bps, slots, 1 + (r.next() % 200) as usize));
    }
    // Decode steps of a few sequences: few blocks per split, often under two waves.
    for _ in 0..1000 {
        let g = (r.next() % 3000) as usize;
        let bps = 1 + (r.next() % 64) as usize;
        let slots = 100 + (r.next() % 900) as usize;
        shapes.push((g, (r.next() % 12) as usize, bps, slots, 1 + (r.next() % 500) as usize));
    }
    let (mut one_wave, mut fp_split) = (0, 0);
    for (g, units, bps, slots, max_splits) in shapes {
        let s = mma_splits(g, units, bps, slots, max_splits, true);
        let s4 = mma_splits(g, units, bps, slots, max_splits, false);
        let at = format!("{g} groups, {units} units, {bps} blocks per split, {slots} slots, {max_splits} + 1 splits at most: {s:?} ({s4:?})");
        for MmaSplit { fp, fp_ups, ups, n } in [s, s4] {
            assert!(fp >= 1 && fp + n <= max_splits + 1, "{at}: beyond the scratch area");
            // Every unit in a split, and none empty.
            let every = fp_ups * fp >= units && fp_ups * (fp - 1) < units;
            assert!(if fp > 1 { every } else { fp_ups == 0 }, "{at}: units per full-precision split");
            if g == 0 {
                assert_eq!(n, 0, "{at}");
            } else {
                assert!(n >= 1 && ups * n >= g && ups * (n - 1) < g, "{at}");
            }
        }
        let MmaSplit { fp, ups, n, .. } = s;
        let MmaSplit { fp: fp4, ups: ups4, n: n4, .. } = s4;
        assert_eq!(fp4, 1, "{at}: full-precision splits without one_wave");
        // Without one_wave: at least 16 groups a block, no larger blocks than four waves take
        // (unless they are already small or the scratch area holds no more), and no more splits
        // than that takes (one fewer does not make four waves).
        if g > 0 {
            assert!(n4 == 1 || ups4 >= 16, "{at}: blocks of fewer than 16 groups");
            let four_waves = g.div_ceil((4 * slots).div_ceil(bps));
            assert!(ups4 <= four_waves || ups4 < 32 || ups4 == g.div_ceil(max_splits), "{at}: too few splits");
            assert!(n4 == 1 || bps * (n4 - 1) < 4 * slots, "{at}: too many splits");
        }
        // (The four-wave split before the scratch area's bound: under two waves?)
        let four = (4 * slots).div_ceil(bps).min(g / 16).max(1);
        if (four + 1) * bps >= 2 * slots {
            assert_eq!(s, s4, "{at}: one_wave changed a launch of two waves or more");
            continue;
        }
        // Under two waves: one unit per warp where the wave and the scratch area hold those
        // splits beside one quantized split; one wave of quantized blocks of at least 8 groups
        // (but the last), the smallest that fit beside them (one group fewer a block would take
        // blocks under 8 groups or more than a wave, unless the scratch area holds no more).
        one_wave += 1;
        fp_split += (fp > 1) as usize;
        let q = (g > 0) as usize;
        assert!(fp == 1 || 4 * (fp - 1) < units, "{at}: more full-precision splits than units need");
        assert!(
            4 * fp >= units || (fp + 1 + q) * bps > slots || fp + q > max_splits,
            "{at}: fewer full-precision splits than the wave holds"
        );
        assert!(fp == 1 || (fp + q) * bps <= slots, "{at}: full-precision splits beyond one wave");
        if g == 0 {
            continue;
        }
        assert!(n == 1 || ((n + fp) * bps <= slots && n <= g.div_ceil(8)), "{at}: not one wave of 8 groups or more");
        assert!(
            ups <= 8 || g.div_ceil(ups - 1) + fp > max_splits + 1 || (g.div_ceil(ups - 1) + fp) * bps > slots,
            "{at}: larger blocks than one wave needs"
        );
    }
    assert!(one_wave > 200 && fp_split > 100, "{one_wave} shapes under two waves, {fp_split} with fp splits");
}
