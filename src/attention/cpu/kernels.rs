//! The fused kernels, written once over [`Simd`] and instantiated per instruction set.
//!
//! One work item is up to [`NH_MAX`] query vectors of one KV head: query heads of its GQA group,
//! of one query row or (for chunks of queries) of several rows, each vector with its own visible
//! range, over a range of the context. Each quantized group is read once for all of those
//! vectors:
//!
//! - keys (per channel): the group's scales are folded into the queries (`q'[h][c] = q[h][c]
//!   s[c]`) and its zeros into one bias per head (`sum_c q[h][c] z[c]`); then for each channel the
//!   codes of `L` tokens are unpacked to f32 once and multiplied into the scores of every head;
//! - keys per token (the paper's baseline): each token's row is dequantized in registers as values
//!   are, multiplied lane-wise into every head, and the lane sums of `L` tokens reduced at once;
//! - values (per token): `L` channels of one token are unpacked and dequantized in registers
//!   (`code * s + z`, once for all heads; for 2- and 4-bit codes the permute that converts codes
//!   reads them from a table of the group's dequantized values) and accumulated into every head's
//!   output with its softmax weight. Folding the zeros out instead (`sum_t p_t z_t` apart) would
//!   cancel against the codes term and lose precision over long contexts.
//!
//! The softmax is online, one step per 128 tokens, with a vector `exp`. Groups of one head are
//! prefetched eight ahead (with one group per page they are a page apart). Full-precision rows
//! (sinks, window, new tokens) are prefetched too when they come from memory (decode, where one
//! item reads them): keys [`FP_AHEAD`] rows ahead (a block's first rows by its caller), and each
//! value row while its key row is scored, so that the value pass, which walks all of a block's
//! rows at once, finds them in cache.

use super::simd::{exp, Simd};
use crate::attention::Resolved;
use crate::config::{DType, KeyMode};
use crate::layout::Layout;
use crate::quant::read_f16;
use crate::rows::Element;

/// Query heads one work item carries at most (accumulators stay in registers).
pub(crate) const NH_MAX: usize = 8;
/// Full-precision tokens per softmax block.
pub(crate) const FPB: usize = 32;
/// Groups ahead whose bytes are prefetched.
const PREFETCH: usize = 8;
/// Full-precision key rows ahead whose bytes are prefetched.
pub(crate) const FP_AHEAD: usize = 8;

/// Per-thread working memory, sized once for a layout.
pub(crate) struct Scratch {
    hd: usize,
    /// Queries in f32, `[NH_MAX][hd]`.
    pub qf: Vec<f32>,
    /// Running output, `[NH_MAX][hd]` (unnormalised).
    pub acc: Vec<f32>,
    pub m: [f32; NH_MAX],
    pub l: [f32; NH_MAX],
    /// Visible positions `lo[v]..hi[v]` of each query vector.
    pub lo: [usize; NH_MAX],
    pub hi: [usize; NH_MAX],
    /// Queries times key scales, `[NH_MAX][hd]`.
    qs: Vec<f32>,
    /// Scores, then weights: `[NH_MAX][sc_stride]`.
    sc: Vec<f32>,
    sc_stride: usize,
    /// Value scales and zeros of one group in f32, `[G][head_dim / value_group]`.
    vs: Vec<f32>,
    vz: Vec<f32>,
    /// Lane-wise dot products of full-precision tokens, `[NH_MAX][FPB + 16][16]` at most.
    red: Vec<f32>,
}

impl Scratch {
    pub fn new(hd: usize, group: usize, row_groups: usize) -> Scratch {
        let sc_stride = (group * groups_per_step(group)).max(FPB).next_multiple_of(16);
        Scratch {
            hd,
            qf: vec![0.0; NH_MAX * hd],
            acc: vec![0.0; NH_MAX * hd],
            m: [f32::NEG_INFINITY; NH_MAX],
            l: [0.0; NH_MAX],
            lo: [0; NH_MAX],
            hi: [usize::MAX; NH_MAX],
            qs: vec![0.0; NH_MAX * hd],
            sc: vec![0.0; NH_MAX * sc_stride],
            sc_stride,
            vs: vec![0.0; group * row_groups + 16],
            vz: vec![0.0; group * row_groups + 16],
            red: vec![0.0; NH_MAX * (FPB + 16) * 16],
        }
    }

    /// Loads the queries of `nh` vectors (`q`: `nh * hd` elements), each seeing every position,
    /// and resets the softmax state.
    pub fn start<T: Element>(&mut self, q: &[T], nh: usize) {
        self.load(0, q, nh);
        self.reset(nh);
    }

    /// Loads query vectors `v0..v0 + n` (`q`: `n * hd` elements).
    pub fn load<T: Element>(&mut self, v0: usize, q: &[T], n: usize) {
        let (a, b) = (v0 * self.hd, (v0 + n) * self.hd);
        for (d, x) in self.qf[a..b].iter_mut().zip(&q[..b - a]) {
            *d = x.to_f32();
        }
    }

    /// Resets the softmax state of `nh` vectors and lets them see every position.
    pub fn reset(&mut self, nh: usize) {
        self.acc[..nh * self.hd].fill(0.0);
        self.m = [f32::NEG_INFINITY; NH_MAX];
        self.l = [0.0; NH_MAX];
        self.lo = [0; NH_MAX];
        self.hi = [usize::MAX; NH_MAX];
    }
}

/// One item's range of quantized groups in one stream.
pub(crate) struct QArgs<'a> {
    pub lay: &'a Layout,
    /// The page pool of the layer and the stream's block table.
    pub pool: &'a [u8],
    pub blocks: &'a [u32],
    pub kvh: usize,
    /// Groups `g0..g1`.
    pub g0: usize,
    pub g1: usize,
    /// Query vectors (their visible ranges: `Scratch::lo`, `Scratch::hi`).
    pub nh: usize,
    pub o: Resolved,
}

/// Runs `$e` with `$N` a `const usize` equal to `$n` (1..=8).
macro_rules! with_nh {
    ($n:expr, $N:ident => $e:expr) => {
        match $n {
            1 => {
                const $N: usize = 1;
                $e
            }
            2 => {
                const $N: usize = 2;
                $e
            }
            3 => {
                const $N: usize = 3;
                $e
            }
            4 => {
                const $N: usize = 4;
                $e
            }
            5 => {
                const $N: usize = 5;
                $e
            }
            6 => {
                const $N: usize = 6;
                $e
            }
            7 => {
                const $N: usize = 7;
                $e
            }
            _ => {
                const $N: usize = 8;
                $e
            }
        }
    };
}

/// Runs `$e` with `$B` a `const u32` equal to `$b` (2, 4 or 8).
macro_rules! with_bits {
    ($b:expr, $B:ident => $e:expr) => {
        match $b {
            2 => {
                const $B: u32 = 2;
                $e
            }
            4 => {
                const $B: u32 = 4;
                $e
            }
            _ => {
                const $B: u32 = 8;
                $e
            }
        }
    };
}

/// Whether the vector kernels of `L` lanes handle this layout (the scalar path does the rest).
pub(crate) fn supports(lay: &Layout, lanes: usize) -> bool {
    lay.head_dim % lanes == 0 && lay.group % lanes == 0 && lay.vgroup % lanes == 0
}

#[inline(always)]
unsafe fn load_x<S: Simd, X: Element>(p: *const X) -> S::V {
    match X::DTYPE {
        DType::F32 => S::load(p as *const f32),
        DType::F16 => S::load_f16(p as *const u16),
        DType::BF16 => S::load_bf16(p as *const u16),
    }
}

/// `L` key codes, unpacked the cheapest way for `shared` (several query vectors) or not.
#[inline(always)]
unsafe fn unpack<S: Simd, const KB: u32>(p: *const u8, shared: bool) -> S::V {
    if shared {
        S::codes_shared::<KB>(p)
    } else {
        S::codes::<KB>(p)
    }
}

/// The `TT` tiles of `L` key codes at `p` (tiles `tile_bytes` apart), unpacked as [`unpack`]
/// does, two at a time.
#[inline(always)]
unsafe fn unpack_tiles<S: Simd, const KB: u32, const TT: usize>(
    p: *const u8,
    tile_bytes: usize,
    shared: bool,
) -> [S::V; TT] {
    debug_assert_eq!(tile_bytes, S::L * KB as usize / 8);
    let mut v = [S::zero(); TT];
    if TT == 2 {
        let [a, b] = if shared { S::codes_shared2::<KB>(p) } else { S::codes2::<KB>(p) };
        (v[0], v[TT - 1]) = (a, b);
    } else {
        for (k, v) in v.iter_mut().enumerate() {
            *v = unpack::<S, KB>(p.add(k * tile_bytes), shared);
        }
    }
    v
}

/// `out[h * os + t] = sum_c qs[h * hd + c] * code[c][t]` for the `g` tokens of one per-channel
/// key group (`code[c]` is a run of `run` bytes); `TT` tiles of `L` tokens at once; codes
/// unpacked by [`Simd::codes_shared`] when `shared`.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[inline(always)]
unsafe fn key_scores<S: Simd, const NH: usize, const KB: u32, const TT: usize>(
    codes: *const u8,
    run: usize,
    hd: usize,
    g: usize,
    qs: *const f32,
    out: *mut f32,
    os: usize,
    shared: bool,
) {
    let tile_bytes = S::L * KB as usize / 8;
    // 2-bit codes: even and odd channels accumulate apart when registers allow (twice the
    // independent chains; measured slower for 4 and 8 bits, whose unpacking needs registers).
    let two = KB == 2 && 4 * NH * TT <= S::ACC_REGS * 2 && hd % 2 == 0;
    let mut t0 = 0;
    while t0 < g {
        let mut acc = [[S::zero(); NH]; TT];
        let mut acc2 = [[S::zero(); NH]; TT];
        let base = codes.add(t0 * KB as usize / 8);
        let step = if two { 2 } else { 1 };
        let mut c = 0;
        while c < hd {
            let v = unpack_tiles::<S, KB, TT>(base.add(c * run), tile_bytes, shared);
            for h in 0..NH {
                let q = S::splat(*qs.add(h * hd + c));
                for k in 0..TT {
                    acc[k][h] = S::fma(q, v[k], acc[k][h]);
                }
            }
            if two {
                let v = unpack_tiles::<S, KB, TT>(base.add((c + 1) * run), tile_bytes, shared);
                for h in 0..NH {
                    let q = S::splat(*qs.add(h * hd + c + 1));
                    for k in 0..TT {
                        acc2[k][h] = S::fma(q, v[k], acc2[k][h]);
                    }
                }
            }
            c += step;
        }
        for k in 0..TT {
            for h in 0..NH {
                S::store(out.add(h * os + t0 + k * S::L), S::add(acc[k][h], acc2[k][h]));
            }
        }
        t0 += TT * S::L;
    }
}

/// Keys per token (the paper's baseline): `out[h * os + t] = sum_c qf[h * hd + c] * (code[t][c] *
/// ks[t][c / vg] + kz[t][c / vg])` for the `g` tokens of one group (rows of `krun` bytes). Each
/// row is dequantized in registers as values are, multiplied lane-wise into every head, and `L`
/// tokens' lane sums are reduced at once through `red` (`[NH][FPB][L]`).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline(always)]
unsafe fn key_scores_tok<S: Simd, const NH: usize, const KB: u32>(
    codes: *const u8,
    krun: usize,
    (hd, vg, ng): (usize, usize, usize),
    g: usize,
    (ks, kz): (*const f32, *const f32),
    qf: *const f32,
    red: *mut f32,
    out: *mut f32,
    os: usize,
) {
    for t0 in (0..g).step_by(S::L) {
        for j in 0..S::L {
            let t = t0 + j;
            let row = codes.add(t * krun);
            let mut a = [S::zero(); NH];
            let mut d = S::deq_prep::<KB>(*ks.add(t * ng), *kz.add(t * ng));
            for c in (0..hd).step_by(S::L) {
                if c > 0 && c % vg == 0 {
                    let i = t * ng + c / vg;
                    d = S::deq_prep::<KB>(*ks.add(i), *kz.add(i));
                }
                let k = S::codes_deq::<KB>(row.add(c * KB as usize / 8), d);
                for h in 0..NH {
                    a[h] = S::fma(S::load(qf.add(h * hd + c)), k, a[h]);
                }
            }
            for h in 0..NH {
                S::store(red.add((h * FPB + j) * S::L), a[h]);
            }
        }
        for h in 0..NH {
            S::reduce_rows(red.add(h * FPB * S::L), out.add(h * os + t0));
        }
    }
}

/// `n` f16 scales and zeros at `sb`, `zb` widened into `vs`, `vz`.
#[inline(always)]
unsafe fn widen_params<S: Simd>(sb: *const u16, zb: *const u16, n: usize, vs: &mut [f32], vz: &mut [f32]) {
    let mut i = 0;
    while i + S::L <= n {
        S::store(vs.as_mut_ptr().add(i), S::load_f16(sb.add(i)));
        S::store(vz.as_mut_ptr().add(i), S::load_f16(zb.add(i)));
        i += S::L;
    }
    let sb = std::slice::from_raw_parts(sb as *const u8, 2 * n);
    let zb = std::slice::from_raw_parts(zb as *const u8, 2 * n);
    for i in i..n {
        vs[i] = read_f16(sb, i).to_f32();
        vz[i] = read_f16(zb, i).to_f32();
    }
}

/// `acc[h * hd + c] += sum_t w[h * ws + t] * (code[t][c] * vs[t][c / vg] + vz[t][c / vg])` for the
/// `g` tokens of one group of per-token value codes (rows of `vrun` bytes); `CT` tiles of `L`
/// channels at once.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline(always)]
unsafe fn value_acc<S: Simd, const NH: usize, const VB: u32, const CT: usize>(
    codes: *const u8,
    vrun: usize,
    (hd, vg, ng): (usize, usize, usize),
    g: usize,
    vs: *const f32,
    vz: *const f32,
    w: *const f32,
    ws: usize,
    acc: *mut f32,
) {
    let mut c0 = 0;
    while c0 < hd {
        let mut a = [[S::zero(); NH]; CT];
        for (k, a) in a.iter_mut().enumerate() {
            for (h, a) in a.iter_mut().enumerate() {
                *a = S::load(acc.add(h * hd + c0 + k * S::L));
            }
        }
        let base = codes.add(c0 * VB as usize / 8);
        let mut cg = [0usize; CT];
        for (k, cg) in cg.iter_mut().enumerate() {
            *cg = (c0 + k * S::L) / vg;
        }
        // 2-bit codes: even and odd tokens accumulate apart when registers allow (as above).
        let two = VB == 2 && 4 * NH * CT <= S::ACC_REGS * 2 && g % 2 == 0;
        let mut a2 = [[S::zero(); NH]; CT];
        // All CT tiles in one value group: one dequantization table per token.
        let one = vg % (CT * S::L) == 0;
        let mut t = 0;
        while t < g {
            let mut v = [S::zero(); CT];
            deq_tiles::<S, VB, CT>(base, t, vrun, ng, &cg, one, vs, vz, &mut v);
            for h in 0..NH {
                let p = S::splat(*w.add(h * ws + t));
                for k in 0..CT {
                    a[k][h] = S::fma(p, v[k], a[k][h]);
                }
            }
            if two {
                let t = t + 1;
                deq_tiles::<S, VB, CT>(base, t, vrun, ng, &cg, one, vs, vz, &mut v);
                for h in 0..NH {
                    let p = S::splat(*w.add(h * ws + t));
                    for k in 0..CT {
                        a2[k][h] = S::fma(p, v[k], a2[k][h]);
                    }
                }
            }
            t += if two { 2 } else { 1 };
        }
        for k in 0..CT {
            for h in 0..NH {
                a[k][h] = S::add(a[k][h], a2[k][h]);
            }
        }
        for (k, a) in a.iter().enumerate() {
            for (h, &a) in a.iter().enumerate() {
                S::store(acc.add(h * hd + c0 + k * S::L), a);
            }
        }
        c0 += CT * S::L;
    }
}

/// The `CT` tiles of token `t`'s value codes at `base`, dequantized (`one`: all in value group
/// `cg[0]`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn deq_tiles<S: Simd, const VB: u32, const CT: usize>(
    base: *const u8,
    t: usize,
    vrun: usize,
    ng: usize,
    cg: &[usize; CT],
    one: bool,
    vs: *const f32,
    vz: *const f32,
    v: &mut [S::V; CT],
) {
    let d0 = S::deq_prep::<VB>(*vs.add(t * ng + cg[0]), *vz.add(t * ng + cg[0]));
    if one && CT == 2 {
        let [a, b] = S::codes_deq2::<VB>(base.add(t * vrun), d0);
        (v[0], v[CT - 1]) = (a, b);
        return;
    }
    for (k, v) in v.iter_mut().enumerate() {
        let d = if one || k == 0 { d0 } else { S::deq_prep::<VB>(*vs.add(t * ng + cg[k]), *vz.add(t * ng + cg[k])) };
        *v = S::codes_deq::<VB>(base.add(t * vrun + k * S::L * VB as usize / 8), d);
    }
}

/// Online softmax over one block: row `h` of `sc` (logits, `-inf` where masked, `npad` of them, a
/// multiple of `L`) becomes weights relative to the running maximum `m[h]`; `acc` rows are
/// rescaled when a maximum grows and `l[h]` gathers the weights.
#[inline(always)]
unsafe fn softmax<S: Simd>(s: &mut Scratch, nh: usize, npad: usize) {
    let hd = s.hd;
    for h in 0..nh {
        let row = s.sc.as_mut_ptr().add(h * s.sc_stride);
        let mut mx = S::splat(f32::NEG_INFINITY);
        for i in (0..npad).step_by(S::L) {
            mx = S::max(mx, S::load(row.add(i)));
        }
        let bm = S::hmax(mx);
        if bm == f32::NEG_INFINITY {
            for i in (0..npad).step_by(S::L) {
                S::store(row.add(i), S::zero());
            }
            continue;
        }
        if bm > s.m[h] {
            let corr = (s.m[h] - bm).exp();
            let cv = S::splat(corr);
            let a = s.acc.as_mut_ptr().add(h * hd);
            for c in (0..hd).step_by(S::L) {
                S::store(a.add(c), S::mul(S::load(a.add(c)), cv));
            }
            s.l[h] *= corr;
            s.m[h] = bm;
        }
        let neg_m = S::splat(-s.m[h]);
        let mut sum = S::zero();
        for i in (0..npad).step_by(S::L) {
            let e = exp::<S>(S::add(S::load(row.add(i)), neg_m));
            S::store(row.add(i), e);
            sum = S::add(sum, e);
        }
        s.l[h] += S::hsum(sum);
    }
}

/// Scores of positions `p0..p0 + row.len()` outside `lo..hi` to -inf.
#[inline(always)]
fn mask(row: &mut [f32], p0: usize, lo: usize, hi: usize) {
    if p0 < lo || p0 + row.len() > hi {
        for (t, x) in row.iter_mut().enumerate() {
            if p0 + t < lo || p0 + t >= hi {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Softcap (scalar: only Gemma 2 uses it).
#[inline(always)]
fn softcap(row: &mut [f32], cap: f32) {
    for x in row {
        *x = cap * (*x / cap).tanh();
    }
}

/// Tiles of `L` lanes taken at once along a run of `n` (tokens of a group, channels of a row) for
/// `nh` query vectors: 2 where `n` allows it and the accumulators fit in registers.
#[inline(always)]
fn tiles<S: Simd>(n: usize, nh: usize) -> usize {
    if n % (2 * S::L) == 0 && 2 * nh <= S::ACC_REGS {
        2
    } else {
        1
    }
}

/// Groups scored per softmax step (about 128 tokens): fewer horizontal reductions and rescales.
pub(crate) fn groups_per_step(group: usize) -> usize {
    (128 / group).max(1)
}

/// The quantized groups `a.g0..a.g1` of one work item: the item's queries are in `s.qf`, its
/// state in `s.acc`, `s.m`, `s.l`.
#[inline(always)]
pub(crate) unsafe fn quant<S: Simd>(a: &QArgs, s: &mut Scratch) {
    let lay = a.lay;
    let (g, hd, nh) = (lay.group, lay.head_dim, a.nh);
    let (ng, vg) = (lay.row_groups(), lay.vgroup);
    let run = lay.k_run_bytes();
    let vrun = lay.v_row_bytes();
    let per_token = lay.key_mode == KeyMode::PerToken;
    let kb = lay.key_bits as usize;
    // Key scales (and zeros) per group: one per channel, or one per token and channel group.
    let kpar = if per_token { g * ng } else { hd };
    let (tt, ct) = (tiles::<S>(g, nh), tiles::<S>(hd, nh));
    let scale = a.o.scale;
    let sst = s.sc_stride;
    let step = groups_per_step(g);
    // Key codes unpacked once for several query vectors, the CPU's cheaper way for that.
    let shared = nh > 1 && S::shared_codes_pay();
    debug_assert!(step * g <= sst);
    // Where group `gr` of this head lives: its head block and its index in the page.
    let locate = |gr: usize| {
        let page = a.blocks[gr / lay.groups_per_page] as usize;
        (a.pool.as_ptr().add(page * lay.page_bytes + a.kvh * lay.head_bytes), gr % lay.groups_per_page)
    };
    // Everything one group reads: (offset, bytes) inside its head block.
    let parts = |gi: usize| {
        [
            (lay.k_codes + gi * hd * g * kb / 8, hd * g * kb / 8),
            (lay.k_scale + 2 * gi * kpar, 2 * kpar),
            (lay.k_zero + 2 * gi * kpar, 2 * kpar),
            (lay.v_codes + gi * g * vrun, g * vrun),
            (lay.v_scale + 2 * gi * g * ng, 2 * g * ng),
            (lay.v_zero + 2 * gi * g * ng, 2 * g * ng),
        ]
    };
    let mut g0 = a.g0;
    while g0 < a.g1 {
        let g1 = (g0 + step).min(a.g1);
        // Scores of every token of these groups for every head.
        for gr in g0..g1 {
            let (blk, gi) = locate(gr);
            // Groups of one head may be a page apart: too far for the hardware prefetcher.
            if gr + PREFETCH < a.g1 {
                let (nb, ngi) = locate(gr + PREFETCH);
                for (off, len) in parts(ngi) {
                    for o in (off..off + len).step_by(64) {
                        S::prefetch(nb.add(o));
                    }
                }
            }
            let codes = blk.add(lay.k_codes + gi * hd * g * kb / 8);
            let off = (gr - g0) * g;
            let sc = s.sc.as_mut_ptr().add(off);
            let mut bias = [S::zero(); NH_MAX];
            if per_token {
                let ks = blk.add(lay.k_scale + 2 * gi * kpar) as *const u16;
                let kz = blk.add(lay.k_zero + 2 * gi * kpar) as *const u16;
                widen_params::<S>(ks, kz, kpar, &mut s.vs, &mut s.vz);
                let (kp, qf, red) = ((s.vs.as_ptr(), s.vz.as_ptr()), s.qf.as_ptr(), s.red.as_mut_ptr());
                with_nh!(nh, NH => with_bits!(lay.key_bits, KB => {
                    key_scores_tok::<S, NH, KB>(codes, run, (hd, vg, ng), g, kp, qf, red, sc, sst)
                }));
            } else {
                // Fold the key scales into the queries and the zeros into one bias per head.
                let ks = blk.add(lay.k_scale + 2 * gi * hd) as *const u16;
                let kz = blk.add(lay.k_zero + 2 * gi * hd) as *const u16;
                for c in (0..hd).step_by(S::L) {
                    let (sv, zv) = (S::load_f16(ks.add(c)), S::load_f16(kz.add(c)));
                    for (h, b) in bias.iter_mut().enumerate().take(nh) {
                        let q = S::load(s.qf.as_ptr().add(h * hd + c));
                        S::store(s.qs.as_mut_ptr().add(h * hd + c), S::mul(q, sv));
                        *b = S::fma(q, zv, *b);
                    }
                }
                let qs = s.qs.as_ptr();
                with_nh!(nh, NH => with_bits!(lay.key_bits, KB => if tt == 2 {
                    key_scores::<S, NH, KB, 2>(codes, run, hd, g, qs, sc, sst, shared)
                } else {
                    key_scores::<S, NH, KB, 1>(codes, run, hd, g, qs, sc, sst, shared)
                }));
            }
            // Logits, masked outside the visible range.
            let p0 = lay.sinks + gr * g;
            for (h, &b) in bias.iter().enumerate().take(nh) {
                let row = sc.add(h * sst);
                let bv = S::splat(S::hsum(b) * scale);
                let sv = S::splat(scale);
                for t in (0..g).step_by(S::L) {
                    S::store(row.add(t), S::fma(S::load(row.add(t)), sv, bv));
                }
                let row = std::slice::from_raw_parts_mut(row, g);
                if a.o.softcap > 0.0 {
                    softcap(row, a.o.softcap);
                }
                mask(row, p0, s.lo[h], s.hi[h]);
            }
        }
        softmax::<S>(s, nh, (g1 - g0) * g);
        // Values.
        for gr in g0..g1 {
            let (blk, gi) = locate(gr);
            let vsb = blk.add(lay.v_scale + 2 * gi * g * ng) as *const u16;
            let vzb = blk.add(lay.v_zero + 2 * gi * g * ng) as *const u16;
            widen_params::<S>(vsb, vzb, g * ng, &mut s.vs, &mut s.vz);
            let vcodes = blk.add(lay.v_codes + gi * g * vrun);
            let w = s.sc.as_ptr().add((gr - g0) * g);
            let (vs, vz, acc) = (s.vs.as_ptr(), s.vz.as_ptr(), s.acc.as_mut_ptr());
            with_nh!(nh, NH => with_bits!(lay.value_bits, VB => if ct == 2 {
                value_acc::<S, NH, VB, 2>(vcodes, vrun, (hd, vg, ng), g, vs, vz, w, sst, acc)
            } else {
                value_acc::<S, NH, VB, 1>(vcodes, vrun, (hd, vg, ng), g, vs, vz, w, sst, acc)
            }));
        }
        g0 = g1;
    }
}

/// One block of at most [`FPB`] full-precision tokens (key and value rows of `hd` elements) at
/// positions `p0..`, for the item whose queries are in `s.qf` (each vector masked outside its
/// visible range). With `prefetch`, the rows come from memory and are fetched ahead.
#[inline(always)]
pub(crate) unsafe fn fp<S: Simd, X: Element>(
    kp: &[*const X],
    vp: &[*const X],
    p0: usize,
    nh: usize,
    o: &Resolved,
    s: &mut Scratch,
    prefetch: bool,
) {
    let n = kp.len();
    debug_assert!(n <= FPB && vp.len() == n && n > 0);
    let hd = s.hd;
    let sst = s.sc_stride;
    let npad = n.next_multiple_of(S::L);
    let (qf, sc) = (s.qf.as_ptr(), s.sc.as_mut_ptr());
    // Each token's per-head products stay lane-wise in `red`; rows of L are then summed at once.
    let red = s.red.as_mut_ptr();
    with_nh!(nh, NH => {
        for (j, &k) in kp.iter().enumerate() {
            if prefetch {
                // Rows read once, from memory: keys a few rows ahead, and this token's value row
                // for the value pass, which walks all of the block's rows at once.
                for line in (0..hd * X::DTYPE.size()).step_by(64) {
                    if let Some(&kn) = kp.get(j + FP_AHEAD) {
                        S::prefetch((kn as *const u8).add(line));
                    }
                    S::prefetch((vp[j] as *const u8).add(line));
                }
            }
            let mut a = [S::zero(); NH];
            for c in (0..hd).step_by(S::L) {
                let kv = load_x::<S, X>(k.add(c));
                for (h, a) in a.iter_mut().enumerate() {
                    *a = S::fma(S::load(qf.add(h * hd + c)), kv, *a);
                }
            }
            for (h, &a) in a.iter().enumerate() {
                S::store(red.add((h * FPB + j) * S::L), a);
            }
        }
    });
    let sv = S::splat(o.scale);
    for h in 0..nh {
        for j0 in (0..n).step_by(S::L) {
            let out = sc.add(h * sst + j0);
            S::reduce_rows(red.add((h * FPB + j0) * S::L), out);
            S::store(out, S::mul(S::load(out), sv));
        }
        let row = std::slice::from_raw_parts_mut(sc.add(h * sst), npad);
        if o.softcap > 0.0 {
            softcap(&mut row[..n], o.softcap);
        }
        mask(&mut row[..n], p0, s.lo[h], s.hi[h]);
        row[n..].fill(f32::NEG_INFINITY);
    }
    softmax::<S>(s, nh, npad);
    let (w, acc) = (s.sc.as_ptr(), s.acc.as_mut_ptr());
    with_nh!(nh, NH => {
        if tiles::<S>(hd, NH) == 2 {
            fp_values::<S, X, NH, 2>(vp, hd, w, sst, acc)
        } else {
            fp_values::<S, X, NH, 1>(vp, hd, w, sst, acc)
        }
    });
}

/// `acc[h * hd + c] += sum_j w[h * ws + j] * v[j][c]` over a block's full-precision value rows:
/// `CT` tiles of `L` channels at once, and even and odd rows into separate accumulators when
/// registers allow, so that enough independent FMA chains are in flight (as in [`value_acc`]).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn fp_values<S: Simd, X: Element, const NH: usize, const CT: usize>(
    vp: &[*const X],
    hd: usize,
    w: *const f32,
    ws: usize,
    acc: *mut f32,
) {
    let n = vp.len();
    let two = 2 * NH * CT <= S::ACC_REGS;
    let mut c0 = 0;
    while c0 < hd {
        let mut a = [[S::zero(); NH]; CT];
        let mut a2 = [[S::zero(); NH]; CT];
        for k in 0..CT {
            for h in 0..NH {
                a[k][h] = S::load(acc.add(h * hd + c0 + k * S::L));
            }
        }
        let mut j = 0;
        while j < n {
            let mut x = [S::zero(); CT];
            for k in 0..CT {
                x[k] = load_x::<S, X>(vp[j].add(c0 + k * S::L));
            }
            for h in 0..NH {
                let p = S::splat(*w.add(h * ws + j));
                for k in 0..CT {
                    a[k][h] = S::fma(p, x[k], a[k][h]);
                }
            }
            if two && j + 1 < n {
                let j = j + 1;
                for k in 0..CT {
                    x[k] = load_x::<S, X>(vp[j].add(c0 + k * S::L));
                }
                for h in 0..NH {
                    let p = S::splat(*w.add(h * ws + j));
                    for k in 0..CT {
                        a2[k][h] = S::fma(p, x[k], a2[k][h]);
                    }
                }
            }
            j += if two { 2 } else { 1 };
        }
        for k in 0..CT {
            for h in 0..NH {
                S::store(acc.add(h * hd + c0 + k * S::L), S::add(a[k][h], a2[k][h]));
            }
        }
        c0 += CT * S::L;
    }
}
