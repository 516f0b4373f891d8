//! Memory statistics count what the cache holds.

mod common;
use common::*;
use kivi::cuda::CudaCache;
use kivi::{Cache, CacheConfig, DType, Error, KeyMode, MemoryPlan, Rows};

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
    // One sink, R = 128, G = 32: 999 - 128 = 871 -> 27 groups (864 tokens) quantized, 135 in the
    // window and the sink: 136 at full precision.
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

/// A random valid configuration: every field that changes the sizes, small enough to create.
fn random_config(rng: &mut Rng) -> CacheConfig {
    let hd = [32u32, 64, 80, 128, 256][rng.below(5)];
    let mut c = CacheConfig::new(1 + rng.below(3) as u32, 1 + rng.below(4) as u32, hd);
    c.dtype = [DType::F32, DType::F16, DType::BF16][rng.below(3)];
    c.key_bits = [2, 4, 8][rng.below(3)];
    c.value_bits = [2, 4, 8][rng.below(3)];
    c.key_mode = if rng.below(4) == 0 { KeyMode::PerToken } else { KeyMode::PerChannel };
    c.group_size = [8, 16, 32, 64][rng.below(4)];
    c.value_group = if hd == 80 { 16 } else { [8, 16, 32][rng.below(3)] };
    c.residual = c.group_size * rng.below(5) as u32;
    c.sinks = [0, 1, 4, 7][rng.below(4)];
    c.max_tokens = 1 + rng.below(6000) as u32;
    c.max_seqs = 1 + rng.below(6) as u32;
    c.max_seq_tokens = if rng.below(2) == 0 { 0 } else { 1 + rng.below(3000) as u32 };
    c.page_tokens = c.group_size * [0, 1, 3, 8][rng.below(4)];
    c
}

/// What a configuration's plan says is what its caches take: the CPU cache's statistics and the
/// CUDA cache's device allocation.
#[test]
fn memory_plans_are_what_caches_take() {
    let mut rng = Rng::fresh("memory_plans_are_what_caches_take");
    for _ in 0..60 {
        let c = random_config(&mut rng);
        let plan = c.memory_plan().unwrap();
        let st = Cache::new(c.clone()).unwrap().stats();
        assert_eq!(
            (plan.reserved_bytes, plan.table_bytes, plan.pages_total),
            (st.reserved_bytes, st.table_bytes, st.pages_total),
            "{c:?}"
        );
        assert_eq!(plan.cpu_bytes(), st.reserved_bytes + st.table_bytes);
        let cuda = CudaCache::emulated(c.clone()).unwrap();
        assert_eq!(plan.cuda_device_bytes, cuda.device_bytes() as u64, "{c:?}");
        assert_eq!(cuda.stats().reserved_bytes, plan.reserved_bytes);
    }
    let mut bad = CacheConfig::new(1, 1, 64);
    bad.group_size = 12;
    assert!(matches!(bad.memory_plan(), Err(Error::InvalidConfig(m)) if m.contains("group_size 12")));
}

/// The fitted `max_tokens` is the largest whose cache stays within the budget, on the CPU and on
/// a CUDA device; a budget below one token is refused with what one token takes.
#[test]
fn max_tokens_within_fills_the_budget() {
    let mut rng = Rng::fresh("max_tokens_within_fills_the_budget");
    let cuda = |p: &MemoryPlan| p.cuda_device_bytes;
    let within = |c: &CacheConfig, m: u32, budget: u64, bytes: &dyn Fn(&MemoryPlan) -> u64| {
        CacheConfig { max_tokens: m, ..c.clone() }.memory_plan().is_ok_and(|p| bytes(&p) <= budget)
    };
    for i in 0..60 {
        let c = random_config(&mut rng);
        let bytes: &dyn Fn(&MemoryPlan) -> u64 = if i % 2 == 0 { &MemoryPlan::cpu_bytes } else { &cuda };
        let least = bytes(&CacheConfig { max_tokens: 1, ..c.clone() }.memory_plan().unwrap());
        // From one token's worth to tens of thousands of pages more.
        let budget = least + (rng.uniform() * rng.uniform() * 2e8) as u64;
        let m = c.max_tokens_within(budget, bytes).unwrap();
        assert!(within(&c, m, budget, bytes), "{c:?}: {m} tokens exceed {budget} bytes");
        assert!(!within(&c, m + 1, budget, bytes), "{c:?}: {} tokens also fit in {budget} bytes", m + 1);
        // A cache made with it holds at least that many tokens in each layer's pool.
        if i % 2 == 0 && budget < 64 << 20 {
            let cache = Cache::new(CacheConfig { max_tokens: m, ..c.clone() }).unwrap();
            let st = cache.stats();
            assert!(st.reserved_bytes + st.table_bytes <= budget);
            let page = c.page_tokens.max(c.group_size) as u64;
            assert!(st.pages_total / c.n_layers as u64 * page >= m as u64);
        }
        let e = c.max_tokens_within(least - 1, bytes).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(msg) if msg.contains(&format!("{}", least - 1)) && msg.contains(&format!("{least}"))),
            "{e}"
        );
    }
    // Every token a u32 can count, when the budget allows it.
    let mut c = CacheConfig::new(1, 1, 8);
    c.value_group = 8;
    assert_eq!(c.max_tokens_within(u64::MAX, MemoryPlan::cpu_bytes).unwrap(), u32::MAX);
    let mut bad = CacheConfig::new(1, 1, 64);
    bad.key_bits = 3;
    assert!(matches!(bad.max_tokens_within(1 << 30, MemoryPlan::cpu_bytes), Err(Error::InvalidConfig(_))));
}
