#!/usr/bin/env bash
# Start the whole bundle under supervisord and wait until it serves.
# Usage: scripts/start_all.sh [--profile default|seed|path/to/deployment.yaml]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m workers.bundle start "$@"
