#!/usr/bin/env bash
# The Engram module on the CPU: the CPU twin (engram-bench module) and PyTorch
# (bench/torch_module.py, Debian's python3-torch) with the same shapes and threads, interleaved,
# REPEATS rounds. Shapes: the reference demo's sizes (G=4, D=1024, M=1024, dilation 3) at prefill
# and decode batch shapes; with VARIANT=dsv41, DeepSeek-V4.1's module at V4.1-Flash's sizes (4 streams,
# D=5120, M=6144) at prefill and decode shapes. Prints JSON lines.
# Usage: [VARIANT=demo|dsv41] bench/run_module.sh [REPEATS] [SECONDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${1:-3}
SECS=${2:-3}
THREADS=${3:-2}
BIN=${BUILD_DIR:-build}
VARIANT=${VARIANT:-demo}
SHAPES=("1 512" "4 128" "64 1" "1 1")
[ "$VARIANT" = dsv41 ] && SHAPES=("1 256" "32 1" "1 1")
for r in $(seq 1 "$REPEATS"); do
  for shape in "${SHAPES[@]}"; do
    set -- $shape
    "$BIN/bench/engram-bench" module --variant "$VARIANT" --json --batch "$1" --seq-len "$2" --threads "$THREADS" \
      --duration "$SECS"
    /usr/bin/python3 bench/torch_module.py --variant "$VARIANT" --batch "$1" --seq-len "$2" --threads "$THREADS" \
      --duration "$SECS"
  done
done
