//! Sequences: which slot each sequence id has, and per layer how many tokens it holds, how many of
//! them are quantized and which pages hold them. [`Stream`] is a read-only view of one
//! (layer, sequence) that attention and dequantization read through.

use crate::config::KeyMode;
use crate::layout::Layout;
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

/// One sequence slot: an id when in use, and one [`LayerSeq`] per layer.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub id: Option<u32>,
    pub layers: Vec<LayerSeq>,
}

/// All sequence slots. Block tables are reserved at creation, so appending never allocates.
#[derive(Debug, Clone)]
pub(crate) struct SeqTable {
    pub slots: Vec<Slot>,
}

impl SeqTable {
    pub fn new(lay: &Layout) -> SeqTable {
        let layer = || LayerSeq { len: 0, quantized: 0, blocks: Vec::with_capacity(lay.pages_per_layer) };
        let slot = || Slot { id: None, layers: (0..lay.n_layers).map(|_| layer()).collect() };
        SeqTable { slots: (0..lay.max_seqs).map(|_| slot()).collect() }
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
