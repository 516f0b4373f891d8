//! The decode hot path allocates nothing once warm: attention (one or several threads, contexts
//! split or not), batched decode with its appends and flushes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kivi::{AttnOptions, Cache, CacheConfig, Rows, RowsMut};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5)
        .collect()
}

#[test]
fn decode_hot_path_does_not_allocate() {
    // (kv heads, query heads, threads): GQA over 8 heads, and one KV head whose context is split.
    for (nkv, nq, threads) in [(8u32, 32usize, 1u32), (8, 32, 2), (1, 4, 2)] {
        let hd = 128usize;
        let mut cfg = CacheConfig::new(1, nkv, hd as u32);
        cfg.max_tokens = 8192;
        cfg.max_seqs = 4;
        cfg.n_threads = threads;
        cfg.page_tokens = 256;
        let mut cache = Cache::new(cfg).unwrap();
        let row = nkv as usize * hd;
        let n = 1500;
        for s in 0..4u32 {
            let (k, v) = (data(n * row, s), data(n * row, s + 7));
            cache.append(0, s, Rows::new(&k, n).unwrap(), Rows::new(&v, n).unwrap()).unwrap();
        }
        let q = data(4 * nq * hd, 3);
        let (k1, v1) = (data(4 * row, 5), data(4 * row, 6));
        let mut out = vec![0f32; q.len()];
        let ids = [0u32, 1, 2, 3];
        let opts = AttnOptions::default();
        let step = |cache: &mut Cache, out: &mut [f32]| {
            let qr = Rows::new(&q[..nq * hd], 1).unwrap();
            cache.attend(0, 0, qr, RowsMut::new(&mut out[..nq * hd], 1).unwrap(), &opts).unwrap();
            let (kr, vr, qr) = (Rows::new(&k1, 4).unwrap(), Rows::new(&v1, 4).unwrap(), Rows::new(&q, 4).unwrap());
            cache.decode(0, &ids, kr, vr, qr, RowsMut::new(out, 4).unwrap(), &opts).unwrap();
        };
        step(&mut cache, &mut out);
        let before = ALLOCS.load(Ordering::Relaxed);
        // 40 steps: every sequence flushes a group on the way.
        for _ in 0..40 {
            step(&mut cache, &mut out);
        }
        let allocs = ALLOCS.load(Ordering::Relaxed) - before;
        assert_eq!(allocs, 0, "{allocs} allocations in 40 decode steps ({nkv} kv heads, {threads} threads)");
        assert!(out.iter().all(|x| x.is_finite()));
    }
}
