//! Where every byte lives: the layout of a page and of a full-precision window slot.
//!
//! ## Pages (quantized tokens)
//! Each layer has its own pool of pages; a page holds `page_tokens` tokens (a whole number of key
//! groups) of every KV head of one layer. Inside a page the heads follow one another, and one
//! head's block holds, each part starting on a 64-byte boundary:
//!
//! | part | per-channel keys (KIVI) | per-token keys (baseline) |
//! |---|---|---|
//! | key codes | `[group][channel][G tokens]` | `[token][head_dim channels]` |
//! | key scales, zeros (f16) | `[group][channel]` each | `[token][head_dim / value_group]` each |
//! | value codes | `[token][head_dim channels]` | same |
//! | value scales, zeros (f16) | `[token][head_dim / value_group]` each | same |
//!
//! Codes are packed little-endian: element `i` of a packed run of `b`-bit codes sits at bits
//! `i*b .. i*b+b` of the run (byte `i*b/8`, shift `i*b%8`). A per-channel key run is the G codes
//! of one channel in one group, so `q . k` over a group folds the scale into the query once and
//! the zero into one bias.
//!
//! ## Windows (full-precision tokens)
//! Each (layer, sequence slot, head) has `sinks` tokens of keys and of values, then a ring of
//! `W = residual + group_size` tokens of keys and of values, in the cache's dtype. The window
//! token at position `p` (counted from the start of the sequence, `p >= sinks`) lives in ring
//! slot `(p - sinks) % W`.

use crate::config::{CacheConfig, DType, KeyMode, Rounding};

/// Rounds up to a multiple of 64 bytes.
pub(crate) const fn align64(n: usize) -> usize {
    (n + 63) & !63
}

/// Sizes and offsets derived from a validated [`CacheConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub key_bits: u32,
    pub value_bits: u32,
    pub key_mode: KeyMode,
    pub value_rounding: Rounding,
    /// G: tokens per key group.
    pub group: usize,
    /// Channels per value group.
    pub vgroup: usize,
    pub residual: usize,
    pub sinks: usize,
    /// W = R + G: ring length of a window.
    pub ring: usize,
    pub page_tokens: usize,
    pub groups_per_page: usize,
    pub max_seqs: usize,
    pub pages_per_layer: usize,
    /// Tokens one sequence may hold (`usize::MAX`: no limit but the pool).
    pub max_seq_tokens: usize,
    /// Pages one sequence can hold in a layer: the length of a block table.
    pub seq_pages: usize,

    // Offsets inside one head's block of a page.
    pub k_codes: usize,
    pub k_scale: usize,
    pub k_zero: usize,
    pub v_codes: usize,
    pub v_scale: usize,
    pub v_zero: usize,
    pub head_bytes: usize,
    pub page_bytes: usize,

    /// Elements of one head's window: sink keys, sink values, ring keys, ring values.
    pub window_head_elems: usize,
}

impl Layout {
    pub fn new(c: &CacheConfig) -> Layout {
        let hd = c.head_dim as usize;
        let g = c.group_size.max(1) as usize;
        let vg = c.value_group.max(1) as usize;
        let p = c.effective_page_tokens().max(1) as usize;
        let gpp = p / g;
        let kb = c.key_bits as usize;
        let vb = c.value_bits as usize;
        let k_params = match c.key_mode {
            KeyMode::PerChannel => gpp * hd,
            KeyMode::PerToken => p * (hd / vg),
        };
        let k_codes = 0;
        let k_scale = k_codes + align64(p * hd * kb / 8);
        let k_zero = k_scale + align64(k_params * 2);
        let v_codes = k_zero + align64(k_params * 2);
        let v_scale = v_codes + align64(p * hd * vb / 8);
        let v_zero = v_scale + align64(p * (hd / vg) * 2);
        let head_bytes = v_zero + align64(p * (hd / vg) * 2);
        let page_bytes = head_bytes * c.n_kv_heads as usize;
        let groups_needed = (c.max_tokens as usize).div_ceil(g);
        // Pages larger than one group can be partly filled: one spare page per sequence.
        let spare = if gpp > 1 { c.max_seqs as usize } else { 0 };
        let pages_per_layer = groups_needed.div_ceil(gpp) + spare;
        let (max_seq_tokens, seq_pages) = match c.max_seq_tokens {
            0 => (usize::MAX, pages_per_layer),
            m => (m as usize, (m as usize).div_ceil(g).div_ceil(gpp).min(pages_per_layer)),
        };
        let ring = c.residual as usize + g;
        let s = c.sinks as usize;
        Layout {
            n_layers: c.n_layers as usize,
            n_kv_heads: c.n_kv_heads as usize,
            head_dim: hd,
            dtype: c.dtype,
            key_bits: kb as u32,
            value_bits: vb as u32,
            key_mode: c.key_mode,
            value_rounding: c.value_rounding,
            group: g,
            vgroup: vg,
            residual: c.residual as usize,
            sinks: s,
            ring,
            page_tokens: p,
            groups_per_page: gpp,
            max_seqs: c.max_seqs as usize,
            pages_per_layer,
            max_seq_tokens,
            seq_pages,
            k_codes,
            k_scale,
            k_zero,
            v_codes,
            v_scale,
            v_zero,
            head_bytes,
            page_bytes,
            window_head_elems: 2 * s * hd + 2 * ring * hd,
        }
    }

    /// Bytes of all page pools and windows together.
    pub fn total_bytes(&self) -> u128 {
        let pages = self.n_layers as u128 * self.pages_per_layer as u128 * self.page_bytes as u128;
        let windows = self.n_layers as u128 * self.max_seqs as u128 * self.n_kv_heads as u128;
        pages + windows * self.window_head_elems as u128 * self.dtype.size() as u128
    }

    /// Bytes of the block tables: one of [`Layout::seq_pages`] pages for every (sequence,
    /// layer). A CUDA cache has them on the device too.
    pub fn block_table_bytes(&self) -> u128 {
        self.seq_pages as u128 * 4 * self.n_layers as u128 * self.max_seqs as u128
    }

    /// Host bytes of the page tables: the block tables, and each layer's page references and
    /// free list.
    pub fn table_bytes(&self) -> u128 {
        self.block_table_bytes() + self.pages_per_layer as u128 * 4 * 2 * self.n_layers as u128
    }

    /// Bytes of the windows of one (layer, slot): every head's, in the cache's dtype.
    pub fn slot_window_bytes(&self) -> usize {
        self.n_kv_heads * self.window_head_elems * self.dtype.size()
    }

    /// Elements of every window of every layer and slot.
    pub fn window_elems_total(&self) -> usize {
        self.n_layers * self.max_seqs * self.n_kv_heads * self.window_head_elems
    }

    /// Start (in elements) of the window of (layer, slot, head).
    #[inline]
    pub fn window_base(&self, layer: usize, slot: usize, head: usize) -> usize {
        ((layer * self.max_seqs + slot) * self.n_kv_heads + head) * self.window_head_elems
    }

    /// Element offsets, inside one head's window, of the sink keys, sink values, ring keys and
    /// ring values.
    #[inline]
    pub fn window_parts(&self) -> [usize; 4] {
        let s = self.sinks * self.head_dim;
        let r = self.ring * self.head_dim;
        [0, s, 2 * s, 2 * s + r]
    }

    /// Key code bytes per packed run: one channel of one group (per channel), or one token.
    #[inline]
    pub fn k_run_bytes(&self) -> usize {
        match self.key_mode {
            KeyMode::PerChannel => self.group * self.key_bits as usize / 8,
            KeyMode::PerToken => self.head_dim * self.key_bits as usize / 8,
        }
    }

    /// Value code bytes of one token.
    #[inline]
    pub fn v_row_bytes(&self) -> usize {
        self.head_dim * self.value_bits as usize / 8
    }

    /// Channel groups per token row (values, and keys per token).
    #[inline]
    pub fn row_groups(&self) -> usize {
        self.head_dim / self.vgroup
    }

    /// Where the group at position `pos` of a page lives inside one head's block: (offset,
    /// bytes) of its key codes, key scales, key zeros, value codes, value scales and value
    /// zeros. Copying these six runs of every head moves one group between pages of any size.
    pub fn group_parts(&self, pos: usize) -> [(usize, usize); 6] {
        let (g, hd) = (self.group, self.head_dim);
        let tok = pos * g;
        let row_params = self.row_groups() * 2;
        let (k_codes, k_params) = match self.key_mode {
            KeyMode::PerChannel => ((pos * hd * self.k_run_bytes(), hd * self.k_run_bytes()), (pos * hd * 2, hd * 2)),
            KeyMode::PerToken => {
                ((tok * self.k_run_bytes(), g * self.k_run_bytes()), (tok * row_params, g * row_params))
            }
        };
        let v_row = self.v_row_bytes();
        [
            (self.k_codes + k_codes.0, k_codes.1),
            (self.k_scale + k_params.0, k_params.1),
            (self.k_zero + k_params.0, k_params.1),
            (self.v_codes + tok * v_row, g * v_row),
            (self.v_scale + tok * row_params, g * row_params),
            (self.v_zero + tok * row_params, g * row_params),
        ]
    }

    /// Code and scale/zero bytes that one quantized token of one head actually uses.
    pub fn quantized_token_bytes(&self) -> (usize, usize) {
        let codes = self.head_dim * (self.key_bits + self.value_bits) as usize / 8;
        let k_params = match self.key_mode {
            KeyMode::PerChannel => self.head_dim * 4 / self.group,
            KeyMode::PerToken => self.row_groups() * 4,
        };
        (codes, k_params + self.row_groups() * 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The groups of a page, part by part, tile each part of a head's block in order, without
    /// gaps or overlaps, for both key modes and pages of one or several groups.
    #[test]
    fn group_parts_tile_a_heads_block() {
        for (mode, page, bits) in
            [(KeyMode::PerChannel, 0, 2), (KeyMode::PerToken, 64, 4), (KeyMode::PerChannel, 96, 8)]
        {
            let mut c = CacheConfig::new(1, 3, 96);
            (c.key_mode, c.page_tokens, c.group_size, c.value_group) = (mode, page, 32, 48);
            (c.key_bits, c.value_bits) = (bits, 2);
            let lay = Layout::new(&c);
            let starts = [lay.k_codes, lay.k_scale, lay.k_zero, lay.v_codes, lay.v_scale, lay.v_zero];
            let mut ends = starts;
            for pos in 0..lay.groups_per_page {
                for (i, (at, n)) in lay.group_parts(pos).into_iter().enumerate() {
                    assert_eq!(at, ends[i], "{mode:?}, page {page}: part {i} of group {pos}");
                    assert!(n > 0);
                    ends[i] = at + n;
                }
            }
            // Each part ends where its padding to 64 bytes begins.
            let next = [lay.k_scale, lay.k_zero, lay.v_codes, lay.v_scale, lay.v_zero, lay.head_bytes];
            for i in 0..6 {
                assert_eq!(align64(ends[i]), next[i], "{mode:?}, page {page}: part {i}");
            }
        }
    }

    /// Block tables are as long as one sequence's pages, never longer than the pool.
    #[test]
    fn block_tables_hold_one_sequences_pages() {
        let mut c = CacheConfig::new(32, 8, 128);
        (c.max_tokens, c.max_seqs) = (1 << 20, 256);
        let unbounded = Layout::new(&c);
        assert_eq!(unbounded.seq_pages, unbounded.pages_per_layer);
        assert_eq!(unbounded.block_table_bytes(), 1 << 30, "1M tokens of 32-token pages, 256 x 32 tables");
        c.max_seq_tokens = 32768;
        assert_eq!(Layout::new(&c).block_table_bytes(), 32 << 20);
        // A limit inside a page: 100 tokens are 7 groups of 16, 4 pages of 2 groups.
        (c.group_size, c.page_tokens, c.max_seq_tokens) = (16, 32, 100);
        assert_eq!(Layout::new(&c).seq_pages, 4);
        // A limit past the pool: the pool's pages (plus the spare per sequence).
        (c.max_tokens, c.max_seqs, c.max_seq_tokens) = (64, 3, 1000);
        let lay = Layout::new(&c);
        assert_eq!((lay.pages_per_layer, lay.seq_pages), (2 + 3, 5));
    }
}
