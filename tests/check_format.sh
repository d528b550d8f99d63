#!/usr/bin/env bash
# Fails (naming each file) when a file listed in tests/format_files.txt is not as clang-format
# (.clang-format at the root) would write it. `tests/check_format.sh --fix` formats them.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null || { echo "check_format: clang-format is not installed" >&2; exit 1; }
mapfile -t files < <(grep -v '^\s*#' tests/format_files.txt | sed '/^\s*$/d')
if [ "${1:-}" = "--fix" ]; then
  clang-format -i "${files[@]}"
  exit 0
fi
bad=0
for f in "${files[@]}"; do
  [ -f "$f" ] || { echo "check_format: $f is listed but missing"; bad=1; continue; }
  if ! diff -q <(clang-format "$f") "$f" >/dev/null; then
    echo "check_format: $f is not clang-formatted (tests/check_format.sh --fix)"
    bad=1
  fi
done
[ "$bad" = 0 ] && echo "check_format: ${#files[@]} files formatted"
exit "$bad"
