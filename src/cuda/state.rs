//! A CUDA cache's contents on the host: copies into CPU caches (one sequence or all), state
//! blobs in the CPU cache's format, and loading them back.

use super::*;

impl CudaCache {
    /// Sequence `seq` alone, in a CPU [`Cache`] of the same dimensions sized for it (one
    /// sequence, its quantized tokens): what to save when one sequence is swapped out. Waits for
    /// `stream`.
    pub fn seq_to_host(&self, seq: u32, stream: Stream) -> Result<Cache> {
        let slot = self.seqs.slot_of(seq)?;
        self.bind()?;
        let lay = &self.lay;
        let mut cfg = self.cfg.clone();
        cfg.max_seqs = 1;
        let max_q = self.seqs.slots[slot].layers.iter().map(|l| l.quantized).max().unwrap_or(0);
        cfg.max_tokens = max_q.max(1) as u32;
        let mut host = Cache::new(cfg)?;
        let dsz = lay.dtype.size();
        let wbytes = lay.slot_window_bytes();
        for l in 0..lay.n_layers {
            let ls = self.seqs.slots[slot].layers[l].clone();
            let mut blocks = Vec::with_capacity(ls.blocks.len());
            for &p in &ls.blocks {
                let np = host.seqs.pages[l].alloc();
                let src = self.pages_ptr(l) + p as u64 * lay.page_bytes as u64;
                self.dtoh(host.pools[l].page_mut(np), src, stream)?;
                lay.key_codes_from_device(host.pools[l].page_mut(np));
                blocks.push(np);
            }
            let src = self.base + self.off_windows + (lay.window_base(l, slot, 0) * dsz) as u64;
            let dst = host.lay.window_base(l, 0, 0) * dsz;
            self.dtoh(&mut host.windows.bytes_mut()[dst..dst + wbytes], src, stream)?;
            let h = &mut host.seqs.slots[0].layers[l];
            h.len = ls.len;
            h.quantized = ls.quantized;
            h.blocks = blocks;
        }
        host.seqs.slots[0].id = Some(seq);
        Ok(host)
    }

    /// Makes `as_id` a copy of sequence `seq` of the CPU cache `host` (e.g. one restored from a
    /// saved state, of any capacity and page size but the same dimensions and settings),
    /// replacing whatever `as_id` held. Waits for the whole device before its copies (work
    /// queued earlier on any stream may use the pages) and after them.
    pub fn seq_from_host(&mut self, host: &Cache, seq: u32, as_id: u32) -> Result<()> {
        let hc = host.config();
        let same = CacheConfig {
            max_tokens: hc.max_tokens,
            max_seqs: hc.max_seqs,
            max_seq_tokens: hc.max_seq_tokens,
            page_tokens: hc.page_tokens,
            n_threads: hc.n_threads,
            ..self.cfg.clone()
        };
        if *hc != same {
            return Err(Error::StateMismatch(format!("a cache of {hc:?} into a cache of {:?}", self.cfg)));
        }
        if hc.effective_page_tokens() != self.cfg.effective_page_tokens() {
            // Regrouped into this cache's page size on the way.
            return self.load_seq_state(as_id, &host.save_seq_state_vec(seq)?);
        }
        let hslot = host.seqs.slot_of(seq)?;
        let (slot, new) = self.seqs.slot_or_new(as_id)?;
        let lay = self.lay.clone();
        for (l, hls) in host.seqs.slots[hslot].layers.iter().enumerate() {
            crate::state::check_seq_len(&self.lay, seq, l, hls.len)?;
            self.seqs.check_pages(l, as_id, hls.len, hls.blocks.len(), (!new).then_some(slot))?;
        }
        self.bind()?;
        // The copies below are not ordered with work on the engine's streams: wait for that
        // work first, and for the copies at the end.
        self.sync_device()?;
        self.seqs.release(slot);
        let dsz = lay.dtype.size();
        let wbytes = lay.slot_window_bytes();
        for l in 0..lay.n_layers {
            let hls = &host.seqs.slots[hslot].layers[l];
            let mut blocks = Vec::with_capacity(hls.blocks.len());
            for &hp in &hls.blocks {
                let p = self.seqs.pages[l].alloc();
                let page = lay.device_pages(host.pools[l].page(hp));
                self.htod(self.pages_ptr(l) + p as u64 * lay.page_bytes as u64, &page)?;
                blocks.push(p);
            }
            let table: Vec<u8> = blocks.iter().flat_map(|b| b.to_le_bytes()).collect();
            self.htod(self.base + self.off_blocks + (self.blocks_index(l, slot) * 4) as u64, &table)?;
            let src = host.lay.window_base(l, hslot, 0) * dsz;
            let dst = self.base + self.off_windows + (lay.window_base(l, slot, 0) * dsz) as u64;
            self.htod(dst, &host.windows.bytes()[src..src + wbytes])?;
            let ls = &mut self.seqs.slots[slot].layers[l];
            ls.len = hls.len;
            ls.quantized = hls.quantized;
            ls.blocks = blocks;
        }
        self.seqs.slots[slot].id = Some(as_id);
        self.sync_device()
    }

    /// A CPU [`Cache`] holding exactly what this cache holds (pages, windows, sequences), e.g. to
    /// save it with the CPU cache's state functions or to inspect it. It takes as much host
    /// memory as the cache takes device memory; [`CudaCache::seq_to_host`] takes one sequence.
    /// Waits for `stream`.
    pub fn to_host(&self, stream: Stream) -> Result<Cache> {
        self.host_copy(self.lay.pages_per_layer, stream)
    }

    /// A CPU cache holding what this cache holds, in pools `pages` long (reaching at least the
    /// last page in use): the first `pages` pages of each pool, the windows and the tables.
    fn host_copy(&self, pages: usize, stream: Stream) -> Result<Cache> {
        self.bind()?;
        let lay = &self.lay;
        let mut cfg = self.cfg.clone();
        if pages < lay.pages_per_layer {
            cfg.max_tokens = (pages * lay.page_tokens).clamp(1, cfg.max_tokens as usize) as u32;
        }
        let mut host = Cache::new(cfg)?;
        let n = pages.min(host.lay.pages_per_layer) * lay.page_bytes;
        for l in 0..lay.n_layers {
            self.dtoh(&mut host.pools[l].bytes_mut()[..n], self.pages_ptr(l), stream)?;
            lay.key_codes_from_device(&mut host.pools[l].bytes_mut()[..n]);
        }
        self.dtoh(host.windows.bytes_mut(), self.base + self.off_windows, stream)?;
        self.seqs.restore_into(&mut host.seqs);
        Ok(host)
    }

    /// How far into the pools the pages in use reach: the highest in use, plus one.
    fn pages_reach(&self) -> usize {
        let reach = |p: &crate::pool::PageRefs| p.all_refs().iter().rposition(|&r| r > 0).map_or(0, |i| i + 1);
        self.seqs.pages.iter().map(reach).max().unwrap_or(0)
    }

    /// A cache on device `device` holding exactly what the CPU `cache` holds (e.g. one restored
    /// from a saved state). Waits for the copies to finish.
    pub fn from_host(cache: &Cache, device: u32) -> Result<CudaCache> {
        let mut c = CudaCache::new(cache.cfg.clone(), device)?;
        c.upload(cache)?;
        Ok(c)
    }

    /// The whole cache as a state blob, the CPU cache's format ([`Cache::save_state_vec`]):
    /// the pages in use (as far as the last one reaches) and the windows are brought to the
    /// host first, so it takes host memory for those as well as for the blob. Waits for
    /// `stream`.
    pub fn save_state_vec(&self, stream: Stream) -> Result<Vec<u8>> {
        let host = self.host_copy(self.pages_reach(), stream)?;
        let mut v = vec![0; self.state_size()];
        host.save_state_as(&self.cfg, &mut v)?;
        Ok(v)
    }

    /// Bytes [`CudaCache::save_state_vec`] returns now, found on the host (no device work).
    pub fn state_size(&self) -> usize {
        crate::state::cache_state_size(&self.lay, &self.seqs)
    }

    /// Bytes [`CudaCache::save_seq_state_vec`] returns for `seq` now (no device work).
    pub fn seq_state_size(&self, seq: u32) -> Result<usize> {
        Ok(crate::state::seq_state_size(&self.lay, &self.seqs, self.seqs.slot_of(seq)?))
    }

    /// Replaces everything with a state blob of a cache of the same dimensions and settings,
    /// any capacity and page size its sequences fit ([`Cache::load_state`]); a blob that is
    /// refused changes nothing. It is read into a host cache with pools as long as the blob's
    /// pages reach (not as the whole cache) and copied up from there. Waits for the whole device
    /// before and after its copies.
    pub fn load_state(&mut self, buf: &[u8]) -> Result<()> {
        let pages = crate::state::cache_state_pages(&self.cfg, buf)?;
        let mut cfg = self.cfg.clone();
        cfg.max_tokens = (pages * self.lay.page_tokens).clamp(1, cfg.max_tokens as usize) as u32;
        let mut host = Cache::new(cfg)?;
        host.load_state(buf)?;
        self.upload(&host)
    }

    /// Sequence `seq` as a state blob: the bytes [`Cache::save_seq_state_vec`] writes for a CPU
    /// cache of this configuration holding the same sequence. Waits for `stream`.
    pub fn save_seq_state_vec(&self, seq: u32, stream: Stream) -> Result<Vec<u8>> {
        let host = self.seq_to_host(seq, stream)?;
        let mut v = vec![0; host.seq_state_size(seq)?];
        host.save_seq_state_as(seq, &self.cfg, &mut v)?;
        Ok(v)
    }

    /// Loads a sequence blob ([`Cache::load_seq_state`], from a cache of the same dimensions,
    /// any capacity and page size) as sequence `seq`, replacing it if it exists.
    pub fn load_seq_state(&mut self, seq: u32, buf: &[u8]) -> Result<()> {
        // Through a host cache just large enough for the sequence, in this cache's page size.
        let tokens = crate::state::seq_state_tokens(&self.cfg, buf)?;
        let mut cfg = self.cfg.clone();
        (cfg.max_seqs, cfg.max_seq_tokens) = (1, 0);
        cfg.max_tokens = tokens.clamp(1, u32::MAX as usize) as u32;
        let mut host = Cache::new(cfg)?;
        host.load_seq_state(seq, buf)?;
        self.seq_from_host(&host, seq, seq)
    }

    /// Replaces the device copy with `cache`'s contents: a cache of this configuration, or of a
    /// smaller `max_tokens` (shorter pools, whose pages go to the start of this cache's; the rest
    /// is left free). Waits for the device before (work queued on any stream may still use the
    /// memory) and after (synchronous copies from pageable memory may return before the data
    /// lands, and later work on a non-blocking stream is not ordered after them).
    pub(super) fn upload(&mut self, cache: &Cache) -> Result<()> {
        self.bind()?;
        self.sync_device()?;
        let c = self;
        let lay = c.lay.clone();
        let mut blocks = vec![0u32; lay.n_layers * lay.max_seqs * lay.seq_pages];
        for (slot, s) in cache.seqs.slots.iter().enumerate() {
            for (l, ls) in s.layers.iter().enumerate() {
                let b = c.blocks_index(l, slot);
                blocks[b..b + ls.blocks.len()].copy_from_slice(&ls.blocks);
            }
        }
        for l in 0..lay.n_layers {
            // (With the key codes in the device's order: a copy of one layer's pool at a time.)
            c.htod(c.pages_ptr(l), &lay.device_pages(cache.pools[l].bytes()))?;
        }
        c.htod(c.base + c.off_windows, cache.windows.bytes())?;
        let blocks: Vec<u8> = blocks.iter().flat_map(|b| b.to_le_bytes()).collect();
        c.htod(c.base + c.off_blocks, &blocks)?;
        cache.seqs.restore_into(&mut c.seqs);
        c.sync_device()
    }
}
