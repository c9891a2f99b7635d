#!/usr/bin/env bash
# Restart one model's worker and wait until it is registered again.
# Usage: scripts/restart_worker.sh MODEL_NAME [--profile P]
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle" restart "$@"
