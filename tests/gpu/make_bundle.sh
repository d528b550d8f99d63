#!/usr/bin/env bash
# Packs what the device check runs into OUT_DIR/engram-gpu-bundle.tar.xz, for a GPU host that has
# only its NVIDIA driver and a CUDA 13 toolkit (no gRPC, abseil, RocksDB, liburing, civetweb,
# OpenBLAS, no package registry):
#   bin/       wrappers that start each program with the bundle's own loader and libraries
#   libexec/   the programs, stripped: engramd, engramctl, engram-bench, engram_gpu_tests,
#              engram_device_check
#   lib/       every shared library they load, the loader (ld-linux) and glibc included, except
#              the driver's libcuda and the toolkit's cuBLAS, cuBLASLt and cudart, which the host
#              provides ($CUDA_HOME, default /usr/local/cuda, and the driver's usual directories)
#   share/     the tokenizer lut; device_check.sh, the one command to run there
# Then it checks itself: unpacked elsewhere, every program starts with an empty environment from
# the bundle alone (here, without a GPU, the GPU test says "no device" and exits 77).
#   tests/gpu/make_bundle.sh OUT_DIR [BUILD_DIR]     BUILD_DIR (default build) must have CUDA on
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=$PWD
OUT=${1:?usage: tests/gpu/make_bundle.sh OUT_DIR [BUILD_DIR]}
BUILD=${2:-build}
[ -f "$BUILD/kernels/libengram_kernels_cuda.a" ] || {
  echo "make_bundle: $BUILD was not built with CUDA (configure with -DENGRAM_CUDA=ON and sm_80;sm_90)" >&2
  exit 77
}
for arch in 80 90; do
  grep -q "arch=compute_$arch" "$BUILD/build.ninja" ||
    { echo "make_bundle: $BUILD does not build for sm_$arch (CMAKE_CUDA_ARCHITECTURES must hold 80 and 90)" >&2; exit 1; }
done
cmake --build "$BUILD" --target engramd engramctl engram-bench engram_gpu_tests engram_device_check >/dev/null
PROGRAMS=("$BUILD/service/engramd" "$BUILD/service/engramctl" "$BUILD/bench/engram-bench" "$BUILD/tests/engram_gpu_tests"
  "$BUILD/tests/engram_device_check")

mkdir -p "$OUT"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
B="$STAGE/engram-gpu-bundle"
mkdir -p "$B/bin" "$B/libexec" "$B/lib" "$B/share/engram"
# Libraries the host's CUDA provides: never bundled.
host_provided() { case "$(basename "$1")" in libcuda.so*|libcublas.so*|libcublasLt.so*|libcudart.so*|libnvidia*) return 0;; esac; return 1; }
for p in "${PROGRAMS[@]}"; do
  name=$(basename "$p")
  strip --strip-unneeded -o "$B/libexec/$name" "$p"
  ldd "$p" | while read -r line; do
    path=$(echo "$line" | sed -nE 's/.*=> (\/[^ ]+) .*/\1/p; s/^\s*(\/[^ ]+) \(.*/\1/p')
    [ -n "$path" ] || continue
    host_provided "$path" && continue
    base=$(basename "$path")
    [ -f "$B/lib/$base" ] || strip --strip-unneeded -o "$B/lib/$base" "$(readlink -f "$path")" 2>/dev/null ||
      cp -L "$path" "$B/lib/$base"
  done
  cat >"$B/bin/$name" <<WRAP
#!/bin/sh
# $name from the bundle: its own loader and libraries, CUDA from the host.
B=\$(cd "\$(dirname "\$0")/.." && pwd)
C=\${CUDA_HOME:-/usr/local/cuda}
CUDA_LIBS="\$C/lib64:\$C/lib:\$C/targets/x86_64-linux/lib"
DRIVER_LIBS="/usr/lib/x86_64-linux-gnu:/usr/lib64:/usr/local/nvidia/lib64:/usr/lib/wsl/lib"
export ENGRAM_DATA_DIR="\$B/share/engram"
exec "\$B/lib/ld-linux-x86-64.so.2" --library-path "\$B/lib:\$CUDA_LIBS:\$DRIVER_LIBS" "\$B/libexec/$name" "\$@"
WRAP
  chmod +x "$B/bin/$name"
done
[ -f "$B/lib/ld-linux-x86-64.so.2" ] || { echo "make_bundle: no loader collected" >&2; exit 1; }
# The rest of this glibc, which the programs no longer name (glibc 2.34 folded them into libc) but
# the host's libcuda and cuBLAS do: from the host they would mix two glibcs.
libc_dir=$(dirname "$(ldd "${PROGRAMS[0]}" | sed -nE 's/.*libc\.so\.6 => (\/[^ ]+) .*/\1/p')")
for lib in libdl.so.2 libpthread.so.0 librt.so.1 libm.so.6; do
  [ -f "$B/lib/$lib" ] || cp -L "$libc_dir/$lib" "$B/lib/$lib"
done
cp tiering/data/deepseek_v3_compress_lut.i32 "$B/share/engram/"
cp tests/gpu/device_check.sh "$B/"
git -C "$SRC" rev-parse HEAD >"$B/COMMIT" 2>/dev/null || echo unknown >"$B/COMMIT"
tar -C "$STAGE" -cf - engram-gpu-bundle | xz -6 -T0 >"$OUT/engram-gpu-bundle.tar.xz"
size=$(stat -c %s "$OUT/engram-gpu-bundle.tar.xz")
echo "make_bundle: $OUT/engram-gpu-bundle.tar.xz, $((size / 1048576)) MiB ($(ls "$B/lib" | wc -l) libraries, $(du -sm "$B" | cut -f1) MiB unpacked)"
[ "$size" -lt $((60 * 1048576)) ] || { echo "make_bundle: the bundle is not under 60 MiB" >&2; exit 1; }

# The self-check, from a fresh unpack with an empty environment.
CHECK=$(mktemp -d)
trap 'rm -rf "$STAGE" "$CHECK"' EXIT
tar -C "$CHECK" -xJf "$OUT/engram-gpu-bundle.tar.xz"
U="$CHECK/engram-gpu-bundle"
for p in "${PROGRAMS[@]}"; do
  name=$(basename "$p")
  # Every library resolves inside the bundle, but for what the host's CUDA provides.
  env -i "$U/lib/ld-linux-x86-64.so.2" --list --library-path "$U/lib" "$U/libexec/$name" >"$CHECK/$name.libs" 2>&1 || true
  outside=$(grep -E '=>' "$CHECK/$name.libs" | grep -v "=> $U/lib/" |
    grep -vE 'libcuda\.so|libcublas(Lt)?\.so|libcudart\.so' || true)
  [ -z "$outside" ] || { echo "make_bundle: $name loads from outside the bundle:"; echo "$outside"; exit 1; }
done
for name in engramd engramctl engram-bench; do
  env -i "$U/bin/$name" --help >"$CHECK/help.txt" 2>&1 || { echo "make_bundle: bundled $name --help failed:"; cat "$CHECK/help.txt"; exit 1; }
done
env -i "$U/bin/engramctl" pack create --preset demo-v1 --scale 0.001 --quiet --out "$CHECK/pack" >/dev/null
set +e
env -i "$U/bin/engram_gpu_tests" >"$CHECK/gpu.txt" 2>&1
rc=$?
set -e
set +e
env -i "$U/bin/engram_device_check" "$CHECK/pack" "unix://$CHECK/none.sock" >"$CHECK/device.txt" 2>&1
drc=$?
set -e
[ "$drc" = 77 ] || [ "$drc" = 0 ] || { echo "make_bundle: bundled engram_device_check exited $drc:"; cat "$CHECK/device.txt"; exit 1; }
if [ "$rc" = 77 ]; then
  echo "make_bundle: self-check passed: every program starts from the bundle alone; engram_gpu_tests: $(head -1 "$CHECK/gpu.txt")"
elif [ "$rc" = 0 ]; then
  echo "make_bundle: self-check passed, and engram_gpu_tests passed on this machine's GPU"
else
  echo "make_bundle: bundled engram_gpu_tests exited $rc:"; cat "$CHECK/gpu.txt"; exit 1
fi
