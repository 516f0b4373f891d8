//! The hand-written pre-tokenizers against splits produced by the regex
//! patterns themselves (Python's `regex` module, which supports look-ahead).

use kivi_eval::tokenizer::{pre_tokenize, PreTok};

fn check(pre: PreTok, text: &str, want: &[&str]) {
    let got = pre_tokenize(text, pre);
    assert_eq!(got, want, "{pre:?} on {text:?}");
    assert_eq!(got.concat(), text);
}

#[test]
fn llama3_pattern() {
    let p = PreTok::Llama3;
    check(p, "Hello world's 12345  \n\n test", &["Hello", " world", "'s", " ", "123", "45", "  \n\n", " test"]);
    check(p, "I'M here,   ok?!\n\tTabs\r\n", &["I", "'M", " here", ",", "  ", " ok", "?!\n", "\tTabs", "\r\n"]);
    check(p, "  leading and trailing  ", &[" ", " leading", " and", " trailing", "  "]);
    check(p, "x=1+22*333/4444;", &["x", "=", "1", "+", "22", "*", "333", "/", "444", "4", ";"]);
    check(p, "naïve café — déjà vu 😀 ok", &["naïve", " café", " —", " déjà", " vu", " 😀", " ok"]);
    check(p, "He said: \"don't\" 'quote'", &["He", " said", ":", " \"", "don", "'t", "\"", " '", "quote", "'"]);
    check(p, "a\n\n\nb  \n c", &["a", "\n\n\n", "b", "  \n", " c"]);
    check(p, "$$$ (1/2)...", &["$$$", " (", "1", "/", "2", ")..."]);
    check(p, "ÀB 漢字かな 123abc", &["ÀB", " 漢字かな", " ", "123", "abc"]);
}

#[test]
fn gpt2_pattern() {
    let p = PreTok::Gpt2;
    check(p, "Hello world's 12345  \n\n test", &["Hello", " world", "'s", " 12345", "  \n\n", " test"]);
    check(
        p,
        "I'M here,   ok?!\n\tTabs\r\n",
        &["I", "'", "M", " here", ",", "  ", " ok", "?!", "\n", "\t", "Tabs", "\r\n"],
    );
    check(p, "  leading and trailing  ", &[" ", " leading", " and", " trailing", "  "]);
    check(p, "x=1+22*333/4444;", &["x", "=", "1", "+", "22", "*", "333", "/", "4444", ";"]);
    check(p, "a\n\n\nb  \n c", &["a", "\n\n", "\n", "b", "  \n", " c"]);
    check(p, "ÀB 漢字かな 123abc", &["ÀB", " 漢字かな", " 123", "abc"]);
}
