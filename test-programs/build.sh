#!/usr/bin/env bash
# Rebuilds the committed test-program .wasm files from their C sources.
#   test-programs/build.sh          rebuild in place
#   test-programs/build.sh --check  rebuild into a temporary directory and fail if any
#                                   committed .wasm differs
# Toolchain: zig (PyPI package ziglang, pinned below) targeting wasm32-wasi; stripped
# builds are byte-for-byte reproducible.
set -euo pipefail
ZIG_VERSION=0.17.0
here=$(cd "$(dirname "$0")" && pwd)
check=0
[ "${1:-}" = --check ] && check=1
if ! python3 -m ziglang version >/dev/null 2>&1; then
    echo "zig is missing: python3 -m pip install ziglang==$ZIG_VERSION" >&2
    exit 2
fi
have=$(python3 -m ziglang version)
[ "$have" = "$ZIG_VERSION" ] || { echo "zig $have found, $ZIG_VERSION required" >&2; exit 2; }
out=$here
[ $check = 1 ] && out=$(mktemp -d)
status=0
for src in "$here"/*.c; do
    name=$(basename "$src" .c)
    python3 -m ziglang cc -target wasm32-wasi -O2 -s "$src" -o "$out/$name.wasm"
    if [ $check = 1 ]; then
        if ! cmp -s "$out/$name.wasm" "$here/$name.wasm"; then
            echo "MISMATCH: test-programs/$name.wasm differs from what $name.c builds" >&2
            status=1
        fi
    fi
done
[ $check = 1 ] && rm -rf "$out"
[ $status = 0 ] && echo "test-programs: all .wasm match their sources"
exit $status
