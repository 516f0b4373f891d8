//! Sequences: which slot each sequence id has, and per layer how many tokens it holds, how many of
//! them are quantized and which pages hold them, with the pages' reference counts. Every backend
//! keeps this on the host and changes it here; it only moves its own bytes. [`Stream`] is a
//! read-only view of one (layer, sequence) that attention and dequantization read through.

use crate::config::KeyMode;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::pool::PageRefs;
use crate::quant::{code_at, read_f16, GroupParams};
use crate::rows::Element;

/// The state of one sequence in one layer.
///
/// Positions `0..sinks` are sink tokens, `sinks..sinks + quantized` are quantized (a whole number
/// of groups), `sinks + quantized..len` are in the full-precision window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LayerSeq {
    pub len: usize,
    pub quantized: usize,
    /// Pages holding the quantized groups, in order: `ceil(groups / groups_per_page)` of them.
    pub blocks: Vec<u32>,
}

/// The page a quantized group is written into ([`LayerSeq::group_page`]).
pub(crate) struct GroupPage {
    pub page: u32,
    /// The page is new in the block table, at index `g / groups_per_page`.
    pub new: bool,
    /// Copy-on-write: the shared page whose bytes `page` must first receive.
    pub copy_of: Option<u32>,
}

impl LayerSeq {
    /// Groups that appending `n` tokens flushes out of the window.
    pub fn flushes(&self, lay: &Layout, n: usize) -> usize {
        let w_total = (self.len + n).saturating_sub(lay.sinks + self.quantized);
        if w_total >= lay.residual + lay.group {
            (w_total - lay.residual) / lay.group
        } else {
            0
        }
    }

    /// Whether appending `n` tokens puts each into a sink or into a ring slot whose token is
    /// quantized (or that holds none yet), so that no token still in the window is overwritten:
    /// always for one token (a window holds fewer than a ring's length before an append).
    pub fn fits_ring(&self, lay: &Layout, n: usize) -> bool {
        self.len + n <= lay.ring + lay.sinks + self.quantized
    }

    /// The page quantized group `g` (the next one) goes into, taken from `pages` where needed: a
    /// new page when the group starts one, a private copy when its page is shared, else its page.
    pub fn group_page(&mut self, lay: &Layout, pages: &mut PageRefs, g: usize) -> GroupPage {
        let bi = g / lay.groups_per_page;
        if g % lay.groups_per_page == 0 {
            let p = pages.alloc();
            self.blocks.push(p);
            return GroupPage { page: p, new: true, copy_of: None };
        }
        let p = self.blocks[bi];
        if pages.refs(p) > 1 {
            let fresh = pages.alloc();
            pages.decref(p);
            self.blocks[bi] = fresh;
            GroupPage { page: fresh, new: true, copy_of: Some(p) }
        } else {
            GroupPage { page: p, new: false, copy_of: None }
        }
    }
}

/// One sequence slot: an id when in use, and one [`LayerSeq`] per layer.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub id: Option<u32>,
    pub layers: Vec<LayerSeq>,
}

/// All sequence slots, and per layer the reference counts of its pages (the references are the
/// slots' block tables). Block tables are reserved at creation, so appending never allocates.
///
/// The checks (`slot_of`, `check_*`, `copy_slots`) change nothing; the changes that follow them
/// cannot fail, so a call that fails has changed nothing.
#[derive(Debug, Clone)]
pub(crate) struct SeqTable {
    pub slots: Vec<Slot>,
    /// One per layer.
    pub pages: Vec<PageRefs>,
}

impl SeqTable {
    /// Every slot with room for the pages of its longest sequence (appends never allocate), or
    /// `None` when that cannot be allocated.
    pub fn new(lay: &Layout) -> Option<SeqTable> {
        let layer = || {
            let mut blocks = Vec::new();
            blocks.try_reserve_exact(lay.seq_pages).ok()?;
            Some(LayerSeq { len: 0, quantized: 0, blocks })
        };
        let slot = || Some(Slot { id: None, layers: (0..lay.n_layers).map(|_| layer()).collect::<Option<_>>()? });
        Some(SeqTable {
            slots: (0..lay.max_seqs).map(|_| slot()).collect::<Option<_>>()?,
            pages: (0..lay.n_layers).map(|_| PageRefs::new(lay.pages_per_layer)).collect::<Option<_>>()?,
        })
    }

    /// The slot of sequence `id`.
    pub fn find(&self, id: u32) -> Option<usize> {
        self.slots.iter().position(|s| s.id == Some(id))
    }

    pub fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(|s| s.id.is_none())
    }

    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().filter_map(|s| s.id)
    }

    /// Tokens sequence `slot` holds: the most any layer holds (layers differ only while a
    /// forward pass is part-way through its layers).
    pub fn len_of(&self, slot: usize) -> u32 {
        self.slots[slot].layers.iter().map(|l| l.len).max().unwrap_or(0) as u32
    }

    pub fn live(&self) -> usize {
        self.slots.iter().filter(|s| s.id.is_some()).count()
    }

    /// Makes `into`, the table of another cache with the same slots and layers and pools long
    /// enough for the pages in use, hold this table's sequences and page counts: its block
    /// tables keep the room reserved for them, and its free pages are handed out lowest first
    /// (as [`PageRefs::set_refs`] leaves them when a state is restored).
    pub fn restore_into(&self, into: &mut SeqTable) {
        for (to, from) in into.slots.iter_mut().zip(&self.slots) {
            to.id = from.id;
            for (t, f) in to.layers.iter_mut().zip(&from.layers) {
                (t.len, t.quantized) = (f.len, f.quantized);
                t.blocks.clear();
                t.blocks.extend_from_slice(&f.blocks);
            }
        }
        for (to, from) in into.pages.iter_mut().zip(&self.pages) {
            let kept = from.total().min(to.total());
            debug_assert!(from.all_refs()[kept..].iter().all(|&r| r == 0), "pages in use past the end of a pool");
            let mut refs = from.all_refs().to_vec();
            refs.resize(to.total(), 0);
            to.set_refs(&refs);
        }
    }

    /// (Layer `l`, `slot`) and the page counts of layer `l`, to append to.
    pub fn layer_mut(&mut self, l: usize, slot: usize) -> (&mut LayerSeq, &mut PageRefs) {
        (&mut self.slots[slot].layers[l], &mut self.pages[l])
    }

    /// The slot of `seq`, which must exist.
    pub fn slot_of(&self, seq: u32) -> Result<usize> {
        self.find(seq).ok_or(Error::UnknownSequence(seq))
    }

    /// The slot of `seq`, or the free slot it will take (`true` when new).
    pub fn slot_or_new(&self, seq: u32) -> Result<(usize, bool)> {
        match self.find(seq) {
            Some(s) => Ok((s, false)),
            None => match self.free_slot() {
                Some(s) => Ok((s, true)),
                None => Err(Error::TooManySequences { seq, max: self.slots.len() as u32 }),
            },
        }
    }

    /// The slot of `seq`, giving it the first free slot when it is new (one is free: checked).
    pub fn take_slot(&mut self, seq: u32) -> usize {
        match self.find(seq) {
            Some(s) => s,
            None => {
                let s = self.free_slot().expect("free slots were counted");
                self.slots[s].id = Some(seq);
                s
            }
        }
    }

    /// Flushes that appending `n` tokens to (layer `l`, `slot`) causes, and the pages they need
    /// (copy-on-write of a shared last page included).
    pub fn pages_needed(&self, lay: &Layout, l: usize, slot: usize, n: usize) -> usize {
        let ls = &self.slots[slot].layers[l];
        let flushes = ls.flushes(lay, n);
        if flushes == 0 {
            return 0;
        }
        let groups = ls.quantized / lay.group;
        let after = (groups + flushes).div_ceil(lay.groups_per_page);
        let cow = groups % lay.groups_per_page != 0 && self.pages[l].refs(*ls.blocks.last().unwrap()) > 1;
        after - ls.blocks.len() + cow as usize
    }

    /// Where appending `n` tokens to each of `slots` in layer `l`, in this order, puts the group
    /// each pushes out of its window, found before anything changes: for each slot
    /// `Some((page, new))` when a group leaves its window (`new`: the group starts `page`, which
    /// enters the block table), `None` when none does. The appends that follow
    /// ([`LayerSeq::group_page`], in the same order) take exactly these pages. `None` for the
    /// whole call when some group first needs a copy-on-write copy of a shared page, when some
    /// slot flushes more than one group, or when the free pages run out (the caller has checked
    /// that they do not).
    pub fn append_flushes(
        &self,
        lay: &Layout,
        l: usize,
        slots: &[usize],
        n: usize,
    ) -> Option<Vec<Option<(u32, bool)>>> {
        let refs = &self.pages[l];
        let mut allocs = 0;
        slots
            .iter()
            .map(|&slot| {
                let ls = &self.slots[slot].layers[l];
                let g = ls.quantized / lay.group;
                match ls.flushes(lay, n) {
                    0 => Some(None),
                    1 if g % lay.groups_per_page == 0 => {
                        let page = refs.nth_free(allocs)?;
                        allocs += 1;
                        Some(Some((page, true)))
                    }
                    1 => {
                        let page = ls.blocks[g / lay.groups_per_page];
                        (refs.refs(page) == 1).then_some(Some((page, false)))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// Fails when layer `l` has fewer than `pages` free pages, counting those that releasing
    /// slot `replacing` would free; `token` is where `seq` stands.
    pub fn check_pages(&self, l: usize, seq: u32, token: usize, pages: usize, replacing: Option<usize>) -> Result<()> {
        let refs = &self.pages[l];
        let reclaim = match replacing {
            Some(s) => self.slots[s].layers[l].blocks.iter().filter(|&&p| refs.refs(p) == 1).count(),
            None => 0,
        };
        let free = refs.free_count() + reclaim;
        if pages > free {
            return Err(Error::CapacityExhausted {
                seq,
                layer: l as u32,
                token: token as u64,
                needed: pages as u64,
                free: free as u64,
                total: refs.total() as u64,
            });
        }
        Ok(())
    }

    /// Fails when `seq`, holding `len` tokens in layer `l`, cannot take `n` more
    /// (`max_seq_tokens`).
    pub fn check_len(lay: &Layout, l: usize, seq: u32, len: usize, n: usize) -> Result<()> {
        if n > lay.max_seq_tokens.saturating_sub(len) {
            return Err(Error::SequenceFull {
                seq,
                layer: l as u32,
                len: len as u64,
                adding: n as u64,
                max: lay.max_seq_tokens as u32,
            });
        }
        Ok(())
    }

    /// Checks appending `n` tokens to `seq` (created when new) in layer `l`: a slot for it, its
    /// length limit and the pages the append needs. Returns its slot (not yet given to it when
    /// new).
    pub fn check_append(&self, lay: &Layout, l: usize, seq: u32, n: usize) -> Result<usize> {
        let (slot, new) = self.slot_or_new(seq)?;
        let len = if new { 0 } else { self.slots[slot].layers[l].len };
        Self::check_len(lay, l, seq, len, n)?;
        self.check_pages(l, seq, len, self.pages_needed(lay, l, slot, n), None)?;
        Ok(slot)
    }

    /// Checks a decode step of one token for each of `seqs` in layer `l`: distinct ids, slots for
    /// the new ones, pages for all (no allocation).
    pub fn check_decode(&self, lay: &Layout, l: usize, seqs: &[u32]) -> Result<()> {
        let (mut pages, mut new_seqs) = (0usize, 0usize);
        let mut blame = (seqs.first().copied().unwrap_or(0), 0usize);
        for (i, &seq) in seqs.iter().enumerate() {
            if seqs[..i].contains(&seq) {
                return Err(Error::InvalidArgument(format!("sequence {seq} appears twice in one decode step")));
            }
            match self.find(seq) {
                None => {
                    new_seqs += 1;
                    if new_seqs > self.slots.len() - self.live() {
                        return Err(Error::TooManySequences { seq, max: self.slots.len() as u32 });
                    }
                }
                Some(slot) => {
                    Self::check_len(lay, l, seq, self.slots[slot].layers[l].len, 1)?;
                    let need = self.pages_needed(lay, l, slot, 1);
                    if need > 0 {
                        blame = (seq, self.slots[slot].layers[l].len);
                    }
                    pages += need;
                }
            }
        }
        self.check_pages(l, blame.0, blame.1, pages, None)
    }

    /// Empties `slot`, releasing its pages.
    pub fn release(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        for (ls, pages) in s.layers.iter_mut().zip(&mut self.pages) {
            for &p in &ls.blocks {
                pages.decref(p);
            }
            ls.blocks.clear();
            ls.len = 0;
            ls.quantized = 0;
        }
        s.id = None;
    }

    /// Removes `seq`, releasing its pages and its slot.
    pub fn remove(&mut self, seq: u32) -> Result<()> {
        let slot = self.slot_of(seq)?;
        self.release(slot);
        Ok(())
    }

    /// Removes every sequence but `seq`.
    pub fn keep(&mut self, seq: u32) -> Result<()> {
        let keep = self.slot_of(seq)?;
        for slot in 0..self.slots.len() {
            if slot != keep && self.slots[slot].id.is_some() {
                self.release(slot);
            }
        }
        Ok(())
    }

    /// Removes every sequence.
    pub fn clear(&mut self) {
        for slot in 0..self.slots.len() {
            self.release(slot);
        }
    }

    /// Where keeping the first `n` tokens of (layer `l`, `slot`) cuts its quantized groups: the
    /// groups kept whole and the tokens kept of the next one; `None` when no group is cut.
    fn cut(&self, lay: &Layout, l: usize, slot: usize, n: usize) -> Option<(usize, usize)> {
        let ls = &self.slots[slot].layers[l];
        let rel = n.saturating_sub(lay.sinks);
        if n >= ls.len || rel >= ls.quantized {
            return None;
        }
        Some((rel / lay.group, rel % lay.group))
    }

    /// The quantized group `g` whose first `partial` tokens return to the window when (layer `l`,
    /// `slot`) keeps its first `n` tokens, if the cut falls inside a group: the backend writes
    /// them there, dequantized, before [`SeqTable::truncate`].
    pub fn truncated_group(&self, lay: &Layout, l: usize, slot: usize, n: usize) -> Option<(usize, usize)> {
        self.cut(lay, l, slot, n).filter(|&(_, partial)| partial > 0)
    }

    /// Keeps the first `n` tokens of (layer `l`, `slot`) (nothing changes when it holds fewer),
    /// releasing the pages of the groups cut.
    pub fn truncate(&mut self, lay: &Layout, l: usize, slot: usize, n: usize) {
        if n >= self.slots[slot].layers[l].len {
            return;
        }
        let cut = self.cut(lay, l, slot, n);
        let ls = &mut self.slots[slot].layers[l];
        if let Some((keep_groups, _)) = cut {
            let keep_pages = keep_groups.div_ceil(lay.groups_per_page);
            for &p in &ls.blocks[keep_pages..] {
                self.pages[l].decref(p);
            }
            ls.blocks.truncate(keep_pages);
            ls.quantized = keep_groups * lay.group;
        }
        ls.len = n;
    }

    /// The slots of `src` and of `dst` (its own or the free one it will take) for making `dst`
    /// a copy of `src`.
    pub fn copy_slots(&self, src: u32, dst: u32) -> Result<(usize, usize)> {
        let s = self.slot_of(src)?;
        if src == dst {
            return Err(Error::InvalidArgument(format!("source and destination are both sequence {src}")));
        }
        let (d, _) = self.slot_or_new(dst)?;
        Ok((s, d))
    }

    /// Makes slot `d` sequence `dst`, holding what slot `s` holds in every layer, its pages
    /// shared (copy-on-write); what `d` held is released first. The backend copies the windows.
    pub fn copy(&mut self, s: usize, d: usize, dst: u32) {
        self.release(d);
        let (from, to) = two_mut(&mut self.slots, s, d);
        for ((a, b), pages) in from.layers.iter().zip(&mut to.layers).zip(&mut self.pages) {
            b.len = a.len;
            b.quantized = a.quantized;
            b.blocks.extend_from_slice(&a.blocks);
            for &p in &a.blocks {
                pages.incref(p);
            }
        }
        to.id = Some(dst);
    }
}

fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&T, &mut T) {
    assert_ne!(a, b);
    if a < b {
        let (x, y) = v.split_at_mut(b);
        (&x[a], &mut y[0])
    } else {
        let (x, y) = v.split_at_mut(a);
        (&y[0], &mut x[b])
    }
}

/// Read-only view of one (layer, sequence): its pages, its window and its lengths.
#[derive(Clone, Copy)]
pub(crate) struct Stream<'a, T: Element> {
    pub lay: &'a Layout,
    /// The whole page pool of the layer.
    pub pool: &'a [u8],
    pub blocks: &'a [u32],
    /// The windows of every head of this (layer, slot).
    pub window: &'a [T],
    pub len: usize,
    pub quantized: usize,
}

impl<'a, T: Element> Stream<'a, T> {
    /// Tokens held in the sink area.
    #[inline]
    pub fn n_sink(&self) -> usize {
        self.len.min(self.lay.sinks)
    }

    /// First position of the full-precision window.
    #[inline]
    pub fn window_start(&self) -> usize {
        (self.lay.sinks + self.quantized).min(self.len)
    }

    /// The window of head `h`.
    #[inline]
    pub fn head_window(&self, h: usize) -> &'a [T] {
        let n = self.lay.window_head_elems;
        &self.window[h * n..(h + 1) * n]
    }

    /// Keys of window (or sink) token at `pos` in head `h`: `head_dim` elements.
    #[inline]
    pub fn fp_key(&self, h: usize, pos: usize) -> &'a [T] {
        self.fp_row(h, pos, false)
    }

    /// Values of window (or sink) token at `pos` in head `h`.
    #[inline]
    pub fn fp_value(&self, h: usize, pos: usize) -> &'a [T] {
        self.fp_row(h, pos, true)
    }

    #[inline]
    fn fp_row(&self, h: usize, pos: usize, value: bool) -> &'a [T] {
        let lay = self.lay;
        let hd = lay.head_dim;
        let [sk, sv, rk, rv] = lay.window_parts();
        let w = self.head_window(h);
        let o = if pos < lay.sinks {
            (if value { sv } else { sk }) + pos * hd
        } else {
            (if value { rv } else { rk }) + ((pos - lay.sinks) % lay.ring) * hd
        };
        &w[o..o + hd]
    }

    /// The block of head `h` in the page holding quantized group `g`, and the group's index
    /// inside that page.
    #[inline]
    pub fn group_block(&self, g: usize, h: usize) -> (&'a [u8], usize) {
        let lay = self.lay;
        let page = self.blocks[g / lay.groups_per_page] as usize;
        let o = page * lay.page_bytes + h * lay.head_bytes;
        (&self.pool[o..o + lay.head_bytes], g % lay.groups_per_page)
    }

    /// The key at `pos` in head `h`, channel `c`, as the cache holds it.
    pub fn key_at(&self, h: usize, pos: usize, c: usize) -> f64 {
        let lay = self.lay;
        if pos < lay.sinks || pos >= self.window_start() {
            return self.fp_key(h, pos)[c].to_f32() as f64;
        }
        let q = pos - lay.sinks;
        let (g, t) = (q / lay.group, q % lay.group);
        let (blk, gi) = self.group_block(g, h);
        match lay.key_mode {
            KeyMode::PerChannel => {
                let run = lay.k_run_bytes();
                let off = lay.k_codes + (gi * lay.head_dim + c) * run;
                let code = code_at(&blk[off..off + run], t, lay.key_bits);
                let pi = gi * lay.head_dim + c;
                decode(blk, lay.k_scale, lay.k_zero, pi, code)
            }
            KeyMode::PerToken => {
                let row = gi * lay.group + t;
                let run = lay.k_run_bytes();
                let off = lay.k_codes + row * run;
                let code = code_at(&blk[off..off + run], c, lay.key_bits);
                decode(blk, lay.k_scale, lay.k_zero, row * lay.row_groups() + c / lay.vgroup, code)
            }
        }
    }

    /// The value at `pos` in head `h`, channel `c`, as the cache holds it.
    pub fn value_at(&self, h: usize, pos: usize, c: usize) -> f64 {
        let lay = self.lay;
        if pos < lay.sinks || pos >= self.window_start() {
            return self.fp_value(h, pos)[c].to_f32() as f64;
        }
        let q = pos - lay.sinks;
        let (g, t) = (q / lay.group, q % lay.group);
        let (blk, gi) = self.group_block(g, h);
        let row = gi * lay.group + t;
        let run = lay.v_row_bytes();
        let off = lay.v_codes + row * run;
        let code = code_at(&blk[off..off + run], c, lay.value_bits);
        decode(blk, lay.v_scale, lay.v_zero, row * lay.row_groups() + c / lay.vgroup, code)
    }
}

/// Dequantizes one code exactly (in f64) with the f16 parameters stored at index `i`.
fn decode(blk: &[u8], scale_off: usize, zero_off: usize, i: usize, code: u32) -> f64 {
    let p = GroupParams { scale: read_f16(&blk[scale_off..], i), zero: read_f16(&blk[zero_off..], i) };
    code as f64 * p.scale.to_f64() + p.zero.to_f64()
}
