#!/usr/bin/env bash
# In-process engine benchmark, fp32 vs ITREX INT8 (prints figures; see README "Benchmarks").
# Usage: scripts/bench_engine.sh [--explore] [--rounds N] [--models embedded|random-1b|both]
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle-bench-engine" "$@"
