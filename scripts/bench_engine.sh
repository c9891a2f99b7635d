#!/usr/bin/env bash
# In-process engine benchmark, fp32 vs ITREX INT8 (prints figures; see README "Benchmarks").
# Usage: scripts/bench_engine.sh [--explore] [--rounds N] [--models embedded|random-1b|both]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m workers.bench_engine "$@"
