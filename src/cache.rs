//! The cache: every layer of a model, many sequences, appends, attention and sequence operations.

use crate::attention::reference::Dequantized;
use crate::attention::{cpu, AttnOptions, Resolved};
use crate::config::{CacheConfig, DType, KeyMode};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::pool::{AlignedBuf, PagePool, PageRefs};
use crate::quant::{quantize_columns, quantize_group, quantize_groups, write_f16, GroupParams};
use crate::rows::{Element, Rows, RowsMut};
use crate::seq::{GroupPage, LayerSeq, SeqTable, Stream};
use half::{bf16, f16};

/// Runs `$body` with `$W` bound to the Rust type of the dtype `$dt`.
macro_rules! with_dtype {
    ($dt:expr, $W:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $W = f32;
                $body
            }
            DType::F16 => {
                type $W = f16;
                $body
            }
            DType::BF16 => {
                type $W = bf16;
                $body
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use with_dtype;

/// A KIVI key/value cache for every layer of a model.
///
/// All memory (page pools and full-precision windows) is taken in [`Cache::new`]; nothing grows
/// afterwards. Sequences are created by their first append. A method that returns an error has
/// changed nothing. A `Cache` is `Send + Sync`: share it read-only across threads for
/// [`Cache::attend`], or move it; calls that change it take `&mut self`.
pub struct Cache {
    pub(crate) cfg: CacheConfig,
    pub(crate) lay: Layout,
    pub(crate) pools: Vec<PagePool>,
    pub(crate) windows: AlignedBuf,
    pub(crate) seqs: SeqTable,
    /// Worker threads (`n_threads - 1`) for attention and flushes, and their working memory.
    pub(crate) threads: cpu::Threads,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("config", &self.cfg).field("sequences", &self.seq_ids()).finish()
    }
}

impl Cache {
    /// Creates a cache, taking all of its memory now: [`Error::InvalidConfig`] for a bad
    /// field, or when the machine cannot give that memory (the message says how much).
    pub fn new(cfg: CacheConfig) -> Result<Cache> {
        cfg.validate()?;
        let lay = Layout::new(&cfg);
        // Memory the machine cannot give is an error, not an abort.
        let total = lay.total_bytes();
        let layer_bytes = lay.pages_per_layer as u128 * lay.page_bytes as u128;
        let pools = (0..lay.n_layers)
            .map(|l| {
                PagePool::new(lay.pages_per_layer, lay.page_bytes)
                    .ok_or_else(|| Error::allocation(&format!("the pages of layer {l}"), layer_bytes, total))
            })
            .collect::<Result<_>>()?;
        let window_bytes = lay.window_elems_total() * lay.dtype.size();
        let windows = AlignedBuf::try_zeroed(window_bytes)
            .ok_or_else(|| Error::allocation("the full-precision windows", window_bytes as u128, total))?;
        let seqs = SeqTable::new(&lay).ok_or_else(|| Error::allocation("the page tables", lay.table_bytes(), total))?;
        let threads = cpu::Threads::new(&lay, cfg.n_threads as usize)?;
        Ok(Cache { cfg, lay, pools, windows, seqs, threads })
    }

    /// The configuration the cache was created with.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    fn check_layer(&self, layer: u32) -> Result<usize> {
        if layer >= self.cfg.n_layers {
            return Err(Error::LayerOutOfRange { layer, n_layers: self.cfg.n_layers });
        }
        Ok(layer as usize)
    }

    fn check_kv<T: Element>(&self, keys: &Rows<T>, values: &Rows<T>, rows: Option<usize>) -> Result<usize> {
        let n = rows.unwrap_or(keys.rows());
        let row = self.lay.n_kv_heads * self.lay.head_dim;
        keys.with_what("keys", n, row)?;
        values.with_what("values", n, row)?;
        keys.check_finite("keys", true)?;
        values.check_finite("values", true)?;
        Ok(n)
    }

    /// Checks queries and output; returns the number of query heads.
    fn check_q<T: Element>(&self, queries: &Rows<T>, out: &RowsMut<T>, rows: usize) -> Result<usize> {
        let hd = self.lay.head_dim;
        let nkv = self.lay.n_kv_heads;
        let len = queries.row_len();
        if queries.rows() != rows {
            return Err(Error::Shape { what: "queries", detail: format!("{} rows, expected {rows}", queries.rows()) });
        }
        if len % hd != 0 || len / hd == 0 || (len / hd) % nkv != 0 {
            return Err(Error::Shape {
                what: "queries",
                detail: format!(
                    "row of {len} elements is not a whole number of heads of {hd} that is a multiple of the {nkv} kv heads"
                ),
            });
        }
        if len / hd > 4096 {
            return Err(Error::Shape { what: "queries", detail: format!("{} query heads, at most 4096", len / hd) });
        }
        queries.check_finite("queries", false)?;
        out.check(rows, len)?;
        Ok(len / hd)
    }

    pub(crate) fn stream<W: Element>(&self, layer: usize, slot: usize) -> Stream<'_, W> {
        let lay = &self.lay;
        let ls = &self.seqs.slots[slot].layers[layer];
        let base = lay.window_base(layer, slot, 0);
        let n = lay.n_kv_heads * lay.window_head_elems;
        Stream {
            lay,
            pool: self.pools[layer].bytes(),
            blocks: &ls.blocks,
            window: &self.windows.typed::<W>()[base..base + n],
            len: ls.len,
            quantized: ls.quantized,
        }
    }

    /// Appends `keys` and `values` (one row per token, `n_kv_heads * head_dim` elements, RoPE
    /// already applied) to sequence `seq` in `layer`, creating the sequence if it is new.
    pub fn append<T: Element>(&mut self, layer: u32, seq: u32, keys: Rows<T>, values: Rows<T>) -> Result<()> {
        let l = self.check_layer(layer)?;
        let n = self.check_kv(&keys, &values, None)?;
        let slot = self.seqs.check_append(&self.lay, l, seq, n)?;
        self.push(l, slot, keys, values);
        self.seqs.slots[slot].id = Some(seq);
        Ok(())
    }

    /// Appends a chunk of keys and values to `seq` in `layer` and computes attention for the
    /// chunk's queries (one row per token, `n_q_heads * head_dim`, `n_q_heads` a multiple of
    /// `n_kv_heads`), written to `out` (same shape as `queries`). The chunk's queries see the
    /// chunk's own keys and values exactly (causally unless `opts.causal` is false) and everything
    /// stored earlier as the cache holds it. Like flash-attn's `flash_attn_with_kvcache`.
    #[allow(clippy::too_many_arguments)]
    pub fn append_attend<T: Element>(
        &mut self,
        layer: u32,
        seq: u32,
        keys: Rows<T>,
        values: Rows<T>,
        queries: Rows<T>,
        mut out: RowsMut<T>,
        opts: &AttnOptions,
    ) -> Result<()> {
        let l = self.check_layer(layer)?;
        let n = self.check_kv(&keys, &values, None)?;
        self.check_q(&queries, &out, n)?;
        let o = opts.resolve(self.lay.head_dim)?;
        let slot = self.seqs.check_append(&self.lay, l, seq, n)?;
        let pos0 = self.seqs.slots[slot].layers[l].len;
        self.attend_stream(l, slot, Some((keys, values)), queries, pos0, &mut out, 0, &o);
        self.push(l, slot, keys, values);
        self.seqs.slots[slot].id = Some(seq);
        Ok(())
    }

    /// Attention for queries of the last `queries.rows()` tokens already stored in `seq`,
    /// everything as the cache holds it (causal among them unless `opts.causal` is false).
    pub fn attend<T: Element>(
        &self,
        layer: u32,
        seq: u32,
        queries: Rows<T>,
        mut out: RowsMut<T>,
        opts: &AttnOptions,
    ) -> Result<()> {
        let l = self.check_layer(layer)?;
        let slot = self.seqs.slot_of(seq)?;
        let n = queries.rows();
        self.check_q(&queries, &out, n)?;
        let o = opts.resolve(self.lay.head_dim)?;
        let len = self.seqs.slots[slot].layers[l].len;
        if n > len {
            return Err(Error::InvalidArgument(format!(
                "{n} queries for sequence {seq}, which holds {len} tokens in layer {layer}"
            )));
        }
        self.attend_stream::<T>(l, slot, None, queries, len - n, &mut out, 0, &o);
        Ok(())
    }

    /// One decode step for several sequences in one call: row `i` of `keys`, `values`, `queries`
    /// and `out` belongs to `seqs[i]`. Each sequence gets its token appended and attention for
    /// its query, as [`Cache::append_attend`] with a chunk of one. The ids must be distinct.
    #[allow(clippy::too_many_arguments)]
    pub fn decode<T: Element>(
        &mut self,
        layer: u32,
        seqs: &[u32],
        keys: Rows<T>,
        values: Rows<T>,
        queries: Rows<T>,
        mut out: RowsMut<T>,
        opts: &AttnOptions,
    ) -> Result<()> {
        let l = self.check_layer(layer)?;
        let n = self.check_kv(&keys, &values, Some(seqs.len()))?;
        self.check_q(&queries, &out, n)?;
        let o = opts.resolve(self.lay.head_dim)?;
        self.seqs.check_decode(&self.lay, l, seqs)?;
        // The slots, new sequences taking theirs (a buffer kept for this: no allocation).
        let mut slots = std::mem::take(&mut self.threads.decode_slots);
        slots.clear();
        slots.extend(seqs.iter().map(|&seq| self.seqs.take_slot(seq)));
        // Attention for every sequence in one parallel call (each sees only its own state and
        // token), then the appends.
        with_dtype!(self.lay.dtype, W => {
            let slots = &slots;
            let job = |i: usize| {
                let slot = slots[i];
                cpu::Job {
                    s: self.stream::<W>(l, slot),
                    chunk: Some((keys.sub(i, 1), values.sub(i, 1))),
                    queries: queries.sub(i, 1),
                    q_pos0: self.seqs.slots[slot].layers[l].len,
                    out_row0: i,
                }
            };
            cpu::attend(&self.threads, &self.lay, n, 1, &job, &mut out, &o)
        });
        for (i, &slot) in slots.iter().enumerate() {
            self.push(l, slot, keys.sub(i, 1), values.sub(i, 1));
        }
        self.threads.decode_slots = slots;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn attend_stream<T: Element>(
        &self,
        l: usize,
        slot: usize,
        chunk: Option<(Rows<T>, Rows<T>)>,
        queries: Rows<T>,
        pos0: usize,
        out: &mut RowsMut<T>,
        row0: usize,
        o: &Resolved,
    ) {
        with_dtype!(self.lay.dtype, W => {
            let s = self.stream::<W>(l, slot);
            let job = |_: usize| cpu::Job { s, chunk, queries, q_pos0: pos0, out_row0: row0 };
            cpu::attend(&self.threads, &self.lay, 1, queries.rows(), &job, out, o)
        })
    }

    /// Writes tokens into (layer, slot), flushing whole groups out of the window. Capacity has
    /// been checked.
    fn push<T: Element>(&mut self, l: usize, slot: usize, keys: Rows<T>, values: Rows<T>) {
        let lay = &self.lay;
        let base = lay.window_base(l, slot, 0);
        let n = lay.n_kv_heads * lay.window_head_elems;
        let pool = &mut self.pools[l];
        let (ls, pages) = self.seqs.layer_mut(l, slot);
        with_dtype!(lay.dtype, W => {
            let win = &mut self.windows.typed_mut::<W>()[base..base + n];
            push_tokens(lay, &mut self.threads, pool, pages, win, ls, keys, values)
        })
    }

    /// Tokens `seq` holds: the most any layer holds (layers differ only while a forward pass
    /// is part-way through its layers).
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

    /// Removes `seq`, releasing its pages and its slot.
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

    /// Keeps only the first `n_tokens` tokens of `seq` in every layer (a no-op for layers that
    /// hold fewer), e.g. to roll back rejected speculative tokens.
    ///
    /// Precision: tokens that had been quantized stay at their quantized precision. When the cut
    /// falls inside a quantized key group, the group's kept tokens return to the full-precision
    /// window holding their dequantized values (rounded to the cache's dtype); they are quantized
    /// again, with the tokens that follow them, when the window next flushes. So after a
    /// truncation fewer than `residual` of the most recent tokens may be exact until new tokens
    /// arrive.
    pub fn seq_truncate(&mut self, seq: u32, n_tokens: u32) -> Result<()> {
        let slot = self.seqs.slot_of(seq)?;
        for l in 0..self.lay.n_layers {
            self.truncate_layer(l, slot, n_tokens as usize);
        }
        Ok(())
    }

    fn truncate_layer(&mut self, l: usize, slot: usize, n: usize) {
        if let Some((g, partial)) = self.seqs.truncated_group(&self.lay, l, slot, n) {
            with_dtype!(self.lay.dtype, W => self.unquantize_partial::<W>(l, slot, g, partial));
        }
        self.seqs.truncate(&self.lay, l, slot, n);
    }

    /// Writes the first `partial` tokens of quantized group `g`, dequantized, into the ring.
    fn unquantize_partial<W: Element>(&mut self, l: usize, slot: usize, g: usize, partial: usize) {
        let lay = self.lay.clone();
        let hd = lay.head_dim;
        let mut rows = vec![0f32; 2 * lay.n_kv_heads * partial * hd];
        {
            let s = self.stream::<W>(l, slot);
            for h in 0..lay.n_kv_heads {
                for t in 0..partial {
                    let pos = lay.sinks + g * lay.group + t;
                    for c in 0..hd {
                        let i = ((h * partial + t) * hd + c) * 2;
                        rows[i] = s.key_at(h, pos, c) as f32;
                        rows[i + 1] = s.value_at(h, pos, c) as f32;
                    }
                }
            }
        }
        let [_, _, rk, rv] = lay.window_parts();
        let win = self.windows.typed_mut::<W>();
        for h in 0..lay.n_kv_heads {
            let base = lay.window_base(l, slot, h);
            for t in 0..partial {
                let r = ((g * lay.group + t) % lay.ring) * hd;
                for c in 0..hd {
                    let i = ((h * partial + t) * hd + c) * 2;
                    win[base + rk + r + c] = W::from_f32(rows[i]);
                    win[base + rv + r + c] = W::from_f32(rows[i + 1]);
                }
            }
        }
    }

    /// Makes `dst` a copy of the first `n_tokens` tokens of `src` (all of it if it holds fewer),
    /// replacing whatever `dst` held. Quantized pages are shared, not copied (copy-on-write), so
    /// forking a long prompt costs only the windows.
    pub fn seq_copy(&mut self, src: u32, dst: u32, n_tokens: u32) -> Result<()> {
        let (s, d) = self.seqs.copy_slots(src, dst)?;
        self.seqs.copy(s, d, dst);
        let lay = &self.lay;
        let n = lay.slot_window_bytes();
        for l in 0..lay.n_layers {
            let sb = lay.window_base(l, s, 0) * lay.dtype.size();
            let db = lay.window_base(l, d, 0) * lay.dtype.size();
            self.windows.bytes_mut().copy_within(sb..sb + n, db);
        }
        for l in 0..self.lay.n_layers {
            self.truncate_layer(l, d, n_tokens as usize);
        }
        Ok(())
    }

    /// Everything the cache holds for `seq` in `layer`, dequantized exactly (for tests and
    /// debugging; allocates).
    pub fn dequantized(&self, layer: u32, seq: u32) -> Result<Dequantized> {
        let l = self.check_layer(layer)?;
        let slot = self.seqs.slot_of(seq)?;
        let lay = &self.lay;
        let (nkv, hd) = (lay.n_kv_heads, lay.head_dim);
        with_dtype!(lay.dtype, W => {
            let s = self.stream::<W>(l, slot);
            let mut keys = Vec::with_capacity(s.len * nkv * hd);
            let mut values = Vec::with_capacity(s.len * nkv * hd);
            for p in 0..s.len {
                for h in 0..nkv {
                    for c in 0..hd {
                        keys.push(s.key_at(h, p, c));
                        values.push(s.value_at(h, p, c));
                    }
                }
            }
            Ok(Dequantized { len: s.len, n_kv_heads: nkv, head_dim: hd, keys, values })
        })
    }
}

/// Appends tokens to one (layer, sequence): sinks first, then the ring; whenever the window
/// reaches `residual + group_size` tokens its oldest group is quantized into a page.
#[allow(clippy::too_many_arguments)]
fn push_tokens<W: Element, T: Element>(
    lay: &Layout,
    threads: &mut cpu::Threads,
    pool: &mut PagePool,
    pages: &mut PageRefs,
    win: &mut [W],
    ls: &mut LayerSeq,
    keys: Rows<T>,
    values: Rows<T>,
) {
    let hd = lay.head_dim;
    let [sk, sv, rk, rv] = lay.window_parts();
    for t in 0..keys.rows() {
        let pos = ls.len;
        let (ko, vo) = if pos < lay.sinks {
            (sk + pos * hd, sv + pos * hd)
        } else {
            let r = ((pos - lay.sinks) % lay.ring) * hd;
            (rk + r, rv + r)
        };
        let (krow, vrow) = (keys.row(t), values.row(t));
        // Through f32, a head at a time (slice conversions, vectorized for f16).
        let mut buf = [0f32; crate::attention::MAX_HEAD_DIM];
        let buf = &mut buf[..hd];
        for h in 0..lay.n_kv_heads {
            let w = &mut win[h * lay.window_head_elems..(h + 1) * lay.window_head_elems];
            T::to_f32_slice(&krow[h * hd..(h + 1) * hd], buf);
            W::from_f32_slice(buf, &mut w[ko..ko + hd]);
            T::to_f32_slice(&vrow[h * hd..(h + 1) * hd], buf);
            W::from_f32_slice(buf, &mut w[vo..vo + hd]);
        }
        ls.len += 1;
        if pos >= lay.sinks && ls.len - lay.sinks - ls.quantized == lay.residual + lay.group {
            flush(lay, threads, pool, pages, win, ls);
        }
    }
}

/// Quantizes the oldest `group_size` tokens of the window into the next group of the pages, one
/// KV head per task on the cache's threads (each head owns its part of the page).
fn flush<W: Element>(
    lay: &Layout,
    threads: &mut cpu::Threads,
    pool: &mut PagePool,
    pages: &mut PageRefs,
    win: &[W],
    ls: &mut LayerSeq,
) {
    let g = ls.quantized / lay.group;
    let GroupPage { page, copy_of, .. } = ls.group_page(lay, pages, g);
    if let Some(shared) = copy_of {
        pool.copy_page(shared, page);
    }
    // Ring offsets of the group's tokens, computed once (not one division per element).
    let mut slots = [0usize; 256];
    slots[..lay.group].iter_mut().enumerate().for_each(|(t, o)| *o = ((ls.quantized + t) % lay.ring) * lay.head_dim);
    let heads = &mut pool.page_mut(page)[..lay.n_kv_heads * lay.head_bytes];
    threads.par_chunks_mut(heads, lay.head_bytes, &|h, blk| {
        let w = &win[h * lay.window_head_elems..(h + 1) * lay.window_head_elems];
        quantize_head_group(lay, w, &slots[..lay.group], g % lay.groups_per_page, blk);
    });
    ls.quantized += lay.group;
}

/// Quantizes one KV head's tokens at window offsets `slots` (one group) into group `gi` of
/// that head's part of a page, `blk`.
fn quantize_head_group<W: Element>(lay: &Layout, w: &[W], slots: &[usize], gi: usize, blk: &mut [u8]) {
    let hd = lay.head_dim;
    let (gsz, vg, ng) = (lay.group, lay.vgroup, lay.row_groups());
    let [_, _, rk, rv] = lay.window_parts();
    let key = |t: usize, c: usize| w[rk + slots[t] + c].to_f32();
    let run = lay.k_run_bytes();
    match lay.key_mode {
        KeyMode::PerChannel => {
            // A block of channels at a time: the group's token rows of those channels, widened
            // by slices, then quantized across channels.
            const CB: usize = 16;
            let mut tile = [0f32; 256 * CB];
            let mut params = [GroupParams::from_range(0.0, 0.0, 2); CB];
            for c0 in (0..hd).step_by(CB) {
                let cw = CB.min(hd - c0);
                for (t, &o) in slots.iter().enumerate() {
                    W::to_f32_slice(&w[rk + o + c0..rk + o + c0 + cw], &mut tile[t * cw..(t + 1) * cw]);
                }
                let pi = gi * hd + c0;
                let codes = &mut blk[lay.k_codes + pi * run..lay.k_codes + (pi + cw) * run];
                quantize_columns(&tile[..gsz * cw], cw, lay.key_bits, codes, &mut params[..cw]);
                for (j, p) in params[..cw].iter().enumerate() {
                    write_f16(&mut blk[lay.k_scale..], pi + j, p.scale);
                    write_f16(&mut blk[lay.k_zero..], pi + j, p.zero);
                }
            }
        }
        KeyMode::PerToken => {
            for t in 0..gsz {
                let row = gi * gsz + t;
                for cg in 0..ng {
                    let codes = &mut blk[lay.k_codes + row * run..lay.k_codes + (row + 1) * run];
                    let p = quantize_group(vg, |i| key(t, cg * vg + i), lay.key_bits, codes, cg * vg);
                    write_f16(&mut blk[lay.k_scale..], row * ng + cg, p.scale);
                    write_f16(&mut blk[lay.k_zero..], row * ng + cg, p.zero);
                }
            }
        }
    }
    // Values a block of tokens at a time: consecutive rows, so their groups are one run of codes
    // and one of parameters, which `quantize_groups` fills several groups at a time.
    const TB: usize = 8;
    let vrun = lay.v_row_bytes();
    let mut rows = [0f32; TB * crate::attention::MAX_HEAD_DIM];
    let mut params = [GroupParams::from_range(0.0, 0.0, 2); TB * crate::attention::MAX_HEAD_DIM];
    for t0 in (0..gsz).step_by(TB) {
        let tb = TB.min(gsz - t0);
        for (t, r) in rows[..tb * hd].chunks_exact_mut(hd).enumerate() {
            W::to_f32_slice(&w[rv + slots[t0 + t]..rv + slots[t0 + t] + hd], r);
        }
        let row = gi * gsz + t0;
        let codes = &mut blk[lay.v_codes + row * vrun..lay.v_codes + (row + tb) * vrun];
        let params = &mut params[..tb * ng];
        quantize_groups(&rows[..tb * hd], vg, lay.value_bits, lay.value_rounding, codes, params);
        for (i, p) in params.iter().enumerate() {
            write_f16(&mut blk[lay.v_scale..], row * ng + i, p.scale);
            write_f16(&mut blk[lay.v_zero..], row * ng + i, p.zero);
        }
    }
}
