//! Save and restore: the whole cache, or one sequence, to a byte buffer and back.
//!
//! A state blob is a fixed header (magic `KIVISTAT`, format version, kind, the cache's
//! dimensions and settings, payload length), the payload, and a CRC-32 of everything before it.
//! Restoring checks the checksum, the version, the settings and every length and index in the
//! payload before it changes anything: a corrupt or mismatched blob is an error, and the cache
//! is left as it was. Page size and capacity (the last three header fields) may differ from the
//! restoring cache's: the blob's pages are read in its own page size (its page count per layer
//! follows from them as `Layout::new` computes it, so a change to that rule needs a new
//! [`STATE_VERSION`]) and regrouped into the cache's.
//!
//! Payload of a whole cache: per layer, the reference count of every page and the bytes of each
//! page in use; then each live sequence (slot, id, and per layer its length, quantized length,
//! block table and window). Page sharing between forked sequences is kept.
//! Payload of one sequence: its id, then per layer its length, quantized length, the bytes of
//! its pages in order, and its window.

use crate::cache::Cache;
use crate::config::CacheConfig;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::seq::SeqTable;

const MAGIC: &[u8; 8] = b"KIVISTAT";
/// The state format this library writes and reads.
pub const STATE_VERSION: u32 = 1;
const KIND_CACHE: u32 = 0;
const KIND_SEQ: u32 = 1;
const N_FIELDS: usize = 14;
pub(crate) const HEADER: usize = 8 + 4 + 4 + 4 * N_FIELDS + 8;
const FIELD_NAMES: [&str; N_FIELDS] = [
    "n_layers",
    "n_kv_heads",
    "head_dim",
    "dtype",
    "key_bits",
    "value_bits",
    "key_mode",
    "group_size",
    "value_group",
    "residual",
    "sinks",
    "page_tokens",
    "max_tokens",
    "max_seqs",
];

fn fields(c: &CacheConfig) -> [u32; N_FIELDS] {
    [
        c.n_layers,
        c.n_kv_heads,
        c.head_dim,
        c.dtype as u32,
        c.key_bits as u32,
        c.value_bits as u32,
        c.key_mode as u32,
        c.group_size,
        c.value_group,
        c.residual,
        c.sinks,
        c.effective_page_tokens(),
        c.max_tokens,
        c.max_seqs,
    ]
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() - self.at {
            return Err(Error::CorruptState(format!(
                "truncated: {n} bytes needed at offset {}, {} left",
                self.at,
                self.buf.len() - self.at
            )));
        }
        self.at += n;
        Ok(&self.buf[self.at - n..self.at])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

/// One layer of one sequence, as read from a blob (checked).
struct LayerRec<'a> {
    len: usize,
    quantized: usize,
    /// Page numbers (whole-cache blobs) or nothing (sequence blobs).
    blocks: Vec<u32>,
    /// Page bytes in block order (sequence blobs) or empty.
    pages: &'a [u8],
    window: &'a [u8],
}

/// Bytes of a whole-cache blob of `seqs`: what [`Cache::state_size`] says, for either backend
/// (the CUDA cache saves the same blob).
pub(crate) fn cache_state_size(lay: &Layout, seqs: &SeqTable) -> usize {
    let window_bytes = lay.slot_window_bytes();
    // Header, CRC, sequence count.
    let mut n = HEADER + 4 + 4;
    for pages in &seqs.pages {
        n += 4 * lay.pages_per_layer + pages.used_count() * lay.page_bytes;
    }
    for slot in seqs.slots.iter().filter(|s| s.id.is_some()) {
        n += 8;
        for ls in &slot.layers {
            n += 8 + 8 + 4 + 4 * ls.blocks.len() + window_bytes;
        }
    }
    n
}

/// Bytes of a blob of the sequence in slot `s` of `seqs`: what [`Cache::seq_state_size`] says,
/// for either backend.
pub(crate) fn seq_state_size(lay: &Layout, seqs: &SeqTable, s: usize) -> usize {
    let window_bytes = lay.slot_window_bytes();
    // Header, CRC, sequence id.
    let mut n = HEADER + 4 + 4;
    for ls in &seqs.slots[s].layers {
        n += 8 + 8 + ls.blocks.len() * lay.page_bytes + window_bytes;
    }
    n
}

impl Cache {
    /// Bytes [`Cache::save_state`] writes now.
    pub fn state_size(&self) -> usize {
        cache_state_size(&self.lay, &self.seqs)
    }

    /// Writes the whole cache into `buf` (at least [`Cache::state_size`] bytes); returns the
    /// bytes written.
    pub fn save_state(&self, buf: &mut [u8]) -> Result<usize> {
        self.save_state_as(&self.cfg, buf)
    }

    /// [`Cache::save_state`] with the header of a cache of configuration `cfg`: the same
    /// settings and page size, pools at least as long (the pages past this cache's are written
    /// as free). A CUDA cache saves through a host copy of only the pages it uses.
    pub(crate) fn save_state_as(&self, cfg: &CacheConfig, buf: &mut [u8]) -> Result<usize> {
        let lay = Layout::new(cfg);
        let size = cache_state_size(&lay, &self.seqs);
        if buf.len() < size {
            return Err(Error::BufferTooSmall { needed: size, given: buf.len() });
        }
        let mut w = header(cfg, buf, KIND_CACHE, size);
        for (pool, pages) in self.pools.iter().zip(&self.seqs.pages) {
            for &r in pages.all_refs() {
                w.u32(r);
            }
            for _ in pages.total()..lay.pages_per_layer {
                w.u32(0);
            }
            for (p, &r) in pages.all_refs().iter().enumerate() {
                if r > 0 {
                    w.put(pool.page(p as u32));
                }
            }
        }
        let live: Vec<usize> = (0..self.seqs.slots.len()).filter(|&s| self.seqs.slots[s].id.is_some()).collect();
        w.u32(live.len() as u32);
        for &s in &live {
            let slot = &self.seqs.slots[s];
            w.u32(s as u32);
            w.u32(slot.id.unwrap());
            for (l, ls) in slot.layers.iter().enumerate() {
                w.u64(ls.len as u64);
                w.u64(ls.quantized as u64);
                w.u32(ls.blocks.len() as u32);
                for &b in &ls.blocks {
                    w.u32(b);
                }
                w.put(self.window_slice(l, s));
            }
        }
        Ok(finish(w, size))
    }

    /// The whole cache as a new vector.
    pub fn save_state_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.state_size()];
        self.save_state(&mut v).expect("sized by state_size");
        v
    }

    /// Replaces the whole cache with a state saved by [`Cache::save_state`] from a cache of the
    /// same dimensions and quantization settings. Its capacity (`max_tokens`, `max_seqs`,
    /// `max_seq_tokens`) and page size may differ as long as the saved sequences fit: pages are
    /// regrouped into this cache's page size, and pages that forked sequences share stay shared.
    pub fn load_state(&mut self, buf: &[u8]) -> Result<()> {
        let st = read_cache_state(&self.cfg, &self.lay, buf)?;
        // Everything checked: apply.
        let (src, lay) = (&st.src, &self.lay);
        self.seqs.clear();
        for (l, (p, (refs, data))) in st.placed.iter().zip(&st.pools).enumerate() {
            // The saved pages in use follow one another in page order.
            let mut at = vec![0usize; refs.len()];
            let mut n = 0;
            for (a, &rc) in at.iter_mut().zip(refs) {
                *a = n;
                n += (rc > 0) as usize;
            }
            let saved = |b: u32| &data[at[b as usize] * src.page_bytes..][..src.page_bytes];
            self.seqs.pages[l].set_refs(&p.refs);
            for (dst, groups) in &p.pages {
                fill_page(src, saved, groups, lay, self.pools[l].page_mut(*dst));
            }
        }
        for (i, (s, id, layers)) in st.seqs.into_iter().enumerate() {
            self.seqs.slots[s].id = Some(id);
            for (l, rec) in layers.into_iter().enumerate() {
                let ls = &mut self.seqs.slots[s].layers[l];
                ls.len = rec.len;
                ls.quantized = rec.quantized;
                ls.blocks.extend_from_slice(&st.placed[l].blocks[i]);
                self.window_slice_mut(l, s).copy_from_slice(rec.window);
            }
        }
        Ok(())
    }

    /// Bytes [`Cache::save_seq_state`] writes for `seq` now.
    pub fn seq_state_size(&self, seq: u32) -> Result<usize> {
        let s = self.seqs.slot_of(seq)?;
        Ok(self.seq_size(s))
    }

    fn seq_size(&self, s: usize) -> usize {
        seq_state_size(&self.lay, &self.seqs, s)
    }

    /// Writes sequence `seq` into `buf` (at least [`Cache::seq_state_size`] bytes); returns the
    /// bytes written.
    pub fn save_seq_state(&self, seq: u32, buf: &mut [u8]) -> Result<usize> {
        self.save_seq_state_as(seq, &self.cfg, buf)
    }

    /// [`Cache::save_seq_state`] with the header of a cache of configuration `cfg` (the same
    /// dimensions, another capacity): a CUDA cache saves through a host copy sized for the
    /// sequence and writes the blob the CPU cache of its own configuration would write.
    pub(crate) fn save_seq_state_as(&self, seq: u32, cfg: &CacheConfig, buf: &mut [u8]) -> Result<usize> {
        let s = self.seqs.slot_of(seq)?;
        let size = self.seq_size(s);
        if buf.len() < size {
            return Err(Error::BufferTooSmall { needed: size, given: buf.len() });
        }
        let mut w = header(cfg, buf, KIND_SEQ, size);
        w.u32(seq);
        for (l, ls) in self.seqs.slots[s].layers.iter().enumerate() {
            w.u64(ls.len as u64);
            w.u64(ls.quantized as u64);
            for &b in &ls.blocks {
                w.put(self.pools[l].page(b));
            }
            w.put(self.window_slice(l, s));
        }
        Ok(finish(w, size))
    }

    /// Sequence `seq` as a new vector.
    pub fn save_seq_state_vec(&self, seq: u32) -> Result<Vec<u8>> {
        let mut v = vec![0; self.seq_state_size(seq)?];
        self.save_seq_state(seq, &mut v)?;
        Ok(v)
    }

    /// Loads a sequence saved by [`Cache::save_seq_state`] (from a cache with the same
    /// dimensions and quantization settings; capacity and page size may differ) as sequence
    /// `seq`, replacing it if it exists.
    pub fn load_seq_state(&mut self, seq: u32, buf: &[u8]) -> Result<()> {
        let (mut r, src) = open(&self.cfg, buf, KIND_SEQ)?;
        let lay = self.lay.clone();
        let _saved_id = r.u32()?;
        let mut layers = Vec::with_capacity(lay.n_layers);
        for l in 0..lay.n_layers {
            let rec = read_layer(&mut r, &src, false)?;
            check_seq_len(&lay, seq, l, rec.len)?;
            layers.push(rec);
        }
        let (slot, new) = self.seqs.slot_or_new(seq)?;
        let pages_of = |rec: &LayerRec| (rec.quantized / lay.group).div_ceil(lay.groups_per_page);
        for (l, rec) in layers.iter().enumerate() {
            self.seqs.check_pages(l, seq, rec.len, pages_of(rec), (!new).then_some(slot))?;
        }
        // Everything checked: apply.
        self.seq_remove(seq).ok();
        self.seqs.slots[slot].id = Some(seq);
        for (l, rec) in layers.into_iter().enumerate() {
            let saved = |b: u32| &rec.pages[b as usize * src.page_bytes..][..src.page_bytes];
            let n_groups = rec.quantized / lay.group;
            for j in 0..pages_of(&rec) {
                let groups = page_groups(&src, &lay, j, n_groups, |b| b as u32);
                let p = self.seqs.pages[l].alloc();
                fill_page(&src, saved, &groups, &lay, self.pools[l].page_mut(p));
                self.seqs.slots[slot].layers[l].blocks.push(p);
            }
            let ls = &mut self.seqs.slots[slot].layers[l];
            ls.len = rec.len;
            ls.quantized = rec.quantized;
            self.window_slice_mut(l, slot).copy_from_slice(rec.window);
        }
        Ok(())
    }

    fn window_slice(&self, l: usize, slot: usize) -> &[u8] {
        let b = self.lay.window_base(l, slot, 0) * self.lay.dtype.size();
        &self.windows.bytes()[b..b + self.lay.slot_window_bytes()]
    }

    fn window_slice_mut(&mut self, l: usize, slot: usize) -> &mut [u8] {
        let b = self.lay.window_base(l, slot, 0) * self.lay.dtype.size();
        let n = self.lay.slot_window_bytes();
        &mut self.windows.bytes_mut()[b..b + n]
    }
}

/// A whole-cache blob, read, checked and placed into a cache of configuration `cfg` and layout
/// `lay`: what loading it changes, computed before anything changes.
struct CacheState<'a> {
    /// The layout the blob was written with.
    src: Layout,
    /// Per layer, the saved page reference counts and the bytes of the saved pages in use.
    pools: Vec<(Vec<u32>, &'a [u8])>,
    /// Each saved sequence: its slot in the cache, its id and its layers.
    seqs: Vec<(usize, u32, Vec<LayerRec<'a>>)>,
    /// Per layer, where its pages go.
    placed: Vec<Placement>,
}

fn read_cache_state<'a>(cfg: &CacheConfig, lay: &Layout, buf: &'a [u8]) -> Result<CacheState<'a>> {
    let (mut r, src) = open(cfg, buf, KIND_CACHE)?;
    let mut pools = Vec::with_capacity(lay.n_layers);
    for _ in 0..lay.n_layers {
        let refs: Vec<u32> = r.take(4 * src.pages_per_layer)?.chunks_exact(4).map(le_u32).collect();
        let used = refs.iter().filter(|&&x| x > 0).count();
        let data = r.take(used * src.page_bytes)?;
        pools.push((refs, data));
    }
    let n_live = r.u32()? as usize;
    if n_live > src.max_seqs {
        return Err(Error::CorruptState(format!("{n_live} sequences, the cache holds at most {}", src.max_seqs)));
    }
    if n_live > lay.max_seqs {
        return Err(Error::StateMismatch(format!(
            "the state holds {n_live} sequences, this cache at most {} (max_seqs)",
            lay.max_seqs
        )));
    }
    let mut seqs = Vec::with_capacity(n_live);
    let mut counted = vec![vec![0u32; src.pages_per_layer]; lay.n_layers];
    for _ in 0..n_live {
        let slot = r.u32()? as usize;
        let id = r.u32()?;
        if slot >= src.max_seqs || seqs.iter().any(|(s, i, _): &(usize, u32, _)| *s == slot || *i == id) {
            return Err(Error::CorruptState(format!(
                "sequence {id} in slot {slot}: slot or id repeated or out of range"
            )));
        }
        let mut layers = Vec::with_capacity(lay.n_layers);
        for (l, count) in counted.iter_mut().enumerate() {
            let rec = read_layer(&mut r, &src, true)?;
            check_seq_len(lay, id, l, rec.len)?;
            for &b in &rec.blocks {
                if b as usize >= src.pages_per_layer || pools[l].0[b as usize] == 0 {
                    return Err(Error::CorruptState(format!("sequence {id} layer {l}: page {b} not in use")));
                }
                count[b as usize] += 1;
            }
            layers.push(rec);
        }
        seqs.push((slot, id, layers));
    }
    for (l, count) in counted.iter().enumerate() {
        if count != &pools[l].0 {
            return Err(Error::CorruptState(format!("layer {l}: page reference counts do not match the sequences")));
        }
    }
    // Into this cache: the saved slots when they all exist here, else the first ones.
    if seqs.iter().any(|&(s, _, _)| s >= lay.max_seqs) {
        for (i, s) in seqs.iter_mut().enumerate() {
            s.0 = i;
        }
    }
    let mut placed = Vec::with_capacity(lay.n_layers);
    for (l, (refs, _)) in pools.iter().enumerate() {
        let tables: Vec<(&[u32], usize)> =
            seqs.iter().map(|(_, _, layers)| (&layers[l].blocks[..], layers[l].quantized / lay.group)).collect();
        let p = place(&src, lay, refs, &tables);
        if p.pages.len() > lay.pages_per_layer {
            return Err(Error::StateMismatch(format!(
                "layer {l}: the state's sequences need {} pages of {} tokens, this cache has {} (max_tokens {})",
                p.pages.len(),
                lay.page_tokens,
                lay.pages_per_layer,
                cfg.max_tokens
            )));
        }
        placed.push(p);
    }
    Ok(CacheState { src, pools, seqs, placed })
}

/// How far into each layer's pool of a cache of configuration `cfg` a whole-cache blob reaches
/// when loaded (the highest page number it uses, plus one): a cache whose pools are that long
/// holds it under the same page numbers. Fails as loading would.
pub(crate) fn cache_state_pages(cfg: &CacheConfig, buf: &[u8]) -> Result<usize> {
    let st = read_cache_state(cfg, &Layout::new(cfg), buf)?;
    Ok(st.placed.iter().flat_map(|p| p.pages.iter().map(|(b, _)| *b as usize + 1)).max().unwrap_or(0))
}

/// Checks a blob's header and checksum against a cache of configuration `cfg`; returns a reader
/// over its payload and the layout the blob was written with (`cfg`'s, with the blob's page
/// size and capacity).
fn open<'a>(cfg: &CacheConfig, buf: &'a [u8], kind: u32) -> Result<(Reader<'a>, Layout)> {
    if buf.len() < HEADER + 4 {
        return Err(Error::CorruptState(format!("{} bytes, shorter than the {}-byte header", buf.len(), HEADER + 4)));
    }
    if &buf[..8] != MAGIC {
        return Err(Error::CorruptState("not a kivi state (bad magic)".into()));
    }
    let mut r = Reader { buf, at: 8 };
    let version = r.u32()?;
    if version != STATE_VERSION {
        return Err(Error::StateMismatch(format!(
            "state format version {version}, this library reads version {STATE_VERSION}"
        )));
    }
    let k = r.u32()?;
    let mut theirs = [0u32; N_FIELDS];
    for f in theirs.iter_mut() {
        *f = r.u32()?;
    }
    let payload = r.u64()?;
    let total = (payload as usize).checked_add(HEADER + 4).filter(|&t| t <= buf.len()).ok_or_else(|| {
        Error::CorruptState(format!("payload of {payload} bytes does not fit a {}-byte buffer", buf.len()))
    })?;
    let stored = u32::from_le_bytes(buf[total - 4..total].try_into().unwrap());
    let computed = crc32fast::hash(&buf[..total - 4]);
    if stored != computed {
        return Err(Error::CorruptState(format!("checksum mismatch: stored {stored:08x}, computed {computed:08x}")));
    }
    if k != kind {
        let name = |k| if k == KIND_CACHE { "a whole-cache state" } else { "a sequence state" };
        return Err(Error::StateMismatch(format!("{} given where {} was expected", name(k), name(kind))));
    }
    // Every field but the last three (page size and capacity) must match.
    let ours = fields(cfg);
    for i in 0..N_FIELDS - 3 {
        if theirs[i] != ours[i] {
            return Err(Error::StateMismatch(format!(
                "{} is {} in the state and {} in this cache",
                FIELD_NAMES[i], theirs[i], ours[i]
            )));
        }
    }
    let mut saved = cfg.clone();
    (saved.page_tokens, saved.max_tokens, saved.max_seqs, saved.max_seq_tokens) =
        (theirs[N_FIELDS - 3], theirs[N_FIELDS - 2], theirs[N_FIELDS - 1], 0);
    saved.validate().map_err(|e| Error::CorruptState(format!("the state's page size or capacity: {e}")))?;
    Ok((Reader { buf: &buf[..total - 4], at: HEADER }, Layout::new(&saved)))
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap())
}

/// The longest layer of a sequence blob, in tokens (checked as a load checks it): what a cache
/// needs to hold it.
pub(crate) fn seq_state_tokens(cfg: &CacheConfig, buf: &[u8]) -> Result<usize> {
    let (mut r, src) = open(cfg, buf, KIND_SEQ)?;
    r.u32()?;
    let mut longest = 0;
    for _ in 0..src.n_layers {
        longest = longest.max(read_layer(&mut r, &src, false)?.len);
    }
    Ok(longest)
}

/// Where one layer of a whole-cache blob goes in a pool of layout `dst`.
struct Placement {
    /// Reference count of each page of `dst`'s pool.
    refs: Vec<u32>,
    /// Each page of `dst` in use, and the saved (page, position) of each of its groups.
    pages: Vec<(u32, Vec<(u32, usize)>)>,
    /// Each sequence's block table in `dst`'s pages.
    blocks: Vec<Vec<u32>>,
}

/// Places the pages of one layer saved with layout `src` (reference counts `refs`; `tables`:
/// each sequence's block table and quantized groups) into pages of layout `dst`. With the same
/// page size every saved page is kept whole, under its own number when the pool has it;
/// otherwise the groups are regrouped, and sequences whose groups of a new page agree up to
/// where one of them ends share it, as a fork would have shared it. The result may need more
/// pages than `dst` has: the caller checks.
fn place(src: &Layout, dst: &Layout, refs: &[u32], tables: &[(&[u32], usize)]) -> Placement {
    let mut p = Placement { refs: vec![0; dst.pages_per_layer], pages: Vec::new(), blocks: Vec::new() };
    if src.page_tokens == dst.page_tokens {
        let used: Vec<u32> = (0..refs.len() as u32).filter(|&b| refs[b as usize] > 0).collect();
        let keep = used.last().is_none_or(|&b| (b as usize) < dst.pages_per_layer);
        let mut new = vec![0u32; refs.len()];
        for (i, &b) in used.iter().enumerate() {
            new[b as usize] = if keep { b } else { i as u32 };
            p.pages.push((new[b as usize], (0..src.groups_per_page).map(|g| (b, g)).collect()));
            if let Some(r) = p.refs.get_mut(new[b as usize] as usize) {
                *r = refs[b as usize];
            }
        }
        p.blocks = tables.iter().map(|(t, _)| t.iter().map(|&b| new[b as usize]).collect()).collect();
        return p;
    }
    // New pages by the saved (page, position) of their first group.
    let mut by_first: std::collections::HashMap<(u32, usize), Vec<u32>> = Default::default();
    for &(table, n_groups) in tables {
        let mut blocks = Vec::new();
        for j in 0..n_groups.div_ceil(dst.groups_per_page) {
            let groups = page_groups(src, dst, j, n_groups, |b| table[b]);
            let same = by_first.entry(groups[0]).or_default();
            let agree = |k: &u32| {
                let have = &p.pages[*k as usize].1;
                have.iter().zip(&groups).all(|(a, b)| a == b)
            };
            let k = match same.iter().copied().find(agree) {
                Some(k) => {
                    if groups.len() > p.pages[k as usize].1.len() {
                        p.pages[k as usize].1 = groups;
                    }
                    k
                }
                None => {
                    let k = p.pages.len() as u32;
                    p.pages.push((k, groups));
                    same.push(k);
                    k
                }
            };
            if let Some(r) = p.refs.get_mut(k as usize) {
                *r += 1;
            }
            blocks.push(k);
        }
        p.blocks.push(blocks);
    }
    p
}

/// The saved (page, position) of each group of page `j` of a sequence of `n_groups` quantized
/// groups laid out in `dst`'s page size; `table(b)` is the saved page of the sequence's `b`-th
/// page.
fn page_groups(
    src: &Layout,
    dst: &Layout,
    j: usize,
    n_groups: usize,
    table: impl Fn(usize) -> u32,
) -> Vec<(u32, usize)> {
    let first = j * dst.groups_per_page;
    (first..n_groups.min(first + dst.groups_per_page))
        .map(|g| (table(g / src.groups_per_page), g % src.groups_per_page))
        .collect()
}

/// Writes one page of layout `dst` from the saved groups `groups` ((page, position), `saved`
/// giving a saved page's bytes): the whole saved page when both layouts have the same page size
/// (the bytes of unused positions too, so a cache saved and loaded back is the same byte for
/// byte), else group by group into a zeroed page.
fn fill_page<'a>(src: &Layout, saved: impl Fn(u32) -> &'a [u8], groups: &[(u32, usize)], dst: &Layout, to: &mut [u8]) {
    if src.page_tokens == dst.page_tokens {
        to.copy_from_slice(saved(groups[0].0));
        return;
    }
    to.fill(0);
    for (pos, &(b, from)) in groups.iter().enumerate() {
        let page = saved(b);
        for h in 0..dst.n_kv_heads {
            for ((s, n), (d, _)) in src.group_parts(from).into_iter().zip(dst.group_parts(pos)) {
                to[h * dst.head_bytes + d..][..n].copy_from_slice(&page[h * src.head_bytes + s..][..n]);
            }
        }
    }
}

/// Fails when sequence `id` holds more tokens in layer `l` (`len`) than this cache lets one
/// sequence hold (`max_seq_tokens` is not part of a blob's settings: a blob loads into a cache
/// with any limit its sequences fit).
pub(crate) fn check_seq_len(lay: &Layout, id: u32, l: usize, len: usize) -> Result<()> {
    if len > lay.max_seq_tokens {
        return Err(Error::StateMismatch(format!(
            "sequence {id} holds {len} tokens in layer {l}, more than this cache's max_seq_tokens {}",
            lay.max_seq_tokens
        )));
    }
    Ok(())
}

/// Starts a blob of `size` bytes: the header of a cache of configuration `cfg`.
fn header<'a>(cfg: &CacheConfig, buf: &'a mut [u8], kind: u32, size: usize) -> Writer<'a> {
    let mut w = Writer { buf: &mut buf[..size], at: 0 };
    w.put(MAGIC);
    w.u32(STATE_VERSION);
    w.u32(kind);
    for f in fields(cfg) {
        w.u32(f);
    }
    w.u64((size - HEADER - 4) as u64);
    w
}

fn finish(w: Writer, size: usize) -> usize {
    let crc = crc32fast::hash(&w.buf[..size - 4]);
    w.buf[size - 4..size].copy_from_slice(&crc.to_le_bytes());
    size
}

/// Reads and checks one layer record.
fn read_layer<'a>(r: &mut Reader<'a>, lay: &Layout, with_blocks: bool) -> Result<LayerRec<'a>> {
    let len = r.u64()?;
    let quantized = r.u64()?;
    let bad = |m: String| Err(Error::CorruptState(m));
    if len > u32::MAX as u64 || quantized > len {
        return bad(format!("layer length {len} with {quantized} quantized tokens"));
    }
    let (len, quantized) = (len as usize, quantized as usize);
    if quantized % lay.group != 0 || (quantized > 0 && lay.sinks + quantized > len) {
        return bad(format!("{quantized} quantized tokens is not a whole number of groups within {len} tokens"));
    }
    if len.saturating_sub(lay.sinks) - quantized >= lay.ring {
        return bad(format!(
            "{} window tokens, the window holds at most {}",
            len - lay.sinks - quantized,
            lay.ring - 1
        ));
    }
    let n_blocks = (quantized / lay.group).div_ceil(lay.groups_per_page);
    let (blocks, pages) = if with_blocks {
        let n = r.u32()? as usize;
        if n != n_blocks {
            return bad(format!("{n} pages listed for {quantized} quantized tokens, {n_blocks} expected"));
        }
        let mut b = Vec::with_capacity(n);
        for _ in 0..n {
            b.push(r.u32()?);
        }
        (b, &[][..])
    } else {
        (Vec::new(), r.take(n_blocks * lay.page_bytes)?)
    };
    let window = r.take(lay.slot_window_bytes())?;
    Ok(LayerRec { len, quantized, blocks, pages, window })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::Rows;

    fn layout(page: u32, max_tokens: u32) -> Layout {
        let mut c = CacheConfig::new(1, 1, 64);
        (c.group_size, c.page_tokens, c.max_tokens) = (16, page, max_tokens);
        Layout::new(&c)
    }

    /// Pages of the same size keep their numbers where the pool has them and are numbered
    /// afresh in order where it does not; sharing is kept either way.
    #[test]
    fn pages_of_the_same_size_keep_their_numbers_when_they_can() {
        let src = layout(32, 1024);
        let mut refs = vec![0u32; src.pages_per_layer];
        (refs[3], refs[7], refs[9]) = (1, 2, 1);
        let tables: [(&[u32], usize); 2] = [(&[7, 3], 3), (&[7, 9], 4)];
        let keep = place(&src, &layout(32, 320), &refs, &tables);
        assert_eq!(keep.blocks, vec![vec![7, 3], vec![7, 9]]);
        assert_eq!(&keep.refs[..10], &refs[..10]);
        let groups: Vec<_> = keep.pages.iter().map(|(p, g)| (*p, g.clone())).collect();
        assert_eq!(groups, vec![(3, vec![(3, 0), (3, 1)]), (7, vec![(7, 0), (7, 1)]), (9, vec![(9, 0), (9, 1)])]);
        // A pool of 3 pages (2 groups' worth of tokens, one spare page): numbered afresh.
        let small = layout(32, 64);
        assert_eq!(small.pages_per_layer, 3);
        let fresh = place(&src, &small, &refs, &tables);
        assert_eq!(fresh.blocks, vec![vec![1, 0], vec![1, 2]]);
        assert_eq!(fresh.refs, vec![1, 2, 1]);
        assert_eq!(fresh.pages.iter().map(|(p, g)| (*p, g[0].0)).collect::<Vec<_>>(), vec![(0, 3), (1, 7), (2, 9)]);
    }

    /// Regrouped pages are shared when the groups of one sequence's page begin the other's.
    #[test]
    fn regrouped_pages_are_shared_where_one_begins_the_other() {
        let src = layout(16, 1024);
        let dst = layout(48, 1024);
        let refs = vec![0u32; src.pages_per_layer];
        // Sequence a: pages 0 1 2 3 4; b: a fork of its first 4 groups, then its own page 5;
        // c: the first 2 groups of a; d: 0 1 then its own 6.
        let tables: [(&[u32], usize); 4] =
            [(&[0, 1, 2, 3, 4], 5), (&[0, 1, 2, 3, 5], 5), (&[0, 1], 2), (&[0, 1, 6], 3)];
        let p = place(&src, &dst, &refs, &tables);
        let (a012, a34, b35, d016) = (0u32, 1u32, 2u32, 3u32);
        assert_eq!(p.blocks, vec![vec![a012, a34], vec![a012, b35], vec![a012], vec![d016]]);
        assert_eq!(&p.refs[..5], &[3, 1, 1, 1, 0]);
        let g = |v: &[u32]| v.iter().map(|&b| (b, 0)).collect::<Vec<_>>();
        let pages: Vec<_> = p.pages.iter().map(|(_, g)| g.clone()).collect();
        assert_eq!(pages, vec![g(&[0, 1, 2]), g(&[3, 4]), g(&[3, 5]), g(&[0, 1, 6])]);
        // Sequence c first: its page of two groups grows when a longer one begins with them.
        let p = place(&src, &dst, &refs, &[(&[0, 1], 2), (&[0, 1, 2, 3, 4], 5)]);
        assert_eq!(p.blocks, vec![vec![0], vec![0, 1]]);
        assert_eq!(p.pages[0].1, g(&[0, 1, 2]));
    }

    /// A cache of 2 layers, 2 KV heads of 64, G = 16, R = 32, holding sequences of the given
    /// lengths (appended in order, keys and values alike).
    fn small_cache(max_tokens: u32, max_seqs: u32, seqs: &[(u32, usize)]) -> (CacheConfig, Cache) {
        let mut c = CacheConfig::new(2, 2, 64);
        (c.group_size, c.residual, c.max_tokens, c.max_seqs) = (16, 32, max_tokens, max_seqs);
        let mut cache = Cache::new(c.clone()).unwrap();
        for &(seq, n) in seqs {
            let k: Vec<f32> = (0..n * 128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            for l in 0..2 {
                cache.append(l, seq, Rows::new(&k, n).unwrap(), Rows::new(&k, n).unwrap()).unwrap();
            }
        }
        (c, cache)
    }

    /// A blob reaches as far into a pool as its highest page; a cache of another page size
    /// needs as many pages as the regrouped sequences take; one it does not fit is refused.
    #[test]
    fn a_blob_reaches_as_far_as_its_highest_page() {
        let (mut c, mut cache) = small_cache(4096, 3, &[(1, 200), (2, 100)]);
        // Sequence 1 takes pages 0..=9 (10 groups of 16), sequence 2 then 10..=13 (4 groups).
        cache.seq_remove(1).unwrap();
        let blob = cache.save_state_vec();
        assert_eq!(cache_state_pages(&c, &blob), Ok(14));
        c.page_tokens = 64;
        assert_eq!(cache_state_pages(&c, &blob), Ok(1));
        c.max_seqs = 1;
        (c.page_tokens, c.max_tokens) = (0, 48);
        assert!(matches!(cache_state_pages(&c, &blob), Err(Error::StateMismatch(m)) if m.contains("need 4 pages")));
    }

    /// A blob whose page size or capacity fields are impossible is corrupt even with a valid
    /// checksum, and a huge capacity is refused before anything that large is allocated.
    #[test]
    fn impossible_page_sizes_and_capacities_are_corrupt() {
        let (c, mut cache) = small_cache(256, 2, &[(4, 100)]);
        let blob = cache.save_state_vec();
        let field = |i: usize| 8 + 4 + 4 + 4 * i;
        for (i, value, says) in [
            (N_FIELDS - 3, 24, "page_tokens 24 is not 0 or a multiple of the group size 16"),
            (N_FIELDS - 3, 1 << 20, "page_tokens 1048576"),
            (N_FIELDS - 2, 0, "max_tokens 0"),
            (N_FIELDS - 1, 0, "max_seqs 0"),
            (N_FIELDS - 2, u32::MAX, "truncated"),
        ] {
            let mut b = blob.clone();
            b[field(i)..field(i) + 4].copy_from_slice(&u32::to_le_bytes(value));
            let n = b.len();
            let crc = crc32fast::hash(&b[..n - 4]);
            b[n - 4..].copy_from_slice(&crc.to_le_bytes());
            for e in [cache.load_state(&b).unwrap_err(), Cache::new(c.clone()).unwrap().load_state(&b).unwrap_err()] {
                assert!(matches!(&e, Error::CorruptState(m) if m.contains(says)), "{} = {value}: {e}", FIELD_NAMES[i]);
            }
        }
        assert!(cache.save_state_vec() == blob);
    }
}
