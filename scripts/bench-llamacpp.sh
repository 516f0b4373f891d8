#!/usr/bin/env bash
# Decode attention on this CPU: kivi against llama.cpp's own CPU flash attention over its f16,
# q8_0 and q4_0 caches (`--cache-type-k/-v`), same shape, same threads, in one run.
#
#   scripts/bench-llamacpp.sh [--threads N] [--rounds N] [--ctx 512,4096,16384,65536]
#
# llama.cpp comes from the PyPI sdist of llama-cpp-python (pinned below, checked by sha256),
# which vendors it; only its ggml library is built (CMake, -march=native, OpenMP, as llama.cpp
# builds by default). benches/llamacpp/fa_decode.c builds the attention graph llama.cpp builds
# for one decode token and times it; `cargo bench --bench decode` times kivi. The two run
# alternately, `--rounds` times (default 3), and the summary gives the median over rounds of each
# run's median. Needs python3 (pip), cmake, a C/C++ compiler with OpenMP, and a Rust toolchain.
# Everything is built under target/llamacpp. Raw JSON lines: target/llamacpp/results.jsonl.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
threads=2
rounds=3
ctx=512,4096,16384,65536
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --ctx) ctx="$2"; shift 2 ;;
        *) sed -n '2,13p' "$0" >&2; exit 2 ;;
    esac
done

version=0.3.36 # vendors llama.cpp commit 0c1e570 (October 2026)
sha=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
work="$root/target/llamacpp"
sdist="$work/llama_cpp_python-$version.tar.gz"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
mkdir -p "$work"

if ! [ -f "$sdist" ] || ! echo "$sha  $sdist" | sha256sum -c --status; then
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
        -d "$work" "llama-cpp-python==$version" >&2
    echo "$sha  $sdist" | sha256sum -c --status || { echo "sha256 mismatch: $sdist" >&2; exit 1; }
fi
[ -d "$src" ] || tar -xzf "$sdist" -C "$work"

if ! [ -f "$work/build/ggml/src/libggml.a" ]; then
    cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_CURL=OFF >"$work/cmake.log"
    cmake --build "$work/build" -j"$(nproc)" --target ggml >"$work/build.log"
fi
lib="$work/build/ggml/src"
cc -O2 -std=c11 -Wall -Wextra -Werror -I"$src/ggml/include" benches/llamacpp/fa_decode.c \
    "$lib/libggml.a" "$lib/libggml-cpu.a" "$lib/libggml-base.a" -lstdc++ -fopenmp -lm -lpthread \
    -o "$work/fa_decode"
cargo bench --bench decode --no-run >&2

out="$work/results.jsonl"
: >"$out"
for r in $(seq "$rounds"); do
    echo "round $r of $rounds" >&2
    "$work/fa_decode" --threads "$threads" --ctx "$ctx" | sed "s/^{/{\"round\":$r,/" >>"$out"
    for c in ${ctx//,/ }; do
        cargo bench --bench decode -- --threads "$threads" --only "gqa4-hs128:$c" 2>/dev/null |
            grep '^{' | sed "s/^{/{\"round\":$r,\"impl\":\"kivi\",/" >>"$out"
    done
done

python3 - "$out" "$threads" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def name(r):
    if r["impl"] == "kivi":
        return {2: "kivi KIVI-2", 4: "kivi KIVI-4", 16: "kivi dense f16"}[r["bits"]]
    return "llama.cpp " + r["type"]
med = {}
for r in rows:
    med.setdefault((name(r), r["ctx"]), []).append(r["ms_median"])
names = list(dict.fromkeys(name(r) for r in rows))
ctxs = sorted({r["ctx"] for r in rows})
print(f"decode attention, gqa4-hs128 (32 query heads, 8 KV heads, head_dim 128), {sys.argv[2]} thread(s)")
print(f"ms per call: median over rounds of each run's median ({len({r['round'] for r in rows})} rounds)")
print("| cache | " + " | ".join(str(c) for c in ctxs) + " |")
print("|---|" + "---:|" * len(ctxs))
for n in names:
    print(f"| {n} | " + " | ".join(f"{statistics.median(med[(n, c)]):.3f}" for c in ctxs) + " |")
base = "llama.cpp f16"
if any(n == base for n in names):
    print(f"\ntimes faster than {base}:")
    for n in names:
        print(f"| {n} | " + " | ".join(
            f"{statistics.median(med[(base, c)]) / statistics.median(med[(n, c)]):.2f}x" for c in ctxs) + " |")
EOF
