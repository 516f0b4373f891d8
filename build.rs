//! Generates the C header `include/kivi.h` from the FFI sources with cbindgen.
//!
//! The header is written to OUT_DIR always, and to `include/kivi.h` when it changed, except when
//! `CI` is set: there the committed header must already match, and `tests/header.rs` fails if it
//! does not.

use std::path::{Path, PathBuf};

#[path = "build/header.rs"]
mod header;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=build/header.rs");
    println!("cargo:rerun-if-changed=include/kivi.h");
    println!("cargo:rerun-if-env-changed=CI");
    let text = match header::generate(&dir, env!("CARGO_PKG_VERSION")) {
        Ok(t) => t,
        Err(e) => panic!("cbindgen could not generate include/kivi.h: {e}"),
    };
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kivi.h");
    std::fs::write(&out, &text).unwrap();
    let committed = dir.join("include/kivi.h");
    if std::env::var_os("CI").is_none() && std::fs::read_to_string(&committed).ok().as_deref() != Some(&text) {
        write_header(&committed, &text);
    }
}

/// A read-only source tree (the crate as a dependency) keeps its header: only warn.
fn write_header(path: &Path, text: &str) {
    if let Err(e) = std::fs::create_dir_all(path.parent().unwrap()).and_then(|_| std::fs::write(path, text)) {
        println!("cargo:warning=could not update {}: {e}", path.display());
    }
}
