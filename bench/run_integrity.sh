#!/usr/bin/env bash
# The integrity issue's benchmarks, every comparison interleaved in one run, REPEATS rounds:
#   transports  one-token shm round trips and 4096-token shm vs in-process, BEFORE vs AFTER binaries
#   scrape      one-token shm round trips with and without a scraper reading /metrics every 10 ms
#   nvme        NVMe-backed lookups (DRAM cache a fifth of the pack), BEFORE vs AFTER binaries
#   checksums   device reads with no DRAM cache, the pack with block checksums vs the same row files
#               under a manifest without them (AFTER binaries)
# Usage: bench/run_integrity.sh BEFORE_BUILD AFTER_BUILD PACK [REPEATS] [SECONDS]
#   BEFORE_BUILD/AFTER_BUILD: build directories holding service/engramd and bench/engram-bench
#   (e.g. a build of the commit before the change, and build/). Prints JSON lines, each tagged
#   with "case" and "build". SECTIONS="transports scrape nvme checksums" picks what runs.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:?usage: bench/run_integrity.sh BEFORE_BUILD AFTER_BUILD PACK [REPEATS] [SECONDS]}
AFTER=${2:?usage: bench/run_integrity.sh BEFORE_BUILD AFTER_BUILD PACK [REPEATS] [SECONDS]}
PACK=${3:?usage: bench/run_integrity.sh BEFORE_BUILD AFTER_BUILD PACK [REPEATS] [SECONDS]}
REPEATS=${4:-3}
SECS=${5:-5}
SECTIONS=${SECTIONS:-transports scrape nvme checksums}
on() { [[ " $SECTIONS " == *" $1 "* ]]; }
OUT=$(mktemp -d)
DAEMON=0
SCRAPER=0
cleanup() {
  kill "$SCRAPER" 2>/dev/null || true
  kill -TERM "$DAEMON" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$OUT"
}
trap cleanup EXIT
TABLE=$(sed -nE 's/.*"name": "([^"]+)".*/\1/p' "$PACK/manifest.json" | head -1)
pack_bytes() { local t=0; for f in "$1"/layer-*.rows; do t=$((t + $(stat -c %s "$f"))); done; echo $t; }
FIFTH=$(( $(pack_bytes "$PACK") / 5 ))
tag() { sed "s/}\$/,\"case\":\"$1\",\"build\":\"$2\"}/"; }

start_daemon() {  # BUILD [flags...]: engramd on loopback and a socket of its own
  local build=$1
  shift
  rm -f "$OUT/ports.json"
  "$build/service/engramd" --pack "$PACK" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --socket "$OUT/engramd.sock" --ports-file "$OUT/ports.json" "$@" >"$OUT/engramd.log" 2>&1 &
  DAEMON=$!
  for _ in $(seq 1 1200); do [ -f "$OUT/ports.json" ] && break; sleep 0.1; done
  [ -f "$OUT/ports.json" ] || { cat "$OUT/engramd.log" >&2; exit 1; }
  METRICS_PORT=$(sed -E 's/.*"metrics_port": ([0-9]+).*/\1/' "$OUT/ports.json")
}
stop_daemon() {
  kill -TERM "$DAEMON" 2>/dev/null || true
  wait "$DAEMON" 2>/dev/null || true
  DAEMON=0
}

on transports && for r in $(seq 1 "$REPEATS"); do
  for which in before after; do
    build=$BEFORE
    [ "$which" = after ] && build=$AFTER
    B="$build/bench/engram-bench --json --workload zipf:1.0 --duration $SECS"
    start_daemon "$build"
    $B --target "unix://$OUT/engramd.sock" --table "$TABLE" --batch-tokens 1 | tag shm_1 "$which"
    $B --target "unix://$OUT/engramd.sock" --table "$TABLE" --batch-tokens 4096 | tag shm_4096 "$which"
    $B --target inproc --pack "$PACK" --batch-tokens 4096 --no-ceiling --no-share-tables 2>/dev/null |
      tag inproc_4096 "$which"
    stop_daemon
  done
done

# One scraper process (no process start per scrape): GET PATH every 10 ms for SECONDS, bounded.
scrape_loop() {  # PATH SECONDS
  /usr/bin/python3 -c '
import http.client, sys, time
port, path, secs = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
end = time.monotonic() + secs
while time.monotonic() < end:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    c.request("GET", path)
    c.getresponse().read()
    c.close()
    time.sleep(0.01)
' "$METRICS_PORT" "$1" "$2" &
  SCRAPER=$!
}
on scrape && {
  start_daemon "$AFTER"
  B="$AFTER/bench/engram-bench --json --workload zipf:1.0 --duration $SECS"
  for r in $(seq 1 "$REPEATS"); do
    $B --target "unix://$OUT/engramd.sock" --table "$TABLE" --batch-tokens 1 | tag shm_1_quiet after
    # The same scraper on /healthz (no exposition rendered): what a second busy process costs on
    # this 2-core machine, apart from anything engramd's metrics do.
    for path in healthz metrics; do
      scrape_loop "/$path" $((SECS + 3))
      $B --target "unix://$OUT/engramd.sock" --table "$TABLE" --batch-tokens 1 | tag "shm_1_scraped_$path" after
      kill "$SCRAPER" 2>/dev/null || true
      wait "$SCRAPER" 2>/dev/null || true
      SCRAPER=0
    done
  done
  stop_daemon
}

# The same row files under a manifest without block checksums (served unverified).
BARE="$OUT/bare-pack"
mkdir -p "$BARE"
for f in "$PACK"/*; do
  case "$f" in *.xxh3|*/manifest.json) ;; *) ln -s "$(readlink -f "$f")" "$BARE/" ;; esac
done
/usr/bin/python3 -c '
import json, sys
m = json.load(open(sys.argv[1]))
for layer in m["layers"]:
    layer.pop("block_checksums", None)
json.dump(m, open(sys.argv[2], "w"), indent=2)
' "$PACK/manifest.json" "$BARE/manifest.json"

# NVMe-backed with a DRAM cache: before, after (block checks on), and after without block
# checksums (what the contract fix alone costs).
on nvme && for r in $(seq 1 "$REPEATS"); do
  for which in before after after_unverified; do
    build=$BEFORE
    pack=$PACK
    [ "$which" != before ] && build=$AFTER
    [ "$which" = after_unverified ] && pack=$BARE
    "$build/bench/engram-bench" --json --target inproc --pack "$pack" --dram-budget "$FIFTH" --workload zipf:1.0 \
      --batch-tokens 512 --duration "$SECS" 2>/dev/null | tag nvme_cached "$which"
  done
done

on checksums && for r in $(seq 1 "$REPEATS"); do
  for p in "$PACK" "$BARE"; do
    which=verified
    [ "$p" = "$BARE" ] && which=unverified
    "$AFTER/bench/engram-bench" --json --target inproc --pack "$p" --dram-budget 0 --workload zipf:0 \
      --batch-tokens 512 --duration "$SECS" 2>/dev/null | tag nvme_nocache "$which"
  done
done
