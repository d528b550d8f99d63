#!/usr/bin/env bash
# DeepSeek-V4.1's shape in step mode: a dsv41-flash pack (layers 1 and 14, 24 heads of 264-byte fp8
# rows) 5x its DRAM budget, the fortunes trace, decode batches of 1, 8 and 64 sequences (one token
# each per step), COMPUTE_US of compute after each layer's lookup; with and without prefetching
# layer 14's rows when the step starts; interleaved REPEATS times. Prints JSON lines.
#   bench/run_dsv41_steps.sh [SCALE] [REPEATS] [SECONDS] [COMPUTE_US]
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-0.005}
REPEATS=${2:-3}
SECS=${3:-8}
COMPUTE=${4:-5000}
BIN=${BUILD_DIR:-build}
PACK=${PACK_DIR:-/tmp/engram-dsv41-steps-$SCALE}
if [ ! -f "$PACK/manifest.json" ]; then
  "$BIN/service/engramctl" pack create --preset dsv41-flash --scale "$SCALE" --quiet --out "$PACK" >&2
fi
bytes=$(du -sb "$PACK" | cut -f1)
budget=$((bytes / 5))
echo "{\"pack\":\"$PACK\",\"pack_bytes\":$bytes,\"dram_budget\":$budget}"
for _ in $(seq 1 "$REPEATS"); do
  for batch in 1 8 64; do
    for prefetch in --no-prefetch-layers --prefetch-layers; do
      "$BIN/bench/engram-bench" --json --target inproc --pack "$PACK" --dram-budget "$budget" \
        --workload trace:tests/data/fortunes.deepseek_v3.i32 --batch-tokens "$batch" --duration "$SECS" \
        --compute-window-us "$COMPUTE" $prefetch --no-ceiling 2>/dev/null
    done
  done
done
