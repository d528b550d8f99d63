#!/usr/bin/env bash
# Builds the Debian packages engramd and engramd-dev (CPack, deploy/debian/packaging.cmake) in a
# build directory of their own: installed under /usr, CUDA off (Debian has no CUDA 13 libraries
# to depend on), no tests. Prints the paths of the .deb files.
#   deploy/make-deb.sh [BUILD_DIR]     (default build-deb)
# A GPU package: build against a locally installed toolkit with ENGRAM_CUDA=ON instead, e.g.
#   ENGRAM_DEB_CUDA=ON deploy/make-deb.sh build-deb-cuda
# (its engramd then needs that toolkit's cuBLAS and cudart on every host it is installed on).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build-deb}
JOBS=${JOBS:-$(nproc)}
command -v dpkg-shlibdeps >/dev/null || { echo "make-deb: needs dpkg-dev (apt-get install dpkg-dev)" >&2; exit 1; }
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/usr \
  -DENGRAM_CUDA="${ENGRAM_DEB_CUDA:-OFF}" -DENGRAM_TESTS=OFF -DENGRAM_BENCH=ON >/dev/null
cmake --build "$BUILD" -j "$JOBS"
rm -f "$BUILD"/*.deb
(cd "$BUILD" && cpack -G DEB >/dev/null)
ls "$BUILD"/*.deb
