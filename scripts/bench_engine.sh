#!/usr/bin/env bash
# In-process engine benchmark: fp32 vs ITREX INT8 vs llama.cpp F16/Q8_0/Q4_0 (prints figures; see docs/benchmarks.md).
# Usage: scripts/bench_engine.sh [--llama-cpp | --no-llama-cpp] [--explore] [--rounds N] [--threads N ...]
#        [--models embedded|random-1b|random-1.5b|both ...]
# --llama-cpp builds .venv-bench first (llama-cpp-python compiled from source, scripts/setup_bench.sh); once it
# exists, the llama.cpp variants run by default and the environment is only checked.
source "$(dirname "$0")/lib.sh"
llama=auto
for arg in "$@"; do
  case $arg in --llama-cpp) llama=yes ;; --no-llama-cpp) llama=no ;; esac
done
if [[ $llama == yes || ( $llama == auto && -x $root/.venv-bench/bin/python ) ]]; then
  "$root/scripts/setup_bench.sh" >&2
fi
exec "$bin/bundle-bench-engine" "$@"
