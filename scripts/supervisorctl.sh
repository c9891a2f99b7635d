#!/usr/bin/env bash
# supervisorctl for the running bundle (its config holds the socket and credentials).
# Usage: scripts/supervisorctl.sh status | restart workers:NAME | tail -f NAME ...
source "$(dirname "$0")/lib.sh"
exec "$bin/supervisorctl" -c "${BUNDLE_VAR_DIR:-$root/var}/run/supervisord.conf" "$@"
