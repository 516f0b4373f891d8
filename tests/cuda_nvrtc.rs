//! Compiles every CUDA kernel with NVRTC for sm_80 and sm_90 (no GPU or driver needed).
//!
//! NVRTC is looked for through `KIVI_NVRTC_LIB` (the library or its folder), then the
//! `nvidia-cuda-nvrtc` Python package (`python3 -c 'import nvidia'`), then the usual library
//! search. Where none is found the test fails when `CI` is set and is skipped with a message
//! otherwise.

use std::path::PathBuf;
use std::process::Command;

/// The lib folder of the nvidia-cuda-nvrtc Python package, if python3 finds one.
fn python_nvrtc_dir() -> Option<PathBuf> {
    let script = "import nvidia, os\n\
                  for p in nvidia.__path__:\n\
                  \x20   for sub in ('cu13/lib', 'cuda_nvrtc/lib', 'cu12/lib'):\n\
                  \x20       d = os.path.join(p, sub)\n\
                  \x20       if os.path.isdir(d) and any(f.startswith('libnvrtc.so') for f in os.listdir(d)):\n\
                  \x20           print(d); raise SystemExit\n";
    let out = Command::new("python3").arg("-c").arg(script).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then(|| PathBuf::from(s))
}

fn nvrtc_ready() -> bool {
    if std::env::var_os("KIVI_NVRTC_LIB").is_none() {
        if let Some(d) = python_nvrtc_dir() {
            std::env::set_var("KIVI_NVRTC_LIB", &d);
        }
    }
    match kivi::cuda::nvrtc_version() {
        Ok((a, b)) => {
            eprintln!("NVRTC {a}.{b}");
            true
        }
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but NVRTC is not available: {e}");
            }
            eprintln!("skipped: {e}");
            false
        }
    }
}

/// The benchmark's cache (one layer): f16, 8 KV heads of 128, keys and values of `bits` bits.
fn bench_config(bits: u8) -> kivi::CacheConfig {
    let mut cfg = kivi::CacheConfig::new(1, 8, 128);
    cfg.dtype = kivi::DType::F16;
    (cfg.key_bits, cfg.value_bits) = (bits, bits);
    cfg
}

/// A cache of Gemma's heads (one layer): f16, 1 KV head of 256 (Gemma-3-270M and 1B: 4 query
/// heads), keys and values of `bits` bits.
fn gemma_config(bits: u8) -> kivi::CacheConfig {
    let mut cfg = kivi::CacheConfig::new(1, 1, 256);
    cfg.dtype = kivi::DType::F16;
    (cfg.key_bits, cfg.value_bits) = (bits, bits);
    cfg
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_ready() {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let n = kivi::cuda::kernels::compile_all(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        eprintln!("{arch}: {n} modules compiled");
        assert!(n > 0);
    }
}

/// Every module holds the kernels the host looks up by name when it loads it.
#[test]
fn every_module_holds_the_kernels_the_host_launches() {
    if !nvrtc_ready() {
        return;
    }
    use kivi::cuda::kernels::{compile, test_configs, Family, Spec};
    let cfg = &test_configs()[0];
    for family in Family::ALL {
        let image = compile(family, &Spec::for_config(cfg, 4).unwrap(), "sm_90").unwrap();
        for name in family.entries() {
            let found = image.bytes().windows(name.len()).any(|w| w == name.as_bytes());
            assert!(found, "{} lacks {name}", family.file());
        }
    }
}

/// The tensor-core decode kernel is compiled exactly where the host will launch it.
#[test]
fn the_tensor_core_kernel_exists_where_the_host_uses_it() {
    if !nvrtc_ready() {
        return;
    }
    use kivi::cuda::kernels::{
        compile, tensor_core_chunk_tokens, tensor_core_chunks, tensor_core_decode, test_configs, Family, Spec,
    };
    let has = |name: &[u8], nq: usize, cfg: &kivi::CacheConfig| {
        let image = compile(Family::Decode, &Spec::for_config(cfg, nq).unwrap(), "sm_90").unwrap();
        image.bytes().windows(name.len()).any(|w| w == name)
    };
    let has_mma = |nq: usize, cfg: &kivi::CacheConfig| has(b"kv_decode_mma", nq, cfg);
    let (mut decode, mut chunks, mut tokens) = (0, 0, 0);
    for cfg in test_configs() {
        for ratio in [1u32, 4, 8, 12] {
            // Decode: the module for min(ratio, 8) query vectors on tensor cores (4 above
            // head_dim 128), min(ratio, max_nq) otherwise.
            let uses = tensor_core_decode(&cfg, ratio * cfg.n_kv_heads);
            let hd = cfg.head_dim as usize;
            let cap = if uses { kivi::cuda::kernels::mma_max_nq(hd) } else { kivi::cuda::kernels::max_nq(hd) };
            let nq = ratio.min(cap as u32);
            assert_eq!(has_mma(nq as usize, &cfg), uses, "decode: config {cfg:?}, {ratio} query heads per kv head");
            decode += uses as usize;
            // Chunks of queries: the decode module for 8 query vectors (4 above head_dim 128).
            if tensor_core_chunks(&cfg, ratio * cfg.n_kv_heads) {
                let nq = kivi::cuda::kernels::mma_max_nq(hd);
                assert!(has_mma(nq, &cfg), "chunks: config {cfg:?}, {ratio} query heads per kv head");
                chunks += 1;
                // Their full-precision tokens and their quantized groups: kv_prefill_fp and
                // kv_prefill_q, in the same module.
                let fp = tensor_core_chunk_tokens(&cfg, ratio * cfg.n_kv_heads);
                assert_eq!(has(b"kv_prefill_fp", nq, &cfg), fp, "chunk tokens: config {cfg:?}");
                assert_eq!(has(b"kv_prefill_q", nq, &cfg), fp, "chunk groups: config {cfg:?}");
                tokens += fp as usize;
            }
        }
    }
    assert!(decode > 0 && chunks > 0 && tokens > 0, "no test configuration reaches the tensor-core kernels");
    // head_dim 256 (Gemma) decodes on tensor cores at 2 and 4 bits, f16 and bf16, whatever the
    // GQA ratio (4 query heads per block), and so do its chunks of queries, their full-precision
    // tokens and quantized groups included (kv_prefill_fp and kv_prefill_q, 32 query vectors per
    // block, their shared memory dynamic where it passes 48 KB).
    for (bits, dtype) in [(2, kivi::DType::F16), (4, kivi::DType::BF16)] {
        let mut cfg = gemma_config(bits);
        cfg.dtype = dtype;
        for ratio in [1, 2, 4, 8, 16] {
            assert!(tensor_core_decode(&cfg, ratio), "KIVI-{bits}, {dtype:?}, {ratio} query heads");
            assert!(tensor_core_chunks(&cfg, ratio) && tensor_core_chunk_tokens(&cfg, ratio));
        }
        assert!(has(b"kv_prefill_fp", 4, &cfg) && has(b"kv_prefill_q", 4, &cfg), "KIVI-{bits}, {dtype:?}");
    }
}

/// The tensor-core kernels' measurement variants (`scripts/gpu-sweep.sh`, `gpu_check variants`)
/// still compile, without warnings, and still hold their kernel: the decode's 4 blocks per
/// multiprocessor, 3 staging buffers per warp (where they do not fit, at KIVI-4, the kernel keeps
/// 2), the transposed loop one group per iteration, every lane loading its value scales and
/// zeros in one order, the query's parts held in registers and the prefetch into L2 off and on
/// (both below, without spills), and kv_prefill_q (in the module of chunks of queries) without
/// the folded f16 keys (also at head_dim 256) or with registers for 3 blocks per multiprocessor.
#[test]
fn the_tensor_core_variants_compile() {
    if !nvrtc_ready() {
        return;
    }
    use kivi::cuda::kernels::{compile_with_log, tensor_core_decode, Family, Spec};
    for bits in [2u8, 4] {
        let cfg = bench_config(bits);
        assert!(tensor_core_decode(&cfg, 32));
        let variants = [
            ("KV_MMA_BLOCKS", 4, 4, "kv_decode_mma"),
            ("KV_MMA_STAGES", 3, 4, "kv_decode_mma"),
            ("KV_MMA_PIPE", 0, 4, "kv_decode_mma"),
            ("KV_MMA_VSWAP", 0, 4, "kv_decode_mma"),
            ("KV_PQ_FOLD", 0, 8, "kv_prefill_q"),
            ("KV_PQ_BLOCKS", 3, 8, "kv_prefill_q"),
        ];
        for (name, value, nq, kernel) in variants {
            let spec = Spec::for_config(&cfg, nq).unwrap().with(name, value);
            let (image, log) = compile_with_log(Family::Decode, &spec, "sm_90")
                .unwrap_or_else(|e| panic!("KIVI-{bits}, {name}={value}: {e}"));
            assert!(!log.contains("warning"), "KIVI-{bits}, {name}={value}: {log}");
            let found = image.bytes().windows(kernel.len()).any(|w| w == kernel.as_bytes());
            assert!(found, "KIVI-{bits}, {name}={value}: no {kernel}");
        }
    }
    // Variants of the decode loop as `scripts/gpu-check.sh` times them, without spills at the
    // benchmark's shape: the query's parts held in registers (KV_MMA_QREG), all 8 k-steps' at 2
    // blocks per multiprocessor and 4 at 3, and the prefetch into L2 off and on for every layout
    // (KV_MMA_PREFETCH); at head_dim 256, where the query's parts would spill, KV_MMA_QREG leaves
    // the kernel as it is (the same cubin as 2 blocks alone).
    type Defines = &'static [(&'static str, u64)];
    let timed: [Defines; 4] = [
        &[("KV_MMA_BLOCKS", 2), ("KV_MMA_QREG", 8)],
        &[("KV_MMA_BLOCKS", 3), ("KV_MMA_QREG", 4)],
        &[("KV_MMA_PREFETCH", 0)],
        &[("KV_MMA_PREFETCH", 2)],
    ];
    for bits in [2u8, 4] {
        let spec = Spec::for_config(&bench_config(bits), 4).unwrap();
        for defines in timed {
            let variant = defines.iter().fold(spec.clone(), |s, &(name, value)| s.with(name, value));
            let (_, log) =
                compile_with_log(Family::Decode, &variant.with_option("--ptxas-options=-v"), "sm_90").unwrap();
            let report = log.split("Function properties for kv_decode_mma").nth(1).and_then(|r| {
                r.lines()
                    .find(|l| l.contains("spill stores"))
                    .map(|l| l.contains(" 0 bytes spill stores, 0 bytes spill loads"))
            });
            let what = format!("KIVI-{bits}, {defines:?}");
            assert_eq!(report, Some(true), "{what}: spills or no report\n{log}");
        }
        let gemma = Spec::for_config(&gemma_config(bits), 4).unwrap().with("KV_MMA_BLOCKS", 2);
        let held = compile_with_log(Family::Decode, &gemma.clone().with("KV_MMA_QREG", 8), "sm_90").unwrap().0;
        let plain = compile_with_log(Family::Decode, &gemma, "sm_90").unwrap().0;
        assert!(held.bytes() == plain.bytes(), "KIVI-{bits}, head_dim 256: KV_MMA_QREG changed the kernel");
    }
    // At head_dim 256 kv_prefill_q without the folded keys takes dynamic shared memory (the
    // kernel checks the host's size when it compiles), through the spec or the extra options.
    let spec = Spec::for_config(&gemma_config(2), 4).unwrap();
    for spec in [spec.clone().with("KV_PQ_FOLD", 0), spec.with_option("-DKV_PQ_FOLD=0")] {
        let (image, log) = compile_with_log(Family::Decode, &spec, "sm_90").unwrap_or_else(|e| panic!("{spec:?}: {e}"));
        assert!(!log.contains("warning"), "{log}");
        assert!(image.bytes().windows(12).any(|w| w == b"kv_prefill_q"));
    }
}

/// At the benchmark's shape (f16, head_dim 128, 8 KV heads, GQA 4: decode takes the module for
/// 4 query vectors, chunks of queries the one for 8), and at Gemma's (head_dim 256, GQA 4: decode
/// and chunks of queries take the module for 4; f16, and bf16 at KIVI-2, whose `kv_prefill_q`
/// differs), KIVI-2 and KIVI-4, no kernel that sm_80 and sm_90 launch spills
/// registers to local memory at the launch bounds it is compiled for (the tensor-core decode has
/// 168 registers for 3 blocks per multiprocessor and uses about 155 at head_dim 128, all 168 at
/// 256), as ptxas reports each. The CUDA-core attention kernel (`kv_decode_attn`) is left out:
/// these shapes launch it only with `KIVI_CUDA_MMA=0`, and at 8 query vectors on sm_80 it spills
/// 8 bytes.
#[test]
fn no_kernel_spills_registers() {
    if !nvrtc_ready() {
        return;
    }
    use kivi::cuda::kernels::{compile_with_log, Family, Spec};
    for arch in ["sm_80", "sm_90"] {
        let shapes = [(Family::Decode, 4), (Family::Decode, 8), (Family::Quantize, 4)];
        let mut gemma_bf16 = gemma_config(2);
        gemma_bf16.dtype = kivi::DType::BF16;
        let cases = [2u8, 4]
            .into_iter()
            .flat_map(|b| [(bench_config(b), &shapes[..]), (gemma_config(b), &shapes[..1])])
            .chain([(gemma_bf16, &shapes[..1])]);
        for (cfg, shapes) in cases {
            let bits = cfg.key_bits;
            for &(family, nq) in shapes {
                let spec = Spec::for_config(&cfg, nq).unwrap().with_option("--ptxas-options=-v");
                let (_, log) = compile_with_log(family, &spec, arch).unwrap();
                // "Function properties for NAME", then "N bytes stack frame, N bytes spill
                // stores, N bytes spill loads".
                let mut kernel = None;
                let mut seen = Vec::new();
                for line in log.lines() {
                    if let Some(name) = line.split("Function properties for ").nth(1) {
                        kernel = Some(name.trim().to_string());
                    } else if line.contains("spill stores") {
                        let name = kernel.take().unwrap_or_else(|| panic!("{arch}: no kernel before {line:?}\n{log}"));
                        let hd = cfg.head_dim;
                        let ctx = format!(
                            "{arch}, KIVI-{bits}, head_dim {hd}, {} for {nq} query vectors, {name}",
                            family.file()
                        );
                        let spills = !line.contains(" 0 bytes spill stores, 0 bytes spill loads");
                        assert!(name == "kv_decode_attn" || !spills, "{ctx}: {}", line.trim());
                        seen.push(name);
                    }
                }
                // Every kernel reported: the family's, and the tensor-core ones of its module.
                let mut wanted = family.entries().to_vec();
                if family == Family::Decode {
                    wanted.push("kv_decode_mma");
                    if nq == kivi::cuda::kernels::mma_max_nq(cfg.head_dim as usize) {
                        wanted.extend(["kv_prefill_fp", "kv_prefill_q"]);
                    }
                }
                for name in wanted {
                    assert!(
                        seen.iter().any(|s| s == name),
                        "{arch}, KIVI-{bits}, nq {nq}: no report of {name}:\n{log}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_backend_reports_whether_it_is_available() {
    // On a machine without a driver this is an error naming what is missing, never a panic.
    match kivi::cuda::available() {
        Ok(info) => eprintln!("CUDA available: {info:?}"),
        Err(e) => {
            assert!(matches!(e, kivi::Error::BackendUnavailable(_)), "{e:?}");
            eprintln!("CUDA unavailable: {e}");
        }
    }
}

#[test]
fn compiled_kernels_are_kept_on_disk_when_asked() {
    if !nvrtc_ready() {
        return;
    }
    use kivi::cuda::kernels::{compile_cached, test_configs, Family, Spec};
    let dir = std::env::temp_dir().join(format!("kivi-cubins-test-{}", std::process::id()));
    std::env::set_var("KIVI_CUDA_CACHE_DIR", &dir);
    let spec = Spec::for_config(&test_configs()[3], 1).unwrap();
    let a = compile_cached(Family::Quantize, &spec, "sm_80").unwrap();
    let files = std::fs::read_dir(&dir).unwrap().count();
    let b = compile_cached(Family::Quantize, &spec, "sm_80").unwrap();
    std::env::remove_var("KIVI_CUDA_CACHE_DIR");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(files, 1);
    assert_eq!(a.bytes(), b.bytes());
}
