//! Fused attention on the CPU, straight from the packed codes.
//!
//! For a per-channel key group with scales `s[c]` and zeros `z[c]`,
//! `q . k_t = sum_c (q[c] s[c]) code[c][t] + sum_c q[c] z[c]`: the scale is folded into the query
//! once per group and the zero into one bias, so the inner loop multiplies the query by raw codes.
//! Values are dequantized in registers (`code * s + z`) and weighted: folding their zeros out
//! (`sum_t p_t z_t` apart from `sum_t p_t s_t code_t`) would cancel and lose precision over long
//! contexts. Nothing is dequantized into memory; the softmax is online (running maximum and sum)
//! in f32. This is the portable path (and the only one for per-token keys); the vector kernels
//! are in `kernels.rs`.

use super::Resolved;
use crate::config::KeyMode;
use crate::quant::{code_at, read_f16};
use crate::rows::{Element, Rows, RowsMut};
use crate::seq::Stream;

/// Largest head_dim the stack buffers hold (the configuration allows no more).
pub(crate) const MAX_HEAD_DIM: usize = 1024;
/// Full-precision tokens scored per softmax step; at least the largest group size.
const BLOCK: usize = 256;

/// Running softmax state of one query head.
struct Online<'b> {
    m: f32,
    l: f32,
    acc: &'b mut [f32],
}

impl<'b> Online<'b> {
    fn new(acc: &'b mut [f32]) -> Self {
        acc.fill(0.0);
        Online { m: f32::NEG_INFINITY, l: 0.0, acc }
    }

    /// Turns a block of logits (masked ones are -inf) into weights relative to the running
    /// maximum, rescaling what has been accumulated. Returns false when all are masked.
    #[inline]
    fn weights(&mut self, sc: &mut [f32]) -> bool {
        let bm = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if bm == f32::NEG_INFINITY {
            return false;
        }
        if bm > self.m {
            let corr = (self.m - bm).exp();
            self.acc.iter_mut().for_each(|a| *a *= corr);
            self.l *= corr;
            self.m = bm;
        }
        // Summed per block, then added: long contexts keep their precision.
        let mut bl = 0.0f32;
        for x in sc.iter_mut() {
            *x = (*x - self.m).exp();
            bl += *x;
        }
        self.l += bl;
        true
    }

    fn finish<T: Element>(self, out: &mut [T]) {
        let inv = if self.l > 0.0 { 1.0 / self.l } else { 0.0 };
        for (c, o) in out.iter_mut().enumerate() {
            *o = T::from_f32(self.acc[c] * inv);
        }
    }
}

/// Attention of `queries` (rows at positions `q_pos0..`) over the stream `s` followed by the
/// full-precision `chunk` (keys and values at positions `s.len..`). Writes rows
/// `out_row0..out_row0 + queries.rows()` of `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend<W: Element, T: Element>(
    s: &Stream<W>,
    chunk: Option<(Rows<T>, Rows<T>)>,
    queries: Rows<T>,
    q_pos0: usize,
    out: &mut RowsMut<T>,
    out_row0: usize,
    o: &Resolved,
) {
    let lay = s.lay;
    let hd = lay.head_dim;
    let nkv = lay.n_kv_heads;
    let nq = queries.row_len() / hd;
    let ratio = nq / nkv;
    let chunk_len = chunk.map_or(0, |c| c.0.rows());
    let total = s.len + chunk_len;
    let n_sink = s.n_sink();
    let q_start = lay.sinks.min(s.len);
    let ws = s.window_start();

    let mut q = [0f32; MAX_HEAD_DIM];
    let mut acc = [0f32; MAX_HEAD_DIM];
    let mut scores = [0f32; BLOCK];

    for i in 0..queries.rows() {
        let qpos = q_pos0 + i;
        let (lo, hi) = o.visible(qpos, total);
        let qrow = queries.row(i);
        for qh in 0..nq {
            let kvh = qh / ratio;
            for (d, x) in q[..hd].iter_mut().zip(&qrow[qh * hd..(qh + 1) * hd]) {
                *d = x.to_f32();
            }
            let q = &q[..hd];
            let mut st = Online::new(&mut acc[..hd]);

            // Sinks.
            fp_range(
                &mut st,
                q,
                o,
                &mut scores,
                lo.min(n_sink),
                hi.min(n_sink),
                |p| s.fp_key(kvh, p),
                |p| s.fp_value(kvh, p),
            );
            // Quantized groups.
            let (a, b) = (lo.max(q_start), hi.min(ws));
            if a < b {
                for g in (a - q_start) / lay.group..=(b - 1 - q_start) / lay.group {
                    quant_group(s, g, kvh, q, o, (lo, hi), &mut st, &mut scores);
                }
            }
            // Full-precision window.
            fp_range(
                &mut st,
                q,
                o,
                &mut scores,
                lo.max(ws),
                hi.min(s.len),
                |p| s.fp_key(kvh, p),
                |p| s.fp_value(kvh, p),
            );
            // The chunk being appended, exact.
            if let Some((ck, cv)) = chunk {
                let base = s.len;
                let key = |p: usize| &ck.row(p - base)[kvh * hd..(kvh + 1) * hd];
                let val = |p: usize| &cv.row(p - base)[kvh * hd..(kvh + 1) * hd];
                fp_range(&mut st, q, o, &mut scores, lo.max(base), hi, key, val);
            }
            let orow = out.row_mut(out_row0 + i);
            st.finish(&mut orow[qh * hd..(qh + 1) * hd]);
        }
    }
}

/// Full-precision keys and values at positions `a..b`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn fp_range<'k, X: Element>(
    st: &mut Online,
    q: &[f32],
    o: &Resolved,
    scores: &mut [f32; BLOCK],
    a: usize,
    b: usize,
    key: impl Fn(usize) -> &'k [X],
    value: impl Fn(usize) -> &'k [X],
) {
    let mut p0 = a;
    while p0 < b {
        let n = (b - p0).min(BLOCK);
        for (j, sc) in scores[..n].iter_mut().enumerate() {
            let k = key(p0 + j);
            let dot: f32 = q.iter().zip(k).map(|(x, y)| x * y.to_f32()).sum();
            *sc = o.logit(dot);
        }
        if st.weights(&mut scores[..n]) {
            for (j, &p) in scores[..n].iter().enumerate() {
                if p != 0.0 {
                    for (a, v) in st.acc.iter_mut().zip(value(p0 + j)) {
                        *a += p * v.to_f32();
                    }
                }
            }
        }
        p0 += n;
    }
}

/// One quantized group `g` of head `kvh`.
#[allow(clippy::too_many_arguments)]
fn quant_group<W: Element>(
    s: &Stream<W>,
    g: usize,
    kvh: usize,
    q: &[f32],
    o: &Resolved,
    (lo, hi): (usize, usize),
    st: &mut Online,
    scores: &mut [f32; BLOCK],
) {
    let lay = s.lay;
    let (gsz, hd, vg) = (lay.group, lay.head_dim, lay.vgroup);
    let (blk, gi) = s.group_block(g, kvh);
    let p0 = lay.sinks + g * gsz;
    let sc = &mut scores[..gsz];
    let run = lay.k_run_bytes();
    let kscale = &blk[lay.k_scale..];
    let kzero = &blk[lay.k_zero..];
    match lay.key_mode {
        KeyMode::PerChannel => {
            sc.fill(0.0);
            let mut bias = 0.0f32;
            for (c, &qc) in q.iter().enumerate() {
                let pi = gi * hd + c;
                let qs = qc * read_f16(kscale, pi).to_f32();
                bias += qc * read_f16(kzero, pi).to_f32();
                let r = &blk[lay.k_codes + pi * run..lay.k_codes + (pi + 1) * run];
                for (t, x) in sc.iter_mut().enumerate() {
                    *x += qs * code_at(r, t, lay.key_bits) as f32;
                }
            }
            sc.iter_mut().for_each(|x| *x += bias);
        }
        KeyMode::PerToken => {
            for (t, x) in sc.iter_mut().enumerate() {
                let row = gi * gsz + t;
                let r = &blk[lay.k_codes + row * run..lay.k_codes + (row + 1) * run];
                let mut dot = 0.0f32;
                for cg in 0..hd / vg {
                    let pi = row * (hd / vg) + cg;
                    let (mut d, mut qsum) = (0.0f32, 0.0f32);
                    for (c, &qc) in q.iter().enumerate().skip(cg * vg).take(vg) {
                        d += qc * code_at(r, c, lay.key_bits) as f32;
                        qsum += qc;
                    }
                    dot += read_f16(kscale, pi).to_f32() * d + read_f16(kzero, pi).to_f32() * qsum;
                }
                *x = dot;
            }
        }
    }
    for (t, x) in sc.iter_mut().enumerate() {
        let pos = p0 + t;
        *x = if pos >= lo && pos < hi { o.logit(*x) } else { f32::NEG_INFINITY };
    }
    if !st.weights(sc) {
        return;
    }
    let vrun = lay.v_row_bytes();
    let ng = hd / vg;
    let vscale = &blk[lay.v_scale..];
    let vzero = &blk[lay.v_zero..];
    for (t, &p) in sc.iter().enumerate() {
        if p == 0.0 {
            continue;
        }
        let row = gi * gsz + t;
        let r = &blk[lay.v_codes + row * vrun..lay.v_codes + (row + 1) * vrun];
        for cg in 0..ng {
            let pi = row * ng + cg;
            let (s, z) = (read_f16(vscale, pi).to_f32(), read_f16(vzero, pi).to_f32());
            // Dequantized before weighting: a zero term summed apart from the codes term
            // cancels against it and loses precision over long contexts.
            for c in cg * vg..(cg + 1) * vg {
                st.acc[c] += p * (code_at(r, c, lay.value_bits) as f32 * s + z);
            }
        }
    }
}
