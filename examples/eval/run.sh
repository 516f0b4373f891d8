#!/usr/bin/env bash
# Fetch the model and text if needed, build kivi-eval for this CPU, and run it.
#
#   examples/eval/run.sh [kivi-eval options...]
#
# With no options this is the default run: ctx 1024, 8 windows, every
# configuration, writing results/ (CSV, PNG) next to this script.
#
# The build uses RUSTFLAGS="-C target-cpu=native" for this command only and a
# target directory of its own (target/native), so neither the library's own
# builds nor `cargo test` see the flag, and switching between them does not
# rebuild everything. (A .cargo/config.toml would apply to the whole workspace,
# and Cargo profiles cannot set codegen flags per package on stable.)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

paths="$("$here/fetch.sh")"
model="$(echo "$paths" | sed -n 's/^MODEL=//p')"
text="$(echo "$paths" | sed -n 's/^TEXT=//p')"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/native}"
RUSTFLAGS="${RUSTFLAGS:-} -C target-cpu=native" cargo build --release -p kivi-eval --manifest-path "$root/Cargo.toml" >&2

if [ "$#" -eq 0 ]; then
    mkdir -p "$here/results"
    set -- --csv "$here/results/default.csv" --plot "$here/results/default.png"
fi
exec "$CARGO_TARGET_DIR/release/kivi-eval" --model "$model" --text "$text" "$@"
