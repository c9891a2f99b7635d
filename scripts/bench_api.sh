#!/usr/bin/env bash
# Serving benchmark through the API (concurrency 1, 2, 4) next to the in-process engine figures.
# Usage: scripts/bench_api.sh [--profile default] ...   (--help lists the options)
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle-bench-api" "$@"
