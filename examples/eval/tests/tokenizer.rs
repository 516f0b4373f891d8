//! Tokenizers: synthetic vocabularies with known answers, and round trips on
//! the real Gemma 3 vocabulary when the model has been fetched
//! (`examples/eval/fetch.sh`; set KIVI_EVAL_REQUIRE_MODEL=1 to fail instead
//! of skipping when it is missing).

mod common;

use kivi_eval::gguf::Gguf;
use kivi_eval::tokenizer::{byte_to_unicode, Kind, PreTok, Tokenizer};
use std::path::PathBuf;

fn spm(add_space_prefix: bool) -> Tokenizer {
    let (toks, scores, types) = common::spm_vocab();
    let mut t = Tokenizer::new(Kind::Spm, toks, types, scores, &[]);
    t.bos = Some(2);
    t.add_bos = true;
    t.add_space_prefix = add_space_prefix;
    t
}

fn pieces(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&i| t.tokens[i as usize].clone()).collect()
}

#[test]
fn spm_merges_by_score() {
    let t = spm(true);
    let ids = t.encode("hello world", true);
    assert_eq!(pieces(&t, &ids), ["<bos>", "\u{2581}hello", "\u{2581}world"]);
    assert_eq!(t.decode(&ids), "hello world");
    let ids = t.encode("the and", false);
    assert_eq!(pieces(&t, &ids), ["\u{2581}the", "\u{2581}and"]);
}

#[test]
fn spm_byte_fallback_and_user_defined() {
    let t = spm(false);
    let ids = t.encode("hex\n\nzé", false);
    assert_eq!(pieces(&t, &ids), ["he", "<0x78>", "\n\n", "<0x7A>", "<0xC3>", "<0xA9>"]);
    assert_eq!(t.decode(&ids), "hex\n\nzé");
}

#[test]
fn spm_round_trips() {
    for prefix in [false, true] {
        let t = spm(prefix);
        for s in ["", "a", "  two  spaces ", "tab\tand\nnew lines\n\n\n", "ünïcödé 漢字 😀", "the world and hello"]
        {
            let ids = t.encode(s, true);
            assert_eq!(t.decode(&ids), s, "prefix {prefix}: {s:?} -> {:?}", pieces(&t, &ids));
        }
    }
}

fn bpe() -> Tokenizer {
    let b2u = byte_to_unicode();
    let mut toks: Vec<String> = (0..256).map(|b| b2u[b].to_string()).collect();
    let merges: Vec<String> = ["h e", "l l", "he ll", "hell o", "\u{120} h", "\u{120} hello", "w o", "wo r"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for m in &merges {
        toks.push(m.replace(' ', ""));
    }
    toks.push("<|begin_of_text|>".into());
    let n = toks.len();
    let mut types = vec![1; n];
    types[n - 1] = 3;
    let mut t = Tokenizer::new(Kind::Bpe, toks, types, vec![0.0; n], &merges);
    t.bos = Some(n as u32 - 1);
    t.add_bos = true;
    t.pre = PreTok::Llama3;
    t
}

#[test]
fn bpe_merges_by_rank() {
    let t = bpe();
    let ids = t.encode("hello hello wor", true);
    assert_eq!(pieces(&t, &ids), ["<|begin_of_text|>", "hello", "\u{120}hello", "\u{120}", "wor"]);
    assert_eq!(t.decode(&ids), "hello hello wor");
}

#[test]
fn bpe_round_trips() {
    let t = bpe();
    for s in ["", "It's 2024: naïve café, 漢字 😀!\n\n\tend  ", "x=1+22*333/4444;", "  \r\n  "] {
        let ids = t.encode(s, false);
        assert_eq!(t.decode(&ids), s);
    }
}

pub fn model_path() -> Option<PathBuf> {
    let cache = std::env::var_os("KIVI_EVAL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache"));
    let p = std::env::var_os("KIVI_EVAL_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("models/gemma-3-270m-q4_k_m.gguf"));
    if p.exists() {
        Some(p)
    } else if std::env::var_os("KIVI_EVAL_REQUIRE_MODEL").is_some() {
        panic!("model {} is missing: run examples/eval/fetch.sh", p.display());
    } else {
        eprintln!("skipping: model {} not fetched (examples/eval/fetch.sh)", p.display());
        None
    }
}

#[test]
fn real_vocabulary_round_trips() {
    let Some(path) = model_path() else { return };
    let g = Gguf::open(&path).unwrap();
    let t = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(t.kind, Kind::Spm);
    assert_eq!(t.vocab_size(), 262144);
    assert_eq!(t.bos, Some(2));
    let texts = [
        "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
        "  leading spaces, trailing spaces  \n\n\n\ttabs\r\nCRLF",
        "ünïcödé — «quotes» 漢字かな한국어 😀👍🏽 \u{0} \u{7f} \u{10FFFF}",
        "<start_of_turn>user\nhi<end_of_turn>",
        "12345678901234567890 3.14159 1e-9 0x1F",
    ];
    for s in texts {
        let ids = t.encode(s, true);
        assert_eq!(ids[0], 2);
        assert_eq!(t.decode(&ids), s, "{:?}", pieces(&t, &ids));
    }
    // Known pieces.
    let ids = t.encode(" Hamlet\n\n", false);
    assert_eq!(pieces(&t, &ids), ["\u{2581}Hamlet", "\n\n"]);
    // Control tokens in plain text are text, not control tokens.
    let ids = t.encode("<bos>", false);
    assert!(!ids.contains(&2));
    // The whole play.
    let text_path = std::env::var_os("KIVI_EVAL_TEXT")
        .map(PathBuf::from)
        .unwrap_or_else(|| path.parent().unwrap().join("../text/hamlet.txt"));
    if let Ok(text) = std::fs::read_to_string(text_path) {
        let ids = t.encode(&text, true);
        assert!(ids.len() > 40_000, "{}", ids.len());
        assert_eq!(t.decode(&ids), text);
    }
}
