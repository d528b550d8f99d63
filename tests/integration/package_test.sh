#!/usr/bin/env bash
# libengram_client as an engine would take it: installed to a prefix, then the example engine
# built from outside the tree, once with find_package(engram) and once with pkg-config; both
# binaries must run (no daemon: they print their usage and exit 2).
#   tests/integration/package_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BUILD=$1
SRC=$2
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
cmake --install "$BUILD" --prefix "$T/prefix" >/dev/null
mkdir -p "$T/consumer"
cp "$SRC/client/examples/engine_integration.cc" "$T/consumer/"
cat > "$T/consumer/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.25)
project(engram_consumer CXX)
set(CMAKE_CXX_STANDARD 20)
find_package(engram CONFIG REQUIRED)
add_executable(consumer engine_integration.cc)
target_link_libraries(consumer PRIVATE engram::engram_client)
CMAKE
cmake -S "$T/consumer" -B "$T/consumer/build" -G Ninja -DCMAKE_PREFIX_PATH="$T/prefix" >/dev/null
cmake --build "$T/consumer/build" >/dev/null
set +e
"$T/consumer/build/consumer" >/dev/null 2>"$T/usage.txt"; rc=$?
set -e
[ "$rc" = 2 ] && grep -q "usage:" "$T/usage.txt" || { echo "cmake consumer: exit $rc"; cat "$T/usage.txt"; exit 1; }
echo "find_package(engram): built and ran"

export PKG_CONFIG_PATH="$T/prefix/lib/pkgconfig"
# shellcheck disable=SC2046
g++ -O1 "$SRC/client/examples/engine_integration.cc" $(pkg-config --cflags --libs engram-client) -o "$T/pc-consumer"
set +e
"$T/pc-consumer" >/dev/null 2>"$T/usage2.txt"; rc=$?
set -e
[ "$rc" = 2 ] && grep -q "usage:" "$T/usage2.txt" || { echo "pkg-config consumer: exit $rc"; cat "$T/usage2.txt"; exit 1; }
echo "pkg-config engram-client: built and ran"

# Every installed public header stands on its own with only the installed tree (no source checkout).
for h in "$T"/prefix/include/engram/*.h; do
  name="engram/$(basename "$h")"
  # shellcheck disable=SC2046
  printf '#include <%s>\nint main() { return 0; }\n' "$name" |
    g++ -std=c++20 -fsyntax-only -x c++ - $(pkg-config --cflags engram-client) ||
    { echo "installed header $name does not compile on its own"; exit 1; }
done
echo "installed headers: each compiles on its own"
