#!/usr/bin/env bash
# Restart one model's worker (supervisorctl restart workers:<name>) and wait until it is registered again.
# Usage: scripts/restart_worker.sh MODEL_NAME
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m workers.bundle restart "$@"
