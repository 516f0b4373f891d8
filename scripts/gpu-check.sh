#!/usr/bin/env bash
# The CUDA backend on a CUDA machine, in one run of at most 8.8 minutes (the timeouts below; 9.6
# when the check fails): the device and its libraries, CUDA against the CPU backend on identical
# random inputs (with and without the tensor-core decode; the C ABI on a stream, with decode
# steps captured into CUDA graphs; Python with PyTorch tensors; where that fails, its
# tensor-core cases again with the untransposed loop, and again without the chunk kernels
# kv_prefill_fp and kv_prefill_q, to tell which kernel fails), then the decode
# benchmark with the PyTorch fp16 baseline and the copy bandwidth (each step synchronised, and
# steps queued back to back), the untransposed tensor-core loop timed against the default
# at 32k tokens, and attention over whole prompts against causal SDPA. Needs no Rust: build the
# binary and the library first elsewhere,
#   cargo build --release --example gpu_check && cargo build --release
# and bring target/release/examples/gpu_check (or pass its path as $1) and
# target/release/libkivi.so (or set KIVI_LIB) along; without the library the Python step is
# skipped.
#
# Writes into $OUT (default ./gpu-out): info.txt, check.jsonl, bench.jsonl, results.jsonl,
# prompt.jsonl, prompt-results.jsonl, benchmarks.md, targets.json and the logs. Exits non-zero
# when the correctness check fails.
set -uo pipefail
BIN=$(realpath "${1:-$(dirname "$0")/../target/release/examples/gpu_check}")
OUT=$(realpath -m "${OUT:-$PWD/gpu-out}")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
CHECK_S=${CHECK_S:-120}
BENCH_S=${BENCH_S:-130}
BASE_S=${BASE_S:-50}
# Compiled kernels are kept between the runs below (each run is its own process).
export KIVI_CUDA_CACHE_DIR=${KIVI_CUDA_CACHE_DIR:-/tmp/kivi-cubins}

# NVRTC: the toolkit's own (it matches the driver), else the nvidia-cuda-nvrtc Python package.
source scripts/nvrtc-lib.sh

{
  echo "date: $(date -u +%FT%TZ)"
  echo "KIVI_NVRTC_LIB=${KIVI_NVRTC_LIB:-unset}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  ldd "$BIN" 2>&1
} > "$OUT/info.txt"

echo "== info"
"$BIN" info | tee "$OUT/info.jsonl"

echo "== check (CUDA against the CPU backend)"
timeout "$CHECK_S" "$BIN" check > "$OUT/check.jsonl" 2> "$OUT/check.log"
check_rc=$?
cat "$OUT/check.jsonl"
echo "check exit code: $check_rc"
if [ "$check_rc" != 0 ]; then
  # Which loop fails: the tensor-core cases again with the untransposed products.
  echo "== check failed: its tensor-core cases again with the untransposed loop (-DKV_MMA_T=0)"
  KIVI_NVRTC_OPTS="${KIVI_NVRTC_OPTS:-} -DKV_MMA_T=0" timeout 60 "$BIN" check --mma-only \
    > "$OUT/check-untransposed.jsonl" 2> "$OUT/check-untransposed.log"
  echo "check (untransposed) exit code: $?"
  grep '"ok":false' "$OUT/check-untransposed.jsonl" || true
  # Which chunk kernel fails: the same with chunks of queries on kv_decode_mma and the CUDA-core
  # body, as before kv_prefill_fp and kv_prefill_q (no recompilation: read at each call).
  echo "== check failed: its tensor-core cases again without kv_prefill_fp and kv_prefill_q"
  KIVI_CUDA_PREFILL_FP=0 KIVI_CUDA_PREFILL_Q=0 timeout 40 "$BIN" check --mma-only \
    > "$OUT/check-nochunk.jsonl" 2> "$OUT/check-nochunk.log"
  echo "check (no chunk kernels) exit code: $?"
  grep '"ok":false' "$OUT/check-nochunk.jsonl" || true
fi

echo "== check with the tensor-core decode turned off (the CUDA-core kernel for every group)"
KIVI_CUDA_MMA=0 timeout 60 "$BIN" check --mma-only > "$OUT/check-nomma.jsonl" 2> "$OUT/check-nomma.log"
nomma_rc=$?
grep -c '"ok":true' "$OUT/check-nomma.jsonl" || true
grep '"ok":false' "$OUT/check-nomma.jsonl" || true
echo "check (no mma) exit code: $nomma_rc"
[ "$check_rc" = 0 ] && check_rc=$nomma_rc

echo "== Python (ctypes) with PyTorch CUDA tensors, on a PyTorch stream"
LIB=$(realpath -m "${KIVI_LIB:-target/release/libkivi.so}")
if [ -f "$LIB" ]; then
  KIVI_LIB="$LIB" timeout 40 python3 examples/python/cuda_example.py > "$OUT/python.jsonl" 2> "$OUT/python.log"
  py_rc=$?
  cat "$OUT/python.jsonl"; tail -5 "$OUT/python.log"
  echo "python exit code: $py_rc"
  [ "$check_rc" = 0 ] && check_rc=$py_rc
else
  echo "skipped: no $LIB"
fi

echo "== bench"
timeout "$BENCH_S" "$BIN" bench ${BENCH_ARGS:-} > "$OUT/bench.jsonl" 2> "$OUT/bench.log"
echo "bench exit code: $?"
cat "$OUT/bench.jsonl"
echo "== bench, the untransposed tensor-core loop (-DKV_MMA_T=0), 32k context, against the default"
# (Skipped when the check failed: its reruns above take the time.)
[ "$check_rc" = 0 ] && KIVI_NVRTC_OPTS="${KIVI_NVRTC_OPTS:-} -DKV_MMA_T=0" timeout 50 "$BIN" bench --contexts 32768 \
  --batches 16,64 --no-prefill --label untransposed > "$OUT/bench-untransposed.jsonl" 2> "$OUT/bench-untransposed.log"
touch "$OUT/bench-untransposed.jsonl"
cat "$OUT/bench-untransposed.jsonl"
python3 - "$OUT/bench.jsonl" "$OUT/bench-untransposed.jsonl" <<'PY'
import json, sys
def rows(path):
    out = {}
    for line in open(path):
        if line.startswith("{"):
            r = json.loads(line)
            if r.get("kind") == "bench" and "ms_median" in r:
                out[(r["bits"], r["ctx"], r["batch"])] = (r["ms_median"], r.get("ms_stream", 0.0))
    return out
base, other = rows(sys.argv[1]), rows(sys.argv[2])
for k in sorted(other):
    if k in base:
        (b, bs), (o, os_) = base[k], other[k]
        print(f"KIVI-{k[0]} ctx {k[1]} batch {k[2]}: default {b:.4f} ms, untransposed {o:.4f} ms "
              f"({o / b:.2f}x the default's time); back to back {bs:.4f} and {os_:.4f} ms"
              + (f" ({os_ / bs:.2f}x)" if bs > 0 else ""))
PY

echo "== prompts: attention over whole prompts, the chunk's tokens on tensor cores and on CUDA cores"
timeout 60 "$BIN" prompt > "$OUT/prompt.jsonl" 2> "$OUT/prompt.log"
echo "prompt exit code: $?"
cat "$OUT/prompt.jsonl"

echo "== static cost of the decode loop (nvdisasm), next to the measured times"
timeout 10 "$BIN" cubins "$OUT/cubins" > /dev/null 2>&1 && timeout 10 python3 scripts/sass_mix.py "$OUT/cubins" | tee "$OUT/sass_mix.txt"

echo "== fp16 baseline and copy bandwidth"
timeout "$BASE_S" python3 scripts/gpu_baseline.py "$OUT/bench.jsonl" "$OUT" --prompt "$OUT/prompt.jsonl" \
  > "$OUT/baseline.jsonl" 2> "$OUT/baseline.log"
echo "baseline exit code: $?"
cat "$OUT/baseline.jsonl"
[ -f "$OUT/benchmarks.md" ] && cat "$OUT/benchmarks.md"
exit $check_rc
