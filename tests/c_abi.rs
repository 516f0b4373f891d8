//! The C ABI as C, C++ and Python see it: compiles the C examples (quickstart, engine harness) and
//! the bad-input tests in `tests/c/` against `include/kivi.h` and the library cargo just built,
//! with `-std=c99 -Wall -Wextra -Werror -pedantic`, and runs them: once linked to `libkivi.so`,
//! once to `libkivi.a` under AddressSanitizer and UndefinedBehaviorSanitizer (leak checking on:
//! every cache the programs create must be freed). The header is compiled as C++11 too, and the
//! Python ctypes example runs against the shared library.
//!
//! Needs a C and a C++ compiler (`CC`, `CXX`; default `cc`, `c++`) with the sanitizer runtimes,
//! and python3 with numpy for the Python test. A missing tool skips its test with a note, except
//! when `CI` is set, where it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const WARN: &[&str] = &["-Wall", "-Wextra", "-Werror", "-pedantic"];
/// What a Rust staticlib needs from the system (`rustc --print native-static-libs`).
const STATIC_LIBS: &[&str] = &["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"];
const SANITIZE: &[&str] = &["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory of `libkivi.so` and `libkivi.a` for this test build (`target/<profile>`).
/// `cargo test` builds the library only as an rlib, so the first call runs `cargo build --lib` with
/// the same profile and target directory (quick when they are up to date).
fn lib_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--lib", "--manifest-path"]).arg(root().join("Cargo.toml"));
        cmd.arg("--target-dir").arg(dir.parent().unwrap());
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        run_ok(&mut cmd, "cargo build --lib");
        for lib in ["libkivi.so", "libkivi.a"] {
            assert!(dir.join(lib).exists(), "{} not found after cargo build", dir.join(lib).display());
        }
        dir
    })
    .clone()
}

fn out_dir() -> PathBuf {
    let d = lib_dir().join("c-abi-tests");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Whether `tool` runs; when it does not, skips (returns false) or, under CI, fails.
fn have(tool: &str, args: &[&str]) -> bool {
    let ok = Command::new(tool).args(args).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "{tool} is needed by this test and CI must have it");
        eprintln!("note: {tool} not found, test skipped");
    }
    ok
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

fn show(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(out.status.success(), "{}", show(what, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[derive(Clone, Copy, PartialEq)]
enum Link {
    /// `-lkivi` from the cargo output directory, found at run time through an rpath.
    Shared,
    /// `libkivi.a` and the system libraries it needs, with ASan and UBSan.
    StaticSanitized,
}

/// Compiles one C source into an executable linked to kivi; returns its path.
fn build_c(src: &str, link: Link) -> PathBuf {
    let lib = lib_dir();
    let name = Path::new(src).file_stem().unwrap().to_str().unwrap().to_string();
    let exe = out_dir().join(format!("{name}{}", if link == Link::Shared { "" } else { "-asan" }));
    let mut cmd = Command::new(cc());
    cmd.arg("-std=c99").args(WARN).args(["-O1", "-g", "-I"]).arg(root().join("include")).arg(root().join(src));
    match link {
        Link::Shared => {
            cmd.arg("-L").arg(&lib).arg(format!("-Wl,-rpath,{}", lib.display())).args(["-lkivi", "-lm", "-lpthread"]);
        }
        Link::StaticSanitized => {
            cmd.args(SANITIZE).arg(lib.join("libkivi.a")).args(STATIC_LIBS);
        }
    }
    cmd.arg("-o").arg(&exe);
    run_ok(&mut cmd, &format!("compiling {src}"));
    exe
}

fn run_exe(exe: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        // Leak checking stays on: the programs free every cache, and the Rust runtime's own
        // allocations (thread-locals, the error message) are freed at exit, so any leak is real.
        // A refused allocation returns NULL, as without ASan, so a cache too large for the
        // machine is an error there too.
        .env("ASAN_OPTIONS", "detect_leaks=1:halt_on_error=1:abort_on_error=0:allocator_may_return_null=1")
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1");
    run_ok(&mut cmd, &format!("running {}", exe.display()))
}

/// The three C programs, built and run with one kind of linking.
fn c_programs(link: Link) {
    let out = run_exe(&build_c("examples/c/quickstart.c", link), &[]);
    assert!(out.contains("smaller") && out.contains("expected error"), "quickstart output:\n{out}");
    let out = run_exe(&build_c("tests/c/errors.c", link), &[]);
    assert!(out.contains(" passed, 0 failed"), "errors.c output:\n{out}");
    let out = run_exe(&build_c("examples/c/harness.c", link), &["--quick", "--baseline"]);
    assert!(
        out.contains("all checks passed") && out.contains("bit for bit") && out.contains("less error"),
        "harness output:\n{out}"
    );
}

#[test]
fn c_programs_with_the_shared_library() {
    if have(&cc(), &["--version"]) {
        c_programs(Link::Shared);
    }
}

#[test]
fn c_programs_with_the_static_library_under_asan_and_ubsan() {
    if have(&cc(), &["--version"]) {
        c_programs(Link::StaticSanitized);
    }
}

#[test]
fn header_compiles_as_cpp() {
    if !have(&cxx(), &["--version"]) {
        return;
    }
    let lib = lib_dir();
    let exe = out_dir().join("header_check");
    let mut cmd = Command::new(cxx());
    cmd.arg("-std=c++11")
        .args(WARN)
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("tests/c/header_check.cpp"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lkivi")
        .arg("-o")
        .arg(&exe);
    run_ok(&mut cmd, "compiling tests/c/header_check.cpp");
    let out = run_exe(&exe, &[]);
    assert!(out.contains(": ok"), "{out}");
}

#[test]
fn python_ctypes_example() {
    if !have("python3", &["-c", "import numpy"]) {
        return;
    }
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("examples/python/example.py")).env("KIVI_LIB", lib_dir().join("libkivi.so"));
    let out = run_ok(&mut cmd, "examples/python/example.py");
    assert!(out.contains("numpy check passed"), "{out}");
}

#[test]
fn install_to_a_prefix_and_build_with_pkg_config() {
    if !have("pkg-config", &["--version"]) || !have(&cc(), &["--version"]) {
        return;
    }
    let prefix = out_dir().join("prefix");
    let _ = std::fs::remove_dir_all(&prefix);
    let mut install = Command::new("bash");
    install.arg(root().join("scripts/install.sh")).arg(&prefix).env("KIVI_BUILD_DIR", lib_dir());
    run_ok(&mut install, "scripts/install.sh");
    let pc_path = prefix.join("lib/pkgconfig");
    let flags = run_ok(
        Command::new("pkg-config").args(["--cflags", "--libs", "kivi"]).env("PKG_CONFIG_PATH", &pc_path),
        "pkg-config",
    );
    assert!(flags.contains(&format!("-I{}", prefix.join("include").display())), "{flags}");
    let version = run_ok(
        Command::new("pkg-config").args(["--modversion", "kivi"]).env("PKG_CONFIG_PATH", &pc_path),
        "pkg-config",
    );
    assert_eq!(version.trim(), env!("CARGO_PKG_VERSION"));
    let exe = out_dir().join("quickstart-installed");
    let mut cmd = Command::new(cc());
    cmd.arg("-std=c99").args(WARN).arg(root().join("examples/c/quickstart.c"));
    cmd.args(flags.split_whitespace()).arg("-lm").arg("-o").arg(&exe);
    run_ok(&mut cmd, "compiling quickstart.c with pkg-config's flags");
    let out = run_ok(Command::new(&exe).env("LD_LIBRARY_PATH", prefix.join("lib")), "installed quickstart");
    assert!(out.contains("smaller"), "{out}");
}
