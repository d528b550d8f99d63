#!/usr/bin/env bash
# From a fresh clone to a served table: installs what is missing, builds, makes a demo pack,
# starts engramd on loopback, load-tests it with engram-bench for a few seconds, shows the
# results and a few metrics, and stops the daemon.
#   QUICKSTART_DIR   where the demo pack goes      (default /tmp/engram-quickstart)
#   QUICKSTART_SCALE demo-v1 table size factor     (default 0.1: ~265 MB; 1.0 is the full ~2.6 GB)
#   BENCH_SECONDS    seconds per bench run          (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${QUICKSTART_DIR:-/tmp/engram-quickstart}
SCALE=${QUICKSTART_SCALE:-0.1}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
BUILD_DIR=${BUILD_DIR:-build}

step() { printf '\n== %s\n' "$*"; }

step "dependencies"
deploy/install-deps.sh

step "build ($BUILD_DIR)"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)" --target engramd engramctl engram-bench
BIN=$ROOT/$BUILD_DIR

PACK=$DIR/demo-v1-scale$SCALE
mkdir -p "$DIR"
if [ -f "$PACK/manifest.json" ] && "$BIN/service/engramctl" pack verify "$PACK" --sample-rows 4 >/dev/null 2>&1; then
  step "demo pack already at $PACK (verified)"
else
  step "create the demo-v1 pack (scale $SCALE) at $PACK"
  "$BIN/service/engramctl" pack create --preset demo-v1 --scale "$SCALE" --out "$PACK" --force --quiet
fi
"$BIN/service/engramctl" pack info "$PACK" | sed -n '1,4p'

step "start engramd"
PORTS=$DIR/ports.json
LOG=$DIR/engramd.log
rm -f "$PORTS"
"$BIN/service/engramd" --pack "$PACK" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --ports-file "$PORTS" \
  --socket "$DIR/engramd.sock" >"$LOG" 2>&1 &
DAEMON=$!
trap 'kill -TERM $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  [ -f "$PORTS" ] && break
  kill -0 $DAEMON 2>/dev/null || { cat "$LOG"; echo "engramd failed to start" >&2; exit 1; }
  sleep 0.1
done
[ -f "$PORTS" ] || { cat "$LOG"; echo "engramd did not become ready" >&2; exit 1; }
GRPC_PORT=$(sed -E 's/.*"grpc_port": ([0-9]+).*/\1/' "$PORTS")
METRICS_PORT=$(sed -E 's/.*"metrics_port": ([0-9]+).*/\1/' "$PORTS")
SOCKET=$(sed -E 's/.*"socket": "([^"]*)".*/\1/' "$PORTS")
cat "$LOG"
echo "readyz: $(curl -s "http://127.0.0.1:$METRICS_PORT/readyz")"

step "engram-bench over gRPC: Zipf(1.0) row draws, 4096-token batches, ${SECONDS_PER_RUN}s"
"$BIN/bench/engram-bench" --target "grpc://127.0.0.1:$GRPC_PORT" --table demo --workload zipf:1.0 \
  --batch-tokens 4096 --duration "$SECONDS_PER_RUN"

step "engram-bench over gRPC: real text (fortunes, DeepSeek-V3 tokens) hashed client-side, 512-token batches"
"$BIN/bench/engram-bench" --target "grpc://127.0.0.1:$GRPC_PORT" --table demo \
  --workload "trace:$ROOT/tests/data/fortunes.deepseek_v3.i32" --batch-tokens 512 --duration "$SECONDS_PER_RUN"

step "engram-bench over shared memory ($SOCKET): one-token lookups, the latency an engine sees per step"
"$BIN/bench/engram-bench" --target "unix://$SOCKET" --table demo --workload zipf:1.0 --batch-tokens 1 \
  --duration "$SECONDS_PER_RUN"

step "the same one-token lookups from the table mapped read-only into the client (no round trip)"
"$BIN/bench/engram-bench" --target "unix://$SOCKET" --table demo --workload zipf:1.0 --batch-tokens 1 \
  --duration "$SECONDS_PER_RUN" --mapped

step "engram-bench in-process (no transport), with the memcpy ceiling beside it"
"$BIN/bench/engram-bench" --target inproc --pack "$PACK" --workload zipf:1.0 --batch-tokens 4096 \
  --duration "$SECONDS_PER_RUN"

step "a few metrics from http://127.0.0.1:$METRICS_PORT/metrics"
curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^engram_(requests_total|rows_served_total|mapped_rows_total|tables_loaded|tier_enabled)' || true

step "stop engramd"
kill -TERM $DAEMON
wait $DAEMON || true
trap - EXIT
tail -2 "$LOG"
echo
echo "Done. Pack: $PACK   Logs: $LOG"
