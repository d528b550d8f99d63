#!/usr/bin/env bash
# Sets up what is missing, builds, and runs every test; the exit code is the verdict.
#   tests/run.sh            everything (unit, integration with a real engramd, Python grpcio peer)
#   tests/run.sh -L unit    pass-through arguments go to ctest
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DENGRAM_TESTS=ON -DENGRAM_BENCH=ON
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j 2 --timeout 600 "$@"
