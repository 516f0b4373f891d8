#!/usr/bin/env bash
# The GPU check's cases under NVIDIA's compute-sanitizer, on a CUDA machine, in one run of at
# most 4 minutes (TOTAL_S, 240 seconds), for what the check itself cannot see because its results
# come out right anyway, and what the host simulator cannot model (it runs one block at a time on
# the CPU, with no limits of the real memories):
#   memcheck   out-of-bounds and misaligned accesses to global, local and shared memory, on every
#              case of the check and the C ABI's (a non-blocking stream, CUDA graphs);
#   racecheck  shared-memory hazards between the threads of a block (the staging buffers and
#              their cp.async copies, the warps' merge), on one case of each kernel path
#              (SANITIZE_CASES);
#   synccheck  barriers and warp collectives reached by only some of the threads they name;
#   initcheck  reads of device memory that nothing wrote (parts of pages, rings or tables
#              outside what a sequence holds).
# The kernels are compiled with -lineinfo, so that a report names the line of cuda/ it comes
# from. Needs no Rust: bring the gpu_check binary built elsewhere (or pass its path as $1),
#   cargo build --release --example gpu_check
# Writes into $OUT (default ./gpu-out): sanitize-TOOL.log (the tool's reports), sanitize-TOOL.jsonl
# (the check's lines under it), sanitize-precompile.jsonl. Prints each tool's summary; exits
# non-zero when a tool reports an error or a case fails (a tool cut off by its time is said so).
set -uo pipefail
BIN=$(realpath "${1:-$(dirname "$0")/../target/release/examples/gpu_check}")
OUT=$(realpath -m "${OUT:-$PWD/gpu-out}")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-240}
START=$SECONDS
exec 3>&2
source scripts/within.sh
source scripts/nvrtc-lib.sh
# One case of each path: transposed tensor-core decode at head_dim 128, the untransposed one (8
# query vectors a block) with pages of several groups, head_dim 256 (dynamic shared memory),
# the CUDA-core kernels (8 bits, sinks, a sliding window; per-token keys), many sequences.
SANITIZE_CASES=${SANITIZE_CASES:-kivi4-hd128-gqa4,gqa16-pages,mma-hd256-kivi4-gqa8,kivi8-hd80-sinks,pertoken-g64,batch-70}
export KIVI_NVRTC_OPTS="${KIVI_NVRTC_OPTS:-} -lineinfo"
export KIVI_CUDA_CACHE_DIR=${KIVI_CUDA_CACHE_DIR:-/tmp/kivi-cubins}

SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
  /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
if [ -z "$SAN" ]; then
  echo "compute-sanitizer not found (it comes with the CUDA toolkit)"
  exit 1
fi
"$SAN" --version | tail -1

# The modules (-lineinfo makes them modules of their own), on every core.
echo "== precompile (-lineinfo)"
within 30 200 "$BIN" precompile > "$OUT/sanitize-precompile.jsonl" 2> "$OUT/sanitize-precompile.log"
echo "precompile exit code: $?"
cat "$OUT/sanitize-precompile.jsonl"

status=0
# run TOOL WANT KEEP [CASES]: the check (every case without CASES) under TOOL.
run() {
  local tool=$1 want=$2 keep=$3 cases=${4:-}
  echo "== $tool${cases:+ ($cases)}"
  within "$want" "$keep" "$SAN" --tool "$tool" --error-exitcode 9 --print-limit 20 --show-backtrace device \
    --log-file "$OUT/sanitize-$tool.log" "$BIN" check ${cases:+--cases "$cases"} \
    > "$OUT/sanitize-$tool.jsonl" 2> "$OUT/sanitize-$tool.err"
  local rc=$?
  case $rc in
    0) echo "$tool: no errors, every case passed" ;;
    9) echo "$tool: ERRORS (sanitize-$tool.log)" ;;
    124) echo "$tool: cut off by its time (the cases it finished are in sanitize-$tool.jsonl)" ;;
    *) echo "$tool: exit code $rc (1: a case failed: sanitize-$tool.jsonl, sanitize-$tool.err)" ;;
  esac
  # The summary, then the first reports (device frames only: --show-backtrace device).
  grep -E "(ERROR|RACECHECK) SUMMARY" "$OUT/sanitize-$tool.log" 2>/dev/null
  grep -v -E "^=========\s*$|SUMMARY" "$OUT/sanitize-$tool.log" 2>/dev/null | head -24
  grep -c '"ok":true' "$OUT/sanitize-$tool.jsonl" | sed 's/^/cases passed: /'
  grep '"ok":false' "$OUT/sanitize-$tool.jsonl" | cut -c1-300
  [ "$rc" = 0 ] || status=1
}
run memcheck 110 90
run racecheck 45 45 "$SANITIZE_CASES"
run synccheck 20 25 "$SANITIZE_CASES"
run initcheck 25 0 "$SANITIZE_CASES"
exit $status
