#!/usr/bin/env bash
# Start the whole bundle under supervisord and wait until it serves.
# Usage: scripts/start_all.sh [--profile default|seed|path/to/deployment.yaml]
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle" start "$@"
