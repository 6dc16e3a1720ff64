#!/usr/bin/env bash
# Stardust and its peers, back to back on this machine, with ratios.
#   benchmarks/peers/setup.sh            (once)
#   benchmarks/peers/compare.sh [TASKS] [ROUND_TRIPS]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tasks=${1:-20000}
trips=${2:-200}
py="$root/benchmarks/peers/.venv/bin/python"
[ -x "$py" ] || { echo "run benchmarks/peers/setup.sh first" >&2; exit 2; }
cargo build --release -q -p stardust --manifest-path "$root/Cargo.toml"
bin="${CARGO_TARGET_DIR:-$root/target}/release/stardust"
out=$(mktemp)
"$bin" bench throughput --tasks "$tasks" --nodes 2 --slots 2 --json | tail -1 > "$out.tp"
"$bin" bench throughput --tasks "$trips" --nodes 1 --latency --json | tail -1 > "$out.lat"
"$py" "$root/benchmarks/peers/peers.py" --tasks "$tasks" --round-trips "$trips" > "$out.peers"
"$py" - "$out" <<'PY'
import json, sys
base = sys.argv[1]
tp = json.load(open(base + ".tp"))
lat = json.load(open(base + ".lat"))
rows = [{"system": "stardust (signed, verified, durable)", "tasks_per_s": tp["tasks_per_s"], "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"]}]
rows += [json.loads(l) for l in open(base + ".peers") if l.strip()]
ref = rows[0]
print(f"{'system':<40} {'tasks/s':>10} {'round trip p50':>15} {'p99':>10} {'stardust ÷ it (tasks/s)':>24} {'it ÷ stardust (p50)':>20}")
for r in rows:
    if "error" in r:
        print(f"{r['system']:<40} error: {r['error']}")
        continue
    print(f"{r['system']:<40} {r['tasks_per_s']:>10.0f} {r['p50_ms']:>12.2f} ms {r['p99_ms']:>7.2f} ms "
          f"{ref['tasks_per_s'] / r['tasks_per_s']:>24.2f} {r['p50_ms'] / ref['p50_ms']:>20.2f}")
PY
rm -f "$out" "$out".*
