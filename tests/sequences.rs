//! Sequence operations, save/restore, errors that leave the cache unchanged, and a randomized
//! sequence of operations checked against a simple model of the cache.

mod common;
use common::*;
use kivi::{AttnOptions, Cache, CacheConfig, DType, Error, KeyMode, Rows, RowsMut};

fn config() -> CacheConfig {
    let mut c = CacheConfig::new(3, 2, 64);
    (c.residual, c.group_size, c.max_tokens, c.max_seqs) = (32, 16, 2048, 4);
    c
}

fn append(cache: &mut Cache, layer: u32, seq: u32, k: &[f32], v: &[f32]) -> kivi::Result<()> {
    let n = k.len() / 128;
    cache.append(layer, seq, Rows::new(k, n)?, Rows::new(v, n)?)
}

fn fill(cache: &mut Cache, rng: &mut Rng, gen: &KvGen, seq: u32, n: usize) -> (Vec<f32>, Vec<f32>) {
    let (k, v) = (gen.keys(rng, n), gen.values(rng, n));
    for l in 0..cache.config().n_layers {
        append(cache, l, seq, &k, &v).unwrap();
    }
    (k, v)
}

fn prefix(d: &kivi::Dequantized, n: usize) -> (Vec<f64>, Vec<f64>) {
    let w = d.n_kv_heads * d.head_dim;
    (d.keys[..n * w].to_vec(), d.values[..n * w].to_vec())
}

#[test]
fn truncate_keeps_the_prefix_and_later_appends_work() {
    let mut rng = Rng::fresh("truncate_keeps_the_prefix_and_later_appends_work");
    for sinks in [0u32, 5] {
        let mut c = config();
        c.sinks = sinks;
        // Cuts: inside the window, at a group edge, inside a quantized group, inside the sinks, 0.
        for cut in [150usize, 120, 101, 64, 37, 3, 0] {
            let mut cache = Cache::new(c.clone()).unwrap();
            let gen = KvGen::new(&mut rng, 2, 64);
            fill(&mut cache, &mut rng, &gen, 1, 160);
            let before = cache.dequantized(2, 1).unwrap();
            cache.seq_truncate(1, cut as u32).unwrap();
            assert_eq!(cache.seq_len(1).unwrap() as usize, cut);
            let after = cache.dequantized(2, 1).unwrap();
            // f32 windows: the dequantized values that return to the window are kept exactly.
            assert_eq!(prefix(&after, cut), prefix(&before, cut), "cut at {cut}");
            // Appending after a rollback gives correct attention, through the next flushes.
            for n in [1usize, 40, 1, 17] {
                let (k, v, q) = (gen.keys(&mut rng, n), gen.values(&mut rng, n), queries(&mut rng, n, 4, 64));
                append_attend_checked(&mut cache, 2, 1, &k, &v, &q, 4, &AttnOptions::default(), 1e-5);
            }
            // Pages are released: truncating to 0 and removing frees everything.
            cache.seq_truncate(1, 0).unwrap();
            cache.seq_remove(1).unwrap();
            assert_eq!(cache.stats().pages_used, 0);
        }
    }
}

#[test]
fn fork_shares_pages_and_copies_on_write() {
    let mut rng = Rng::fresh("fork_shares_pages_and_copies_on_write");
    let mut c = config();
    c.page_tokens = 64; // several groups per page, so the shared last page is written to
    let mut cache = Cache::new(c).unwrap();
    let gen = KvGen::new(&mut rng, 2, 64);
    fill(&mut cache, &mut rng, &gen, 1, 200);
    let src = cache.dequantized(1, 1).unwrap();
    let used = cache.stats().pages_used;
    for n in [200u32, 170, 100, 75] {
        cache.seq_copy(1, 2, n).unwrap();
        let d = cache.dequantized(1, 2).unwrap();
        assert_eq!(d.len, n as usize);
        assert_eq!(prefix(&d, n as usize), prefix(&src, n as usize), "fork of {n}");
    }
    // Forking shares pages: the copy of the whole prompt took no new page.
    cache.seq_copy(1, 3, 200).unwrap();
    assert_eq!(cache.stats().pages_used, used, "forks share their pages");
    // Writing into either side leaves the other untouched.
    for _ in 0..3 {
        let (k, v, q) = (gen.keys(&mut rng, 30), gen.values(&mut rng, 30), queries(&mut rng, 30, 2, 64));
        append_attend_checked(&mut cache, 1, 3, &k, &v, &q, 2, &AttnOptions::default(), 1e-5);
    }
    assert_eq!(cache.dequantized(1, 1).unwrap(), src);
    let fork = cache.dequantized(1, 3).unwrap();
    // Tokens quantized at the fork (200 - R rounded down to a group: 160) are shared as they were.
    assert_eq!(prefix(&fork, 160), prefix(&src, 160));
    for _ in 0..3 {
        let (k, v) = (gen.keys(&mut rng, 30), gen.values(&mut rng, 30));
        append(&mut cache, 1, 1, &k, &v).unwrap();
    }
    assert_eq!(cache.dequantized(1, 3).unwrap(), fork);
    assert!(matches!(cache.seq_copy(1, 1, 5), Err(Error::InvalidArgument(_))));
    assert_eq!(cache.seq_copy(9, 2, 5), Err(Error::UnknownSequence(9)));
}

#[test]
fn save_and_restore_round_trips() {
    let mut rng = Rng::fresh("save_and_restore_round_trips");
    for dtype in [DType::F32, DType::F16] {
        let mut c = config();
        c.dtype = dtype;
        c.sinks = 2;
        let mut cache = Cache::new(c.clone()).unwrap();
        let gen = KvGen::new(&mut rng, 2, 64);
        fill(&mut cache, &mut rng, &gen, 5, 150);
        fill(&mut cache, &mut rng, &gen, 6, 33);
        cache.seq_copy(5, 8, 120).unwrap();
        let blob = cache.save_state_vec();
        assert_eq!(blob.len(), cache.state_size());
        let snapshot: Vec<_> = [5u32, 6, 8].iter().map(|&s| cache.dequantized(1, s).unwrap()).collect();
        let stats = cache.stats();

        // Restore into a fresh cache of the same configuration.
        let mut other = Cache::new(c.clone()).unwrap();
        other.load_state(&blob).unwrap();
        assert_eq!(other.stats(), stats);
        for (i, &s) in [5u32, 6, 8].iter().enumerate() {
            assert_eq!(other.dequantized(1, s).unwrap(), snapshot[i]);
        }
        // Both caches now behave identically.
        let (k, v, q) = (gen.keys(&mut rng, 40), gen.values(&mut rng, 40), queries(&mut rng, 40, 2, 64));
        let a = append_attend_checked(&mut cache, 1, 8, &k, &v, &q, 2, &Default::default(), 1e-5);
        let b = append_attend_checked(&mut other, 1, 8, &k, &v, &q, 2, &Default::default(), 1e-5);
        assert_eq!(a, b);
        // Restoring over a changed cache brings it back.
        cache.load_state(&blob).unwrap();
        assert!(cache.save_state_vec() == blob);

        // One sequence into a cache with another capacity, under another id.
        let seq_blob = cache.save_seq_state_vec(5).unwrap();
        let mut c2 = c.clone();
        (c2.max_tokens, c2.max_seqs) = (512, 2);
        let mut small = Cache::new(c2).unwrap();
        fill(&mut small, &mut rng, &gen, 3, 10);
        small.load_seq_state(3, &seq_blob).unwrap();
        assert_eq!(small.dequantized(1, 3).unwrap(), snapshot[0]);
        assert_eq!(small.seq_ids(), vec![3]);
    }
}

/// The same history, in a cache of configuration `c`: sequences that cross page edges, a fork
/// inside a page that then diverges, a whole fork truncated inside a page, five sequences live
/// at once, and removals that leave holes in the slots and the pools.
fn history(c: CacheConfig, seed: u64) -> Cache {
    let mut rng = Rng::new(seed);
    let mut cache = Cache::new(c).unwrap();
    let gen = KvGen::new(&mut rng, 2, 64);
    fill(&mut cache, &mut rng, &gen, 7, 10);
    fill(&mut cache, &mut rng, &gen, 5, 150);
    fill(&mut cache, &mut rng, &gen, 6, 33);
    cache.seq_copy(5, 8, 120).unwrap();
    fill(&mut cache, &mut rng, &gen, 8, 40);
    cache.seq_copy(5, 9, u32::MAX).unwrap();
    cache.seq_truncate(9, 70).unwrap();
    cache.seq_remove(6).unwrap();
    cache.seq_remove(7).unwrap();
    fill(&mut cache, &mut rng, &gen, 2, 300);
    cache
}

fn sorted_ids(cache: &Cache) -> Vec<u32> {
    let mut ids = cache.seq_ids();
    ids.sort();
    ids
}

fn same_contents(a: &Cache, b: &Cache, what: &str) {
    assert_eq!(sorted_ids(a), sorted_ids(b), "{what}");
    for s in a.seq_ids() {
        for l in 0..a.config().n_layers {
            assert!(a.dequantized(l, s).unwrap() == b.dequantized(l, s).unwrap(), "{what}: seq {s} layer {l}");
        }
    }
}

/// What a cache holds, without what its capacity decides.
fn held_stats(cache: &Cache) -> kivi::MemoryStats {
    kivi::MemoryStats { pages_total: 0, reserved_bytes: 0, table_bytes: 0, ..cache.stats() }
}

/// A whole-cache blob loads into a cache of another page size and a smaller capacity that holds
/// it: the same contents, pages shared as in a cache that lived the same history in that page
/// size, the same attention and flushes afterwards, and back again. Sequence blobs too.
#[test]
fn states_load_into_other_page_sizes_and_capacities() {
    let mut rng = Rng::fresh("states_load_into_other_page_sizes_and_capacities");
    let seed = rng.next_u64();
    for (mode, dtype, sinks) in [(KeyMode::PerChannel, DType::F32, 0), (KeyMode::PerToken, DType::F16, 1)] {
        let at = |page: u32, max_tokens: u32, max_seqs: u32| {
            let mut c = config();
            (c.key_mode, c.dtype, c.sinks) = (mode, dtype, sinks);
            (c.page_tokens, c.max_tokens, c.max_seqs) = (page, max_tokens, max_seqs);
            c
        };
        for src_page in [0u32, 64, 256] {
            let src = history(at(src_page, 2048, 6), seed);
            let blob = src.save_state_vec();
            for page in [0u32, 32, 256] {
                let what = format!("{mode:?}, pages of {src_page} into pages of {page}");
                // Four sequence slots where the blob used slot 4: the slots are renumbered.
                let mut dst = Cache::new(at(page, 1024, 4)).unwrap();
                let gen = KvGen::new(&mut rng, 2, 64);
                fill(&mut dst, &mut rng, &gen, 3, 70);
                fill(&mut dst, &mut rng, &gen, 9, 20);
                dst.load_state(&blob).unwrap();
                same_contents(&dst, &src, &what);
                // Pages as the history left them in that page size: the same with the same page
                // size; from one group per page (where forks share every common group) at most
                // as many, fewer where a sequence's last page can share a longer one's. (From
                // larger pages a group copied on write is no longer known to be shared.)
                let lived = held_stats(&history(at(page, 2048, 6), seed));
                let loaded = held_stats(&dst);
                if src_page == page {
                    assert_eq!(loaded, lived, "{what}");
                } else if src_page == 0 {
                    assert!(loaded.pages_used <= lived.pages_used, "{what}: {loaded:?} against {lived:?}");
                }
                let unshared = kivi::MemoryStats { pages_used: 0, code_bytes: 0, scale_bytes: 0, ..loaded };
                assert_eq!(unshared, kivi::MemoryStats { pages_used: 0, code_bytes: 0, scale_bytes: 0, ..lived });

                // Both caches go on alike: appends through group flushes, attention checked
                // against the reference.
                let mut src = history(at(src_page, 2048, 6), seed);
                let gen = KvGen::new(&mut rng, 2, 64);
                for (seq, n) in [(9u32, 40usize), (2, 17), (8, 1)] {
                    let (k, v, q) = (gen.keys(&mut rng, n), gen.values(&mut rng, n), queries(&mut rng, n, 4, 64));
                    for l in 0..3 {
                        let a = append_attend_checked(&mut src, l, seq, &k, &v, &q, 4, &Default::default(), 1e-5);
                        let b = append_attend_checked(&mut dst, l, seq, &k, &v, &q, 4, &Default::default(), 1e-5);
                        assert!(rel_err(&b, &a.iter().map(|&x| x as f64).collect::<Vec<_>>()) < 1e-5, "{what}");
                    }
                }
                same_contents(&dst, &src, &format!("{what}, after appends"));

                // And back into the page size and capacity it came from.
                let mut back = Cache::new(at(src_page, 2048, 6)).unwrap();
                back.load_state(&dst.save_state_vec()).unwrap();
                same_contents(&back, &src, &format!("{what}, back"));

                // One sequence, over an existing one and into a fresh cache.
                let one = src.save_seq_state_vec(9).unwrap();
                dst.load_seq_state(8, &one).unwrap();
                let mut fresh = Cache::new(at(page, 512, 1)).unwrap();
                fresh.load_seq_state(0, &one).unwrap();
                for l in 0..3 {
                    let want = src.dequantized(l, 9).unwrap();
                    assert!(dst.dequantized(l, 8).unwrap() == want, "{what}: sequence blob, layer {l}");
                    assert!(fresh.dequantized(l, 0).unwrap() == want, "{what}: sequence blob, layer {l}");
                }
            }
        }
    }
}

/// A blob that does not fit is refused with the numbers that do not fit, and changes nothing.
#[test]
fn states_too_large_for_a_cache_are_refused() {
    let seed = Rng::fresh("states_too_large_for_a_cache_are_refused").next_u64();
    let mut c = config();
    c.max_seqs = 6;
    let blob = history(c.clone(), seed).save_state_vec();
    for (page, max_tokens, max_seqs, says) in [
        (0, 2048, 3, "the state holds 4 sequences, this cache at most 3 (max_seqs)"),
        (0, 320, 4, "need 23 pages of 16 tokens, this cache has 20 (max_tokens 320)"),
        (64, 64, 4, "need 6 pages of 64 tokens, this cache has 5 (max_tokens 64)"),
    ] {
        let mut t = c.clone();
        (t.page_tokens, t.max_tokens, t.max_seqs) = (page, max_tokens, max_seqs);
        let mut target = Cache::new(t).unwrap();
        let mut rng = Rng::new(seed);
        let gen = KvGen::new(&mut rng, 2, 64);
        fill(&mut target, &mut rng, &gen, 3, 70);
        let before = target.save_state_vec();
        let e = target.load_state(&blob).unwrap_err();
        assert!(matches!(&e, Error::StateMismatch(m) if m.contains(says)), "{e}");
        assert!(target.save_state_vec() == before, "a refused blob changed the cache");
    }
}

/// Flushes spread KV heads over the cache's threads: any thread count holds exactly the same
/// bytes, with heads that do not divide evenly, pages of several groups, forks whose shared page
/// is copied before a flush writes to it, and batched decode steps.
#[test]
fn flushes_on_any_thread_count_hold_the_same_bytes() {
    let mut rng = Rng::fresh("flushes_on_any_thread_count_hold_the_same_bytes");
    let seed = rng.next_u64();
    for (nkv, page) in [(5u32, 0u32), (3, 64), (1, 0)] {
        let mut blobs = Vec::new();
        for threads in [1u32, 2, 3, 4] {
            let mut c = CacheConfig::new(2, nkv, 64);
            (c.residual, c.group_size, c.max_tokens, c.max_seqs, c.page_tokens) = (32, 16, 2048, 3, page);
            (c.sinks, c.n_threads) = (1, threads);
            let mut cache = Cache::new(c).unwrap();
            let mut rng = Rng::new(seed);
            let gen = KvGen::new(&mut rng, nkv as usize, 64);
            let row = nkv as usize * 64;
            let mut put = |cache: &mut Cache, seq: u32, n: usize| {
                let (k, v) = (gen.keys(&mut rng, n), gen.values(&mut rng, n));
                for l in 0..2 {
                    cache.append(l, seq, Rows::new(&k, n).unwrap(), Rows::new(&v, n).unwrap()).unwrap();
                }
            };
            put(&mut cache, 0, 201);
            cache.seq_copy(0, 1, 170).unwrap();
            put(&mut cache, 1, 37);
            put(&mut cache, 0, 1);
            put(&mut cache, 2, 60);
            for _ in 0..20 {
                let ids = [0u32, 1, 2];
                let (k, v) = (gen.keys(&mut rng, 3), gen.values(&mut rng, 3));
                let q = queries(&mut rng, 3, nkv as usize, 64);
                let mut out = vec![0f32; q.len()];
                let (kr, vr) = (Rows::new(&k, 3).unwrap(), Rows::new(&v, 3).unwrap());
                let o = AttnOptions::default();
                assert_eq!(k.len(), 3 * row);
                for l in 0..2 {
                    cache
                        .decode(l, &ids, kr, vr, Rows::new(&q, 3).unwrap(), RowsMut::new(&mut out, 3).unwrap(), &o)
                        .unwrap();
                }
            }
            blobs.push((threads, cache.save_state_vec()));
        }
        for (threads, b) in &blobs[1..] {
            assert!(*b == blobs[0].1, "{nkv} KV heads, page {page}: {threads} threads hold other bytes than 1");
        }
    }
}

#[test]
fn corrupt_and_mismatched_states_are_refused() {
    let mut rng = Rng::fresh("corrupt_and_mismatched_states_are_refused");
    let mut cache = Cache::new(config()).unwrap();
    let gen = KvGen::new(&mut rng, 2, 64);
    fill(&mut cache, &mut rng, &gen, 1, 90);
    let blob = cache.save_state_vec();
    let seq_blob = cache.save_seq_state_vec(1).unwrap();
    let mut target = Cache::new(config()).unwrap();
    fill(&mut target, &mut rng, &gen, 4, 50);
    let before = target.save_state_vec();
    let unchanged = |t: &Cache| assert!(t.save_state_vec() == before, "a refused load changed the cache");

    // Every single flipped byte is caught (checked on a sample of positions).
    for i in (0..blob.len()).step_by(blob.len() / 97 + 1) {
        let mut b = blob.clone();
        b[i] ^= 0x20;
        let e = target.load_state(&b).unwrap_err();
        assert!(matches!(e, Error::CorruptState(_) | Error::StateMismatch(_)), "byte {i}: {e}");
        unchanged(&target);
    }
    for cut in [0, 10, blob.len() / 2, blob.len() - 1] {
        assert!(matches!(target.load_state(&blob[..cut]), Err(Error::CorruptState(_))), "cut {cut}");
        unchanged(&target);
    }
    // The wrong kind of blob.
    assert!(matches!(target.load_state(&seq_blob), Err(Error::StateMismatch(_))));
    assert!(matches!(target.load_seq_state(2, &blob), Err(Error::StateMismatch(_))));
    unchanged(&target);
    // Another configuration: the message names the field.
    let mut c = config();
    c.key_bits = 4;
    let other = Cache::new(c).unwrap();
    let e = Cache::new(config()).unwrap().load_state(&other.save_state_vec()).unwrap_err();
    assert!(e.to_string().contains("key_bits is 4 in the state and 2"), "{e}");
    // A buffer too small to save into.
    let mut small = vec![0u8; 10];
    assert_eq!(cache.save_state(&mut small), Err(Error::BufferTooSmall { needed: blob.len(), given: 10 }));
    assert_eq!(small, vec![0u8; 10]);
}

#[test]
fn failed_calls_leave_the_cache_unchanged() {
    let mut rng = Rng::fresh("failed_calls_leave_the_cache_unchanged");
    let mut c = config();
    (c.max_tokens, c.max_seqs) = (64, 2);
    let mut cache = Cache::new(c).unwrap();
    let gen = KvGen::new(&mut rng, 2, 64);
    fill(&mut cache, &mut rng, &gen, 1, 60);
    let before = cache.save_state_vec();
    let (k, v, q) = (gen.keys(&mut rng, 50), gen.values(&mut rng, 50), queries(&mut rng, 50, 4, 64));
    let mut out = vec![7f32; q.len()];
    let mut try_aa = |cache: &mut Cache, layer: u32, seq: u32, k: &[f32], v: &[f32], q: &[f32]| {
        let n = k.len() / 128;
        let r = cache.append_attend(
            layer,
            seq,
            Rows::new(k, n).unwrap(),
            Rows::new(v, n).unwrap(),
            Rows::new(q, n).unwrap(),
            RowsMut::new(&mut out[..q.len()], n).unwrap(),
            &AttnOptions::default(),
        );
        r.unwrap_err().to_string()
    };
    // Layer out of range.
    assert_eq!(try_aa(&mut cache, 3, 1, &k, &v, &q), "layer 3 out of range: the cache has 3 layers (0..3)");
    // NaN in the middle of a chunk: nothing of the chunk is appended.
    let mut bad = k.clone();
    bad[17 * 128 + 5] = f32::NAN;
    let e = try_aa(&mut cache, 0, 1, &bad, &v, &q);
    assert!(e.contains("NaN in keys at token 17, element 5"), "{e}");
    let mut inf = v.clone();
    inf[3] = f32::INFINITY;
    assert!(try_aa(&mut cache, 0, 1, &k, &inf, &q).contains("infinity in values at token 0"));
    // Capacity: 64 quantized tokens per layer, so this chunk cannot fit.
    let (k2, v2, q2) = (gen.keys(&mut rng, 200), gen.values(&mut rng, 200), queries(&mut rng, 200, 4, 64));
    let mut out2 = vec![0f32; q2.len()];
    let e = cache
        .append_attend(
            0,
            1,
            Rows::new(&k2, 200).unwrap(),
            Rows::new(&v2, 200).unwrap(),
            Rows::new(&q2, 200).unwrap(),
            RowsMut::new(&mut out2, 200).unwrap(),
            &AttnOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::CapacityExhausted { seq: 1, layer: 0, token: 60, .. }), "{e}");
    assert!(out2.iter().all(|&x| x == 0.0), "output written on failure");
    // Too many sequences.
    append(&mut cache, 0, 2, &k[..128], &v[..128]).unwrap();
    cache.seq_remove(2).unwrap();
    assert!(cache.save_state_vec() == before);
    append(&mut cache, 0, 2, &k[..128], &v[..128]).unwrap();
    let e = append(&mut cache, 0, 3, &k[..128], &v[..128]).unwrap_err();
    assert_eq!(e, Error::TooManySequences { seq: 3, max: 2 });
    cache.seq_remove(2).unwrap();
    assert!(cache.save_state_vec() == before);
    // Shapes: a query row that is not a multiple of the kv heads, a wrong output.
    let e = try_aa(&mut cache, 0, 1, &k[..128], &v[..128], &q[..3 * 64]);
    assert!(e.contains("queries"), "{e}");
    // Bad options.
    let n = 1;
    let mut o = vec![0f32; 256];
    let bad_opts = AttnOptions { softcap: -1.0, ..Default::default() };
    let e = cache
        .append_attend(
            0,
            1,
            Rows::new(&k[..128], n).unwrap(),
            Rows::new(&v[..128], n).unwrap(),
            Rows::new(&q[..256], n).unwrap(),
            RowsMut::new(&mut o, n).unwrap(),
            &bad_opts,
        )
        .unwrap_err();
    assert!(e.to_string().contains("softcap -1"), "{e}");
    // Unknown sequences.
    assert_eq!(cache.seq_truncate(42, 1), Err(Error::UnknownSequence(42)));
    assert_eq!(cache.seq_len(42), Err(Error::UnknownSequence(42)));
    assert!(cache.save_state_vec() == before);
    // Bad configurations name the value.
    let mut c = config();
    c.head_dim = 100;
    c.value_group = 32;
    assert!(Cache::new(c).unwrap_err().to_string().contains("head_dim 100"));
    let mut c = config();
    c.value_group = 48;
    assert!(Cache::new(c).unwrap_err().to_string().contains("head_dim 64 is not a multiple of the value group 48"));
    let mut c = config();
    c.key_bits = 3;
    assert!(Cache::new(c).unwrap_err().to_string().contains("key_bits 3"));
    let mut c = config();
    c.residual = 20;
    assert!(Cache::new(c).unwrap_err().to_string().contains("residual 20"));
}

/// Random operations against a model that knows each sequence's tokens: lengths, exactness of
/// sinks and recent tokens, bounded error elsewhere, fused attention equal to the reference on
/// whatever the cache holds, and unchanged state after every refused operation.
#[test]
fn random_operations_match_a_model() {
    let mut rng = Rng::fresh("random_operations_match_a_model");
    for trial in 0..4 {
        let mut c = CacheConfig::new(2, 1, 64);
        c.group_size = [8, 16][trial % 2];
        c.residual = c.group_size * [0, 2][trial / 2];
        c.sinks = (trial % 3) as u32;
        c.key_mode = if trial == 3 { KeyMode::PerToken } else { KeyMode::PerChannel };
        c.page_tokens = c.group_size * 2;
        (c.max_tokens, c.max_seqs) = (256, 3);
        // Two trials bound each sequence below the pool (block tables shorter than the pool).
        c.max_seq_tokens = [0, 100, 0, 150][trial];
        let limit = if c.max_seq_tokens == 0 { usize::MAX } else { c.max_seq_tokens as usize };
        let mut cache = Cache::new(c.clone()).unwrap();
        let gen = KvGen::new(&mut rng, 1, 64);
        // Model: per sequence id, its tokens (keys, values) and how many of its newest tokens
        // must be exact (appended since the last cut).
        let mut model: std::collections::BTreeMap<u32, (Vec<f32>, Vec<f32>, usize)> = Default::default();
        for op in 0..150 {
            let before = cache.save_state_vec();
            let seq = rng.below(4) as u32;
            let r = match rng.below(10) {
                0..=4 => {
                    let n = 1 + if rng.below(3) == 0 { rng.below(70) } else { 0 };
                    let (k, v) = (gen.keys(&mut rng, n), gen.values(&mut rng, n));
                    let q = queries(&mut rng, n, 2, 64);
                    let mut res = Ok(());
                    for l in 0..2 {
                        let past = held(&cache, l, seq);
                        let mut out = vec![0f32; q.len()];
                        res = cache.append_attend(
                            l,
                            seq,
                            Rows::new(&k, n).unwrap(),
                            Rows::new(&v, n).unwrap(),
                            Rows::new(&q, n).unwrap(),
                            RowsMut::new(&mut out, n).unwrap(),
                            &Default::default(),
                        );
                        if res.is_err() {
                            assert_eq!(l, 0, "layers fill alike, so only the first can refuse");
                            break;
                        }
                        let want =
                            kivi::attention::reference::attention(&past, &k, &v, &q, 2, past.len, &Default::default())
                                .unwrap();
                        assert!(rel_err(&out, &want) < 1e-5, "trial {trial} op {op}");
                    }
                    let held_now = model.get(&seq).map_or(0, |e| e.0.len() / 64);
                    let full = matches!(res, Err(Error::SequenceFull { .. }));
                    assert_eq!(full, held_now + n > limit, "trial {trial} op {op}: {res:?} for {held_now} + {n}");
                    if res.is_ok() {
                        let e = model.entry(seq).or_default();
                        e.0.extend_from_slice(&k);
                        e.1.extend_from_slice(&v);
                        e.2 += n;
                    }
                    res
                }
                5 => cache.seq_remove(seq).map(|_| {
                    model.remove(&seq);
                }),
                6 => {
                    let n = rng.below(120) as u32;
                    cache.seq_truncate(seq, n).map(|_| {
                        let e = model.get_mut(&seq).unwrap();
                        let n = (n as usize).min(e.0.len() / 64);
                        e.0.truncate(n * 64);
                        e.1.truncate(n * 64);
                        e.2 = 0;
                    })
                }
                7 => {
                    let dst = rng.below(4) as u32;
                    let n = rng.below(150) as u32;
                    cache.seq_copy(seq, dst, n).map(|_| {
                        let mut e = model[&seq].clone();
                        let n = (n as usize).min(e.0.len() / 64);
                        e.0.truncate(n * 64);
                        e.1.truncate(n * 64);
                        e.2 = 0;
                        model.insert(dst, e);
                    })
                }
                8 => {
                    let blob = cache.save_seq_state_vec(seq);
                    blob.and_then(|b| {
                        let dst = rng.below(4) as u32;
                        cache.load_seq_state(dst, &b).map(|_| {
                            let e = model[&seq].clone();
                            model.insert(dst, e);
                        })
                    })
                }
                _ => {
                    // Restore over a changed cache.
                    let blob = cache.save_state_vec();
                    cache.clear();
                    let r = cache.load_state(&blob);
                    assert!(r.is_ok(), "{r:?}");
                    r
                }
            };
            if r.is_err() {
                assert!(cache.save_state_vec() == before, "trial {trial} op {op}: {:?} changed the cache", r);
            }
            // Check the whole cache against the model.
            assert_eq!(
                cache.seq_ids().iter().copied().collect::<std::collections::BTreeSet<_>>(),
                model.keys().copied().collect()
            );
            for (&s, (k, v, fresh)) in &model {
                let n = k.len() / 64;
                assert_eq!(cache.seq_len(s).unwrap() as usize, n);
                for l in 0..2 {
                    let d = cache.dequantized(l, s).unwrap();
                    let exact_from = n - (*fresh).min(c.residual as usize).min(n);
                    for p in 0..n {
                        for ch in 0..64 {
                            let (dk, dv) = (d.key(p, 0, ch), d.value(p, 0, ch));
                            let (xk, xv) = (k[p * 64 + ch] as f64, v[p * 64 + ch] as f64);
                            if p < c.sinks as usize || p >= exact_from {
                                assert_eq!((dk, dv), (xk, xv), "trial {trial} op {op} seq {s} pos {p}");
                            } else {
                                // Outlier channels reach about 40: 2-bit steps stay below ~30.
                                assert!((dk - xk).abs() < 30.0 && (dv - xv).abs() < 8.0, "pos {p}: {dk} vs {xk}");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `max_seq_tokens` bounds each sequence, not the pool: appends and decode steps that would pass
/// it fail naming the sequence and change nothing, other sequences still grow, and state blobs
/// holding a longer sequence are refused.
#[test]
fn max_seq_tokens_bounds_each_sequence() {
    let mut rng = Rng::fresh("max_seq_tokens_bounds_each_sequence");
    let gen = KvGen::new(&mut rng, 2, 64);
    // 100 = 3 groups of 16 past the window of 32 and a partial one; pages of 2 groups.
    let mut c = config();
    (c.max_seq_tokens, c.page_tokens) = (100, 32);
    let mut cache = Cache::new(c.clone()).unwrap();
    let (k, v) = (gen.keys(&mut rng, 101), gen.values(&mut rng, 101));
    for l in 0..3 {
        append(&mut cache, l, 0, &k[..99 * 128], &v[..99 * 128]).unwrap();
    }
    let before = cache.save_state_vec();
    let e = append(&mut cache, 1, 0, &k[..2 * 128], &v[..2 * 128]).unwrap_err();
    assert_eq!(e, Error::SequenceFull { seq: 0, layer: 1, len: 99, adding: 2, max: 100 });
    assert!(e.to_string().contains("sequence 0 is full") && e.to_string().contains("max_seq_tokens 100"), "{e}");
    assert!(cache.save_state_vec() == before, "a refused append changed the cache");
    // A decode step: sequence 1 is new, sequence 0 takes its 100th token, then is full.
    let step = |cache: &mut Cache, seqs: &[u32], l: u32| {
        let n = seqs.len();
        let (k1, v1, q1) = (&k[..n * 128], &v[..n * 128], queries(&mut Rng::new(7), n, 4, 64));
        let mut out = vec![0f32; q1.len()];
        cache.decode(
            l,
            seqs,
            Rows::new(k1, n).unwrap(),
            Rows::new(v1, n).unwrap(),
            Rows::new(&q1, n).unwrap(),
            RowsMut::new(&mut out, n).unwrap(),
            &AttnOptions::default(),
        )
    };
    for l in 0..3 {
        step(&mut cache, &[1, 0], l).unwrap();
    }
    assert_eq!(cache.seq_len(0).unwrap(), 100);
    let before = cache.save_state_vec();
    let e = step(&mut cache, &[1, 0], 0).unwrap_err();
    assert!(matches!(e, Error::SequenceFull { seq: 0, layer: 0, len: 100, adding: 1, .. }), "{e}");
    assert!(cache.save_state_vec() == before, "a refused decode step changed the cache");
    // Sequence 1 still grows to its own limit, and a truncated sequence 0 grows again.
    let (k2, v2) = (gen.keys(&mut rng, 99), gen.values(&mut rng, 99));
    for l in 0..3 {
        append(&mut cache, l, 1, &k2, &v2).unwrap();
    }
    assert_eq!(cache.seq_len(1).unwrap(), 100);
    cache.seq_truncate(0, 60).unwrap();
    for l in 0..3 {
        append(&mut cache, l, 0, &k[..40 * 128], &v[..40 * 128]).unwrap();
    }
    assert_eq!(cache.seq_len(0).unwrap(), 100);

    // Blobs from a cache without the limit: a sequence of 101 tokens does not load, one of 100
    // does; a whole cache holding the long one does not load either.
    let mut free = Cache::new(CacheConfig { max_seq_tokens: 0, ..c.clone() }).unwrap();
    for l in 0..3 {
        append(&mut free, l, 5, &k, &v).unwrap();
        append(&mut free, l, 6, &k[..100 * 128], &v[..100 * 128]).unwrap();
    }
    let before = cache.save_state_vec();
    let e = cache.load_seq_state(2, &free.save_seq_state_vec(5).unwrap()).unwrap_err();
    assert!(
        matches!(&e, Error::StateMismatch(m) if m.contains("101 tokens") && m.contains("max_seq_tokens 100")),
        "{e}"
    );
    let e = cache.load_state(&free.save_state_vec()).unwrap_err();
    assert!(matches!(&e, Error::StateMismatch(m) if m.contains("sequence 5")), "{e}");
    assert!(cache.save_state_vec() == before, "a refused blob changed the cache");
    cache.seq_remove(1).unwrap();
    cache.load_seq_state(2, &free.save_seq_state_vec(6).unwrap()).unwrap();
    assert_eq!(held(&cache, 2, 2).keys, held(&free, 2, 6).keys);
}

/// A configuration that validates but whose memory the machine cannot give (here more than
/// a 64-bit process can map) is refused with an error that says so, not an abort.
#[test]
fn a_cache_too_large_to_allocate_is_an_error() {
    let mut cfg = CacheConfig::new(1, 1 << 20, 1024);
    cfg.max_tokens = u32::MAX;
    cfg.page_tokens = 1 << 16;
    cfg.validate().unwrap();
    let e = Cache::new(cfg.clone()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::InvalidConfig(_)), "{msg}");
    assert!(msg.contains("could not allocate") && msg.contains("the pages of layer 0"), "{msg}");
    // The same configuration at a size the machine has is fine.
    cfg.n_kv_heads = 1;
    cfg.max_tokens = 1 << 16;
    Cache::new(cfg).unwrap();
}
