#!/usr/bin/env bash
# /readyz probe latency, quiet and with IDLE idle connections held on the metrics port, against
# this build's engramd and, when given, another engramd binary (e.g. one built before the metrics
# port got its guard), interleaved REPEATS times. Usage:
#   bench/run_health.sh PACK [REPEATS] [IDLE] [OTHER_ENGRAMD]   (prints JSON lines)
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${1:?usage: bench/run_health.sh PACK [REPEATS] [IDLE] [OTHER_ENGRAMD]}
REPEATS=${2:-3}
IDLE=${3:-500}
OTHER=${4:-}
BIN=${BUILD_DIR:-build}
OUT=$(mktemp -d)
trap 'kill -TERM ${DAEMON:-0} 2>/dev/null || true; rm -rf "$OUT"' EXIT
run() {  # run ENGRAMD LABEL
  rm -f "$OUT/ports.json"
  "$1" --pack "$PACK" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --socket "$OUT/engramd.sock" \
    --ports-file "$OUT/ports.json" >"$OUT/engramd.log" 2>&1 &
  DAEMON=$!
  for _ in $(seq 1 1200); do [ -f "$OUT/ports.json" ] && break; sleep 0.1; done
  local port
  port=$(sed -E 's/.*"metrics_port": ([0-9]+).*/\1/' "$OUT/ports.json")
  timeout 300 "$BIN/bench/engram-bench" health --json --metrics "127.0.0.1:$port" --idle "$IDLE" --probes 50 \
    --rounds 2 | sed "s/}\$/,\"engramd\":\"$2\"}/" || echo "{\"engramd\":\"$2\",\"error\":\"bench failed or timed out\"}"
  kill -TERM $DAEMON; wait $DAEMON || true
}
for _ in $(seq 1 "$REPEATS"); do
  run "$BIN/service/engramd" this
  [ -n "$OTHER" ] && run "$OTHER" other
done
