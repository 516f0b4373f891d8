//! The CUDA-core kernels re-written in Rust, one to one, run on host memory: with
//! [`CudaCache::emulated`] every host-side decision (plans, kernel parameters, launch shapes,
//! splits) and the kernels' algorithms (unit and position mapping, masks, folding, the online
//! softmax per warp, the merges) are tested against the CPU cache without a GPU (`tests.rs`).
//! An emulated device reports compute capability 7.5, so decode runs the CUDA-core kernel there;
//! the tensor-core decode (decode_mma.cuh) is left to the host simulator (`sim.rs`), which runs
//! the CUDA code itself, as it does every kernel, and to the GPU check.
// Index loops, like the CUDA code they mirror.
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};

use super::*;

/// What an emulated cache reports as its device: the simulator's, without tensor cores.
pub(super) fn info() -> DeviceInfo {
    DeviceInfo { name: "emulated".into(), capability: (7, 5), ..sim::info() }
}
use crate::config::{DType, KeyMode, Rounding};
use crate::quant::GroupParams;

unsafe fn rd8(a: u64) -> u8 {
    *(a as *const u8)
}
unsafe fn rd16(a: u64) -> u16 {
    (a as *const u16).read_unaligned()
}
unsafe fn rd32(a: u64) -> u32 {
    (a as *const u32).read_unaligned()
}
unsafe fn wr8(a: u64, v: u8) {
    *(a as *mut u8) = v;
}
unsafe fn wr16(a: u64, v: u16) {
    (a as *mut u16).write_unaligned(v)
}
unsafe fn wr32(a: u64, v: u32) {
    (a as *mut u32).write_unaligned(v)
}
unsafe fn wrf(a: u64, v: f32) {
    (a as *mut f32).write_unaligned(v)
}
unsafe fn rdf(a: u64) -> f32 {
    (a as *const f32).read_unaligned()
}

/// The layout as the kernels see it (their macros).
struct K<'a> {
    lay: &'a Layout,
    dt: DType,
    esz: u64,
}

impl K<'_> {
    /// Element `i` of the array at `base`, as f32.
    unsafe fn ld(&self, base: u64, i: i64) -> f32 {
        let a = (base as i64 + i * self.esz as i64) as u64;
        match self.dt {
            DType::F32 => rdf(a),
            DType::F16 => f16::from_bits(rd16(a)).to_f32(),
            DType::BF16 => bf16::from_bits(rd16(a)).to_f32(),
        }
    }
    unsafe fn st(&self, base: u64, i: i64, v: f32) {
        let a = (base as i64 + i * self.esz as i64) as u64;
        match self.dt {
            DType::F32 => wrf(a, v),
            DType::F16 => wr16(a, f16::from_f32(v).to_bits()),
            DType::BF16 => wr16(a, bf16::from_f32(v).to_bits()),
        }
    }
    unsafe fn param(&self, area: u64, i: usize) -> f32 {
        f16::from_bits(rd16(area + 2 * i as u64)).to_f32()
    }
    unsafe fn code(&self, run: u64, i: usize, bits: u32) -> u32 {
        let bit = i * bits as usize;
        (rd8(run + (bit >> 3) as u64) as u32 >> (bit & 7)) & ((1u32 << bits) - 1)
    }
    /// Code `t` of channel `c` among one group's key codes from `codes` (keys per channel), in
    /// the device's order (`Layout::device_key_byte`).
    unsafe fn key_code(&self, codes: u64, c: usize, t: usize) -> u32 {
        let bit = t * self.lay.key_bits as usize;
        let byte = rd8(codes + self.lay.device_key_byte(c, bit >> 3) as u64) as u32;
        (byte >> (bit & 7)) & ((1u32 << self.lay.key_bits) - 1)
    }
    fn ng(&self) -> usize {
        self.lay.head_dim / self.lay.vgroup
    }
    fn k_run(&self) -> usize {
        self.lay.k_run_bytes()
    }
    /// Element offset of a window row of a stored full-precision position.
    fn window_row(&self, pos: usize, value: bool) -> usize {
        let [sk, sv, rk, rv] = self.lay.window_parts();
        let hd = self.lay.head_dim;
        if pos < self.lay.sinks {
            (if value { sv } else { sk }) + pos * hd
        } else {
            (if value { rv } else { rk }) + ((pos - self.lay.sinks) % self.lay.ring) * hd
        }
    }
    /// Address of the window of (slot, head) in a layer's windows.
    fn head_window(&self, win: u64, slot: usize, h: usize) -> u64 {
        win + ((slot * self.lay.n_kv_heads + h) * self.lay.window_head_elems) as u64 * self.esz
    }
    /// Head block of group g and the group's index in its page.
    unsafe fn group_block(&self, pages: u64, blocks: u64, g: usize, h: usize) -> (u64, usize) {
        let gpp = self.lay.groups_per_page;
        let page = rd32(blocks + 4 * (g / gpp) as u64) as u64;
        (pages + page * self.lay.page_bytes as u64 + (h * self.lay.head_bytes) as u64, g % gpp)
    }
}

/// Runs one launch on the host, block after block.
pub(super) unsafe fn run(lay: &Layout, k: Kernel<'_>, grid: (u32, u32, u32)) {
    let kk = K { lay, dt: lay.dtype, esz: lay.dtype.size() as u64 };
    match k {
        Kernel::SetBlocks(p) => {
            for i in 0..p.n as usize {
                wr32(p.blocks + 4 * p.pairs[2 * i] as u64, p.pairs[2 * i + 1]);
            }
        }
        Kernel::Quantize(p) => {
            for x in 0..grid.0 {
                for h in 0..grid.1 {
                    quantize(&kk, p, x as usize, h as usize);
                }
            }
        }
        Kernel::Write(p) => {
            for x in 0..grid.0 {
                for h in 0..grid.1 {
                    window_write(&kk, p, x as usize, h as usize);
                }
            }
        }
        Kernel::Unquant(p) => {
            for h in 0..grid.0 {
                unquantize(&kk, p, h as usize);
            }
        }
        Kernel::Attn(_, nq, p) => {
            for z in 0..grid.2 {
                for y in 0..grid.1 {
                    for x in 0..grid.0 {
                        attn_block(&kk, p, nq, x as usize, y as usize, z as usize);
                    }
                }
            }
        }
        Kernel::Mma(..) | Kernel::PrefillFp(..) | Kernel::PrefillQ(..) => {
            unreachable!("an emulated device reports compute capability 7.5: no tensor-core kernels")
        }
        Kernel::Combine(_, _, p) => {
            for z in 0..grid.2 {
                for y in 0..grid.1 {
                    for x in 0..grid.0 {
                        combine_block(&kk, p, x as usize, y as usize, z as usize);
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn token_elem(
    k: &K,
    p: &QuantParams,
    it: &FlushItem,
    hw: u64,
    h: usize,
    pos: usize,
    c: usize,
    value: bool,
) -> f32 {
    if pos < it.len_old as usize {
        return k.ld(hw, (k.window_row(pos, value) + c) as i64);
    }
    let base = if value { p.v } else { p.k };
    let row = it.chunk_row0 as i64 + (pos - it.len_old as usize) as i64;
    k.ld(base, row * p.kv_stride + (h * k.lay.head_dim + c) as i64)
}

fn encode(x: f32, s: f32, z: f32, levels: u32) -> u32 {
    if s == 0.0 {
        return 0;
    }
    ((x - z) / s).round().clamp(0.0, levels as f32) as u32
}

#[allow(clippy::too_many_arguments)]
unsafe fn quantize_rows(
    k: &K,
    p: &QuantParams,
    it: &FlushItem,
    hw: u64,
    h: usize,
    p0: usize,
    codes: u64,
    scales: u64,
    zeros: u64,
    gi: usize,
    bits: u32,
    value: bool,
) {
    let (g, ng, vg, hd) = (k.lay.group, k.ng(), k.lay.vgroup, k.lay.head_dim);
    let levels = (1u32 << bits) - 1;
    for i in 0..g * ng {
        let (t, cg) = (i / ng, i % ng);
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for c in cg * vg..(cg + 1) * vg {
            let x = token_elem(k, p, it, hw, h, p0 + t, c, value);
            lo = lo.min(x);
            hi = hi.max(x);
        }
        let row = gi * g + t;
        let zh = f16::from_f32(lo);
        let sh = f16::from_f32(((hi - zh.to_f32()) / levels as f32).max(0.0));
        let (sh, zh) = if value && k.lay.value_rounding == Rounding::LeastSquares {
            let xs: Vec<f32> = (cg * vg..(cg + 1) * vg).map(|c| token_elem(k, p, it, hw, h, p0 + t, c, true)).collect();
            let q = GroupParams::least_squares(&xs, lo, hi, bits);
            (q.scale, q.zero)
        } else {
            (sh, zh)
        };
        wr16(scales + 2 * (row * ng + cg) as u64, sh.to_bits());
        wr16(zeros + 2 * (row * ng + cg) as u64, zh.to_bits());
    }
    let row_bytes = hd * bits as usize / 8;
    for i in 0..g * row_bytes {
        let (t, j) = (i / row_bytes, i % row_bytes);
        let row = gi * g + t;
        let mut b = 0u32;
        for kk in 0..8 / bits as usize {
            let c = j * (8 / bits as usize) + kk;
            let pi = row * ng + c / vg;
            let (s, z) = (k.param(scales, pi), k.param(zeros, pi));
            b |= encode(token_elem(k, p, it, hw, h, p0 + t, c, value), s, z, levels) << (kk as u32 * bits);
        }
        wr8(codes + (row * row_bytes + j) as u64, b as u8);
    }
}

unsafe fn quantize(k: &K, p: &QuantParams, x: usize, h: usize) {
    let lay = k.lay;
    let (mut x, mut n) = (x, 0usize);
    while n < p.n_items as usize && x >= p.items[n].n_groups as usize {
        x -= p.items[n].n_groups as usize;
        n += 1;
    }
    if n >= p.n_items as usize {
        return;
    }
    let it = p.items[n];
    let g = it.g0 as usize + x;
    let page = rd32(p.blocks + 4 * (it.slot as usize * lay.seq_pages + g / lay.groups_per_page) as u64) as u64;
    let gi = g % lay.groups_per_page;
    let blk = p.pages + page * lay.page_bytes as u64 + (h * lay.head_bytes) as u64;
    let hw = k.head_window(p.windows, it.slot as usize, h);
    let p0 = lay.sinks + g * lay.group;
    let hd = lay.head_dim;
    match lay.key_mode {
        KeyMode::PerToken => quantize_rows(
            k,
            p,
            &it,
            hw,
            h,
            p0,
            blk + lay.k_codes as u64,
            blk + lay.k_scale as u64,
            blk + lay.k_zero as u64,
            gi,
            lay.key_bits,
            false,
        ),
        KeyMode::PerChannel => {
            let levels = (1u32 << lay.key_bits) - 1;
            for c in 0..hd {
                let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                for t in 0..lay.group {
                    let x = token_elem(k, p, &it, hw, h, p0 + t, c, false);
                    lo = lo.min(x);
                    hi = hi.max(x);
                }
                let zh = f16::from_f32(lo);
                let sh = f16::from_f32(((hi - zh.to_f32()) / levels as f32).max(0.0));
                wr16(blk + lay.k_scale as u64 + 2 * (gi * hd + c) as u64, sh.to_bits());
                wr16(blk + lay.k_zero as u64 + 2 * (gi * hd + c) as u64, zh.to_bits());
                let (s, z) = (sh.to_f32(), zh.to_f32());
                let codes = blk + (lay.k_codes + gi * hd * k.k_run()) as u64;
                let per = 8 / lay.key_bits as usize;
                for j in 0..k.k_run() {
                    let mut b = 0u32;
                    for kk in 0..per {
                        let t = j * per + kk;
                        b |= encode(token_elem(k, p, &it, hw, h, p0 + t, c, false), s, z, levels)
                            << (kk as u32 * lay.key_bits);
                    }
                    wr8(codes + lay.device_key_byte(c, j) as u64, b as u8);
                }
            }
        }
    }
    quantize_rows(
        k,
        p,
        &it,
        hw,
        h,
        p0,
        blk + lay.v_codes as u64,
        blk + lay.v_scale as u64,
        blk + lay.v_zero as u64,
        gi,
        lay.value_bits,
        true,
    );
}

unsafe fn window_write(k: &K, p: &WriteParams, x: usize, h: usize) {
    let (mut x, mut n) = (x, 0usize);
    while n < p.n_items as usize && x >= p.items[n].n as usize {
        x -= p.items[n].n as usize;
        n += 1;
    }
    if n >= p.n_items as usize {
        return;
    }
    let it = p.items[n];
    let hd = k.lay.head_dim;
    let pos = it.pos0 as usize + x;
    let hw = k.head_window(p.windows, it.slot as usize, h);
    let src = (it.row0 as i64 + x as i64) * p.kv_stride + (h * hd) as i64;
    let (kd, vd) = (k.window_row(pos, false), k.window_row(pos, true));
    for c in 0..hd {
        k.st(hw, (kd + c) as i64, k.ld(p.k, src + c as i64));
        k.st(hw, (vd + c) as i64, k.ld(p.v, src + c as i64));
    }
}

unsafe fn unquantize(k: &K, p: &UnquantParams, h: usize) {
    let lay = k.lay;
    let (hd, g, ng) = (lay.head_dim, lay.group, k.ng());
    let blocks = p.blocks + 4 * (p.slot as usize * lay.seq_pages) as u64;
    let (blk, gi) = k.group_block(p.pages, blocks, p.g as usize, h);
    let hw = k.head_window(p.windows, p.slot as usize, h);
    let [_, _, rk, rv] = lay.window_parts();
    let deq = |so: usize, zo: usize, pi: usize, code: u32| {
        let s = k.param(blk + so as u64, pi) as f64;
        let z = k.param(blk + zo as u64, pi) as f64;
        (code as f64 * s + z) as f32
    };
    for i in 0..p.partial as usize * hd {
        let (t, c) = (i / hd, i % hd);
        let ring = ((p.g as usize * g + t) % lay.ring) * hd;
        let row = gi * g + t;
        let key = match lay.key_mode {
            KeyMode::PerToken => {
                let code = k.code(blk + (lay.k_codes + row * k.k_run()) as u64, c, lay.key_bits);
                deq(lay.k_scale, lay.k_zero, row * ng + c / lay.vgroup, code)
            }
            KeyMode::PerChannel => {
                let code = k.key_code(blk + (lay.k_codes + gi * hd * k.k_run()) as u64, c, t);
                deq(lay.k_scale, lay.k_zero, gi * hd + c, code)
            }
        };
        let vcode = k.code(blk + (lay.v_codes + row * lay.v_row_bytes()) as u64, c, lay.value_bits);
        k.st(hw, (rk + ring + c) as i64, key);
        k.st(hw, (rv + ring + c) as i64, deq(lay.v_scale, lay.v_zero, row * ng + c / lay.vgroup, vcode));
    }
}

const WARPS: usize = 4;

/// One warp's online softmax state.
struct Warp {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<Vec<f32>>,
    /// Value zero terms per (vector, channel group) when folding.
    zacc: Vec<Vec<f32>>,
    /// Weights of the current 32 tokens, per vector.
    wp: Vec<[f32; 32]>,
}

struct Block<'a> {
    k: &'a K<'a>,
    p: &'a AttnParams,
    it: AttnItem,
    qf: Vec<Vec<f32>>,
    lo: Vec<i64>,
    hi: Vec<i64>,
    nvec: usize,
    nq: usize,
    fold: bool,
}

impl Block<'_> {
    fn logit(&self, dot: f32) -> f32 {
        if self.p.softcap > 0.0 {
            self.p.softcap * (dot / self.p.softcap).tanh()
        } else {
            dot
        }
    }

    /// Scores s[lane][v] of up to 32 tokens at positions pos[lane] (None: invalid lane).
    fn softmax_step(&self, w: &mut Warp, s: &[Vec<f32>], pos: &[Option<usize>]) {
        let exp_diff = |a: f32, b: f32| if a == f32::NEG_INFINITY { 0.0 } else { (a - b).exp() };
        for v in 0..self.nq {
            let x: Vec<f32> = (0..32)
                .map(|lane| match pos[lane] {
                    Some(ps) if v < self.nvec && (ps as i64) >= self.lo[v] && (ps as i64) < self.hi[v] => {
                        self.logit(s[lane][v])
                    }
                    _ => f32::NEG_INFINITY,
                })
                .collect();
            let bm = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if bm == f32::NEG_INFINITY {
                w.wp[v] = [0.0; 32];
                continue;
            }
            let mn = w.m[v].max(bm);
            let corr = exp_diff(w.m[v], mn);
            w.m[v] = mn;
            let mut sum = 0.0;
            for lane in 0..32 {
                let p = exp_diff(x[lane], mn);
                w.wp[v][lane] = p;
                sum += p;
            }
            w.l[v] = w.l[v] * corr + sum;
            w.acc[v].iter_mut().for_each(|a| *a *= corr);
            w.zacc[v].iter_mut().for_each(|a| *a *= corr);
        }
    }

    unsafe fn quant_unit(&self, w: &mut Warp, blocks: u64, kvh: usize, g: usize) {
        let k = self.k;
        let lay = k.lay;
        let (hd, gs, ng, vg) = (lay.head_dim, lay.group, k.ng(), lay.vgroup);
        let (blk, gi) = k.group_block(self.p.pages, blocks, g, kvh);
        let p0 = lay.sinks + g * gs;
        let mut wq = vec![vec![0f32; hd]; self.nq];
        let mut bias = vec![0f32; self.nq];
        if lay.key_mode == KeyMode::PerChannel {
            for v in 0..self.nq {
                for c in 0..hd {
                    let q = self.qf[v][c];
                    wq[v][c] = q * k.param(blk + lay.k_scale as u64, gi * hd + c);
                    bias[v] += q * k.param(blk + lay.k_zero as u64, gi * hd + c);
                }
            }
        }
        let mut sub = 0;
        while sub < gs {
            let mut s = vec![vec![0f32; self.nq]; 32];
            let mut pos = [None; 32];
            for lane in 0..32 {
                let t = sub + lane;
                if t >= gs {
                    continue;
                }
                pos[lane] = Some(p0 + t);
                match lay.key_mode {
                    KeyMode::PerChannel => {
                        let kc = blk + (lay.k_codes + gi * hd * k.k_run()) as u64;
                        for v in 0..self.nq {
                            let mut acc = bias[v];
                            for c in 0..hd {
                                let cf = k.key_code(kc, c, t) as f32;
                                acc += wq[v][c] * cf;
                            }
                            s[lane][v] = acc;
                        }
                    }
                    KeyMode::PerToken => {
                        let row = gi * gs + t;
                        let r = blk + (lay.k_codes + row * k.k_run()) as u64;
                        for v in 0..self.nq {
                            let mut acc = 0.0;
                            for cg in 0..ng {
                                let (mut d, mut qsum) = (0f32, 0f32);
                                for c in cg * vg..(cg + 1) * vg {
                                    d += self.qf[v][c] * k.code(r, c, lay.key_bits) as f32;
                                    qsum += self.qf[v][c];
                                }
                                let ksc = k.param(blk + lay.k_scale as u64, row * ng + cg);
                                let kz = k.param(blk + lay.k_zero as u64, row * ng + cg);
                                acc += ksc * d + kz * qsum;
                            }
                            s[lane][v] = acc;
                        }
                    }
                }
            }
            self.softmax_step(w, &s, &pos);
            for tt in 0..32.min(gs - sub) {
                if (0..self.nq).all(|v| w.wp[v][tt] == 0.0) {
                    continue;
                }
                let row = gi * gs + sub + tt;
                let vr = blk + (lay.v_codes + row * lay.v_row_bytes()) as u64;
                for c in 0..hd {
                    let cg = c / vg;
                    let vs = k.param(blk + lay.v_scale as u64, row * ng + cg);
                    let vz = k.param(blk + lay.v_zero as u64, row * ng + cg);
                    let code = k.code(vr, c, lay.value_bits) as f32;
                    for v in 0..self.nq {
                        let p = w.wp[v][tt];
                        if self.fold {
                            w.acc[v][c] += p * vs * code;
                        } else {
                            w.acc[v][c] += p * (code * vs + vz);
                        }
                    }
                }
                if self.fold {
                    for cg in 0..ng {
                        let vz = k.param(blk + lay.v_zero as u64, row * ng + cg);
                        for v in 0..self.nq {
                            w.zacc[v][cg] += w.wp[v][tt] * vz;
                        }
                    }
                }
            }
            sub += 32;
        }
    }

    fn fp_pos(&self, n_sink: usize, ws: usize, f: usize) -> usize {
        let len = self.it.len as usize;
        if f < n_sink {
            return f;
        }
        let f = f - n_sink;
        if f < len - ws {
            return ws + f;
        }
        len + (f - (len - ws))
    }

    /// Address and element index of a full-precision row.
    fn fp_row(&self, hw: u64, kvh: usize, pos: usize, value: bool) -> (u64, i64) {
        let it = &self.it;
        if pos < it.len as usize {
            return (hw, self.k.window_row(pos, value) as i64);
        }
        let base = if value { self.p.v } else { self.p.k };
        let row = it.chunk_row0 as i64 + (pos - it.len as usize) as i64;
        (base, row * self.p.kv_stride + (kvh * self.k.lay.head_dim) as i64)
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn fp_unit(&self, w: &mut Warp, hw: u64, kvh: usize, n_sink: usize, ws: usize, n_fp: usize, f0: usize) {
        let hd = self.k.lay.head_dim;
        let mut s = vec![vec![0f32; self.nq]; 32];
        let mut pos = [None; 32];
        for lane in 0..32 {
            let f = f0 + lane;
            if f >= n_fp {
                continue;
            }
            let ps = self.fp_pos(n_sink, ws, f);
            pos[lane] = Some(ps);
            let (base, i0) = self.fp_row(hw, kvh, ps, false);
            for v in 0..self.nq {
                let mut acc = 0f32;
                for c in 0..hd {
                    acc += self.qf[v][c] * self.k.ld(base, i0 + c as i64);
                }
                s[lane][v] = acc;
            }
        }
        self.softmax_step(w, &s, &pos);
        for tt in 0..32.min(n_fp - f0) {
            if (0..self.nq).all(|v| w.wp[v][tt] == 0.0) {
                continue;
            }
            let (base, i0) = self.fp_row(hw, kvh, self.fp_pos(n_sink, ws, f0 + tt), true);
            for c in 0..hd {
                let x = self.k.ld(base, i0 + c as i64);
                for v in 0..self.nq {
                    w.acc[v][c] += w.wp[v][tt] * x;
                }
            }
        }
    }
}

unsafe fn attn_block(k: &K, p: &AttnParams, nq: usize, split: usize, y: usize, z: usize) {
    let lay = k.lay;
    let (hd, gs, ng) = (lay.head_dim, lay.group, k.ng());
    let (ratio, hc) = (p.ratio as usize, p.hc as usize);
    let hchunks = ratio.div_ceil(hc);
    let (kvh, hci) = (y / hchunks, y % hchunks);
    let it = p.item(z);
    let h0 = kvh * ratio + hci * hc;
    let nh = hc.min(ratio - hci * hc);
    let nvec = nh * it.n_q as usize;
    assert!(nvec <= nq, "{nvec} query vectors for a block of {nq}");
    let total = (it.len + it.n_chunk) as i64;
    let mut qf = vec![vec![0f32; hd]; nq];
    let (mut lo, mut hi) = (vec![0i64; nq], vec![0i64; nq]);
    for v in 0..nvec {
        let row = it.q_row0 as i64 + (v / nh) as i64;
        let head = h0 + v % nh;
        for c in 0..hd {
            qf[v][c] = k.ld(p.q, row * p.q_stride + (head * hd + c) as i64) * p.scale;
        }
        let qpos = it.q_pos0 as i64 + (v / nh) as i64;
        lo[v] = if p.window > 0 { (qpos + 1 - p.window as i64).max(0) } else { 0 };
        hi[v] = if p.causal != 0 { (qpos + 1).min(total) } else { total };
        hi[v] = hi[v].max(lo[v]);
    }
    let vis: Vec<usize> = (0..nvec).filter(|&v| hi[v] > lo[v]).collect();
    let lo_min = vis.iter().map(|&v| lo[v]).min().unwrap_or(i32::MAX as i64);
    let hi_max = vis.iter().map(|&v| hi[v]).max().unwrap_or(0);
    let cpl = hd.div_ceil(32);
    let b = Block { k, p, it, qf, lo, hi, nvec, nq, fold: lay.vgroup % cpl == 0 };

    let n_groups = it.quantized as usize / gs;
    let len = it.len as usize;
    let n_sink = len.min(lay.sinks);
    let ws = (lay.sinks + it.quantized as usize).min(len);
    let n_fp = n_sink + (len - ws) + it.n_chunk as usize;
    let n_units = n_groups + n_fp.div_ceil(32);
    let (u_begin, u_end) = if p.fp_only != 0 {
        match p.fp_ups as usize {
            0 => (n_groups, n_units),
            f => (n_groups + split * f, n_units.min(n_groups + split * f + f)),
        }
    } else {
        (split * p.ups as usize, n_units.min(split * p.ups as usize + p.ups as usize))
    };
    let blocks = p.blocks + 4 * (it.slot as usize * lay.seq_pages) as u64;
    let hw = k.head_window(p.windows, it.slot as usize, kvh);
    let mut warps: Vec<Warp> = (0..WARPS)
        .map(|_| Warp {
            m: vec![f32::NEG_INFINITY; nq],
            l: vec![0.0; nq],
            acc: vec![vec![0.0; hd]; nq],
            zacc: vec![vec![0.0; ng]; nq],
            wp: vec![[0.0; 32]; nq],
        })
        .collect();
    for wi in 0..WARPS {
        let w = &mut warps[wi];
        let mut u = u_begin + wi;
        while u < u_end {
            if u < n_groups {
                let first = (lay.sinks + u * gs) as i64;
                let last = first + gs as i64 - 1;
                if !(last < lo_min || first >= hi_max) {
                    b.quant_unit(w, blocks, kvh, u);
                }
            } else {
                let f0 = (u - n_groups) * 32;
                let first = b.fp_pos(n_sink, ws, f0) as i64;
                let last = b.fp_pos(n_sink, ws, (f0 + 31).min(n_fp - 1)) as i64;
                if !(last < lo_min || first >= hi_max) {
                    b.fp_unit(w, hw, kvh, n_sink, ws, n_fp, f0);
                }
            }
            u += WARPS;
        }
    }
    let exp_diff = |a: f32, b: f32| if a == f32::NEG_INFINITY { 0.0 } else { (a - b).exp() };
    for v in 0..nvec {
        let m = warps.iter().map(|w| w.m[v]).fold(f32::NEG_INFINITY, f32::max);
        let r = v / nh;
        let head = h0 + v % nh;
        let dst = p.part
            + 4 * ((((z * p.qt as usize + r) * p.n_q_heads as usize + head) * p.n_splits as usize + split) * (hd + 2))
                as u64;
        let mut l = 0f32;
        for w in &warps {
            l += w.l[v] * exp_diff(w.m[v], m);
        }
        wrf(dst, m);
        wrf(dst + 4, l);
        for c in 0..hd {
            let mut a = 0f32;
            for w in &warps {
                let z = if b.fold { w.zacc[v][c / lay.vgroup] } else { 0.0 };
                a += (w.acc[v][c] + z) * exp_diff(w.m[v], m);
            }
            wrf(dst + 4 * (2 + c) as u64, a);
        }
    }
}

unsafe fn combine_block(k: &K, p: &AttnParams, head: usize, r: usize, z: usize) {
    let it = p.item(z);
    if r >= it.n_q as usize {
        return;
    }
    let hd = k.lay.head_dim;
    let ns = p.n_splits as usize;
    let src = p.part + 4 * ((((z * p.qt as usize + r) * p.n_q_heads as usize + head) * ns) * (hd + 2)) as u64;
    let at = |s: usize, i: usize| rdf(src + 4 * (s * (hd + 2) + i) as u64);
    let exp_diff = |a: f32, b: f32| if a == f32::NEG_INFINITY { 0.0 } else { (a - b).exp() };
    let m = (0..ns).map(|s| at(s, 0)).fold(f32::NEG_INFINITY, f32::max);
    let l: f32 = (0..ns).map(|s| at(s, 1) * exp_diff(at(s, 0), m)).sum();
    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
    let row = it.q_row0 as i64 + r as i64;
    for c in 0..hd {
        let a: f32 = (0..ns).map(|s| at(s, 2 + c) * exp_diff(at(s, 0), m)).sum();
        k.st(p.out, row * p.out_stride + (head * hd + c) as i64, a * inv);
    }
}
