//! Fused attention on the CPU, straight from the packed codes.
//!
//! - [`scalar`]: the portable reference kernel (every layout, per-token keys included).
//! - `kernels`: the vector kernels, written once over [`simd::Simd`] and compiled for AVX-512,
//!   AVX2 + FMA (`x86`) and NEON (`neon`); the instruction set is chosen once at run time.
//! - `threads`: the cache's own worker threads (`CacheConfig::n_threads`).
//!
//! A call is split into work items: one KV head and up to [`kernels::NH_MAX`] query vectors, its
//! query heads of one query row or, when the GQA group is smaller, of several rows of a chunk
//! (vector `v`: row `v / heads`, head `v % heads`), so each KV head is read once for its whole
//! GQA group and for as many rows as fit. When there are fewer such items than threads (one KV
//! head, one sequence), the context of each is split across threads (flash-decoding) and the
//! partial softmax states `(m, l, acc)` are combined.

/// Implements [`Backend`] for an instruction set's [`simd::Simd`] type: `#[target_feature]` entry
/// points that instantiate the generic kernels for it.
macro_rules! backend {
    ($S:ident, $feat:literal) => {
        impl $crate::attention::cpu::Backend for $S {
            const LANES: usize = <$S as $crate::attention::cpu::simd::Simd>::L;
            #[inline]
            unsafe fn quant(a: &$crate::attention::cpu::kernels::QArgs, s: &mut $crate::attention::cpu::Scratch) {
                #[target_feature(enable = $feat)]
                unsafe fn quant(a: &$crate::attention::cpu::kernels::QArgs, s: &mut $crate::attention::cpu::Scratch) {
                    $crate::attention::cpu::kernels::quant::<$S>(a, s)
                }
                quant(a, s)
            }
            #[inline]
            unsafe fn fp<X: $crate::rows::Element>(
                kp: &[*const X],
                vp: &[*const X],
                p0: usize,
                nh: usize,
                o: &$crate::attention::Resolved,
                s: &mut $crate::attention::cpu::Scratch,
                prefetch: bool,
            ) {
                #[target_feature(enable = $feat)]
                unsafe fn fp<X: $crate::rows::Element>(
                    kp: &[*const X],
                    vp: &[*const X],
                    p0: usize,
                    nh: usize,
                    o: &$crate::attention::Resolved,
                    s: &mut $crate::attention::cpu::Scratch,
                    prefetch: bool,
                ) {
                    $crate::attention::cpu::kernels::fp::<$S, X>(kp, vp, p0, nh, o, s, prefetch)
                }
                fp::<X>(kp, vp, p0, nh, o, s, prefetch)
            }
            #[inline(always)]
            fn prefetch(p: *const u8) {
                // SAFETY: a prefetch is a hint: it never faults, whatever the address.
                unsafe { <$S as $crate::attention::cpu::simd::Simd>::prefetch(p) }
            }
        }
    };
}

pub(crate) mod dense;
mod kernels;
#[cfg(target_arch = "aarch64")]
mod neon;
pub(crate) mod scalar;
mod simd;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ffi::CStr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

pub(crate) use self::kernels::Scratch;
use self::kernels::{QArgs, FPB, NH_MAX};
use super::Resolved;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::rows::{Element, Rows, RowsMut};
use crate::seq::Stream;

pub(crate) use self::scalar::MAX_HEAD_DIM;

/// An instruction set the CPU attention can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Isa {
    /// Portable scalar code.
    Scalar = 1,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2 = 2,
    /// x86-64 AVX-512 F/BW/VL (with AVX2, FMA, F16C).
    Avx512 = 3,
    /// aarch64 NEON.
    Neon = 4,
}

impl Isa {
    /// Every instruction set, best last (for each architecture).
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Neon, Isa::Avx2, Isa::Avx512];

    fn from_u8(v: u8) -> Option<Isa> {
        Isa::ALL.into_iter().find(|&i| i as u8 == v)
    }

    /// Its lower-case name: `scalar`, `avx2`, `avx512` or `neon`.
    pub fn name(self) -> &'static str {
        self.c_name().to_str().expect("names are ASCII")
    }

    /// [`name`](Isa::name), NUL-terminated (for the C ABI).
    pub(crate) fn c_name(self) -> &'static CStr {
        match self {
            Isa::Scalar => c"scalar",
            Isa::Avx2 => c"avx2",
            Isa::Avx512 => c"avx512",
            Isa::Neon => c"neon",
        }
    }

    /// The instruction set of that [`name`](Isa::name) (for a command line or an environment
    /// variable), whether or not this machine has it.
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }

    /// Whether this machine can run it.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

static FORCED: AtomicU8 = AtomicU8::new(0);
static BEST: OnceLock<Isa> = OnceLock::new();

/// The instruction sets this machine can run, best last.
pub fn available_isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.available()).collect()
}

/// The instruction set attention uses: the best one this machine has, unless forced.
pub fn active_isa() -> Isa {
    Isa::from_u8(FORCED.load(Ordering::Relaxed))
        .unwrap_or_else(|| *BEST.get_or_init(|| *available_isas().last().expect("scalar is always available")))
}

/// Forces an instruction set for every cache in the process (`None`: back to the best one), for
/// tests and benchmarks. Returns false, changing nothing, when this machine cannot run it.
pub fn force_isa(isa: Option<Isa>) -> bool {
    match isa {
        Some(i) if !i.available() => false,
        Some(i) => {
            FORCED.store(i as u8, Ordering::Relaxed);
            true
        }
        None => {
            FORCED.store(0, Ordering::Relaxed);
            true
        }
    }
}

/// Forces how the AVX2 kernels unpack 2-bit key codes that several query vectors share: `Some(true)`
/// through a permute (faster on Intel cores), `Some(false)` masked and converted (faster on
/// AMD's), `None` as suits the CPU. For tests, which run both on any machine; results are the
/// same either way. Does nothing off x86-64.
#[doc(hidden)]
pub fn force_shared_key_permute(on: Option<bool>) {
    #[cfg(target_arch = "x86_64")]
    x86::force_shared_permute(on);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = on;
}

/// The vector kernels of one instruction set, as `#[target_feature]` entry points.
pub(crate) trait Backend: Sync {
    const LANES: usize;
    /// # Safety
    /// The instruction set is available; `a` describes groups that exist.
    unsafe fn quant(a: &QArgs, s: &mut Scratch);
    /// # Safety
    /// The instruction set is available; every pointer is valid for `head_dim` elements.
    /// With `prefetch`, rows are fetched ahead (they are read once, from memory).
    unsafe fn fp<X: Element>(
        kp: &[*const X],
        vp: &[*const X],
        p0: usize,
        nh: usize,
        o: &Resolved,
        s: &mut Scratch,
        prefetch: bool,
    );
    /// Hints that the cache line at `p` will be read soon.
    fn prefetch(p: *const u8);
}

/// The cache's attention threads and per-thread working memory.
pub(crate) struct Threads {
    /// Slots of a batched decode step (capacity `max_seqs`, kept so decoding does not allocate).
    pub decode_slots: Vec<usize>,
    pool: Option<crate::threads::Pool>,
    state: Mutex<Shared>,
    hd: usize,
    group: usize,
    row_groups: usize,
}

struct Shared {
    scratch: Vec<Scratch>,
    /// Partial softmax states when contexts are split: `[item][m, l, acc]`.
    partial: Vec<f32>,
}

impl Threads {
    pub fn new(lay: &Layout, n_threads: usize) -> Result<Threads> {
        let mut t = Threads::with_dims(lay.head_dim, lay.group, lay.row_groups(), n_threads)?;
        t.decode_slots = Vec::with_capacity(lay.max_seqs);
        Ok(t)
    }

    /// Threads whose scratch fits heads of `hd` channels and groups of `group` tokens of
    /// `row_groups` value groups; an error when the system will not start the workers.
    pub fn with_dims(hd: usize, group: usize, row_groups: usize, n_threads: usize) -> Result<Threads> {
        let n = n_threads.max(1);
        let pool = match n {
            1 => None,
            _ => Some(crate::threads::Pool::new(n - 1).map_err(|e| {
                Error::InvalidConfig(format!("n_threads {n}: could not start {} worker threads: {e}", n - 1))
            })?),
        };
        let scratch = (0..n).map(|_| Scratch::new(hd, group, row_groups)).collect();
        let state = Mutex::new(Shared { scratch, partial: Vec::new() });
        Ok(Threads { decode_slots: Vec::new(), pool, state, hd, group, row_groups })
    }
}

impl Threads {
    /// Calls `f(i, chunk)` for every chunk `i` of `data` cut into pieces of `size` elements (a
    /// remainder shorter than `size` is left alone), spreading the chunks over the cache's threads:
    /// chunk `i` runs on thread `i % threads`. Exclusive access (`&mut self`) means no attention
    /// call is using the pool meanwhile.
    pub fn par_chunks_mut<E: Send>(&mut self, data: &mut [E], size: usize, f: &(dyn Fn(usize, &mut [E]) + Sync)) {
        let n = data.len().checked_div(size).unwrap_or(0);
        let threads = self.pool.as_ref().map_or(1, |p| p.threads()).min(n);
        let pool = match &self.pool {
            Some(pool) if threads > 1 => pool,
            _ => return data.chunks_exact_mut(size).enumerate().for_each(|(i, c)| f(i, c)),
        };
        let base = SendPtr(data.as_mut_ptr());
        let work = |t: usize| {
            for i in (t..n).step_by(threads) {
                // SAFETY: chunk `i` lies inside `data` and is handed to exactly one thread.
                f(i, unsafe { std::slice::from_raw_parts_mut(base.get().add(i * size), size) });
            }
        };
        pool.run(threads, &work);
    }
}

/// One attention request: queries at positions `q_pos0..` over stream `s` followed by the exact
/// `chunk`, written to rows `out_row0..` of the output.
pub(crate) struct Job<'a, W: Element, T: Element> {
    pub s: Stream<'a, W>,
    pub chunk: Option<(Rows<'a, T>, Rows<'a, T>)>,
    pub queries: Rows<'a, T>,
    pub q_pos0: usize,
    pub out_row0: usize,
}

/// Attention for `njobs` requests of `rows` query rows each (`job(j)` describes request `j`),
/// on the cache's threads, with the best kernels for the layout.
pub(crate) fn attend<'a, W: Element, T: Element>(
    th: &Threads,
    lay: &Layout,
    njobs: usize,
    rows: usize,
    job: &(dyn Fn(usize) -> Job<'a, W, T> + Sync),
    out: &mut RowsMut<T>,
    o: &Resolved,
) {
    if njobs == 0 || rows == 0 {
        return;
    }
    let isa = active_isa();
    #[cfg(target_arch = "x86_64")]
    {
        if isa == Isa::Avx512 && kernels::supports(lay, x86::Avx512::LANES) {
            return run::<x86::Avx512, W, T>(th, lay, njobs, rows, job, out, o);
        }
        if matches!(isa, Isa::Avx512 | Isa::Avx2) && kernels::supports(lay, x86::Avx2::LANES) {
            return run::<x86::Avx2, W, T>(th, lay, njobs, rows, job, out, o);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if isa == Isa::Neon && kernels::supports(lay, neon::Neon::LANES) {
            return run::<neon::Neon, W, T>(th, lay, njobs, rows, job, out, o);
        }
    }
    let _ = isa;
    for j in 0..njobs {
        let jb = job(j);
        scalar::attend(&jb.s, jb.chunk, jb.queries, jb.q_pos0, out, jb.out_row0, o);
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[derive(Clone, Copy)]
struct SendPtr<P>(P);
// SAFETY: used for disjoint writes from the pool's threads (each item owns its output).
unsafe impl<P> Send for SendPtr<P> {}
unsafe impl<P> Sync for SendPtr<P> {}

impl<P: Copy> SendPtr<P> {
    /// The pointer (a method, so closures capture the wrapper and not the raw field).
    fn get(&self) -> P {
        self.0
    }
}

/// How a call is cut into items.
#[derive(Clone, Copy)]
pub(crate) struct Plan {
    rows: usize,
    nkv: usize,
    ratio: usize,
    /// Head blocks per KV head, query rows per item and row blocks per job, and context splits
    /// per (row block, KV head, head block).
    nhb: usize,
    rpi: usize,
    nrb: usize,
    nsplit: usize,
    /// Floats of one partial state.
    pstride: usize,
}

impl Plan {
    /// (job, row block, kv head, head block, split) of item `i`.
    pub fn decompose(&self, i: usize) -> (usize, usize, usize, usize, usize) {
        let split = i % self.nsplit;
        let r = i / self.nsplit;
        let hb = r % self.nhb;
        let r = r / self.nhb;
        let kvh = r % self.nkv;
        let r = r / self.nkv;
        (r / self.nrb, r % self.nrb, kvh, hb, split)
    }

    /// Query rows `r0..r1` of row block `rb`.
    pub fn rows_of(&self, rb: usize) -> (usize, usize) {
        (rb * self.rpi, (rb * self.rpi + self.rpi).min(self.rows))
    }

    /// Query vectors of the item at (row block `rb`, kv head `kvh`, head block `hb`).
    pub fn vectors(&self, rb: usize, kvh: usize, hb: usize) -> usize {
        let ((r0, r1), (qh0, qh1)) = (self.rows_of(rb), self.heads(kvh, hb));
        (r1 - r0) * (qh1 - qh0)
    }

    /// The query row (in its job) and query head of vector `v` of the item at (row block `rb`,
    /// kv head `kvh`, head block `hb`).
    pub fn vector(&self, rb: usize, kvh: usize, hb: usize, v: usize) -> (usize, usize) {
        let (qh0, qh1) = self.heads(kvh, hb);
        let nh = qh1 - qh0;
        (self.rows_of(rb).0 + v / nh, qh0 + v % nh)
    }

    /// Query heads `qh0..qh1` of head block `hb` of KV head `kvh`.
    pub fn heads(&self, kvh: usize, hb: usize) -> (usize, usize) {
        let b = kvh * self.ratio;
        (b + hb * self.ratio / self.nhb, b + (hb + 1) * self.ratio / self.nhb)
    }
}

fn run<'a, B: Backend, W: Element, T: Element>(
    th: &Threads,
    lay: &Layout,
    njobs: usize,
    rows: usize,
    job: &(dyn Fn(usize) -> Job<'a, W, T> + Sync),
    out: &mut RowsMut<T>,
    o: &Resolved,
) {
    let first = job(0);
    let shape = Shape {
        njobs,
        rows,
        nkv: lay.n_kv_heads,
        nq: first.queries.row_len() / lay.head_dim,
        hd: lay.head_dim,
        blocks: first.s.quantized / lay.group,
    };
    let body = |s: &mut Scratch, plan: &Plan, j: usize, row: usize, kvh: usize, hb: usize, split: usize| {
        // SAFETY: B was chosen for an available instruction set and a supported layout.
        unsafe { item::<B, W, T>(lay, plan, &job(j), row, kvh, hb, split, o, s) }
    };
    execute(th, &shape, &|j| job(j).out_row0, &body, out);
}

/// The size of a call.
pub(crate) struct Shape {
    pub njobs: usize,
    /// Query rows per job.
    pub rows: usize,
    pub nkv: usize,
    pub nq: usize,
    pub hd: usize,
    /// Blocks of context of the first job (splitting below 8 blocks per thread does not pay).
    pub blocks: usize,
}

/// Work item body: (scratch, plan, job, row block, kv head, head block, split); leaves the item's
/// state in the scratch, vector `v` being row `r0 + v / nh` (`Plan::rows_of`) and head
/// `qh0 + v % nh` (`Plan::heads`).
pub(crate) type Body<'b> = dyn Fn(&mut Scratch, &Plan, usize, usize, usize, usize, usize) + Sync + 'b;

/// Runs every item of a call on the cache's threads, then writes (or combines) the outputs.
pub(crate) fn execute<T: Element>(
    th: &Threads,
    sz: &Shape,
    out_row0: &(dyn Fn(usize) -> usize + Sync),
    body: &Body,
    out: &mut RowsMut<T>,
) {
    let hd = sz.hd;
    let ratio = sz.nq / sz.nkv;
    let nhb = ratio.div_ceil(NH_MAX);
    // Rows per item: as many as fit next to the heads of one head block.
    let rpi = (NH_MAX / ratio.div_ceil(nhb)).clamp(1, sz.rows);
    let nrb = sz.rows.div_ceil(rpi);
    let base = sz.njobs * nrb * sz.nkv * nhb;

    // Our threads and scratch; a concurrent call on the same cache runs on its own thread with
    // fresh scratch (allocation only in that case).
    let mut guard = match th.state.try_lock() {
        Ok(g) => Some(g),
        // A panic in an earlier call left nothing half-written that matters: scratch is
        // overwritten by every item.
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    let mut own;
    let (sh, nthreads): (&mut Shared, usize) = match guard.as_deref_mut() {
        Some(sh) => {
            let n = th.pool.as_ref().map_or(1, |p| p.threads());
            (sh, n)
        }
        None => {
            own = Shared { scratch: vec![Scratch::new(th.hd, th.group, th.row_groups)], partial: Vec::new() };
            (&mut own, 1)
        }
    };

    // Split contexts across threads when the items would not share them out evenly.
    let nsplit = if nthreads == 1 || base >= 8 * nthreads || base % nthreads == 0 {
        1
    } else {
        (nthreads / gcd(base, nthreads)).min(sz.blocks / 8).max(1)
    };
    let items = base * nsplit;
    let pstride = 2 * NH_MAX + NH_MAX * hd;
    if nsplit > 1 && sh.partial.len() < items * pstride {
        sh.partial.resize(items * pstride, 0.0);
    }
    let plan = Plan { rows: sz.rows, nkv: sz.nkv, ratio, nhb, rpi, nrb, nsplit, pstride };
    let nthreads = nthreads.min(items);
    let (optr, ostride) = out.raw_parts();
    let optr = SendPtr(optr);
    let scratch = SendPtr(sh.scratch.as_mut_ptr());
    let partial = SendPtr(sh.partial.as_mut_ptr());
    let next = AtomicUsize::new(0);
    let work = |tid: usize| {
        // SAFETY: thread `tid` is the only user of scratch `tid`.
        let s = unsafe { &mut *scratch.get().add(tid) };
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= items {
                break;
            }
            let (j, rb, kvh, hb, split) = plan.decompose(i);
            body(s, &plan, j, rb, kvh, hb, split);
            let nvec = plan.vectors(rb, kvh, hb);
            if nsplit == 1 {
                for v in 0..nvec {
                    let (row, head) = plan.vector(rb, kvh, hb, v);
                    // SAFETY: each item owns its vectors' heads of its output rows.
                    let o = unsafe { optr.get().add((out_row0(j) + row) * ostride + head * hd) };
                    let inv = if s.l[v] > 0.0 { 1.0 / s.l[v] } else { 0.0 };
                    for c in 0..hd {
                        unsafe { *o.add(c) = T::from_f32(s.acc[v * hd + c] * inv) };
                    }
                }
            } else {
                // SAFETY: each item owns its partial slot.
                let p = unsafe { std::slice::from_raw_parts_mut(partial.get().add(i * pstride), pstride) };
                p[..nvec].copy_from_slice(&s.m[..nvec]);
                p[NH_MAX..NH_MAX + nvec].copy_from_slice(&s.l[..nvec]);
                p[2 * NH_MAX..2 * NH_MAX + nvec * hd].copy_from_slice(&s.acc[..nvec * hd]);
            }
        }
    };
    match (&th.pool, nthreads > 1) {
        (Some(pool), true) => pool.run(nthreads, &work),
        _ => work(0),
    }
    if nsplit > 1 {
        combine(&plan, hd, base, out_row0, &sh.partial, out);
    }
}

/// Merges the partial states of split contexts into the output.
fn combine<T: Element>(
    plan: &Plan,
    hd: usize,
    base: usize,
    out_row0: &(dyn Fn(usize) -> usize + Sync),
    partial: &[f32],
    out: &mut RowsMut<T>,
) {
    let ns = plan.nsplit;
    for b in 0..base {
        let (j, rb, kvh, hb, _) = plan.decompose(b * ns);
        for h in 0..plan.vectors(rb, kvh, hb) {
            let st = |k: usize| &partial[(b * ns + k) * plan.pstride..(b * ns + k + 1) * plan.pstride];
            let m = (0..ns).map(|k| st(k)[h]).fold(f32::NEG_INFINITY, f32::max);
            let (row, head) = plan.vector(rb, kvh, hb, h);
            let dst = &mut out.row_mut(out_row0(j) + row)[head * hd..(head + 1) * hd];
            if m == f32::NEG_INFINITY {
                dst.iter_mut().for_each(|x| *x = T::from_f32(0.0));
                continue;
            }
            let mut l = 0.0f32;
            let mut acc = [0f32; MAX_HEAD_DIM];
            for k in 0..ns {
                let p = st(k);
                if p[h] == f32::NEG_INFINITY {
                    continue;
                }
                let w = (p[h] - m).exp();
                l += p[NH_MAX + h] * w;
                let a = &p[2 * NH_MAX + h * hd..2 * NH_MAX + (h + 1) * hd];
                for (d, &x) in acc[..hd].iter_mut().zip(a) {
                    *d += x * w;
                }
            }
            let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
            for (d, &x) in dst.iter_mut().zip(&acc[..hd]) {
                *d = T::from_f32(x * inv);
            }
        }
    }
}

/// One work item: its queries loaded, its share of the quantized groups, and (first split only)
/// the sinks, the window and the chunk. Leaves the state in `s`.
#[allow(clippy::too_many_arguments)]
unsafe fn item<B: Backend, W: Element, T: Element>(
    lay: &Layout,
    plan: &Plan,
    jb: &Job<W, T>,
    rb: usize,
    kvh: usize,
    hb: usize,
    split: usize,
    o: &Resolved,
    s: &mut Scratch,
) {
    let hd = lay.head_dim;
    let st = &jb.s;
    let (qh0, qh1) = plan.heads(kvh, hb);
    let (r0, r1) = plan.rows_of(rb);
    let nh = qh1 - qh0;
    let nvec = plan.vectors(rb, kvh, hb);
    s.reset(nvec);
    let chunk_len = jb.chunk.map_or(0, |c| c.0.rows());
    let total = st.len + chunk_len;
    // The rows' queries and visible ranges; the item covers their union.
    let (mut lo, mut hi) = (usize::MAX, 0);
    for r in r0..r1 {
        let v0 = (r - r0) * nh;
        s.load(v0, &jb.queries.row(r)[qh0 * hd..qh1 * hd], nh);
        let (a, b) = o.visible(jb.q_pos0 + r, total);
        s.lo[v0..v0 + nh].fill(a);
        s.hi[v0..v0 + nh].fill(b);
        if a < b {
            lo = lo.min(a);
            hi = hi.max(b);
        }
    }
    if lo >= hi {
        return;
    }
    let q_start = lay.sinks.min(st.len);
    let ws = st.window_start();

    let (a, b) = (lo.max(q_start), hi.min(ws));
    // Rows come from memory when each is read by one item (decode); a chunk's row blocks share
    // them, and they stay in cache from the first block on (prefetching them would only cost).
    let cold = plan.nrb == 1;
    let stored = |p| (st.fp_key(kvh, p), st.fp_value(kvh, p));
    if a < b && split == 0 && cold {
        // The window's first rows, read right after the quantized groups.
        prefetch_keys::<B, W>(lo.max(ws), hi.min(st.len), &stored);
    }
    if a < b {
        let ga = (a - q_start) / lay.group;
        let gb = (b - 1 - q_start) / lay.group + 1;
        let per = (gb - ga).div_ceil(plan.nsplit);
        let g0 = (ga + split * per).min(gb);
        let g1 = (g0 + per).min(gb);
        if g0 < g1 {
            let qa = QArgs { lay, pool: st.pool, blocks: st.blocks, kvh, g0, g1, nh: nvec, o: *o };
            B::quant(&qa, s);
        }
    }
    if split != 0 {
        return;
    }
    let n_sink = st.n_sink();
    fp_range::<B, W>(s, nvec, o, lo.min(n_sink), hi.min(n_sink), cold, stored);
    fp_range::<B, W>(s, nvec, o, lo.max(ws), hi.min(st.len), cold, stored);
    if let Some((ck, cv)) = jb.chunk {
        let base = st.len;
        let rows =
            |p: usize| (&ck.row(p - base)[kvh * hd..(kvh + 1) * hd], &cv.row(p - base)[kvh * hd..(kvh + 1) * hd]);
        fp_range::<B, T>(s, nvec, o, lo.max(base), hi, cold, rows);
    }
}

/// Full-precision tokens at positions `a..b`, in blocks.
unsafe fn fp_range<'r, B: Backend, X: Element>(
    s: &mut Scratch,
    nh: usize,
    o: &Resolved,
    a: usize,
    b: usize,
    prefetch: bool,
    rows: impl Fn(usize) -> (&'r [X], &'r [X]),
) {
    let mut kp = [std::ptr::null::<X>(); FPB];
    let mut vp = [std::ptr::null::<X>(); FPB];
    let mut p0 = a;
    while p0 < b {
        let n = (b - p0).min(FPB);
        for j in 0..n {
            let (k, v) = rows(p0 + j);
            kp[j] = k.as_ptr();
            vp[j] = v.as_ptr();
        }
        // The next block's first key rows: the kernel fetches further rows itself, a few ahead.
        if prefetch {
            prefetch_keys::<B, X>(p0 + n, b, &rows);
        }
        B::fp::<X>(&kp[..n], &vp[..n], p0, nh, o, s, prefetch);
        p0 += n;
    }
}

/// Prefetches the key rows of the first [`kernels::FP_AHEAD`] positions of `a..b`.
fn prefetch_keys<'r, B: Backend, X: Element>(a: usize, b: usize, rows: &impl Fn(usize) -> (&'r [X], &'r [X])) {
    for p in a..b.min(a + kernels::FP_AHEAD) {
        let k = rows(p).0;
        for line in (0..std::mem::size_of_val(k)).step_by(64) {
            // SAFETY: inside the row.
            B::prefetch(unsafe { k.as_ptr().cast::<u8>().add(line) });
        }
    }
}
