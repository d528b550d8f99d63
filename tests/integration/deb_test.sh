#!/usr/bin/env bash
# The Debian packages as an operator takes them, on this machine: install with apt-get, run the
# installed engramd under its unit's own ExecStart line as the engram user (under systemd when it
# is PID 1), serve a demo pack, read rows as a worker in group engram (the installed engram-bench,
# an engine built against the installed headers and CMake package, the installed Python module),
# then remove and purge and check what is left.
#   tests/integration/deb_test.sh DEB_DIR SOURCE_DIR BUILD_DIR
# DEB_DIR holds engramd_*.deb and engramd-dev_*.deb (deploy/make-deb.sh); BUILD_DIR is a source
# build whose engram-example-engine gives the checksums to compare with. Needs root and apt-get;
# exits 77 (skipped) without them. Leaves nothing behind: the test user and /var/lib/engram go.
set -euo pipefail
DEBS=$(cd "$1" && pwd)
SRC=$(cd "$2" && pwd)
BUILD=$(cd "$3" && pwd)
[ "$(id -u)" = 0 ] || { echo "deb_test: skipped: needs root to install packages"; exit 77; }
command -v apt-get >/dev/null || { echo "deb_test: skipped: no apt-get"; exit 77; }
if dpkg-query -W -f='${Status}' engramd 2>/dev/null | grep -q 'ok installed'; then
  echo "deb_test: engramd is already installed here; not touching it"
  exit 1
fi
WORKER=engram-deb-test-worker
T=$(mktemp -d)
DAEMON=""
cleanup() {
  [ -n "$DAEMON" ] && kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
  apt-get purge -y -qq engramd-dev engramd >/dev/null 2>&1 || true
  userdel "$WORKER" >/dev/null 2>&1 || true
  userdel engram >/dev/null 2>&1 || true
  groupdel engram >/dev/null 2>&1 || true
  rm -rf /var/lib/engram /run/engram "$T"
}
trap cleanup EXIT
step() { echo "deb_test: $*"; }

step "apt-get install ./engramd ./engramd-dev"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "$DEBS"/engramd_*.deb "$DEBS"/engramd-dev_*.deb >"$T/apt.log" 2>&1 || { cat "$T/apt.log"; exit 1; }
for f in /usr/bin/engramd /usr/bin/engramctl /usr/bin/engram-bench /usr/share/engram/deepseek_v3_compress_lut.i32 \
  /usr/lib/systemd/system/engramd.service /etc/default/engramd /usr/include/engram/client.h \
  /usr/lib/x86_64-linux-gnu/cmake/engram/engramConfig.cmake /usr/lib/x86_64-linux-gnu/pkgconfig/engram-client.pc \
  /usr/lib/python3/dist-packages/engram/__init__.py; do
  [ -e "$f" ] || { echo "deb_test: $f was not installed"; exit 1; }
done
/usr/bin/engramd --help >"$T/help.txt" 2>&1 || { cat "$T/help.txt"; exit 1; }
grep -q -- "--pack" "$T/help.txt"
getent passwd engram >/dev/null || { echo "deb_test: no engram user"; exit 1; }
[ "$(stat -c %U:%G /var/lib/engram)" = engram:engram ] || { echo "deb_test: /var/lib/engram is not engram's"; exit 1; }
step "user engram, /var/lib/engram, the binaries and the unit installed"

step "systemd-analyze verify"
systemd-analyze verify /usr/lib/systemd/system/engramd.service 2>"$T/verify.txt" || { cat "$T/verify.txt"; exit 1; }
if [ -s "$T/verify.txt" ]; then echo "deb_test: systemd-analyze verify warns:"; cat "$T/verify.txt"; exit 1; fi

# A demo pack where /etc/default/engramd points, made with the installed engramctl as engram.
runuser -u engram -- /usr/bin/engramctl pack create --preset demo-v1 --scale 0.002 --quiet \
  --out /var/lib/engram/packs/demo
useradd --system --no-create-home --groups engram "$WORKER"
SOCK=/run/engram/engramd.sock
if [ -d /run/systemd/system ]; then
  step "systemctl start engramd (systemd is PID 1)"
  systemctl start engramd
  for _ in $(seq 1 300); do curl -sf http://127.0.0.1:9464/readyz >/dev/null && break; sleep 0.1; done
  METRICS=127.0.0.1:9464
else
  # No systemd here: do what the unit does. RuntimeDirectory=engram (mode 0750), the
  # EnvironmentFile, then ExecStart as User=engram; loopback ports 0 instead of 50051/9464 so a
  # busy machine cannot collide (the last flag wins).
  step "no systemd as PID 1: the unit's ExecStart as user engram"
  install -d -o engram -g engram -m 0750 /run/engram
  exec_start=$(sed -n 's/^ExecStart=//p' /usr/lib/systemd/system/engramd.service)
  # shellcheck disable=SC1091
  . /etc/default/engramd
  # shellcheck disable=SC2086
  set -- ${exec_start//\$ENGRAMD_OPTS/$ENGRAMD_OPTS}
  # setpriv execs engramd itself as engram (as systemd's User= does; runuser would stay its parent).
  setpriv --reuid engram --regid engram --init-groups -- "$@" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --ports-file /run/engram/ports.json >"$T/engramd.log" 2>&1 &
  DAEMON=$!
  for _ in $(seq 1 600); do [ -f /run/engram/ports.json ] && break; sleep 0.1; done
  [ -f /run/engram/ports.json ] || { echo "deb_test: engramd did not start"; cat "$T/engramd.log"; exit 1; }
  METRICS=127.0.0.1:$(sed -E 's/.*"metrics_port": ([0-9]+).*/\1/' /run/engram/ports.json)
fi
curl -sf "http://$METRICS/readyz" >"$T/readyz.txt" && grep -q ready "$T/readyz.txt" ||
  { echo "deb_test: /readyz is not ready"; exit 1; }
curl -sf "http://$METRICS/metrics" >"$T/metrics.txt" && grep -q '^engram_ready 1' "$T/metrics.txt" ||
  { echo "deb_test: /metrics says not ready"; exit 1; }
step "engramd serves, /readyz and /metrics answer"

# A worker in group engram reads rows; a user outside it is refused (peer credentials).
runuser -u "$WORKER" -- /usr/bin/engram-bench --target "unix://$SOCK" --table demo --duration 1 --batch-tokens 64 \
  --json >"$T/bench.json"
/usr/bin/python3 - "$T/bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["errors"] == 0 and r["rows_per_s"] > 0, r
print("deb_test: installed engram-bench as a worker in group engram: %.3g rows/s, 0 errors" % r["rows_per_s"])
PY
# Outside group engram: /run/engram (0750) keeps it from the socket; opened up for a moment, the
# daemon's own peer-credential check must refuse it too.
if runuser -u nobody -- /usr/bin/engram-bench --target "unix://$SOCK" --table demo --duration 1 >/dev/null 2>&1; then
  echo "deb_test: user nobody (not in group engram) was served"; exit 1
fi
chmod o+x /run/engram
set +e
runuser -u nobody -- /usr/bin/engram-bench --target "unix://$SOCK" --table demo --duration 1 >"$T/nobody.txt" 2>&1
nobody_rc=$?
set -e
chmod o-x /run/engram
[ "$nobody_rc" != 0 ] && grep -qi "refused\|not allowed\|permission" "$T/nobody.txt" ||
  { echo "deb_test: with the socket reachable, user nobody was not refused by engramd:"; cat "$T/nobody.txt"; exit 1; }
step "user nobody, outside group engram, is refused (by the directory, and by engramd's credential check)"

# An engine built against the installed headers and CMake package, run as the worker: the same
# checksums as the example built in the source tree.
mkdir -p "$T/consumer"
cp "$SRC/client/examples/engine_integration.cc" "$T/consumer/"
cat >"$T/consumer/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.25)
project(engram_consumer CXX)
set(CMAKE_CXX_STANDARD 20)
find_package(engram CONFIG REQUIRED)
add_executable(consumer engine_integration.cc)
target_link_libraries(consumer PRIVATE engram::engram_client)
CMAKE
cmake -S "$T/consumer" -B "$T/consumer/build" -G Ninja >/dev/null
cmake --build "$T/consumer/build" >/dev/null
# The worker cannot be assumed to reach the source and build trees (a clone under /root):
# everything it runs or reads is copied here first.
cp "$SRC/tests/data/fortunes.deepseek_v3.i32" "$T/tokens.i32"
cp "$BUILD/client/engram-example-engine" "$T/source-engine"
chmod -R a+rX "$T"
runuser -u "$WORKER" -- "$T/consumer/build/consumer" "unix://$SOCK" demo "$T/tokens.i32" 2 64 >"$T/installed.txt"
runuser -u "$WORKER" -- "$T/source-engine" "unix://$SOCK" demo "$T/tokens.i32" 2 64 >"$T/source.txt"
grep -q "checksum" "$T/installed.txt" || { echo "deb_test: the installed-header engine printed no checksums"; exit 1; }
diff "$T/installed.txt" "$T/source.txt" || { echo "deb_test: installed and source-tree engines differ"; exit 1; }
step "an engine built with find_package(engram) from /usr reads the same rows as the source tree's"

# The installed Python module, from a neutral directory and an empty PYTHONPATH.
(cd / && runuser -u "$WORKER" -- env -u PYTHONPATH /usr/bin/python3 -c "
import engram, numpy as np
assert engram.__file__.startswith('/usr/lib/python3/dist-packages/engram/'), engram.__file__
c = engram.connect('unix://$SOCK')
t = c.open_table('demo')
idx = np.zeros((4, t.heads), dtype=np.uint32)
rows = c.lookup(t, t.layer_ids[0], idx)
assert rows.nbytes == 4 * t.heads * t.row_bytes, rows.shape
print('deb_test: import engram from', engram.__file__, '- looked up', rows.nbytes, 'bytes')
")

if [ -n "$DAEMON" ]; then
  kill -TERM "$DAEMON"
  wait "$DAEMON" || { echo "deb_test: engramd did not exit cleanly"; cat "$T/engramd.log"; exit 1; }
  DAEMON=""
else
  systemctl stop engramd
fi
step "engramd stopped on SIGTERM with exit 0"

step "apt-get remove"
apt-get remove -y -qq engramd-dev engramd >"$T/apt.log" 2>&1 || { cat "$T/apt.log"; exit 1; }
left=$(dpkg -L engramd 2>/dev/null | while read -r f; do [ -f "$f" ] && echo "$f"; done || true)
[ "$left" = "/etc/default/engramd" ] || { echo "deb_test: after remove, left besides the conffile: $left"; exit 1; }
for f in /usr/bin/engramd /usr/bin/engramctl /usr/bin/engram-bench /usr/share/engram /usr/include/engram \
  /usr/lib/python3/dist-packages/engram /usr/lib/systemd/system/engramd.service; do
  [ ! -e "$f" ] || { echo "deb_test: $f is left after remove"; exit 1; }
done
[ -f /etc/default/engramd ] && [ -d /var/lib/engram/packs/demo ] && [ -d /var/lib/engram/state ] ||
  { echo "deb_test: remove took configuration or state"; exit 1; }
step "removed: only /etc/default/engramd and /var/lib/engram (packs, state) are left"
apt-get purge -y -qq engramd >"$T/apt.log" 2>&1 || { cat "$T/apt.log"; exit 1; }
[ ! -e /etc/default/engramd ] && [ ! -e /var/lib/engram/state ] && [ -d /var/lib/engram/packs/demo ] ||
  { echo "deb_test: purge should drop the conffile and the state store, and keep the packs"; exit 1; }
step "purged: the conffile and the state store gone, the packs kept"
echo "deb_test: passed"
