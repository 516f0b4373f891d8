#!/usr/bin/env bash
# Runs the CPU tests for aarch64 on an x86-64 machine: cross-built, run under qemu-user, so the
# NEON kernels (src/attention/cpu/neon.rs) are checked against the f64 reference like the x86
# kernels. qemu says nothing about speed; only about results.
#
#   scripts/test-aarch64.sh [--install]
#
# Needs the Rust standard library for aarch64-unknown-linux-gnu (rustup target add), a linker
# (Debian: gcc-aarch64-linux-gnu) and qemu-user (Debian: qemu-user-static). --install installs
# them first (apt-get and rustup; root). The CUDA simulator's tests are left out: every simulated
# GPU thread would run under the emulator, far too slowly, and they check kernels, not the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu

if [[ "${1:-}" == "--install" ]]; then
    need=()
    command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
    command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
    if ((${#need[@]})); then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
    rustup target list --installed | grep -qx "$target" || rustup target add "$target"
fi

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=("aarch64-linux-gnu-gcc (gcc-aarch64-linux-gnu)")
command -v qemu-aarch64-static >/dev/null || missing+=("qemu-aarch64-static (qemu-user-static)")
rustup target list --installed 2>/dev/null | grep -qx "$target" || missing+=("the $target standard library (rustup target add $target)")
if ((${#missing[@]})); then
    printf 'test-aarch64.sh: missing %s\n' "${missing[@]}" >&2
    echo "test-aarch64.sh: run it with --install, or install them yourself" >&2
    exit 1
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
qemu-aarch64-static --version | head -1
cargo test --release --target "$target" --lib --test attention --test attention_isa --test quant \
    --test sequences --test stats -- --skip cuda::
