#!/usr/bin/env bash
# Ask every served model the questions in conf/questions/ and write a side-by-side report.
# Usage: scripts/compare.sh [--profile default] ...   (--help lists the options)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m workers.compare "$@"
