//! The CUDA kernels' own source run on the host: with [`CudaCache::simulated`] every launch runs
//! the `.cu` code of `cuda/`, compiled as C++ by the host compiler (`c++`, or `$CXX`) with the
//! simulator of `cuda/host/` (CUDA threads as fibers, shared memory per block, warp collectives
//! and `mma.sync` as the PTX ISA defines them). Together with the Rust emulation (`emu.rs`) this
//! tests the kernels' code itself, not only its algorithm, on machines without a GPU.
//!
//! One module is compiled for each (family, layout, query vectors per block), once per process
//! and kept in a folder under the system's temporary folder, named by a hash of the source and
//! the compiler's arguments, for later processes.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use super::Kernel;
use crate::cuda::kernels::{Family, Spec};
use crate::cuda::DeviceInfo;

const SIM_H: &str = include_str!("../../cuda/host/sim.h");
const PTX_H: &str = include_str!("../../cuda/host/ptx.h");

/// What a simulated (or emulated) cache reports as its device.
pub(super) fn info() -> DeviceInfo {
    DeviceInfo {
        ordinal: 0,
        count: 1,
        name: "host simulator".into(),
        capability: (9, 0),
        multiprocessors: 4,
        total_memory: 0,
        driver_version: 0,
        nvrtc_version: (0, 0),
    }
}

type LaunchFn = unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, *const c_void, *mut c_char, usize) -> i32;

struct Module {
    _lib: libloading::Library,
    launch: LaunchFn,
    /// The prefetches into L2 that a later copy used, on this thread since the last call.
    prefetches: unsafe extern "C" fn() -> u64,
}

thread_local! {
    /// Launches of each kernel so far on this thread (launches run on the calling thread, so a
    /// test counts its own: tests check that they reach the paths they mean to), and the
    /// prefetches into L2 that a later copy used ("prefetches").
    static LAUNCHES: std::cell::RefCell<Vec<(&'static str, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// The modules this thread's launches used, in order of first use (macros added by
    /// [`with_defines`] left out of the list).
    #[cfg(test)]
    static MODULES: std::cell::RefCell<Vec<(Family, Spec)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The modules this thread's launches used since the last call.
#[cfg(test)]
pub(crate) fn take_modules() -> Vec<(Family, Spec)> {
    MODULES.take()
}

#[cfg(test)]
pub(crate) fn launches_of(name: &str) -> usize {
    LAUNCHES.with_borrow(|l| l.iter().find(|(n, _)| *n == name).map_or(0, |&(_, c)| c))
}

/// The kernels of a family, with their parameter structs.
fn kernels(family: Family) -> &'static [(&'static str, &'static str)] {
    match family {
        Family::Quantize => &[
            ("kv_set_blocks", "SetBlocksParams"),
            ("kv_quantize", "QuantParams"),
            ("kv_window_write", "WriteParams"),
            ("kv_unquantize", "UnquantParams"),
        ],
        Family::Decode => &[("kv_decode_attn", "AttnParams"), ("kv_decode_combine", "AttnParams")],
        Family::Prefill => &[("kv_prefill_attn", "AttnParams"), ("kv_prefill_combine", "AttnParams")],
    }
}

/// The translation unit of one family: the simulator, the kernels, and a launcher by name.
fn unit(family: Family) -> String {
    let mut s = String::from(SIM_H);
    s.push_str("\n#line 1 \"kernels\"\n");
    s.push_str(&family.source_with_ptx(PTX_H));
    s.push_str("\n// The launcher: kernel bodies by name.\nnamespace {\nstruct Entry {\n    const char* name;\n");
    s.push_str("    void (*body)(const void*);\n};\nconst Entry entries[] = {\n");
    for (name, params) in kernels(family) {
        s.push_str(&format!("    {{\"{name}\", [](const void* p) {{ {name}(*(const {params}*)p); }}}},\n"));
    }
    if family == Family::Decode {
        s.push_str("#if KV_MMA_OK\n    {\"kv_decode_mma\", [](const void* p) { kv_decode_mma(*(const AttnParams*)p); }},\n#endif\n");
        s.push_str(
            "#if KV_FP_MMA_OK\n    {\"kv_prefill_fp\", [](const void* p) { kv_prefill_fp(*(const AttnParams*)p); }},\n",
        );
        s.push_str("    {\"kv_prefill_q\", [](const void* p) { kv_prefill_q(*(const AttnParams*)p); }},\n#endif\n");
    }
    s.push_str(
        "};\n}  // namespace\n\
         extern \"C\" __attribute__((visibility(\"default\"))) int kvsim_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned threads,\n\
         \x20                          const void* params, char* err, size_t err_len) {\n\
         \x20   for (const Entry& e : entries)\n\
         \x20       if (strcmp(e.name, name) == 0) return kvsim::launch(e.body, params, {gx, gy, gz}, threads, err, err_len);\n\
         \x20   snprintf(err, err_len, \"no kernel %s in this module\", name);\n\
         \x20   return -1;\n}\n\
         extern \"C\" __attribute__((visibility(\"default\"))) unsigned long long kvsim_prefetches() {\n\
         \x20   const unsigned long long n = kvsim::prefetches_used;\n\
         \x20   kvsim::prefetches_used = 0;\n\
         \x20   return n;\n}\n",
    );
    s
}

fn compile(family: Family, spec: &Spec, ucontext: bool) -> Module {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    // Hidden visibility keeps each module's statics its own: `__shared__` objects are static
    // locals of inline functions, which GCC otherwise binds process-wide (STB_GNU_UNIQUE, even
    // with RTLD_LOCAL), so every module would share the object sized by the first one loaded.
    let mut args: Vec<String> = [
        "-std=c++17",
        "-O2",
        "-ffp-contract=off",
        "-fno-strict-aliasing",
        "-fvisibility=hidden",
        "-shared",
        "-fPIC",
        "-w",
        "-x",
        "c++",
    ]
    .map(String::from)
    .into();
    for (n, v) in spec.defines() {
        args.push(format!("-D{n}={v}u"));
    }
    args.extend(spec.extra_defines().map(String::from));
    if ucontext {
        args.push("-DKVSIM_UCONTEXT=1".to_string());
    }
    let src = unit(family);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&src, &cxx, &args).hash(&mut h);
    let dir = std::env::temp_dir().join("kivi-cuda-sim");
    std::fs::create_dir_all(&dir).expect("a folder for the simulator's modules");
    let stem = format!("{}-{:016x}", family.file().trim_end_matches(".cu"), h.finish());
    let lib = dir.join(format!("{stem}.so"));
    if !lib.exists() {
        let tag = format!("{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], "");
        let cpp = dir.join(format!("{stem}.{tag}.cpp"));
        let tmp: PathBuf = dir.join(format!("{stem}.{tag}.so"));
        std::fs::write(&cpp, &src).expect("writing the simulator's source");
        let out = Command::new(&cxx)
            .args(&args)
            .arg(&cpp)
            .arg("-o")
            .arg(&tmp)
            .output()
            .unwrap_or_else(|e| panic!("the host simulator needs a C++ compiler ({cxx}): {e}"));
        assert!(
            out.status.success(),
            "{cxx} could not compile {} for the simulator ({args:?}):\n{}",
            family.file(),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &lib).expect("keeping the simulator's module");
        let _ = std::fs::remove_file(&cpp);
    }
    // SAFETY: a library this function built; its initialisers only set up statics.
    unsafe {
        let l = libloading::Library::new(&lib).unwrap_or_else(|e| panic!("loading {}: {e}", lib.display()));
        let launch: LaunchFn = *l.get::<LaunchFn>(b"kvsim_launch\0").expect("kvsim_launch");
        let prefetches = *l.get::<unsafe extern "C" fn() -> u64>(b"kvsim_prefetches\0").expect("kvsim_prefetches");
        Module { _lib: l, launch, prefetches }
    }
}

type Cell = Arc<OnceLock<Arc<Module>>>;
/// A module: its family, its specialisation, and whether its fibers switch with ucontext.
type Key = (Family, Spec, bool);

fn module(family: Family, spec: &Spec, ucontext: bool) -> Arc<Module> {
    static MODULES: OnceLock<Mutex<HashMap<Key, Cell>>> = OnceLock::new();
    let key = (family, spec.clone(), ucontext);
    let cell = MODULES.get_or_init(Default::default).lock().unwrap().entry(key).or_default().clone();
    cell.get_or_init(|| Arc::new(compile(family, spec, ucontext))).clone()
}

thread_local! {
    static UCONTEXT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Macros added to this thread's attention modules ([`with_defines`]).
    static DEFINES: std::cell::RefCell<Vec<(&'static str, u64)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with `defines` added to the attention modules this thread's launches use: the
/// variants of the tensor-core decode that `scripts/gpu-sweep.sh` times (`KV_MMA_STAGES`,
/// `KV_MMA_BLOCKS`), which a GPU gets through `KIVI_NVRTC_OPTS`.
#[cfg(test)]
pub(crate) fn with_defines<R>(defines: &[(&'static str, u64)], f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            DEFINES.with_borrow_mut(Vec::clear);
        }
    }
    DEFINES.set(defines.to_vec());
    let _reset = Reset;
    f()
}

/// Runs `f` with this thread's launches on modules whose fibers switch with ucontext, the
/// portable path the simulator takes on targets other than x86-64 (there it uses a few
/// instructions of its own), so that tests on x86-64 run that path too.
#[cfg(test)]
pub(crate) fn with_ucontext<R>(f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            UCONTEXT.set(false);
        }
    }
    UCONTEXT.set(true);
    let _reset = Reset;
    f()
}

/// Runs one launch with the kernels' own code; panics with the simulator's message if the
/// block's threads cannot all progress (a barrier or collective not reached by all).
pub(super) unsafe fn run(quant: &Spec, attn: impl Fn(usize) -> Spec, k: Kernel<'_>, grid: (u32, u32, u32), block: u32) {
    let p = |r: *const u8| r as *const c_void;
    let attn = |nq: usize| DEFINES.with_borrow(|d| d.iter().fold(attn(nq), |s, &(n, v)| s.with(n, v)));
    let q = Family::Quantize.entries();
    let (family, spec, name, params) = match k {
        Kernel::SetBlocks(x) => (Family::Quantize, quant.clone(), q[0], p(x as *const _ as _)),
        Kernel::Quantize(x) => (Family::Quantize, quant.clone(), q[1], p(x as *const _ as _)),
        Kernel::Write(x) => (Family::Quantize, quant.clone(), q[2], p(x as *const _ as _)),
        Kernel::Unquant(x) => (Family::Quantize, quant.clone(), q[3], p(x as *const _ as _)),
        Kernel::Attn(f, nq, x) => (f, attn(nq), f.entries()[0], p(x as *const _ as _)),
        Kernel::Combine(f, nq, x) => (f, attn(nq), f.entries()[1], p(x as *const _ as _)),
        Kernel::Mma(nq, x) => (Family::Decode, attn(nq), "kv_decode_mma", p(x as *const _ as _)),
        Kernel::PrefillFp(nq, x) => (Family::Decode, attn(nq), "kv_prefill_fp", p(x as *const _ as _)),
        Kernel::PrefillQ(nq, x) => (Family::Decode, attn(nq), "kv_prefill_q", p(x as *const _ as _)),
    };
    #[cfg(test)]
    if DEFINES.with_borrow(|d| d.is_empty()) {
        MODULES.with_borrow_mut(|m| {
            if !m.iter().any(|(f, s)| *f == family && *s == spec) {
                m.push((family, spec.clone()));
            }
        });
    }
    let ucontext = UCONTEXT.get();
    let m = module(family, &spec, ucontext);
    let cname = CString::new(name).unwrap();
    let mut err = vec![0 as c_char; 512];
    let rc = (m.launch)(cname.as_ptr(), grid.0, grid.1, grid.2, block, params, err.as_mut_ptr(), err.len());
    let msg = CStr::from_ptr(err.as_ptr()).to_string_lossy();
    assert!(rc == 0, "{name} (grid {grid:?}, {block} threads): {msg}");
    // Each kernel by name, the launches on ucontext modules as "ucontext" too, and the
    // prefetches into L2 that a later copy used as "prefetches".
    let prefetches = (m.prefetches)() as usize;
    let counts =
        [(Some(name), 1), (ucontext.then_some("ucontext"), 1), ((prefetches > 0).then_some("prefetches"), prefetches)];
    for (counted, n) in counts.into_iter().filter_map(|(c, n)| c.map(|c| (c, n))) {
        LAUNCHES.with_borrow_mut(|l| match l.iter_mut().find(|(c, _)| *c == counted) {
            Some(e) => e.1 += n,
            None => l.push((counted, n)),
        });
    }
}
