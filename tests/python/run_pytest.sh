#!/usr/bin/env bash
# Runs the engram Python package's tests with Debian's pytest (/usr/bin/python3 -m pytest); exit 77
# (reported as skipped, with the reason) when pytest is not installed.
set -euo pipefail
if ! /usr/bin/python3 -c "import pytest" 2>/dev/null; then
  echo "SKIP: pytest is not installed for /usr/bin/python3 (apt-get install python3-pytest)"
  exit 77
fi
exec /usr/bin/python3 -m pytest -q -p no:cacheprovider "$@"
