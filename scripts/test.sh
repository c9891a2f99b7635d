#!/usr/bin/env bash
# Run the whole test suite. Sets up what it needs first (.venv, embedded model), so it works on a
# fresh machine. Extra arguments go to pytest, e.g. scripts/test.sh tests/test_deployment.py -x
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
