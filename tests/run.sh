#!/usr/bin/env bash
# Sets up what is missing, builds, and runs every test; the exit code is the verdict.
#   tests/run.sh            everything: unit, integration with a real engramd, the Python grpcio
#                           peer; the Debian packages built, installed and removed; then all the
#                           tests again built with AddressSanitizer + UBSan
#   tests/run.sh -L unit    pass-through arguments go to ctest (both stages)
#   ENGRAM_SKIP_ASAN=1      no sanitizer stage
#   ENGRAM_SKIP_DEB=1       no Debian package stage (it installs the packages on this machine, as
#                           root, then removes them)
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh --tests
JOBS=${JOBS:-$(nproc)}

echo "== formatting (the files tests/format_files.txt lists)"
tests/check_format.sh

echo "== stage 1: RelWithDebInfo build and tests"
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DENGRAM_TESTS=ON -DENGRAM_BENCH=ON
cmake --build "$BUILD_DIR" -j "$JOBS"
if [ -f "$BUILD_DIR/kernels/libengram_kernels_cuda.a" ]; then
  kernels/cuda/resource_usage.sh "$BUILD_DIR" sm_90  # registers and spills per kernel; fails on a spill
fi
ctest --test-dir "$BUILD_DIR" --output-on-failure -j 2 --timeout 600 "$@"
if [ -x "$BUILD_DIR/tests/engram_gpu_tests" ]; then
  set +e
  gpu_out=$("$BUILD_DIR/tests/engram_gpu_tests" 2>&1)
  gpu_rc=$?
  set -e
  if [ "$gpu_rc" = 77 ]; then echo "GPU tests (label gpu) skipped, not passed: ${gpu_out%%$'\n'*}"; fi
fi

if [ "${ENGRAM_SKIP_DEB:-0}" != "1" ]; then
  echo "== the Debian packages: build (deploy/make-deb.sh), install, serve, remove"
  if [ "$(id -u)" != 0 ]; then
    echo "Debian package test skipped, not passed: it installs packages and needs root"
  else
    deploy/make-deb.sh build-deb
    set +e
    tests/integration/deb_test.sh build-deb . "$BUILD_DIR"
    deb_rc=$?
    set -e
    if [ "$deb_rc" = 77 ]; then
      echo "Debian package test skipped, not passed (see its reason above)"
    elif [ "$deb_rc" != 0 ]; then
      exit "$deb_rc"
    fi
  fi
fi

if [ "${ENGRAM_SKIP_ASAN:-0}" != "1" ]; then
  echo "== stage 2: the same tests under AddressSanitizer + UndefinedBehaviorSanitizer"
  # CUDA off here: no device runs the kernels under the sanitizers, and stage 1 built them.
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DENGRAM_ASAN=ON -DENGRAM_TESTS=ON -DENGRAM_BENCH=ON \
    -DENGRAM_CUDA=OFF
  cmake --build build-asan -j "$JOBS"
  # Any report aborts the process that made it (the daemons too), so it fails its test.
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    ctest --test-dir build-asan --output-on-failure -j 2 --timeout 900 "$@"
fi
