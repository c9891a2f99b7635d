#!/usr/bin/env bash
# Serving benchmark through the API (concurrency 1, 2, 4) next to the in-process engine figures.
# Usage: scripts/bench_api.sh [--profile default] ...   (--help lists the options)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m workers.bench_api "$@"
