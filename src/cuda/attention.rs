//! Attention on a CUDA cache: the calls that attend (decode steps, chunks of queries, queries
//! of stored tokens), which module and kernel each launches, and how the context is split over
//! blocks and combined.

use std::sync::OnceLock;

use cudarc::driver::sys as dsys;

use super::*;
use crate::cuda::kernels::{chunk_mma, decode_mma, fp_vectors, max_nq, mma_layout, mma_max_nq, prefill_fp_layout};
use crate::cuda::{allow_dynamic_smem, blocks_per_sm};

/// The functions of one attention module: its blocks, its combine, and the tensor-core kernels
/// where the module has them (0 where not): the decode over quantized groups, with how many of
/// its blocks run at once on the device (`mma_slots`, 0 without it), and the full-precision
/// tokens of chunks of queries.
#[derive(Clone, Copy)]
pub(super) struct AttnFns {
    pub(super) attn: usize,
    pub(super) combine: usize,
    pub(super) mma: usize,
    /// The dynamic shared memory its launches pass (0: its shared memory is static).
    pub(super) mma_smem: u32,
    pub(super) mma_slots: usize,
    /// `kv_prefill_fp` where the module has it (0 where not), and the dynamic shared memory its
    /// launches pass (0: static).
    pub(super) prefill_fp: usize,
    pub(super) prefill_fp_smem: u32,
    /// `kv_prefill_q`, in the module with `kv_prefill_fp` (0 where not), the dynamic shared
    /// memory its launches pass, and how many of its blocks run at once on the device.
    pub(super) prefill_q: usize,
    pub(super) prefill_q_smem: u32,
    pub(super) prefill_q_slots: usize,
}

/// Rows a chunk of queries needs for `kv_prefill_fp`: below, most of its vectors would idle, and
/// split 0 of `kv_decode_mma` reads the few rows' tokens on CUDA cores.
const FP_MIN_ROWS: usize = 8;

/// The tensor-core decode asked for where the layout has none (a bug of the host's choice).
pub(super) fn no_mma(nq: usize) -> Error {
    Error::BackendUnavailable(format!("CUDA: the decode module for {nq} query vectors has no tensor-core kernel"))
}

/// How a tensor-core launch splits its work ([`mma_splits`]): `fp` splits of the full-precision
/// tokens, `fp_ups` units of 32 each (0 when `fp` is 1: all in split 0), then `n` splits of `ups`
/// quantized groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MmaSplit {
    pub fp: usize,
    pub fp_ups: usize,
    pub ups: usize,
    pub n: usize,
}

/// Full-precision units (32 tokens) per split where they take several: one per warp.
const FP_SPLIT_UNITS: usize = 4;

/// How the tensor-core kernel splits its work, for `max_groups` quantized groups and `fp_units`
/// units of full-precision tokens (the longest item's of each) and `blocks_per_split` (item, kv
/// head, head chunk) triples, when `slots` blocks fit on the device at once and the scratch area
/// holds `max_splits + 1` splits.
///
/// The full-precision tokens take split 0, and the quantized groups enough splits for `WAVES`
/// times the slots, so that the last, partial wave is a small part of the call (the blocks of
/// split 0 finish early and leave their slots to the others); but at least `MIN_GROUPS` groups
/// per block, so that what a block costs besides its groups (reading the queries, waiting for
/// its first group, merging its warps) stays small; and at most `max_splits`. On an H200 this
/// took 0.88 to 0.99 of the time of the earlier choice, about one wave of blocks (BENCHMARKS.md
/// has the sweep, at batches 16 and 64).
///
/// Where that makes fewer than two waves (a decode step of one sequence, or of a few short
/// ones), a call lasts as long as its longest blocks, twice that when a second wave is left over,
/// and a block's own costs are paid by all blocks at once. Such a launch gives its
/// full-precision tokens one unit per warp (`fp` splits of 4 units: at R = 128 a decode step's
/// window, sinks and new token are 5 or 6 units, so 2 splits, where one warp of split 0 did two
/// units), and its quantized groups the smallest blocks that one wave holds beside them, of at
/// least `ONE_WAVE_GROUPS` groups (two per warp; the last block takes what is left). At 32768
/// tokens, 8 kv heads and 396 slots (an H100 or H200 at 3 blocks per multiprocessor), 47 splits
/// of 22 groups instead of 60 of 17 in a wave and a quarter; at 4096 tokens, 16 splits of 8
/// groups instead of 7 of 18.
///
/// `KIVI_CUDA_SPLITS=N` asks for N quantized splits instead (still at most `max_splits` and
/// `max_groups`, the full-precision tokens in split 0), for measuring this choice; `one_wave`
/// false (`KIVI_CUDA_ONE_WAVE=0`, read when a cache is made) splits small launches as large
/// ones.
pub(crate) fn mma_splits(
    max_groups: usize,
    fp_units: usize,
    blocks_per_split: usize,
    slots: usize,
    max_splits: usize,
    one_wave: bool,
) -> MmaSplit {
    const WAVES: usize = 4;
    const MIN_GROUPS: usize = 16;
    const ONE_WAVE_GROUPS: usize = 8;
    static FORCED: OnceLock<Option<usize>> = OnceLock::new();
    let forced = *FORCED.get_or_init(|| std::env::var("KIVI_CUDA_SPLITS").ok().and_then(|v| v.parse().ok()));
    let bps = blocks_per_split.max(1);
    let four = (WAVES * slots).div_ceil(bps).min(max_groups / MIN_GROUPS).max(1);
    let small = forced.is_none() && one_wave && (four + 1) * bps < 2 * slots;
    let quantized = (max_groups > 0) as usize;
    // Full-precision splits: those of one unit per warp that fit in the wave and the scratch
    // area beside one quantized split.
    let room = (slots / bps).min(max_splits + 1).saturating_sub(quantized).max(1);
    let fp = if small { fp_units.div_ceil(FP_SPLIT_UNITS).clamp(1, room) } else { 1 };
    // (Where the wave holds fewer, their units shared evenly.)
    let fp_ups = if fp > 1 { fp_units.div_ceil(fp) } else { 0 };
    if max_groups == 0 {
        return MmaSplit { fp, fp_ups, ups: 1, n: 0 };
    }
    let n = match forced {
        Some(n) => n,
        None if small => {
            let wave = (slots / bps).saturating_sub(fp).max(1);
            max_groups.div_ceil(max_groups.div_ceil(wave).max(ONE_WAVE_GROUPS))
        }
        None => four,
    };
    let n = n.clamp(1, (max_splits + 1 - fp).clamp(1, max_groups));
    let ups = max_groups.div_ceil(n);
    MmaSplit { fp, fp_ups, ups, n: max_groups.div_ceil(ups) }
}

#[cfg(test)]
thread_local! {
    /// Tests: at most this many items per launch of one sequence's rows (where the scratch area
    /// bounds them), so that small chunks take several launches.
    pub(super) static ROW_ITEMS: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    /// Tests: the most full-precision splits a launch of this thread has had.
    pub(super) static FP_SPLITS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What one attention call attends for: sequences of a decode step, one item each (whose new
/// tokens, rows `chunk_row0` of the keys and values, the tensor-core launch also appends to their
/// windows), or `rows` query rows of one sequence (chunks of queries), `first` describing the
/// first (its `n_q` is not used); `append`: the chunk's tokens may be appended by the launch as
/// a decode step's are, where it is one tensor-core launch (they fit in the window's ring
/// without overwriting a token it holds: [`crate::seq::LayerSeq::fits_ring`]).
#[derive(Clone, Copy)]
enum Work<'a> {
    Decode(&'a [AttnItem]),
    Rows { first: AttnItem, rows: usize, append: bool },
}

/// How one attention call runs: the module it launches (`module`), query vectors per block
/// (`nq`), query heads per block (`hc`), query rows per item (`qt`), and whether the quantized
/// groups go to the tensor-core kernel (`mma`, in the decode module, for chunks of queries too).
#[derive(Debug, Clone, Copy)]
struct Shape {
    module: Family,
    nq: usize,
    hc: usize,
    qt: usize,
    mma: bool,
}

/// How attention of `family` for `n_q_heads` query heads runs for a cache of layout `lay`, on a
/// device with tensor cores for it or not.
fn shape_for(lay: &Layout, family: Family, n_q_heads: usize, tensor_cores: bool) -> Shape {
    let (hd, ratio) = (lay.head_dim, n_q_heads / lay.n_kv_heads);
    let cap = max_nq(hd);
    match family {
        Family::Decode if tensor_cores && decode_mma(lay, ratio) => {
            // At most 8 query heads per block (4 above head_dim 128): larger GQA groups take
            // several blocks.
            let nq = ratio.min(mma_max_nq(hd));
            Shape { module: Family::Decode, nq, hc: nq, qt: 1, mma: true }
        }
        Family::Decode => {
            let nq = ratio.min(cap);
            Shape { module: Family::Decode, nq, hc: nq, qt: 1, mma: false }
        }
        _ if tensor_cores && chunk_mma(lay) => {
            // Chunks of queries take the tensor-core kernel too: 8 query vectors per block (4
            // above head_dim 128), the nq / hc rows of hc query heads of one kv head.
            let nq = mma_max_nq(hd);
            let hc = ratio.min(nq);
            Shape { module: Family::Decode, nq, hc, qt: nq / hc, mma: true }
        }
        _ => {
            let hc = ratio.min(cap);
            Shape { module: family, nq: cap, hc, qt: cap / hc, mma: false }
        }
    }
}

/// The attention modules (family and spec) of decode steps and of chunks of queries with
/// `n_q_heads` query heads, for a cache of layout `lay` (one when both take the same).
fn attention_specs(lay: &Layout, base: &Spec, n_q_heads: usize, tensor_cores: bool) -> Vec<(Family, Spec)> {
    let mut out: Vec<(Family, Spec)> = Vec::new();
    for family in [Family::Decode, Family::Prefill] {
        let sh = shape_for(lay, family, n_q_heads, tensor_cores);
        let spec = (sh.module, base.for_nq(lay, sh.nq));
        if !out.contains(&spec) {
            out.push(spec);
        }
    }
    out
}

/// The modules (family and spec) a CUDA cache of configuration `cfg` loads for attention with
/// `n_q_heads` query heads: its append kernels, and the attention modules of decode steps and of
/// chunks of queries, on a device with tensor cores (compute capability 8.0 or newer) or
/// without, or with them turned off (`KIVI_CUDA_MMA=0`), with the extra NVRTC options
/// `KIVI_NVRTC_OPTS` holds now (a cache takes those of its creation). Compiling these ahead into
/// `KIVI_CUDA_CACHE_DIR` ([`crate::cuda::kernels::compile_cached`]) spares a later process the
/// compilations (`gpu_check precompile` does, on every core).
pub fn module_specs(cfg: &CacheConfig, n_q_heads: u32, tensor_cores: bool) -> Result<Vec<(Family, Spec)>> {
    cfg.validate()?;
    cfg.check_q_heads(n_q_heads)?;
    let lay = Layout::new(cfg);
    let base = Spec::new(&lay, 1);
    let mut out = attention_specs(&lay, &base, n_q_heads as usize, tensor_cores);
    out.insert(0, (Family::Quantize, base));
    Ok(out)
}

impl CudaCache {
    /// Compiles and loads now the attention kernels that this cache's calls with `n_q_heads`
    /// query heads use (decode steps, chunks of queries), which the first call needing one would
    /// otherwise do: NVRTC takes seconds per module, so an engine calls this when it loads a
    /// model, and before it captures calls into a CUDA graph. The modules compile side by side;
    /// nothing is compiled that this process (or `KIVI_CUDA_CACHE_DIR`) already has. The cache is
    /// unchanged.
    ///
    /// Errors: [`Error::InvalidArgument`] for `n_q_heads` 0 or not a multiple of the kv heads;
    /// [`Error::BackendUnavailable`] where a module cannot be compiled or loaded.
    #[allow(irrefutable_let_patterns)] // a second backend exists in tests
    pub fn prepare_attention(&self, n_q_heads: u32) -> Result<()> {
        self.cfg.check_q_heads(n_q_heads)?;
        let nqh = n_q_heads as usize;
        if let Backend::Cuda(d) = &self.dev {
            let specs = self.attention_modules(nqh);
            std::thread::scope(|s| {
                let jobs: Vec<_> =
                    specs.iter().map(|(f, spec)| s.spawn(move || d.module(*f, spec).map(|_| ()))).collect();
                jobs.into_iter().try_for_each(|j| {
                    j.join().unwrap_or_else(|_| {
                        Err(Error::BackendUnavailable("CUDA: a kernel compilation panicked".into()))
                    })
                })
            })?;
        }
        // The modules' functions looked up, and the occupancy asked, as the first call would.
        [Family::Decode, Family::Prefill].into_iter().try_for_each(|f| self.prepare(f, nqh))
    }

    /// The attention modules (family and spec) this cache's calls with `n_q_heads` query heads
    /// load.
    pub(crate) fn attention_modules(&self, n_q_heads: usize) -> Vec<(Family, Spec)> {
        attention_specs(&self.lay, &self.quant_spec, n_q_heads, self.tensor_cores())
    }

    /// The spec of this cache's attention modules for `nq` query vectors per block: the extra
    /// NVRTC options its creation saw, whenever a call compiles one.
    pub(crate) fn attn_spec(&self, nq: usize) -> Spec {
        self.quant_spec.for_nq(&self.lay, nq)
    }

    /// Compiles the module of `family` that attention for `n_q_heads` query heads launches, if
    /// this process has not yet, and looks its functions up.
    fn prepare(&self, family: Family, n_q_heads: usize) -> Result<()> {
        let sh = self.shape(family, n_q_heads);
        self.attn_fns(sh.module, sh.nq).map(|_| ())
    }

    /// The functions of attention module `family` compiled for `nq` query vectors per block:
    /// compiled and looked up on first use, then kept by the cache (on a CUDA device; `None` on
    /// the emulated and simulated ones).
    #[allow(irrefutable_let_patterns)] // a second backend exists in tests
    pub(super) fn attn_fns(&self, family: Family, nq: usize) -> Result<Option<AttnFns>> {
        let Backend::Cuda(d) = &self.dev else {
            return Ok(None);
        };
        let mut known = self.attn_fns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(_, _, f)) = known.iter().find(|&&(fam, n, _)| fam == family && n == nq) {
            return Ok(Some(f));
        }
        let spec = self.attn_spec(nq);
        let m = d.module(family, &spec)?;
        let names = family.entries();
        // A tensor-core kernel of the module where it has it (0 where not), with the dynamic
        // shared memory the module was compiled for (macro `smem`; 0: static). Above 48 KB
        // (head_dim 256) a function must be allowed that much once before its launches ask for
        // it.
        let tensor_core_fn = |present: bool, name: &'static str, smem: &str| -> Result<(usize, u32)> {
            if !present {
                return Ok((0, 0));
            }
            let f = m.function(name)?;
            let bytes = spec.define(smem).unwrap_or(0) as u32;
            if bytes > 0 {
                allow_dynamic_smem(f, bytes)?;
            }
            Ok((f as usize, bytes))
        };
        // How many blocks of function `f` run at once on the device (0 without it).
        let slots = |f: usize, smem: u32| -> Result<usize> {
            match f {
                0 => Ok(0),
                f => Ok(blocks_per_sm(f as dsys::CUfunction, 128, smem)? as usize * self.info.multiprocessors as usize),
            }
        };
        // The decode module holds the tensor-core kernel where its layout allows it
        // (`KV_MMA_OK`); the module chunks of queries launch (`chunk_mma`: the decode module
        // for `mma_max_nq` vectors) also holds kv_prefill_fp and kv_prefill_q (`KV_FP_MMA_OK`).
        let decode = family == Family::Decode && mma_layout(&self.lay, nq);
        let (mma, mma_smem) = tensor_core_fn(decode, "kv_decode_mma", "KV_MMA_DYN")?;
        let chunk_fns = decode && nq == mma_max_nq(self.lay.head_dim) && prefill_fp_layout(&self.lay);
        let (prefill_fp, prefill_fp_smem) = tensor_core_fn(chunk_fns, "kv_prefill_fp", "KV_FP_DYN")?;
        let (prefill_q, prefill_q_smem) = tensor_core_fn(chunk_fns, "kv_prefill_q", "KV_PQ_DYN")?;
        let (mma_slots, prefill_q_slots) = (slots(mma, mma_smem)?, slots(prefill_q, prefill_q_smem)?);
        let f = AttnFns {
            attn: m.function(names[0])? as usize,
            combine: m.function(names[1])? as usize,
            mma,
            mma_smem,
            mma_slots,
            prefill_fp,
            prefill_fp_smem,
            prefill_q,
            prefill_q_smem,
            prefill_q_slots,
        };
        known.push((family, nq, f));
        Ok(Some(f))
    }

    /// Whether the full-precision tokens of a chunk of queries go to `kv_prefill_fp`: the layout
    /// has it (an f16 or bf16 cache), the rows allow its loads (queries 4-byte aligned with an even
    /// stride, the chunk's keys and values 16-byte aligned with a stride of whole 16 bytes),
    /// and `KIVI_CUDA_PREFILL_FP=0` does not turn it off (read at each call, so that a benchmark
    /// can time both paths in one process: `gpu_check prompt`).
    pub(super) fn prefill_fp(
        &self,
        nq: usize,
        queries: &DevRows,
        keys: Option<&DevRows>,
        values: Option<&DevRows>,
    ) -> Result<bool> {
        let off = std::env::var_os("KIVI_CUDA_PREFILL_FP").is_some_and(|v| v == "0");
        let rows16 = |r: Option<&DevRows>| r.is_none_or(|r| r.ptr % 16 == 0 && r.stride % 8 == 0);
        if off
            || !prefill_fp_layout(&self.lay)
            || queries.ptr % 4 != 0
            || queries.stride % 2 != 0
            || !rows16(keys)
            || !rows16(values)
        {
            return Ok(false);
        }
        Ok(self.attn_fns(Family::Decode, nq)?.is_none_or(|f| f.prefill_fp != 0))
    }

    /// How many blocks of the tensor-core kernel for `nq` query vectors run at once on the
    /// device (the emulated and simulated devices: three per multiprocessor, what the kernel's
    /// registers are budgeted for). The driver is asked once per cache and `nq`, when the
    /// kernel is looked up.
    fn mma_slots(&self, nq: usize) -> Result<usize> {
        match self.attn_fns(Family::Decode, nq)? {
            Some(AttnFns { mma: 0, .. }) => Err(no_mma(nq)),
            Some(f) => Ok(f.mma_slots),
            None => Ok(3 * self.info.multiprocessors as usize),
        }
    }

    /// How many blocks of `kv_prefill_q` run at once on the device (the emulated and simulated
    /// devices: two per multiprocessor, what its registers allow).
    fn prefill_q_slots(&self, nq: usize) -> Result<usize> {
        match self.attn_fns(Family::Decode, nq)? {
            Some(AttnFns { prefill_q: 0, .. }) => Err(no_mma(nq)),
            Some(f) => Ok(f.prefill_q_slots),
            None => Ok(2 * self.info.multiprocessors as usize),
        }
    }

    /// Whether this device runs the tensor-core kernels (compute capability 8.0 or newer), unless
    /// `KIVI_CUDA_MMA=0` turns them off (read once per process).
    fn tensor_cores(&self) -> bool {
        static OFF: OnceLock<bool> = OnceLock::new();
        let off = *OFF.get_or_init(|| std::env::var("KIVI_CUDA_MMA").is_ok_and(|v| v == "0"));
        self.info.capability.0 >= 8 && !off
    }

    /// How attention of `family` for `n_q_heads` query heads runs on this device.
    fn shape(&self, family: Family, n_q_heads: usize) -> Shape {
        shape_for(&self.lay, family, n_q_heads, self.tensor_cores())
    }

    /// Queues attention for `work` (all of layer `l`) and the combine. Returns whether the
    /// launches also appended the new tokens (`write_new`: a decode step's, or a chunk's that may
    /// be, on the tensor-core kernel that takes every split), which the caller then does not
    /// queue: their window writes, and the quantization of the items' `flush` groups.
    #[allow(clippy::too_many_arguments)]
    fn run_attention(
        &self,
        l: usize,
        family: Family,
        work: Work,
        n_q_heads: usize,
        keys: Option<&DevRows>,
        values: Option<&DevRows>,
        queries: &DevRows,
        out: &DevRows,
        o: &Resolved,
        stream: Stream,
    ) -> Result<bool> {
        let lay = &self.lay;
        let (hd, nkv) = (lay.head_dim, lay.n_kv_heads);
        let ratio = n_q_heads / nkv;
        let Shape { module, nq, hc, qt, mma } = self.shape(family, n_q_heads);
        let hchunks = ratio.div_ceil(hc);
        let per_item = qt * n_q_heads * (hd + 2) * 4;
        if per_item > SCRATCH_BYTES {
            return Err(Error::InvalidArgument(format!("{n_q_heads} query heads of {hd} exceed the scratch area")));
        }
        // Whether kv_prefill_fp takes the full-precision tokens of `rows` rows of a chunk, and
        // whether the output rows allow it to write them itself (pairs of elements) when there
        // is nothing quantized: it then needs no scratch.
        let fp_rows = |rows: usize| -> Result<bool> {
            Ok(mma && family == Family::Prefill && rows >= FP_MIN_ROWS && self.prefill_fp(nq, queries, keys, values)?)
        };
        let out_pairs = out.ptr % 4 == 0 && out.stride % 2 == 0;
        // The launches: up to MAX_ITEMS sequences each, or the rows of one sequence in as few
        // launches as leave room in the scratch area for 4 splits of each item, of equal size
        // (one launch when kv_prefill_fp writes the output and needs none).
        let launches: Vec<(Vec<AttnItem>, usize)> = match work {
            Work::Decode(items) => {
                let max_items = (SCRATCH_BYTES / per_item).min(MAX_ITEMS);
                items.chunks(max_items).map(|c| (c.to_vec(), 0)).collect()
            }
            Work::Rows { first, rows, .. } => {
                let items = rows.div_ceil(qt);
                let direct = first.quantized == 0 && out_pairs && fp_rows(rows)?;
                let max_items = match direct {
                    true => items.max(1),
                    #[cfg(test)]
                    false => ROW_ITEMS.get().min((SCRATCH_BYTES / (4 * per_item)).clamp(1, u16::MAX as usize)),
                    #[cfg(not(test))]
                    false => (SCRATCH_BYTES / (4 * per_item)).clamp(1, u16::MAX as usize),
                };
                let per_launch = qt * items.div_ceil(items.div_ceil(max_items));
                (0..rows)
                    .step_by(per_launch)
                    .map(|r0| {
                        let it = AttnItem {
                            q_row0: first.q_row0 + r0 as u32,
                            q_pos0: first.q_pos0 + r0 as u32,
                            n_q: qt.min(rows - r0) as u32,
                            ..first
                        };
                        (vec![it], per_launch.min(rows - r0))
                    })
                    .collect()
            }
        };
        let sms = self.info.multiprocessors as usize;
        // Whether the launches may append the new tokens, and how many did.
        let append = match work {
            Work::Decode(_) => true,
            Work::Rows { append, .. } => append && launches.len() == 1,
        };
        let mut appending = 0;
        for (chunk, launch_rows) in &launches {
            // Items of the launch (those of one sequence's rows are alike but for their rows).
            let n_items = if *launch_rows > 0 { launch_rows.div_ceil(qt) } else { chunk.len() };
            // An item's units of full-precision tokens (sinks, window, new tokens; 32 each).
            let fp_units = |it: &AttnItem| {
                let len = it.len as usize;
                let n_sink = len.min(lay.sinks);
                let ws = (lay.sinks + it.quantized as usize).min(len);
                (n_sink + (len - ws) + it.n_chunk as usize).div_ceil(32)
            };
            let units = |it: &AttnItem| it.quantized as usize / lay.group + fp_units(it);
            let max_units = chunk.iter().map(units).max().unwrap_or(0).max(1);
            let blocks_per_split = n_items * nkv * hchunks;
            let want = (8 * sms).div_ceil(blocks_per_split).clamp(1, max_units);
            let cap = (SCRATCH_BYTES / (per_item * n_items)).max(1);
            let mut ups = max_units.div_ceil(want.min(cap));
            let mut n_splits = max_units.div_ceil(ups);
            while n_splits > cap {
                ups += 1;
                n_splits = max_units.div_ceil(ups);
            }
            let mut p = AttnParams {
                pages: self.pages_ptr(l),
                windows: self.windows_ptr(l),
                blocks: self.blocks_ptr(l),
                q: queries.ptr,
                k: keys.map_or(0, |k| k.ptr),
                v: values.map_or(0, |v| v.ptr),
                part: self.base + self.off_scratch,
                out: out.ptr,
                counts: 0,
                q_stride: queries.stride as i64,
                kv_stride: keys.map_or(0, |k| k.stride as i64),
                out_stride: out.stride as i64,
                scale: o.scale,
                softcap: o.softcap,
                window: o.window.min(u32::MAX as usize) as u32,
                causal: o.causal as u32,
                n_q_heads: n_q_heads as u32,
                ratio: ratio as u32,
                hc: hc as u32,
                qt: qt as u32,
                ups: ups as u32,
                n_splits: n_splits as u32,
                n_items: n_items as u32,
                fp_only: 0,
                n_rows: *launch_rows as u32,
                write_new: 0,
                fp_splits: 1,
                fp_ups: 0,
                items: [AttnItem::default(); MAX_ITEMS],
            };
            p.items[..chunk.len()].copy_from_slice(chunk);
            let rows = n_items as u32;
            // Query rows of the launch (decode: its sequences).
            let n_rows = (n_items - 1) * qt + p.item(n_items - 1).n_q as usize;
            let max_groups = chunk.iter().map(|it| it.quantized as usize / lay.group).max().unwrap_or(0);
            let fp = fp_rows(n_rows)?;
            // Nothing quantized: kv_prefill_fp's split 0 is the only split, and it writes the
            // output itself (pairs of elements) with no scratch and no combine.
            let direct = fp && max_groups == 0 && out_pairs;
            // (Only such launches were sized past the scratch area.)
            debug_assert!(direct || per_item * n_items <= SCRATCH_BYTES, "{n_items} items overflow the scratch area");
            if mma && (cap >= 2 || direct) {
                // Split 0 (or the first few, in launches of one wave) takes the full-precision
                // tokens, the splits after it `ups` quantized groups each on tensor cores.
                // Decode, and chunks of fewer than FP_MIN_ROWS rows: one kv_decode_mma launch,
                // its full-precision splits on CUDA cores. Larger chunks: 64 query vectors per
                // block (32 above head_dim 128), kv_prefill_fp for split 0 and kv_prefill_q for
                // the others (or kv_decode_mma, `KIVI_CUDA_PREFILL_Q=0`).
                let fp_q = fp && std::env::var_os("KIVI_CUDA_PREFILL_Q").is_none_or(|v| v != "0");
                let row_blocks = n_rows.div_ceil(fp_vectors(hd) / hc);
                // (Where kv_prefill_fp takes the full-precision tokens, they are one split.)
                let split = match fp_q {
                    true => {
                        let slots = self.prefill_q_slots(nq)?;
                        mma_splits(max_groups, 0, row_blocks * nkv * hchunks, slots, cap - 1, self.one_wave)
                    }
                    false => {
                        let fp_units = if fp { 0 } else { chunk.iter().map(fp_units).max().unwrap_or(0) };
                        mma_splits(max_groups, fp_units, blocks_per_split, self.mma_slots(nq)?, cap - 1, self.one_wave)
                    }
                };
                let n = split.n;
                debug_assert!(split.fp == 1 || !fp);
                p.ups = split.ups as u32;
                p.n_splits = (split.fp + n) as u32;
                p.fp_splits = split.fp as u32;
                p.fp_ups = split.fp_ups as u32;
                #[cfg(test)]
                FP_SPLITS.set(FP_SPLITS.get().max(split.fp));
                p.fp_only = if direct {
                    3
                } else if fp {
                    2
                } else {
                    1
                };
                if fp {
                    let grid = (row_blocks as u32, (nkv * hchunks) as u32, 1);
                    self.kernel(Kernel::PrefillFp(nq, &p), grid, 128, stream)?;
                }
                if direct {
                    continue;
                }
                if fp_q && n > 0 {
                    let grid = (row_blocks as u32, (nkv * hchunks) as u32, n as u32);
                    self.kernel(Kernel::PrefillQ(nq, &p), grid, 128, stream)?;
                } else if !fp || n > 0 {
                    // Every split in this one launch (decode, short chunks): its last block per
                    // (item, kv head chunk) combines them, where there are counters for them.
                    let counters = n_items * nkv * hchunks;
                    if !fp && self.fused_combine && counters <= COUNTS_BYTES / 4 {
                        p.counts = self.base + self.off_counts;
                    }
                    // The append in the same launch (no kv_window_write, no kv_quantize).
                    p.write_new = append as u32;
                    appending += append as usize;
                    self.kernel(Kernel::Mma(nq, &p), (p.n_splits, (nkv * hchunks) as u32, rows), 128, stream)?;
                    if p.counts != 0 {
                        continue;
                    }
                }
            } else {
                let grid = (n_splits as u32, (nkv * hchunks) as u32, rows);
                self.kernel(Kernel::Attn(module, nq, &p), grid, 128, stream)?;
            }
            self.kernel(Kernel::Combine(module, nq, &p), (n_q_heads as u32, qt as u32, n_items as u32), 128, stream)?;
        }
        Ok(append && appending == launches.len())
    }

    /// [`crate::Cache::append_attend`] on the device: appends a chunk and computes attention for
    /// its queries (rows of `n_q_heads * head_dim`), written to `out` (same shape). Chunks of 8
    /// rows or more of an f16 or bf16 cache attend to their own tokens and to the quantized past
    /// on tensor cores, 64 query vectors per block, when the rows allow it (keys and values
    /// 16-byte aligned with a stride of a multiple of 8 elements, queries 4-byte aligned with an
    /// even stride); other rows take a slower path, with the same results. The attention of a
    /// prompt with nothing quantized before it is one kernel launch when `out` is also 4-byte
    /// aligned with an even stride. A chunk of fewer than 8 rows on tensor cores whose tokens
    /// fit in the ring (none overwrites a token still in the window) is one launch, appending
    /// included, as a decode step is.
    #[allow(clippy::too_many_arguments)]
    pub fn append_attend(
        &mut self,
        layer: u32,
        seq: u32,
        keys: DevRows,
        values: DevRows,
        queries: DevRows,
        out: DevRows,
        opts: &AttnOptions,
        stream: Stream,
    ) -> Result<()> {
        let l = self.check_layer(layer)?;
        let n = keys.rows;
        self.check_kv(&keys, &values, n)?;
        let nqh = self.check_q(&queries, &out, n)?;
        let o = opts.resolve(self.lay.head_dim)?;
        let slot = self.seqs.check_append(&self.lay, l, seq, n)?;
        self.bind()?;
        let ls = &self.seqs.slots[slot].layers[l];
        let (len, quantized) = (ls.len, ls.quantized);
        // A short chunk that fits in the ring is appended by its attention launch, as a decode
        // step is (the group it pushes out of the window too, unless its page is shared).
        let append = ls.fits_ring(&self.lay, n);
        let flushes = if append { self.seqs.append_flushes(&self.lay, l, &[slot], n) } else { None };
        let flush = flushes.as_ref().and_then(|f| f[0]);
        let first = AttnItem {
            slot: slot as u32,
            len: len as u32,
            quantized: quantized as u32,
            chunk_row0: 0,
            n_chunk: n as u32,
            q_row0: 0,
            n_q: 0,
            q_pos0: len as u32,
            flush: flush.map_or(0, |(_, new)| 1 + new as u32),
            flush_page: flush.map_or(0, |(page, _)| page),
        };
        let work = Work::Rows { first, rows: n, append };
        let appended =
            self.run_attention(l, Family::Prefill, work, nqh, Some(&keys), Some(&values), &queries, &out, &o, stream)?;
        let mut plan = Plan::default();
        self.plan_push(l, slot, n, 0, &mut plan);
        self.seqs.slots[slot].id = Some(seq);
        if appended {
            self.drop_appended(l, &mut plan, &[first], flushes.is_some());
        }
        self.run_plan(l, &plan, &keys, &values, stream)
    }

    /// [`crate::Cache::attend`] on the device: attention for queries of the last
    /// `queries.rows` tokens already stored in `seq`. Unlike the CPU cache's, concurrent calls
    /// on one cache must still be ordered on one stream: they share the cache's scratch area.
    pub fn attend(
        &self,
        layer: u32,
        seq: u32,
        queries: DevRows,
        out: DevRows,
        opts: &AttnOptions,
        stream: Stream,
    ) -> Result<()> {
        let l = self.check_layer(layer)?;
        let slot = self.seqs.slot_of(seq)?;
        let n = queries.rows;
        let nqh = self.check_q(&queries, &out, n)?;
        let o = opts.resolve(self.lay.head_dim)?;
        let ls = &self.seqs.slots[slot].layers[l];
        if n > ls.len {
            return Err(Error::InvalidArgument(format!(
                "{n} queries for sequence {seq}, which holds {} tokens in layer {layer}",
                ls.len
            )));
        }
        self.bind()?;
        let first = AttnItem {
            slot: slot as u32,
            len: ls.len as u32,
            quantized: ls.quantized as u32,
            chunk_row0: 0,
            n_chunk: 0,
            q_row0: 0,
            n_q: 0,
            q_pos0: (ls.len - n) as u32,
            flush: 0,
            flush_page: 0,
        };
        self.run_attention(
            l,
            Family::Prefill,
            Work::Rows { first, rows: n, append: false },
            nqh,
            None,
            None,
            &queries,
            &out,
            &o,
            stream,
        )?;
        Ok(())
    }

    /// [`crate::Cache::decode`] on the device: one token for each of `seqs` (row `i` of every
    /// argument belongs to `seqs[i]`), attention for its query, then the append. One launch
    /// covers up to 64 sequences of any lengths; on tensor cores it also appends their tokens
    /// and quantizes the groups that leave the windows (unless a fork shares a group's page).
    #[allow(clippy::too_many_arguments)]
    pub fn decode(
        &mut self,
        layer: u32,
        seqs: &[u32],
        keys: DevRows,
        values: DevRows,
        queries: DevRows,
        out: DevRows,
        opts: &AttnOptions,
        stream: Stream,
    ) -> Result<()> {
        let l = self.check_layer(layer)?;
        let n = seqs.len();
        self.check_kv(&keys, &values, n)?;
        let nqh = self.check_q(&queries, &out, n)?;
        let o = opts.resolve(self.lay.head_dim)?;
        self.seqs.check_decode(&self.lay, l, seqs)?;
        self.bind()?;
        // Compile the attention kernels (once per process) before anything changes, so that a
        // compilation error leaves the cache as it was.
        self.prepare(Family::Decode, nqh)?;
        // Each sequence's slot, and whether this call created the sequence.
        let slots: Vec<(usize, bool)> = seqs
            .iter()
            .map(|&seq| {
                let new = self.seqs.find(seq).is_none();
                (self.seqs.take_slot(seq), new)
            })
            .collect();
        // The groups the new tokens push out of the windows and their pages, for the attention
        // launch to quantize; none when a group's page is shared with a fork, whose copy the
        // appends below then queue, with the quantization, after the launch.
        let slot_ids: Vec<usize> = slots.iter().map(|&(slot, _)| slot).collect();
        let flushes = self.seqs.append_flushes(&self.lay, l, &slot_ids, 1);
        let items: Vec<AttnItem> = slots
            .iter()
            .enumerate()
            .map(|(i, &(slot, _))| {
                let ls = &self.seqs.slots[slot].layers[l];
                let flush = flushes.as_ref().and_then(|f| f[i]);
                AttnItem {
                    slot: slot as u32,
                    len: ls.len as u32,
                    quantized: ls.quantized as u32,
                    chunk_row0: i as u32,
                    n_chunk: 1,
                    q_row0: i as u32,
                    n_q: 1,
                    q_pos0: ls.len as u32,
                    flush: flush.map_or(0, |(_, new)| 1 + new as u32),
                    flush_page: flush.map_or(0, |(page, _)| page),
                }
            })
            .collect();
        let appended = match self.run_attention(
            l,
            Family::Decode,
            Work::Decode(&items),
            nqh,
            Some(&keys),
            Some(&values),
            &queries,
            &out,
            &o,
            stream,
        ) {
            Ok(appended) => appended,
            Err(e) => {
                // Nothing was appended: sequences this call created are not kept.
                for &(slot, _) in slots.iter().filter(|(_, new)| *new) {
                    self.seqs.slots[slot].id = None;
                }
                return Err(e);
            }
        };
        let mut plan = Plan::default();
        for (i, &(slot, _)) in slots.iter().enumerate() {
            self.plan_push(l, slot, 1, i, &mut plan);
        }
        if appended {
            self.drop_appended(l, &mut plan, &items, flushes.is_some());
        }
        self.run_plan(l, &plan, &keys, &values, stream)
    }

    /// After attention launches that appended their items' new tokens (`run_attention`
    /// returned true), takes out of `plan`, the appends' work, what they did: the window writes
    /// (to the positions `len..` of each item, sinks or ring slots whose tokens are quantized)
    /// and, where `flushed` (the items carried the groups that leave the windows, or that none
    /// does), the quantization of those groups and the block-table entries of the pages they
    /// start.
    fn drop_appended(&self, l: usize, plan: &mut Plan, items: &[AttnItem], flushed: bool) {
        plan.writes.clear();
        if !flushed {
            return;
        }
        // (Test builds check that the appends took the pages the launches were given.)
        if cfg!(any(test, debug_assertions)) {
            let set: Vec<(u32, u32)> = items
                .iter()
                .filter(|it| it.flush == 2)
                .map(|it| {
                    let g = it.quantized as usize / self.lay.group;
                    ((self.blocks_index(l, it.slot as usize) + g / self.lay.groups_per_page) as u32, it.flush_page)
                })
                .collect();
            assert_eq!(plan.set_blocks, set, "the pages append_flushes foresaw");
            assert!(plan.cow.is_empty());
            let flushed: Vec<u32> = items.iter().filter(|it| it.flush != 0).map(|it| it.slot).collect();
            assert_eq!(plan.flushes.iter().map(|f| f.slot).collect::<Vec<_>>(), flushed);
        }
        plan.set_blocks.clear();
        plan.flushes.clear();
    }
}
