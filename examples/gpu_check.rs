//! The CUDA backend on a real GPU: correctness against the CPU backend, then a benchmark.
//!
//! ```text
//! gpu_check info                       # the device, as one JSON line
//! gpu_check check [--mma-only] [--cases NAME,...]
//!                                      # CUDA vs CPU on identical random inputs (every case, or
//!                                      # those named); exit 1 on failure
//! gpu_check check --sim                # the same check without a GPU: the kernels' own code on
//!                                      # the CPU (kivi's host simulator), host memory as device
//!                                      # memory; the C ABI case and the longest cases are skipped
//! gpu_check bench [--contexts 4096,32768,131072] [--batches 1,16,64] [--bits 2,4] [--iters 20] [--label L]
//!                  [--head-dim 128] [--kv-heads 8] [--q-heads 32] [--no-prefill]
//! gpu_check variants [--variant NAME=NVRTC_OPTS]... [--contexts 32768] [--batches 16,64] [--bits 2,4] [--prefill]
//!                                      # kernel variants against the default, steps alternating
//!                                      # (--sim: the same on the host simulator, a dry run)
//! gpu_check prompt [--tokens 512,2048,8192] [--iters 5] [--head-dim 128] [--kv-heads 8] [--q-heads 32]
//!                                      # attention over whole prompts
//! gpu_check precompile [--arch sm_90]  # the modules of the check and the benchmark, compiled on
//!                                      # every core into $KIVI_CUDA_CACHE_DIR (no GPU needed
//!                                      # with --arch)
//! gpu_check cubins DIR [--arch sm_90]  # no GPU needed: the decode modules of the benchmark
//!                                      # shapes (and of head_dim 256) compiled with NVRTC, for
//!                                      # scripts/sass_mix.py
//! ```
//!
//! Every result is one JSON line on stdout; progress goes to stderr. `scripts/gpu-check.sh` runs
//! all three and adds the fp16 baseline (`scripts/gpu_baseline.py`). With `KIVI_CUDA_CACHE_DIR`
//! set, `bench` and `variants` first compile every module their caches will load on every core
//! (one `compile-ahead` line), which the caches' first calls would compile one after another.
//!
//! The check replays the same operations on a CPU [`Cache`] and a [`CudaCache`]: chunked
//! prefills (chunks longer than the window ring, across flushes), plain appends, batched decode
//! steps of sequences of different lengths (more than one launch's worth of sequences), `attend`,
//! forks with copy-on-write, truncation inside a quantized group, removal, sinks, per-token keys,
//! 2/4/8 bits, f32/f16/bf16, GQA ratios up to 16, sliding windows, softcap and non-causal masks.
//! Attention outputs must agree within 1e-3 relative (plus one rounding step of the output type),
//! and the cache contents (dequantized) must be identical. Its last case (`c-abi-stream`) does
//! the same through the C ABI: a `kivi_cache` made with `params.device = 0`, on a non-blocking
//! stream set with `kivi_cache_set_stream`, against a CPU `kivi_cache`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use cudarc::driver::{result as drv, sys};
use kivi::cuda::{CudaCache, DevRows};
use kivi::{bf16, f16, AttnOptions, Cache, CacheConfig, DType, Element, KeyMode, Rows, RowsMut};

/// Whether the check runs on kivi's host simulator instead of a GPU (`--sim`).
static SIM: AtomicBool = AtomicBool::new(false);

fn sim() -> bool {
    SIM.load(Ordering::Relaxed)
}

/// A CUDA cache on device 0, or on the host simulator.
fn new_cache(cfg: CacheConfig) -> kivi::Result<CudaCache> {
    if sim() {
        CudaCache::simulated(cfg)
    } else {
        CudaCache::new(cfg, 0)
    }
}

/// Device memory owned by the check (host memory on the simulator).
struct DevBuf {
    ptr: u64,
    host: Option<Vec<u64>>,
}

impl DevBuf {
    fn zeroed(bytes: usize) -> DevBuf {
        if sim() {
            let mut v = vec![0u64; bytes.div_ceil(8).max(2)];
            return DevBuf { ptr: v.as_mut_ptr() as u64, host: Some(v) };
        }
        // SAFETY: plain allocation in the current context (bound by CudaCache::new).
        let ptr = unsafe { drv::malloc_sync(bytes.max(16)) }.expect("cuMemAlloc");
        unsafe { drv::memset_d8_sync(ptr, 0, bytes.max(16)) }.expect("cuMemset");
        DevBuf { ptr, host: None }
    }

    fn upload<T>(data: &[T]) -> DevBuf {
        let b = DevBuf::zeroed(std::mem::size_of_val(data));
        if b.host.is_some() {
            // SAFETY: the host buffer holds at least that many bytes.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, b.ptr as *mut u8, size_of_val(data)) };
            return b;
        }
        // SAFETY: b holds at least that many bytes.
        unsafe { drv::memcpy_htod_sync(b.ptr, data) }.expect("cuMemcpyHtoD");
        b
    }

    fn download<T: Copy + Default>(&self, n: usize) -> Vec<T> {
        let mut v = vec![T::default(); n];
        if self.host.is_some() {
            // SAFETY: the buffer holds n elements.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr as *const T, v.as_mut_ptr(), n) };
            return v;
        }
        // SAFETY: the buffer holds n elements.
        unsafe { drv::memcpy_dtoh_sync(&mut v[..], self.ptr) }.expect("cuMemcpyDtoH");
        v
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.host.is_none() {
            // SAFETY: allocated above.
            unsafe {
                let _ = drv::free_sync(self.ptr);
            }
        }
    }
}

/// SplitMix64, seedable.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    /// Rows of keys with a few outlier channels per head, like real models'.
    fn keys(&mut self, n: usize, nkv: usize, hd: usize) -> Vec<f32> {
        let mut k: Vec<f32> = (0..n * nkv * hd).map(|_| self.normal()).collect();
        for t in 0..n {
            for h in 0..nkv {
                for o in [3usize, 17, 40] {
                    let c = (o * (h + 1)) % hd;
                    k[(t * nkv + h) * hd + c] = 10.0 + 4.0 * self.normal();
                }
            }
        }
        k
    }
    fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

fn to_t<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn rel_err<T: Element>(gpu: &[T], cpu: &[T]) -> f64 {
    // A NaN counts as an infinite difference (it would drop out of the maximum).
    let diff = |(a, b): (&T, &T)| {
        let d = (a.to_f32() as f64 - b.to_f32() as f64).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    };
    let num = gpu.iter().zip(cpu).map(diff).fold(0.0, f64::max);
    let den = cpu.iter().map(|b| (b.to_f32() as f64).abs()).fold(0.0, f64::max);
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

fn sync() -> Result<(), String> {
    if sim() {
        return Ok(());
    }
    drv::ctx::synchronize().map_err(|e| format!("device error: {e:?}"))
}

/// A CPU cache and a CUDA cache fed the same operations.
struct Pair<T: Element> {
    cpu: Cache,
    gpu: CudaCache,
    rng: Rng,
    nqh: usize,
    opts: AttnOptions,
    tol: f64,
    calls: usize,
    max_err: f64,
    failures: Vec<String>,
    _t: std::marker::PhantomData<T>,
}

impl<T: Element + Default> Pair<T> {
    fn new(cfg: CacheConfig, nqh: usize, opts: AttnOptions, seed: u64) -> Result<Self, String> {
        let cpu = Cache::new(cfg.clone()).map_err(|e| e.to_string())?;
        let gpu = new_cache(cfg).map_err(|e| e.to_string())?;
        let ulp = match T::DTYPE {
            DType::F32 => 0.0,
            DType::F16 => 1.0 / 1024.0,
            DType::BF16 => 1.0 / 128.0,
        };
        Ok(Pair {
            cpu,
            gpu,
            rng: Rng(seed),
            nqh,
            opts,
            tol: 1e-3 + ulp,
            calls: 0,
            max_err: 0.0,
            failures: Vec::new(),
            _t: Default::default(),
        })
    }

    fn dims(&self) -> (usize, usize) {
        let c = self.cpu.config();
        (c.n_kv_heads as usize, c.head_dim as usize)
    }

    fn fail(&mut self, m: String) {
        if self.failures.len() < 8 {
            self.failures.push(m);
        } else if self.failures.len() == 8 {
            self.failures.push("...".into());
        }
    }

    fn compare(&mut self, what: String, gpu: &[T], cpu: &[T]) {
        self.calls += 1;
        let e = rel_err(gpu, cpu);
        if !e.is_finite() || e > self.tol {
            self.fail(format!("{what}: relative error {e:.3e} > {:.1e}", self.tol));
        }
        if e.is_finite() {
            self.max_err = self.max_err.max(e);
        } else {
            self.max_err = f64::INFINITY;
        }
    }

    fn kvq(&mut self, n: usize, with_q: bool) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (nkv, hd) = self.dims();
        let k = to_t(&self.rng.keys(n, nkv, hd));
        let v = to_t(&self.rng.normals(n * nkv * hd));
        let q = if with_q { to_t(&self.rng.normals(n * self.nqh * hd)) } else { vec![] };
        (k, v, q)
    }

    fn append_attend(&mut self, layer: u32, seq: u32, n: usize) {
        let (nkv, hd) = self.dims();
        let (k, v, q) = self.kvq(n, true);
        let mut out = vec![T::default(); q.len()];
        let r = self.cpu.append_attend(
            layer,
            seq,
            Rows::new(&k, n).unwrap(),
            Rows::new(&v, n).unwrap(),
            Rows::new(&q, n).unwrap(),
            RowsMut::new(&mut out, n).unwrap(),
            &self.opts,
        );
        let (dk, dv, dq) = (DevBuf::upload(&k), DevBuf::upload(&v), DevBuf::upload(&q));
        let dout = DevBuf::zeroed(std::mem::size_of_val(&out[..]));
        let g = self.gpu.append_attend(
            layer,
            seq,
            DevRows::new(dk.ptr, n, nkv * hd),
            DevRows::new(dv.ptr, n, nkv * hd),
            DevRows::new(dq.ptr, n, self.nqh * hd),
            DevRows::new(dout.ptr, n, self.nqh * hd),
            &self.opts,
            std::ptr::null_mut(),
        );
        self.outcome(format!("append_attend(layer {layer}, seq {seq}, {n})"), r, g, &dout, &out);
    }

    fn outcome(&mut self, what: String, r: kivi::Result<()>, g: kivi::Result<()>, dout: &DevBuf, out: &[T]) {
        match (r, g) {
            (Ok(()), Ok(())) => {
                if let Err(e) = sync() {
                    self.fail(format!("{what}: {e}"));
                    return;
                }
                let got: Vec<T> = dout.download(out.len());
                self.compare(what, &got, out);
            }
            (Err(a), Err(b)) if a == b => {}
            (a, b) => self.fail(format!("{what}: CPU {a:?}, CUDA {b:?}")),
        }
    }

    fn append(&mut self, layer: u32, seq: u32, n: usize) {
        let (nkv, hd) = self.dims();
        let (k, v, _) = self.kvq(n, false);
        let r = self.cpu.append(layer, seq, Rows::new(&k, n).unwrap(), Rows::new(&v, n).unwrap());
        let (dk, dv) = (DevBuf::upload(&k), DevBuf::upload(&v));
        let g = self.gpu.append(
            layer,
            seq,
            DevRows::new(dk.ptr, n, nkv * hd),
            DevRows::new(dv.ptr, n, nkv * hd),
            std::ptr::null_mut(),
        );
        if let Err(e) = sync() {
            self.fail(format!("append: {e}"));
        }
        if r != g {
            self.fail(format!("append(layer {layer}, seq {seq}, {n}): CPU {r:?}, CUDA {g:?}"));
        }
    }

    fn decode(&mut self, layer: u32, seqs: &[u32]) {
        let (nkv, hd) = self.dims();
        let n = seqs.len();
        let (k, v, q) = self.kvq(n, true);
        let mut out = vec![T::default(); q.len()];
        let r = self.cpu.decode(
            layer,
            seqs,
            Rows::new(&k, n).unwrap(),
            Rows::new(&v, n).unwrap(),
            Rows::new(&q, n).unwrap(),
            RowsMut::new(&mut out, n).unwrap(),
            &self.opts,
        );
        let (dk, dv, dq) = (DevBuf::upload(&k), DevBuf::upload(&v), DevBuf::upload(&q));
        let dout = DevBuf::zeroed(std::mem::size_of_val(&out[..]));
        let g = self.gpu.decode(
            layer,
            seqs,
            DevRows::new(dk.ptr, n, nkv * hd),
            DevRows::new(dv.ptr, n, nkv * hd),
            DevRows::new(dq.ptr, n, self.nqh * hd),
            DevRows::new(dout.ptr, n, self.nqh * hd),
            &self.opts,
            std::ptr::null_mut(),
        );
        self.outcome(format!("decode(layer {layer}, {n} seqs)"), r, g, &dout, &out);
    }

    fn attend(&mut self, layer: u32, seq: u32, n: usize) {
        let hd = self.dims().1;
        let q: Vec<T> = to_t(&self.rng.normals(n * self.nqh * hd));
        let mut out = vec![T::default(); q.len()];
        let r = self.cpu.attend(layer, seq, Rows::new(&q, n).unwrap(), RowsMut::new(&mut out, n).unwrap(), &self.opts);
        let dq = DevBuf::upload(&q);
        let dout = DevBuf::zeroed(std::mem::size_of_val(&out[..]));
        let g = self.gpu.attend(
            layer,
            seq,
            DevRows::new(dq.ptr, n, self.nqh * hd),
            DevRows::new(dout.ptr, n, self.nqh * hd),
            &self.opts,
            std::ptr::null_mut(),
        );
        self.outcome(format!("attend(layer {layer}, seq {seq}, {n})"), r, g, &dout, &out);
    }

    fn seq_copy(&mut self, src: u32, dst: u32, n: u32) {
        let r = self.cpu.seq_copy(src, dst, n);
        let g = self.gpu.seq_copy(src, dst, n, std::ptr::null_mut());
        if r != g {
            self.fail(format!("seq_copy({src}, {dst}, {n}): CPU {r:?}, CUDA {g:?}"));
        }
    }

    fn truncate(&mut self, seq: u32, n: u32) {
        let r = self.cpu.seq_truncate(seq, n);
        let g = self.gpu.seq_truncate(seq, n, std::ptr::null_mut());
        if r != g {
            self.fail(format!("seq_truncate({seq}, {n}): CPU {r:?}, CUDA {g:?}"));
        }
    }

    fn remove(&mut self, seq: u32) {
        let r = self.cpu.seq_remove(seq);
        let g = self.gpu.seq_remove(seq);
        if r != g {
            self.fail(format!("seq_remove({seq}): CPU {r:?}, CUDA {g:?}"));
        }
    }

    /// The CUDA cache's contents, brought to the host, against the CPU cache's.
    fn compare_state(&mut self, when: &str) {
        if let Err(e) = sync() {
            self.fail(format!("state {when}: {e}"));
            return;
        }
        let host = match self.gpu.to_host(std::ptr::null_mut()) {
            Ok(h) => h,
            Err(e) => return self.fail(format!("to_host {when}: {e}")),
        };
        if host.seq_ids() != self.cpu.seq_ids() {
            return self.fail(format!("{when}: sequences {:?} vs {:?}", host.seq_ids(), self.cpu.seq_ids()));
        }
        if self.gpu.stats() != self.cpu.stats() {
            self.fail(format!("{when}: stats {:?} vs {:?}", self.gpu.stats(), self.cpu.stats()));
        }
        for seq in self.cpu.seq_ids() {
            for layer in 0..self.cpu.config().n_layers {
                let a = host.dequantized(layer, seq).unwrap();
                let b = self.cpu.dequantized(layer, seq).unwrap();
                if a != b {
                    let d = if a.len != b.len {
                        format!("length {} vs {}", a.len, b.len)
                    } else {
                        let dk = a.keys.iter().zip(&b.keys).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
                        let dv = a.values.iter().zip(&b.values).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
                        let first = (0..a.keys.len()).find(|&i| a.keys[i] != b.keys[i] || a.values[i] != b.values[i]);
                        format!("max key diff {dk:e}, value diff {dv:e}, first differing element {first:?}")
                    };
                    self.fail(format!("{when}: contents of seq {seq} layer {layer} differ: {d}"));
                }
            }
        }
    }
}

/// The whole scenario on one configuration.
fn scenario<T: Element + Default>(
    cfg: &CacheConfig,
    nqh: usize,
    opts: AttnOptions,
    seed: u64,
) -> Result<Pair<T>, String> {
    let mut p = Pair::<T>::new(cfg.clone(), nqh, opts, seed)?;
    let (g, ring, s) = (cfg.group_size as usize, (cfg.residual + cfg.group_size) as usize, cfg.sinks as usize);
    for layer in 0..cfg.n_layers {
        // A prefill longer than the ring, across several flushes; chunks of two sizes after it.
        p.append_attend(layer, 0, s + ring + 2 * g + 5);
        p.append_attend(layer, 1, 3);
        p.append_attend(layer, 1, g + 1);
        p.append(layer, 2, 2 * g + 7);
    }
    p.compare_state("after prefill");
    for step in 0..g + 3 {
        for layer in 0..cfg.n_layers {
            let seqs: &[u32] = if step % 5 == 4 { &[2, 0] } else { &[0, 1, 2] };
            p.decode(layer, seqs);
        }
    }
    p.compare_state("after decode");
    // Fork inside a quantized group, then both sides grow (copy-on-write of a shared page).
    p.seq_copy(0, 3, (s + g + 3) as u32);
    p.seq_copy(0, 4, u32::MAX);
    for _ in 0..g + 2 {
        for layer in 0..cfg.n_layers {
            p.decode(layer, &[3, 0, 4]);
        }
    }
    p.compare_state("after fork");
    // Truncation inside a quantized group, then appends through the next flush.
    p.truncate(1, (s + g / 2 + 1) as u32);
    for layer in 0..cfg.n_layers {
        for _ in 0..3 {
            p.decode(layer, &[1]);
        }
        p.append_attend(layer, 1, g + 5);
        p.attend(layer, 0, 5);
        p.attend(layer, 3, 1);
    }
    p.compare_state("after truncate");
    p.remove(2);
    for layer in 0..cfg.n_layers {
        p.decode(layer, &[5, 0]);
        p.decode(layer, &[5, 0]);
    }
    p.compare_state("after remove");
    // The CUDA cache saves exactly the CPU cache's state blob (same pages, same bytes), and a
    // fresh CUDA cache loads it back.
    match p.gpu.save_state_vec(std::ptr::null_mut()) {
        Ok(blob) => {
            if blob != p.cpu.save_state_vec() {
                p.fail("state blobs of the CUDA and CPU caches differ".into());
            }
            match new_cache(cfg.clone()).and_then(|mut c| c.load_state(&blob).map(|_| c)) {
                Ok(c) => {
                    if c.save_state_vec(std::ptr::null_mut()).ok().as_ref() != Some(&blob) {
                        p.fail("a loaded state saves differently".into());
                    }
                }
                Err(e) => p.fail(format!("load_state: {e}")),
            }
            // Through a CPU cache of another page size (CPU engines use 256-token pages) and
            // back into a CUDA cache: the same contents.
            let page_tokens = if cfg.page_tokens == 0 { 4 * cfg.group_size } else { 0 };
            let other = CacheConfig { page_tokens, ..cfg.clone() };
            let back = Cache::new(other)
                .and_then(|mut c| c.load_state(&blob).map(|_| c.save_state_vec()))
                .and_then(|b| new_cache(cfg.clone()).and_then(|mut c| c.load_state(&b).map(|_| c)))
                .and_then(|c| c.to_host(std::ptr::null_mut()));
            match back {
                Ok(h) => {
                    for seq in p.cpu.seq_ids() {
                        for layer in 0..cfg.n_layers {
                            if h.dequantized(layer, seq).ok() != p.cpu.dequantized(layer, seq).ok() {
                                p.fail(format!("a blob of {page_tokens}-token pages: seq {seq} layer {layer} differs"));
                            }
                        }
                    }
                }
                Err(e) => p.fail(format!("a blob of {page_tokens}-token pages: {e}")),
            }
        }
        Err(e) => p.fail(format!("save_state_vec: {e}")),
    }
    // One sequence out to the host and back under another id (a swap, or a saved state).
    match p.gpu.seq_to_host(0, std::ptr::null_mut()) {
        Ok(one) => {
            for layer in 0..cfg.n_layers {
                if one.dequantized(layer, 0).ok() != p.cpu.dequantized(layer, 0).ok() {
                    p.fail(format!("seq_to_host: layer {layer} differs"));
                }
            }
            let g = p.gpu.seq_from_host(&one, 0, 6);
            let r = p.cpu.seq_copy(0, 6, u32::MAX);
            if g.is_err() || r.is_err() {
                p.fail(format!("seq_from_host: CUDA {g:?}, CPU copy {r:?}"));
            } else {
                for layer in 0..cfg.n_layers {
                    p.decode(layer, &[6, 0]);
                }
            }
        }
        Err(e) => p.fail(format!("seq_to_host: {e}")),
    }
    Ok(p)
}

/// Many sequences of different lengths, more than one launch holds, in each decode step.
fn many_sequences<T: Element + Default>(cfg: &CacheConfig, nqh: usize, seed: u64) -> Result<Pair<T>, String> {
    let mut p = Pair::<T>::new(cfg.clone(), nqh, AttnOptions::default(), seed)?;
    let n = cfg.max_seqs;
    for seq in 0..n {
        p.append_attend(0, seq, 1 + (seq as usize * 37) % 300);
    }
    let all: Vec<u32> = (0..n).collect();
    for _ in 0..cfg.group_size + 2 {
        p.decode(0, &all);
    }
    p.compare_state("after batched decode");
    Ok(p)
}

/// Long contexts: many splits, many groups per warp, pages all over the pool.
fn long_context<T: Element + Default>(cfg: &CacheConfig, nqh: usize, seed: u64) -> Result<Pair<T>, String> {
    let mut p = Pair::<T>::new(cfg.clone(), nqh, AttnOptions::default(), seed)?;
    for (seq, len) in [(0u32, 20000usize), (1, 9001), (2, 333)] {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(4000);
            p.append(0, seq, n);
            done += n;
        }
    }
    for _ in 0..3 {
        p.decode(0, &[0, 1, 2]);
    }
    p.decode(0, &[1]);
    p.attend(0, 0, 3);
    p.append_attend(0, 2, 700);
    p.compare_state("after long appends");
    Ok(p)
}

struct Case {
    name: &'static str,
    cfg: CacheConfig,
    nqh: usize,
    opts: AttnOptions,
    many: bool,
    long: bool,
}

#[allow(clippy::too_many_arguments)]
fn case(
    name: &'static str,
    hd: u32,
    nkv: u32,
    nqh: usize,
    bits: (u8, u8),
    g: u32,
    r: u32,
    sinks: u32,
    mode: KeyMode,
    dtype: DType,
    page_tokens: u32,
    opts: AttnOptions,
) -> Case {
    let mut cfg = CacheConfig::new(2, nkv, hd);
    cfg.key_bits = bits.0;
    cfg.value_bits = bits.1;
    cfg.group_size = g;
    cfg.residual = r;
    cfg.sinks = sinks;
    cfg.key_mode = mode;
    cfg.value_group = if hd % 32 == 0 { 32 } else { 16 };
    cfg.dtype = dtype;
    cfg.max_tokens = 4096;
    cfg.max_seqs = 8;
    cfg.page_tokens = page_tokens;
    Case { name, cfg, nqh, opts, many: false, long: false }
}

fn cases() -> Vec<Case> {
    use DType::*;
    use KeyMode::*;
    let d = AttnOptions::default();
    let nc = AttnOptions { causal: false, ..d };
    let sw = AttnOptions { sliding_window: 50, ..d };
    let sc = AttnOptions { softcap: 30.0, scale: Some(0.2), ..d };
    let mut v = vec![
        case("kivi2-hd64-gqa4", 64, 2, 8, (2, 2), 32, 128, 0, PerChannel, F32, 0, d),
        case("kivi4-hd128-gqa4", 128, 1, 4, (4, 4), 32, 64, 0, PerChannel, F16, 0, d),
        case("kivi8-hd80-sinks", 80, 2, 2, (8, 8), 16, 32, 4, PerChannel, BF16, 64, sw),
        case("kivi2-g8-pages", 64, 1, 1, (2, 2), 8, 16, 1, PerChannel, F32, 32, d),
        case("kivi2-4-r0", 96, 2, 6, (2, 4), 32, 0, 0, PerChannel, F16, 0, nc),
        case("pertoken-hd256", 256, 1, 4, (2, 2), 32, 32, 2, PerToken, F32, 0, sc),
        case("pertoken-g64", 128, 2, 4, (4, 2), 64, 128, 0, PerToken, F16, 128, d),
        case("bench-shape-kivi2", 128, 8, 32, (2, 2), 32, 128, 0, PerChannel, F16, 0, d),
        case("gqa16-pages", 128, 2, 32, (2, 2), 32, 128, 0, PerChannel, F16, 128, sc),
        case("kivi4-bf16", 128, 8, 32, (4, 4), 32, 128, 0, PerChannel, BF16, 0, sw),
        case("mma-window", 64, 2, 8, (2, 2), 32, 64, 0, PerChannel, F16, 0, sw),
        case("mma-softcap-g16", 128, 1, 8, (2, 4), 16, 32, 0, PerChannel, BF16, 64, sc),
        case("mma-sinks-noncausal", 64, 2, 4, (4, 2), 16, 32, 3, PerChannel, F32, 64, nc),
        case("mma-g64", 64, 4, 16, (4, 4), 64, 64, 0, PerChannel, F16, 128, d),
        // head_dim 256 (Gemma): tensor cores with dynamic shared memory, softcapped; 4 bits at
        // GQA 8 (two blocks per kv head) with a sliding window.
        case("mma-hd256-softcap", 256, 1, 4, (2, 2), 32, 128, 1, PerChannel, BF16, 0, sc),
        case("mma-hd256-kivi4-gqa8", 256, 2, 16, (4, 4), 32, 64, 0, PerChannel, F16, 0, sw),
        // G = 48: on the CUDA-core kernel (not a power of two; the tensor-core one needs one).
        case("g48-hd80", 80, 1, 4, (4, 2), 48, 48, 3, PerChannel, F32, 192, sc),
    ];
    let mut many = case("batch-70", 128, 2, 8, (2, 2), 32, 64, 0, PerChannel, F16, 0, d);
    many.cfg.max_seqs = 70;
    many.cfg.max_tokens = 70 * 400;
    many.cfg.n_layers = 1;
    many.many = true;
    v.push(many);
    for (name, bits) in [("long-kivi2", 2u8), ("long-kivi4", 4)] {
        let mut long = case(name, 128, 8, 32, (bits, bits), 32, 128, 0, PerChannel, F16, 0, d);
        long.cfg.n_layers = 1;
        long.cfg.max_seqs = 4;
        long.cfg.max_tokens = 32768;
        long.long = true;
        v.push(long);
    }
    v
}

/// The C ABI on the device: what `kivi_cache_create` makes with `params.device = 0`, on a
/// non-blocking stream set with `kivi_cache_set_stream`, fed device pointers, against a CPU
/// `kivi_cache` fed the same data through the same functions: prefill chunks, appends, batched
/// decode steps across flushes, attend, a fork and a truncation, the statistics and the state
/// blob, and a second CUDA cache loaded from the CPU cache's blob. Some decode steps are captured
/// into a CUDA graph and replayed: a capture fails if a call synchronizes, waits for the host or
/// uses the legacy stream, so this checks that the calls only queue work on the engine's stream.
mod c_abi {
    use super::{rel_err, sync, to_t, DevBuf, Rng};
    use cudarc::driver::{result as drv, sys};
    use kivi::f16;
    use kivi::ffi::*;
    use std::ffi::{c_void, CStr};
    use std::ptr::{null, null_mut};

    const LAYERS: u32 = 2;
    const KV: usize = 2;
    const HD: usize = 128;
    pub const QH: usize = 8;
    const KVROW: usize = KV * HD;
    const QROW: usize = QH * HD;

    fn last_error() -> String {
        // SAFETY: kivi returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(kivi_last_error_message()) }.to_string_lossy().into_owned()
    }

    fn ok(what: &str, st: kivi_status) -> Result<(), String> {
        if st == kivi_status::KIVI_OK {
            Ok(())
        } else {
            Err(format!("{what}: {st:?}: {}", last_error()))
        }
    }

    fn rows(data: *const c_void, n: usize, len: usize) -> kivi_rows {
        let dtype = kivi_dtype::KIVI_DTYPE_F16 as i32;
        kivi_rows { data, dtype, n_rows: n as u32, row_len: len as u32, stride: 0 }
    }

    fn rows_mut(data: *mut c_void, n: usize, len: usize) -> kivi_rows_mut {
        let dtype = kivi_dtype::KIVI_DTYPE_F16 as i32;
        kivi_rows_mut { data, dtype, n_rows: n as u32, row_len: len as u32, stride: 0 }
    }

    /// A CPU cache and one or two CUDA caches, all made through the C ABI.
    struct Run {
        cpu: *mut kivi_cache,
        gpu: *mut kivi_cache,
        stream: sys::CUstream,
        /// Whether the CUDA calls are captured into a graph (global mode), then launched.
        capture: bool,
        rng: Rng,
        tol: f64,
        calls: usize,
        max_err: f64,
        failures: Vec<String>,
    }

    impl Drop for Run {
        fn drop(&mut self) {
            // SAFETY: handles from kivi_cache_create (or NULL); the stream is ours.
            unsafe {
                kivi_cache_free(self.cpu);
                kivi_cache_free(self.gpu);
                if !self.stream.is_null() {
                    let _ = drv::stream::destroy(self.stream);
                }
            }
        }
    }

    fn create(p: &kivi_params, device: i32) -> Result<*mut kivi_cache, String> {
        let p = kivi_params { device, ..*p };
        let mut c = null_mut();
        // SAFETY: valid params and out pointer.
        ok(&format!("kivi_cache_create(device {device})"), unsafe { kivi_cache_create(&p, &mut c) })?;
        Ok(c)
    }

    impl Run {
        fn new(p: &kivi_params) -> Result<Run, String> {
            let mut r = Run {
                cpu: null_mut(),
                gpu: null_mut(),
                stream: null_mut(),
                capture: false,
                rng: Rng(0xCAB1),
                tol: 1e-3 + 1.0 / 1024.0,
                calls: 0,
                max_err: 0.0,
                failures: Vec::new(),
            };
            r.cpu = create(p, -1)?;
            r.gpu = create(p, 0)?;
            // The attention kernels compiled and loaded before the first call, as an engine
            // would when it loads a model.
            // SAFETY: live handle.
            ok("kivi_cache_prepare", unsafe { kivi_cache_prepare(r.gpu, QH as u32) })?;
            // The cache made device 0's primary context current on this thread: the stream is
            // created there, as an engine's runtime-API stream would be.
            r.stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
                .map_err(|e| format!("cuStreamCreate: {e:?}"))?;
            r.set_stream(r.gpu)?;
            Ok(r)
        }

        fn set_stream(&self, c: *mut kivi_cache) -> Result<(), String> {
            let mut back: *mut c_void = null_mut();
            // SAFETY: live handle and stream; valid out pointer.
            unsafe {
                ok("kivi_cache_set_stream", kivi_cache_set_stream(c, self.stream as *mut c_void))?;
                ok("kivi_cache_stream", kivi_cache_stream(c, &mut back))?;
            }
            if back != self.stream as *mut c_void {
                return Err("kivi_cache_stream does not return the stream that was set".into());
            }
            Ok(())
        }

        fn data(&mut self, n: usize, nq: usize) -> (Vec<f16>, Vec<f16>, Vec<f16>) {
            (to_t(&self.rng.keys(n, KV, HD)), to_t(&self.rng.normals(n * KVROW)), to_t(&self.rng.normals(nq * QROW)))
        }

        /// Waits for the stream, brings `dout` back and compares it with the CPU's `out`.
        fn compare(&mut self, what: &str, dout: &DevBuf, out: &[f16]) -> Result<(), String> {
            // SAFETY: our live stream.
            unsafe { drv::stream::synchronize(self.stream) }.map_err(|e| format!("{what}: stream: {e:?}"))?;
            let got: Vec<f16> = dout.download(out.len());
            let e = rel_err(&got, out);
            self.calls += 1;
            self.max_err = if e.is_finite() { self.max_err.max(e) } else { f64::INFINITY };
            if !e.is_finite() || e > self.tol {
                self.failures.push(format!("{what}: relative error {e:.3e} > {:.1e}", self.tol));
            }
            Ok(())
        }

        /// One call on the CPU cache with host rows and on `gpu` with device rows; `f` gets the
        /// cache, keys, values, queries and output, and returns the status.
        #[allow(clippy::type_complexity)]
        fn both(
            &mut self,
            what: &str,
            gpu: *mut kivi_cache,
            n: usize,
            nq: usize,
            f: &dyn Fn(*mut kivi_cache, &kivi_rows, &kivi_rows, &kivi_rows, &kivi_rows_mut) -> kivi_status,
        ) -> Result<(), String> {
            let (k, v, q) = self.data(n, nq);
            let mut out = vec![f16::ZERO; q.len().max(1)];
            // Empty inputs (no queries for an append, no keys for an attend) are not uploaded.
            let up = |x: &[f16]| (!x.is_empty()).then(|| DevBuf::upload(x));
            let ptr = |b: &Option<DevBuf>| b.as_ref().map_or(0, |b| b.ptr) as *const c_void;
            let (dk, dv, dq) = (up(&k), up(&v), up(&q));
            let dout = DevBuf::zeroed(out.len() * 2);
            // The uploads ran on the legacy stream, which a non-blocking stream does not wait for.
            sync()?;
            let host = (rows(k.as_ptr().cast(), n, KVROW), rows(v.as_ptr().cast(), n, KVROW));
            let hq = rows(q.as_ptr().cast(), nq, QROW);
            let ho = rows_mut(out.as_mut_ptr().cast(), nq, QROW);
            ok(&format!("{what} (CPU)"), f(self.cpu, &host.0, &host.1, &hq, &ho))?;
            let dev = (rows(ptr(&dk), n, KVROW), rows(ptr(&dv), n, KVROW));
            let dq_rows = rows(ptr(&dq), nq, QROW);
            let do_rows = rows_mut(dout.ptr as *mut c_void, nq, QROW);
            let call = || f(gpu, &dev.0, &dev.1, &dq_rows, &do_rows);
            let st = if self.capture { self.captured(what, call)? } else { call() };
            ok(&format!("{what} (CUDA)"), st)?;
            if nq > 0 {
                self.compare(what, &dout, &out)
            } else {
                // SAFETY: our live stream; the rows stay allocated until it is done.
                unsafe { drv::stream::synchronize(self.stream) }.map_err(|e| format!("{what}: stream: {e:?}"))
            }
        }

        /// `call` captured on the stream into a graph (global mode: a call that would
        /// synchronize, or that any thread makes on the legacy stream, ends the capture with an
        /// error), then the graph launched on the stream once. Returns the call's status.
        fn captured(&self, what: &str, call: impl FnOnce() -> kivi_status) -> Result<kivi_status, String> {
            let err = |step: &str, e: drv::DriverError| format!("{what}: {step}: {e:?}");
            // SAFETY: our live stream; the graph and its instance are destroyed below.
            unsafe {
                let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL;
                drv::stream::begin_capture(self.stream, mode).map_err(|e| err("cuStreamBeginCapture", e))?;
                let st = call();
                let graph = drv::stream::end_capture(self.stream).map_err(|e| err("the capture failed", e))?;
                let res = (|| {
                    let exec = drv::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0))
                        .map_err(|e| err("cuGraphInstantiate", e))?;
                    let run = drv::graph::launch(exec, self.stream).map_err(|e| err("cuGraphLaunch", e));
                    let _ = drv::stream::synchronize(self.stream);
                    let _ = drv::graph::exec_destroy(exec);
                    run
                })();
                let _ = drv::graph::destroy(graph);
                if st == kivi_status::KIVI_OK {
                    res?;
                }
                Ok(st)
            }
        }

        fn same(&mut self, when: &str) -> Result<(), String> {
            let (mut a, mut b) = (kivi_memory_stats::default(), kivi_memory_stats::default());
            let size = std::mem::size_of::<kivi_memory_stats>();
            // SAFETY: live handles, valid out pointers.
            unsafe {
                ok("kivi_cache_stats", kivi_cache_stats(self.cpu, &mut a, size))?;
                ok("kivi_cache_stats", kivi_cache_stats(self.gpu, &mut b, size))?;
            }
            if a != b {
                self.failures.push(format!("{when}: stats {a:?} vs {b:?}"));
            }
            if blob(self.cpu)? != blob(self.gpu)? {
                self.failures.push(format!("{when}: the state blobs differ"));
            }
            Ok(())
        }
    }

    fn blob(c: *const kivi_cache) -> Result<Vec<u8>, String> {
        let (mut size, mut written) = (0usize, 0usize);
        // SAFETY: live handle; the buffer has `size` bytes.
        unsafe {
            ok("kivi_state_size", kivi_state_size(c, &mut size))?;
            let mut b = vec![0u8; size];
            ok("kivi_state_save", kivi_state_save(c, b.as_mut_ptr(), size, &mut written))?;
            b.truncate(written);
            Ok(b)
        }
    }

    fn scenario(r: &mut Run, p: &kivi_params) -> Result<(), String> {
        for layer in 0..LAYERS {
            let f = move |c: *mut kivi_cache, k: &kivi_rows, v: &kivi_rows, q: &kivi_rows, o: &kivi_rows_mut| {
                // SAFETY: the rows describe live buffers of the sizes given.
                unsafe { kivi_append_attend(c, layer, 0, k, v, q, o, null()) }
            };
            r.both(&format!("append_attend(layer {layer}, seq 0, 300)"), r.gpu, 300, 300, &f)?;
            let f = move |c: *mut kivi_cache, k: &kivi_rows, v: &kivi_rows, _: &kivi_rows, _: &kivi_rows_mut| {
                // SAFETY: as above.
                unsafe { kivi_append(c, layer, 1, k, v) }
            };
            r.both(&format!("append(layer {layer}, seq 1, 200)"), r.gpu, 200, 0, &f)?;
        }
        r.same("after prefill")?;
        let decode = |seqs: &'static [u32], layer: u32| {
            move |c: *mut kivi_cache, k: &kivi_rows, v: &kivi_rows, q: &kivi_rows, o: &kivi_rows_mut| {
                // SAFETY: as above; seqs has seqs.len() ids.
                unsafe { kivi_decode(c, layer, seqs.as_ptr(), seqs.len() as u32, k, v, q, o, null()) }
            }
        };
        for step in 0..40 {
            for layer in 0..LAYERS {
                r.both(&format!("decode(step {step}, layer {layer})"), r.gpu, 2, 2, &decode(&[1, 0], layer))?;
            }
        }
        for (what, c) in [("CPU", r.cpu), ("CUDA", r.gpu)] {
            // SAFETY: live handles.
            unsafe {
                ok(&format!("kivi_seq_copy ({what})"), kivi_seq_copy(c, 0, 2, 100))?;
                ok(&format!("kivi_seq_truncate ({what})"), kivi_seq_truncate(c, 1, 50))?;
            }
        }
        for step in 0..3 {
            for layer in 0..LAYERS {
                let f = decode(&[2, 1, 0], layer);
                r.both(&format!("decode after fork (step {step}, layer {layer})"), r.gpu, 3, 3, &f)?;
            }
        }
        // Steps captured into CUDA graphs, one graph per call: 33 steps take sequence 0 across
        // a group's flush (its quantization, and a block-table entry where a page is new).
        r.capture = true;
        for step in 0..33 {
            for layer in 0..LAYERS {
                let f = decode(&[2, 1, 0], layer);
                r.both(&format!("decode captured in a graph (step {step}, layer {layer})"), r.gpu, 3, 3, &f)?;
            }
        }
        r.capture = false;
        let f = |c: *mut kivi_cache, _: &kivi_rows, _: &kivi_rows, q: &kivi_rows, o: &kivi_rows_mut| {
            // SAFETY: as above.
            unsafe { kivi_attend(c, 1, 0, q, o, null()) }
        };
        r.both("attend(layer 1, seq 0, 4)", r.gpu, 0, 4, &f)?;
        r.same("after decode")?;
        // The CPU cache's blob into a second CUDA cache: it then decodes as the CPU cache does.
        let cpu_blob = blob(r.cpu)?;
        let gpu2 = create(p, 0)?;
        let res = (|| {
            r.set_stream(gpu2)?;
            // SAFETY: live handle; the blob is cpu_blob.len() bytes.
            ok("kivi_state_load", unsafe { kivi_state_load(gpu2, cpu_blob.as_ptr(), cpu_blob.len()) })?;
            if blob(gpu2)? != cpu_blob {
                r.failures.push("a CUDA cache loaded from a CPU blob saves another blob".into());
            }
            for layer in 0..LAYERS {
                r.both(&format!("decode after load (layer {layer})"), gpu2, 3, 3, &decode(&[0, 1, 2], layer))?;
            }
            Ok(())
        })();
        // SAFETY: created above.
        unsafe { kivi_cache_free(gpu2) };
        res
    }

    /// The configuration the check's caches get from their `kivi_params` (for `precompile`).
    pub fn config() -> kivi::CacheConfig {
        let mut c = kivi::CacheConfig::new(LAYERS, KV as u32, HD as u32);
        c.dtype = kivi::DType::F16;
        (c.max_tokens, c.max_seqs) = (2048, 4);
        c
    }

    /// Runs the check; prints one JSON line like the other cases and returns whether it passed.
    pub fn check() -> bool {
        let t0 = std::time::Instant::now();
        // SAFETY: kivi_params is plain integers; kivi_params_init fills it.
        let mut p: kivi_params = unsafe { std::mem::zeroed() };
        // SAFETY: p is a kivi_params.
        let mut res = ok("kivi_params_init", unsafe { kivi_params_init(&mut p, std::mem::size_of::<kivi_params>()) });
        let c = config();
        (p.n_layers, p.n_kv_heads, p.head_dim) = (c.n_layers, c.n_kv_heads, c.head_dim);
        p.dtype = kivi_dtype::KIVI_DTYPE_F16 as i32;
        (p.max_tokens, p.max_seqs) = (c.max_tokens, c.max_seqs);
        // SAFETY: plain integers and a char array.
        let mut info: kivi_device_info = unsafe { std::mem::zeroed() };
        res = res.and_then(|_| {
            // SAFETY: info is a kivi_device_info.
            ok("kivi_cuda_device_info", unsafe {
                kivi_cuda_device_info(0, &mut info, std::mem::size_of::<kivi_device_info>())
            })
        });
        let (calls, err, failures) = match res.and_then(|_| Run::new(&p)) {
            Ok(mut r) => {
                let res = scenario(&mut r, &p);
                let mut f = std::mem::take(&mut r.failures);
                if let Err(e) = res {
                    f.push(e);
                }
                (r.calls, r.max_err, f)
            }
            Err(e) => (0, f64::NAN, vec![e]),
        };
        let ok = failures.is_empty() && calls > 0;
        let fails: Vec<String> = failures.iter().map(|f| format!("{f:?}")).collect();
        // SAFETY: kivi wrote a NUL-terminated name (or it is all zeros).
        let name = unsafe { CStr::from_ptr(info.name.as_ptr()) }.to_string_lossy().into_owned();
        println!(
            "{{\"kind\":\"check\",\"case\":\"{}\",\"device\":{name:?},\"calls\":{calls},\"max_rel_err\":{err:.3e},\"tol\":{:.2e},\"ok\":{ok},\"seconds\":{:.2},\"failures\":[{}]}}",
            super::C_ABI_CASE,
            1e-3 + 1.0 / 1024.0,
            t0.elapsed().as_secs_f64(),
            fails.join(",")
        );
        ok
    }
}

/// The C ABI case's name in `--cases` and in its JSON line.
const C_ABI_CASE: &str = "c-abi-stream";

/// The cases `--cases a,b,...` names, or None (every case) without it. A name that is no case's
/// is an error that lists them all, so that a mistyped name never runs nothing and passes.
fn chosen_cases(args: &[String]) -> Result<Option<Vec<String>>, String> {
    let Some(i) = args.iter().position(|a| a == "--cases") else { return Ok(None) };
    let names: Vec<String> = args.get(i + 1).map_or("", |s| s.as_str()).split(',').map(String::from).collect();
    let known: Vec<&str> = cases().iter().map(|c| c.name).chain([C_ABI_CASE]).collect();
    match names.iter().find(|n| !known.contains(&n.as_str())) {
        Some(bad) => Err(format!("--cases: no case {bad:?}; the cases are {}", known.join(","))),
        None => Ok(Some(names)),
    }
}

/// CUDA against the CPU cache on every case, or on the cases `only` names; true when all passed.
/// `mma_only`: just the cases whose decode steps run on tensor cores where allowed (to check
/// them again with KIVI_CUDA_MMA=0). On the simulator the long-context cases are skipped (they
/// take minutes there) and so is the C ABI case (the C ABI makes real CUDA caches only).
fn check(mma_only: bool, only: Option<&[String]>) -> bool {
    let mut all_ok = true;
    let chosen = |name: &str| only.is_none_or(|o| o.iter().any(|n| n == name));
    for (i, c) in cases().into_iter().enumerate() {
        if (mma_only && !kivi::cuda::kernels::tensor_core_decode(&c.cfg, c.nqh as u32)) || !chosen(c.name) {
            continue;
        }
        // Unoptimised builds on the simulator keep to a few cases: the rest takes minutes there.
        let quick = ["kivi2-hd64-gqa4", "pertoken-hd256", "mma-window", "mma-sinks-noncausal"];
        if sim() && (c.long || (cfg!(debug_assertions) && !quick.contains(&c.name))) {
            continue;
        }
        let t0 = Instant::now();
        let seed = 0x5EED_0000 + i as u64;
        macro_rules! run {
            ($T:ty) => {
                if c.many {
                    many_sequences::<$T>(&c.cfg, c.nqh, seed).map(|p| (p.calls, p.max_err, p.tol, p.failures))
                } else if c.long {
                    long_context::<$T>(&c.cfg, c.nqh, seed).map(|p| (p.calls, p.max_err, p.tol, p.failures))
                } else {
                    scenario::<$T>(&c.cfg, c.nqh, c.opts, seed).map(|p| (p.calls, p.max_err, p.tol, p.failures))
                }
            };
        }
        let res = match c.cfg.dtype {
            DType::F32 => run!(f32),
            DType::F16 => run!(f16),
            DType::BF16 => run!(bf16),
        };
        let (calls, err, tol, failures) = match res {
            Ok(r) => r,
            Err(e) => (0, f64::NAN, 0.0, vec![e]),
        };
        let ok = failures.is_empty() && calls > 0;
        all_ok &= ok;
        let fails: Vec<String> = failures.iter().map(|f| format!("{:?}", f)).collect();
        println!(
            "{{\"kind\":\"check\",\"case\":\"{}\",\"q_heads\":{},\"config\":{:?},\"opts\":{:?},\"calls\":{},\"max_rel_err\":{:.3e},\"tol\":{:.2e},\"ok\":{},\"seconds\":{:.2},\"failures\":[{}]}}",
            c.name,
            c.nqh,
            format!("{:?}", c.cfg),
            format!("{:?}", c.opts),
            calls,
            err,
            tol,
            ok,
            t0.elapsed().as_secs_f64(),
            fails.join(",")
        );
        if sync().is_err() {
            eprintln!("the device is in an error state; stopping the check");
            return false;
        }
    }
    if !mma_only && !sim() && chosen(C_ABI_CASE) {
        all_ok &= c_abi::check();
    }
    all_ok
}

fn info() -> bool {
    match kivi::cuda::available() {
        Ok(i) => {
            println!(
                "{{\"kind\":\"info\",\"device\":{:?},\"capability\":\"{}.{}\",\"sms\":{},\"memory\":{},\"driver\":{},\"nvrtc\":\"{}.{}\"}}",
                i.name,
                i.capability.0,
                i.capability.1,
                i.multiprocessors,
                i.total_memory,
                i.driver_version,
                i.nvrtc_version.0,
                i.nvrtc_version.1
            );
            true
        }
        Err(e) => {
            println!("{{\"kind\":\"info\",\"error\":{:?}}}", e.to_string());
            false
        }
    }
}

fn list(args: &[String], name: &str, default: &[usize]) -> Vec<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args[i + 1].split(',').map(|x| x.parse().expect("a list of numbers")).collect(),
        None => default.to_vec(),
    }
}

/// The benchmark's heads: head_dim, KV heads and query heads (`--head-dim`, `--kv-heads`,
/// `--q-heads`; by default 128, 8 and 32, Llama-3-8B's and Mistral-7B's).
#[derive(Clone, Copy)]
struct Heads {
    hd: usize,
    nkv: usize,
    nqh: usize,
}

impl Heads {
    const DEFAULT: Heads = Heads { hd: 128, nkv: 8, nqh: 32 };

    fn from_args(args: &[String]) -> Heads {
        let d = Heads::DEFAULT;
        let one = |name: &str, default: usize| list(args, name, &[default])[0];
        let h = Heads { hd: one("--head-dim", d.hd), nkv: one("--kv-heads", d.nkv), nqh: one("--q-heads", d.nqh) };
        assert!(h.nkv > 0 && h.nqh % h.nkv == 0, "--q-heads must be a multiple of --kv-heads");
        h
    }

    /// The shape's part of a case name: `gqa4-hs128` by default.
    fn name(&self) -> String {
        format!("gqa{}-hs{}", self.nqh / self.nkv, self.hd)
    }
}

/// Decode steps of batches of sequences at each context length: the time of one
/// `CudaCache::decode` (attention for 32 query heads over 8 kv heads of head_dim 128, or the
/// heads `--head-dim`, `--kv-heads` and `--q-heads` say, and the append of the new tokens),
/// measured with CUDA events.
fn bench(args: &[String]) -> bool {
    let contexts = list(args, "--contexts", &[4096, 32768, 131072]);
    let batches = list(args, "--batches", &[1, 16, 64]);
    let bits_list = list(args, "--bits", &[2, 4]);
    let iters = list(args, "--iters", &[20])[0];
    let label = args.iter().position(|a| a == "--label").map_or("", |i| args[i + 1].as_str());
    let heads = Heads::from_args(args);
    let (hd, nkv, nqh) = (heads.hd, heads.nkv, heads.nqh);
    let shape = heads.name();
    let max_batch = *batches.iter().max().unwrap();
    let extra = bench_extra(iters, batches.len());
    // Every context's cache with the block tables of the longest: the same modules for all.
    let seq_tokens = contexts.iter().max().unwrap() + extra;
    let device = kivi::cuda::available().map(|i| i.name).unwrap_or_default();
    let cfgs: Vec<_> = (contexts.iter())
        .flat_map(|&ctx| bits_list.iter().map(move |&bits| (ctx, bits)))
        .map(|(ctx, bits)| (bench_config(bits, ctx, max_batch, extra, seq_tokens, heads), nqh, &[] as &Env))
        .collect();
    compile_ahead(&cfgs);
    // Contexts outermost: the longest (slowest to fill) come last.
    for &ctx in &contexts {
        for &bits in &bits_list {
            let mut rng = Rng(42 + bits as u64);
            let cfg = bench_config(bits, ctx, max_batch, extra, seq_tokens, heads);
            let (mut cache, fill_s) = match bench_cache(cfg.clone(), ctx, &mut rng) {
                Ok(c) => c,
                Err(e) => {
                    println!("{{\"kind\":\"bench\",\"bits\":{bits},\"ctx\":{ctx},\"error\":{e:?}}}");
                    continue;
                }
            };
            let (codes, params) = {
                let c = &cfg;
                let hd = c.head_dim as usize;
                let kp = hd * 4 / c.group_size as usize;
                let vp = hd / c.value_group as usize * 4;
                (hd * (c.key_bits + c.value_bits) as usize / 8, kp + vp)
            };
            // Chunked-prefill attention: the last 2048 tokens of sequence 0 as queries (causal,
            // over the whole context), the kernels a prefill chunk runs: the quantized groups on
            // kv_prefill_q (`ms`) and on kv_decode_mma (`KIVI_CUDA_PREFILL_Q=0`, the path before
            // it: `ms_decode_mma`), alternating, median of 3 calls each.
            if ctx >= 4096 && !args.iter().any(|a| a == "--no-prefill") {
                let chunk = ChunkAttend::new(2048, heads, &mut rng);
                let rows = chunk.rows;
                let run = |cache: &CudaCache| chunk.run(cache);
                let [ms, ms_mma] = alternate("KIVI_CUDA_PREFILL_Q", 3, || run(&cache));
                println!(
                    "{{\"kind\":\"prefill\",\"case\":\"kivi{bits}-{shape}{}{label}\",\"bits\":{bits},\"ctx\":{ctx},\"query_rows\":{rows},\"device\":{device:?},\"ms\":{ms:.3},\"ms_decode_mma\":{ms_mma:.3},\"fill_tokens_per_s\":{:.0}}}",
                    if label.is_empty() { "" } else { "-" },
                    (max_batch * ctx) as f64 / fill_s
                );
            }
            for &b in &batches {
                let decode = DecodeStep::new(b, heads, &mut rng);
                let seqs = &decode.seqs;
                let step = |cache: &mut CudaCache| decode.run(cache);
                for _ in 0..3 {
                    step(&mut cache);
                }
                let mut times = Vec::with_capacity(iters);
                let e0 = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).unwrap();
                let e1 = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).unwrap();
                for _ in 0..iters {
                    // SAFETY: events created above, recorded on the default stream.
                    unsafe {
                        drv::event::record(e0, std::ptr::null_mut()).unwrap();
                        step(&mut cache);
                        drv::event::record(e1, std::ptr::null_mut()).unwrap();
                        drv::event::synchronize(e1).unwrap();
                        times.push(drv::event::elapsed(e0, e1).unwrap() as f64);
                    }
                }
                // The same steps queued back to back, with no wait between them, as a model's
                // layers are: the device's time per step once the host keeps ahead of it (the
                // synchronised steps above also count the host's work before the first launch),
                // and the host's time per call.
                let mut host_us = Vec::with_capacity(iters);
                // SAFETY: events created above, recorded on the default stream.
                let ms_stream = unsafe {
                    drv::event::record(e0, std::ptr::null_mut()).unwrap();
                    for _ in 0..iters {
                        let t = Instant::now();
                        step(&mut cache);
                        host_us.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    drv::event::record(e1, std::ptr::null_mut()).unwrap();
                    drv::event::synchronize(e1).unwrap();
                    drv::event::elapsed(e0, e1).unwrap() as f64 / iters as f64
                };
                host_us.sort_by(|a, b| a.partial_cmp(b).unwrap());
                // SAFETY: created above.
                unsafe {
                    let _ = drv::event::destroy(e0);
                    let _ = drv::event::destroy(e1);
                }
                times.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let ms = times[times.len() / 2];
                let ms_min = times[0];
                // Bytes one step reads: every quantized token's codes, scales and zeros, and the
                // full-precision tokens (sinks and window, f16 keys and values), for every kv head
                // of every sequence. Past the sinks, groups leave the window once it holds R + G.
                let mut bytes = 0u64;
                let (g, r) = (cfg.group_size as u64, cfg.residual as u64);
                for &s in seqs {
                    let len = cache.seq_len(s).unwrap() as u64;
                    let past_sinks = len.saturating_sub(cfg.sinks as u64);
                    let qn = past_sinks.saturating_sub(r) / g * g;
                    bytes += nkv as u64 * (qn * (codes + params) as u64 + (len - qn) * hd as u64 * 4);
                }
                println!(
                    "{{\"kind\":\"bench\",\"case\":\"kivi{bits}-{shape}{}{label}\",\"bits\":{bits},\"ctx\":{ctx},\"batch\":{b},\"head_dim\":{hd},\"kv_heads\":{nkv},\"q_heads\":{nqh},\"device\":{device:?},\"ms_median\":{ms:.4},\"ms_min\":{ms_min:.4},\"ms_stream\":{ms_stream:.4},\"host_us_median\":{:.1},\"bytes_per_step\":{bytes},\"gbytes_per_s\":{:.1},\"fill_seconds\":{fill_s:.2}}}",
                    if label.is_empty() { "" } else { "-" },
                    host_us[host_us.len() / 2],
                    bytes as f64 / ms / 1e6
                );
            }
        }
    }
    true
}

/// Tokens the benchmark's sequences have room for past their context: the steps of a run.
fn bench_extra(iters: usize, n_batches: usize) -> usize {
    (2 * iters + 8) * n_batches + 256
}

/// The benchmark's configuration (f16, KIVI-`bits`, G = 32, the KV heads of `heads`: 8 of
/// head_dim 128 by default) for `max_batch` sequences of `ctx` tokens each with room for `extra`
/// more, and block tables for `seq_tokens` tokens per sequence (at least `ctx + extra`: the
/// caches of one run's contexts then share their modules).
fn bench_config(
    bits: usize,
    ctx: usize,
    max_batch: usize,
    extra: usize,
    seq_tokens: usize,
    heads: Heads,
) -> CacheConfig {
    let mut cfg = CacheConfig::new(1, heads.nkv as u32, heads.hd as u32);
    cfg.dtype = DType::F16;
    cfg.key_bits = bits as u8;
    cfg.value_bits = bits as u8;
    cfg.max_seqs = max_batch as u32;
    cfg.max_tokens = (max_batch * (ctx + extra)) as u32;
    // Each sequence's own limit, as a serving engine sets it: block tables of one sequence's
    // pages rather than the pool's.
    cfg.max_seq_tokens = seq_tokens.max(ctx + extra) as u32;
    cfg
}

/// The benchmark's cache of configuration `cfg` (`bench_config`), its sequences filled to `ctx`
/// tokens: each sequence its own copy of the data (no shared pages, so no reads served from L2
/// that another sequence brought in). Also the seconds the fill took.
fn bench_cache(cfg: CacheConfig, ctx: usize, rng: &mut Rng) -> Result<(CudaCache, f64), String> {
    let (hd, nkv) = (cfg.head_dim as usize, cfg.n_kv_heads as usize);
    let max_batch = cfg.max_seqs as usize;
    let t0 = Instant::now();
    let mut cache = new_cache(cfg.clone()).map_err(|e| e.to_string())?;
    let chunk = 4096.min(ctx);
    let k: Vec<f16> = to_t(&rng.keys(chunk, nkv, hd));
    let v: Vec<f16> = to_t(&rng.normals(chunk * nkv * hd));
    let (dk, dv) = (DevBuf::upload(&k), DevBuf::upload(&v));
    for seq in 0..max_batch as u32 {
        let mut done = 0;
        while done < ctx {
            let n = chunk.min(ctx - done);
            let (k, v) = (DevRows::new(dk.ptr, n, nkv * hd), DevRows::new(dv.ptr, n, nkv * hd));
            cache.append(0, seq, k, v, std::ptr::null_mut()).map_err(|e| e.to_string())?;
            done += n;
        }
    }
    sync()?;
    Ok((cache, t0.elapsed().as_secs_f64()))
}

/// One decode step of the benchmark's sequences 0 .. b: each appends a new token and attends
/// with the query heads of `heads` (32 by default); its inputs and output stay on the device
/// between steps.
struct DecodeStep {
    seqs: Vec<u32>,
    heads: Heads,
    q: DevBuf,
    k: DevBuf,
    v: DevBuf,
    out: DevBuf,
}

impl DecodeStep {
    fn new(b: usize, heads: Heads, rng: &mut Rng) -> DecodeStep {
        let (hd, nkv, nqh) = (heads.hd, heads.nkv, heads.nqh);
        let q: Vec<f16> = to_t(&rng.normals(b * nqh * hd));
        let k: Vec<f16> = to_t(&rng.keys(b, nkv, hd));
        let v: Vec<f16> = to_t(&rng.normals(b * nkv * hd));
        DecodeStep {
            seqs: (0..b as u32).collect(),
            heads,
            q: DevBuf::upload(&q),
            k: DevBuf::upload(&k),
            v: DevBuf::upload(&v),
            out: DevBuf::zeroed(b * nqh * hd * 2),
        }
    }

    fn run(&self, cache: &mut CudaCache) {
        let (b, Heads { hd, nkv, nqh }) = (self.seqs.len(), self.heads);
        cache
            .decode(
                0,
                &self.seqs,
                DevRows::new(self.k.ptr, b, nkv * hd),
                DevRows::new(self.v.ptr, b, nkv * hd),
                DevRows::new(self.q.ptr, b, nqh * hd),
                DevRows::new(self.out.ptr, b, nqh * hd),
                &AttnOptions::default(),
                std::ptr::null_mut(),
            )
            .expect("decode")
    }
}

/// The benchmark's chunked-prefill attention: `rows` query rows (2048 in the benchmark)
/// attending, causal, to the whole of sequence 0 (its last `rows` tokens' positions), the
/// kernels a prefill chunk runs.
struct ChunkAttend {
    rows: usize,
    width: usize,
    q: DevBuf,
    out: DevBuf,
}

impl ChunkAttend {
    fn new(rows: usize, heads: Heads, rng: &mut Rng) -> ChunkAttend {
        let width = heads.nqh * heads.hd;
        let q: Vec<f16> = to_t(&rng.normals(rows * width));
        ChunkAttend { rows, width, q: DevBuf::upload(&q), out: DevBuf::zeroed(rows * width * 2) }
    }

    fn run(&self, cache: &CudaCache) {
        let (rows, w) = (self.rows, self.width);
        let (q, out) = (DevRows::new(self.q.ptr, rows, w), DevRows::new(self.out.ptr, rows, w));
        cache.attend(0, 0, q, out, &AttnOptions::default(), std::ptr::null_mut()).expect("attend")
    }
}

/// Variants of the kernels against the library as built, side by side in one process: each
/// `--variant NAME=OPTS` (NVRTC options, such as `pipe0=-DKV_MMA_PIPE=0`, added to
/// `KIVI_NVRTC_OPTS`, and settings of the library read when a cache is made, such as
/// `KIVI_CUDA_FUSED_COMBINE=0`) gets its own cache of the benchmark's shape, whose modules are
/// compiled with them (all variants' modules first, on every core: `compile_ahead`) and loaded
/// before any is timed; decode steps then alternate between the caches, `--rounds` rounds (after one
/// discarded) of `--iters` synchronised steps and as many back to back. One JSON line per
/// variant and shape: the median synchronised step, the median back-to-back step, and their
/// ratios to the default's. With `--prefill`, also the benchmark's chunked-prefill attention
/// (2048 rows over the whole context), one call per variant and round.
fn variants(args: &[String]) -> bool {
    let contexts = list(args, "--contexts", &[32768]);
    let batches = list(args, "--batches", &[16, 64]);
    let bits_list = list(args, "--bits", &[2, 4]);
    let iters = list(args, "--iters", &[10])[0];
    let rounds = list(args, "--rounds", &[5])[0];
    let base = std::env::var("KIVI_NVRTC_OPTS").ok();
    let mut named = vec![("default".to_string(), String::new())];
    for (i, a) in args.iter().enumerate() {
        if a == "--variant" {
            match args.get(i + 1).and_then(|v| v.split_once('=')) {
                Some((n, o)) => named.push((n.to_string(), o.to_string())),
                None => {
                    eprintln!("--variant NAME=OPTS");
                    return false;
                }
            }
        }
    }
    let max_batch = *batches.iter().max().unwrap();
    let extra = (rounds + 1) * 2 * iters * named.len() * batches.len() + 64;
    let seq_tokens = contexts.iter().max().unwrap() + extra;
    let device = kivi::cuda::available().map(|i| i.name).unwrap_or_default();
    let events = |_| match sim() {
        true => std::ptr::null_mut(),
        false => drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).unwrap(),
    };
    let [e0, e1] = [0, 1].map(events);
    // Milliseconds of `n` steps on the default stream, one event pair around them (on the
    // simulator, which runs them at once: the host's clock).
    let time = |n: usize, f: &mut dyn FnMut()| -> f64 {
        if sim() {
            let t = Instant::now();
            (0..n).for_each(|_| f());
            return t.elapsed().as_secs_f64() * 1e3;
        }
        // SAFETY: events created above, recorded on the default stream.
        unsafe {
            drv::event::record(e0, std::ptr::null_mut()).unwrap();
            for _ in 0..n {
                f();
            }
            drv::event::record(e1, std::ptr::null_mut()).unwrap();
            drv::event::synchronize(e1).unwrap();
            drv::event::elapsed(e0, e1).unwrap() as f64
        }
    };
    let median = |mut t: Vec<f64>| {
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        t[t.len() / 2]
    };
    // Each variant's environment: KIVI_X=V settings of the library and the rest NVRTC's options
    // (`KIVI_NVRTC_OPTS`), all read when a cache is made.
    let settings: Vec<(&String, Vec<(&str, String)>)> = (named.iter())
        .map(|(name, opts)| {
            let (env, nvrtc): (Vec<&str>, Vec<&str>) =
                opts.split_whitespace().partition(|o| o.starts_with("KIVI_") && o.contains('='));
            let mut set = vec![("KIVI_NVRTC_OPTS", format!("{} {}", base.as_deref().unwrap_or(""), nvrtc.join(" ")))];
            set.extend(env.iter().filter_map(|e| e.split_once('=')).map(|(k, v)| (k, v.to_string())));
            (name, set)
        })
        .collect();
    let mut cfgs = Vec::new();
    for &ctx in &contexts {
        for &bits in &bits_list {
            for (_, set) in &settings {
                let cfg = bench_config(bits, ctx, max_batch, extra, seq_tokens, Heads::DEFAULT);
                cfgs.push((cfg, Heads::DEFAULT.nqh, set.as_slice()));
            }
        }
    }
    compile_ahead(&cfgs);
    let mut ok = true;
    for &ctx in &contexts {
        for &bits in &bits_list {
            let mut caches = Vec::new();
            for (name, set) in &settings {
                let mut rng = Rng(42 + bits as u64);
                let cfg = bench_config(bits, ctx, max_batch, extra, seq_tokens, Heads::DEFAULT);
                // The cache keeps the variant's NVRTC options for every module it compiles.
                let made = with_env(set, || bench_cache(cfg, ctx, &mut rng));
                let made = made.and_then(|(cache, _)| match cache.prepare_attention(Heads::DEFAULT.nqh as u32) {
                    Ok(()) => Ok(cache),
                    Err(e) => Err(e.to_string()),
                });
                match made {
                    Ok(cache) => caches.push(cache),
                    Err(e) => {
                        println!(
                            "{{\"kind\":\"variant\",\"name\":{name:?},\"bits\":{bits},\"ctx\":{ctx},\"error\":{e:?}}}"
                        );
                        ok = false;
                    }
                }
            }
            if caches.len() != named.len() {
                continue;
            }
            if args.iter().any(|a| a == "--prefill") {
                let chunk = ChunkAttend::new(2048.min(ctx), Heads::DEFAULT, &mut Rng(11));
                let mut times = vec![Vec::new(); named.len()];
                for round in 0..rounds + 1 {
                    for (i, cache) in caches.iter().enumerate() {
                        let t = time(1, &mut || chunk.run(cache));
                        if round > 0 {
                            times[i].push(t);
                        }
                    }
                }
                let ms: Vec<f64> = times.into_iter().map(median).collect();
                for (i, (name, opts)) in named.iter().enumerate() {
                    println!(
                        "{{\"kind\":\"variant-prefill\",\"name\":{name:?},\"opts\":{opts:?},\"bits\":{bits},\"ctx\":{ctx},\"query_rows\":{},\"device\":{device:?},\"ms\":{:.3},\"vs_default\":{:.3}}}",
                        chunk.rows,
                        ms[i],
                        ms[i] / ms[0]
                    );
                }
            }
            for &b in &batches {
                let step = DecodeStep::new(b, Heads::DEFAULT, &mut Rng(7 + b as u64));
                let mut synced = vec![Vec::new(); named.len()];
                let mut queued = vec![Vec::new(); named.len()];
                for round in 0..rounds + 1 {
                    for (i, cache) in caches.iter_mut().enumerate() {
                        let s: Vec<f64> = (0..iters).map(|_| time(1, &mut || step.run(cache))).collect();
                        let q = time(iters, &mut || step.run(cache)) / iters as f64;
                        if round > 0 {
                            synced[i].extend(s);
                            queued[i].push(q);
                        }
                    }
                }
                let ms: Vec<f64> = synced.into_iter().map(median).collect();
                let ms_stream: Vec<f64> = queued.into_iter().map(median).collect();
                for (i, (name, opts)) in named.iter().enumerate() {
                    println!(
                        "{{\"kind\":\"variant\",\"name\":{name:?},\"opts\":{opts:?},\"bits\":{bits},\"ctx\":{ctx},\"batch\":{b},\"device\":{device:?},\"ms_median\":{:.4},\"ms_stream\":{:.4},\"vs_default\":{:.3},\"stream_vs_default\":{:.3}}}",
                        ms[i],
                        ms_stream[i],
                        ms[i] / ms[0],
                        ms_stream[i] / ms_stream[0]
                    );
                }
            }
        }
    }
    if !sim() {
        // SAFETY: created above.
        unsafe {
            let _ = drv::event::destroy(e0);
            let _ = drv::event::destroy(e1);
        }
    }
    ok
}

/// Attention over a prompt: `append_attend` of a whole prompt into an empty sequence (the
/// chunk attends to itself, causal, then is stored: its groups past the window quantized), as a
/// prefill step of one layer runs it, with the chunk's tokens on tensor cores (`kv_prefill_fp`)
/// and on CUDA cores (`KIVI_CUDA_PREFILL_FP=0`, the path before it), alternating, median of
/// `--iters` calls each. Same heads as the decode benchmark (f16, head_dim 128, 32 query heads
/// over 8 KV heads, or `--head-dim`, `--kv-heads`, `--q-heads`).
fn prompt(args: &[String]) -> bool {
    let lengths = list(args, "--tokens", &[512, 2048, 8192]);
    let iters = list(args, "--iters", &[5])[0];
    let heads = Heads::from_args(args);
    let Heads { hd, nkv, nqh } = heads;
    let device = kivi::cuda::available().map(|i| i.name).unwrap_or_default();
    let max_len = *lengths.iter().max().unwrap();
    let mut rng = Rng(7);
    for bits in [2u8, 4] {
        let mut cache = match CudaCache::new(prompt_config(bits, max_len, heads), 0) {
            Ok(c) => c,
            Err(e) => {
                println!("{{\"kind\":\"prompt\",\"bits\":{bits},\"error\":{:?}}}", e.to_string());
                return false;
            }
        };
        for &n in &lengths {
            let k: Vec<f16> = to_t(&rng.keys(n, nkv, hd));
            let v: Vec<f16> = to_t(&rng.normals(n * nkv * hd));
            let q: Vec<f16> = to_t(&rng.normals(n * nqh * hd));
            let (dk, dv, dq) = (DevBuf::upload(&k), DevBuf::upload(&v), DevBuf::upload(&q));
            let dout = DevBuf::zeroed(n * nqh * hd * 2);
            let call = |cache: &mut CudaCache| {
                let _ = cache.seq_remove(0);
                cache
                    .append_attend(
                        0,
                        0,
                        DevRows::new(dk.ptr, n, nkv * hd),
                        DevRows::new(dv.ptr, n, nkv * hd),
                        DevRows::new(dq.ptr, n, nqh * hd),
                        DevRows::new(dout.ptr, n, nqh * hd),
                        &AttnOptions::default(),
                        std::ptr::null_mut(),
                    )
                    .expect("append_attend")
            };
            // Tensor cores, CUDA cores.
            let [tc, cc] = alternate("KIVI_CUDA_PREFILL_FP", iters, || call(&mut cache));
            println!(
                "{{\"kind\":\"prompt\",\"case\":\"kivi{bits}-{}\",\"bits\":{bits},\"tokens\":{n},\"head_dim\":{hd},\"kv_heads\":{nkv},\"q_heads\":{nqh},\"device\":{device:?},\"ms\":{tc:.4},\"ms_cuda_cores\":{cc:.4}}}",
                heads.name()
            );
        }
    }
    true
}

/// The cache of `gpu_check prompt`: one layer, f16, one sequence of up to `max_len` tokens.
fn prompt_config(bits: u8, max_len: usize, heads: Heads) -> CacheConfig {
    let mut cfg = CacheConfig::new(1, heads.nkv as u32, heads.hd as u32);
    cfg.dtype = DType::F16;
    (cfg.key_bits, cfg.value_bits) = (bits, bits);
    cfg.max_seqs = 1;
    cfg.max_tokens = max_len as u32;
    cfg
}

/// Times `call` with the environment variable `var` at "1" and at "0" (a switch the library reads
/// at each call), alternating, each call alone between CUDA events on the default stream, for
/// `rounds` rounds after one that compiles and warms up: the median of each, in ms.
fn alternate(var: &str, rounds: usize, mut call: impl FnMut()) -> [f64; 2] {
    let mut times = [Vec::new(), Vec::new()];
    let e0 = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).unwrap();
    let e1 = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).unwrap();
    for round in 0..rounds + 1 {
        for (i, flag) in ["1", "0"].into_iter().enumerate() {
            std::env::set_var(var, flag);
            // SAFETY: events created above, recorded on the default stream.
            unsafe {
                drv::event::record(e0, std::ptr::null_mut()).unwrap();
                call();
                drv::event::record(e1, std::ptr::null_mut()).unwrap();
                drv::event::synchronize(e1).unwrap();
                if round > 0 {
                    times[i].push(drv::event::elapsed(e0, e1).unwrap() as f64);
                }
            }
        }
    }
    std::env::remove_var(var);
    // SAFETY: created above.
    unsafe {
        let _ = drv::event::destroy(e0);
        let _ = drv::event::destroy(e1);
    }
    times.map(|mut t| {
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        t[t.len() / 2]
    })
}

/// Writes the cubins of the decode family for the benchmark's shapes (KIVI-2 and KIVI-4, f16,
/// head_dim 128, 8 KV heads, 4 query heads per KV head): `decode-kivi{2,4}.cubin`, and of the
/// module chunks of queries launch (8 query vectors: `kv_prefill_fp`, `kv_prefill_q`):
/// `chunk-kivi{2,4}.cubin`; and at head_dim 256 the decode module at 2 query heads per KV head
/// (the head_dim-256 benchmark's): `decode-hs256-kivi{2,4}.cubin`, and the module of chunks of
/// queries (4 query vectors: `kv_prefill_fp`, `kv_prefill_q`): `chunk-hs256-kivi{2,4}.cubin`. They are built with
/// `KV_COST_PROBE` defined: the loops then hold only the path most groups and tiles take (no
/// position masking, no accumulator rescale), which is what `scripts/sass_mix.py` counts.
fn cubins(args: &[String]) -> bool {
    let Some(dir) = args.get(2) else {
        eprintln!("usage: gpu_check cubins DIR [--arch sm_90]");
        return false;
    };
    let extra = std::env::var("KIVI_NVRTC_OPTS").unwrap_or_default();
    std::env::set_var("KIVI_NVRTC_OPTS", format!("{extra} -DKV_COST_PROBE=1"));
    let arch = args.iter().position(|a| a == "--arch").map_or("sm_90", |i| args[i + 1].as_str());
    let _ = std::fs::create_dir_all(dir);
    let mut jobs = Vec::new();
    for (bits, hd) in [(2u8, 128), (4, 128), (2, 256), (4, 256)] {
        let mut cfg = CacheConfig::new(1, 8, hd);
        cfg.dtype = DType::F16;
        cfg.key_bits = bits;
        cfg.value_bits = bits;
        // head_dim 256: the decode module of the head_dim-256 benchmark (2 query heads per kv
        // head), whose shared memory is dynamic, and the module of its chunks of queries.
        let modules: &[(&str, usize)] =
            if hd == 128 { &[("decode", 4), ("chunk", 8)] } else { &[("decode-hs256", 2), ("chunk-hs256", 4)] };
        for &(name, nq) in modules {
            let spec = kivi::cuda::kernels::Spec::for_config(&cfg, nq).expect("a valid configuration");
            jobs.push((format!("{dir}/{name}-kivi{bits}.cubin"), bits, spec));
        }
    }
    // One thread a module (8): on a machine with as many cores, the time of the slowest.
    let images: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(_, _, spec)| {
                s.spawn(|| kivi::cuda::kernels::compile(kivi::cuda::kernels::Family::Decode, spec, arch))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a compiling thread")).collect()
    });
    for ((path, bits, _), img) in jobs.iter().zip(images) {
        let written = img
            .map_err(|e| e.to_string())
            .and_then(|img| std::fs::write(path, img.bytes()).map_err(|e| format!("{path}: {e}")));
        if let Err(e) = written {
            eprintln!("{e}");
            return false;
        }
        println!("{{\"kind\":\"cubin\",\"bits\":{bits},\"arch\":{arch:?},\"path\":{path:?}}}");
    }
    true
}

/// Compiles the modules of `specs` for `arch`, on every core, into `KIVI_CUDA_CACHE_DIR`
/// (where the caches of later runs, and of this one, find them), and says so in one JSON line
/// of `kind` (modules, threads, failures, seconds since `t0`); those that failed on stderr.
/// Whether all compiled.
fn compile_all(
    kind: &str,
    specs: &[(kivi::cuda::kernels::Family, kivi::cuda::kernels::Spec)],
    arch: &str,
    t0: Instant,
) -> bool {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(specs.len()).max(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((family, spec)) = specs.get(i) else { break };
                if let Err(e) = kivi::cuda::kernels::compile_cached(*family, spec, arch) {
                    failed.lock().unwrap().push(format!("{}: {e}", family.file()));
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap();
    for f in &failed {
        eprintln!("{f}");
    }
    println!(
        "{{\"kind\":{kind:?},\"arch\":{arch:?},\"modules\":{},\"threads\":{threads},\"failed\":{},\"seconds\":{:.1}}}",
        specs.len(),
        failed.len(),
        t0.elapsed().as_secs_f64()
    );
    failed.is_empty()
}

/// Environment variables and their values.
type Env<'a> = [(&'a str, String)];

/// Runs `f` with the environment variables of `set` set, then puts back what they were (a
/// variant's `KIVI_NVRTC_OPTS` and library settings, read when a cache is made, and by
/// `kivi::cuda::module_specs`).
fn with_env<T>(set: &Env, f: impl FnOnce() -> T) -> T {
    let before: Vec<_> = set.iter().map(|(k, _)| (*k, std::env::var_os(k))).collect();
    set.iter().for_each(|(k, v)| std::env::set_var(k, v));
    let out = f();
    for (k, v) in before.into_iter().rev() {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
    out
}

/// Compiles, on every core, the modules that the caches of `cfgs` (each a configuration, its
/// query heads and the environment of its variant) will load, before any is made: their first
/// calls would otherwise compile them one after another, several seconds each, in the time of
/// a step of `scripts/gpu-check.sh` (the variants of its comparison alone are about thirty
/// modules). One JSON line says how many and how long. Not on the simulator (it compiles C++ of
/// its own), nor without `KIVI_CUDA_CACHE_DIR`, where nothing could keep them.
fn compile_ahead(cfgs: &[(CacheConfig, usize, &Env)]) {
    if sim() {
        return;
    }
    if std::env::var_os("KIVI_CUDA_CACHE_DIR").is_none() {
        eprintln!(
            "modules compile as the calls need them: set KIVI_CUDA_CACHE_DIR to compile them ahead on every core"
        );
        return;
    }
    let Ok(info) = kivi::cuda::available() else { return };
    let arch = format!("sm_{}{}", info.capability.0, info.capability.1);
    // As the library decides (KIVI_CUDA_MMA is read once per process).
    let tensor_cores = info.capability.0 >= 8 && !std::env::var("KIVI_CUDA_MMA").is_ok_and(|v| v == "0");
    let t0 = Instant::now();
    let mut specs = Vec::new();
    for (cfg, nqh, env) in cfgs {
        match with_env(env, || kivi::cuda::module_specs(cfg, *nqh as u32, tensor_cores)) {
            Ok(list) => specs.extend(list.into_iter().filter(|s| !specs.contains(s)).collect::<Vec<_>>()),
            // (The cache's own creation reports it.)
            Err(e) => eprintln!("{cfg:?}: {e}"),
        }
    }
    compile_all("compile-ahead", &specs, &arch, t0);
}

/// Compiles, on every core, the modules that the check's cases (with the tensor-core kernels
/// and without) and the benchmark's default runs load (`kivi::cuda::module_specs`), for the
/// device's architecture (or `--arch`), into `KIVI_CUDA_CACHE_DIR`, which must be set: the
/// processes after it then load them from there. A module takes NVRTC a few seconds on one core
/// and the check needs dozens, which would otherwise be compiled one after another inside its
/// time (`scripts/gpu-check.sh` runs this first). Needs no GPU with `--arch`.
fn precompile(args: &[String]) -> bool {
    if std::env::var_os("KIVI_CUDA_CACHE_DIR").is_none() {
        eprintln!("precompile: set KIVI_CUDA_CACHE_DIR to the folder the later runs read");
        return false;
    }
    let arch = match args.iter().position(|a| a == "--arch") {
        Some(i) => args[i + 1].clone(),
        None => match kivi::cuda::available() {
            Ok(i) => format!("sm_{}{}", i.capability.0, i.capability.1),
            Err(e) => {
                eprintln!("precompile: no device ({e}); pass --arch");
                return false;
            }
        },
    };
    let t0 = Instant::now();
    let mut shapes: Vec<(CacheConfig, usize)> = cases().into_iter().map(|c| (c.cfg, c.nqh)).collect();
    shapes.push((c_abi::config(), c_abi::QH));
    // `gpu_check bench` with its defaults, and at head_dim 256 as scripts/gpu-check.sh runs it
    // (the modules do not depend on the context: one context each).
    let hd256 = Heads { hd: 256, nkv: 8, nqh: 16 };
    for (heads, ctx, batches, max_batch) in [(Heads::DEFAULT, 131072, 3, 64), (hd256, 32768, 2, 16)] {
        let extra = bench_extra(20, batches);
        for bits in [2, 4] {
            shapes.push((bench_config(bits, ctx, max_batch, extra, ctx + extra, heads), heads.nqh));
            // `gpu_check prompt`, as scripts/gpu-check.sh runs it (prompts of up to 8192 tokens).
            shapes.push((prompt_config(bits as u8, 8192, heads), heads.nqh));
        }
    }
    let mut specs = Vec::new();
    for (cfg, nqh) in &shapes {
        for tensor_cores in [true, false] {
            match kivi::cuda::module_specs(cfg, *nqh as u32, tensor_cores) {
                Ok(list) => specs.extend(list.into_iter().filter(|s| !specs.contains(s)).collect::<Vec<_>>()),
                Err(e) => {
                    eprintln!("precompile: {cfg:?}: {e}");
                    return false;
                }
            }
        }
    }
    compile_all("precompile", &specs, &arch, t0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cmd = args.get(1).map(String::as_str).unwrap_or("check");
    let ok = match cmd {
        "info" => info(),
        "check" => match chosen_cases(&args) {
            Err(e) => {
                eprintln!("{e}");
                false
            }
            Ok(only) => {
                let sim = args.iter().any(|a| a == "--sim");
                SIM.store(sim, Ordering::Relaxed);
                (sim || info()) && check(args.iter().any(|a| a == "--mma-only"), only.as_deref())
            }
        },
        "bench" => info() && bench(&args),
        "prompt" => info() && prompt(&args),
        "variants" if args.iter().any(|a| a == "--sim") => {
            SIM.store(true, Ordering::Relaxed);
            variants(&args)
        }
        "variants" => info() && variants(&args),
        "cubins" => cubins(&args),
        "precompile" => precompile(&args),
        other => {
            eprintln!("unknown command {other}: use info, check, bench, variants, prompt, cubins or precompile");
            false
        }
    };
    std::process::exit(if ok { 0 } else { 1 });
}

#[cfg(test)]
mod tests {
    /// The check itself (its cases, its bookkeeping, its comparisons) on the host simulator, so
    /// that a failure on a GPU is the backend's and not the check's.
    #[test]
    fn the_check_passes_on_the_host_simulator() {
        super::SIM.store(true, super::Ordering::Relaxed);
        assert!(super::check(false, None), "see the JSON lines above");
    }

    /// `--cases` picks cases by name, the C ABI's included; a name that is no case's (a typo)
    /// is refused with the list of names, so that a run of the sanitizers never checks nothing.
    #[test]
    fn cases_are_chosen_by_name_and_unknown_names_refused() {
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(super::chosen_cases(&args("gpu_check check --mma-only")), Ok(None));
        let two = super::chosen_cases(&args("gpu_check check --cases mma-window,c-abi-stream"));
        assert_eq!(two, Ok(Some(vec!["mma-window".to_string(), "c-abi-stream".to_string()])));
        let e = super::chosen_cases(&args("gpu_check check --cases mma-window,mma-windw")).unwrap_err();
        assert!(e.contains("no case \"mma-windw\"") && e.contains("batch-70,long-kivi2"), "{e}");
        assert!(super::chosen_cases(&args("gpu_check check --cases")).is_err());
    }

    /// The variants' comparison on the host simulator, which compiles each variant's macros
    /// into its own modules: every variant's cache is made, filled and timed (decode and the
    /// chunked-prefill case), and the variants' options and settings do not outlive the command.
    #[test]
    fn the_variants_run_on_the_host_simulator() {
        super::SIM.store(true, super::Ordering::Relaxed);
        let before = std::env::var_os("KIVI_NVRTC_OPTS");
        let args = "gpu_check variants --sim --contexts 256 --batches 1,3 --bits 2 --iters 1 --rounds 1 --prefill";
        let mut args: Vec<String> = args.split(' ').map(String::from).collect();
        args.extend(["--variant".to_string(), "pipe0=-DKV_MMA_PIPE=0".to_string()]);
        args.extend(["--variant".to_string(), "unfused=KIVI_CUDA_FUSED_COMBINE=0".to_string()]);
        assert!(super::variants(&args), "see the JSON lines above");
        assert_eq!(std::env::var_os("KIVI_NVRTC_OPTS"), before);
        assert_eq!(std::env::var_os("KIVI_CUDA_FUSED_COMBINE"), None);
    }
}
