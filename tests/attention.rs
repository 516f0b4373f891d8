//! Fused attention against the f64 reference over the dequantized cache, across settings.

mod common;
use common::*;
use kivi::{AttnOptions, Cache, CacheConfig, KeyMode};

#[test]
fn fused_matches_reference_across_settings() {
    let mut rng = Rng::fresh("fused_matches_reference_across_settings");
    let cases = [
        // (hd, nkv, nq, bits k, bits v, G, R, sinks, mode)
        (64, 2, 8, 2, 2, 32, 128, 0, KeyMode::PerChannel),
        (128, 1, 4, 4, 4, 32, 64, 0, KeyMode::PerChannel),
        (80, 2, 2, 8, 8, 16, 32, 4, KeyMode::PerChannel),
        (64, 1, 1, 2, 2, 8, 16, 1, KeyMode::PerChannel),
        (96, 2, 6, 2, 4, 32, 0, 0, KeyMode::PerChannel),
        (256, 1, 4, 2, 2, 32, 32, 2, KeyMode::PerToken),
        (128, 2, 4, 4, 2, 64, 128, 0, KeyMode::PerToken),
    ];
    for (hd, nkv, nq, kb, vb, g, r, s, mode) in cases {
        let mut cfg = CacheConfig::new(2, nkv, hd);
        cfg.key_bits = kb;
        cfg.value_bits = vb;
        cfg.group_size = g;
        cfg.residual = r;
        cfg.sinks = s;
        cfg.key_mode = mode;
        cfg.value_group = if hd % 32 == 0 { 32 } else { 16 };
        cfg.max_tokens = 2048;
        cfg.page_tokens = if g <= 16 { 4 * g } else { 0 };
        let mut cache = Cache::new(cfg.clone()).unwrap();
        let gen = KvGen::new(&mut rng, nkv as usize, hd as usize);
        let opts = AttnOptions::default();
        // A prefill chunk, then decode steps across several flushes.
        let chunks = [150usize, 1, 1, 37, 1, 64, 1, 1, 1, 200];
        for (i, &n) in chunks.iter().enumerate() {
            let k = gen.keys(&mut rng, n);
            let v = gen.values(&mut rng, n);
            let q = queries(&mut rng, n, nq as usize, hd as usize);
            let layer = (i % 2) as u32;
            append_attend_checked(&mut cache, layer, 3, &k, &v, &q, nq as usize, &opts, 1e-5);
        }
    }
}
