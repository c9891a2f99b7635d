#!/usr/bin/env bash
# Show each program's state and each registered model (see README). Usage: scripts/status.sh [--profile P]
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle" status "$@"
