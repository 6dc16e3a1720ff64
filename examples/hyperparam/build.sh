#!/usr/bin/env bash
# Rebuilds the benchmark kernels' .wasm from their C sources (--check: verify).
exec "$(dirname "$0")/../../scripts/build-wasm.sh" "$(dirname "$0")" "$@"
