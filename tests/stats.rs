//! Memory statistics count what the cache holds.

mod common;
use common::*;
use kivi::{Cache, CacheConfig, DType, Rows};

#[test]
fn stats_count_codes_scales_and_windows() {
    let mut rng = Rng::fresh("stats_count_codes_scales_and_windows");
    let (layers, nkv, hd) = (2u32, 4u32, 128u32);
    let mut c = CacheConfig::new(layers, nkv, hd);
    (c.dtype, c.max_tokens, c.max_seqs) = (DType::F16, 4096, 2);
    let mut cache = Cache::new(c).unwrap();
    assert_eq!(cache.stats().used_bytes(), 0);
    let reserved = cache.stats().reserved_bytes;
    let gen = KvGen::new(&mut rng, nkv as usize, hd as usize);
    let n = 1000usize;
    let (k, v) = (gen.keys(&mut rng, n), gen.values(&mut rng, n));
    for l in 0..layers {
        cache.append(l, 0, Rows::new(&k, n).unwrap(), Rows::new(&v, n).unwrap()).unwrap();
    }
    let st = cache.stats();
    // R = 128, G = 32: 1000 - 128 = 872 -> 27 groups (864 tokens) quantized, 136 in the window.
    let q = 864u64;
    assert_eq!(st.tokens, n as u64 * layers as u64);
    assert_eq!(st.quantized_tokens, q * layers as u64);
    let heads = (layers * nkv) as u64;
    // 2-bit keys and values: 128 channels * 4 bits = 64 bytes of codes per token and head.
    assert_eq!(st.code_bytes, q * heads * 64);
    // Keys: a scale and zero per channel per 32 tokens (128 * 4 / 32 bytes per token); values:
    // 4 groups of 32 channels, 4 bytes each.
    assert_eq!(st.scale_bytes, q * heads * (16 + 16));
    assert_eq!(st.window_bytes, 136 * heads * 2 * 128 * 2);
    assert_eq!(st.f16_bytes, n as u64 * heads * 2 * 128 * 2);
    assert_eq!(st.reserved_bytes, reserved, "nothing grows after creation");
    // 96 bytes per quantized token and head against 512 for f16.
    let quantized_ratio = (q * heads * 512) as f64 / (st.code_bytes + st.scale_bytes) as f64;
    assert!((quantized_ratio - 512.0 / 96.0).abs() < 1e-9);
    assert!(st.compression() > 3.0 && st.compression() < 5.34, "{}", st.compression());
    cache.seq_remove(0).unwrap();
    let st = cache.stats();
    assert_eq!((st.used_bytes(), st.pages_used, st.sequences), (0, 0, 0));
}

/// Page tables: a block table of one sequence's pages per (sequence, layer), 4 bytes a page,
/// and a reference count and free-list entry per page of each layer's pool.
#[test]
fn stats_count_the_page_tables() {
    let (layers, seqs, pages) = (3u64, 5u64, 4096u64 / 32);
    let mut c = CacheConfig::new(layers as u32, 2, 64);
    (c.max_tokens, c.max_seqs) = (4096, seqs as u32);
    let per_layer = pages * 4 * 2;
    let unbounded = Cache::new(c.clone()).unwrap().stats();
    assert_eq!(unbounded.table_bytes, layers * (seqs * pages * 4 + per_layer));
    assert_eq!(unbounded.pages_total, layers * pages);
    // 1000 tokens: 32 groups of 32 (the last one partial).
    c.max_seq_tokens = 1000;
    assert_eq!(Cache::new(c.clone()).unwrap().stats().table_bytes, layers * (seqs * 32 * 4 + per_layer));
    // A limit past the pool: no table longer than the pool.
    c.max_seq_tokens = 100_000;
    assert_eq!(Cache::new(c).unwrap().stats().table_bytes, unbounded.table_bytes);
}
