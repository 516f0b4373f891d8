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
//! On a CUDA device (`k_interleave`) each group's key codes are the same bytes in another
//! order: the runs are cut into units of `k_unit_bytes()` (one byte, or 2 or 4 where a run is
//! 16 or 32 bytes: what one tensor-core lane takes of a run) and unit `u` of every channel lies
//! side by side, `[unit][channel]`, so that the four channels a lane reads for one mma are one
//! 32-, 64- or 128-bit word (with one-byte units the channels of each aligned four are stored
//! in the order 0, 2, 1, 3, which puts a lane's pairs where the mma wants them). The host
//! converts between the two orders when pages cross (`key_codes_to_device`,
//! `key_codes_from_device`), so state blobs hold the CPU's order whatever the cache.
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
    /// Whether a CUDA device stores each group's key codes interleaved (the module docs): keys
    /// per channel and head_dim a multiple of 4, unless `KIVI_CUDA_KEY_INTERLEAVE=0` (read when
    /// the layout is made, for measuring one order against the other). CPU caches ignore it.
    pub k_interleave: bool,
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
            k_interleave: c.key_mode == KeyMode::PerChannel
                && hd % 4 == 0
                && std::env::var_os("KIVI_CUDA_KEY_INTERLEAVE").is_none_or(|v| v != "0"),
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

    /// Bytes of one unit of interleaved key codes (`k_interleave`): a tensor-core lane's share
    /// of a run where that is 2 or 4 bytes, else one byte.
    #[inline]
    pub fn k_unit_bytes(&self) -> usize {
        match self.k_run_bytes() {
            r @ (16 | 32) => r / 8,
            _ => 1,
        }
    }

    /// Offset, inside one group's key codes as a CUDA device stores them, of byte `b` of
    /// channel `c`'s run (`c * k_run_bytes() + b` where they are not interleaved). Must match
    /// `key_byte()` in cuda/common.cuh.
    #[inline]
    pub fn device_key_byte(&self, c: usize, b: usize) -> usize {
        if !self.k_interleave {
            return c * self.k_run_bytes() + b;
        }
        let ku = self.k_unit_bytes();
        let slot = if ku == 1 { (c & !3) | ((c & 1) << 1) | ((c >> 1) & 1) } else { c };
        b / ku * self.head_dim * ku + slot * ku + b % ku
    }

    /// Rearranges the key codes of every group of every head in `pages` (whole pages) from the
    /// CPU's order to a CUDA device's. Nothing to do where they are not interleaved.
    pub fn key_codes_to_device(&self, pages: &mut [u8]) {
        self.reorder_key_codes(pages, true)
    }

    /// The other way: `pages` copied from a CUDA device, their key codes into the CPU's order.
    pub fn key_codes_from_device(&self, pages: &mut [u8]) {
        self.reorder_key_codes(pages, false)
    }

    fn reorder_key_codes(&self, pages: &mut [u8], to_device: bool) {
        if !self.k_interleave {
            return;
        }
        let n = self.head_dim * self.k_run_bytes();
        let mut tmp = vec![0u8; n];
        for head in pages.chunks_exact_mut(self.head_bytes) {
            for group in head[self.k_codes..self.k_codes + self.groups_per_page * n].chunks_exact_mut(n) {
                tmp.copy_from_slice(group);
                for c in 0..self.head_dim {
                    for b in 0..self.k_run_bytes() {
                        let (cpu, dev) = (c * self.k_run_bytes() + b, self.device_key_byte(c, b));
                        if to_device {
                            group[dev] = tmp[cpu];
                        } else {
                            group[cpu] = tmp[dev];
                        }
                    }
                }
            }
        }
    }

    /// `pages` (whole pages, in the CPU's order) as a CUDA device stores them: a rearranged copy
    /// where the key codes are interleaved, else `pages` itself.
    pub fn device_pages<'a>(&self, pages: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if !self.k_interleave {
            return pages.into();
        }
        let mut copy = pages.to_vec();
        self.key_codes_to_device(&mut copy);
        copy.into()
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

    /// A CUDA device's order of a group's key codes is a permutation of the CPU's in which the
    /// unit of every four adjacent channels that one tensor-core lane reads is one word (its
    /// channels in the order the kernel takes them), and the host's conversion moves exactly the
    /// key codes, there and back.
    #[test]
    fn key_codes_interleave_for_the_device() {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        let mut rng = crate::testing::Rng(seed);
        for (hd, g, bits, page) in
            [(128, 32, 2, 0), (128, 32, 4, 64), (64, 16, 2, 0), (256, 64, 4, 128), (96, 64, 2, 0), (80, 32, 8, 96)]
        {
            let mut c = CacheConfig::new(1, 2, hd);
            (c.group_size, c.key_bits, c.value_group, c.page_tokens) = (g, bits, 16, page);
            let lay = Layout::new(&c);
            assert!(lay.k_interleave);
            let (run, ku) = (lay.k_run_bytes(), lay.k_unit_bytes());
            assert_eq!(ku, if run == 16 || run == 32 { run / 8 } else { 1 });
            let n = hd as usize * run;
            let mut seen = vec![false; n];
            for ch in 0..hd as usize {
                for b in 0..run {
                    let at = lay.device_key_byte(ch, b);
                    assert!(at < n && !seen[at], "hd {hd}, G {g}, {bits} bits: channel {ch}, byte {b} at {at}");
                    seen[at] = true;
                }
            }
            // A lane's word: unit u of channels c0 .. c0 + 3, one-byte units in the order 0, 2, 1, 3.
            let order: [usize; 4] = if ku == 1 { [0, 2, 1, 3] } else { [0, 1, 2, 3] };
            for c0 in (0..hd as usize).step_by(4) {
                for u in 0..run / ku {
                    let word = lay.device_key_byte(c0, u * ku);
                    assert_eq!(word % (4 * ku), 0, "channel {c0}, unit {u}: an aligned word");
                    for (i, &ch) in order.iter().enumerate() {
                        for k in 0..ku {
                            assert_eq!(lay.device_key_byte(c0 + ch, u * ku + k), word + i * ku + k);
                        }
                    }
                }
            }
            let cpu: Vec<u8> = (0..2 * lay.page_bytes).map(|_| rng.next() as u8).collect();
            let mut dev = cpu.clone();
            lay.key_codes_to_device(&mut dev);
            assert_eq!(*lay.device_pages(&cpu), dev[..]);
            for (i, (&x, &y)) in cpu.iter().zip(&dev).enumerate() {
                let at = i % lay.head_bytes;
                let codes = lay.k_codes..lay.k_codes + lay.groups_per_page * n;
                if !codes.contains(&at) {
                    assert_eq!(x, y, "seed {seed}: byte {i} is no key code and must stay");
                } else if x != y {
                    // Moved: byte b of channel ch of its group went where the device wants it.
                    let (grp, o) = ((at - lay.k_codes) / n, (at - lay.k_codes) % n);
                    let d = i - at + lay.k_codes + grp * n + lay.device_key_byte(o / run, o % run);
                    assert_eq!(dev[d], x, "seed {seed}: byte {i}");
                }
            }
            assert_ne!(cpu, dev);
            lay.key_codes_from_device(&mut dev);
            assert_eq!(cpu, dev);
        }
        // Keys per token, and head sizes that are no multiple of 4, keep the CPU's order.
        let mut c = CacheConfig::new(1, 2, 128);
        c.key_mode = KeyMode::PerToken;
        assert!(!Layout::new(&c).k_interleave);
        let c = CacheConfig::new(1, 2, 66);
        let lay = Layout::new(&c);
        assert!(!lay.k_interleave);
        assert_eq!(lay.device_key_byte(3, 5), 3 * lay.k_run_bytes() + 5);
    }

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
