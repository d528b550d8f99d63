#!/usr/bin/env bash
# Runs the walking-skeleton benchmark matrix and prints one JSON line per run, then a median
# table. In-process runs carry the memcpy ceiling measured in the same process, same threads.
#   bench/run_matrix.sh PACK_DIR [REPEATS] [SECONDS]
# The pack is served by a fresh engramd on loopback for the gRPC runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${1:?usage: bench/run_matrix.sh PACK_DIR [REPEATS] [SECONDS]}
REPEATS=${2:-3}
SECS=${3:-5}
BIN=${BUILD_DIR:-build}
TRACE=tests/data/fortunes.deepseek_v3.i32
OUT=$(mktemp -d)
trap 'kill -TERM ${DAEMON:-0} 2>/dev/null || true; rm -rf "$OUT"' EXIT

"$BIN/service/engramd" --pack "$PACK" --listen 127.0.0.1:0 --metrics-listen off --ports-file "$OUT/ports.json" \
  >"$OUT/engramd.log" 2>&1 &
DAEMON=$!
for _ in $(seq 1 1200); do [ -f "$OUT/ports.json" ] && break; sleep 0.1; done
PORT=$(sed -E 's/.*"grpc_port": ([0-9]+).*/\1/' "$OUT/ports.json")

TABLE=$(sed -nE 's/.*"name": "([^"]+)".*/\1/p' "$PACK/manifest.json" | head -1)
# A discarded warm-up: the first seconds after start-up show gRPC stalls that later runs do not.
"$BIN/bench/engram-bench" --target "grpc://127.0.0.1:$PORT" --table "$TABLE" --duration "$SECS" >/dev/null

for r in $(seq 1 "$REPEATS"); do
  for workload in zipf:1.0 "trace:$TRACE"; do
    "$BIN/bench/engram-bench" --json --target inproc --pack "$PACK" --workload "$workload" --batch-tokens 4096 \
      --duration "$SECS" | tee -a "$OUT/runs.jsonl"
    "$BIN/bench/engram-bench" --json --target "grpc://127.0.0.1:$PORT" --table "$TABLE" \
      --workload "$workload" --batch-tokens 4096 --duration "$SECS" | tee -a "$OUT/runs.jsonl"
  done
done

/usr/bin/python3 - "$OUT/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
keys = sorted({(r["target"], r["workload"].split("/")[-1]) for r in runs})
print("\n| target | workload | rows/s (median) | p99 per batch, us | memcpy ceiling rows/s | engine / ceiling |")
print("| --- | --- | --- | --- | --- | --- |")
for t, w in keys:
    rs = [r for r in runs if r["target"] == t and r["workload"].split("/")[-1] == w]
    med = lambda k: statistics.median(r[k] for r in rs)
    ceiling = "%.3g" % med("ceiling_rows_per_s") if "ceiling_rows_per_s" in rs[0] else "-"
    ratio = "%.0f%%" % (100 * med("ratio_to_ceiling")) if "ratio_to_ceiling" in rs[0] else "-"
    print("| %s | %s | %.3g | %.0f | %s | %s |" % (t, w, med("rows_per_s"), med("p99_us"), ceiling, ratio))
PY
