#!/usr/bin/env bash
# The device check, run on the GPU host from the unpacked bundle (tests/gpu/make_bundle.sh):
#   tar -xJf engram-gpu-bundle.tar.xz && engram-gpu-bundle/device_check.sh OUT_DIR
# About 2-3 minutes, every step under its own timeout. It writes OUT_DIR/summary.txt (PASS,
# FAIL, UNSUPPORTED and SKIP lines, then every FIGURE) and one log per step. What the host
# cannot do (io_uring under a sandboxing kernel, CUDA IPC, read-only host registration) is
# reported as UNSUPPORTED, apart from what failed. Exit 0 when nothing failed.
#   1. the host: kernel, driver, GPU;
#   2. engram_gpu_tests: every kernel and EngramLayer::Forward (both modules) against the CPU twin;
#   3. io_uring: engramd serving a table from its pack file with --nvme-io io_uring;
#   4. engramd with --hbm-store cuda on the GPU and engram_device_check beside it:
#      LookupToDevice (1 and 4096 tokens) checked against the formula while the hot set churns,
#      capabilities, and the copy figures beside their ceilings;
#   5. engram_device_check --module: DeepSeek-V4.1's module on the GPU, tokens/s at 4096 and 64
#      tokens beside cuBLAS's SGEMM of its projection.
set -uo pipefail
B=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: device_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
failed=0
say() { echo "$*" | tee -a "$SUMMARY"; }
pass() { say "PASS $*"; }
fail() { say "FAIL $*"; failed=1; }
unsupported() { say "UNSUPPORTED $*"; }
started=$(date +%s)
WORK=$(mktemp -d)
DAEMON=""
trap '[ -n "$DAEMON" ] && kill -TERM "$DAEMON" 2>/dev/null; rm -rf "$WORK"' EXIT
say "device_check: bundle $(cat "$B/COMMIT" 2>/dev/null), $(date -u +%FT%TZ)"

# 1. The host.
{
  uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv
  echo "CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}: $(ls "${CUDA_HOME:-/usr/local/cuda}"/lib*/libcublas.so.* 2>/dev/null | head -1)"
} >"$OUT/host.log" 2>&1
say "host: $(head -1 "$OUT/host.log" | cut -c1-100)"

# 2. The kernel tests.
NO_DEVICE=0
timeout 240 "$B/bin/engram_gpu_tests" >"$OUT/gpu_tests.log" 2>&1
rc=$?
case $rc in
  0) pass "engram_gpu_tests: $(tail -1 "$OUT/gpu_tests.log")" ;;
  77) say "SKIP engram_gpu_tests: $(head -1 "$OUT/gpu_tests.log")"; NO_DEVICE=1 ;;
  124) fail "engram_gpu_tests: timed out after 240 s" ;;
  *) fail "engram_gpu_tests: exit $rc: $(grep -m3 FAILED "$OUT/gpu_tests.log" | tr '\n' ' ')" ;;
esac

# A demo pack (synthetic rows: the formula checks every byte).
"$B/bin/engramctl" pack create --preset demo-v1 --scale 0.02 --quiet --out "$WORK/pack" >"$OUT/pack.log" 2>&1 ||
  fail "engramctl pack create: $(tail -1 "$OUT/pack.log")"

start_daemon() {  # NAME ARGS...: starts engramd, waits until ready; 0 when it is
  local name=$1
  shift
  rm -f "$WORK/ports.json"
  "$B/bin/engramd" --pack "$WORK/pack" --listen 127.0.0.1:0 --metrics-listen off --socket "$WORK/engramd.sock" \
    --ports-file "$WORK/ports.json" "$@" >"$OUT/$name.log" 2>&1 &
  DAEMON=$!
  for _ in $(seq 1 600); do
    [ -f "$WORK/ports.json" ] && return 0
    kill -0 "$DAEMON" 2>/dev/null || { DAEMON=""; return 1; }
    sleep 0.1
  done
  echo "device_check: engramd was not ready after 60 s" >>"$OUT/$name.log"
  kill -KILL "$DAEMON" 2>/dev/null
  wait "$DAEMON" 2>/dev/null
  DAEMON=""
  return 1
}
stop_daemon() {
  [ -n "$DAEMON" ] || return 0
  kill -TERM "$DAEMON"
  wait "$DAEMON"
  local rc=$?
  DAEMON=""
  return $rc
}

# 3. io_uring: the NVMe tier's reads (a 4 MB budget: the table is read from its file).
if start_daemon io_uring --dram-budget 4M --nvme-io io_uring; then
  timeout 60 "$B/bin/engram-bench" --target "unix://$WORK/engramd.sock" --table demo --duration 3 --batch-tokens 64 \
    --json >"$OUT/io_uring_bench.json" 2>>"$OUT/io_uring.log"
  if grep -q '"errors":0' "$OUT/io_uring_bench.json"; then
    pass "io_uring: NVMe-backed lookups, $(sed -E 's/.*"rows_per_s":([0-9.e+]+).*/\1/' "$OUT/io_uring_bench.json") rows/s"
  else
    fail "io_uring: lookups failed (io_uring_bench.json)"
  fi
  stop_daemon || fail "engramd (io_uring) did not exit cleanly"
elif grep -q "io_uring cannot be set up" "$OUT/io_uring.log"; then
  unsupported "io_uring: $(grep -m1 -o 'io_uring cannot be set up[^"]*' "$OUT/io_uring.log")"
else
  fail "engramd with --nvme-io io_uring did not start: $(tail -2 "$OUT/io_uring.log" | tr '\n' ' ')"
fi

# 4. The HBM tier on the GPU, and a client on the same GPU.
if [ "$NO_DEVICE" = 1 ]; then
  say "SKIP engramd --hbm-store cuda and engram_device_check: no CUDA device here"
elif start_daemon hbm_cuda --hbm-budget 256M --hbm-store cuda --hbm-step-ms 20; then
  timeout 200 "$B/bin/engram_device_check" "$WORK/pack" "unix://$WORK/engramd.sock" 30 >"$OUT/device_check.log" 2>&1
  rc=$?
  grep '^CAPABILITY' "$OUT/device_check.log" | while read -r _ cap value; do
    case "$cap" in
      host_register_read_only) [ "$value" = 1 ] && say "capability: read-only host registration" ||
        unsupported "read-only host registration (cudaDevAttrHostRegisterReadOnlySupported = 0)" ;;
      cuda_ipc) [ "$value" = 1 ] && say "capability: CUDA IPC" || unsupported "CUDA IPC: $value" ;;
      *) say "capability: $cap $value" ;;
    esac
  done
  case $rc in
    0) pass "engram_device_check: LookupToDevice rows exact, figures below" ;;
    124) fail "engram_device_check: timed out" ;;
    *) fail "engram_device_check: exit $rc: $(grep -m3 '^FAILED' "$OUT/device_check.log" | tr '\n' ' ')" ;;
  esac
  grep -m1 "event=hbm" "$OUT/hbm_cuda.log" >/dev/null && say "engramd HBM tier: $(grep -m1 'event=hbm' "$OUT/hbm_cuda.log" | cut -c1-160)"
  stop_daemon || fail "engramd (HBM on cuda) did not exit cleanly"
else
  if grep -qi "ipc" "$OUT/hbm_cuda.log"; then
    unsupported "engramd --hbm-store cuda: $(grep -m1 -i ipc "$OUT/hbm_cuda.log" | cut -c1-200)"
  else
    fail "engramd --hbm-store cuda did not start: $(tail -2 "$OUT/hbm_cuda.log" | tr '\n' ' ')"
  fi
fi

# 5. DeepSeek-V4.1's module on the GPU (no daemon): tokens/s beside the projection's SGEMM.
if [ "$NO_DEVICE" = 1 ]; then
  say "SKIP engram_device_check --module: no CUDA device here"
else
  timeout 120 "$B/bin/engram_device_check" --module 3 >"$OUT/module.log" 2>&1
  rc=$?
  case $rc in
    0) pass "engram_device_check --module: the V4.1 module ran on the GPU, output finite, figures below" ;;
    77) say "SKIP engram_device_check --module: $(head -1 "$OUT/module.log")" ;;
    124) fail "engram_device_check --module: timed out after 120 s" ;;
    *) fail "engram_device_check --module: exit $rc: $(grep -m3 '^FAILED' "$OUT/module.log" | tr '\n' ' ')" ;;
  esac
fi

say ""
grep -h '^FIGURE' "$OUT"/*.log 2>/dev/null | tee -a "$SUMMARY" >/dev/null
if [ "$failed" = 0 ] && [ "$NO_DEVICE" = 1 ]; then
  say "device_check: nothing failed, but there is no device: the GPU checks were skipped ($(($(date +%s) - started)) s)"
  exit 77
fi
say "device_check: $([ $failed = 0 ] && echo passed || echo FAILED) in $(($(date +%s) - started)) s"
exit $failed
