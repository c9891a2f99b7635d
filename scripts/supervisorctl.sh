#!/usr/bin/env bash
# supervisorctl for the running bundle (its config holds the socket and credentials).
# Usage: scripts/supervisorctl.sh status | restart workers:NAME | tail -f NAME ...
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "$root/.venv/bin/supervisorctl" -c "${BUNDLE_VAR_DIR:-$root/var}/run/supervisord.conf" "$@"
