#!/usr/bin/env bash
# Builds kivi (release) and installs the C library, header and pkg-config file under a prefix:
#
#   scripts/install.sh [PREFIX]        # default /usr/local
#
#   PREFIX/lib/libkivi.so, PREFIX/lib/libkivi.a, PREFIX/include/kivi.h,
#   PREFIX/lib/pkgconfig/kivi.pc
#
# Then: cc app.c $(pkg-config --cflags --libs kivi)   (add PREFIX/lib/pkgconfig to
# PKG_CONFIG_PATH for a prefix pkg-config does not search, and PREFIX/lib to the run-time search
# path: ldconfig, an rpath or LD_LIBRARY_PATH). Static linking: pkg-config --static --libs kivi.
#
# KIVI_BUILD_DIR=DIR installs the libraries found in DIR instead of building them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${1:-/usr/local}"
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"

if [[ -n "${KIVI_BUILD_DIR:-}" ]]; then
    build="$KIVI_BUILD_DIR"
else
    cargo build --release --lib --manifest-path "$root/Cargo.toml"
    build="${CARGO_TARGET_DIR:-$root/target}/release"
fi
version="$(sed -n 's/^#define KIVI_VERSION_STRING "\(.*\)"$/\1/p' "$root/include/kivi.h")"
[[ -n "$version" ]] || { echo "install.sh: no KIVI_VERSION_STRING in include/kivi.h" >&2; exit 1; }

install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 755 "$build/libkivi.so" "$prefix/lib/libkivi.so"
install -m 644 "$build/libkivi.a" "$prefix/lib/libkivi.a"
install -m 644 "$root/include/kivi.h" "$prefix/include/kivi.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$root/kivi.pc.in" > "$prefix/lib/pkgconfig/kivi.pc"
chmod 644 "$prefix/lib/pkgconfig/kivi.pc"
echo "installed kivi $version under $prefix"
