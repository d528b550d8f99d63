#!/usr/bin/env bash
# Bulk replies over gRPC against the loopback socket's ceiling, interleaved REPEATS rounds: one
# engramd serving a demo-v1 pack (bf16, 1% scale, resident), `engram-bench --target grpc://`
# with 4096-token batches (16 heads x 128-byte rows: 8 MiB replies), one request in flight, and
# `engram-bench socket` moving replies of the same size over one loopback TCP connection the same
# way. Prints JSON lines; the ratio per round is grpc bytes_per_s / socket bytes_per_s.
# Usage: bench/run_grpc_bulk.sh [REPEATS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${1:-5}
SECS=${2:-3}
BIN=${BUILD_DIR:-build}
WORK=$(mktemp -d)
trap 'kill $(cat "$WORK/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$BIN/service/engramctl" pack create --preset demo-v1 --scale 0.01 --name bulk --quiet --out "$WORK/pack" >/dev/null
"$BIN/service/engramd" --pack "$WORK/pack" --listen 127.0.0.1:0 --metrics-listen off --ports-file "$WORK/ports" \
  >"$WORK/log" 2>&1 &
echo $! >"$WORK/pid"
for _ in $(seq 100); do [ -s "$WORK/ports" ] && break; sleep 0.1; done
PORT=$(sed -E 's/.*"grpc_port": ([0-9]+).*/\1/' "$WORK/ports")
BYTES=$((4096 * 16 * 128))
"$BIN/bench/engram-bench" --target "grpc://127.0.0.1:$PORT" --table bulk --duration 1 --json >/dev/null  # warm-up
for r in $(seq 1 "$REPEATS"); do
  if [ $((r % 2)) = 1 ]; then
    "$BIN/bench/engram-bench" socket --bytes "$BYTES" --duration "$SECS" --json
    "$BIN/bench/engram-bench" --target "grpc://127.0.0.1:$PORT" --table bulk --batch-tokens 4096 --duration "$SECS" --json
  else
    "$BIN/bench/engram-bench" --target "grpc://127.0.0.1:$PORT" --table bulk --batch-tokens 4096 --duration "$SECS" --json
    "$BIN/bench/engram-bench" socket --bytes "$BYTES" --duration "$SECS" --json
  fi
done
