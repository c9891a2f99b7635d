#!/usr/bin/env bash
# Run the whole test suite: tests/unit (fast lane, no processes) then tests/integration (real
# processes). Sets up what it needs first (.venv, browser; the tests prepare the embedded model),
# so it works on a fresh machine. Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
source "$(dirname "$0")/lib.sh"
"$root/scripts/install_browser.sh"   # Debian chromium + CJK/emoji fonts for the browser tests
cd "$root"
exec "$bin/python" -m pytest "$@"
