#!/usr/bin/env bash
# The CUDA backend on a CUDA machine, in one run of at most 8 minutes (TOTAL_S, 470 seconds:
# every step runs under a timeout that leaves the steps after it their share): the device and
# its libraries, the kernels compiled on every core (gpu_check precompile), CUDA against the CPU
# backend on identical random inputs (with and without the tensor-core decode; the C ABI on a
# stream, with decode steps captured into CUDA graphs; Python with PyTorch tensors; where that
# fails, its tensor-core cases again with the transposed loop one group per iteration, with the
# combine as a kernel of its own, with the untransposed loop, and without the chunk kernels
# kv_prefill_fp and kv_prefill_q, to tell which kernel fails),
# then the decode benchmark with the PyTorch fp16 baseline and the copy bandwidth (each step
# synchronised, and steps queued back to back), variants of the tensor-core kernels against
# the defaults side by side at 32k tokens, batches 1 and 16 (gpu_check variants: the transposed
# loop one group per iteration, the untransposed loop, kv_prefill_q without the folded f16 keys,
# and with registers for 3 blocks per multiprocessor, which leave decode as it is, a measure of
# the noise; the combine as a kernel of its own; small launches split as large ones, the
# earlier choice, which batch 1 shows; the query's parts held in registers, fewer shared-memory
# loads: all at 2 blocks per multiprocessor, half at 3; the key codes in the CPU's order, not
# interleaved), attention over whole prompts against
# causal SDPA, and
# decode and prompts at head_dim 256 (Gemma's heads) against SDPA on the same heads, and, in
# what time is left, the decode loop's stall reasons, pipes and shared-memory wavefronts per
# group under Nsight Compute. Needs no Rust: build the binary and the library first elsewhere,
#   cargo build --release --example gpu_check && cargo build --release
# and bring target/release/examples/gpu_check (or pass its path as $1) and
# target/release/libkivi.so (or set KIVI_LIB) along; without the library the Python step is
# skipped.
#
# Writes into $OUT (default ./gpu-out): info.txt, precompile.jsonl, check.jsonl, bench.jsonl, variants.jsonl,
# results.jsonl, prompt.jsonl, prompt-results.jsonl, benchmarks.md, targets.json, ncu-stalls.txt
# and the logs.
# Exits non-zero when the correctness check fails.
set -uo pipefail
BIN=$(realpath "${1:-$(dirname "$0")/../target/release/examples/gpu_check}")
OUT=$(realpath -m "${OUT:-$PWD/gpu-out}")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
CHECK_S=${CHECK_S:-150}
BENCH_S=${BENCH_S:-120}
BASE_S=${BASE_S:-50}
TOTAL_S=${TOTAL_S:-470}
START=$SECONDS
exec 3>&2  # the script's own stderr, for what within says while a step's stderr goes to its log
source scripts/within.sh
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

# Every module the check and the benchmark load, compiled on every core first (about 90 modules
# of a few seconds each, which the steps below would otherwise compile one after another in
# their own time); what this leaves out, the steps compile as they go.
echo "== precompile"
within 90 380 "$BIN" precompile > "$OUT/precompile.jsonl" 2> "$OUT/precompile.log"
echo "precompile exit code: $?"
cat "$OUT/precompile.jsonl"

echo "== check (CUDA against the CPU backend)"
within "$CHECK_S" 250 "$BIN" check > "$OUT/check.jsonl" 2> "$OUT/check.log"
check_rc=$?
cat "$OUT/check.jsonl"
echo "check exit code: $check_rc"
if [ "$check_rc" != 0 ]; then
  # Which loop fails: the tensor-core cases again with the transposed loop one group per
  # iteration, then (after the combine) with the untransposed products.
  echo "== check failed: its tensor-core cases again with one group per iteration (-DKV_MMA_PIPE=0)"
  KIVI_NVRTC_OPTS="${KIVI_NVRTC_OPTS:-} -DKV_MMA_PIPE=0" within 45 220 "$BIN" check --mma-only \
    > "$OUT/check-pipe0.jsonl" 2> "$OUT/check-pipe0.log"
  echo "check (one group per iteration) exit code: $?"
  grep '"ok":false' "$OUT/check-pipe0.jsonl" || true
  # Whether the decode launch's own merge of its splits fails (its fences and counters: what
  # only a GPU checks): the same with the combine kernel (read when a cache is made).
  echo "== check failed: its tensor-core cases again with the combine as a kernel of its own"
  KIVI_CUDA_FUSED_COMBINE=0 within 35 220 "$BIN" check --mma-only \
    > "$OUT/check-unfused.jsonl" 2> "$OUT/check-unfused.log"
  echo "check (combine kernel) exit code: $?"
  grep '"ok":false' "$OUT/check-unfused.jsonl" || true
  echo "== check failed: its tensor-core cases again with the untransposed loop (-DKV_MMA_T=0)"
  KIVI_NVRTC_OPTS="${KIVI_NVRTC_OPTS:-} -DKV_MMA_T=0" within 50 220 "$BIN" check --mma-only \
    > "$OUT/check-untransposed.jsonl" 2> "$OUT/check-untransposed.log"
  echo "check (untransposed) exit code: $?"
  grep '"ok":false' "$OUT/check-untransposed.jsonl" || true
  # Which chunk kernel fails: the same with chunks of queries on kv_decode_mma and the CUDA-core
  # body, as before kv_prefill_fp and kv_prefill_q (no recompilation: read at each call).
  echo "== check failed: its tensor-core cases again without kv_prefill_fp and kv_prefill_q"
  KIVI_CUDA_PREFILL_FP=0 KIVI_CUDA_PREFILL_Q=0 within 35 220 "$BIN" check --mma-only \
    > "$OUT/check-nochunk.jsonl" 2> "$OUT/check-nochunk.log"
  echo "check (no chunk kernels) exit code: $?"
  grep '"ok":false' "$OUT/check-nochunk.jsonl" || true
fi

echo "== check with the tensor-core decode turned off (the CUDA-core kernel for every group)"
KIVI_CUDA_MMA=0 within 45 200 "$BIN" check --mma-only > "$OUT/check-nomma.jsonl" 2> "$OUT/check-nomma.log"
nomma_rc=$?
grep -c '"ok":true' "$OUT/check-nomma.jsonl" || true
grep '"ok":false' "$OUT/check-nomma.jsonl" || true
echo "check (no mma) exit code: $nomma_rc"
[ "$check_rc" = 0 ] && check_rc=$nomma_rc

echo "== Python (ctypes) with PyTorch CUDA tensors, on a PyTorch stream"
LIB=$(realpath -m "${KIVI_LIB:-target/release/libkivi.so}")
if [ -f "$LIB" ]; then
  KIVI_LIB="$LIB" within 30 190 python3 examples/python/cuda_example.py > "$OUT/python.jsonl" 2> "$OUT/python.log"
  py_rc=$?
  cat "$OUT/python.jsonl"; tail -5 "$OUT/python.log"
  echo "python exit code: $py_rc"
  [ "$check_rc" = 0 ] && check_rc=$py_rc
else
  echo "skipped: no $LIB"
fi

echo "== bench"
within "$BENCH_S" 65 "$BIN" bench ${BENCH_ARGS:-} > "$OUT/bench.jsonl" 2> "$OUT/bench.log"
echo "bench exit code: $?"
cat "$OUT/bench.jsonl"
echo "== variants of the tensor-core kernels against the defaults, alternating, 32k context"
# (Skipped when the check failed: its reruns above take the time.)
[ "$check_rc" = 0 ] && within 75 100 "$BIN" variants --contexts 32768 --batches 1,16 --prefill \
  --variant pf0=-DKV_MMA_PREFETCH=0 --variant pf2=-DKV_MMA_PREFETCH=2 --variant kilv0=KIVI_CUDA_KEY_INTERLEAVE=0 \
  --variant "qreg2=-DKV_MMA_QREG=8 -DKV_MMA_BLOCKS=2" --variant qhalf=-DKV_MMA_QREG=4 \
  --variant pipe0=-DKV_MMA_PIPE=0 --variant untransposed=-DKV_MMA_T=0 --variant pqfold0=-DKV_PQ_FOLD=0 \
  --variant pq3=-DKV_PQ_BLOCKS=3 --variant unfused=KIVI_CUDA_FUSED_COMBINE=0 --variant wave4=KIVI_CUDA_ONE_WAVE=0 \
  > "$OUT/variants.jsonl" 2> "$OUT/variants.log"
touch "$OUT/variants.jsonl"
python3 - "$OUT/variants.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    if "error" in r:
        print(f"{r.get('name')}: KIVI-{r.get('bits')} ctx {r.get('ctx')}: {r['error']}")
    elif r.get("kind") == "variant":
        print(f"KIVI-{r['bits']} ctx {r['ctx']} batch {r['batch']}: {r['name']:<13} {r['ms_median']:.4f} ms "
              f"({r['vs_default']:.3f}x the default's time), back to back {r['ms_stream']:.4f} ms "
              f"({r['stream_vs_default']:.3f}x)")
    elif r.get("kind") == "variant-prefill":
        print(f"KIVI-{r['bits']} ctx {r['ctx']} prefill of {r['query_rows']} rows: {r['name']:<13} "
              f"{r['ms']:.3f} ms ({r['vs_default']:.3f}x)")
PY

echo "== prompts: attention over whole prompts, the chunk's tokens on tensor cores and on CUDA cores"
within 40 55 "$BIN" prompt > "$OUT/prompt.jsonl" 2> "$OUT/prompt.log"
echo "prompt exit code: $?"
cat "$OUT/prompt.jsonl"

echo "== bench at head_dim 256 (Gemma-2-9B, Gemma-3-12B: 16 query heads over 8 KV heads), 32k tokens"
# (Appended to bench.jsonl: the baseline below times SDPA on the same heads; its chunked-prefill
# case times kv_prefill_q against kv_decode_mma on these heads.)
within 45 50 "$BIN" bench --contexts 32768 --batches 1,16 --head-dim 256 --kv-heads 8 --q-heads 16 \
  >> "$OUT/bench.jsonl" 2> "$OUT/bench-hd256.log"
echo "bench (head_dim 256) exit code: $?"
grep '"head_dim":256' "$OUT/bench.jsonl" || true

echo "== prompts at head_dim 256"
# Prompts with the same heads: kv_prefill_fp with two warps for each 16 query vectors (appended
# to prompt.jsonl: the baseline times causal SDPA on the same heads).
within 30 50 "$BIN" prompt --tokens 2048,8192 --iters 3 --head-dim 256 --kv-heads 8 --q-heads 16 \
  >> "$OUT/prompt.jsonl" 2> "$OUT/prompt-hd256.log"
echo "prompt (head_dim 256) exit code: $?"
grep '"head_dim":256' "$OUT/prompt.jsonl" || true

echo "== static cost of the decode loop (nvdisasm), next to the measured times"
within 15 50 "$BIN" cubins "$OUT/cubins" > /dev/null 2>&1 && within 10 50 python3 scripts/sass_mix.py "$OUT/cubins" | tee "$OUT/sass_mix.txt"

echo "== fp16 baseline and copy bandwidth"
within "$BASE_S" 0 python3 scripts/gpu_baseline.py "$OUT/bench.jsonl" "$OUT" --prompt "$OUT/prompt.jsonl" \
  > "$OUT/baseline.jsonl" 2> "$OUT/baseline.log"
echo "baseline exit code: $?"
cat "$OUT/baseline.jsonl"
[ -f "$OUT/benchmarks.md" ] && cat "$OUT/benchmarks.md"

# Last, in what time is left: why the decode loop's warps wait, from one kv_decode_mma launch of
# the benchmark's shape (KIVI-2, 32k tokens, batch 16) under Nsight Compute: its issue rate, its
# active and eligible warps per scheduler, and its stall reasons in cycles per issued
# instruction, largest first (scripts/gpu-profile.sh takes the full profiles).
echo "== where the decode loop's warps wait (Nsight Compute)"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  within 60 0 "$NCU" --clock-control none -k kv_decode_mma -s 2 -c 1 --section SpeedOfLight --section Occupancy \
    --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis_Tables \
    --section ComputeWorkloadAnalysis --page raw --print-units base \
    "$BIN" bench --contexts 32768 --batches 16 --bits 2 --no-prefill --iters 3 > "$OUT/ncu-stalls.txt" 2>&1
  echo "ncu exit code: $?"
  grep -E "gpu__time_duration.sum|dram__throughput.avg.pct_of_peak_sustained_elapsed|smsp__(issue_active|warps_active|warps_eligible).avg.per_cycle_active|smsp__average_warp_latency_per_inst_issued" \
    "$OUT/ncu-stalls.txt"
  grep -E "smsp__average_warp_latency_issue_stalled_[a-z_]+\.ratio|warps_issue_stalled_[a-z_]+_per_issue_active\.ratio" \
    "$OUT/ncu-stalls.txt" | awk '{print $NF, $1}' | sort -g -r | head -12
  # Against the static count (sass_mix.txt): instructions and shared-memory wavefronts per group
  # of 32 tokens of one KV head (the quantized groups of 32768 tokens less one sink and the
  # window of at least 128, x 8 KV heads x 16 sequences), and the pipes' utilization: whether
  # shared memory, busy about as many cycles as issue by that count, is what the warps wait for.
  python3 scripts/ncu_per_group.py "$OUT/ncu-stalls.txt" $(((32768 - 1 - 128) / 32 * 8 * 16))
else
  echo "skipped: no ncu"
fi
exit $check_rc
