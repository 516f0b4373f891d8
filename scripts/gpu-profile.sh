#!/usr/bin/env bash
# Nsight Compute profiles of one decode step of the benchmark's shape on a CUDA machine (ncu
# must be installed there; it needs no Rust: pass the gpu_check binary built elsewhere as $1):
#   ncu-sol.txt      the duration and throughput of the attention kernels of a few steps
#   ncu-batch1.txt   the same for every kernel of a few steps at batch 1, 4096 tokens
#   ncu-full.txt     every section of one kv_decode_mma launch (stall reasons, occupancy, memory)
#   ncu-raw.txt      every metric of that launch, among them each pipe's utilization (is the
#                    tensor pipe, at mma.sync's rate on this GPU, what the loop waits for?) and
#                    the warps' stall reasons as numbers
#   ncu-sass.csv     the same launch per SASS instruction (warp stall samples by reason, and
#                    the source counters), to find the instructions the loop waits on
#   ncu-full.ncu-rep the report itself (the three above are read from it: one profiled run)
# Writes into $OUT (default ./gpu-out). BITS, CONTEXT and BATCH choose the shape (2, 32768, 16).
set -uo pipefail
BIN=$(realpath "${1:-$(dirname "$0")/../target/release/examples/gpu_check}")
OUT=$(realpath -m "${OUT:-$PWD/gpu-out}")
mkdir -p "$OUT"
source "$(dirname "$0")/nvrtc-lib.sh"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
STEP=("$BIN" bench --contexts "${CONTEXT:-32768}" --batches "${BATCH:-16}" --bits "${BITS:-2}" --no-prefill --iters 3)
# Unmodified clocks: the numbers then match the benchmark's, not a locked base clock.
timeout 60 "$NCU" --clock-control none -k regex:kv_decode -c 8 --section SpeedOfLight "${STEP[@]}" \
  > "$OUT/ncu-sol.txt" 2>&1
echo "sol exit code: $?"
# Every kernel of a few decode steps at batch 1, 4096 tokens (window write, attention, combine):
# where a step's time goes when its bytes take about a microsecond.
timeout 60 "$NCU" --clock-control none -k regex:kv_ -c 12 --section SpeedOfLight "$BIN" bench --contexts 4096 \
  --batches 1 --bits "${BITS:-2}" --no-prefill --iters 3 > "$OUT/ncu-batch1.txt" 2>&1
echo "batch-1 exit code: $?"
timeout 150 "$NCU" --clock-control none -k kv_decode_mma -s 2 -c 1 --set full \
  -f -o "$OUT/ncu-full" "${STEP[@]}" > "$OUT/ncu-full-run.txt" 2>&1
echo "full exit code: $?"
REP="$OUT/ncu-full.ncu-rep"
timeout 60 "$NCU" --import "$REP" > "$OUT/ncu-full.txt" 2>&1
timeout 60 "$NCU" --import "$REP" --page raw > "$OUT/ncu-raw.txt" 2>&1
timeout 60 "$NCU" --import "$REP" --page source --print-source sass --csv > "$OUT/ncu-sass.csv" 2>&1
sass_rc=$?
# An ncu that cannot print the source page of a saved report: profile that page live.
if [ "$sass_rc" != 0 ] || ! grep -q HMMA "$OUT/ncu-sass.csv"; then
  timeout 150 "$NCU" --clock-control none -k kv_decode_mma -s 2 -c 1 --set full --page source \
    --print-source sass --csv "${STEP[@]}" > "$OUT/ncu-sass.csv" 2>&1
  sass_rc=$?
fi
echo "sass exit code: $sass_rc"
grep -E "^  kv_|Duration" "$OUT/ncu-sol.txt" | head -24
grep -E "^  kv_|Duration" "$OUT/ncu-batch1.txt" | tail -12
grep -E "Warp Cycles Per Issued|Issued Warp Per Scheduler|Eligible Warps|Achieved Active Warps" "$OUT/ncu-full.txt"
# Pipe utilization and the stall reasons (cycles per issued instruction), largest first.
grep -E "pipe_(tensor|fma|alu|fp16|lsu|shared|xu)[a-z_]*(cycles_active|inst_executed)?[a-z_.]*pct_of_peak_sustained_active" \
  "$OUT/ncu-raw.txt" | head -24
grep -E "smsp__average_warp_latency_issue_stalled_[a-z_]+\.ratio|warps_issue_stalled_[a-z_]+_per_issue_active\.ratio" \
  "$OUT/ncu-raw.txt" | awk '{print $NF, $1}' | sort -g -r | head -12
