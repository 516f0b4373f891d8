//! Tokenizers built from the vocabulary stored in a GGUF file, following
//! llama.cpp's behaviour so token streams (and so perplexities) compare:
//! - `llama`: SentencePiece BPE over scored pieces with byte fallback
//!   (Gemma, Llama 2, Mistral);
//! - `gpt2`: byte-level BPE over ranked merges with a regex-style
//!   pre-tokenizer (Llama 3 and others).
//!
//! In both, user-defined tokens in the text are split out first (longest first)
//! and control tokens are never produced from plain text.

use crate::gguf::{Gguf, Result};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

pub const TYPE_NORMAL: i32 = 1;
pub const TYPE_UNKNOWN: i32 = 2;
pub const TYPE_CONTROL: i32 = 3;
pub const TYPE_USER_DEFINED: i32 = 4;
pub const TYPE_UNUSED: i32 = 5;
pub const TYPE_BYTE: i32 = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Spm,
    Bpe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTok {
    /// Llama 3's pattern.
    Llama3,
    /// GPT-2's pattern.
    Gpt2,
}

pub struct Tokenizer {
    pub kind: Kind,
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    scores: Vec<f32>,
    ids: HashMap<String, u32>,
    merges: HashMap<(String, String), usize>,
    /// Token ids of user-defined pieces, longest text first.
    specials: Vec<u32>,
    byte_tokens: [Option<u32>; 256],
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_space_prefix: bool,
    pub pre: PreTok,
}

const SPACE_MARK: &str = "\u{2581}";

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let model = g.string("tokenizer.ggml.model")?;
        let kind = match model {
            "llama" => Kind::Spm,
            "gpt2" => Kind::Bpe,
            other => return Err(format!("unsupported tokenizer model `{other}`").into()),
        };
        let tokens = g.strings("tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let types = if g.get("tokenizer.ggml.token_type").is_some() {
            g.i32s("tokenizer.ggml.token_type")?
        } else {
            vec![TYPE_NORMAL; n]
        };
        let scores =
            if g.get("tokenizer.ggml.scores").is_some() { g.f32s("tokenizer.ggml.scores")? } else { vec![0.0; n] };
        let merges = if kind == Kind::Bpe { g.strings("tokenizer.ggml.merges")? } else { Vec::new() };
        let pre = match g.string("tokenizer.ggml.pre").unwrap_or("default") {
            "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => PreTok::Llama3,
            _ => PreTok::Gpt2,
        };
        let opt = |k: &str| g.get(k).and_then(crate::gguf::value_u64).map(|v| v as u32);
        let mut t = Self::new(kind, tokens, types, scores, &merges);
        t.bos = opt("tokenizer.ggml.bos_token_id");
        t.eos = opt("tokenizer.ggml.eos_token_id");
        t.unk = opt("tokenizer.ggml.unknown_token_id");
        t.add_bos = g.bool_or("tokenizer.ggml.add_bos_token", kind == Kind::Spm);
        t.add_space_prefix = g.bool_or("tokenizer.ggml.add_space_prefix", kind == Kind::Spm);
        t.pre = pre;
        Ok(t)
    }

    pub fn new(kind: Kind, tokens: Vec<String>, types: Vec<i32>, scores: Vec<f32>, merges: &[String]) -> Self {
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            if let Some((a, b)) = m.split_once(' ') {
                merge_map.entry((a.to_string(), b.to_string())).or_insert(rank);
            }
        }
        let mut specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| types[i as usize] == TYPE_USER_DEFINED && !tokens[i as usize].is_empty())
            .collect();
        specials.sort_by(|&a, &b| tokens[b as usize].len().cmp(&tokens[a as usize].len()).then(a.cmp(&b)));
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = match kind {
                Kind::Spm => ids.get(&format!("<0x{b:02X}>")).copied(),
                Kind::Bpe => ids.get(&byte_to_unicode()[b].to_string()).copied(),
            };
        }
        Self {
            kind,
            tokens,
            types,
            scores,
            ids,
            merges: merge_map,
            specials,
            byte_tokens,
            bos: None,
            eos: None,
            unk: None,
            add_bos: false,
            add_space_prefix: false,
            pre: PreTok::Llama3,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    /// Tokenizes plain text (control tokens in it are not parsed), with BOS
    /// first when `add_special` and the vocabulary asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        let mut is_prev_special = true;
        for frag in self.partition(text) {
            match frag {
                Frag::Token(id) => {
                    out.push(id);
                    is_prev_special = true;
                }
                Frag::Raw(s) => {
                    match self.kind {
                        Kind::Spm => {
                            let mut t = String::with_capacity(s.len() + 3);
                            if self.add_space_prefix && is_prev_special {
                                t.push(' ');
                            }
                            t.push_str(s);
                            let t = t.replace(' ', SPACE_MARK);
                            self.spm(&t, &mut out);
                        }
                        Kind::Bpe => {
                            for word in pre_tokenize(s, self.pre) {
                                self.bpe_word(word, &mut out);
                            }
                        }
                    }
                    is_prev_special = false;
                }
            }
        }
        out
    }

    /// Bytes a token stands for in text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let i = id as usize;
        let t = &self.tokens[i];
        match self.types[i] {
            TYPE_CONTROL | TYPE_UNKNOWN | TYPE_UNUSED => Vec::new(),
            TYPE_BYTE if self.kind == Kind::Spm => {
                u8::from_str_radix(t.trim_start_matches("<0x").trim_end_matches('>'), 16)
                    .map_or_else(|_| Vec::new(), |b| vec![b])
            }
            TYPE_USER_DEFINED => t.as_bytes().to_vec(),
            _ => match self.kind {
                Kind::Spm => t.replace(SPACE_MARK, " ").into_bytes(),
                Kind::Bpe => {
                    let map = unicode_to_byte();
                    t.chars().filter_map(|c| map.get(&c).copied()).collect()
                }
            },
        }
    }

    /// Text of a token stream (control tokens dropped). For SPM with a space
    /// prefix, the space `encode` puts before the text and after every
    /// user-defined token is taken out again, so `decode(encode(s)) == s`.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        let strip = self.kind == Kind::Spm && self.add_space_prefix;
        let mut after_special = true;
        for &id in ids {
            let ty = self.types[id as usize];
            if matches!(ty, TYPE_CONTROL | TYPE_UNKNOWN | TYPE_UNUSED) {
                continue;
            }
            let mut b = self.token_bytes(id);
            if ty == TYPE_USER_DEFINED {
                after_special = true;
            } else {
                if strip && after_special && b.first() == Some(&b' ') {
                    b.remove(0);
                }
                after_special = false;
            }
            bytes.extend_from_slice(&b);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn partition<'a>(&self, text: &'a str) -> Vec<Frag<'a>> {
        let mut frags = vec![Frag::Raw(text)];
        for &id in &self.specials {
            let pat = self.tokens[id as usize].as_str();
            if !text.contains(pat) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Frag::Raw(mut s) => {
                        while let Some(i) = s.find(pat) {
                            if i > 0 {
                                next.push(Frag::Raw(&s[..i]));
                            }
                            next.push(Frag::Token(id));
                            s = &s[i + pat.len()..];
                        }
                        if !s.is_empty() {
                            next.push(Frag::Raw(s));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    /// SentencePiece BPE as llama.cpp's `llm_tokenizer_spm` does it: start
    /// from UTF-8 characters, repeatedly merge the adjacent pair whose
    /// concatenation is the highest-scoring piece (leftmost on ties), then
    /// emit pieces, falling back to byte tokens for unknown ones.
    fn spm(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        // Symbols as byte ranges [start, end) in a linked list.
        let mut start: Vec<usize> = Vec::new();
        let mut end: Vec<usize> = Vec::new();
        for (i, ch) in text.char_indices() {
            start.push(i);
            end.push(i + ch.len_utf8());
        }
        let n = start.len();
        let mut prev: Vec<isize> = (0..n as isize).map(|i| i - 1).collect();
        let mut next: Vec<isize> = (0..n as isize).map(|i| if i + 1 < n as isize { i + 1 } else { -1 }).collect();
        let mut alive = vec![true; n];
        // rev_merge: text range -> the two ranges it was merged from
        let mut rev: RevMerges = HashMap::new();
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, l: usize, r: usize, start: &[usize], end: &[usize]| {
            let s = &text[start[l]..end[r]];
            if let Some(&id) = self.ids.get(s) {
                heap.push(Bigram { score: self.scores[id as usize], left: l, right: r, size: s.len() });
            }
        };
        for i in 1..n {
            try_add(&mut heap, i - 1, i, &start, &end);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (bg.left, bg.right);
            if !alive[l] || !alive[r] || next[l] != r as isize || end[r] - start[l] != bg.size {
                continue;
            }
            rev.insert((start[l], end[r]), ((start[l], end[l]), (start[r], end[r])));
            end[l] = end[r];
            alive[r] = false;
            next[l] = next[r];
            if next[r] >= 0 {
                prev[next[r] as usize] = l as isize;
            }
            if prev[l] >= 0 {
                try_add(&mut heap, prev[l] as usize, l, &start, &end);
            }
            if next[l] >= 0 {
                try_add(&mut heap, l, next[l] as usize, &start, &end);
            }
        }
        let mut i: isize = 0;
        while i >= 0 {
            let s = i as usize;
            self.resegment(text, (start[s], end[s]), &rev, out);
            i = next[s];
        }
    }

    fn resegment(&self, text: &str, range: (usize, usize), rev: &RevMerges, out: &mut Vec<u32>) {
        let s = &text[range.0..range.1];
        if let Some(&id) = self.ids.get(s) {
            out.push(id);
            return;
        }
        if let Some(&(a, b)) = rev.get(&range) {
            self.resegment(text, a, rev, out);
            self.resegment(text, b, rev, out);
            return;
        }
        for &byte in s.as_bytes() {
            if let Some(id) = self.byte_tokens[byte as usize] {
                out.push(id);
            } else if let Some(u) = self.unk {
                out.push(u);
            }
        }
    }

    /// Byte-level BPE of one pre-tokenized word by merge rank.
    fn bpe_word(&self, word: &str, out: &mut Vec<u32>) {
        let map = byte_to_unicode();
        let mapped: String = word.bytes().map(|b| map[b as usize]).collect();
        if let Some(&id) = self.ids.get(&mapped) {
            out.push(id);
            return;
        }
        let mut syms: Vec<String> = mapped.chars().map(|c| c.to_string()).collect();
        loop {
            let mut best: Option<(usize, usize)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&rank) = self.merges.get(&(syms[i].clone(), syms[i + 1].clone())) {
                    if best.is_none_or(|(r, _)| rank < r) {
                        best = Some((rank, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", syms[i], syms[i + 1]);
            syms[i] = merged;
            syms.remove(i + 1);
        }
        for s in syms {
            if let Some(&id) = self.ids.get(&s) {
                out.push(id);
            } else {
                let inv = unicode_to_byte();
                for c in s.chars() {
                    if let Some(id) = inv.get(&c).and_then(|&b| self.byte_tokens[b as usize]) {
                        out.push(id);
                    } else if let Some(u) = self.unk {
                        out.push(u);
                    }
                }
            }
        }
    }
}

/// Merged byte range -> the two ranges it was made from.
type RevMerges = HashMap<(usize, usize), ((usize, usize), (usize, usize))>;

enum Frag<'a> {
    Raw(&'a str),
    Token(u32),
}

#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    // Max-heap: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.partial_cmp(&o.score).unwrap_or(Ordering::Equal).then(o.left.cmp(&self.left))
    }
}

/// GPT-2's reversible byte -> printable char table.
pub fn byte_to_unicode() -> &'static [char; 256] {
    use std::sync::OnceLock;
    static T: OnceLock<[char; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = ['\0'; 256];
        let mut n = 0u32;
        for b in 0..256u32 {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            t[b as usize] = if printable {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
        }
        t
    })
}

pub fn unicode_to_byte() -> &'static HashMap<char, u8> {
    use std::sync::OnceLock;
    static T: OnceLock<HashMap<char, u8>> = OnceLock::new();
    T.get_or_init(|| byte_to_unicode().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect())
}

fn is_l(c: char) -> bool {
    c.is_alphabetic()
}
fn is_n(c: char) -> bool {
    c.is_numeric()
}
fn is_ws(c: char) -> bool {
    c.is_whitespace()
}

/// Splits text the way the pre-tokenizer regexes do (hand-written, since the
/// patterns use look-ahead):
/// - Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
/// - GPT-2:   `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
///
/// `\p{L}` / `\p{N}` are approximated by Rust's `is_alphabetic` / `is_numeric`.
pub fn pre_tokenize(text: &str, pre: PreTok) -> Vec<&str> {
    let cs: Vec<(usize, char)> = text.char_indices().collect();
    let n = cs.len();
    let at = |i: usize| cs[i].1;
    let off = |i: usize| if i < n { cs[i].0 } else { text.len() };
    let mut out = Vec::new();
    let mut i = 0;
    let llama3 = pre == PreTok::Llama3;
    while i < n {
        let c = at(i);
        // contractions
        if c == '\'' && i + 1 < n {
            let lower = |j: usize| {
                if j < n {
                    at(j).to_ascii_lowercase()
                } else {
                    '\0'
                }
            };
            let (a, b) = if llama3 {
                (lower(i + 1), lower(i + 2))
            } else {
                (at(i + 1), if i + 2 < n { at(i + 2) } else { '\0' })
            };
            let len = match (a, b) {
                ('r', 'e') | ('v', 'e') | ('l', 'l') => 3,
                ('s', _) | ('t', _) | ('m', _) | ('d', _) => 2,
                _ => 0,
            };
            if len > 0 {
                out.push(&text[off(i)..off(i + len)]);
                i += len;
                continue;
            }
        }
        if llama3 {
            // [^\r\n\p{L}\p{N}]?\p{L}+
            {
                let mut j = i;
                if !(c == '\r' || c == '\n' || is_l(c) || is_n(c)) && j + 1 < n && is_l(at(j + 1)) {
                    j += 1;
                }
                if is_l(at(j)) {
                    let mut k = j;
                    while k < n && is_l(at(k)) {
                        k += 1;
                    }
                    out.push(&text[off(i)..off(k)]);
                    i = k;
                    continue;
                }
            }
            // \p{N}{1,3}
            if is_n(c) {
                let mut k = i;
                while k < n && k - i < 3 && is_n(at(k)) {
                    k += 1;
                }
                out.push(&text[off(i)..off(k)]);
                i = k;
                continue;
            }
            // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
            {
                let mut j = i;
                if c == ' ' && j + 1 < n {
                    j += 1;
                }
                let other = |x: char| !(is_ws(x) || is_l(x) || is_n(x));
                if other(at(j)) {
                    let mut k = j;
                    while k < n && other(at(k)) {
                        k += 1;
                    }
                    while k < n && (at(k) == '\r' || at(k) == '\n') {
                        k += 1;
                    }
                    out.push(&text[off(i)..off(k)]);
                    i = k;
                    continue;
                }
            }
            // \s*[\r\n]+
            {
                let mut k = i;
                let mut last_nl = None;
                while k < n && is_ws(at(k)) {
                    if at(k) == '\r' || at(k) == '\n' {
                        last_nl = Some(k);
                    }
                    k += 1;
                }
                if let Some(e) = last_nl {
                    // greedy \s* then [\r\n]+ ending at the last newline run
                    let mut k2 = e + 1;
                    while k2 < n && (at(k2) == '\r' || at(k2) == '\n') {
                        k2 += 1;
                    }
                    out.push(&text[off(i)..off(k2)]);
                    i = k2;
                    continue;
                }
            }
        } else {
            // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+'
            let j = if c == ' ' && i + 1 < n { i + 1 } else { i };
            let d = at(j);
            let class: Option<fn(char) -> bool> = if is_l(d) {
                Some(is_l)
            } else if is_n(d) {
                Some(is_n)
            } else if !is_ws(d) {
                Some(|x: char| !(is_ws(x) || is_l(x) || is_n(x)))
            } else {
                None
            };
            if let Some(f) = class {
                let mut k = j;
                while k < n && f(at(k)) {
                    k += 1;
                }
                out.push(&text[off(i)..off(k)]);
                i = k;
                continue;
            }
        }
        // \s+(?!\S) | \s+
        if is_ws(c) {
            let mut k = i;
            while k < n && is_ws(at(k)) {
                k += 1;
            }
            if k < n && k - i > 1 {
                // leave the last space for the following word
                k -= 1;
            }
            out.push(&text[off(i)..off(k)]);
            i = k;
            continue;
        }
        // anything else: a single char
        out.push(&text[off(i)..off(i + 1)]);
        i += 1;
    }
    out
}
