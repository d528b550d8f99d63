#!/usr/bin/env bash
# The NVMe tier against fio on the same files, interleaved REPEATS rounds (issue 15, item 3):
# every lookup a device read (--dram-budget 0, uniform rows), queue depth 64, io_uring, O_DIRECT;
# engram-bench with one request in flight and with 4; fio's 4 KiB random reads in its default
# and its batched submission. Prints one JSON line per run (reads/s; engram's p50/p99 per batch,
# fio's per read).
# Usage: bench/run_nvme_fio.sh PACK [REPEATS] [SECONDS]   (a demo-v1 pack: engramctl pack create
# --preset demo-v1 --out PACK, 2.65 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${1:?usage: bench/run_nvme_fio.sh PACK [REPEATS] [SECONDS]}
REPEATS=${2:-5}
SECS=${3:-5}
BENCH=${BUILD_DIR:-build}/bench/engram-bench
command -v fio >/dev/null || { echo "fio is not installed (apt-get install fio)" >&2; exit 1; }
# fio reads the same files the engine does (all layers, colon-separated).
FILES=$(ls "$PACK"/layer-*.rows | paste -sd:)
fio_json() {  # NAME fio flags...
  local name=$1
  shift
  fio --name=randread --filename="$FILES" --rw=randread --bs=4k --direct=1 --ioengine=io_uring --iodepth=64 "$@" \
      --runtime="$SECS" --time_based --output-format=json 2>/dev/null |
    /usr/bin/python3 -c '
import json, sys
r = json.load(sys.stdin)["jobs"][0]["read"]
p = r["clat_ns"]["percentile"]
print(json.dumps({"tool": "fio", "mode": sys.argv[1], "reads_per_s": r["iops"], "p50_us_per_read": p["50.000000"] / 1e3,
                  "p99_us_per_read": p["99.000000"] / 1e3}))' "$name"
}
engram_json() {  # CONCURRENCY
  "$BENCH" --json --target inproc --pack "$PACK" --dram-budget 0 --nvme-queue-depth 64 --workload zipf:0 \
      --batch-tokens 512 --concurrency "$1" --duration "$SECS" 2>/dev/null |
    /usr/bin/python3 -c '
import json, sys
j = json.loads(sys.stdin.read())
print(json.dumps({"tool": "engram-bench", "mode": "in_flight_" + sys.argv[1], "reads_per_s": j["nvme_reads_per_s"],
                  "rows_per_s": j["rows_per_s"], "p50_us_per_batch": j["p50_us"], "p99_us_per_batch": j["p99_us"],
                  "rows_per_batch": j["rows_per_batch"]}))' "$1"
}
for r in $(seq 1 "$REPEATS"); do
  fio_json default
  engram_json 1
  fio_json batched --iodepth_batch_submit=64 --iodepth_batch_complete_min=1 --iodepth_batch_complete_max=64
  engram_json 4
done
