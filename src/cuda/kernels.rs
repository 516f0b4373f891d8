//! The CUDA kernels: their sources (embedded from `cuda/`), the macros that specialise them to one
//! cache configuration, and their compilation with NVRTC.
//!
//! Every kernel family is one `.cu` file; shared code lives in `.cuh` files, inlined here before
//! compilation so NVRTC needs no include path. The kernels include no CUDA header either, so an
//! NVRTC library is all that compiling them takes: no GPU, no driver, no toolkit.

use std::ffi::CString;

use super::nvrtc_lib;
use crate::config::{CacheConfig, DType, KeyMode, Rounding};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::quant::LSQ_SPANS;

const PTX: &str = include_str!("../../cuda/ptx.cuh");
const COMMON: &str = include_str!("../../cuda/common.cuh");
const ATTN: &str = include_str!("../../cuda/attn.cuh");
const DECODE_MMA: &str = include_str!("../../cuda/decode_mma.cuh");
const PREFILL_MMA: &str = include_str!("../../cuda/prefill_mma.cuh");
const QUANT: &str = include_str!("../../cuda/quant.cuh");
const QUANTIZE: &str = include_str!("../../cuda/quantize.cu");
const DECODE: &str = include_str!("../../cuda/decode.cu");
const PREFILL: &str = include_str!("../../cuda/prefill.cu");

/// A kernel family: one `.cu` file, one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `quantize.cu`: window writes, group quantization, block-table updates, truncation.
    Quantize,
    /// `decode.cu`: one query row per sequence, many sequences.
    Decode,
    /// `prefill.cu`: a chunk of query rows of one sequence.
    Prefill,
}

impl Family {
    pub const ALL: [Family; 3] = [Family::Quantize, Family::Decode, Family::Prefill];

    pub fn file(self) -> &'static str {
        match self {
            Family::Quantize => "quantize.cu",
            Family::Decode => "decode.cu",
            Family::Prefill => "prefill.cu",
        }
    }

    /// The kernels of the module that the host launches, by name (the decode module also has
    /// `kv_decode_mma` where the layout allows it: [`tensor_core_decode`]). Attention modules:
    /// the blocks, then the combine. Quantize: the block-table update, the quantization, the
    /// window write, the copy back to full precision.
    pub fn entries(self) -> &'static [&'static str] {
        match self {
            Family::Quantize => &["kv_set_blocks", "kv_quantize", "kv_window_write", "kv_unquantize"],
            Family::Decode => &["kv_decode_attn", "kv_decode_combine"],
            Family::Prefill => &["kv_prefill_attn", "kv_prefill_combine"],
        }
    }

    /// Whether the family's kernels need `KV_NQ`.
    pub fn is_attention(self) -> bool {
        !matches!(self, Family::Quantize)
    }

    /// The family's source with its `#include "x.cuh"` lines replaced by the headers (each once).
    pub fn source(self) -> String {
        self.source_with_ptx(PTX)
    }

    /// [`Family::source`] with `ptx` in the place of `cuda/ptx.cuh` (the host simulator's C++
    /// versions of the PTX helpers).
    pub(crate) fn source_with_ptx(self, ptx: &'static str) -> String {
        let main = match self {
            Family::Quantize => QUANTIZE,
            Family::Decode => DECODE,
            Family::Prefill => PREFILL,
        };
        let mut seen = Vec::new();
        let mut out = constants();
        inline(main, ptx, &mut seen, &mut out);
        out
    }
}

/// The constants the kernels share with the Rust code, as macros at the top of every source:
/// `KV_LSQ_SPANS` (an initializer list of floats) and `KV_LSQ_N` from [`LSQ_SPANS`], so that the
/// GPU's least-squares rounding tries the same grids as the CPU's.
fn constants() -> String {
    // `{:?}` prints the shortest text that reads back as the same f32.
    let spans: Vec<String> = LSQ_SPANS.iter().map(|f| format!("{f:?}f")).collect();
    format!("#define KV_LSQ_N {}\n#define KV_LSQ_SPANS {{{}}}\n", LSQ_SPANS.len(), spans.join(", "))
}

fn inline(src: &str, ptx: &'static str, seen: &mut Vec<&'static str>, out: &mut String) {
    for line in src.lines() {
        let t = line.trim();
        if t == "#pragma once" {
            continue;
        }
        if let Some(rest) = t.strip_prefix("#include \"") {
            let name = rest.trim_end_matches('"');
            let (key, text) = match name {
                "ptx.cuh" => ("ptx.cuh", ptx),
                "common.cuh" => ("common.cuh", COMMON),
                "attn.cuh" => ("attn.cuh", ATTN),
                "decode_mma.cuh" => ("decode_mma.cuh", DECODE_MMA),
                "prefill_mma.cuh" => ("prefill_mma.cuh", PREFILL_MMA),
                "quant.cuh" => ("quant.cuh", QUANT),
                _ => panic!("unknown kernel header {name}"),
            };
            if !seen.contains(&key) {
                seen.push(key);
                inline(text, ptx, seen, out);
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
}

/// Query vectors (query heads times query rows) one attention block handles at most, for this
/// head_dim: a block keeps `nq * head_dim <= 1024` floats of queries per warp.
pub fn max_nq(head_dim: usize) -> usize {
    (1024 / head_dim).clamp(1, 16)
}

/// Shared memory a block may take without asking the driver for more: static shared memory
/// stops at 48 KB (a little under, as the kernels count it).
const MMA_STATIC_SMEM: usize = 48000;
/// The most shared memory `kv_decode_mma` asks for as dynamic shared memory: 99
/// KB, what every device of compute capability 8.0 and newer lets a block opt in to (sm_86 and
/// sm_89 allow no more; sm_80 allows 163 KB, sm_90 227 KB).
const MMA_DYNAMIC_SMEM_MAX: usize = 99 * 1024;

/// Query vectors per `kv_decode_mma` block at most for this head_dim: 8 up to head_dim 128; 4
/// above (the transposed products only: their accumulators, 2 * head_dim / 8 floats per lane,
/// are what 3 blocks per multiprocessor leave registers for).
pub fn mma_max_nq(head_dim: usize) -> usize {
    if head_dim <= 128 {
        8
    } else {
        4
    }
}

/// The bytes of `kv_decode_mma`'s shared memory for this layout: the queries (8 rows of
/// head_dim + 16 words) and the buffer (two staging buffers per warp, or the warps' merge area
/// where that is larger), then all of `MmaShared` (cuda/decode_mma.cuh): with the warps' maxima
/// and sums, the rows' ranges and a constant, 336 bytes more (the padding before the 16-byte
/// aligned buffer included).
fn mma_smem(lay: &Layout) -> (usize, usize) {
    mma_smem_padded(lay, mma_key_pad(lay))
}

/// `mma_smem` with `kpad` bytes of padding after each row of a group's staged key codes.
fn mma_smem_padded(lay: &Layout, kpad: usize) -> (usize, usize) {
    let (hd, g, ng) = (lay.head_dim, lay.group, lay.head_dim / lay.vgroup);
    let (kb, vb) = (lay.key_bits as usize, lay.value_bits as usize);
    let key_pads = if lay.k_interleave { lay.k_run_bytes() / lay.k_unit_bytes() * kpad } else { 0 };
    let stage =
        hd * g * kb / 8 + key_pads + 4 * hd + g * hd * vb / 8 + if mma_vlane(lay) { 4 * 32 } else { 0 } + 4 * g * ng;
    let buf = (2 * 4 * stage).max(4 * 8 * (hd + 4) * 4);
    let rows_and_buf = 8 * (hd + 16) * 4 + buf;
    (rows_and_buf, rows_and_buf + 336)
}

/// The padding after each row of a group's interleaved key codes as `kv_decode_mma` stages them
/// (`KV_MMA_KPAD`; a row is one unit of every channel, `Layout::k_unit_bytes`): what puts the
/// rows 16 bytes per unit byte apart modulo 128, so that the lanes of one shared-memory
/// wavefront, each reading its own row, fall on different banks. None where the key codes are
/// not interleaved, or where the padded shared memory would pass what a block may take and
/// the unpadded would not (head_dim 256 at G = 64: bank conflicts there, not CUDA cores).
fn mma_key_pad(lay: &Layout) -> usize {
    if !lay.k_interleave {
        return 0;
    }
    let row = lay.head_dim * lay.k_unit_bytes();
    let pad = (16 * lay.k_unit_bytes() + 128 - row % 128) % 128;
    let fits = |kpad| mma_smem_padded(lay, kpad).1 <= MMA_DYNAMIC_SMEM_MAX;
    if fits(pad) || !fits(0) {
        pad
    } else {
        0
    }
}

/// Whether every lane's value channels take 16, 32, 64 or 128 contiguous bits of one value group
/// (`MMA_VLANE`): value codes are then staged with 32 bytes of padding after each quarter of a
/// group's tokens, and blocks of at most 4 query vectors take the transposed products.
fn mma_vlane(lay: &Layout) -> bool {
    let nj = lay.head_dim / 8;
    matches!(nj * lay.value_bits as usize, 16 | 32 | 64 | 128) && lay.vgroup % nj == 0
}

/// Whether `kv_decode_mma` (tensor cores) exists for this layout and `nq` query heads per kv
/// head: the conditions of `KV_MMA_OK` in cuda/decode_mma.cuh.
pub(crate) fn mma_layout(lay: &Layout, nq: usize) -> bool {
    let (hd, g) = (lay.head_dim, lay.group);
    let (kb, vb) = (lay.key_bits as usize, lay.value_bits as usize);
    lay.key_mode == KeyMode::PerChannel
        && matches!(kb, 2 | 4)
        && matches!(vb, 2 | 4)
        && hd % 16 == 0
        && (hd <= 128 || (hd <= 256 && nq <= 4 && mma_vlane(lay)))
        && matches!(g, 16 | 32 | 64)
        && lay.vgroup % 8 == 0
        && nq <= 8
        && match mma_smem(lay) {
            (rows_and_buf, _) if rows_and_buf <= MMA_STATIC_SMEM => true,
            (_, all) => all <= MMA_DYNAMIC_SMEM_MAX,
        }
}

/// The dynamic shared memory `kv_decode_mma` blocks for `nq` query vectors take (`KV_MMA_DYN`):
/// 0 where its shared memory fits in the 48 KB of static shared memory, all of it where not
/// (head_dim 256; at 128, 4-bit keys, whose interleaved codes are staged with padding, and
/// groups of 64).
fn mma_dynamic_smem(lay: &Layout, nq: usize) -> usize {
    match mma_smem(lay) {
        (rows_and_buf, all) if rows_and_buf > MMA_STATIC_SMEM && mma_layout(lay, nq) => all,
        _ => 0,
    }
}

/// Whether decode steps of a cache of this configuration, with `n_q_heads` query heads, run
/// their quantized groups on tensor cores (on devices of compute capability 8.0 and newer, unless
/// `KIVI_CUDA_MMA=0`).
pub fn tensor_core_decode(cfg: &CacheConfig, n_q_heads: u32) -> bool {
    gqa_ratio(cfg, n_q_heads).is_some_and(|r| decode_mma(&Layout::new(cfg), r))
}

/// Whether attention for chunks of queries (`append_attend`, `attend`) of a cache of this
/// configuration, with `n_q_heads` query heads, runs its quantized groups on tensor cores (same
/// devices as [`tensor_core_decode`]): 8 query vectors per block, the rows of up to 8 query
/// heads (8 / heads rows); 4 above head_dim 128 ([`mma_max_nq`]).
pub fn tensor_core_chunks(cfg: &CacheConfig, n_q_heads: u32) -> bool {
    gqa_ratio(cfg, n_q_heads).is_some() && chunk_mma(&Layout::new(cfg))
}

fn gqa_ratio(cfg: &CacheConfig, n_q_heads: u32) -> Option<usize> {
    if cfg.validate().is_err() || n_q_heads == 0 || n_q_heads % cfg.n_kv_heads != 0 {
        return None;
    }
    Some((n_q_heads / cfg.n_kv_heads) as usize)
}

/// The tensor-core kernel for decode: one query row, up to 8 query heads of a kv head per block
/// (4 above head_dim 128: the decode module compiled for `ratio.min(mma_max_nq(head_dim))` query
/// vectors).
pub(crate) fn decode_mma(lay: &Layout, ratio: usize) -> bool {
    mma_layout(lay, ratio.min(mma_max_nq(lay.head_dim)))
}

/// The tensor-core kernel for chunks of queries, compiled for `mma_max_nq(head_dim)` query
/// vectors per block: 8 up to head_dim 128, 4 above.
pub(crate) fn chunk_mma(lay: &Layout) -> bool {
    mma_layout(lay, mma_max_nq(lay.head_dim))
}

/// Whether `kv_prefill_fp` and `kv_prefill_q` (cuda/prefill_mma.cuh: the full-precision tokens
/// and the quantized groups of chunks of queries, [`fp_vectors`] query vectors per block) exist
/// in the module chunks of queries launch ([`chunk_mma`]): the conditions of `KV_FP_MMA_OK`
/// there, an f16 or bf16 cache.
pub(crate) fn prefill_fp_layout(lay: &Layout) -> bool {
    matches!(lay.dtype, DType::F16 | DType::BF16) && chunk_mma(lay)
}

/// Query vectors of one `kv_prefill_fp` or `kv_prefill_q` block (`FP_VPB`): 64, 16 per warp; 32
/// above head_dim 128, where two warps take the same 16 vectors, half of the output channels
/// each (`FP_CS`).
pub(crate) fn fp_vectors(head_dim: usize) -> usize {
    if head_dim <= 128 {
        64
    } else {
        32
    }
}

/// The dynamic shared memory `kv_prefill_fp` blocks take (`KV_FP_DYN`): its two staging buffers
/// of 32 tokens' keys and values, rows of head_dim + 8 halves (`FpShared`), where they pass the
/// 48 KB of static shared memory (head_dim 256: 67584 bytes); 0 where they do not, or where the
/// layout has no `kv_prefill_fp`.
fn prefill_fp_dynamic_smem(lay: &Layout) -> usize {
    let bytes = 2 * 2 * 32 * (lay.head_dim + 8) * 2;
    match bytes > MMA_STATIC_SMEM && prefill_fp_layout(lay) {
        true => bytes,
        false => 0,
    }
}

/// The dynamic shared memory `kv_prefill_q` blocks take (`KV_PQ_DYN`): a tile of 32 tokens' keys,
/// the keys' lo parts (one row where the keys of an f16 cache are staged as codes with the
/// scales folded into the query, `PQ_FOLD`: G >= 32 and not `-DKV_PQ_FOLD=0`) and values, rows
/// of head_dim + 8 halves, the tile's key scales and zeros, and the next tile's value scales and
/// zeros (`PqShared`), where that passes the 48 KB of static shared memory (head_dim 256 without
/// `PQ_FOLD`: 51728 bytes); 0 where it does not, or where the layout has no `kv_prefill_q`.
fn prefill_q_dynamic_smem(lay: &Layout, fold_off: bool) -> usize {
    let (hd, row) = (lay.head_dim, (lay.head_dim + 8) * 2);
    let fold = !fold_off && lay.dtype == DType::F16 && lay.group >= 32;
    let value_params = 2 * 32 * (hd / lay.vgroup) * 2;
    let bytes = 2 * 32 * row + if fold { row + 2 * hd * 2 } else { 32 * row + 8 * 2 } + value_params;
    match bytes > MMA_STATIC_SMEM && prefill_fp_layout(lay) {
        true => bytes,
        false => 0,
    }
}

/// Whether chunks of queries (`append_attend`, `attend`) of a cache of this configuration, with
/// `n_q_heads` query heads, also take their full-precision tokens (sinks, window, the chunk: all
/// of a prompt) on tensor cores when they have at least 8 rows, 64 query vectors per block (32
/// above head_dim 128), and their quantized groups the same way: [`tensor_core_chunks`] of an
/// f16 or bf16 cache.
pub fn tensor_core_chunk_tokens(cfg: &CacheConfig, n_q_heads: u32) -> bool {
    gqa_ratio(cfg, n_q_heads).is_some() && prefill_fp_layout(&Layout::new(cfg))
}

/// The macros that specialise the kernels to one cache layout (and, for attention, to `nq` query
/// vectors per block), and the extra NVRTC options of `KIVI_NVRTC_OPTS` (for a cache's modules,
/// as they were when the cache was made): a module compiled with other options is another
/// module, so that caches made under different options (variants of a kernel measured side by
/// side) each keep their own, whenever they compile them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Spec {
    defines: Vec<(&'static str, u64)>,
    extra: Vec<String>,
    /// `KV_PQ_DYN` without the folded keys, for `KV_PQ_FOLD` 0 ([`Spec::with`], [`Spec::with_option`]).
    pq_unfolded: u64,
}

impl Spec {
    /// The spec of `lay` and `nq` with the extra options `KIVI_NVRTC_OPTS` holds now.
    pub(crate) fn new(lay: &Layout, nq: usize) -> Spec {
        // Extra options for investigations, e.g. KIVI_NVRTC_OPTS="--ptxas-options=-v" (NVRTC's
        // log is then printed to stderr when KIVI_CUDA_LOG is set) or a variant's macros.
        let extra = std::env::var("KIVI_NVRTC_OPTS")
            .map_or_else(|_| Vec::new(), |x| x.split_whitespace().map(str::to_string).collect());
        Spec::with_options(lay, nq, extra)
    }

    /// The spec of layout `lay` and `nq` query vectors with this one's extra options: a cache's
    /// attention modules take those of its creation (its append module's, [`Spec::new`] then).
    pub(crate) fn for_nq(&self, lay: &Layout, nq: usize) -> Spec {
        Spec::with_options(lay, nq, self.extra.clone())
    }

    fn with_options(lay: &Layout, nq: usize, extra: Vec<String>) -> Spec {
        let d = |n: &'static str, v: usize| (n, v as u64);
        let defines = vec![
            d("KV_DTYPE", lay.dtype as usize),
            d("KV_HD", lay.head_dim),
            d("KV_NKV", lay.n_kv_heads),
            d("KV_KB", lay.key_bits as usize),
            d("KV_VB", lay.value_bits as usize),
            d("KV_KEY_PER_TOKEN", (lay.key_mode == KeyMode::PerToken) as usize),
            d("KV_V_LSQ", (lay.value_rounding == Rounding::LeastSquares) as usize),
            d("KV_G", lay.group),
            d("KV_VG", lay.vgroup),
            d("KV_SINKS", lay.sinks),
            d("KV_RING", lay.ring),
            d("KV_GPP", lay.groups_per_page),
            d("KV_SEQ_PAGES", lay.seq_pages),
            d("KV_K_ILV", lay.k_interleave as usize),
            d("KV_K_CODES", lay.k_codes),
            d("KV_K_SCALE", lay.k_scale),
            d("KV_K_ZERO", lay.k_zero),
            d("KV_V_CODES", lay.v_codes),
            d("KV_V_SCALE", lay.v_scale),
            d("KV_V_ZERO", lay.v_zero),
            d("KV_HEAD_BYTES", lay.head_bytes),
            d("KV_PAGE_BYTES", lay.page_bytes),
            d("KV_WIN_HEAD", lay.window_head_elems),
            d("KV_NQ", nq),
            d("KV_MMA_DYN", mma_dynamic_smem(lay, nq)),
            d("KV_MMA_KPAD", mma_key_pad(lay)),
            d("KV_FP_DYN", prefill_fp_dynamic_smem(lay)),
            d("KV_PQ_DYN", prefill_q_dynamic_smem(lay, false)),
        ];
        // (The options pass through with_option, which follows -DKV_PQ_FOLD=0.)
        let pq_unfolded = prefill_q_dynamic_smem(lay, true) as u64;
        extra.into_iter().fold(Spec { defines, extra: Vec::new(), pq_unfolded }, |s, o| s.with_option(&o))
    }

    /// The value of macro `name`, e.g. the dynamic shared memory a kernel of the module takes
    /// (`KV_MMA_DYN`, `KV_FP_DYN`, `KV_PQ_DYN`), which its launches pass.
    pub(crate) fn define(&self, name: &str) -> Option<u64> {
        self.defines.iter().find(|(n, _)| *n == name).map(|&(_, v)| v)
    }

    /// The spec of a validated configuration.
    pub fn for_config(cfg: &CacheConfig, nq: usize) -> Result<Spec> {
        cfg.validate()?;
        Ok(Spec::new(&Layout::new(cfg), nq))
    }

    /// This spec with one more macro: a variant of a kernel for measuring it, such as
    /// `KV_MMA_BLOCKS` or `KV_MMA_STAGES` of the tensor-core decode (`cuda/decode_mma.cuh`).
    pub fn with(mut self, name: &'static str, value: u64) -> Spec {
        if name == "KV_PQ_FOLD" && value == 0 {
            // kv_prefill_q's shared memory without the folded keys.
            self.set("KV_PQ_DYN", self.pq_unfolded);
        }
        self.set(name, value);
        self
    }

    /// Sets macro `name` to `value`, in place where the spec has it.
    fn set(&mut self, name: &'static str, value: u64) {
        match self.defines.iter_mut().find(|(n, _)| *n == name) {
            Some(d) => d.1 = value,
            None => self.defines.push((name, value)),
        }
    }

    /// This spec with one more NVRTC option, e.g. `--ptxas-options=-v` for the registers and
    /// spills of each kernel in the log of [`compile_with_log`].
    pub fn with_option(mut self, option: &str) -> Spec {
        if option == "-DKV_PQ_FOLD=0" {
            self.set("KV_PQ_DYN", self.pq_unfolded);
        }
        self.extra.push(option.to_string());
        self
    }

    /// The macros and their values (the host simulator passes them to the C++ compiler).
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn defines(&self) -> &[(&'static str, u64)] {
        &self.defines
    }

    /// The macros among the extra options (`-DNAME=VALUE`), which the host simulator passes on
    /// too, so that a variant runs there as it would on a GPU.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn extra_defines(&self) -> impl Iterator<Item = &str> {
        self.extra.iter().map(String::as_str).filter(|o| o.starts_with("-D"))
    }

    fn options(&self, arch: &str) -> Vec<String> {
        let mut o = vec![format!("--gpu-architecture={arch}"), "--std=c++14".to_string()];
        for (n, v) in &self.defines {
            o.push(format!("-D{n}={v}u"));
        }
        o.extend(self.extra.iter().cloned());
        o
    }
}

/// What NVRTC produced: a cubin for a real architecture (`sm_XY`), PTX for a virtual one
/// (`compute_XY`).
#[derive(Debug, Clone)]
pub enum Image {
    Cubin(Vec<u8>),
    Ptx(Vec<u8>),
}

impl Image {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Image::Cubin(b) | Image::Ptx(b) => b,
        }
    }
}

/// Compiles one family for `arch` (`sm_90` gives a cubin, `compute_90` PTX). Errors carry
/// NVRTC's log.
pub fn compile(family: Family, spec: &Spec, arch: &str) -> Result<Image> {
    compile_with_log(family, spec, arch).map(|(image, _)| image)
}

/// [`compile`], with NVRTC's log of the successful compilation (its warnings; empty when there
/// are none).
pub fn compile_with_log(family: Family, spec: &Spec, arch: &str) -> Result<(Image, String)> {
    nvrtc_lib()?;
    let src = CString::new(family.source()).expect("kernel sources hold no NUL");
    let name = CString::new(family.file()).unwrap();
    let opts = spec.options(arch);
    let fail = |what: &str, log: String| {
        Error::BackendUnavailable(format!("NVRTC could not {what} {} for {arch}: {log}", family.file()))
    };
    use cudarc::nvrtc::result;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| fail("create", format!("{e:?}")))?;
    // SAFETY: prog was just created and is destroyed once below.
    unsafe {
        let compiled = result::compile_program(prog, &opts);
        let out = match compiled {
            Err(e) => {
                let log = result::get_program_log(prog).map(|l| c_chars(&l)).unwrap_or_default();
                Err(fail("compile", format!("{e:?}\n{log}")))
            }
            Ok(()) => {
                let log = result::get_program_log(prog).map(|l| c_chars(&l)).unwrap_or_default();
                if std::env::var_os("KIVI_CUDA_LOG").is_some() {
                    eprintln!("NVRTC {} {arch}:\n{log}", family.file());
                }
                image(prog, arch).map(|i| (i, log.trim().to_string())).map_err(|(what, e)| fail(what, e))
            }
        };
        let _ = result::destroy_program(prog);
        out
    }
}

/// The cubin (`sm_` architectures) or PTX of a compiled program; on failure what could not be
/// produced and NVRTC's result.
///
/// # Safety
/// `prog` must be a live program that compiled.
unsafe fn image(
    prog: cudarc::nvrtc::sys::nvrtcProgram,
    arch: &str,
) -> std::result::Result<Image, (&'static str, String)> {
    use cudarc::nvrtc::{result, sys};
    if arch.starts_with("sm_") {
        let mut size = 0usize;
        let r = sys::nvrtcGetCUBINSize(prog, &mut size);
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(("produce a cubin of", format!("{r:?}")));
        }
        let mut buf = vec![0u8; size];
        let r = sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _);
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(("produce a cubin of", format!("{r:?}")));
        }
        Ok(Image::Cubin(buf))
    } else {
        match result::get_ptx(prog) {
            Ok(p) => Ok(Image::Ptx(p.iter().map(|&c| c.to_ne_bytes()[0]).collect())),
            Err(e) => Err(("produce PTX of", format!("{e:?}"))),
        }
    }
}

/// [`compile`], through an on-disk cache of cubins when `KIVI_CUDA_CACHE_DIR` names a folder
/// (keyed by the source, the options, the architecture and NVRTC's version), so that a process
/// need not compile what an earlier one did.
pub fn compile_cached(family: Family, spec: &Spec, arch: &str) -> Result<Image> {
    let Some(dir) = std::env::var_os("KIVI_CUDA_CACHE_DIR") else { return compile(family, spec, arch) };
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (family.source(), spec.options(arch), arch, super::nvrtc_version()?).hash(&mut h);
    let path = std::path::Path::new(&dir).join(format!("{}-{arch}-{:016x}.cubin", family.file(), h.finish()));
    if arch.starts_with("sm_") {
        if let Ok(bytes) = std::fs::read(&path) {
            return Ok(Image::Cubin(bytes));
        }
    }
    let image = compile(family, spec, arch)?;
    if let Image::Cubin(bytes) = &image {
        let _ = std::fs::create_dir_all(&dir);
        // A file of this call's own (threads of one process may compile the same module for
        // two devices at once), renamed into place whole.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(image)
}

fn c_chars(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c.to_ne_bytes()[0]).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Configurations that exercise every branch of the kernels: KIVI-2 and KIVI-4 at head_dim 128,
/// 8-bit, per-token keys, f32 and bf16 windows, sinks, multi-group pages, odd head_dims whose
/// lanes straddle value groups, head_dim 256 on tensor cores, big groups and tiny ones.
pub fn test_configs() -> Vec<CacheConfig> {
    let mut out = Vec::new();
    let mut base = CacheConfig::new(2, 8, 128);
    base.dtype = DType::F16;
    out.push(base.clone());
    let mut c = base.clone();
    c.key_bits = 4;
    c.value_bits = 4;
    out.push(c);
    let mut c = base.clone();
    c.key_bits = 8;
    c.value_bits = 2;
    c.dtype = DType::BF16;
    c.sinks = 4;
    c.page_tokens = 128;
    out.push(c);
    let mut c = CacheConfig::new(1, 2, 64);
    c.key_mode = KeyMode::PerToken;
    c.value_group = 16;
    c.group_size = 16;
    c.residual = 32;
    c.dtype = DType::F32;
    out.push(c);
    let mut c = CacheConfig::new(1, 1, 96);
    c.group_size = 64;
    c.value_group = 32;
    c.key_bits = 4;
    c.dtype = DType::F32;
    c.sinks = 3;
    out.push(c);
    // G = 48 with 2- and 4-bit codes: not on tensor cores (KV_MMA_OK and mma_layout agree).
    let mut c = CacheConfig::new(1, 2, 128);
    c.group_size = 48;
    c.residual = 96;
    c.key_bits = 4;
    c.dtype = DType::F16;
    out.push(c);
    let mut c = CacheConfig::new(1, 4, 8);
    c.group_size = 8;
    c.value_group = 2;
    c.residual = 0;
    c.key_mode = KeyMode::PerToken;
    out.push(c);
    // head_dim 256 (Gemma): the tensor-core decode with dynamic shared memory, 2 and 4 bits,
    // a bf16 cache with value groups of 64 channels.
    let mut c = CacheConfig::new(1, 1, 256);
    c.dtype = DType::F16;
    out.push(c.clone());
    c.key_bits = 4;
    c.value_bits = 4;
    c.value_group = 64;
    c.dtype = DType::BF16;
    out.push(c);
    let mut c = CacheConfig::new(1, 1, 1024);
    c.group_size = 256;
    c.residual = 256;
    c.value_group = 1024;
    c.key_bits = 8;
    c.value_bits = 8;
    c.dtype = DType::BF16;
    out.push(c);
    out
}

/// Compiles every family for every configuration of [`test_configs`] (attention at one query
/// vector per block and at the most) for `arch`; returns how many modules were compiled. A
/// warning in NVRTC's log is an error, as a failed compilation is.
pub fn compile_all(arch: &str) -> Result<usize> {
    let mut n = 0;
    for cfg in test_configs() {
        let hd = cfg.head_dim as usize;
        for family in Family::ALL {
            let nqs: &[usize] = if family.is_attention() { &[1, max_nq(hd)] } else { &[1] };
            for &nq in nqs {
                let spec = Spec::for_config(&cfg, nq)?;
                let context = |m: String| Error::BackendUnavailable(format!("{m}\nconfig: {cfg:?}, nq {nq}"));
                let (_, log) = compile_with_log(family, &spec, arch).map_err(|e| match e {
                    Error::BackendUnavailable(m) => context(m),
                    e => e,
                })?;
                if log.contains("warning") {
                    return Err(context(format!("NVRTC warned about {} for {arch}:\n{log}", family.file())));
                }
                n += 1;
            }
        }
    }
    Ok(n)
}
