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
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as drv, sys as dsys};

use super::kernels::{chunk_mma, decode_mma, max_nq, mma_layout, Family, Spec};
use super::{blocks_per_sm, launch, Device, DeviceInfo, Module};
use crate::attention::{AttnOptions, Resolved};
use crate::cache::Cache;
use crate::config::CacheConfig;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::seq::{GroupPage, SeqTable};
use crate::stats::MemoryStats;

#[cfg(any(test, feature = "sim"))]
#[path = "emu.rs"]
mod emu;
#[cfg(any(test, feature = "sim"))]
#[path = "sim.rs"]
pub(crate) mod sim;
#[cfg(test)]
#[path = "tests.rs"]
mod tests;

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

// Kernel parameter structs: field for field the structs of cuda/*.cu.
const MAX_ITEMS: usize = 64;
const MAX_SET: usize = 480;
const SCRATCH_BYTES: usize = 32 << 20;

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct AttnItem {
    slot: u32,
    len: u32,
    quantized: u32,
    chunk_row0: u32,
    n_chunk: u32,
    q_row0: u32,
    n_q: u32,
    q_pos0: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct AttnParams {
    pages: u64,
    windows: u64,
    blocks: u64,
    q: u64,
    k: u64,
    v: u64,
    part: u64,
    out: u64,
    q_stride: i64,
    kv_stride: i64,
    out_stride: i64,
    scale: f32,
    softcap: f32,
    window: u32,
    causal: u32,
    n_q_heads: u32,
    ratio: u32,
    hc: u32,
    qt: u32,
    ups: u32,
    n_splits: u32,
    n_items: u32,
    fp_only: u32,
    items: [AttnItem; MAX_ITEMS],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SetBlocksParams {
    blocks: u64,
    n: u32,
    pad: u32,
    pairs: [u32; 2 * MAX_SET],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct FlushItem {
    slot: u32,
    g0: u32,
    n_groups: u32,
    len_old: u32,
    chunk_row0: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct QuantParams {
    pages: u64,
    windows: u64,
    blocks: u64,
    k: u64,
    v: u64,
    kv_stride: i64,
    n_items: u32,
    total_groups: u32,
    items: [FlushItem; MAX_ITEMS],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct WriteItem {
    slot: u32,
    pos0: u32,
    n: u32,
    row0: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct WriteParams {
    windows: u64,
    k: u64,
    v: u64,
    kv_stride: i64,
    n_items: u32,
    total: u32,
    items: [WriteItem; MAX_ITEMS],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UnquantParams {
    windows: u64,
    pages: u64,
    blocks: u64,
    slot: u32,
    g: u32,
    partial: u32,
    pad: u32,
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
    /// The append module's spec (the simulator compiles from it).
    #[cfg(any(test, feature = "sim"))]
    quant_spec: Spec,
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

/// The functions of one attention module: its blocks, its combine, and the tensor-core decode
/// where the module has it (0 where not), with how many of its blocks run at once on the device
/// (`mma_slots`, 0 without it).
#[derive(Clone, Copy)]
struct AttnFns {
    attn: usize,
    combine: usize,
    mma: usize,
    mma_slots: usize,
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

/// The tensor-core decode asked for where the layout has none (a bug of the host's choice).
fn no_mma(nq: usize) -> Error {
    Error::BackendUnavailable(format!("CUDA: the decode module for {nq} query vectors has no tensor-core kernel"))
}

fn cuerr(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::BackendUnavailable(format!("CUDA: {what} failed: {e:?}"))
}

const fn align256(n: u128) -> u128 {
    (n + 255) & !255
}

/// The parts of a CUDA cache's one device allocation, in this order: the page pools of every
/// layer, the full-precision windows, the block tables and the scratch area of attention, each
/// 256-byte aligned.
pub(crate) struct DeviceAlloc {
    pub off_windows: u128,
    pub off_blocks: u128,
    pub off_scratch: u128,
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
        DeviceAlloc { off_windows, off_blocks, off_scratch, bytes: off_scratch + SCRATCH_BYTES as u128 }
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
        let DeviceAlloc { off_windows, off_blocks, off_scratch, bytes } = DeviceAlloc::of(&lay);
        let (off_windows, off_blocks, off_scratch, bytes) =
            (off_windows as usize, off_blocks as usize, off_scratch as usize, bytes as usize);
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
            #[cfg(any(test, feature = "sim"))]
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
    fn attn_fns(&self, family: Family, nq: usize) -> Result<Option<AttnFns>> {
        let Backend::Cuda(d) = &self.dev else {
            return Ok(None);
        };
        let mut known = self.attn_fns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(_, _, f)) = known.iter().find(|&&(fam, n, _)| fam == family && n == nq) {
            return Ok(Some(f));
        }
        let m = d.module(family, &Spec::new(&self.lay, nq))?;
        let names = family.entries();
        // The decode module holds the tensor-core kernel where its layout allows it
        // (`KV_MMA_OK`).
        let mma = if family == Family::Decode && mma_layout(&self.lay, nq) {
            m.function("kv_decode_mma")? as usize
        } else {
            0
        };
        let mma_slots = match mma {
            0 => 0,
            f => blocks_per_sm(f as dsys::CUfunction, 128)? as usize * self.info.multiprocessors as usize,
        };
        let f =
            AttnFns { attn: m.function(names[0])? as usize, combine: m.function(names[1])? as usize, mma, mma_slots };
        known.push((family, nq, f));
        Ok(Some(f))
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

    /// How attention of `family` for `n_q_heads` query heads runs on this device.
    fn shape(&self, family: Family, n_q_heads: usize) -> Shape {
        let (hd, ratio) = (self.lay.head_dim, n_q_heads / self.lay.n_kv_heads);
        let cap = max_nq(hd);
        // KIVI_CUDA_MMA=0 turns the tensor-core kernel off (read once per process).
        static OFF: OnceLock<bool> = OnceLock::new();
        let off = *OFF.get_or_init(|| std::env::var("KIVI_CUDA_MMA").is_ok_and(|v| v == "0"));
        let tensor_cores = self.info.capability.0 >= 8 && !off;
        match family {
            Family::Decode if tensor_cores && decode_mma(&self.lay, ratio) => {
                // At most 8 query heads per block: larger GQA groups take several blocks.
                let nq = ratio.min(8);
                Shape { module: Family::Decode, nq, hc: nq, qt: 1, mma: true }
            }
            Family::Decode => {
                let nq = ratio.min(cap);
                Shape { module: Family::Decode, nq, hc: nq, qt: 1, mma: false }
            }
            _ if tensor_cores && chunk_mma(&self.lay) => {
                // Chunks of queries take the tensor-core kernel too: 8 query vectors per block,
                // the 8 / hc rows of hc query heads of one kv head.
                let hc = ratio.min(8);
                Shape { module: Family::Decode, nq: 8, hc, qt: 8 / hc, mma: true }
            }
            _ => {
                let hc = ratio.min(cap);
                Shape { module: family, nq: cap, hc, qt: cap / hc, mma: false }
            }
        }
    }

    /// Queues attention for `items` (all of layer `l`) and the combine.
    #[allow(clippy::too_many_arguments)]
    fn run_attention(
        &self,
        l: usize,
        family: Family,
        items: &[AttnItem],
        n_q_heads: usize,
        keys: Option<&DevRows>,
        values: Option<&DevRows>,
        queries: &DevRows,
        out: &DevRows,
        o: &Resolved,
        stream: Stream,
    ) -> Result<()> {
        let lay = &self.lay;
        let (hd, nkv) = (lay.head_dim, lay.n_kv_heads);
        let ratio = n_q_heads / nkv;
        let Shape { module, nq, hc, qt, mma } = self.shape(family, n_q_heads);
        let hchunks = ratio.div_ceil(hc);
        let per_item = qt * n_q_heads * (hd + 2) * 4;
        let max_items = (SCRATCH_BYTES / per_item).min(MAX_ITEMS);
        if max_items == 0 {
            return Err(Error::InvalidArgument(format!("{n_q_heads} query heads of {hd} exceed the scratch area")));
        }
        let sms = self.info.multiprocessors as usize;
        for chunk in items.chunks(max_items) {
            let units = |it: &AttnItem| {
                let n_groups = it.quantized as usize / lay.group;
                let len = it.len as usize;
                let n_sink = len.min(lay.sinks);
                let ws = (lay.sinks + it.quantized as usize).min(len);
                let n_fp = n_sink + (len - ws) + it.n_chunk as usize;
                n_groups + n_fp.div_ceil(32)
            };
            let max_units = chunk.iter().map(units).max().unwrap_or(0).max(1);
            let blocks_per_split = chunk.len() * nkv * hchunks;
            let want = (8 * sms).div_ceil(blocks_per_split).clamp(1, max_units);
            let cap = (SCRATCH_BYTES / (per_item * chunk.len())).max(1);
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
                n_items: chunk.len() as u32,
                fp_only: 0,
                items: [AttnItem::default(); MAX_ITEMS],
            };
            p.items[..chunk.len()].copy_from_slice(chunk);
            let rows = chunk.len() as u32;
            if mma && cap >= 2 {
                // One launch: split 0 takes the full-precision tokens on CUDA cores, splits 1..
                // take `ups` quantized groups each on tensor cores.
                let max_groups = chunk.iter().map(|it| it.quantized as usize / lay.group).max().unwrap_or(0);
                let slots = self.mma_slots(nq)?;
                let (ups, n) = mma_splits(max_groups, blocks_per_split, slots, cap - 1);
                p.ups = ups as u32;
                p.n_splits = 1 + n as u32;
                p.fp_only = 1;
                self.kernel(Kernel::Mma(nq, &p), (p.n_splits, (nkv * hchunks) as u32, rows), 128, stream)?;
            } else {
                let grid = (n_splits as u32, (nkv * hchunks) as u32, rows);
                self.kernel(Kernel::Attn(module, nq, &p), grid, 128, stream)?;
            }
            self.kernel(
                Kernel::Combine(module, nq, &p),
                (n_q_heads as u32, qt as u32, chunk.len() as u32),
                128,
                stream,
            )?;
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

    /// [`crate::Cache::append_attend`] on the device: appends a chunk and computes attention for
    /// its queries (rows of `n_q_heads * head_dim`), written to `out` (same shape).
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
        let qt = self.shape(Family::Prefill, nqh).qt;
        let items: Vec<AttnItem> = (0..n.div_ceil(qt))
            .map(|i| AttnItem {
                slot: slot as u32,
                len: len as u32,
                quantized: quantized as u32,
                chunk_row0: 0,
                n_chunk: n as u32,
                q_row0: (i * qt) as u32,
                n_q: qt.min(n - i * qt) as u32,
                q_pos0: (len + i * qt) as u32,
            })
            .collect();
        self.run_attention(l, Family::Prefill, &items, nqh, Some(&keys), Some(&values), &queries, &out, &o, stream)?;
        let mut plan = Plan::default();
        self.plan_push(l, slot, n, 0, &mut plan);
        self.seqs.slots[slot].id = Some(seq);
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
        let qt = self.shape(Family::Prefill, nqh).qt;
        let items: Vec<AttnItem> = (0..n.div_ceil(qt))
            .map(|i| AttnItem {
                slot: slot as u32,
                len: ls.len as u32,
                quantized: ls.quantized as u32,
                chunk_row0: 0,
                n_chunk: 0,
                q_row0: (i * qt) as u32,
                n_q: qt.min(n - i * qt) as u32,
                q_pos0: (ls.len - n + i * qt) as u32,
            })
            .collect();
        self.run_attention(l, Family::Prefill, &items, nqh, None, None, &queries, &out, &o, stream)
    }

    /// [`crate::Cache::decode`] on the device: one token for each of `seqs` (row `i` of every
    /// argument belongs to `seqs[i]`), attention for its query, then the append. One launch
    /// covers up to 64 sequences of any lengths.
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
        let items: Vec<AttnItem> = slots
            .iter()
            .enumerate()
            .map(|(i, &(slot, _))| {
                let ls = &self.seqs.slots[slot].layers[l];
                AttnItem {
                    slot: slot as u32,
                    len: ls.len as u32,
                    quantized: ls.quantized as u32,
                    chunk_row0: i as u32,
                    n_chunk: 1,
                    q_row0: i as u32,
                    n_q: 1,
                    q_pos0: ls.len as u32,
                }
            })
            .collect();
        if let Err(e) =
            self.run_attention(l, Family::Decode, &items, nqh, Some(&keys), Some(&values), &queries, &out, &o, stream)
        {
            // Nothing was appended: sequences this call created are not kept.
            for &(slot, _) in slots.iter().filter(|(_, new)| *new) {
                self.seqs.slots[slot].id = None;
            }
            return Err(e);
        }
        let mut plan = Plan::default();
        for (i, &(slot, _)) in slots.iter().enumerate() {
            self.plan_push(l, slot, 1, i, &mut plan);
        }
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

    /// Sequence `seq` alone, in a CPU [`Cache`] of the same dimensions sized for it (one
    /// sequence, its quantized tokens): what to save when one sequence is swapped out. Waits for
    /// `stream`.
    pub fn seq_to_host(&self, seq: u32, stream: Stream) -> Result<Cache> {
        let slot = self.seqs.slot_of(seq)?;
        self.bind()?;
        let lay = &self.lay;
        let mut cfg = self.cfg.clone();
        cfg.max_seqs = 1;
        let max_q = self.seqs.slots[slot].layers.iter().map(|l| l.quantized).max().unwrap_or(0);
        cfg.max_tokens = max_q.max(1) as u32;
        let mut host = Cache::new(cfg)?;
        let dsz = lay.dtype.size();
        let wbytes = lay.slot_window_bytes();
        for l in 0..lay.n_layers {
            let ls = self.seqs.slots[slot].layers[l].clone();
            let mut blocks = Vec::with_capacity(ls.blocks.len());
            for &p in &ls.blocks {
                let np = host.seqs.pages[l].alloc();
                let src = self.pages_ptr(l) + p as u64 * lay.page_bytes as u64;
                self.dtoh(host.pools[l].page_mut(np), src, stream)?;
                blocks.push(np);
            }
            let src = self.base + self.off_windows + (lay.window_base(l, slot, 0) * dsz) as u64;
            let dst = host.lay.window_base(l, 0, 0) * dsz;
            self.dtoh(&mut host.windows.bytes_mut()[dst..dst + wbytes], src, stream)?;
            let h = &mut host.seqs.slots[0].layers[l];
            h.len = ls.len;
            h.quantized = ls.quantized;
            h.blocks = blocks;
        }
        host.seqs.slots[0].id = Some(seq);
        Ok(host)
    }

    /// Makes `as_id` a copy of sequence `seq` of the CPU cache `host` (e.g. one restored from a
    /// saved state, of any capacity and page size but the same dimensions and settings),
    /// replacing whatever `as_id` held. Waits for the whole device before its copies (work
    /// queued earlier on any stream may use the pages) and after them.
    pub fn seq_from_host(&mut self, host: &Cache, seq: u32, as_id: u32) -> Result<()> {
        let hc = host.config();
        let same = CacheConfig {
            max_tokens: hc.max_tokens,
            max_seqs: hc.max_seqs,
            max_seq_tokens: hc.max_seq_tokens,
            page_tokens: hc.page_tokens,
            n_threads: hc.n_threads,
            ..self.cfg.clone()
        };
        if *hc != same {
            return Err(Error::StateMismatch(format!("a cache of {hc:?} into a cache of {:?}", self.cfg)));
        }
        if hc.effective_page_tokens() != self.cfg.effective_page_tokens() {
            // Regrouped into this cache's page size on the way.
            return self.load_seq_state(as_id, &host.save_seq_state_vec(seq)?);
        }
        let hslot = host.seqs.slot_of(seq)?;
        let (slot, new) = self.seqs.slot_or_new(as_id)?;
        let lay = self.lay.clone();
        for (l, hls) in host.seqs.slots[hslot].layers.iter().enumerate() {
            crate::state::check_seq_len(&self.lay, seq, l, hls.len)?;
            self.seqs.check_pages(l, as_id, hls.len, hls.blocks.len(), (!new).then_some(slot))?;
        }
        self.bind()?;
        // The copies below are not ordered with work on the engine's streams: wait for that
        // work first, and for the copies at the end.
        self.sync_device()?;
        self.seqs.release(slot);
        let dsz = lay.dtype.size();
        let wbytes = lay.slot_window_bytes();
        for l in 0..lay.n_layers {
            let hls = &host.seqs.slots[hslot].layers[l];
            let mut blocks = Vec::with_capacity(hls.blocks.len());
            for &hp in &hls.blocks {
                let p = self.seqs.pages[l].alloc();
                self.htod(self.pages_ptr(l) + p as u64 * lay.page_bytes as u64, host.pools[l].page(hp))?;
                blocks.push(p);
            }
            let table: Vec<u8> = blocks.iter().flat_map(|b| b.to_le_bytes()).collect();
            self.htod(self.base + self.off_blocks + (self.blocks_index(l, slot) * 4) as u64, &table)?;
            let src = host.lay.window_base(l, hslot, 0) * dsz;
            let dst = self.base + self.off_windows + (lay.window_base(l, slot, 0) * dsz) as u64;
            self.htod(dst, &host.windows.bytes()[src..src + wbytes])?;
            let ls = &mut self.seqs.slots[slot].layers[l];
            ls.len = hls.len;
            ls.quantized = hls.quantized;
            ls.blocks = blocks;
        }
        self.seqs.slots[slot].id = Some(as_id);
        self.sync_device()
    }

    /// A CPU [`Cache`] holding exactly what this cache holds (pages, windows, sequences), e.g. to
    /// save it with the CPU cache's state functions or to inspect it. It takes as much host
    /// memory as the cache takes device memory; [`CudaCache::seq_to_host`] takes one sequence.
    /// Waits for `stream`.
    pub fn to_host(&self, stream: Stream) -> Result<Cache> {
        self.host_copy(self.lay.pages_per_layer, stream)
    }

    /// A CPU cache holding what this cache holds, in pools `pages` long (reaching at least the
    /// last page in use): the first `pages` pages of each pool, the windows and the tables.
    fn host_copy(&self, pages: usize, stream: Stream) -> Result<Cache> {
        self.bind()?;
        let lay = &self.lay;
        let mut cfg = self.cfg.clone();
        if pages < lay.pages_per_layer {
            cfg.max_tokens = (pages * lay.page_tokens).clamp(1, cfg.max_tokens as usize) as u32;
        }
        let mut host = Cache::new(cfg)?;
        let n = pages.min(host.lay.pages_per_layer) * lay.page_bytes;
        for l in 0..lay.n_layers {
            self.dtoh(&mut host.pools[l].bytes_mut()[..n], self.pages_ptr(l), stream)?;
        }
        self.dtoh(host.windows.bytes_mut(), self.base + self.off_windows, stream)?;
        self.seqs.restore_into(&mut host.seqs);
        Ok(host)
    }

    /// How far into the pools the pages in use reach: the highest in use, plus one.
    fn pages_reach(&self) -> usize {
        let reach = |p: &crate::pool::PageRefs| p.all_refs().iter().rposition(|&r| r > 0).map_or(0, |i| i + 1);
        self.seqs.pages.iter().map(reach).max().unwrap_or(0)
    }

    /// A cache on device `device` holding exactly what the CPU `cache` holds (e.g. one restored
    /// from a saved state). Waits for the copies to finish.
    pub fn from_host(cache: &Cache, device: u32) -> Result<CudaCache> {
        let mut c = CudaCache::new(cache.cfg.clone(), device)?;
        c.upload(cache)?;
        Ok(c)
    }

    /// The whole cache as a state blob, the CPU cache's format ([`Cache::save_state_vec`]):
    /// the pages in use (as far as the last one reaches) and the windows are brought to the
    /// host first, so it takes host memory for those as well as for the blob. Waits for
    /// `stream`.
    pub fn save_state_vec(&self, stream: Stream) -> Result<Vec<u8>> {
        let host = self.host_copy(self.pages_reach(), stream)?;
        let mut v = vec![0; self.state_size()];
        host.save_state_as(&self.cfg, &mut v)?;
        Ok(v)
    }

    /// Bytes [`CudaCache::save_state_vec`] returns now, found on the host (no device work).
    pub fn state_size(&self) -> usize {
        crate::state::cache_state_size(&self.lay, &self.seqs)
    }

    /// Bytes [`CudaCache::save_seq_state_vec`] returns for `seq` now (no device work).
    pub fn seq_state_size(&self, seq: u32) -> Result<usize> {
        Ok(crate::state::seq_state_size(&self.lay, &self.seqs, self.seqs.slot_of(seq)?))
    }

    /// Replaces everything with a state blob of a cache of the same dimensions and settings,
    /// any capacity and page size its sequences fit ([`Cache::load_state`]); a blob that is
    /// refused changes nothing. It is read into a host cache with pools as long as the blob's
    /// pages reach (not as the whole cache) and copied up from there. Waits for the whole device
    /// before and after its copies.
    pub fn load_state(&mut self, buf: &[u8]) -> Result<()> {
        let pages = crate::state::cache_state_pages(&self.cfg, buf)?;
        let mut cfg = self.cfg.clone();
        cfg.max_tokens = (pages * self.lay.page_tokens).clamp(1, cfg.max_tokens as usize) as u32;
        let mut host = Cache::new(cfg)?;
        host.load_state(buf)?;
        self.upload(&host)
    }

    /// Sequence `seq` as a state blob: the bytes [`Cache::save_seq_state_vec`] writes for a CPU
    /// cache of this configuration holding the same sequence. Waits for `stream`.
    pub fn save_seq_state_vec(&self, seq: u32, stream: Stream) -> Result<Vec<u8>> {
        let host = self.seq_to_host(seq, stream)?;
        let mut v = vec![0; host.seq_state_size(seq)?];
        host.save_seq_state_as(seq, &self.cfg, &mut v)?;
        Ok(v)
    }

    /// Loads a sequence blob ([`Cache::load_seq_state`], from a cache of the same dimensions,
    /// any capacity and page size) as sequence `seq`, replacing it if it exists.
    pub fn load_seq_state(&mut self, seq: u32, buf: &[u8]) -> Result<()> {
        // Through a host cache just large enough for the sequence, in this cache's page size.
        let tokens = crate::state::seq_state_tokens(&self.cfg, buf)?;
        let mut cfg = self.cfg.clone();
        (cfg.max_seqs, cfg.max_seq_tokens) = (1, 0);
        cfg.max_tokens = tokens.clamp(1, u32::MAX as usize) as u32;
        let mut host = Cache::new(cfg)?;
        host.load_seq_state(seq, buf)?;
        self.seq_from_host(&host, seq, seq)
    }

    /// Replaces the device copy with `cache`'s contents: a cache of this configuration, or of a
    /// smaller `max_tokens` (shorter pools, whose pages go to the start of this cache's; the rest
    /// is left free). Waits for the device before (work queued on any stream may still use the
    /// memory) and after (synchronous copies from pageable memory may return before the data
    /// lands, and later work on a non-blocking stream is not ordered after them).
    fn upload(&mut self, cache: &Cache) -> Result<()> {
        self.bind()?;
        self.sync_device()?;
        let c = self;
        let lay = c.lay.clone();
        let mut blocks = vec![0u32; lay.n_layers * lay.max_seqs * lay.seq_pages];
        for (slot, s) in cache.seqs.slots.iter().enumerate() {
            for (l, ls) in s.layers.iter().enumerate() {
                let b = c.blocks_index(l, slot);
                blocks[b..b + ls.blocks.len()].copy_from_slice(&ls.blocks);
            }
        }
        for l in 0..lay.n_layers {
            c.htod(c.pages_ptr(l), cache.pools[l].bytes())?;
        }
        c.htod(c.base + c.off_windows, cache.windows.bytes())?;
        let blocks: Vec<u8> = blocks.iter().flat_map(|b| b.to_le_bytes()).collect();
        c.htod(c.base + c.off_blocks, &blocks)?;
        cache.seqs.restore_into(&mut c.seqs);
        c.sync_device()
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
                unsafe { sim::run(&self.quant_spec, |nq| Spec::new(&self.lay, nq), k, grid, block) };
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
                Kernel::Mma(nq, p) => match attn(Family::Decode, nq)?.mma {
                    0 => Err(no_mma(nq)),
                    f => launch(func(f), grid, block, st, p),
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

/// How the tensor-core kernel splits the quantized groups: `(ups, n)`, `n` splits of `ups`
/// groups for each of the `blocks_per_split` (item, kv head, head chunk) triples, for
/// `max_groups` groups (the longest item's), when `slots` blocks fit on the device at once.
///
/// Enough blocks for `WAVES` times the slots, so that the last, partial wave is a small part of
/// the call (the blocks of split 0, the full-precision tokens, finish early and leave their
/// slots to the others); but at least `MIN_GROUPS` groups per block, so that what a block costs
/// besides its groups (reading the queries, waiting for its first group, merging its warps)
/// stays small; and at most `max_splits` (the scratch area's room for partial results). On an
/// H200 this took 0.88 to 0.99 of the time of the earlier choice, about one wave of blocks
/// (BENCHMARKS.md has the sweep).
///
/// `KIVI_CUDA_SPLITS=N` asks for N splits instead (still at most `max_splits` and
/// `max_groups`), for measuring this choice.
pub(crate) fn mma_splits(
    max_groups: usize,
    blocks_per_split: usize,
    slots: usize,
    max_splits: usize,
) -> (usize, usize) {
    const WAVES: usize = 4;
    const MIN_GROUPS: usize = 16;
    static FORCED: OnceLock<Option<usize>> = OnceLock::new();
    if max_groups == 0 {
        return (1, 0);
    }
    let forced = *FORCED.get_or_init(|| std::env::var("KIVI_CUDA_SPLITS").ok().and_then(|v| v.parse().ok()));
    let n = forced.unwrap_or_else(|| (WAVES * slots).div_ceil(blocks_per_split.max(1)).min(max_groups / MIN_GROUPS));
    let n = n.clamp(1, max_splits.clamp(1, max_groups));
    let ups = max_groups.div_ceil(n);
    (ups, max_groups.div_ceil(ups))
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
