//! Memory taken once: a 64-byte aligned buffer and the page pool of one layer; and the page
//! reference counts every backend keeps on the host.

use std::alloc::{self, Layout as AllocLayout};
use std::ptr::NonNull;

use crate::rows::Element;

/// A zero-initialised, 64-byte aligned, fixed-size byte buffer.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes, or `None` when they cannot be allocated.
    pub fn try_zeroed(len: usize) -> Option<AlignedBuf> {
        if len == 0 {
            return Some(AlignedBuf { ptr: NonNull::<u64>::dangling().cast(), len: 0 });
        }
        let layout = AllocLayout::from_size_align(len, align_for(len)).ok()?;
        let ptr = if len >= HUGE {
            // Advised before the first touch (zeroing), which is when pages are chosen.
            // SAFETY: layout has non-zero size; the bytes are zeroed before any use.
            let p = unsafe { alloc::alloc(layout) };
            if !p.is_null() {
                advise_huge_pages(p, len);
                unsafe { std::ptr::write_bytes(p, 0, len) };
            }
            p
        } else {
            // SAFETY: layout has non-zero size.
            unsafe { alloc::alloc_zeroed(layout) }
        };
        Some(AlignedBuf { ptr: NonNull::new(ptr)?, len })
    }

    #[inline]
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (or dangling with len 0) and initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    #[inline]
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer as elements of `T` (f32, f16 or bf16: plain data, every bit pattern valid).
    #[inline]
    pub fn typed<T: Element>(&self) -> &[T] {
        // SAFETY: 64-byte alignment satisfies T's; T is plain old data of size 2 or 4.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr() as *const T, self.len / std::mem::size_of::<T>()) }
    }

    #[inline]
    pub fn typed_mut<T: Element>(&mut self) -> &mut [T] {
        // SAFETY: as above, with exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr() as *mut T, self.len / std::mem::size_of::<T>()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            let layout =
                AllocLayout::from_size_align(self.len, align_for(self.len)).expect("layout was valid at allocation");
            // SAFETY: allocated with this layout in `zeroed`.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

/// Buffers from this size on are aligned to 2 MiB and offered huge pages: attention reads each
/// KV head's groups a page apart, so with 4 KiB pages nearly every group costs a TLB miss.
const HUGE: usize = 4 << 20;

fn align_for(len: usize) -> usize {
    if len >= HUGE {
        2 << 20
    } else {
        64
    }
}

/// Asks Linux for transparent huge pages (where they are enabled "on madvise"); a hint only.
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        const MADV_HUGEPAGE: i32 = 14;
        // SAFETY: the range is our own allocation (2 MiB aligned); madvise only advises.
        unsafe { madvise(ptr.cast(), len & !((2 << 20) - 1), MADV_HUGEPAGE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// Reference counts of the pages of one layer, and which pages are free. Every backend keeps
/// them on the host (in [`crate::seq::SeqTable`], next to the block tables that hold the
/// references), so all hand out the same pages for the same calls; forked sequences share pages.
#[derive(Debug, Clone)]
pub(crate) struct PageRefs {
    refs: Vec<u32>,
    free: Vec<u32>,
}

impl PageRefs {
    /// `None` when the tables cannot be allocated.
    pub fn new(pages: usize) -> Option<PageRefs> {
        let (mut refs, mut free) = (Vec::new(), Vec::new());
        refs.try_reserve_exact(pages).ok()?;
        free.try_reserve_exact(pages).ok()?;
        refs.resize(pages, 0);
        // Popped from the end: hand out low page numbers first.
        free.extend((0..pages as u32).rev());
        Some(PageRefs { refs, free })
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn used_count(&self) -> usize {
        self.total() - self.free_count()
    }

    /// Takes a free page (reference count 1). The caller has checked that one is free.
    pub fn alloc(&mut self) -> u32 {
        let p = self.free.pop().expect("page availability is checked before any change");
        self.refs[p as usize] = 1;
        p
    }

    /// The page the `k`-th [`PageRefs::alloc`] from now returns (`k` = 0: the next one) when no
    /// page is released before it, or `None` when fewer pages are free.
    pub fn nth_free(&self, k: usize) -> Option<u32> {
        self.free.len().checked_sub(k + 1).map(|i| self.free[i])
    }

    pub fn incref(&mut self, p: u32) {
        self.refs[p as usize] += 1;
    }

    pub fn decref(&mut self, p: u32) {
        let r = &mut self.refs[p as usize];
        debug_assert!(*r > 0, "page {p} released twice");
        *r -= 1;
        if *r == 0 {
            self.free.push(p);
        }
    }

    pub fn refs(&self, p: u32) -> u32 {
        self.refs[p as usize]
    }

    /// Marks exactly the given pages as used with the given counts (restoring a state).
    pub fn set_refs(&mut self, refs: &[u32]) {
        self.refs.copy_from_slice(refs);
        self.free.clear();
        self.free.extend((0..refs.len() as u32).rev().filter(|&p| refs[p as usize] == 0));
    }

    pub fn all_refs(&self) -> &[u32] {
        &self.refs
    }
}

/// The page bytes of one layer (which pages are in use is kept in a [`PageRefs`]).
pub(crate) struct PagePool {
    data: AlignedBuf,
    page_bytes: usize,
}

impl PagePool {
    /// `pages` zeroed pages, or `None` when they cannot be allocated.
    pub fn new(pages: usize, page_bytes: usize) -> Option<PagePool> {
        Some(PagePool { data: AlignedBuf::try_zeroed(pages.checked_mul(page_bytes)?)?, page_bytes })
    }

    #[inline]
    pub fn page(&self, p: u32) -> &[u8] {
        let o = p as usize * self.page_bytes;
        &self.data.bytes()[o..o + self.page_bytes]
    }

    #[inline]
    pub fn page_mut(&mut self, p: u32) -> &mut [u8] {
        let o = p as usize * self.page_bytes;
        &mut self.data.bytes_mut()[o..o + self.page_bytes]
    }

    /// The whole pool's bytes (attention reads pages through the block table).
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// The whole pool's bytes, to fill from another copy of the pool.
    #[inline]
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.data.bytes_mut()
    }

    /// Copies page `src` over page `dst`.
    pub fn copy_page(&mut self, src: u32, dst: u32) {
        let pb = self.page_bytes;
        self.data.bytes_mut().copy_within(src as usize * pb..(src as usize + 1) * pb, dst as usize * pb);
    }
}
