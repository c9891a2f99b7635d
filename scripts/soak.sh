#!/usr/bin/env bash
# Soak benchmark of a running bundle: 1,000 mixed requests (drops, over-long prompts, bad shapes, bursts past
# the queue); prints the 5xx count, the worst queue length and RSS start/peak/end per worker; exits 1 on any 5xx.
# Usage: scripts/soak.sh [--profile default] [--requests 1000] [--concurrency 6] ...   (--help lists the options)
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle-soak" "$@"
