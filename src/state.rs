//! Save and restore: the whole cache, or one sequence, to a byte buffer and back.
//!
//! A state blob is a fixed header (magic `KIVISTAT`, format version, kind, the cache's
//! dimensions and settings, payload length), the payload, and a CRC-32 of everything before it.
//! Restoring checks the checksum, the version, the settings and every length and index in the
//! payload before it changes anything: a corrupt or mismatched blob is an error, and the cache
//! is left as it was.
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
    let window_bytes = lay.n_kv_heads * lay.window_head_elems * lay.dtype.size();
    // Header, CRC, sequence count.
    let mut n = HEADER + 4 + 4;
    for pages in &seqs.pages {
        n += 4 * pages.total() + pages.used_count() * lay.page_bytes;
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
    let window_bytes = lay.n_kv_heads * lay.window_head_elems * lay.dtype.size();
    // Header, CRC, sequence id.
    let mut n = HEADER + 4 + 4;
    for ls in &seqs.slots[s].layers {
        n += 8 + 8 + ls.blocks.len() * lay.page_bytes + window_bytes;
    }
    n
}

impl Cache {
    fn window_bytes(&self) -> usize {
        self.lay.n_kv_heads * self.lay.window_head_elems * self.lay.dtype.size()
    }

    /// Bytes [`Cache::save_state`] writes now.
    pub fn state_size(&self) -> usize {
        cache_state_size(&self.lay, &self.seqs)
    }

    /// Writes the whole cache into `buf` (at least [`Cache::state_size`] bytes); returns the
    /// bytes written.
    pub fn save_state(&self, buf: &mut [u8]) -> Result<usize> {
        let size = self.state_size();
        if buf.len() < size {
            return Err(Error::BufferTooSmall { needed: size, given: buf.len() });
        }
        let mut w = header(&self.cfg, buf, KIND_CACHE, size);
        for (pool, pages) in self.pools.iter().zip(&self.seqs.pages) {
            for &r in pages.all_refs() {
                w.u32(r);
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
    /// same configuration.
    pub fn load_state(&mut self, buf: &[u8]) -> Result<()> {
        let mut r = self.open(buf, KIND_CACHE, true)?;
        let lay = self.lay.clone();
        let mut refs = vec![0u32; lay.pages_per_layer];
        let mut pools = Vec::with_capacity(lay.n_layers);
        for l in 0..lay.n_layers {
            for x in refs.iter_mut() {
                *x = r.u32()?;
            }
            let used = refs.iter().filter(|&&x| x > 0).count();
            let data = r.take(used * lay.page_bytes)?;
            pools.push((refs.clone(), data, l));
        }
        let n_live = r.u32()? as usize;
        if n_live > lay.max_seqs {
            return Err(Error::CorruptState(format!("{n_live} sequences, the cache holds at most {}", lay.max_seqs)));
        }
        let mut seqs = Vec::with_capacity(n_live);
        let mut counted = vec![vec![0u32; lay.pages_per_layer]; lay.n_layers];
        for _ in 0..n_live {
            let slot = r.u32()? as usize;
            let id = r.u32()?;
            if slot >= lay.max_seqs || seqs.iter().any(|(s, i, _): &(usize, u32, _)| *s == slot || *i == id) {
                return Err(Error::CorruptState(format!(
                    "sequence {id} in slot {slot}: slot or id repeated or out of range"
                )));
            }
            let mut layers = Vec::with_capacity(lay.n_layers);
            for (l, count) in counted.iter_mut().enumerate() {
                let rec = read_layer(&mut r, &lay, true, self.window_bytes())?;
                check_seq_len(&lay, id, l, rec.len)?;
                for &b in &rec.blocks {
                    if b as usize >= lay.pages_per_layer || pools[l].0[b as usize] == 0 {
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
                return Err(Error::CorruptState(format!(
                    "layer {l}: page reference counts do not match the sequences"
                )));
            }
        }
        // Everything checked: apply.
        self.seqs.clear();
        for (refs, data, l) in pools {
            let pool = &mut self.pools[l];
            self.seqs.pages[l].set_refs(&refs);
            let mut at = 0;
            for (p, &rc) in refs.iter().enumerate() {
                if rc > 0 {
                    pool.page_mut(p as u32).copy_from_slice(&data[at..at + lay.page_bytes]);
                    at += lay.page_bytes;
                }
            }
        }
        for (s, id, layers) in seqs {
            self.seqs.slots[s].id = Some(id);
            for (l, rec) in layers.into_iter().enumerate() {
                let ls = &mut self.seqs.slots[s].layers[l];
                ls.len = rec.len;
                ls.quantized = rec.quantized;
                ls.blocks.extend_from_slice(&rec.blocks);
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
    /// dimensions and quantization settings; capacity may differ) as sequence `seq`, replacing
    /// it if it exists.
    pub fn load_seq_state(&mut self, seq: u32, buf: &[u8]) -> Result<()> {
        let mut r = self.open(buf, KIND_SEQ, false)?;
        let lay = self.lay.clone();
        let _saved_id = r.u32()?;
        let mut layers = Vec::with_capacity(lay.n_layers);
        for l in 0..lay.n_layers {
            let rec = read_layer(&mut r, &lay, false, self.window_bytes())?;
            check_seq_len(&lay, seq, l, rec.len)?;
            layers.push(rec);
        }
        let (slot, new) = self.seqs.slot_or_new(seq)?;
        for (l, rec) in layers.iter().enumerate() {
            let need = rec.pages.len() / lay.page_bytes;
            self.seqs.check_pages(l, seq, rec.len, need, (!new).then_some(slot))?;
        }
        // Everything checked: apply.
        self.seq_remove(seq).ok();
        self.seqs.slots[slot].id = Some(seq);
        for (l, rec) in layers.into_iter().enumerate() {
            for page in rec.pages.chunks_exact(lay.page_bytes) {
                let p = self.seqs.pages[l].alloc();
                self.pools[l].page_mut(p).copy_from_slice(page);
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
        &self.windows.bytes()[b..b + self.window_bytes()]
    }

    fn window_slice_mut(&mut self, l: usize, slot: usize) -> &mut [u8] {
        let b = self.lay.window_base(l, slot, 0) * self.lay.dtype.size();
        let n = self.window_bytes();
        &mut self.windows.bytes_mut()[b..b + n]
    }

    /// Checks a blob's header and checksum; returns a reader over its payload.
    fn open<'a>(&self, buf: &'a [u8], kind: u32, capacity_too: bool) -> Result<Reader<'a>> {
        if buf.len() < HEADER + 4 {
            return Err(Error::CorruptState(format!(
                "{} bytes, shorter than the {}-byte header",
                buf.len(),
                HEADER + 4
            )));
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
            return Err(Error::CorruptState(format!(
                "checksum mismatch: stored {stored:08x}, computed {computed:08x}"
            )));
        }
        if k != kind {
            let name = |k| if k == KIND_CACHE { "a whole-cache state" } else { "a sequence state" };
            return Err(Error::StateMismatch(format!("{} given where {} was expected", name(k), name(kind))));
        }
        let ours = fields(&self.cfg);
        let n = if capacity_too { N_FIELDS } else { N_FIELDS - 2 };
        for i in 0..n {
            if theirs[i] != ours[i] {
                return Err(Error::StateMismatch(format!(
                    "{} is {} in the state and {} in this cache",
                    FIELD_NAMES[i], theirs[i], ours[i]
                )));
            }
        }
        Ok(Reader { buf: &buf[..total - 4], at: HEADER })
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
fn read_layer<'a>(r: &mut Reader<'a>, lay: &Layout, with_blocks: bool, window: usize) -> Result<LayerRec<'a>> {
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
    let window = r.take(window)?;
    Ok(LayerRec { len, quantized, blocks, pages, window })
}
