#!/usr/bin/env bash
# Run the whole test suite. Sets up what it needs first (.venv, browser; the tests prepare the
# embedded model), so it works on a fresh machine. Extra arguments go to pytest, e.g. scripts/test.sh tests/test_deployment.py -x
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh"
"$root/scripts/install_browser.sh"   # Debian chromium + CJK/emoji fonts for the browser tests
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
