# Shared preamble of the scripts: `source "$(dirname "$0")/lib.sh"`, then `exec "$bin/<command>" ...`.
# Builds or checks the virtual environment (BUNDLE_VENV, default .venv; a no-op while requirements*.txt and
# pyproject.toml are unchanged).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BUNDLE_VENV:-.venv}"
[[ $venv == /* ]] || venv="$root/$venv"
bin="$venv/bin"
"$root/scripts/setup.sh" >&2
