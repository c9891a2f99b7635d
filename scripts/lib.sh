# Shared preamble of the scripts: `source "$(dirname "$0")/lib.sh"`, then `exec "$bin/<command>" ...`.
# Builds or checks .venv (a no-op while requirements*.txt and pyproject.toml are unchanged).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/.venv/bin"
"$root/scripts/setup.sh" >&2
