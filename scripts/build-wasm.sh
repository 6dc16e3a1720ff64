#!/usr/bin/env bash
# Builds every C source in a directory to wasm32-wasi, next to its source.
#   scripts/build-wasm.sh DIR          rebuild DIR/*.c -> DIR/*.wasm in place
#   scripts/build-wasm.sh DIR --check  rebuild into a temporary directory and fail if a
#                                      committed .wasm differs from what its source builds
# Toolchain: zig from PyPI (`python3 -m pip install ziglang==0.17.0`); stripped builds are
# byte-for-byte reproducible. Extra flags for a directory may be set in DIR/cflags.
set -euo pipefail
ZIG_VERSION=0.17.0
dir=$(cd "${1:?usage: build-wasm.sh DIR [--check]}" && pwd)
check=0
[ "${2:-}" = --check ] && check=1
if ! python3 -m ziglang version >/dev/null 2>&1; then
    echo "zig is missing: python3 -m pip install ziglang==$ZIG_VERSION" >&2
    exit 2
fi
have=$(python3 -m ziglang version)
[ "$have" = "$ZIG_VERSION" ] || { echo "zig $have found, $ZIG_VERSION required" >&2; exit 2; }
flags=""
[ -f "$dir/cflags" ] && flags=$(cat "$dir/cflags")
out=$dir
[ $check = 1 ] && out=$(mktemp -d)
status=0
for src in "$dir"/*.c; do
    name=$(basename "$src" .c)
    # shellcheck disable=SC2086
    python3 -m ziglang cc -target wasm32-wasi -O2 -s $flags "$src" -o "$out/$name.wasm" -lm
    if [ $check = 1 ] && ! cmp -s "$out/$name.wasm" "$dir/$name.wasm"; then
        echo "MISMATCH: $dir/$name.wasm differs from what $name.c builds" >&2
        status=1
    fi
done
[ $check = 1 ] && rm -rf "$out"
[ $status = 0 ] && echo "$(basename "$dir"): every .wasm matches its source"
exit $status
