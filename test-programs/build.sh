#!/usr/bin/env bash
# Rebuilds the committed test-program .wasm files from their C sources (--check: verify).
exec "$(dirname "$0")/../scripts/build-wasm.sh" "$(dirname "$0")" "$@"
