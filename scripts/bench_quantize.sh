#!/usr/bin/env bash
# First-start INT8 quantization of a seed-model-shaped random model: time, peak memory, INT8 speed (prints figures).
# Usage: scripts/bench_quantize.sh [--shape S (--help lists them)] [--runtime R] [--bits 8|4] [--library native] [--llama-cpp] [--rounds N] [--keep]
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle-bench-quantize" "$@"
