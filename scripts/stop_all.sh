#!/usr/bin/env bash
# Stop the bundle (see README). Usage: scripts/stop_all.sh [--profile P]
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle" stop "$@"
