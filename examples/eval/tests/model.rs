//! The forward pass on tiny models written by the test in GGUF form, one per
//! architecture, against an independent whole-sequence reference; then the
//! same through kivi caches and through the evaluation protocol.

mod common;

use common::{reference_logits, write_tiny, Rng, TinySpec};
use kivi_eval::eval::{evaluate, windows, CacheSpec, EvalOptions};
use kivi_eval::gguf::Gguf;
use kivi_eval::kv::{KvStore, NaiveStore};
use kivi_eval::model::Model;
use kivi_eval::stores::{self, WindowType};
use kivi_eval::tokenizer::Tokenizer;

fn load(spec: &TinySpec, name: &str) -> (Model, Tokenizer, common::Weights) {
    let dir = std::env::temp_dir().join(format!("kivi-eval-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let w = write_tiny(spec, &path, 7);
    let mut g = Gguf::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let m = Model::load(&mut g).unwrap();
    std::fs::remove_file(&path).ok();
    (m, tok, w)
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    let mut t: Vec<u32> = (0..n).map(|_| ((r.next() + 1.0) * 0.5 * vocab as f32) as u32 % vocab as u32).collect();
    t[0] = 2;
    t
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= tol * scale, "{what}: max abs error {err} (scale {scale})");
}

/// Prefill `first` tokens, then decode the rest one at a time through `store`;
/// returns the logits of every position.
fn run_incremental(m: &Model, store: &mut dyn KvStore, toks: &[u32], first: usize) -> Vec<Vec<f32>> {
    let v = m.cfg.vocab;
    let pos: Vec<usize> = (0..first).collect();
    let lg = m
        .forward(&toks[..first], &pos, |l, p, q, k, vv, out| store.append_attend(l, 0, k, vv, q, out, first, p))
        .unwrap();
    let mut all: Vec<Vec<f32>> = lg.chunks(v).map(|c| c.to_vec()).collect();
    for t in first..toks.len() {
        let lg =
            m.forward(&toks[t..t + 1], &[t], |l, p, q, k, vv, out| store.decode(l, &[0], k, vv, q, out, p)).unwrap();
        all.push(lg);
    }
    all
}

fn check_arch(spec: TinySpec, name: &str) {
    let (m, _tok, w) = load(&spec, name);
    assert_eq!(m.cfg.n_layers, spec.n_layers);
    let toks = tokens(40, m.cfg.vocab, 3);
    let want = reference_logits(&spec, &w, &toks);
    // the plain reference attention
    let mut naive = NaiveStore::new(m.cfg.n_layers, 1);
    let got = run_incremental(&m, &mut naive, &toks, 17);
    for (p, (g, r)) in got.iter().zip(&want).enumerate() {
        assert_close(g, r, 2e-4, &format!("{name} naive store, position {p}"));
    }
    // kivi's exact configuration (f32 window holding everything)
    let mut exact = stores::make(&CacheSpec::exact(), &m.cfg, 1, 64, WindowType::F32, false).unwrap();
    let got = run_incremental(&m, exact.as_mut(), &toks, 17);
    for (p, (g, r)) in got.iter().zip(&want).enumerate() {
        assert_close(g, r, 2e-4, &format!("{name} kivi exact, position {p}"));
    }
    // 8-bit keys and values with nothing kept at full precision: close, not equal
    let mut q8 = stores::make(&CacheSpec::parse("kivi8-r0").unwrap(), &m.cfg, 1, 64, WindowType::F32, false).unwrap();
    let got = run_incremental(&m, q8.as_mut(), &toks, 17);
    for (p, (g, r)) in got.iter().zip(&want).enumerate() {
        assert_close(g, r, 5e-2, &format!("{name} kivi8-r0, position {p}"));
    }
}

#[test]
fn gemma3_forward_matches_reference() {
    let spec = TinySpec::gemma3();
    let (m, _, _) = load(&spec, "g.gguf");
    // layers 0-4 sliding, layer 5 global
    assert!((0..5).all(|l| m.cfg.is_swa(l)) && !m.cfg.is_swa(5));
    assert_eq!(m.cfg.attn_params(0).window, 12);
    check_arch(spec, "gemma3.gguf");
}

#[test]
fn llama_forward_matches_reference() {
    check_arch(TinySpec::llama(), "llama.gguf");
}

#[test]
fn mistral_sliding_window_matches_reference() {
    let mut spec = TinySpec::llama();
    spec.window = 10;
    let (m, _, _) = load(&spec, "m.gguf");
    assert!((0..spec.n_layers).all(|l| m.cfg.is_swa(l)));
    check_arch(spec, "mistral.gguf");
}

#[test]
fn protocol_on_tiny_model() {
    let spec = TinySpec::gemma3();
    let (m, tok, w) = load(&spec, "p.gguf");
    let ids = tokens(200, m.cfg.vocab, 11);
    let wins = windows(&ids, 64, 2, tok.bos).unwrap();
    assert_eq!(wins.len(), 2);
    assert!(wins.iter().all(|w| w[0] == 2 && w.len() == 64));
    let specs: Vec<CacheSpec> =
        ["exact", "kivi8-r0", "kivi2-r0", "ktok2-r0"].iter().map(|s| CacheSpec::parse(s).unwrap()).collect();
    let mut st: Vec<Box<dyn KvStore>> =
        specs.iter().map(|s| stores::make(s, &m.cfg, wins.len(), 64, WindowType::F32, false).unwrap()).collect();
    let rs = evaluate(&m, &wins, &specs, &mut st, &EvalOptions { ctx: 64, chunks: 2, progress: false }).unwrap();
    assert_eq!(rs.len(), 4);
    assert_eq!(rs[0].count, 2 * 31);
    assert_eq!(rs[0].kld, 0.0);
    assert_eq!(rs[0].top1, 1.0);
    assert!((rs[0].bits_per_element - 32.0).abs() < 1e-9);
    // perplexity of the exact run from the reference implementation
    let mut nll = 0f64;
    for win in &wins {
        let lg = reference_logits(&spec, &w, win);
        for t in 32..63 {
            let l = &lg[t];
            let mx = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = mx + l.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
            nll += lse - l[win[t + 1] as usize] as f64;
        }
    }
    let ppl_ref = (nll / 62.0).exp();
    assert!((rs[0].ppl / ppl_ref - 1.0).abs() < 1e-4, "ppl {} vs reference {}", rs[0].ppl, ppl_ref);
    for r in &rs[1..] {
        assert!(r.ppl.is_finite() && r.kld >= 0.0 && r.kld.is_finite(), "{r:?}");
        assert!(r.bits_per_element < 32.0);
    }
    assert!(rs[1].kld < 1e-3, "8-bit KLD {}", rs[1].kld);
    assert!(rs[2].kld > rs[1].kld, "2-bit should be worse than 8-bit");
}

/// Writes the tiny models and a text for them into `$KIVI_EVAL_TINY_DIR`, for
/// cross-checking with llama.cpp (`llama-perplexity` on the same files):
/// `KIVI_EVAL_TINY_DIR=dir cargo test --release -p kivi-eval --test model -- --ignored`
#[test]
#[ignore]
fn write_tiny_models_for_llama_cpp() {
    let Some(dir) = std::env::var_os("KIVI_EVAL_TINY_DIR") else { return };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_tiny(&TinySpec::gemma3(), &dir.join("tiny-gemma3.gguf"), 7);
    write_tiny(&TinySpec::llama(), &dir.join("tiny-llama.gguf"), 7);
    let words = ["the", "world", "and", "hello", "tea", "shore", "in", "an", "dish", "net", "hill"];
    let mut r = Rng::new(5);
    let mut text = String::new();
    for i in 0..3000 {
        let w = words[((r.next() + 1.0) * 0.5 * words.len() as f32) as usize % words.len()];
        text.push_str(w);
        text.push_str(if i % 13 == 12 { ".\n\n" } else { " " });
    }
    std::fs::write(dir.join("tiny.txt"), text).unwrap();
}

#[test]
fn config_names_parse() {
    let c = CacheSpec::parse("kivi2-r0-mm").unwrap();
    assert_eq!((c.key_bits, c.value_bits, c.residual, c.min_max_values, c.per_token_keys), (2, 2, 0, true, false));
    assert_eq!(c.name, "kivi2-r0-mm");
    let c = CacheSpec::parse("ktok4-mm").unwrap();
    assert_eq!((c.key_bits, c.residual, c.min_max_values, c.per_token_keys), (4, 128, true, true));
    let c = CacheSpec::parse("kivi4").unwrap();
    assert!(!c.min_max_values && c.residual == 128);
    assert_eq!(c.sinks, kivi::CacheConfig::new(1, 1, 128).sinks as usize, "kivi4 takes the library's sinks");
    let c = CacheSpec::parse("kivi4-s0").unwrap();
    assert_eq!((c.sinks, c.residual), (0, 128));
    let c = CacheSpec::parse("kivi2-r0-s4-mm").unwrap();
    assert_eq!((c.key_bits, c.residual, c.sinks, c.min_max_values), (2, 0, 4, true));
    let c = CacheSpec::parse("kivi2-s32").unwrap();
    assert_eq!((c.residual, c.sinks, c.min_max_values), (128, 32, false));
    for bad in ["kivi3", "kivi2-rx", "kivi2-mm-r0", "kv2", "kivi2-m", "kivi2-s", "kivi2-s4-r0"] {
        assert!(CacheSpec::parse(bad).is_err(), "{bad}");
    }
    // Every default prints a name that parses back to it.
    for c in CacheSpec::defaults() {
        assert_eq!(CacheSpec::parse(&c.name).unwrap(), c, "{}", c.name);
    }
}
