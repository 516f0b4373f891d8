//! The committed C header is exactly what cbindgen generates from the code.
//!
//! `cargo build` rewrites `include/kivi.h` when it changed (except with `CI` set), so a stale
//! header shows up in `git status`; in CI, where nothing is rewritten, this test fails instead.

#[path = "../build/header.rs"]
mod header;

use std::path::Path;

#[test]
fn committed_header_matches_generated() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let generated = header::generate(dir, env!("CARGO_PKG_VERSION")).expect("cbindgen");
    let committed = std::fs::read_to_string(dir.join("include/kivi.h")).expect("include/kivi.h");
    if generated != committed {
        let tmp = std::env::temp_dir().join(format!("kivi-generated-{}.h", std::process::id()));
        std::fs::write(&tmp, &generated).unwrap();
        let first = generated.lines().zip(committed.lines()).position(|(a, b)| a != b);
        panic!(
            "include/kivi.h differs from what the code generates (first difference at line {}); the generated \
             header is in {}: run `cargo build` and commit include/kivi.h",
            first.map_or_else(|| "the end".to_string(), |i| (i + 1).to_string()),
            tmp.display()
        );
    }
}

#[test]
fn version_macros_come_from_cargo_toml() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/kivi.h")).unwrap();
    for (name, value) in [
        ("KIVI_VERSION_MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("KIVI_VERSION_MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("KIVI_VERSION_PATCH", env!("CARGO_PKG_VERSION_PATCH")),
    ] {
        assert!(text.contains(&format!("#define {name} {value}\n")), "{name} is not {value}");
    }
    assert!(text.contains(&format!("#define KIVI_VERSION_STRING \"{}\"\n", env!("CARGO_PKG_VERSION"))));
}
