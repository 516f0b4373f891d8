//! [`CudaCache`]: the KIVI cache in device memory, with the operations of [`crate::Cache`].
//!
//! The bytes are laid out exactly as on the CPU (see the `layout` module): pages of every layer,
//! the full-precision windows, then the device copy of the block tables and a scratch area for
//! the split-K partial results, all in one allocation taken at creation. Sequence metadata
//! (lengths, block tables, page reference counts) lives on the host, so deciding what a call does
//! never waits for the device; changes to the device copy of the block tables travel as kernel
//! parameters. Every call only queues work on the stream it is given: no synchronisation and no
//! copy between host and device, except [`CudaCache::to_host`] and [`CudaCache::from_host`],
//! which exist to save, restore and inspect a cache.
//!
//! Calls on one cache must reach the device in the order they are made: use one stream per cache
//! (or order the streams), as an engine does with its compute stream.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as drv, sys as dsys};

use super::kernels::{Family, Spec};
use super::{launch, launch_smem, Device, DeviceInfo, Module};
use crate::attention::{AttnOptions, Resolved};
use crate::cache::Cache;
use crate::config::CacheConfig;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::seq::{GroupPage, SeqTable};
use crate::stats::MemoryStats;

#[path = "attention.rs"]
mod attention;
#[cfg(any(test, feature = "sim"))]
#[path = "emu.rs"]
mod emu;
#[path = "params.rs"]
mod params;
#[cfg(any(test, feature = "sim"))]
#[path = "sim.rs"]
pub(crate) mod sim;
#[path = "state.rs"]
mod state;
#[cfg(test)]
#[path = "tests.rs"]
mod tests;

pub use attention::module_specs;
use attention::{no_mma, AttnFns};
pub(crate) use params::*;

/// A CUDA stream (`CUstream`) as the engine holds it; null is the default stream.
pub type Stream = *mut c_void;

/// Rows of device memory in the cache's dtype: `rows` rows of `row_len` elements, the starts of
/// consecutive rows `stride` elements apart (a view into a fused QKV buffer needs no copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevRows {
    pub ptr: u64,
    pub rows: usize,
    pub row_len: usize,
    pub stride: usize,
}

impl DevRows {
    /// Contiguous rows.
    pub fn new(ptr: u64, rows: usize, row_len: usize) -> DevRows {
        DevRows { ptr, rows, row_len, stride: row_len }
    }

    /// Rows `stride` elements apart.
    pub fn strided(ptr: u64, rows: usize, row_len: usize, stride: usize) -> DevRows {
        DevRows { ptr, rows, row_len, stride }
    }

    fn check(&self, what: &'static str, rows: usize, row_len: Option<usize>) -> Result<()> {
        let shape = |detail: String| Err(Error::Shape { what, detail });
        if self.ptr == 0 {
            return shape("null device pointer".into());
        }
        if self.rows != rows {
            return shape(format!("{} rows, expected {rows}", self.rows));
        }
        if let Some(n) = row_len {
            if self.row_len != n {
                return shape(format!("rows of {} elements, expected {n}", self.row_len));
            }
        }
        if self.row_len == 0 || self.stride < self.row_len {
            return shape(format!("row length {} with stride {}", self.row_len, self.stride));
        }
        if self.stride > i64::MAX as usize / 4 {
            return shape(format!("stride {} too large", self.stride));
        }
        Ok(())
    }
}

/// Where the cache's memory is: a CUDA device, or (in tests, and with the `sim` feature) host
/// memory with emulated or simulated kernels.
enum Backend {
    Cuda(Arc<Device>),
    /// Emulated device memory (kept alive; addressed through raw pointers).
    #[cfg(any(test, feature = "sim"))]
    #[allow(dead_code)]
    Emu(Vec<u64>),
    /// Host memory too, with the kernels' own code run by the host simulator (`sim.rs`).
    #[cfg(any(test, feature = "sim"))]
    #[allow(dead_code)]
    Sim(Vec<u64>),
}

/// A kernel launch and its parameters.
#[derive(Clone, Copy)]
pub(crate) enum Kernel<'a> {
    SetBlocks(&'a SetBlocksParams),
    Quantize(&'a QuantParams),
    Write(&'a WriteParams),
    Unquant(&'a UnquantParams),
    /// Attention blocks of a family compiled for `nq` query vectors per block.
    Attn(Family, usize, &'a AttnParams),
    Combine(Family, usize, &'a AttnParams),
    /// Tensor-core decode over quantized groups (decode_mma.cuh), compiled for `nq`.
    Mma(usize, &'a AttnParams),
    /// The full-precision tokens of chunks of queries on tensor cores (prefill_mma.cuh), in the
    /// decode module compiled for `nq`.
    PrefillFp(usize, &'a AttnParams),
    /// The quantized groups of chunks of queries on tensor cores (prefill_mma.cuh), in the same
    /// module.
    PrefillQ(usize, &'a AttnParams),
}

/// What appending to some sequences of one layer does on the device, decided on the host.
#[derive(Default)]
struct Plan {
    /// (index into the whole block-table area, page).
    set_blocks: Vec<(u32, u32)>,
    /// Copy-on-write page copies (src, dst) inside the layer.
    cow: Vec<(u32, u32)>,
    flushes: Vec<FlushItem>,
    writes: Vec<WriteItem>,
}

/// A KIVI key/value cache in the memory of one CUDA device. See the module documentation.
pub struct CudaCache {
    cfg: CacheConfig,
    lay: Layout,
    dev: Backend,
    info: DeviceInfo,
    seqs: SeqTable,
    base: u64,
    bytes: usize,
    off_windows: u64,
    off_blocks: u64,
    off_scratch: u64,
    off_counts: u64,
    /// Whether `kv_decode_mma` launches combine their own splits (`AttnParams.counts`).
    pub(super) fused_combine: bool,
    /// Whether tensor-core launches of under two waves take one wave of splits (`mma_splits`).
    pub(super) one_wave: bool,
    /// The append module's spec, made with the cache: its extra NVRTC options (`KIVI_NVRTC_OPTS`
    /// then) are every module's of the cache (`attn_spec`), whenever it compiles them.
    pub(super) quant_spec: Spec,
    /// The append kernels (a CUDA device only; looked up at creation).
    quant_fns: Option<QuantFns>,
    /// The attention kernels of each (module family, query vectors per block) launched so far
    /// (a CUDA device only): looked up once, so that a launch costs no hashing of the module's
    /// spec, no allocation and no driver lookup.
    attn_fns: Mutex<Vec<(Family, usize, AttnFns)>>,
}

/// The functions of the append module, as `CUfunction` handles.
#[derive(Clone, Copy)]
struct QuantFns {
    set_blocks: usize,
    quantize: usize,
    write: usize,
    unquant: usize,
}

impl QuantFns {
    fn of(m: &Module) -> Result<QuantFns> {
        let f = |i: usize| m.function(Family::Quantize.entries()[i]).map(|f| f as usize);
        Ok(QuantFns { set_blocks: f(0)?, quantize: f(1)?, write: f(2)?, unquant: f(3)? })
    }
}

// SAFETY: the device allocation is owned by the cache; host metadata is plain data.
unsafe impl Send for CudaCache {}
unsafe impl Sync for CudaCache {}

impl std::fmt::Debug for CudaCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaCache")
            .field("device", &self.info.name)
            .field("config", &self.cfg)
            .field("sequences", &self.seq_ids())
            .finish()
    }
}

fn cuerr(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::BackendUnavailable(format!("CUDA: {what} failed: {e:?}"))
}

const fn align256(n: u128) -> u128 {
    (n + 255) & !255
}

/// The parts of a CUDA cache's one device allocation, in this order: the page pools of every
/// layer, the full-precision windows, the block tables, the scratch area of attention and its
/// counters, each 256-byte aligned.
pub(crate) struct DeviceAlloc {
    pub off_windows: u128,
    pub off_blocks: u128,
    pub off_scratch: u128,
    pub off_counts: u128,
    /// The whole allocation.
    pub bytes: u128,
}

impl DeviceAlloc {
    pub(crate) fn of(lay: &Layout) -> DeviceAlloc {
        let pages = lay.n_layers as u128 * lay.pages_per_layer as u128 * lay.page_bytes as u128;
        let windows = lay.total_bytes() - pages;
        let off_windows = align256(pages);
        let off_blocks = off_windows + align256(windows);
        let off_scratch = off_blocks + align256(lay.block_table_bytes());
        let off_counts = off_scratch + SCRATCH_BYTES as u128;
        DeviceAlloc { off_windows, off_blocks, off_scratch, off_counts, bytes: off_counts + COUNTS_BYTES as u128 }
    }
}

impl CudaCache {
    /// Creates a cache on CUDA device `device`, taking all of its device memory now (zeroed;
    /// waits for the device, so that work on any stream may use the cache at once). Compiles the
    /// append kernels for the device if this process has not yet.
    pub fn new(cfg: CacheConfig, device: u32) -> Result<CudaCache> {
        cfg.validate()?;
        let dev = Device::get(device)?;
        dev.bind()?;
        CudaCache::create(cfg, Backend::Cuda(dev))
    }

    fn create(cfg: CacheConfig, backend: Backend) -> Result<CudaCache> {
        let lay = Layout::new(&cfg);
        // Within the validated size (the pools and windows fit in an isize).
        let DeviceAlloc { off_windows, off_blocks, off_scratch, off_counts, bytes } = DeviceAlloc::of(&lay);
        let (off_windows, off_blocks, off_scratch, off_counts, bytes) =
            (off_windows as usize, off_blocks as usize, off_scratch as usize, off_counts as usize, bytes as usize);
        let quant_spec = Spec::new(&lay, 1);
        let (dev, info, base, quant_fns) = match backend {
            Backend::Cuda(dev) => {
                let quant_fns = QuantFns::of(&*dev.module(Family::Quantize, &quant_spec)?)?;
                // SAFETY: a plain allocation in the bound context, zeroed before use.
                let base = unsafe { drv::malloc_sync(bytes) }.map_err(|e| match e.0 {
                    dsys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => Error::InvalidConfig(format!(
                        "the cache needs {bytes} bytes of device memory, more than is free {}",
                        crate::error::FIT_HINT
                    )),
                    _ => cuerr("cuMemAlloc", e),
                })?;
                // The zeroing is queued on the legacy stream, which the engine's non-blocking
                // streams do not wait for: wait for it here, once.
                // SAFETY: base is valid for bytes.
                let zeroed = unsafe { drv::memset_d8_sync(base, 0, bytes) }
                    .map_err(|e| cuerr("cuMemsetD8", e))
                    .and_then(|()| drv::ctx::synchronize().map_err(|e| cuerr("cuCtxSynchronize", e)));
                if let Err(e) = zeroed {
                    // SAFETY: allocated above.
                    let _ = unsafe { drv::free_sync(base) };
                    return Err(e);
                }
                let info = dev.info.clone();
                (Backend::Cuda(dev), info, base, Some(quant_fns))
            }
            #[cfg(any(test, feature = "sim"))]
            Backend::Emu(_) | Backend::Sim(_) => {
                // 256-byte aligned, like cudaMalloc, so that the simulator checks alignments
                // as the device would see them.
                let mut mem = vec![0u64; bytes.div_ceil(8) + 32];
                let base = (mem.as_mut_ptr() as u64 + 255) & !255;
                if matches!(backend, Backend::Emu(_)) {
                    (Backend::Emu(mem), emu::info(), base, None)
                } else {
                    (Backend::Sim(mem), sim::info(), base, None)
                }
            }
        };
        let seqs = SeqTable::new(&lay)
            .ok_or_else(|| Error::allocation("the host's page tables", lay.table_bytes(), lay.total_bytes()))?;
        Ok(CudaCache {
            cfg,
            lay,
            dev,
            info,
            seqs,
            base,
            bytes,
            off_windows: off_windows as u64,
            off_blocks: off_blocks as u64,
            off_scratch: off_scratch as u64,
            off_counts: off_counts as u64,
            // KIVI_CUDA_FUSED_COMBINE=0: decode launches the combine as a kernel of its own
            // (read when the cache is made, for measuring one against the other).
            fused_combine: std::env::var_os("KIVI_CUDA_FUSED_COMBINE").is_none_or(|v| v != "0"),
            // KIVI_CUDA_ONE_WAVE=0: small launches split as large ones do (the same).
            one_wave: std::env::var_os("KIVI_CUDA_ONE_WAVE").is_none_or(|v| v != "0"),
            quant_spec,
            quant_fns,
            attn_fns: Mutex::new(Vec::new()),
        })
    }

    /// The configuration the cache was created with.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// The device the cache lives on.
    pub fn device(&self) -> &DeviceInfo {
        &self.info
    }

    /// Bytes of device memory the cache took at creation (pages, windows, block tables, scratch).
    pub fn device_bytes(&self) -> usize {
        self.bytes
    }

    fn pages_ptr(&self, l: usize) -> u64 {
        self.base + (l * self.lay.pages_per_layer * self.lay.page_bytes) as u64
    }

    fn windows_ptr(&self, l: usize) -> u64 {
        let lay = &self.lay;
        self.base + self.off_windows + (lay.window_base(l, 0, 0) * lay.dtype.size()) as u64
    }

    fn blocks_index(&self, l: usize, slot: usize) -> usize {
        (l * self.lay.max_seqs + slot) * self.lay.seq_pages
    }

    fn blocks_ptr(&self, l: usize) -> u64 {
        self.base + self.off_blocks + (self.blocks_index(l, 0) * 4) as u64
    }

    fn check_layer(&self, layer: u32) -> Result<usize> {
        if layer >= self.cfg.n_layers {
            return Err(Error::LayerOutOfRange { layer, n_layers: self.cfg.n_layers });
        }
        Ok(layer as usize)
    }

    fn check_kv(&self, keys: &DevRows, values: &DevRows, rows: usize) -> Result<()> {
        let row = self.lay.n_kv_heads * self.lay.head_dim;
        keys.check("keys", rows, Some(row))?;
        values.check("values", rows, Some(row))?;
        if keys.stride != values.stride {
            return Err(Error::Shape {
                what: "values",
                detail: format!("stride {} differs from the keys' stride {}", values.stride, keys.stride),
            });
        }
        Ok(())
    }

    /// Checks queries and output; returns the number of query heads.
    fn check_q(&self, queries: &DevRows, out: &DevRows, rows: usize) -> Result<usize> {
        let (hd, nkv) = (self.lay.head_dim, self.lay.n_kv_heads);
        queries.check("queries", rows, None)?;
        let len = queries.row_len;
        if len % hd != 0 || (len / hd) % nkv != 0 || len / hd > 4096 {
            return Err(Error::Shape {
                what: "queries",
                detail: format!(
                    "row of {len} elements is not a whole number (at most 4096) of heads of {hd} that is a multiple of the {nkv} kv heads"
                ),
            });
        }
        out.check("output", rows, Some(len))?;
        Ok(len / hd)
    }

    /// Updates the host metadata of (layer, slot) for `n` tokens from input rows `row0..` and
    /// records what the device has to do. Capacity has been checked.
    fn plan_push(&mut self, l: usize, slot: usize, n: usize, row0: usize, plan: &mut Plan) {
        let lay = self.lay.clone();
        let bidx = self.blocks_index(l, slot);
        let (ls, pages) = self.seqs.layer_mut(l, slot);
        let (len_old, q_old) = (ls.len, ls.quantized);
        let len_new = len_old + n;
        let flushes = ls.flushes(&lay, n);
        for k in 0..flushes {
            let g = q_old / lay.group + k;
            let GroupPage { page, new, copy_of } = ls.group_page(&lay, pages, g);
            if let Some(shared) = copy_of {
                plan.cow.push((shared, page));
            }
            if new {
                plan.set_blocks.push(((bidx + g / lay.groups_per_page) as u32, page));
            }
        }
        if flushes > 0 {
            plan.flushes.push(FlushItem {
                slot: slot as u32,
                g0: (q_old / lay.group) as u32,
                n_groups: flushes as u32,
                len_old: len_old as u32,
                chunk_row0: row0 as u32,
                pad: 0,
            });
        }
        // Window writes: sink positions, and the ring positions that the CPU's token-by-token
        // writes would leave there (the last `ring` positions), so the windows match the CPU's.
        let sink_end = len_new.min(lay.sinks);
        if len_old < sink_end {
            let n = sink_end - len_old;
            plan.writes.push(WriteItem { slot: slot as u32, pos0: len_old as u32, n: n as u32, row0: row0 as u32 });
        }
        let ring_start = len_old.max(lay.sinks).max(len_new.saturating_sub(lay.ring));
        if ring_start < len_new {
            plan.writes.push(WriteItem {
                slot: slot as u32,
                pos0: ring_start as u32,
                n: (len_new - ring_start) as u32,
                row0: (row0 + ring_start - len_old) as u32,
            });
        }
        ls.len = len_new;
        ls.quantized = q_old + flushes * lay.group;
    }

    /// Queues a plan's device work for layer `l`: block-table entries, copy-on-write copies, the
    /// quantization of flushed groups (reading the ring and the input rows), then the window
    /// writes (which may overwrite ring slots the quantization read).
    fn run_plan(&self, l: usize, plan: &Plan, keys: &DevRows, values: &DevRows, stream: Stream) -> Result<()> {
        let lay = &self.lay;
        for chunk in plan.set_blocks.chunks(MAX_SET) {
            let mut p = SetBlocksParams {
                blocks: self.base + self.off_blocks,
                n: chunk.len() as u32,
                pad: 0,
                pairs: [0; 2 * MAX_SET],
            };
            for (i, &(idx, page)) in chunk.iter().enumerate() {
                p.pairs[2 * i] = idx;
                p.pairs[2 * i + 1] = page;
            }
            self.kernel(Kernel::SetBlocks(&p), (1, 1, 1), 256, stream)?;
        }
        for &(src, dst) in &plan.cow {
            let pb = lay.page_bytes as u64;
            let base = self.pages_ptr(l);
            self.dtod(base + dst as u64 * pb, base + src as u64 * pb, lay.page_bytes, stream)?;
        }
        for chunk in plan.flushes.chunks(MAX_ITEMS) {
            let mut p = QuantParams {
                pages: self.pages_ptr(l),
                windows: self.windows_ptr(l),
                blocks: self.blocks_ptr(l),
                k: keys.ptr,
                v: values.ptr,
                kv_stride: keys.stride as i64,
                n_items: chunk.len() as u32,
                total_groups: chunk.iter().map(|f| f.n_groups).sum(),
                items: [FlushItem::default(); MAX_ITEMS],
            };
            p.items[..chunk.len()].copy_from_slice(chunk);
            self.kernel(Kernel::Quantize(&p), (p.total_groups, lay.n_kv_heads as u32, 1), 128, stream)?;
        }
        for chunk in plan.writes.chunks(MAX_ITEMS) {
            let mut p = WriteParams {
                windows: self.windows_ptr(l),
                k: keys.ptr,
                v: values.ptr,
                kv_stride: keys.stride as i64,
                n_items: chunk.len() as u32,
                total: chunk.iter().map(|w| w.n).sum(),
                items: [WriteItem::default(); MAX_ITEMS],
            };
            p.items[..chunk.len()].copy_from_slice(chunk);
            let block = lay.head_dim.min(128) as u32;
            self.kernel(Kernel::Write(&p), (p.total, lay.n_kv_heads as u32, 1), block, stream)?;
        }
        Ok(())
    }

    /// Appends `keys` and `values` (device rows of `n_kv_heads * head_dim` elements of the cache's
    /// dtype, RoPE applied) to sequence `seq` in `layer`, creating the sequence if it is new.
    /// The data must be finite and within the f16 range (not checked on the device).
    pub fn append(&mut self, layer: u32, seq: u32, keys: DevRows, values: DevRows, stream: Stream) -> Result<()> {
        let l = self.check_layer(layer)?;
        let n = keys.rows;
        self.check_kv(&keys, &values, n)?;
        let slot = self.seqs.check_append(&self.lay, l, seq, n)?;
        self.bind()?;
        let mut plan = Plan::default();
        self.plan_push(l, slot, n, 0, &mut plan);
        self.seqs.slots[slot].id = Some(seq);
        self.run_plan(l, &plan, &keys, &values, stream)
    }

    /// Tokens `seq` holds: the most any layer holds.
    pub fn seq_len(&self, seq: u32) -> Result<u32> {
        let slot = self.seqs.slot_of(seq)?;
        Ok(self.seqs.len_of(slot))
    }

    /// Tokens `seq` holds in `layer`.
    pub fn seq_layer_len(&self, seq: u32, layer: u32) -> Result<u32> {
        let l = self.check_layer(layer)?;
        let slot = self.seqs.slot_of(seq)?;
        Ok(self.seqs.slots[slot].layers[l].len as u32)
    }

    /// Whether the cache holds `seq`.
    pub fn contains(&self, seq: u32) -> bool {
        self.seqs.find(seq).is_some()
    }

    /// The ids of all sequences held, in slot order.
    pub fn seq_ids(&self) -> Vec<u32> {
        self.seqs.ids().collect()
    }

    /// Removes `seq`, releasing its pages and its slot (host bookkeeping only).
    pub fn seq_remove(&mut self, seq: u32) -> Result<()> {
        self.seqs.remove(seq)
    }

    /// Removes every sequence but `seq`.
    pub fn seq_keep(&mut self, seq: u32) -> Result<()> {
        self.seqs.keep(seq)
    }

    /// Removes every sequence.
    pub fn clear(&mut self) {
        self.seqs.clear()
    }

    /// [`crate::Cache::seq_truncate`] on the device (same precision rules): keeps the first
    /// `n_tokens` tokens of `seq` in every layer.
    pub fn seq_truncate(&mut self, seq: u32, n_tokens: u32, stream: Stream) -> Result<()> {
        let slot = self.seqs.slot_of(seq)?;
        self.bind()?;
        for l in 0..self.lay.n_layers {
            self.truncate_layer(l, slot, n_tokens as usize, stream)?;
        }
        Ok(())
    }

    fn truncate_layer(&mut self, l: usize, slot: usize, n: usize, stream: Stream) -> Result<()> {
        if let Some((g, partial)) = self.seqs.truncated_group(&self.lay, l, slot, n) {
            let p = UnquantParams {
                windows: self.windows_ptr(l),
                pages: self.pages_ptr(l),
                blocks: self.blocks_ptr(l),
                slot: slot as u32,
                g: g as u32,
                partial: partial as u32,
                pad: 0,
            };
            self.kernel(Kernel::Unquant(&p), (self.lay.n_kv_heads as u32, 1, 1), 256, stream)?;
        }
        self.seqs.truncate(&self.lay, l, slot, n);
        Ok(())
    }

    /// [`crate::Cache::seq_copy`] on the device: `dst` becomes a copy of the first `n_tokens`
    /// tokens of `src`, sharing its quantized pages (copy-on-write); windows and block tables
    /// are copied on the device.
    pub fn seq_copy(&mut self, src: u32, dst: u32, n_tokens: u32, stream: Stream) -> Result<()> {
        let (s, d) = self.seqs.copy_slots(src, dst)?;
        self.bind()?;
        self.seqs.copy(s, d, dst);
        let lay = &self.lay;
        let (dsz, wbytes) = (lay.dtype.size() as u64, lay.slot_window_bytes());
        for l in 0..lay.n_layers {
            let sw = self.base + self.off_windows + lay.window_base(l, s, 0) as u64 * dsz;
            let dw = self.base + self.off_windows + lay.window_base(l, d, 0) as u64 * dsz;
            let sb = self.base + self.off_blocks + self.blocks_index(l, s) as u64 * 4;
            let db = self.base + self.off_blocks + self.blocks_index(l, d) as u64 * 4;
            self.dtod(dw, sw, wbytes, stream)?;
            let n_blocks = self.seqs.slots[s].layers[l].blocks.len();
            if n_blocks > 0 {
                self.dtod(db, sb, n_blocks * 4, stream)?;
            }
        }
        for l in 0..lay.n_layers {
            self.truncate_layer(l, d, n_tokens as usize, stream)?;
        }
        Ok(())
    }

    /// Where the cache's bytes go right now (the same accounting as [`crate::Cache::stats`]).
    pub fn stats(&self) -> MemoryStats {
        MemoryStats::count(&self.lay, &self.seqs)
    }

    /// Waits for everything queued on the device, on every stream (`cuCtxSynchronize`).
    fn sync_device(&self) -> Result<()> {
        match &self.dev {
            Backend::Cuda(_) => drv::ctx::synchronize()
                .map_err(|e| cuerr("cuCtxSynchronize (work queued earlier on the device failed)", e)),
            #[cfg(any(test, feature = "sim"))]
            Backend::Emu(_) | Backend::Sim(_) => Ok(()),
        }
    }

    fn bind(&self) -> Result<()> {
        match &self.dev {
            Backend::Cuda(d) => d.bind(),
            #[cfg(any(test, feature = "sim"))]
            Backend::Emu(_) | Backend::Sim(_) => Ok(()),
        }
    }

    /// Queues a kernel on `stream`.
    #[allow(clippy::infallible_destructuring_match)] // a second backend exists in tests
    fn kernel(&self, k: Kernel<'_>, grid: (u32, u32, u32), block: u32, stream: Stream) -> Result<()> {
        match &self.dev {
            Backend::Cuda(_) => {}
            #[cfg(any(test, feature = "sim"))]
            Backend::Emu(_) => {
                // SAFETY: the emulated device pointers are host pointers into live buffers.
                unsafe { emu::run(&self.lay, k, grid) };
                return Ok(());
            }
            #[cfg(any(test, feature = "sim"))]
            Backend::Sim(_) => {
                // SAFETY: as above; the simulator runs the kernels' code on these host pointers.
                unsafe { sim::run(&self.quant_spec, |nq| self.attn_spec(nq), k, grid, block) };
                return Ok(());
            }
        };
        let st = stream as dsys::CUstream;
        let q =
            self.quant_fns.ok_or_else(|| Error::BackendUnavailable("CUDA: the append kernels are missing".into()))?;
        let attn = |family: Family, nq: usize| {
            self.attn_fns(family, nq)?.ok_or_else(|| Error::BackendUnavailable("CUDA: no attention kernels".into()))
        };
        let func = |f: usize| f as dsys::CUfunction;
        // SAFETY: each struct matches its kernel's parameter struct, and every pointer in it is
        // the cache's own memory or the caller's rows, whose sizes were checked. Every handle is
        // a function of a module loaded for this cache's layout (never unloaded).
        unsafe {
            match k {
                Kernel::SetBlocks(p) => launch(func(q.set_blocks), grid, block, st, p),
                Kernel::Quantize(p) => launch(func(q.quantize), grid, block, st, p),
                Kernel::Write(p) => launch(func(q.write), grid, block, st, p),
                Kernel::Unquant(p) => launch(func(q.unquant), grid, block, st, p),
                Kernel::Attn(f, nq, p) => launch(func(attn(f, nq)?.attn), grid, block, st, p),
                Kernel::Combine(f, nq, p) => launch(func(attn(f, nq)?.combine), grid, block, st, p),
                Kernel::Mma(nq, p) => match attn(Family::Decode, nq)? {
                    AttnFns { mma: 0, .. } => Err(no_mma(nq)),
                    f => launch_smem(func(f.mma), grid, block, f.mma_smem, st, p),
                },
                Kernel::PrefillFp(nq, p) => match attn(Family::Decode, nq)? {
                    AttnFns { prefill_fp: 0, .. } => Err(no_mma(nq)),
                    f => launch_smem(func(f.prefill_fp), grid, block, f.prefill_fp_smem, st, p),
                },
                Kernel::PrefillQ(nq, p) => match attn(Family::Decode, nq)? {
                    AttnFns { prefill_q: 0, .. } => Err(no_mma(nq)),
                    f => launch_smem(func(f.prefill_q), grid, block, f.prefill_q_smem, st, p),
                },
            }
        }
    }

    fn dtod(&self, dst: u64, src: u64, bytes: usize, stream: Stream) -> Result<()> {
        match &self.dev {
            // SAFETY: both ranges lie inside the cache's allocation.
            Backend::Cuda(_) => unsafe { drv::memcpy_dtod_async(dst, src, bytes, stream as dsys::CUstream) }
                .map_err(|e| cuerr("cuMemcpyDtoDAsync", e)),
            #[cfg(any(test, feature = "sim"))]
            Backend::Emu(_) | Backend::Sim(_) => {
                // SAFETY: host pointers into the emulated allocation.
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
                Ok(())
            }
        }
    }

    /// Copies device bytes to the host and waits for them.
    fn dtoh(&self, dst: &mut [u8], src: u64, stream: Stream) -> Result<()> {
        match &self.dev {
            Backend::Cuda(_) => {
                let st = stream as dsys::CUstream;
                // SAFETY: dst stays borrowed until the stream is synchronised.
                unsafe {
                    drv::memcpy_dtoh_async(dst, src, st).map_err(|e| cuerr("cuMemcpyDtoHAsync", e))?;
                    drv::stream::synchronize(st).map_err(|e| cuerr("cuStreamSynchronize", e))
                }
            }
            #[cfg(any(test, feature = "sim"))]
            Backend::Emu(_) | Backend::Sim(_) => {
                // SAFETY: a host pointer into the emulated allocation.
                unsafe { std::ptr::copy(src as *const u8, dst.as_mut_ptr(), dst.len()) };
                Ok(())
            }
        }
    }

    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        match &self.dev {
            // SAFETY: a synchronous copy into the cache's allocation.
            Backend::Cuda(_) => unsafe { drv::memcpy_htod_sync(dst, src) }.map_err(|e| cuerr("cuMemcpyHtoD", e)),
            #[cfg(any(test, feature = "sim"))]
            Backend::Emu(_) | Backend::Sim(_) => {
                // SAFETY: a host pointer into the emulated allocation.
                unsafe { std::ptr::copy(src.as_ptr(), dst as *mut u8, src.len()) };
                Ok(())
            }
        }
    }

    /// A cache whose device is emulated on the host by Rust versions of the kernels (tests of
    /// everything but the CUDA code itself); device pointers are host pointers.
    #[cfg(any(test, feature = "sim"))]
    #[doc(hidden)]
    pub fn emulated(cfg: CacheConfig) -> Result<CudaCache> {
        cfg.validate()?;
        CudaCache::create(cfg, Backend::Emu(Vec::new()))
    }

    /// A cache on host memory whose kernels are the CUDA code itself, run by the host simulator
    /// (`sim.rs`); device pointers are host pointers. Needs a C++ compiler (`c++`, or `$CXX`)
    /// when it first runs each kernel family. For tests (the `sim` feature).
    #[cfg(any(test, feature = "sim"))]
    #[doc(hidden)]
    pub fn simulated(cfg: CacheConfig) -> Result<CudaCache> {
        cfg.validate()?;
        CudaCache::create(cfg, Backend::Sim(Vec::new()))
    }
}

impl Drop for CudaCache {
    #[allow(irrefutable_let_patterns)] // a second backend exists in tests
    fn drop(&mut self) {
        if let Backend::Cuda(d) = &self.dev {
            if d.bind().is_ok() {
                // SAFETY: allocated in new(), freed once (cuMemFree waits for work using it).
                unsafe {
                    let _ = drv::free_sync(self.base);
                }
            }
        }
    }
}
