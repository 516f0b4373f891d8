//! The harness end to end on the real model at a small setting: the
//! command-line tool with a few configurations, its table, CSV, JSON lines
//! and plot. Needs `examples/eval/fetch.sh` to have run (skips otherwise,
//! fails instead when KIVI_EVAL_REQUIRE_MODEL is set).

use std::path::PathBuf;
use std::process::Command;

fn fetched() -> Option<(PathBuf, PathBuf)> {
    let cache = std::env::var_os("KIVI_EVAL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache"));
    let model = std::env::var_os("KIVI_EVAL_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("models/gemma-3-270m-q4_k_m.gguf"));
    let text = std::env::var_os("KIVI_EVAL_TEXT").map(PathBuf::from).unwrap_or_else(|| cache.join("text/hamlet.txt"));
    if model.exists() && text.exists() {
        Some((model, text))
    } else if std::env::var_os("KIVI_EVAL_REQUIRE_MODEL").is_some() {
        panic!("{} or {} is missing: run examples/eval/fetch.sh", model.display(), text.display());
    } else {
        eprintln!("skipping: model or text not fetched (examples/eval/fetch.sh)");
        None
    }
}

fn field(line: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    let rest = &line[line.find(&pat).unwrap_or_else(|| panic!("{key} in {line}")) + pat.len()..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end].trim().parse().unwrap()
}

#[test]
fn small_run_on_gemma3_270m() {
    let Some((model, text)) = fetched() else { return };
    let dir = std::env::temp_dir().join(format!("kivi-eval-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (csv, png) = (dir.join("r.csv"), dir.join("r.png"));
    let out = Command::new(env!("CARGO_BIN_EXE_kivi-eval"))
        .args(["--model", model.to_str().unwrap(), "--text", text.to_str().unwrap()])
        .args(["--ctx", "256", "--chunks", "2", "--configs", "kivi8-r0,kivi2,kivi2-r0,ktok2-r0,kivi2-r0-mm"])
        .args(["--csv", csv.to_str().unwrap(), "--plot", png.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("[decode] step"), "progress lines: {stderr}");
    println!("{stdout}");
    let json: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(json.len(), 6, "{stdout}");
    let names: Vec<&str> = json.iter().map(|l| l.split('"').nth(3).unwrap()).collect();
    assert_eq!(names, ["exact", "kivi8-r0", "kivi2", "kivi2-r0", "ktok2-r0", "kivi2-r0-mm"]);
    let get = |i: usize, k: &str| field(json[i], k);
    // Exact: a sane perplexity for a small model on Shakespeare, 16-bit storage.
    assert!(get(0, "ppl") > 5.0 && get(0, "ppl") < 80.0, "{}", json[0]);
    assert_eq!(get(0, "kld"), 0.0);
    assert_eq!(get(0, "top1"), 1.0);
    assert_eq!(get(0, "bits_per_element"), 16.0);
    // With ctx 256 the second half starts at 128, inside R=128 plus a group:
    // kivi2 quantizes little, so it stays closer than kivi2 with R=0.
    assert!(get(1, "kld") < 0.01, "8-bit: {}", json[1]);
    assert!(get(1, "top1") > 0.95, "8-bit: {}", json[1]);
    assert!(get(3, "kld") > get(1, "kld"), "2-bit R=0 must be worse than 8-bit");
    assert!(get(2, "kld") < get(3, "kld"), "the full-precision window must help");
    // Per-token 2-bit keys are the paper's failure case: worse than per-channel.
    assert!(get(4, "kld") > get(3, "kld"), "{}\n{}", json[3], json[4]);
    // Least-squares values (the default) are closer than the paper's min/max rounding, at the
    // same size.
    assert!(get(3, "kld") < get(5, "kld"), "{}\n{}", json[3], json[5]);
    assert_eq!(get(3, "kv_bytes"), get(5, "kv_bytes"));
    for i in 1..6 {
        assert!(get(i, "bits_per_element") < 16.0 && get(i, "kv_bytes") > 0.0);
    }
    let csv_text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv_text.lines().count(), 7);
    assert!(csv_text.starts_with("config,bits_per_element"));
    let png_bytes = std::fs::read(&png).unwrap();
    assert_eq!(&png_bytes[1..4], b"PNG");
    std::fs::remove_dir_all(&dir).ok();
}
