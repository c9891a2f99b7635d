#!/usr/bin/env bash
# Download a profile's ModelScope models (resumable, with progress) and check they are complete.
# Usage: scripts/download_models.sh [--profile seed] [--cache-dir DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m workers.download "$@"
