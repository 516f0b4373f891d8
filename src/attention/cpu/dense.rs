//! A dense f16 key/value cache and its flash attention: the baseline the benchmark compares the
//! KIVI kernels with. It runs on the same vector kernels as the cache's full-precision tokens, the
//! same threads and the same work split (GQA groups read once, contexts split across threads
//! when there are fewer items than threads), so the comparison is about bytes, not care.

use half::f16;

use super::kernels::FPB;
use super::{active_isa, execute, fp_range, Backend, Isa, Plan, Scratch, Shape, Threads};
use crate::attention::{AttnOptions, Resolved};
use crate::pool::AlignedBuf;
use crate::rows::RowsMut;

/// Dense f16 keys and values of `n_seqs` sequences, `[seq][kv head][token][channel]` (a
/// benchmark that wants several layers uses one sequence per (layer, sequence)).
#[doc(hidden)]
pub struct DenseF16Cache {
    nkv: usize,
    hd: usize,
    cap: usize,
    len: Vec<usize>,
    /// Aligned and offered huge pages like the cache's own pools.
    k: AlignedBuf,
    v: AlignedBuf,
    threads: Threads,
}

impl DenseF16Cache {
    /// Room for `capacity` tokens in each of `n_seqs` sequences; attention on `n_threads` threads.
    /// A benchmark baseline: panics when the memory or the worker threads cannot be had.
    pub fn new(n_seqs: usize, n_kv_heads: usize, head_dim: usize, capacity: usize, n_threads: usize) -> Self {
        assert!(head_dim % 8 == 0 && head_dim <= super::MAX_HEAD_DIM, "head_dim must be a multiple of 8");
        let n = n_seqs * n_kv_heads * capacity * head_dim;
        DenseF16Cache {
            nkv: n_kv_heads,
            hd: head_dim,
            cap: capacity,
            len: vec![0; n_seqs],
            k: AlignedBuf::try_zeroed(2 * n).expect("memory for the dense keys"),
            v: AlignedBuf::try_zeroed(2 * n).expect("memory for the dense values"),
            threads: Threads::with_dims(head_dim, FPB, 1, n_threads).expect("starting the worker threads"),
        }
    }

    /// Tokens held by `seq`.
    pub fn len(&self, seq: usize) -> usize {
        self.len[seq]
    }

    /// Whether `seq` holds no tokens.
    pub fn is_empty(&self, seq: usize) -> bool {
        self.len[seq] == 0
    }

    /// Appends tokens (rows of `n_kv_heads * head_dim`) to `seq`.
    pub fn append(&mut self, seq: usize, keys: &[f32], values: &[f32]) {
        let row = self.nkv * self.hd;
        let n = keys.len() / row;
        assert!(self.len[seq] + n <= self.cap, "dense cache full");
        for t in 0..n {
            let pos = self.len[seq] + t;
            for h in 0..self.nkv {
                let dst = ((seq * self.nkv + h) * self.cap + pos) * self.hd;
                let src = t * row + h * self.hd;
                let (k, v) = (self.k.typed_mut::<f16>(), &keys[src..src + self.hd]);
                k[dst..dst + self.hd].iter_mut().zip(v).for_each(|(d, &x)| *d = f16::from_f32(x));
                let (d, v) = (self.v.typed_mut::<f16>(), &values[src..src + self.hd]);
                d[dst..dst + self.hd].iter_mut().zip(v).for_each(|(d, &x)| *d = f16::from_f32(x));
            }
        }
        self.len[seq] += n;
    }

    /// One decode step for sequences `first..first + n`: row `i` of `keys` and `values` is
    /// appended to sequence `first + i`, then row `i` of `queries` attends over everything that
    /// sequence holds.
    pub fn decode(&mut self, first: usize, keys: &[f32], values: &[f32], queries: &[f32], out: &mut [f32]) {
        let row = self.nkv * self.hd;
        let n = keys.len() / row;
        for i in 0..n {
            self.append(first + i, &keys[i * row..(i + 1) * row], &values[i * row..(i + 1) * row]);
        }
        self.attend(first, n, queries, out);
    }

    /// Attention of query row `i` (rows of `n_q_heads * head_dim`) over everything sequence
    /// `first + i` holds, for `i` in `0..n`.
    pub fn attend(&self, first: usize, n: usize, queries: &[f32], out: &mut [f32]) {
        let hd = self.hd;
        let o = AttnOptions { causal: false, ..AttnOptions::default() }.resolve(hd).expect("default options");
        let nq = queries.len() / n / hd;
        assert!(nq % self.nkv == 0 && out.len() == queries.len());
        let mut out = RowsMut::new(out, n).expect("output rows");
        let sz = Shape { njobs: n, rows: 1, nkv: self.nkv, nq, hd, blocks: self.len[first] / FPB };
        let isa = active_isa();
        #[cfg(target_arch = "x86_64")]
        {
            if isa == Isa::Avx512 && hd % 16 == 0 {
                return self.run::<super::x86::Avx512>(first, &sz, queries, &o, &mut out);
            }
            if matches!(isa, Isa::Avx512 | Isa::Avx2) {
                return self.run::<super::x86::Avx2>(first, &sz, queries, &o, &mut out);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if isa == Isa::Neon {
                return self.run::<super::neon::Neon>(first, &sz, queries, &o, &mut out);
            }
        }
        panic!("the dense baseline needs a vector instruction set, not {isa:?}");
    }

    fn run<B: Backend>(&self, first: usize, sz: &Shape, queries: &[f32], o: &Resolved, out: &mut RowsMut<f32>) {
        let (hd, nq, nkv, cap) = (self.hd, sz.nq, self.nkv, self.cap);
        let (kk, vv) = (self.k.typed::<f16>(), self.v.typed::<f16>());
        let body = |s: &mut Scratch, plan: &Plan, j: usize, _row: usize, kvh: usize, hb: usize, split: usize| {
            let (qh0, qh1) = plan.heads(kvh, hb);
            let nh = qh1 - qh0;
            s.start(&queries[(j * nq + qh0) * hd..(j * nq + qh1) * hd], nh);
            let len = self.len[first + j];
            let nb = len.div_ceil(FPB);
            let per = nb.div_ceil(plan.nsplit);
            let b0 = (split * per).min(nb);
            let b1 = (b0 + per).min(nb);
            let base = ((first + j) * nkv + kvh) * cap * hd;
            let rows = |t: usize| {
                let r = base + t * hd..base + (t + 1) * hd;
                (&kk[r.clone()], &vv[r])
            };
            // SAFETY: B is available (chosen above) and every row has hd elements.
            unsafe { fp_range::<B, f16>(s, nh, o, b0 * FPB, (b1 * FPB).min(len), true, rows) };
        };
        execute(&self.threads, sz, &|j| j, &body, out);
    }
}
