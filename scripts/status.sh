#!/usr/bin/env bash
# Show each program's state and each registered model (see README).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m workers.bundle status "$@"
