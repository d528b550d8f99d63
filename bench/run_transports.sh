#!/usr/bin/env bash
# Transports side by side, interleaved, REPEATS times: one-token batches (latency) over shared
# memory (through the ring, and gathered from the mapped table) and gRPC, and 4096-token batches
# (throughput) in-process (rows in anonymous memory, and in the shared memfd engramd maps to
# clients), over shared memory, from the mapped table (1 and 2 client threads) and gRPC.
# Usage: bench/run_transports.sh PACK [REPEATS] [SECONDS]   (prints JSON lines)
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${1:?usage: bench/run_transports.sh PACK [REPEATS] [SECONDS]}
REPEATS=${2:-3}
SECS=${3:-5}
BIN=${BUILD_DIR:-build}
OUT=$(mktemp -d)
trap 'kill -TERM ${DAEMON:-0} 2>/dev/null || true; rm -rf "$OUT"' EXIT
"$BIN/service/engramd" --pack "$PACK" --listen 127.0.0.1:0 --metrics-listen off --socket "$OUT/engramd.sock" \
  --ports-file "$OUT/ports.json" >"$OUT/engramd.log" 2>&1 &
DAEMON=$!
for _ in $(seq 1 1200); do [ -f "$OUT/ports.json" ] && break; sleep 0.1; done
PORT=$(sed -E 's/.*"grpc_port": ([0-9]+).*/\1/' "$OUT/ports.json")
TABLE=$(sed -nE 's/.*"name": "([^"]+)".*/\1/p' "$PACK/manifest.json" | head -1)
B="$BIN/bench/engram-bench --json --workload zipf:1.0 --duration $SECS"
$B --target "grpc://127.0.0.1:$PORT" --table "$TABLE" >/dev/null  # warm-up, discarded
for r in $(seq 1 "$REPEATS"); do
  $B --target "unix://$OUT/engramd.sock" --table "$TABLE" --batch-tokens 1
  $B --target "unix://$OUT/engramd.sock" --table "$TABLE" --batch-tokens 1 --mapped
  $B --target "grpc://127.0.0.1:$PORT" --table "$TABLE" --batch-tokens 1
  $B --target inproc --pack "$PACK" --batch-tokens 4096 --no-ceiling --no-share-tables 2>/dev/null | sed 's/}$/,"rows_in":"anonymous"}/'
  $B --target inproc --pack "$PACK" --batch-tokens 4096 --no-ceiling --share-tables 2>/dev/null | sed 's/}$/,"rows_in":"memfd"}/'
  $B --target "unix://$OUT/engramd.sock" --table "$TABLE" --batch-tokens 4096
  $B --target "unix://$OUT/engramd.sock" --table "$TABLE" --batch-tokens 4096 --mapped
  $B --target "unix://$OUT/engramd.sock" --table "$TABLE" --batch-tokens 4096 --mapped --concurrency 2
  $B --target "grpc://127.0.0.1:$PORT" --table "$TABLE" --batch-tokens 4096
done
