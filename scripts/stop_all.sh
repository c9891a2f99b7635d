#!/usr/bin/env bash
# Stop the bundle (see docs/operating.md). Usage: scripts/stop_all.sh [--profile P]
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle" stop "$@"
