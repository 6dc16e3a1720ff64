#!/usr/bin/env bash
# Re-vendors @noble/ed25519 (the fallback for browsers whose WebCrypto lacks Ed25519) from
# web/node_modules, at the exact version pinned in web/package.json. `--check`: fail if the
# committed copy differs (run by the test suite when node_modules is present).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/../node_modules/@noble/ed25519"
[ -d "$src" ] || { echo "run: npm ci --prefix web" >&2; exit 2; }
if [ "${1:-}" = "--check" ]; then
  cmp "$src/index.js" "$here/vendor/noble-ed25519.js"
  cmp "$src/LICENSE" "$here/vendor/LICENSE.noble-ed25519"
  echo "vendored @noble/ed25519 matches web/node_modules"
else
  cp "$src/index.js" "$here/vendor/noble-ed25519.js"
  cp "$src/LICENSE" "$here/vendor/LICENSE.noble-ed25519"
fi
