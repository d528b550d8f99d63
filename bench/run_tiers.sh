#!/usr/bin/env bash
# Issue 3's benchmarks, each comparison measured back to back in this run, REPEATS times:
#   1. NVMe tier vs fio: uniform rows, no DRAM cache (every lookup misses), queue depth 64,
#      4 KiB direct reads of the same layer file with io_uring.
#   2. engramd's tiers vs RocksDB MultiGet: the same rows, the same DRAM budget (1/5 of the pack).
#   3. Prefetch: step mode, pack 5x the DRAM budget, 2 ms of compute per layer, with and without.
#   4. Cache simulator on the fortunes trace at 1% and 10% (deterministic: run once).
# Usage: bench/run_tiers.sh FULL_PACK SMALL_PACK [REPEATS] [SECONDS]
# (SMALL_PACK is loaded into RocksDB under /tmp on first use.) Prints JSON lines.
# SECTIONS="nvme rocksdb prefetch simulate" picks what runs (default: all). The shared virtual disk
# here varies by tens of percent from run to run, so each comparison is interleaved and repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
FULL=${1:?usage: bench/run_tiers.sh FULL_PACK SMALL_PACK [REPEATS] [SECONDS]}
SMALL=${2:?usage: bench/run_tiers.sh FULL_PACK SMALL_PACK [REPEATS] [SECONDS]}
REPEATS=${3:-3}
SECS=${4:-10}
BENCH=${BUILD_DIR:-build}/bench/engram-bench
TRACE=tests/data/fortunes.deepseek_v3.i32
bytes() { sed -nE 's/.*"bytes": ([0-9]+).*/\1/p' "$1/manifest.json" | head -1; }
pack_bytes() { local t=0; for f in "$1"/layer-*.rows; do t=$((t + $(stat -c %s "$f"))); done; echo $t; }
FIFTH_FULL=$(( $(pack_bytes "$FULL") / 5 ))
FIFTH_SMALL=$(( $(pack_bytes "$SMALL") / 5 ))
# fio reads the same files the engine does (all layers; fio takes them colon-separated): on a
# virtual disk the host may cache a single smaller file, which flatters fio.
LAYER_FILES=$(ls "$FULL"/layer-*.rows | paste -sd:)

SECTIONS=${SECTIONS:-nvme rocksdb prefetch simulate}
on() { [[ " $SECTIONS " == *" $1 "* ]]; }
fio_json() {  # extra fio flags...; prints one JSON line
  fio --name=fio-randread --filename="$LAYER_FILES" --rw=randread --bs=4k --direct=1 --ioengine=io_uring \
      --iodepth=64 "$@" --runtime="$SECS" --time_based --output-format=json 2>/dev/null |
    /usr/bin/python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["read"]; print(json.dumps({"tool":"fio","batched":len(sys.argv)>1,"iops":j["iops"],"p99_us":j["clat_ns"]["percentile"]["99.000000"]/1000,"bs":4096,"iodepth":64}))' "$@"
}

on nvme && for r in $(seq 1 "$REPEATS"); do
  fio_json
  fio_json --iodepth_batch_submit=64 --iodepth_batch_complete_min=1 --iodepth_batch_complete_max=64
  "$BENCH" --json --target inproc --pack "$FULL" --dram-budget 0 --nvme-queue-depth 64 --workload zipf:0 \
      --batch-tokens 512 --duration "$SECS" 2>/dev/null
done
on rocksdb && for r in $(seq 1 "$REPEATS"); do
  for w in zipf:1.0 "trace:$TRACE"; do
    "$BENCH" --json --target inproc --pack "$SMALL" --dram-budget "$FIFTH_SMALL" --workload "$w" --batch-tokens 512 \
        --duration "$SECS" 2>/dev/null
    "$BENCH" --json --target rocksdb --pack "$SMALL" --rocksdb-dir /tmp/engram-bench-rocksdb --dram-budget "$FIFTH_SMALL" \
        --workload "$w" --batch-tokens 512 --duration "$SECS" 2>/dev/null
  done
done
# Prefetch, in two regimes, over the trace's windows in order (their rows exceed the cache, so
# steps stall on NVMe unless their rows were prefetched):
#   io-bound: 256-token batches, 2 ms of compute per layer (each step needs ~8k cold reads)
#   overlap:  64-token batches, 5 ms of compute per layer (compute long enough to hide reads)
on prefetch && for r in $(seq 1 "$REPEATS"); do
  for regime in "256 2000 5132" "64 5000 20000"; do
    set -- $regime
    for p in --no-prefetch-layers --prefetch-layers; do
      "$BENCH" --json --target inproc --pack "$FULL" --dram-budget "$FIFTH_FULL" --workload "trace:$TRACE" \
          --batch-tokens "$1" --batches "$3" --compute-window-us "$2" $p --duration "$SECS" 2>/dev/null
    done
  done
done
on simulate && for c in 1% 10%; do
  "$BENCH" simulate --json --pack "$FULL" --tokens "$TRACE" --policy all --capacity "$c"
done
