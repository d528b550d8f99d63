#!/usr/bin/env bash
# The `engram` Python package against the C++ client on the same daemon, interleaved REPEATS
# rounds: one-token lookups over unix:// (mapped table, and through the arena), and 4096-token
# lookups into a preallocated torch tensor vs the C++ mapped path. A demo-v1 pack (bf16, 1%
# scale, resident) served by a fresh engramd on a temporary socket. Prints JSON lines.
# Usage: bench/run_python.sh [REPEATS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${1:-3}
SECS=${2:-3}
BIN=${BUILD_DIR:-build}
WORK=$(mktemp -d)
trap 'kill $(cat "$WORK/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$BIN/service/engramctl" pack create --preset demo-v1 --scale 0.01 --name bdemo --quiet --out "$WORK/pack" >/dev/null
"$BIN/service/engramd" --pack "$WORK/pack" --listen 127.0.0.1:0 --metrics-listen off --socket "$WORK/s.sock" \
  --ports-file "$WORK/ports" >"$WORK/log" 2>&1 &
echo $! >"$WORK/pid"
for _ in $(seq 100); do [ -f "$WORK/ports" ] && break; sleep 0.1; done
export ENGRAM_PYTHONPATH="$BIN/python"
CPP=("$BIN/bench/engram-bench" --target "unix://$WORK/s.sock" --table bdemo --duration "$SECS" --json)
PY=(/usr/bin/python3 bench/py_lookup.py --daemon "unix://$WORK/s.sock" --table bdemo --pack "$WORK/pack"
    --duration "$SECS")
# Each pair runs in both orders over the rounds (the machine is shared: whichever runs second in a
# pair would otherwise always meet the same neighbours).
pair() {  # CPP_ARGS... -- PY_ARGS...
  local cpp=() py=()
  while [ "$1" != "--" ]; do cpp+=("$1"); shift; done
  shift
  py=("$@")
  if [ $((r % 2)) = 1 ]; then "${CPP[@]}" "${cpp[@]}"; "${PY[@]}" "${py[@]}"; else "${PY[@]}" "${py[@]}"; "${CPP[@]}" "${cpp[@]}"; fi
}
for r in $(seq 1 "$REPEATS"); do
  pair --batch-tokens 1 --mapped -- --batch-tokens 1
  pair --batch-tokens 1 -- --batch-tokens 1 --no-map
  pair --batch-tokens 4096 --mapped -- --batch-tokens 4096 --out torch
  pair --batch-tokens 4096 --mapped --workload zipf:0 -- --batch-tokens 4096 --out torch --workload zipf:0
done
