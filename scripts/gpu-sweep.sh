#!/usr/bin/env bash
# Variants of the tensor-core decode side by side in one run, on a CUDA machine: blocks per
# multiprocessor (KV_MMA_BLOCKS), staging buffers per warp (KV_MMA_STAGES), the untransposed
# products at 4 query heads per kv head (KV_MMA_T=0), the transposed loop one group per
# iteration (KV_MMA_PIPE=0), value scales and zeros loaded in one order by every lane
# (KV_MMA_VSWAP=0) and the split of the context
# (KIVI_CUDA_SPLITS), each through `gpu_check bench` at one context length. Needs no
# Rust: pass the gpu_check binary built elsewhere as $1 (as for scripts/gpu-check.sh).
# Writes $OUT/sweep.jsonl (default ./gpu-out) and prints a table of the median times.
#   CONTEXTS=32768,131072 BATCHES=16,64 ROUNDS=2 scripts/gpu-sweep.sh target/release/examples/gpu_check
# ONLY="default untransposed" runs only the variants named (default: all).
set -uo pipefail
BIN=$(realpath "${1:-$(dirname "$0")/../target/release/examples/gpu_check}")
OUT=$(realpath -m "${OUT:-$PWD/gpu-out}")
mkdir -p "$OUT"
export KIVI_CUDA_CACHE_DIR=${KIVI_CUDA_CACHE_DIR:-/tmp/kivi-cubins}
source "$(dirname "$0")/nvrtc-lib.sh"
CONTEXTS=${CONTEXTS:-32768}
BATCHES=${BATCHES:-16,64}
ROUNDS=${ROUNDS:-2}
ONLY=${ONLY:-}
# label, NVRTC options, forced splits (empty: the library's choice)
VARIANTS=(
  "default||"
  "blocks4|-DKV_MMA_BLOCKS=4|"
  "stages3|-DKV_MMA_STAGES=3|"
  "untransposed|-DKV_MMA_T=0|"
  "pipe0|-DKV_MMA_PIPE=0|"
  "vswap0|-DKV_MMA_VSWAP=0|"
  "splits1||1"
  "splits4||4"
  "splits16||16"
)
: > "$OUT/sweep.jsonl"
# Rounds alternate the variants, so that drift in the machine's speed falls on all of them.
for r in $(seq "$ROUNDS"); do
  for v in "${VARIANTS[@]}"; do
    IFS='|' read -r label opts splits <<< "$v"
    [ -n "$ONLY" ] && [[ " $ONLY " != *" $label "* ]] && continue
    KIVI_NVRTC_OPTS="$opts" KIVI_CUDA_SPLITS="$splits" timeout 60 "$BIN" bench --contexts "$CONTEXTS" \
      --batches "$BATCHES" --no-prefill --label "$label" >> "$OUT/sweep.jsonl" 2>> "$OUT/sweep.log"
    echo "round $r $label: exit code $?"
  done
done
python3 - "$OUT/sweep.jsonl" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        if r.get("kind") == "bench" and "ms_median" in r:
            label = r["case"].split("-hs128-", 1)[-1]
            rows.setdefault((r["bits"], r["ctx"], r["batch"]), {}).setdefault(label, []).append(r["ms_median"])
for (bits, ctx, batch), by in sorted(rows.items()):
    base = statistics.median(by.get("default", [float("nan")]))
    cells = ", ".join(f"{k} {statistics.median(v):.4f} ({statistics.median(v) / base:.2f})" for k, v in by.items())
    print(f"KIVI-{bits} ctx {ctx} batch {batch}: ms (against default) {cells}")
PY
