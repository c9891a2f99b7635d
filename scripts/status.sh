#!/usr/bin/env bash
# Show each program's state and each registered model (see docs/operating.md). Usage: scripts/status.sh [--profile P]
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle" status "$@"
