#!/usr/bin/env bash
# The host row gathers still request rows ahead of copying them. GCC 12 once deleted the
# prefetches of the mapped-table gather without a word (kernels/include/engram/kernels/prefetch.h),
# which made every mapped lookup 3x slower; nothing else would notice, so this looks at the code:
# each function below, in the built library, must hold a prefetch instruction.
# Usage: tests/check_prefetch.sh BUILD_DIR
set -euo pipefail
BUILD=${1:?usage: check_prefetch.sh BUILD_DIR}
case "$(uname -m)" in x86_64 | i?86) ;; *) echo "SKIP: the check reads x86 code"; exit 77 ;; esac
command -v objdump >/dev/null || { echo "SKIP: objdump (binutils) is not installed"; exit 77; }
fail=0
check() {  # ARCHIVE FUNCTION: FUNCTION's body in ARCHIVE holds a prefetch
  local archive=$BUILD/$1 fn=$2 n
  n=$(objdump -d --no-show-raw-insn -C "$archive" |
      awk -v fn="$fn" '/^[0-9a-f]+ <.*>:$/ { inside = index($0, "<" fn "(") > 0 } inside && /prefetch/ { n++ } END { print n + 0 }')
  if [ "$n" -gt 0 ]; then
    echo "ok: $fn ($1): $n prefetch instructions"
  else
    echo "FAIL: $fn in $1 has no prefetch instruction: its gather waits on each row's cache miss in turn"
    fail=1
  fi
}
check client/libengram_client.a engram::MappedTable::Lookup
check client/libengram_client.a engram::MappedTable::GatherWithHbm
check tiering/libengram_tiering.a engram::GatherRows
exit $fail
