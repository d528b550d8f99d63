#!/usr/bin/env bash
# The HBM tier's cost on the mapped path, interleaved REPEATS times: the same mapped lookups
# (one-token latency, 4096-token throughput) against an engramd without the tier and one with it
# (--hbm-store host: the slots in host memory, so what is measured is the protocol a GPU client
# runs on the host: pin, index probe, sampling, reports, and how much the tier ends up serving).
# Usage: bench/run_hbm.sh PACK [REPEATS] [SECONDS] [HBM_BUDGET]   (prints JSON lines)
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${1:?usage: bench/run_hbm.sh PACK [REPEATS] [SECONDS] [HBM_BUDGET]}
REPEATS=${2:-3}
SECS=${3:-5}
BUDGET=${4:-256M}
BIN=${BUILD_DIR:-build}
OUT=$(mktemp -d)
trap 'for p in ${PLAIN:-} ${HBM:-}; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$OUT"' EXIT
start() {  # NAME EXTRA_FLAGS...
  local name=$1
  shift
  "$BIN/service/engramd" --pack "$PACK" --listen 127.0.0.1:0 --metrics-listen off --socket "$OUT/$name.sock" \
    --ports-file "$OUT/$name.json" "$@" >"$OUT/$name.log" 2>&1 &
}
start plain
PLAIN=$!
start hbm --hbm-budget "$BUDGET" --hbm-store host
HBM=$!
for name in plain hbm; do
  for _ in $(seq 1 1200); do [ -f "$OUT/$name.json" ] && break; sleep 0.1; done
  [ -f "$OUT/$name.json" ] || { echo "engramd ($name) did not start:" >&2; cat "$OUT/$name.log" >&2; exit 1; }
done
TABLE=$(sed -nE 's/.*"name": "([^"]+)".*/\1/p' "$PACK/manifest.json" | head -1)
B="$BIN/bench/engram-bench --json --workload zipf:1.0 --duration $SECS --warmup 2 --table $TABLE --mapped"
$B --target "unix://$OUT/hbm.sock" --batch-tokens 4096 >/dev/null  # warms the tier up, discarded
for _ in $(seq 1 "$REPEATS"); do
  for name in plain hbm; do
    $B --target "unix://$OUT/$name.sock" --batch-tokens 1 | sed "s/}\$/,\"daemon\":\"$name\"}/"
    $B --target "unix://$OUT/$name.sock" --batch-tokens 4096 | sed "s/}\$/,\"daemon\":\"$name\"}/"
  done
done
